//! The private error of the Kubernetes backend and its one mapping to
//! [`br2k_core::Error`].

use br2k_core::{Error, ValidationError};

/// What can go wrong talking to Kubernetes.
#[derive(Debug, thiserror::Error)]
pub(crate) enum KubeError {
    /// The API server or the client failed.
    #[error("{context}: {source}")]
    Client {
        /// What br2k was doing.
        context: String,
        /// The kube error.
        #[source]
        source: kube::Error,
    },
    /// A live object cannot be understood.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// The client configuration could not be loaded.
    #[error("kubernetes client configuration: {0}")]
    Config(String),
    /// An object of the name br2k would write exists and is not br2k's for this
    /// service: it is neither overwritten nor deleted.
    #[error("{0}")]
    Foreign(String),
}

impl KubeError {
    pub(crate) fn client(context: impl Into<String>, source: kube::Error) -> Self {
        Self::Client {
            context: context.into(),
            source,
        }
    }
}

/// The HTTP status of an answer of the API server, if `e` is one.
fn api_status(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// Whether `e` is a 409 Conflict (a conditional write lost to a newer version).
pub(crate) fn is_conflict(e: &kube::Error) -> bool {
    api_status(e) == Some(409)
}

/// Whether `e` is a 404 from the API server.
pub(crate) fn is_not_found(e: &kube::Error) -> bool {
    api_status(e) == Some(404)
}

/// Whether `e` is a 403 from the API server (RBAC refused the request).
pub(crate) fn is_forbidden(e: &kube::Error) -> bool {
    api_status(e) == Some(403)
}

/// The one mapping of backend errors to br2k errors.
impl From<KubeError> for Error {
    fn from(e: KubeError) -> Self {
        match e {
            KubeError::Invalid(v) => Error::InvalidInput(v),
            KubeError::Config(reason) => Error::unavailable(reason),
            KubeError::Foreign(reason) => Error::conflict(reason),
            KubeError::Client { context, source } => match &source {
                kube::Error::Api(s) => match s.code {
                    404 => Error::not_found(format!("{context}: {}", s.message)),
                    409 => Error::conflict(format!("{context}: {}", s.message)),
                    401 | 403 => Error::permission_denied(format!("{context}: {}", s.message)),
                    400 | 422 => Error::InvalidInput(ValidationError::malformed(
                        "kubernetes object",
                        format!("{context}: {}", s.message),
                    )),
                    429 | 500..=599 => Error::unavailable(format!("{context}: {}", s.message)),
                    _ => Error::backend("kubernetes", KubeError::Client { context, source }, false),
                },
                kube::Error::HyperError(_)
                | kube::Error::Service(_)
                | kube::Error::ReadEvents(_) => Error::unavailable(format!("{context}: {source}")),
                _ => Error::backend("kubernetes", KubeError::Client { context, source }, false),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16) -> KubeError {
        KubeError::client(
            "get statefulset x",
            kube::Error::Api(
                kube::core::Status {
                    code,
                    message: "m".into(),
                    ..Default::default()
                }
                .boxed(),
            ),
        )
    }

    #[test]
    fn statuses_map_to_semantic_variants() {
        assert_eq!(Error::from(api(404)).kind(), br2k_core::ErrorKind::NotFound);
        assert_eq!(Error::from(api(409)).kind(), br2k_core::ErrorKind::Conflict);
        assert_eq!(
            Error::from(api(403)).kind(),
            br2k_core::ErrorKind::PermissionDenied
        );
        assert_eq!(
            Error::from(api(422)).kind(),
            br2k_core::ErrorKind::InvalidInput
        );
        assert!(Error::from(api(503)).is_retryable());
        assert!(Error::from(api(429)).is_retryable());
        assert_eq!(Error::from(api(418)).kind(), br2k_core::ErrorKind::Backend);
    }
}
