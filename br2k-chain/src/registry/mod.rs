//! [`ChainRegistry`]: the [`Registry`] on an EVM chain.
//!
//! - this module: the handle, connecting, and the low-level calls (view calls at a
//!   pinned block, transactions, paged log queries);
//! - `verify`: checking event contents against the stored hashes;
//! - `events`: the events (spec, location and name lookups, changes, audit trail);
//! - `batch`: batched record reads;
//! - `api`: the [`Registry`] operations and the owner's resets.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use alloy::network::TransactionBuilder;
use alloy::primitives::{Address, B256, Bytes, keccak256};
use alloy::providers::Provider;
use alloy::rpc::types::{Filter, Log, TransactionRequest};
use alloy::sol_types::SolCall;
#[cfg(doc)]
use br2k_core::Registry;
use br2k_core::spec::MAX_REPLICAS;
use br2k_core::{
    Account, Placement, RegistryChange, Result, Role, ServiceId, ServiceRecord, ServiceSpec,
    ValidationError, check_cluster_name,
};
use parking_lot::Mutex;

use crate::bindings::ServiceRegistry as C;
use crate::config::{ChainConfig, ReadDepth};
use crate::error::ChainError;
use crate::rpc::{Endpoints, Pin};
use crate::sender::Sender;

mod api;
mod batch;
mod events;
mod verify;

/// Ids per `getRecords` call (keeps a view call well under the block gas limit).
const RECORDS_PER_CALL: usize = 200;
/// Reads of a record batch, each at a fresh pin, while an endpoint answers for another
/// block than the pinned one.
const READ_ATTEMPTS: u32 = 3;
/// Ids per `eth_getLogs` topic filter.
const IDS_PER_LOG_QUERY: usize = 500;
/// Entries kept in each verified-content cache before it is cleared.
const CACHE_LIMIT: usize = 20_000;

/// Largest increase of a checkpoint's log index per call that the registry contract
/// accepts (`MAX_LOG_INDEX_STEP`); [`ChainRegistry::reset_checkpoint`] is not bound.
pub const MAX_LOG_INDEX_STEP: u64 = 1 << 32;

/// Largest increase of a checkpoint or location term per call that the registry
/// contract accepts (`MAX_TERM_STEP`); the owner's resets are not bound.
pub const MAX_TERM_STEP: u64 = 1 << 40;

/// One change of a service as its event records it, with the account that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    /// The change (`at` is the block number).
    pub change: RegistryChange,
    /// The account whose transaction made the change (`msg.sender`).
    pub by: Account,
    /// The transaction, when the endpoint reports it.
    pub tx: Option<B256>,
}

/// The service registry contract on an EVM chain, acting as the account of its
/// signing key.
///
/// Storage holds hashes only; spec bytes and location endpoints are read back from the
/// contract's events and verified against the stored hashes ([`br2k_core::Error::Tampered`]
/// otherwise). Reads fail over between the configured endpoints; when none answers,
/// [`Registry::active`] returns the last verified record with `stale = true`.
#[derive(Clone)]
pub struct ChainRegistry {
    inner: Arc<Inner>,
}

struct Inner {
    rpc: Endpoints,
    /// `None` on a read-only connection (no signer configured).
    sender: Option<Sender>,
    address: Address,
    chain_id: u64,
    deploy_block: u64,
    poll: std::time::Duration,
    log_block_range: u64,
    /// Block at which records are read.
    read_depth: ReadDepth,
    /// Endpoints that must agree on a read.
    quorum: usize,
    /// Verified specs by sha256 spec hash.
    specs: Mutex<HashMap<B256, ServiceSpec>>,
    /// Location endpoints by keccak256.
    endpoints: Mutex<HashMap<B256, String>>,
    /// Service names by id (keccak256 of the name).
    names: Mutex<HashMap<B256, ServiceId>>,
    /// The last verified record of each service read by this handle.
    last: Mutex<HashMap<ServiceId, ServiceRecord>>,
}

impl fmt::Debug for ChainRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChainRegistry")
            .field("address", &self.inner.address)
            .field("account", &self.inner.sender.as_ref().map(|s| s.from))
            .field("chain_id", &self.inner.chain_id)
            .finish_non_exhaustive()
    }
}

fn insert_capped<K: std::hash::Hash + Eq, V>(m: &Mutex<HashMap<K, V>>, k: K, v: V) {
    let mut map = m.lock();
    if map.len() >= CACHE_LIMIT {
        map.clear();
    }
    map.insert(k, v);
}

