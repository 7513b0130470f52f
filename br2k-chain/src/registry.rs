//! [`ChainRegistry`]: the [`Registry`] on an EVM chain.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use alloy::network::TransactionBuilder;
use alloy::primitives::{Address, B256, Bytes, keccak256};
use alloy::providers::Provider;
use alloy::rpc::types::{Filter, Log, TransactionRequest};
use alloy::sol_types::{SolCall, SolEvent, SolEventInterface};
use async_trait::async_trait;
use br2k_core::spec::MAX_REPLICAS;
use br2k_core::{
    Account, ChangeKind, ChangeStream, Checkpoint, Digest, Error, Location, Registry,
    RegistryChange, Result, Role, ServiceId, ServiceRecord, ServiceSpec, ServiceState,
    ValidationError, VersionInfo,
};
use futures::StreamExt;

use crate::bindings::ServiceRegistry as C;
use crate::config::{ChainConfig, ReadDepth};
use crate::error::ChainError;
use crate::rpc::{Endpoints, Pin};
use crate::sender::Sender;

/// Ids per `getRecords` call (keeps a view call well under the block gas limit).
/// Reads of a record batch when an endpoint answers for another block than the pinned
/// one (each at a fresh pin) before the read fails.
const READ_ATTEMPTS: u32 = 3;
const RECORDS_PER_CALL: usize = 200;
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
/// contract's events and verified against the stored hashes ([`Error::Tampered`]
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

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A log filter for the events `signatures` of the services keyed in `wants` (topic 1),
/// over the blocks from the lowest to the highest `wants` names.
fn events_of(signatures: Vec<B256>, wants: impl IntoIterator<Item = (B256, u64)>) -> Filter {
    let mut ids = HashSet::new();
    let (mut from, mut to) = (u64::MAX, 0);
    for (key, block) in wants {
        ids.insert(key);
        from = from.min(block);
        to = to.max(block);
    }
    Filter::new()
        .event_signature(signatures)
        .topic1(ids.into_iter().collect::<Vec<_>>())
        .from_block(from.min(to))
        .to_block(to)
}

