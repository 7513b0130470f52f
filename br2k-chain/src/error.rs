//! The private error of the chain backend and its one mapping to [`br2k_core::Error`].

use alloy::primitives::{Address, B256};
use alloy::rpc::json_rpc::ErrorPayload;
use alloy::rpc::types::eth::error::EthRpcErrorCode;
use br2k_core::{Error, ValidationError};

use crate::bindings::ServiceRegistry::ServiceRegistryErrors as E;

/// What went wrong talking to the chain.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ChainError {
    /// The contract refused the call with one of its custom errors.
    #[error("registry refused the call: {0:?}")]
    Revert(E),
    /// A JSON-RPC error answer that is not a known custom error.
    #[error("RPC error {code}: {message}")]
    Rpc { code: i64, message: String },
    /// No endpoint answered.
    #[error("{0}")]
    Unavailable(String),
    /// The endpoints serve another chain.
    #[error("expected chain id {expected}, the endpoint reports {actual}")]
    WrongChain { expected: u64, actual: u64 },
    /// No contract at the configured address.
    #[error("no contract code at {0}")]
    NoCode(Address),
    /// Bad configuration (never includes key material).
    #[error("{0}")]
    Config(String),
    /// A write on a connection opened without a signer.
    #[error("read-only registry connection (no signer configured): cannot {0}")]
    ReadOnly(String),
    /// A mined transaction reverted.
    #[error("transaction {0} reverted")]
    Reverted(B256),
    /// An answer could not be decoded.
    #[error("cannot decode {0}")]
    Decode(String),
    /// An event the record points at is missing from the log.
    #[error("missing event: {0}")]
    MissingLog(String),
    /// An error already expressed in core terms (validation, verification).
    #[error(transparent)]
    Core(#[from] Error),
}

impl ChainError {
    /// Classifies a JSON-RPC error answer: custom errors of the registry are decoded by
    /// their selector.
    pub(crate) fn from_payload(payload: &ErrorPayload) -> Self {
        match payload.as_decoded_interface_error::<E>() {
            Some(e) => ChainError::Revert(e),
            None => ChainError::Rpc {
                code: payload.code,
                message: payload.message.to_string(),
            },
        }
    }
}

/// Whether a JSON-RPC error code is EIP-1474's "transaction rejected" (-32003): what
/// anvil and reth answer for a transaction their pool refuses, a nonce too low or too
/// high among them. Retryable: the sender reads the nonce again after a refusal.
fn transaction_rejected(code: i64) -> bool {
    code == i64::from(EthRpcErrorCode::TransactionRejected.code())
}

fn hex_id(id: &B256) -> String {
    format!("service {id}")
}

