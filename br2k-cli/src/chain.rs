//! The registry contract through br2k-chain, plus what the CLI reads from the
//! contract's events itself (the block and transaction of each version).

use alloy::primitives::B256;
use alloy::providers::{Provider, ProviderBuilder};
use alloy::rpc::types::Filter;
use alloy::sol_types::SolEvent;
use br2k_chain::ChainRegistry;
use br2k_chain::bindings::ServiceRegistry as C;
use br2k_core::ServiceId;
use serde::Serialize;

use crate::context::Context;
use crate::error::{CliError, CliResult};

/// A handle on the context's registry; with the signer when `sign`.
pub async fn connect(ctx: &Context, sign: bool) -> CliResult<ChainRegistry> {
    ctx.contract()?;
    let config = ctx.chain_config(sign)?;
    ChainRegistry::connect(config).await.map_err(|e| {
        let rpc = ctx.rpc_urls.join(", ");
        let c = CliError::from_core(&e, None);
        if e.kind() == br2k_core::ErrorKind::Unavailable {
            CliError::fail(format!("chain RPC {rpc} is down: {}", c.cause))
                .hint("start the node or fix the context's rpc_urls (`br2k context set NAME --rpc URL`); nothing was changed")
        } else {
            c
        }
    })
}

/// Where a version was published.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct VersionEvent {
    /// Version number.
    pub version: u64,
    /// Block number.
    pub block: u64,
    /// Transaction hash.
    pub tx: String,
}

/// The block and transaction of each version of `id`, from the contract's
/// `Registered` and `Published` events since block `from` (the contract's deployment).
pub async fn version_events(
    ctx: &Context,
    id: &ServiceId,
    from: u64,
) -> CliResult<Vec<VersionEvent>> {
    let url = ctx.urls()?.remove(0);
    let address = ctx.contract()?;
    let provider = ProviderBuilder::new().connect_http(url);
    let key: B256 = br2k_chain::service_key(id);
    let filter = Filter::new()
        .address(address)
        .event_signature(vec![
            C::Registered::SIGNATURE_HASH,
            C::Published::SIGNATURE_HASH,
        ])
        .topic1(key)
        .from_block(from);
    let logs = provider
        .get_logs(&filter)
        .await
        .map_err(|e| CliError::fail(format!("read the registry's events: {e}")))?;
    let mut out = Vec::new();
    for log in logs {
        let version = match log.topic0() {
            Some(t) if *t == C::Registered::SIGNATURE_HASH => 1,
            Some(t) if *t == C::Published::SIGNATURE_HASH => {
                match C::Published::decode_raw_log(log.topics().iter().copied(), &log.data().data) {
                    Ok(e) => e.version,
                    Err(_) => continue,
                }
            }
            _ => continue,
        };
        out.push(VersionEvent {
            version,
            block: log.block_number.unwrap_or_default(),
            tx: log
                .transaction_hash
                .map(|h| format!("{h:#x}"))
                .unwrap_or_default(),
        });
    }
    out.sort_by_key(|v| v.version);
    Ok(out)
}

/// The account of the context's key (`0x…`), if a key is configured.
pub fn account(ctx: &Context) -> CliResult<Option<String>> {
    let Some(key) = ctx.key()? else {
        return Ok(None);
    };
    let signer: alloy::signers::local::PrivateKeySigner = key
        .trim()
        .parse()
        .map_err(|_| CliError::usage("the signing key is not 32 bytes of hex"))?;
    Ok(Some(format!("{:#x}", signer.address())))
}