fn insert_capped<K: std::hash::Hash + Eq, V>(m: &Mutex<HashMap<K, V>>, k: K, v: V) {
    let mut map = lock(m);
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

/// Why one item of a batched read failed (clonable, unlike [`Error`]).
#[derive(Debug, Clone)]
enum Fault {
    Tampered {
        what: String,
        expected: String,
        actual: String,
    },
    Invalid(ValidationError),
    Missing(String),
}

impl From<Fault> for ChainError {
    fn from(f: Fault) -> Self {
        match f {
            Fault::Tampered {
                what,
                expected,
                actual,
            } => ChainError::Core(Error::tampered(what, expected, actual)),
            Fault::Invalid(v) => ChainError::Core(v.into()),
            Fault::Missing(what) => ChainError::MissingLog(what),
        }
    }
}

/// A spec to fetch from the log and verify.
#[derive(Debug, Clone)]
struct SpecWant {
    key: B256,
    name: String,
    version: u64,
    block: u64,
    hash: B256,
    image: B256,
    replicas: u32,
}

impl SpecWant {
    fn new(key: B256, name: String, version: u64, v: &C::Version) -> Self {
        Self {
            key,
            name,
            version,
            block: v.blockNumber,
            hash: v.specHash,
            image: v.imageDigest,
            replicas: v.replicas,
        }
    }

    fn what(&self) -> String {
        format!("spec of {} v{}", self.name, self.version)
    }

    /// Checks bytes from the log: sha256 equals the stored hash, they parse as a
    /// valid spec, and they are its canonical form.
    fn verify_bytes(&self, bytes: &[u8]) -> Result<ServiceSpec, Fault> {
        let expected = Digest::from_bytes(self.hash.0);
        let actual = Digest::of(bytes);
        if actual != expected {
            return Err(Fault::Tampered {
                what: self.what(),
                expected: expected.to_string(),
                actual: actual.to_string(),
            });
        }
        let spec = ServiceSpec::from_json_bytes(bytes).map_err(Fault::Invalid)?;
        let canonical = spec.spec_hash();
        if canonical != expected {
            return Err(Fault::Tampered {
                what: format!("{} (not canonical)", self.what()),
                expected: expected.to_string(),
                actual: canonical.to_string(),
            });
        }
        Ok(spec)
    }

    /// Checks that the stored image digest and replica count are the spec's.
    fn consistent(&self, spec: ServiceSpec) -> Result<ServiceSpec, Fault> {
        let image = spec
            .image
            .digest()
            .map(|d| *d.as_bytes())
            .unwrap_or_default();
        if image != self.image.0 {
            return Err(Fault::Tampered {
                what: format!("image digest of {} v{}", self.name, self.version),
                expected: Digest::from_bytes(self.image.0).to_string(),
                actual: Digest::from_bytes(image).to_string(),
            });
        }
        if spec.replicas != self.replicas {
            return Err(Fault::Tampered {
                what: format!("replica count of {} v{}", self.name, self.version),
                expected: self.replicas.to_string(),
                actual: spec.replicas.to_string(),
            });
        }
        Ok(spec)
    }
}

/// A location endpoint to fetch from the log.
#[derive(Debug, Clone)]
struct LocationWant {
    key: B256,
    name: String,
    block: u64,
    hash: B256,
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

    // ------------------------------------------------------------ log lookups

    /// Fetches (from the log, or the cache) and verifies the wanted specs.
    async fn specs(
        &self,
        wants: &[SpecWant],
    ) -> Result<HashMap<(B256, u64), Result<ServiceSpec, Fault>>, ChainError> {
        let mut out = HashMap::new();
        let mut missing: Vec<&SpecWant> = Vec::new();
        {
            let cache = lock(&self.inner.specs);
            let mut seen = HashSet::new();
            for w in wants {
                if !seen.insert((w.key, w.version)) {
                    continue;
                }
                match cache.get(&w.hash) {
                    Some(spec) => {
                        out.insert((w.key, w.version), w.consistent(spec.clone()));
                    }
                    None => missing.push(w),
                }
            }
        }
        for chunk in missing.chunks(IDS_PER_LOG_QUERY) {
            let filter = events_of(
                vec![C::Registered::SIGNATURE_HASH, C::Published::SIGNATURE_HASH],
                chunk.iter().map(|w| (w.key, w.block)),
            );
            let logs = self.logs("spec events", filter).await?;
            let mut found: HashMap<(B256, u64), Bytes> = HashMap::new();
            for log in &logs {
                let topics = log.topics().iter().copied();
                let data = &log.data().data;
                match log.topic0() {
                    Some(t) if *t == C::Registered::SIGNATURE_HASH => {
                        if let Ok(e) = C::Registered::decode_raw_log(topics, data) {
                            found.insert((e.id, 1), e.spec);
                        }
                    }
                    Some(t) if *t == C::Published::SIGNATURE_HASH => {
                        if let Ok(e) = C::Published::decode_raw_log(topics, data) {
                            found.insert((e.id, e.version), e.spec);
                        }
                    }
                    _ => {}
                }
            }
            for w in chunk {
                let result = match found.get(&(w.key, w.version)) {
                    Some(bytes) => w.verify_bytes(bytes).and_then(|spec| {
                        insert_capped(&self.inner.specs, w.hash, spec.clone());
                        w.consistent(spec)
                    }),
                    None => Err(Fault::Missing(format!(
                        "spec event of {} v{} in block {}",
                        w.name, w.version, w.block
                    ))),
                };
                out.insert((w.key, w.version), result);
            }
        }
        Ok(out)
    }

    /// Fetches (from the log, or the cache) the wanted location endpoints.
    async fn locations(
        &self,
        wants: &[LocationWant],
    ) -> Result<HashMap<B256, Result<String, Fault>>, ChainError> {
        let mut out = HashMap::new();
        let mut missing = Vec::new();
        {
            let cache = lock(&self.inner.endpoints);
            for w in wants {
                match cache.get(&w.hash) {
                    Some(e) => {
                        out.insert(w.key, Ok(e.clone()));
                    }
                    None => missing.push(w),
                }
            }
        }
        for chunk in missing.chunks(IDS_PER_LOG_QUERY) {
            let filter = events_of(
                vec![C::Relocated::SIGNATURE_HASH],
                chunk.iter().map(|w| (w.key, w.block)),
            );
            let logs = self.logs("location events", filter).await?;
            let mut found: HashMap<(B256, u64, B256), String> = HashMap::new();
            for log in &logs {
                if let Ok(e) =
                    C::Relocated::decode_raw_log(log.topics().iter().copied(), &log.data().data)
                {
                    let h = keccak256(e.endpoint.as_bytes());
                    found.insert((e.id, log.block_number.unwrap_or_default(), h), e.endpoint);
                }
            }
            for w in chunk {
                let result = match found.remove(&(w.key, w.block, w.hash)) {
                    Some(endpoint) => {
                        insert_capped(&self.inner.endpoints, w.hash, endpoint.clone());
                        Ok(endpoint)
                    }
                    None => Err(Fault::Missing(format!(
                        "location event of {} in block {}",
                        w.name, w.block
                    ))),
                };
                out.insert(w.key, result);
            }
        }
        Ok(out)
    }

    /// Service names of `keys`, from the cache or the `Registered` events.
    async fn names(&self, keys: &[B256]) -> Result<HashMap<B256, ServiceId>, ChainError> {
        let mut out = HashMap::new();
        let mut missing = Vec::new();
        {
            let cache = lock(&self.inner.names);
            for k in keys {
                match cache.get(k) {
                    Some(n) => {
                        out.insert(*k, n.clone());
                    }
                    None => missing.push(*k),
                }
            }
        }
        missing.sort();
        missing.dedup();
        for chunk in missing.chunks(IDS_PER_LOG_QUERY) {
            let filter = Filter::new()
                .event_signature(C::Registered::SIGNATURE_HASH)
                .topic1(chunk.to_vec())
                .from_block(self.inner.deploy_block);
            for log in self.logs("registered events", filter).await? {
                if let Ok(e) =
                    C::Registered::decode_raw_log(log.topics().iter().copied(), &log.data().data)
                    && let Ok(name) = ServiceId::new(&e.name)
                    && service_key(&name) == e.id
                {
                    insert_capped(&self.inner.names, e.id, name.clone());
                    out.insert(e.id, name);
                }
            }
        }
        Ok(out)
    }

    // ------------------------------------------------------------ records

    /// Reads and verifies the records of `ids`; the outer error is an RPC failure.
    async fn read_many(
        &self,
        ids: &[ServiceId],
    ) -> Result<Vec<Result<ServiceRecord, ChainError>>, ChainError> {
        let keys: Vec<B256> = ids.iter().map(service_key).collect();
        let mut raws: Vec<(u64, C::Record)> = Vec::with_capacity(ids.len());
        // One block for every call of this read. An answer for another block than the
        // pinned one is never used; it is read again at a fresh pin (anvil executed a
        // call at the head block in the next block's environment when a block was
        // mined meanwhile: the fault matrix saw a replica fail to start on it).
        let mut attempts = 0;
        'read: loop {
            attempts += 1;
            raws.clear();
            let pin = self.pin().await?;
            for chunk in keys.chunks(RECORDS_PER_CALL) {
                let r = self
                    .call_at(
                        pin,
                        "getRecords",
                        C::getRecordsCall {
                            keys: chunk.to_vec(),
                        },
                    )
                    .await?;
                if r.blockNumber != pin.number {
                    if attempts < READ_ATTEMPTS {
                        continue 'read;
                    }
                    return Err(ChainError::Decode(format!(
                        "getRecords: answered for block {} when asked at block {}",
                        r.blockNumber, pin.number
                    )));
                }
                // An endpoint that answers fewer records, or another service's record,
                // is not trusted.
                if r.records.len() != chunk.len() {
                    return Err(ChainError::Decode(format!(
                        "getRecords: {} records for {} ids",
                        r.records.len(),
                        chunk.len()
                    )));
                }
                if let Some((want, got)) = chunk
                    .iter()
                    .zip(&r.records)
                    .find(|(want, got)| got.exists && got.id != **want)
                {
                    return Err(ChainError::Decode(format!(
                        "getRecords: the record of {} answered for {want}",
                        got.id
                    )));
                }
                raws.extend(r.records.into_iter().map(|rec| (r.blockNumber, rec)));
            }
            break;
        }
        let mut spec_wants = Vec::new();
        let mut loc_wants = Vec::new();
        for (id, (_, r)) in ids.iter().zip(&raws) {
            if !r.exists {
                continue;
            }
            spec_wants.push(SpecWant::new(
                r.id,
                id.to_string(),
                r.active,
                &r.activeVersion,
            ));
            if r.location.blockNumber != 0 {
                loc_wants.push(LocationWant {
                    key: r.id,
                    name: id.to_string(),
                    block: r.location.blockNumber,
                    hash: r.location.endpointHash,
                });
            }
        }
        let mut specs = self.specs(&spec_wants).await?;
        let mut locations = self.locations(&loc_wants).await?;
        let mut out = Vec::with_capacity(ids.len());
        for (id, (block, r)) in ids.iter().zip(raws) {
            if !r.exists {
                out.push(Err(ChainError::Core(Error::not_found(format!(
                    "service {id}"
                )))));
                continue;
            }
            let spec = match specs.get(&(r.id, r.active)).cloned() {
                Some(Ok(s)) => s,
                Some(Err(f)) => {
                    out.push(Err(f.into()));
                    continue;
                }
                None => {
                    out.push(Err(ChainError::MissingLog(format!("spec of {id}"))));
                    continue;
                }
            };
            let location = if r.location.blockNumber == 0 {
                None
            } else {
                match locations.get(&r.id).cloned() {
                    Some(Ok(endpoint)) => Some(Location {
                        endpoint,
                        term: r.location.term,
                    }),
                    Some(Err(f)) => {
                        out.push(Err(f.into()));
                        continue;
                    }
                    None => {
                        out.push(Err(ChainError::MissingLog(format!("location of {id}"))));
                        continue;
                    }
                }
            };
            let state = match ServiceState::from_code(r.state) {
                Ok(s) => s,
                Err(e) => {
                    out.push(Err(ChainError::Core(e.into())));
                    continue;
                }
            };
            insert_capped(&self.inner.names, r.id, id.clone());
            let c = &r.checkpoint;
            out.push(Ok(ServiceRecord {
                id: id.clone(),
                version: r.active,
                latest_version: r.latest,
                spec,
                spec_hash: Digest::from_bytes(r.activeVersion.specHash.0),
                replicas: r.replicas,
                state,
                owner: account_of(r.owner),
                checkpoint: (c.stateVersion != 0).then(|| Checkpoint {
                    snapshot: Digest::from_bytes(c.snapshot.0),
                    log_index: c.logIndex,
                    term: c.term,
                    state_version: c.stateVersion,
                }),
                location,
                as_of: Some(block),
                stale: false,
            }));
        }
        specs.clear();
        locations.clear();
        Ok(out)
    }

    /// The last verified record of `id` flagged stale, or Unavailable.
    fn stale(&self, id: &ServiceId, reason: &str) -> Result<ServiceRecord> {
        match lock(&self.inner.last).get(id) {
            Some(r) => {
                tracing::warn!(service = %id, as_of = ?r.as_of, "{reason}; serving the last verified record");
                Ok(ServiceRecord {
                    stale: true,
                    ..r.clone()
                })
            }
            None => Err(Error::unavailable(reason)),
        }
    }

    fn remember(&self, r: &ServiceRecord) {
        insert_capped(&self.inner.last, r.id.clone(), r.clone());
    }

    /// Active records of many services in few round trips: one `getRecords` view call
    /// per 200 ids and one `eth_getLogs` per 500 specs not yet verified by this
    /// handle. Each result is what [`Registry::active`] would return for that id.
    pub async fn active_many(&self, ids: &[ServiceId]) -> Vec<Result<ServiceRecord>> {
        match self.read_many(ids).await {
            Ok(results) => results
                .into_iter()
                .map(|r| r.inspect(|rec| self.remember(rec)).map_err(Error::from))
                .collect(),
            Err(ChainError::Unavailable(reason)) => {
                ids.iter().map(|id| self.stale(id, &reason)).collect()
            }
            Err(e) => {
                let e = Error::from(e);
                ids.iter()
                    .map(|_| Err(Error::backend("chain", e.to_string(), e.is_retryable())))
                    .collect()
            }
        }
    }

    async fn versions(
        &self,
        id: &ServiceId,
        raw: Vec<(u64, C::Version)>,
    ) -> Result<Vec<VersionInfo>, ChainError> {
        let key = service_key(id);
        let wants: Vec<SpecWant> = raw
            .iter()
            .map(|(n, v)| SpecWant::new(key, id.to_string(), *n, v))
            .collect();
        let mut specs = self.specs(&wants).await?;
        let mut out = Vec::with_capacity(raw.len());
        for (n, v) in raw {
            let spec = specs
                .remove(&(key, n))
                .unwrap_or_else(|| Err(Fault::Missing(format!("spec of {id} v{n}"))))?;
            out.push(VersionInfo {
                version: n,
                spec,
                spec_hash: Digest::from_bytes(v.specHash.0),
                publisher: account_of(v.publisher),
                published_at: Some(v.publishedAt),
            });
        }
        Ok(out)
    }

    async fn record_after_write(&self, id: &ServiceId) -> Result<ServiceRecord> {
        self.active(id).await
    }

    fn decode_change(log: &Log) -> Option<(B256, Option<String>, ChangeKind)> {
        Self::decode_attributed(log).map(|(key, name, kind, _)| (key, name, kind))
    }

    /// Decodes one registry event: the service key, its name (registrations only),
    /// the change and the account that made it (the event's `msg.sender` field).
    fn decode_attributed(log: &Log) -> Option<(B256, Option<String>, ChangeKind, Address)> {
        use C::ServiceRegistryEvents as Ev;
        let ev = Ev::decode_raw_log(log.topics(), &log.data().data).ok()?;
        Some(match ev {
            Ev::Registered(e) => (e.id, Some(e.name), ChangeKind::Registered, e.owner),
            Ev::Published(e) => (
                e.id,
                None,
                ChangeKind::Published { version: e.version },
                e.publisher,
            ),
            Ev::Scaled(e) => (
                e.id,
                None,
                ChangeKind::Scaled {
                    replicas: e.replicas,
                },
                e.by,
            ),
            Ev::StateChanged(e) => (
                e.id,
                None,
                ChangeKind::StateChanged {
                    state: ServiceState::from_code(e.state).ok()?,
                },
                e.by,
            ),
            Ev::RolledBack(e) => (
                e.id,
                None,
                ChangeKind::RolledBack { version: e.version },
                e.by,
            ),
            Ev::Checkpointed(e) => (
                e.id,
                None,
                ChangeKind::Checkpointed {
                    checkpoint: Checkpoint {
                        snapshot: Digest::from_bytes(e.snapshot.0),
                        log_index: e.logIndex,
                        term: e.term,
                        state_version: e.stateVersion,
                    },
                },
                e.by,
            ),
            Ev::Relocated(e) => (
                e.id,
                None,
                ChangeKind::Relocated {
                    location: Location {
                        endpoint: e.endpoint,
                        term: e.term,
                    },
                },
                e.by,
            ),
            Ev::RoleGranted(e) => (e.id, None, ChangeKind::RolesChanged, e.by),
            Ev::RoleRevoked(e) => (e.id, None, ChangeKind::RolesChanged, e.by),
            Ev::OwnershipTransferStarted(e) => (e.id, None, ChangeKind::RolesChanged, e.owner),
            Ev::OwnershipTransferCanceled(e) => (e.id, None, ChangeKind::RolesChanged, e.owner),
            // Only the accepting account can make this change.
            Ev::OwnershipTransferred(e) => (e.id, None, ChangeKind::RolesChanged, e.newOwner),
        })
    }

    /// Every change of `id` since its registration, oldest first, each with the
    /// account that made it and its transaction, read from the registry's events
    /// (paged by `log_block_range` blocks). Role and ownership events are
    /// [`ChangeKind::RolesChanged`]; an owner's reset is a `Checkpointed` or
    /// `Relocated` change by the owner.
    pub async fn audit(&self, id: &ServiceId) -> Result<Vec<AuditEntry>> {
        let key = service_key(id);
        let mut logs = self
            .logs(
                "service events",
                Filter::new()
                    .topic1(key)
                    .from_block(self.inner.deploy_block),
            )
            .await?;
        logs.sort_by_key(|l| (l.block_number, l.log_index));
        let out: Vec<AuditEntry> = logs
            .iter()
            .filter_map(|l| {
                let (k, _, kind, by) = Self::decode_attributed(l)?;
                (k == key).then(|| AuditEntry {
                    change: RegistryChange {
                        id: id.clone(),
                        kind,
                        at: l.block_number,
                    },
                    by: account_of(by),
                    tx: l.transaction_hash,
                })
            })
            .collect();
        if out.is_empty() {
            return Err(Error::not_found(format!("service {id}")));
        }
        Ok(out)
    }

    /// Resets the checkpoint of `id` to `snapshot` at `log_index` and `term`, lower or
    /// higher than the recorded ones without the per-call bounds (recovery after a
    /// compromised replica account pushed them up); its state version is the
    /// recorded one plus one, so readers never see the checkpoint go back. Owner
    /// only ([`Error::PermissionDenied`] otherwise). Returns the record after it.
    pub async fn reset_checkpoint(
        &self,
        id: &ServiceId,
        snapshot: &Digest,
        log_index: u64,
        term: u64,
    ) -> Result<ServiceRecord> {
        self.write(
            "resetCheckpoint",
            C::resetCheckpointCall {
                id: service_key(id),
                snapshot: B256::from(*snapshot.as_bytes()),
                logIndex: log_index,
                term,
            },
        )
        .await?;
        self.record_after_write(id).await
    }

    /// Sets the leader location of `id`, at a term lower or higher than the recorded
    /// one without the per-call bound (recovery after a compromised replica account
    /// pushed the term up). Owner only ([`Error::PermissionDenied`] otherwise).
    /// Returns the record after it.
    pub async fn reset_location(
        &self,
        id: &ServiceId,
        location: &Location,
    ) -> Result<ServiceRecord> {
        Location::new(location.endpoint.clone(), location.term)?;
        self.write(
            "resetLocation",
            C::resetLocationCall {
                id: service_key(id),
                term: location.term,
                endpoint: location.endpoint.clone(),
            },
        )
        .await?;
        insert_capped(
            &self.inner.endpoints,
            keccak256(location.endpoint.as_bytes()),
            location.endpoint.clone(),
        );
        self.record_after_write(id).await
    }

    /// Changes in blocks `from..=to`, in log order.
    async fn changes_between(&self, from: u64, to: u64) -> Result<Vec<RegistryChange>, ChainError> {
        let mut logs = self
            .logs(
                "registry events",
                Filter::new().from_block(from).to_block(to),
            )
            .await?;
        logs.sort_by_key(|l| (l.block_number, l.log_index));
        let decoded: Vec<(u64, B256, Option<String>, ChangeKind)> = logs
            .iter()
            .filter_map(|l| {
                let (id, name, kind) = Self::decode_change(l)?;
                Some((l.block_number.unwrap_or_default(), id, name, kind))
            })
            .collect();
        for (_, id, name, _) in &decoded {
            if let Some(name) = name
                && let Ok(sid) = ServiceId::new(name)
            {
                insert_capped(&self.inner.names, *id, sid);
            }
        }
        let keys: Vec<B256> = decoded.iter().map(|d| d.1).collect();
        let names = self.names(&keys).await?;
        Ok(decoded
            .into_iter()
            .filter_map(|(block, key, _, kind)| {
                Some(RegistryChange {
                    id: names.get(&key)?.clone(),
                    kind,
                    at: Some(block),
                })
            })
            .collect())
    }
}