/// The bytes32 key of a service: keccak256 of its name.
pub fn service_key(id: &ServiceId) -> B256 {
    keccak256(id.as_str().as_bytes())
}

/// `0x` and 40 lowercase hex digits.
pub fn account_of(address: Address) -> Account {
    Account(format!("0x{}", hex::encode(address.as_slice())))
}

/// The bytes32 the registry stores for a cluster name: the name validated
/// ([`br2k_core::check_cluster_name`]), left-aligned and zero padded.
pub fn cluster_word(name: &str) -> Result<B256> {
    check_cluster_name(name)?;
    let mut out = [0u8; 32];
    out[..name.len()].copy_from_slice(name.as_bytes());
    Ok(B256::from(out))
}

/// The cluster name of a stored bytes32 (trailing zeros trimmed), if it is one.
pub(crate) fn cluster_name(word: &B256) -> Result<String, ValidationError> {
    let len = word.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
    let name = String::from_utf8_lossy(&word[..len]).into_owned();
    check_cluster_name(&name)?;
    Ok(name)
}

/// The placement of a record as an endpoint answered it (`what` names the answer):
/// none when no cluster is recorded; a cluster that is not a valid name, or an epoch
/// of 0 or without a cluster, is a malformed answer (the contract stores neither).
pub(crate) fn decode_placement(
    what: &str,
    p: &C::Placement,
) -> Result<Option<Placement>, ChainError> {
    if p.cluster == B256::ZERO {
        if p.epoch != 0 || p.blockNumber != 0 {
            return Err(ChainError::Decode(format!(
                "{what}: a placement at epoch {} without a cluster",
                p.epoch
            )));
        }
        return Ok(None);
    }
    let cluster = cluster_name(&p.cluster)
        .map_err(|e| ChainError::Decode(format!("{what}: placement: {e}")))?;
    if p.epoch == 0 {
        return Err(ChainError::Decode(format!(
            "{what}: placement in cluster {cluster} at epoch 0"
        )));
    }
    Ok(Some(Placement {
        cluster,
        epoch: p.epoch,
    }))
}

fn parse_account(account: &Account) -> Result<Address, ChainError> {
    let s = account.0.as_str();
    let hexpart = s.strip_prefix("0x").unwrap_or("");
    if hexpart.len() != 40 || !hexpart.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ChainError::Core(
            ValidationError::malformed("account", "must be 0x and 40 hex digits").into(),
        ));
    }
    let mut out = [0u8; 20];
    hex::decode_to_slice(hexpart, &mut out)
        .map_err(|e| ChainError::Core(ValidationError::malformed("account", e).into()))?;
    Ok(Address::from(out))
}

fn role_bits(role: Role) -> u8 {
    match role {
        Role::Operator => 1,
        Role::Replica => 2,
    }
}

fn check_replicas(spec: &ServiceSpec, replicas: u32) -> Result<(), ChainError> {
    if replicas > MAX_REPLICAS {
        return Err(ChainError::Core(
            ValidationError::spec("replicas", format!("must be at most {MAX_REPLICAS}")).into(),
        ));
    }
    if let Some(a) = &spec.autoscaling
        && !(a.min_replicas..=a.max_replicas).contains(&replicas)
    {
        return Err(ChainError::Core(
            ValidationError::spec("replicas", "must lie within the autoscaling bounds").into(),
        ));
    }
    Ok(())
}

impl ChainRegistry {
    /// Deploys a new registry contract with the configured signer and returns a
    /// handle on it.
    pub async fn deploy(config: ChainConfig) -> Result<Self> {
        Self::deploy_inner(config).await.map_err(Into::into)
    }

    /// A handle on the registry at `config.registry_address`. Checks the chain id
    /// (every endpoint that answers must report the configured one or, when none is
    /// configured, the same one; the others are checked before their first use) and
    /// that the address holds code. Without a signer in
    /// `config` the handle is read-only: every read works, every write fails with
    /// [`br2k_core::Error::PermissionDenied`] (what a supervisor needs: no key).
    pub async fn connect(config: ChainConfig) -> Result<Self> {
        Self::connect_inner(config).await.map_err(Into::into)
    }

    /// Another handle on this registry, with `config`'s endpoints and signer (its
    /// registry address is replaced by this handle's, and its chain id, when not
    /// configured, is this handle's).
    pub async fn with_signer(&self, config: ChainConfig) -> Result<Self> {
        let chain_id = config.expected_chain_id.unwrap_or(self.inner.chain_id);
        Self::connect(
            config
                .with_registry(self.inner.address)
                .with_chain_id(chain_id),
        )
        .await
    }

