//! The private error of the etcd backend and its one mapping to [`br2k_core::Error`].

use br2k_core::{Error, ValidationError};
use etcd_client::Error as ClientError;

/// What can go wrong talking to etcd. Mapped to [`Error`] in [`into_core`] only.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EtcdError {
    /// The client library failed (transport or gRPC status).
    #[error("etcd {op}: {source}")]
    Client {
        /// The operation.
        op: &'static str,
        /// The client error.
        source: ClientError,
    },
    /// The call did not finish within the request timeout.
    #[error("etcd {op}: timed out after {ms} ms")]
    Timeout {
        /// The operation.
        op: &'static str,
        /// The timeout.
        ms: u128,
    },
    /// A key written by this backend does not decode.
    #[error("etcd log key {key}: {reason}")]
    Corrupt {
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

impl EtcdError {
    /// Wraps a client error of `op`.
    pub(crate) fn client(op: &'static str, source: ClientError) -> Self {
        Self::Client { op, source }
    }

    /// Whether etcd said the lease (this client's session) no longer exists.
    pub(crate) fn is_lease_lost(&self) -> bool {
        match self {
            Self::Client { source, .. } => source.to_string().contains("lease not found"),
            _ => false,
        }
    }
}

/// Whether a gRPC status is worth retrying (the member is down, slow, or has no
/// raft leader at the moment).
fn retryable_status(s: &tonic::Status) -> bool {
    use tonic::Code as C;
    match s.code() {
        C::Unavailable
        | C::DeadlineExceeded
        | C::Aborted
        | C::Cancelled
        | C::ResourceExhausted
        | C::Unknown => true,
        _ => {
            let m = s.message();
            m.contains("no leader") || m.contains("leader changed") || m.contains("timed out")
        }
    }
}

/// The one mapping of backend errors to [`Error`]: unreachable or slow endpoints are
/// [`Error::Unavailable`] (retryable); etcd's refusals keep their meaning.
pub(crate) fn into_core(e: EtcdError) -> Error {
    match &e {
        EtcdError::Client { source, .. } => match source {
            ClientError::TransportError(_)
            | ClientError::IoError(_)
            | ClientError::WatchError(_)
            | ClientError::LeaseKeepAliveError(_)
            | ClientError::ElectError(_) => Error::unavailable(e),
            ClientError::GRpcStatus(s) if retryable_status(s) => Error::unavailable(e),
            ClientError::GRpcStatus(s) => match s.code() {
                tonic::Code::NotFound => Error::not_found(e),
                tonic::Code::InvalidArgument | tonic::Code::OutOfRange => {
                    ValidationError::malformed("etcd request", e).into()
                }
                tonic::Code::PermissionDenied | tonic::Code::Unauthenticated => {
                    Error::permission_denied(e)
                }
                _ => Error::backend("etcd", e, false),
            },
            ClientError::InvalidArgs(_) | ClientError::InvalidUri(_) => {
                ValidationError::malformed("etcd client argument", e).into()
            }
            _ => Error::backend("etcd", e, false),
        },
        EtcdError::Timeout { .. } => Error::unavailable(e),
        EtcdError::Corrupt { .. } => Error::backend("etcd", e, false),
    }
}

impl From<EtcdError> for Error {
    fn from(e: EtcdError) -> Self {
        into_core(e)
    }
}