/// Scanned ranges whose end hashes a change stream keeps to detect reorgs.
const CURSOR_HASHES: usize = 256;

/// One range of blocks a change stream scanned, and the hash of its last block.
#[derive(Debug, Clone, Copy)]
struct Scanned {
    from: u64,
    to: u64,
    hash: B256,
}

/// State of one change stream: the next block to scan, the scanned ranges (with the
/// hash of each one's last block) and changes not yet delivered.
struct Cursor {
    registry: ChainRegistry,
    next_block: u64,
    scanned: VecDeque<Scanned>,
    buffer: VecDeque<RegistryChange>,
    idle: bool,
}

impl Cursor {
    async fn hash_of(&self, number: u64) -> Result<Option<B256>, ChainError> {
        let inner = &self.registry.inner;
        inner.rpc.canonical_hash(number, inner.quorum).await
    }

    /// Whether the last scanned block is still canonical; if not, rewinds to the
    /// first block after the newest scanned range that still is (the common
    /// ancestor), drops undelivered changes and reports the reorg as an error (the
    /// consumer re-reads its records; the stream then re-reads the new blocks).
    async fn check_reorg(&mut self) -> Result<(), ChainError> {
        let Some(last) = self.scanned.back().copied() else {
            return Ok(());
        };
        if self.hash_of(last.to).await? == Some(last.hash) {
            return Ok(());
        }
        let mut rewind = last.from;
        while let Some(s) = self.scanned.back().copied() {
            if self.hash_of(s.to).await? == Some(s.hash) {
                break;
            }
            rewind = s.from;
            self.scanned.pop_back();
        }
        self.next_block = rewind;
        self.buffer.clear();
        self.idle = false;
        tracing::warn!(
            reorged = last.to,
            rewound_to = rewind,
            "registry change stream: chain reorganization; re-reading"
        );
        Err(ChainError::Core(Error::conflict(format!(
            "chain reorganization: block {} ({}) is no longer canonical; changes are re-read from block {rewind}",
            last.to, last.hash
        ))))
    }