    /// The registry contract address.
    pub fn address(&self) -> Address {
        self.inner.address
    }

    /// The chain id the endpoints report.
    pub fn chain_id(&self) -> u64 {
        self.inner.chain_id
    }

    /// Block in which the registry was deployed.
    pub fn deploy_block(&self) -> u64 {
        self.inner.deploy_block
    }

    /// JSON-RPC requests sent by this handle so far (round trips, failed attempts
    /// included).
    pub fn rpc_requests(&self) -> u64 {
        self.inner.rpc.requests()
    }

    /// The endpoints (chain id checked on every endpoint that answers: the configured
    /// one, else the one they all report) and, when a signer is configured, the
    /// transaction sender.
    async fn base(config: &ChainConfig) -> Result<(Endpoints, u64, Option<Sender>), ChainError> {
        let signer = config.signer.as_ref().map(|s| s.load()).transpose()?;
        let rpc = Endpoints::connect(
            &config.rpc_urls,
            config.request_timeout,
            config.expected_chain_id,
        )
        .await?;
        let chain_id = rpc.chain_id();
        let sender = signer.map(|signer| {
            Sender::new(
                signer,
                chain_id,
                config.confirmations,
                config.poll_interval,
                config.receipt_timeout,
            )
        });
        Ok((rpc, chain_id, sender))
    }

    async fn deploy_inner(config: ChainConfig) -> Result<Self, ChainError> {
        let (rpc, chain_id, sender) = Self::base(&config).await?;
        let Some(sender) = sender else {
            return Err(ChainError::ReadOnly("deploy the registry".into()));
        };
        let tx = TransactionRequest::default().with_deploy_code(C::BYTECODE.clone());
        let receipt = sender.send(&rpc, "deploy registry", tx).await?;
        let address = receipt
            .contract_address
            .ok_or_else(|| ChainError::Decode("deploy receipt without contract address".into()))?;
        tracing::info!(%address, "deployed the service registry");
        Self::attach(config, rpc, chain_id, Some(sender), address).await
    }

    async fn connect_inner(config: ChainConfig) -> Result<Self, ChainError> {
        let address = config
            .registry_address
            .ok_or_else(|| ChainError::Config("no registry address configured".into()))?;
        let (rpc, chain_id, sender) = Self::base(&config).await?;
        Self::attach(config, rpc, chain_id, sender, address).await
    }

    async fn attach(
        config: ChainConfig,
        rpc: Endpoints,
        chain_id: u64,
        sender: Option<Sender>,
        address: Address,
    ) -> Result<Self, ChainError> {
        let code = rpc
            .run("code", |p| async move { p.get_code_at(address).await })
            .await?;
        if code.is_empty() {
            return Err(ChainError::NoCode(address));
        }
        let mut this = Self {
            inner: Arc::new(Inner {
                chain_id,
                rpc,
                sender,
                address,
                deploy_block: 0,
                poll: config.poll_interval,
                log_block_range: config.log_block_range.max(1),
                read_depth: config.read_depth,
                quorum: config.quorum.max(1),
                specs: Mutex::new(HashMap::new()),
                endpoints: Mutex::new(HashMap::new()),
                names: Mutex::new(HashMap::new()),
                last: Mutex::new(HashMap::new()),
            }),
        };
        let deploy_block = this.call("deployBlock", C::deployBlockCall {}).await?;
        let inner = Arc::get_mut(&mut this.inner).expect("not shared yet");
        inner.deploy_block = deploy_block;
        Ok(this)
    }

    // ------------------------------------------------------------ low level

    /// The block the next read is made at (configured depth and quorum).
    async fn pin(&self) -> Result<Pin, ChainError> {
        self.inner
            .rpc
            .pin(self.inner.read_depth, self.inner.quorum)
            .await
    }

    /// A view call at its own pinned block.
    async fn call<K: SolCall>(&self, what: &str, call: K) -> Result<K::Return, ChainError> {
        let pin = self.pin().await?;
        self.call_at(pin, what, call).await
    }

    /// A view call at `pin`, accepted when the configured quorum of endpoints agrees.
    async fn call_at<K: SolCall>(
        &self,
        pin: Pin,
        what: &str,
        call: K,
    ) -> Result<K::Return, ChainError> {
        let tx = TransactionRequest::default()
            .with_to(self.inner.address)
            .with_input(call.abi_encode());
        let out: Bytes = self
            .inner
            .rpc
            .call_at(what, pin, self.inner.quorum, tx)
            .await?;
        K::abi_decode_returns(&out).map_err(|e| ChainError::Decode(format!("{what}: {e}")))
    }

