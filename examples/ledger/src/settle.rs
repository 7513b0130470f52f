//! The settlement side effect: a real transaction to the `Settlement` contract
//! (`contracts/Settlement.sol`), looked up by its key before any retry.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use alloy::network::EthereumWallet;
use alloy::primitives::{Address, B256, keccak256};
use alloy::providers::{DynProvider, Provider, ProviderBuilder};
use alloy::rpc::types::Filter;
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolEvent;
use alloy::transports::http::reqwest::Url;
use async_trait::async_trait;
use br2k_core::replica::Effect;
use br2k_core::{Error, Result, ValidationError};

use crate::state::{Command, SettlementReceipt};

#[allow(missing_docs)]
mod bindings {
    alloy::sol!(
        #[sol(rpc, all_derives)]
        Settlement,
        "contracts/out/Settlement.json"
    );
}

pub use bindings::Settlement;

/// The private error of the settlement backend.
#[derive(Debug)]
enum SettleError {
    /// The contract or node refused the call.
    Contract(alloy::contract::Error),
    /// The transaction was sent but its receipt could not be obtained.
    Pending(String),
    /// A mined transaction reverted.
    Reverted(B256),
    /// The command is not a settlement.
    NotASettlement,
}

impl From<SettleError> for Error {
    /// The one mapping of settlement errors to core errors.
    fn from(e: SettleError) -> Self {
        match e {
            SettleError::Contract(e) => {
                if let Some(err) = e.as_decoded_interface_error::<Settlement::SettlementErrors>() {
                    return match err {
                        Settlement::SettlementErrors::AlreadySettled(x) => Error::already_exists(
                            format!("settlement {} (block {})", x.key, x.blockNumber),
                        ),
                        Settlement::SettlementErrors::InvalidSettlement(_) => {
                            ValidationError::malformed("settlement", "zero key or amount").into()
                        }
                        Settlement::SettlementErrors::NotSettler(x) => Error::permission_denied(
                            format!("{:#x} is not the settlement contract's settler", x.caller),
                        ),
                        Settlement::SettlementErrors::ZeroSettler(_) => {
                            ValidationError::malformed("settler", "the zero address").into()
                        }
                    };
                }
                let transport = matches!(
                    e,
                    alloy::contract::Error::TransportError(alloy::transports::RpcError::Transport(
                        _
                    ))
                );
                if transport {
                    Error::unavailable(format!("settlement RPC: {e}"))
                } else {
                    Error::backend("settlement", e, false)
                }
            }
            SettleError::Pending(reason) => Error::unavailable(reason),
            SettleError::Reverted(tx) => Error::conflict(format!("settlement {tx} reverted")),
            SettleError::NotASettlement => {
                ValidationError::malformed("command", "once is only for settlements").into()
            }
        }
    }
}

/// Confirmations a settlement needs by default: 1, the block that holds it (its
/// receipt is still re-checked to be canonical). The development chain of the stack
/// (anvil) mines one block per transaction, so a larger default would never complete
/// there without other traffic; on a public chain set `--confirmations` (e.g. 12, or
/// more for large amounts).
pub const DEFAULT_CONFIRMATIONS: u64 = 1;
/// How long a settlement may take to be mined and confirmed.
const RECEIPT_TIMEOUT: Duration = Duration::from_secs(60);
/// Interval of receipt and block polls.
const POLL: Duration = Duration::from_millis(50);

/// The on-chain key of a settlement: keccak256 of the client's idempotency key.
pub fn settlement_key(key: &str) -> B256 {
    keccak256(key.as_bytes())
}

/// Sends settlements to the `Settlement` contract with its own signer.
#[derive(Clone)]
pub struct SettleEffect {
    provider: DynProvider,
    address: Address,
    from: Address,
    /// Blocks that must hold a settlement (its own included) before it counts as done.
    confirmations: u64,
    /// Serializes sends of this process so that each reads a fresh pending nonce.
    sending: Arc<tokio::sync::Mutex<()>>,
}

impl fmt::Debug for SettleEffect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SettleEffect")
            .field("contract", &self.address)
            .field("from", &self.from)
            .field("confirmations", &self.confirmations)
            .finish_non_exhaustive()
    }
}