    /// Scans new blocks once (after checking the scanned ones for a reorg).
    async fn poll(&mut self) -> Result<(), ChainError> {
        self.check_reorg().await?;
        let head = self.registry.head().await?;
        if head < self.next_block {
            self.idle = true;
            return Ok(());
        }
        let to = head.min(self.next_block + self.registry.inner.log_block_range - 1);
        let Some(hash) = self.hash_of(to).await? else {
            self.idle = true;
            return Ok(());
        };
        let changes = self.registry.changes_between(self.next_block, to).await?;
        // The logs are of the block hashed before only if it is still canonical.
        if self.hash_of(to).await? != Some(hash) {
            self.idle = false;
            return Ok(());
        }
        // Advance only after the whole range was read: each change is delivered once.
        if self.scanned.len() >= CURSOR_HASHES {
            self.scanned.pop_front();
        }
        self.scanned.push_back(Scanned {
            from: self.next_block,
            to,
            hash,
        });
        self.next_block = to + 1;
        self.idle = to == head;
        self.buffer.extend(changes);
        Ok(())
    }
}

#[async_trait]
impl Registry for ChainRegistry {
    fn account(&self) -> Account {
        // A read-only connection acts as no account (the zero address holds no role).
        account_of(self.inner.sender.as_ref().map_or(Address::ZERO, |s| s.from))
    }

