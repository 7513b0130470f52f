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

    /// Whether the failure itself says this client's lease no longer exists: the
    /// keep-alive stream answered a TTL of 0 (etcd-client's `LeaseKeepAliveError`) or
    /// the KV API refused the lease (`NotFound`, etcd's `ErrGRPCLeaseNotFound`). The
    /// election API answers `Unknown` for it (its server drops the code):
    /// [`crate::session::Session::lease_lost`] asks etcd then.
    pub(crate) fn is_lease_lost(&self) -> bool {
        match self {
            Self::Client { source, .. } => match source {
                ClientError::LeaseKeepAliveError(_) => true,
                ClientError::GRpcStatus(s) => s.code() == tonic::Code::NotFound,
                _ => false,
            },
            _ => false,
        }
    }

    /// Whether etcd answered (a gRPC status), as opposed to a transport failure or
    /// timeout.
    pub(crate) fn is_answer(&self) -> bool {
        matches!(
            self,
            Self::Client {
                source: ClientError::GRpcStatus(_),
                ..
            }
        )
    }
}

/// Whether a gRPC status is worth retrying: the member is down, slow, or has no raft
/// leader at the moment (etcd answers `Unavailable` for "no leader", "leader changed"
/// and its request timeouts; its election API answers `Unknown` for every failure).
fn retryable_status(s: &tonic::Status) -> bool {
    use tonic::Code as C;
    matches!(
        s.code(),
        C::Unavailable
            | C::DeadlineExceeded
            | C::Aborted
            | C::Cancelled
            | C::ResourceExhausted
            | C::Unknown
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: tonic::Code, message: &str) -> EtcdError {
        EtcdError::client(
            "op",
            ClientError::GRpcStatus(tonic::Status::new(code, message)),
        )
    }

    #[test]
    fn lease_loss_and_retries_are_decided_by_variant_and_code() {
        let lost = [
            EtcdError::client("op", ClientError::LeaseKeepAliveError("x".into())),
            status(
                tonic::Code::NotFound,
                "etcdserver: requested lease not found",
            ),
        ];
        for e in &lost {
            assert!(e.is_lease_lost(), "{e}");
        }
        // The text alone decides nothing.
        let other = status(
            tonic::Code::FailedPrecondition,
            "lease not found; no leader",
        );
        assert!(!other.is_lease_lost());
        assert!(!Error::from(other).is_retryable());
        for code in [tonic::Code::Unavailable, tonic::Code::Unknown] {
            let e = status(code, "etcdserver: leader changed");
            assert!(e.is_answer());
            assert!(Error::from(e).is_retryable());
        }
        let timeout = EtcdError::Timeout { op: "op", ms: 5 };
        assert!(!timeout.is_answer());
        assert!(matches!(Error::from(timeout), Error::Unavailable { .. }));
        assert!(matches!(
            Error::from(status(tonic::Code::PermissionDenied, "")),
            Error::PermissionDenied { .. }
        ));
    }
}