impl SettleEffect {
    /// A settler for the contract at `address` on `rpc`, signing with `key` (hex; kept
    /// in memory only, never printed).
    pub fn new(rpc: Url, address: Address, key: &str) -> Result<Self> {
        let signer: PrivateKeySigner = key.trim().parse().map_err(|_| {
            Error::from(ValidationError::malformed(
                "settler key",
                "not 32 bytes of hex",
            ))
        })?;
        let from = signer.address();
        // The pending nonce is read from the node for every transaction (never cached):
        // after a failover another process may have used this key meanwhile.
        let provider = ProviderBuilder::default()
            .with_gas_estimation()
            .with_simple_nonce_management()
            .fetch_chain_id()
            .wallet(EthereumWallet::from(signer))
            .connect_http(rpc)
            .erased();
        Ok(Self {
            provider,
            address,
            from,
            confirmations: DEFAULT_CONFIRMATIONS,
            sending: Arc::default(),
        })
    }

    /// Counts a settlement as done only once `confirmations` blocks (at least 1, its
    /// own included) hold it and its receipt, fetched again, is still in a canonical
    /// block.
    pub fn with_confirmations(mut self, confirmations: u64) -> Self {
        self.confirmations = confirmations.max(1);
        self
    }

    /// Waits for the receipt of `hash` and its confirmations, then fetches the receipt
    /// again: its block must still be canonical. A settlement reorged out is waited
    /// for again (the node re-includes it, or the wait times out: never "done").
    async fn confirmed(&self, hash: B256) -> Result<alloy::rpc::types::TransactionReceipt> {
        let deadline = tokio::time::Instant::now() + RECEIPT_TIMEOUT;
        let rpc = |e: alloy::transports::TransportError| {
            Error::unavailable(format!("settlement {hash:#x}: {e}"))
        };
        loop {
            if let Some(first) = self
                .provider
                .get_transaction_receipt(hash)
                .await
                .map_err(rpc)?
            {
                let mined = first.block_number.unwrap_or_default();
                loop {
                    let head = self.provider.get_block_number().await.map_err(rpc)?;
                    if head + 1 >= mined + self.confirmations {
                        break;
                    }
                    if tokio::time::Instant::now() >= deadline {
                        break;
                    }
                    tokio::time::sleep(POLL).await;
                }
                let again = self
                    .provider
                    .get_transaction_receipt(hash)
                    .await
                    .map_err(rpc)?;
                if let Some(r) = again {
                    let n = r.block_number.unwrap_or_default();
                    let head = self.provider.get_block_number().await.map_err(rpc)?;
                    let canonical = self
                        .provider
                        .get_block_by_number(n.into())
                        .await
                        .map_err(rpc)?
                        .map(|b| b.header.hash);
                    if canonical.is_some()
                        && canonical == r.block_hash
                        && head + 1 >= n + self.confirmations
                    {
                        return Ok(r);
                    }
                }
                tracing::warn!(tx = %hash, block = mined, "settlement not (or no longer) confirmed in its block; waiting again");
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(SettleError::Pending(format!(
                    "settlement {hash:#x}: not confirmed by {} blocks after {RECEIPT_TIMEOUT:?}",
                    self.confirmations
                ))
                .into());
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Deploys a new `Settlement` contract signed by `key` whose only settler is
    /// `settler` (default: `key`'s account), and returns its address.
    pub async fn deploy(rpc: Url, key: &str, settler: Option<Address>) -> Result<Address> {
        let me = Self::new(rpc, Address::ZERO, key)?;
        let c = Settlement::deploy(&me.provider, settler.unwrap_or(me.from))
            .await
            .map_err(|e| Error::from(SettleError::Contract(e)))?;
        Ok(*c.address())
    }

    /// The settler's account.
    pub fn from(&self) -> Address {
        self.from
    }

    /// The contract address.
    pub fn address(&self) -> Address {
        self.address
    }

    /// The number of settlements the contract recorded.
    pub async fn count(&self) -> Result<u64> {
        let c = Settlement::new(self.address, &self.provider);
        let n = c
            .count()
            .call()
            .await
            .map_err(|e| Error::from(SettleError::Contract(e)))?;
        Ok(n.saturating_to())
    }

    /// The recorded settlement of `key`, with the transaction that made it.
    pub async fn find(&self, key: &str) -> Result<Option<SettlementReceipt>> {
        Ok(self.find_recorded(key).await?.map(|(r, _, _)| r))
    }

    /// [`Self::find`] with the recorded account hash and amount.
    async fn find_recorded(&self, key: &str) -> Result<Option<(SettlementReceipt, B256, u128)>> {
        let k = settlement_key(key);
        let c = Settlement::new(self.address, &self.provider);
        let rec = c
            .settledAt(k)
            .call()
            .await
            .map_err(|e| Error::from(SettleError::Contract(e)))?;
        if rec.blockNumber == 0 {
            return Ok(None);
        }
        let filter = Filter::new()
            .address(self.address)
            .event_signature(Settlement::Settled::SIGNATURE_HASH)
            .topic1(k)
            .from_block(rec.blockNumber)
            .to_block(rec.blockNumber);
        let logs = self
            .provider
            .get_logs(&filter)
            .await
            .map_err(|e| Error::unavailable(format!("settlement logs: {e}")))?;
        let tx = logs
            .first()
            .and_then(|l| l.transaction_hash)
            .ok_or_else(|| Error::unavailable("settlement event not found (yet)"))?;
        Ok(Some((
            SettlementReceipt {
                tx: format!("{tx:#x}"),
                block: rec.blockNumber,
            },
            rec.account,
            rec.amount,
        )))
    }

    /// The settlement of `key` if it is the one `command` asks for; a settlement of
    /// the same key for another account or amount is a conflict, never reported as
    /// done.
    async fn find_matching(
        &self,
        key: &str,
        command: &Command,
    ) -> Result<Option<SettlementReceipt>> {
        let Some((receipt, account_hash, amount)) = self.find_recorded(key).await? else {
            return Ok(None);
        };
        match command {
            Command::Settle {
                account, amount: a, ..
            } if keccak256(account.as_bytes()) == account_hash && u128::from(*a) == amount => {
                Ok(Some(receipt))
            }
            _ => Err(Error::conflict(format!(
                "settlement key {key} was settled (block {}) for another account or amount",
                receipt.block
            ))),
        }
    }

    async fn send(&self, key: &str, account: &str, amount: u64) -> Result<SettlementReceipt> {
        let c = Settlement::new(self.address, &self.provider);
        let guard = self.sending.lock().await;
        let pending = c
            .settle(
                settlement_key(key),
                keccak256(account.as_bytes()),
                u128::from(amount),
            )
            .send()
            .await
            .map_err(SettleError::Contract)?;
        drop(guard);
        let hash = *pending.tx_hash();
        let receipt = self.confirmed(hash).await?;
        if !receipt.status() {
            return Err(SettleError::Reverted(hash).into());
        }
        Ok(SettlementReceipt {
            tx: format!("{hash:#x}"),
            block: receipt.block_number.unwrap_or_default(),
        })
    }
}

fn encode(r: &SettlementReceipt) -> Result<Vec<u8>> {
    serde_json::to_vec(r).map_err(|e| Error::backend("settlement", e, false))
}

#[async_trait]
impl Effect<Command> for SettleEffect {
    async fn lookup(&self, key: &str, command: &Command) -> Result<Option<Vec<u8>>> {
        match self.find_matching(key, command).await? {
            Some(r) => Ok(Some(encode(&r)?)),
            None => Ok(None),
        }
    }

    async fn run(&self, key: &str, command: &Command) -> Result<Vec<u8>> {
        let Command::Settle {
            key: k,
            account,
            amount,
        } = command
        else {
            return Err(SettleError::NotASettlement.into());
        };
        if k != key {
            return Err(ValidationError::malformed("settlement", "key mismatch").into());
        }
        match self.send(key, account, *amount).await {
            Ok(r) => encode(&r),
            // Sent before (e.g. by a deposed leader whose transaction was still
            // pending when its intent was looked up): report that settlement.
            Err(Error::AlreadyExists { .. }) => match self.find_matching(key, command).await? {
                Some(r) => encode(&r),
                None => Err(Error::unavailable("settlement exists but is not readable")),
            },
            Err(e) => Err(e),
        }
    }
}