    async fn register(&self, id: &ServiceId, spec: &ServiceSpec) -> Result<ServiceRecord> {
        spec.validate()?;
        let bytes = spec.canonical_bytes();
        let hash = spec.spec_hash();
        let image = *spec.image.require_digest()?;
        self.write(
            "register",
            C::registerCall {
                name: id.to_string(),
                specHash: B256::from(*hash.as_bytes()),
                imageDigest: B256::from(*image.as_bytes()),
                replicas: spec.replicas,
                spec: bytes.into(),
            },
        )
        .await?;
        insert_capped(&self.inner.names, service_key(id), id.clone());
        insert_capped(
            &self.inner.specs,
            B256::from(*hash.as_bytes()),
            spec.clone(),
        );
        self.record_after_write(id).await
    }

    async fn publish(&self, id: &ServiceId, spec: &ServiceSpec) -> Result<ServiceRecord> {
        spec.validate()?;
        let hash = spec.spec_hash();
        let image = *spec.image.require_digest()?;
        self.write(
            "publish",
            C::publishCall {
                id: service_key(id),
                specHash: B256::from(*hash.as_bytes()),
                imageDigest: B256::from(*image.as_bytes()),
                replicas: spec.replicas,
                spec: spec.canonical_bytes().into(),
            },
        )
        .await?;
        insert_capped(
            &self.inner.specs,
            B256::from(*hash.as_bytes()),
            spec.clone(),
        );
        self.record_after_write(id).await
    }