impl From<ChainError> for Error {
    /// The one mapping from chain errors to core errors.
    fn from(e: ChainError) -> Self {
        match e {
            ChainError::Revert(r) => match r {
                E::NotRegistered(x) => Error::not_found(hex_id(&x.id)),
                E::UnknownVersion(x) => {
                    Error::not_found(format!("version {} of {}", x.version, hex_id(&x.id)))
                }
                E::AlreadyRegistered(x) => Error::already_exists(hex_id(&x.id)),
                E::NotOwner(x) => Error::permission_denied(format!(
                    "{:#x} does not own {}",
                    x.caller,
                    hex_id(&x.id)
                )),
                E::NotOperator(x) => Error::permission_denied(format!(
                    "{:#x} is neither owner nor operator of {}",
                    x.caller,
                    hex_id(&x.id)
                )),
                E::NotReplica(x) => Error::permission_denied(format!(
                    "{:#x} holds no replica role on {}",
                    x.caller,
                    hex_id(&x.id)
                )),
                E::InvalidTransition(x) => Error::conflict(format!(
                    "{} cannot go from state {} to {}",
                    hex_id(&x.id),
                    x.from,
                    x.to
                )),
                E::RollForward(x) => Error::conflict(format!(
                    "version {} of {} is later than the active version {}",
                    x.version,
                    hex_id(&x.id),
                    x.active
                )),
                E::CheckpointOutOfOrder(x) => Error::conflict(format!(
                    "checkpoint (state version {}, log index {}) of {} is out of order",
                    x.stateVersion,
                    x.logIndex,
                    hex_id(&x.id)
                )),
                E::StaleTerm(x) => Error::conflict(format!(
                    "location term {} of {} is below the recorded {}",
                    x.term,
                    hex_id(&x.id),
                    x.recordedTerm
                )),
                E::StaleEpoch(x) => Error::conflict(format!(
                    "placement epoch {} of {} is not above the recorded {}",
                    x.epoch,
                    hex_id(&x.id),
                    x.recorded
                )),
                E::InvalidCluster(_) => ValidationError::malformed(
                    "cluster name",
                    "refused by the registry: need 1-32 lowercase letters, digits or '-', not at either end",
                )
                .into(),
                E::InvalidName(_) => {
                    ValidationError::malformed("service name", "refused by the registry").into()
                }
                E::InvalidSpec(_) => {
                    ValidationError::malformed(
                    "spec",
                    "refused by the registry: empty, too large, no image digest, or its sha256 is not the recorded hash",
                )
                .into()
                }
                E::InvalidReplicas(x) => ValidationError::spec(
                    "replicas",
                    format!("{} refused by the registry", x.replicas),
                )
                .into(),
                E::InvalidState(x) => {
                    ValidationError::malformed("service state", format!("unknown code {}", x.state))
                        .into()
                }
                E::InvalidEndpoint(_) => {
                    ValidationError::malformed("location endpoint", "must be 1-256 bytes").into()
                }
                E::InvalidRole(x) => {
                    ValidationError::malformed("role", format!("unknown role {}", x.role)).into()
                }
                E::ZeroAddress(_) => {
                    ValidationError::malformed("account", "the zero address").into()
                }
                E::NotPendingOwner(x) => Error::permission_denied(format!(
                    "{:#x} is not the pending owner of {}",
                    x.caller,
                    hex_id(&x.id)
                )),
                E::JumpTooLarge(x) => {
                    let what = match x.counter {
                        1 => "checkpoint log index",
                        2 => "checkpoint term",
                        3 => "location term",
                        4 => "placement epoch",
                        _ => "counter",
                    };
                    ValidationError::malformed(
                        what,
                        format!(
                            "{} would jump from {} to {}, more than the registry's bound of {} per call (the owner may reset it)",
                            hex_id(&x.id),
                            x.recorded,
                            x.value,
                            x.maxStep
                        ),
                    )
                    .into()
                }
            },
            ChainError::Rpc { code, message } => Error::backend(
                "chain",
                format!("RPC error {code}: {message}"),
                transaction_rejected(code),
            ),
            ChainError::Unavailable(reason) => Error::unavailable(reason),
            e @ ChainError::WrongChain { .. } => ValidationError::malformed("chain id", e).into(),
            ChainError::NoCode(address) => Error::not_found(format!(
                "registry contract at {address:#x} (the address has no code)"
            )),
            ChainError::Config(reason) => {
                ValidationError::malformed("chain configuration", reason).into()
            }
            e @ ChainError::ReadOnly(_) => Error::permission_denied(e),
            e @ ChainError::Reverted(_) => Error::conflict(e),
            e @ (ChainError::Decode(_) | ChainError::MissingLog(_)) => {
                Error::backend("chain", e, false)
            }
            ChainError::Core(e) => e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rpc(code: i64, message: &str) -> Error {
        ChainError::Rpc {
            code,
            message: message.into(),
        }
        .into()
    }

    #[test]
    fn a_rejected_transaction_is_retryable_by_its_code_not_its_text() {
        // anvil's and reth's answer to a nonce too low.
        assert!(rpc(-32003, "nonce too low").is_retryable());
        assert!(rpc(-32003, "transaction already imported").is_retryable());
        // The text alone decides nothing.
        assert!(!rpc(-32602, "invalid nonce").is_retryable());
        assert!(!rpc(3, "execution reverted").is_retryable());
        assert!(matches!(
            rpc(-32003, "nonce too high"),
            Error::Backend {
                backend: "chain",
                ..
            }
        ));
    }
}
