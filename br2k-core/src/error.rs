//! The one error type of br2k, with semantic variants.

use std::fmt;

/// Result alias used across br2k.
pub type Result<T, E = Error> = std::result::Result<T, E>;

use std::sync::Arc;

/// A boxed error from a backend library.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A shared backend error: what [`Error::Backend`] holds, so that [`Error`] is `Clone`.
pub type SharedError = Arc<dyn std::error::Error + Send + Sync + 'static>;

/// The kind of an [`Error`]: its variant without the details, for decisions (retry,
/// map to a status code) and for metrics and tables.
///
/// Displays (and serializes) as a short stable snake_case name, e.g. `not_found`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// [`Error::NotFound`].
    NotFound,
    /// [`Error::AlreadyExists`].
    AlreadyExists,
    /// [`Error::Conflict`].
    Conflict,
    /// [`Error::PermissionDenied`].
    PermissionDenied,
    /// [`Error::Unavailable`].
    Unavailable,
    /// [`Error::Tampered`].
    Tampered,
    /// [`Error::InvalidInput`].
    InvalidInput,
    /// [`Error::NotSupported`].
    NotSupported,
    /// [`Error::Backend`].
    Backend,
}

impl ErrorKind {
    /// The short stable name (`not_found`, `conflict`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not_found",
            ErrorKind::AlreadyExists => "already_exists",
            ErrorKind::Conflict => "conflict",
            ErrorKind::PermissionDenied => "permission_denied",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Tampered => "tampered",
            ErrorKind::InvalidInput => "invalid_input",
            ErrorKind::NotSupported => "not_supported",
            ErrorKind::Backend => "backend",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an input was rejected. Returned inside [`Error::InvalidInput`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ValidationError {
    /// A service id is not a DNS-1123 label.
    #[error("invalid service id {value:?}: {reason}")]
    ServiceId {
        /// The rejected value (truncated to 100 characters).
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A digest is not `sha256:` followed by 64 lowercase hex digits.
    #[error("invalid digest {value:?}: {reason}")]
    Digest {
        /// The rejected value (truncated to 100 characters).
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An image reference cannot be parsed or lacks a required part.
    #[error("invalid image reference {value:?}: {reason}")]
    ImageRef {
        /// The rejected value (truncated to 100 characters).
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A service spec field is invalid.
    #[error("invalid service spec field `{field}`: {reason}")]
    Spec {
        /// Dotted path of the field.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Any other malformed input (manifests, commands, RPC answers...).
    #[error("invalid {what}: {reason}")]
    Malformed {
        /// What kind of input it was.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl ValidationError {
    /// Builds a [`ValidationError::Malformed`].
    pub fn malformed(what: impl Into<String>, reason: impl fmt::Display) -> Self {
        Self::Malformed {
            what: what.into(),
            reason: reason.to_string(),
        }
    }

    /// Builds a [`ValidationError::Spec`].
    pub fn spec(field: impl Into<String>, reason: impl fmt::Display) -> Self {
        Self::Spec {
            field: field.into(),
            reason: reason.to_string(),
        }
    }
}

pub(crate) fn truncate(value: &str) -> String {
    value.chars().take(100).collect()
}

/// The error of every br2k operation.
///
/// Variants say what happened, not which library failed; backends map their own
/// errors into these in one place.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The named object does not exist.
    #[error("not found: {what}")]
    NotFound {
        /// What was looked for.
        what: String,
    },
    /// The object to create exists already.
    #[error("already exists: {what}")]
    AlreadyExists {
        /// What exists.
        what: String,
    },
    /// The operation conflicts with the current state (wrong state transition,
    /// stale fencing token, concurrent modification).
    #[error("conflict: {reason}")]
    Conflict {
        /// Why.
        reason: String,
    },
    /// The caller is not allowed to do this.
    #[error("permission denied: {reason}")]
    PermissionDenied {
        /// Why.
        reason: String,
    },
    /// The backend cannot be reached or timed out; retrying may help.
    #[error("unavailable: {reason}")]
    Unavailable {
        /// Why.
        reason: String,
    },
    /// Content does not match its recorded digest or hash.
    #[error("tampered {what}: expected {expected}, got {actual}")]
    Tampered {
        /// What was verified.
        what: String,
        /// The recorded digest.
        expected: String,
        /// The digest of what was served.
        actual: String,
    },
    /// The input was rejected before anything changed.
    #[error(transparent)]
    InvalidInput(#[from] ValidationError),
    /// The backend does not support this operation.
    #[error("not supported: {operation}")]
    NotSupported {
        /// The operation.
        operation: String,
    },
    /// Any other backend failure.
    #[error("{backend} backend error: {source}")]
    Backend {
        /// Which backend (e.g. "kubernetes", "chain", "oci", "etcd").
        backend: &'static str,
        /// The underlying error.
        source: SharedError,
        /// Whether retrying the same call may succeed.
        retryable: bool,
    },
}

impl Error {
    /// Whether retrying the same call later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Unavailable { .. } => true,
            Error::Backend { retryable, .. } => *retryable,
            _ => false,
        }
    }

    /// Builds [`Error::NotFound`].
    pub fn not_found(what: impl fmt::Display) -> Self {
        Error::NotFound {
            what: what.to_string(),
        }
    }

    /// Builds [`Error::AlreadyExists`].
    pub fn already_exists(what: impl fmt::Display) -> Self {
        Error::AlreadyExists {
            what: what.to_string(),
        }
    }

    /// Builds [`Error::Conflict`].
    pub fn conflict(reason: impl fmt::Display) -> Self {
        Error::Conflict {
            reason: reason.to_string(),
        }
    }

    /// Builds [`Error::PermissionDenied`].
    pub fn permission_denied(reason: impl fmt::Display) -> Self {
        Error::PermissionDenied {
            reason: reason.to_string(),
        }
    }

    /// Builds [`Error::Unavailable`].
    pub fn unavailable(reason: impl fmt::Display) -> Self {
        Error::Unavailable {
            reason: reason.to_string(),
        }
    }

    /// Builds [`Error::Tampered`].
    pub fn tampered(
        what: impl fmt::Display,
        expected: impl fmt::Display,
        actual: impl fmt::Display,
    ) -> Self {
        Error::Tampered {
            what: what.to_string(),
            expected: expected.to_string(),
            actual: actual.to_string(),
        }
    }

    /// Builds [`Error::NotSupported`].
    pub fn not_supported(operation: impl fmt::Display) -> Self {
        Error::NotSupported {
            operation: operation.to_string(),
        }
    }

    /// Builds [`Error::Backend`].
    pub fn backend(backend: &'static str, source: impl Into<BoxError>, retryable: bool) -> Self {
        Error::Backend {
            backend,
            source: Arc::from(source.into()),
            retryable,
        }
    }

    /// The kind of this error (its variant without the details).
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::NotFound { .. } => ErrorKind::NotFound,
            Error::AlreadyExists { .. } => ErrorKind::AlreadyExists,
            Error::Conflict { .. } => ErrorKind::Conflict,
            Error::PermissionDenied { .. } => ErrorKind::PermissionDenied,
            Error::Unavailable { .. } => ErrorKind::Unavailable,
            Error::Tampered { .. } => ErrorKind::Tampered,
            Error::InvalidInput(_) => ErrorKind::InvalidInput,
            Error::NotSupported { .. } => ErrorKind::NotSupported,
            Error::Backend { .. } => ErrorKind::Backend,
        }
    }
}