    async fn active(&self, id: &ServiceId) -> Result<ServiceRecord> {
        match self.read_many(std::slice::from_ref(id)).await {
            Ok(mut v) => {
                let rec = v
                    .pop()
                    .ok_or_else(|| ChainError::Decode("getRecords: no record".into()))??;
                self.remember(&rec);
                Ok(rec)
            }
            Err(ChainError::Unavailable(reason)) => self.stale(id, &reason),
            Err(e) => Err(e.into()),
        }
    }

    async fn version(&self, id: &ServiceId, version: u64) -> Result<VersionInfo> {
        let v = self
            .call(
                "getVersion",
                C::getVersionCall {
                    id: service_key(id),
                    version,
                },
            )
            .await
            .map_err(|e| match e {
                ChainError::Revert(C::ServiceRegistryErrors::NotRegistered(_)) => {
                    ChainError::Core(Error::not_found(format!("service {id}")))
                }
                ChainError::Revert(C::ServiceRegistryErrors::UnknownVersion(_)) => {
                    ChainError::Core(Error::not_found(format!("version {version} of {id}")))
                }
                e => e,
            })?;
        let mut out = self.versions(id, vec![(version, v)]).await?;
        Ok(out
            .pop()
            .ok_or_else(|| ChainError::Decode(format!("version {version} of {id}")))?)
    }