    async fn write<K: SolCall>(&self, what: &str, call: K) -> Result<(), ChainError> {
        let tx = TransactionRequest::default()
            .with_to(self.inner.address)
            .with_input(call.abi_encode());
        let sender = self
            .inner
            .sender
            .as_ref()
            .ok_or_else(|| ChainError::ReadOnly(what.to_owned()))?;
        sender.send(&self.inner.rpc, what, tx).await?;
        Ok(())
    }

    /// The logs of the registry matching `filter`, fetched in pages of at most
    /// `log_block_range` blocks (providers refuse wide ranges); a filter without an
    /// end block ends at the current head.
    async fn logs(&self, what: &str, filter: Filter) -> Result<Vec<Log>, ChainError> {
        let filter = filter.address(self.inner.address);
        let Some(from) = filter.get_from_block() else {
            return self.logs_once(what, &filter).await;
        };
        let to = match filter.get_to_block() {
            Some(to) => to,
            None => self.head().await?,
        };
        let range = self.inner.log_block_range;
        let mut out = Vec::new();
        let mut start = from;
        while start <= to {
            let end = to.min(start.saturating_add(range - 1));
            let page = filter.clone().from_block(start).to_block(end);
            out.extend(self.logs_once(what, &page).await?);
            start = end + 1;
        }
        Ok(out)
    }

    async fn logs_once(&self, what: &str, filter: &Filter) -> Result<Vec<Log>, ChainError> {
        self.inner
            .rpc
            .run(what, |p| {
                let filter = filter.clone();
                async move { p.get_logs(&filter).await }
            })
            .await
    }

    async fn head(&self) -> Result<u64, ChainError> {
        self.inner
            .rpc
            .run(
                "block number",
                |p| async move { p.get_block_number().await },
            )
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word(bytes: &[u8]) -> B256 {
        let mut w = [0u8; 32];
        w[..bytes.len()].copy_from_slice(bytes);
        B256::from(w)
    }

    fn placement(cluster: B256, epoch: u64) -> C::Placement {
        C::Placement {
            cluster,
            epoch,
            blockNumber: 7,
        }
    }

    #[test]
    fn cluster_names_are_stored_left_aligned_and_zero_padded() {
        assert_eq!(cluster_word("eu-1").expect("valid"), word(b"eu-1"));
        let longest = "a".repeat(32);
        assert_eq!(
            cluster_word(&longest).expect("32 bytes"),
            B256::repeat_byte(b'a')
        );
        for bad in ["", "EU-1", "-eu", "eu-", "eu_1", &"a".repeat(33)] {
            assert!(
                matches!(cluster_word(bad), Err(br2k_core::Error::InvalidInput(_))),
                "{bad:?}"
            );
        }
        for name in ["eu-1", "us-2", "0", longest.as_str()] {
            let w = cluster_word(name).expect("valid");
            assert_eq!(cluster_name(&w).expect("decodes"), name);
        }
    }

    #[test]
    fn a_placement_is_decoded_only_from_what_the_contract_stores() {
        assert_eq!(
            decode_placement("getRecords", &C::Placement::default()).expect("none"),
            None
        );
        assert_eq!(
            decode_placement("getRecords", &placement(word(b"eu-1"), 5)).expect("placed"),
            Some(Placement::new("eu-1", 5).expect("valid"))
        );
        let mut shifted = [0u8; 32];
        shifted[1..5].copy_from_slice(b"eu-1");
        let mut gap = word(b"eu");
        gap.0[3] = b'x';
        for (p, what) in [
            (placement(word(b"EU-1"), 5), "not a cluster name"),
            (placement(B256::from(shifted), 5), "not left-aligned"),
            (placement(gap, 5), "a byte after the padding"),
            (placement(word(&[0xff, 0xfe]), 5), "not UTF-8"),
            (placement(word(b"eu-1"), 0), "epoch 0"),
            (placement(B256::ZERO, 5), "an epoch without a cluster"),
        ] {
            match decode_placement("getRecords", &p) {
                Err(ChainError::Decode(m)) => assert!(m.starts_with("getRecords"), "{what}: {m}"),
                other => panic!("{what}: {other:?}"),
            }
        }
    }
}
