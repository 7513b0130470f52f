//! On-chain service registry for br2k: the `ServiceRegistry` Solidity contract
//! (`contracts/ServiceRegistry.sol`, compiled with a pinned solc-js into the committed
//! artifact `contracts/out/ServiceRegistry.json`) and [`ChainRegistry`], its
//! [`br2k_core::Registry`] backend built on alloy.
//!
//! ```no_run
//! # async fn demo() -> br2k_core::Result<()> {
//! use br2k_chain::{ChainConfig, ChainRegistry};
//! // BR2K_RPC_URLS, BR2K_REGISTRY_ADDRESS and BR2K_PRIVATE_KEY (or a key file/keystore).
//! let registry = ChainRegistry::connect(ChainConfig::from_env()?).await?;
//! # let _ = registry; Ok(()) }
//! ```

pub mod bindings;
mod config;
mod error;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod registry;
mod rpc;
mod sender;

pub use config::{ChainConfig, ReadDepth};
pub use registry::{
    AuditEntry, ChainRegistry, MAX_LOG_INDEX_STEP, MAX_TERM_STEP, account_of, cluster_word,
    service_key,
};