    async fn history(&self, id: &ServiceId) -> Result<Vec<VersionInfo>> {
        const PAGE: u64 = 256;
        let key = service_key(id);
        let mut raw = Vec::new();
        let mut start = 1u64;
        // One block for every page.
        let pin = self.pin().await?;
        loop {
            let page = self
                .call_at(
                    pin,
                    "getVersions",
                    C::getVersionsCall {
                        id: key,
                        start,
                        count: PAGE,
                    },
                )
                .await
                .map_err(|e| match e {
                    ChainError::Revert(C::ServiceRegistryErrors::NotRegistered(_)) => {
                        ChainError::Core(Error::not_found(format!("service {id}")))
                    }
                    e => e,
                })?;
            let n = page.len() as u64;
            raw.extend(
                page.into_iter()
                    .enumerate()
                    .map(|(i, v)| (start + i as u64, v)),
            );
            if n < PAGE {
                break;
            }
            start += PAGE;
        }
        Ok(self.versions(id, raw).await?)
    }

    async fn services(&self) -> Result<Vec<ServiceId>> {
        const PAGE: usize = 1000;
        // One block for the count and every page.
        let pin = self.pin().await?;
        let count = self
            .call_at(pin, "serviceCount", C::serviceCountCall {})
            .await?;
        let count: usize = count.try_into().unwrap_or(usize::MAX);
        // The count comes from an endpoint: never allocate by it.
        let mut keys = Vec::with_capacity(count.min(PAGE));
        while keys.len() < count {
            let page = self
                .call_at(
                    pin,
                    "serviceIds",
                    C::serviceIdsCall {
                        start: alloy::primitives::U256::from(keys.len()),
                        count: alloy::primitives::U256::from(PAGE),
                    },
                )
                .await?;
            if page.is_empty() {
                break;
            }
            if page.len() > PAGE {
                return Err(ChainError::Decode(format!(
                    "serviceIds: {} ids for a page of {PAGE}",
                    page.len()
                ))
                .into());
            }
            keys.extend(page);
        }
        let names = self.names(&keys).await?;
        keys.iter()
            .map(|k| {
                names
                    .get(k)
                    .cloned()
                    .ok_or_else(|| ChainError::MissingLog(format!("registration of {k}")).into())
            })
            .collect()
    }

    async fn set_replicas(&self, id: &ServiceId, replicas: u32) -> Result<ServiceRecord> {
        let current = self.active(id).await?;
        if current.stale {
            return Err(Error::unavailable("no RPC endpoint answers"));
        }
        check_replicas(&current.spec, replicas)?;
        self.write(
            "setReplicas",
            C::setReplicasCall {
                id: service_key(id),
                replicas,
            },
        )
        .await?;
        self.record_after_write(id).await
    }

    async fn set_state(&self, id: &ServiceId, state: ServiceState) -> Result<ServiceRecord> {
        self.write(
            "setState",
            C::setStateCall {
                id: service_key(id),
                to: state.code(),
            },
        )
        .await?;
        self.record_after_write(id).await
    }

    async fn rollback(&self, id: &ServiceId, version: u64) -> Result<ServiceRecord> {
        self.write(
            "rollback",
            C::rollbackCall {
                id: service_key(id),
                version,
            },
        )
        .await?;
        self.record_after_write(id).await
    }

    async fn record_checkpoint(&self, id: &ServiceId, checkpoint: &Checkpoint) -> Result<()> {
        Ok(self
            .write(
                "recordCheckpoint",
                C::recordCheckpointCall {
                    id: service_key(id),
                    snapshot: B256::from(*checkpoint.snapshot.as_bytes()),
                    logIndex: checkpoint.log_index,
                    term: checkpoint.term,
                    stateVersion: checkpoint.state_version,
                },
            )
            .await?)
    }

    async fn set_location(&self, id: &ServiceId, location: &Location) -> Result<()> {
        // The fields are public: validate what may not have come from `Location::new`.
        Location::new(location.endpoint.clone(), location.term)?;
        self.write(
            "setLocation",
            C::setLocationCall {
                id: service_key(id),
                term: location.term,
                endpoint: location.endpoint.clone(),
            },
        )
        .await?;
        insert_capped(
            &self.inner.endpoints,
            keccak256(location.endpoint.as_bytes()),
            location.endpoint.clone(),
        );
        Ok(())
    }

    async fn grant(&self, id: &ServiceId, account: &Account, role: Role) -> Result<()> {
        let account = parse_account(account)?;
        Ok(self
            .write(
                "grant",
                C::grantCall {
                    id: service_key(id),
                    account,
                    role: role_bits(role),
                },
            )
            .await?)
    }

    async fn revoke(&self, id: &ServiceId, account: &Account, role: Role) -> Result<()> {
        let account = parse_account(account)?;
        Ok(self
            .write(
                "revoke",
                C::revokeCall {
                    id: service_key(id),
                    account,
                    role: role_bits(role),
                },
            )
            .await?)
    }

    async fn transfer_ownership(&self, id: &ServiceId, new_owner: &Account) -> Result<()> {
        let new_owner = parse_account(new_owner)?;
        Ok(self
            .write(
                "transferOwnership",
                C::transferOwnershipCall {
                    id: service_key(id),
                    newOwner: new_owner,
                },
            )
            .await?)
    }

    async fn accept_ownership(&self, id: &ServiceId) -> Result<()> {
        Ok(self
            .write(
                "acceptOwnership",
                C::acceptOwnershipCall {
                    id: service_key(id),
                },
            )
            .await?)
    }

    async fn cancel_ownership_transfer(&self, id: &ServiceId) -> Result<()> {
        Ok(self
            .write(
                "cancelOwnershipTransfer",
                C::cancelOwnershipTransferCall {
                    id: service_key(id),
                },
            )
            .await?)
    }

    async fn pending_owner(&self, id: &ServiceId) -> Result<Option<Account>> {
        let pending = self
            .call(
                "pendingOwnerOf",
                C::pendingOwnerOfCall {
                    id: service_key(id),
                },
            )
            .await
            .map_err(|e| match e {
                ChainError::Revert(C::ServiceRegistryErrors::NotRegistered(_)) => {
                    ChainError::Core(Error::not_found(format!("service {id}")))
                }
                e => e,
            })?;
        Ok((pending != Address::ZERO).then(|| account_of(pending)))
    }

    async fn changes(&self) -> Result<ChangeStream> {
        let head = self.head().await?;
        let hash = self
            .inner
            .rpc
            .canonical_hash(head, self.inner.quorum)
            .await?
            .ok_or_else(|| ChainError::Unavailable(format!("block {head} not found")))?;
        let cursor = Cursor {
            registry: self.clone(),
            next_block: head + 1,
            scanned: VecDeque::from([Scanned {
                from: head,
                to: head,
                hash,
            }]),
            buffer: VecDeque::new(),
            idle: false,
        };
        let poll = self.inner.poll;
        Ok(futures::stream::unfold(cursor, move |mut c| async move {
            loop {
                if let Some(change) = c.buffer.pop_front() {
                    return Some((Ok(change), c));
                }
                if c.idle {
                    tokio::time::sleep(poll).await;
                }
                if let Err(e) = c.poll().await {
                    c.idle = true;
                    return Some((Err(Error::from(e)), c));
                }
            }
        })
        .boxed())
    }
}
