//! The private error of the OCI backend and its one mapping to [`br2k_core::Error`].

use br2k_core::{Error, ValidationError};

/// What went wrong talking to a registry.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OciError {
    /// Could not connect, or the connection broke / timed out.
    #[error("{registry}: connection failed: {source}")]
    Connect {
        registry: String,
        source: reqwest::Error,
    },
    /// The registry answered with an unexpected HTTP status.
    #[error("{registry}: {what}: HTTP {status}: {body}")]
    Status {
        registry: String,
        what: String,
        status: u16,
        body: String,
    },
    /// Content did not match its digest or size.
    #[error("tampered {what}")]
    Tampered {
        what: String,
        expected: String,
        actual: String,
    },
    /// A response or input was too large.
    #[error("{what} exceeds {limit} bytes")]
    TooLarge { what: String, limit: u64 },
    /// Malformed input (JSON, media type, reference).
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// Local file access (layouts).
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    /// A `WWW-Authenticate` challenge that cannot be parsed.
    #[error("{registry}: {source}")]
    Challenge {
        registry: String,
        source: crate::auth::ChallengeError,
    },
    /// Token authentication cannot proceed (bad token answer, insecure realm).
    #[error("{registry}: token authentication: {reason}")]
    Auth { registry: String, reason: String },
    /// A protocol violation by the registry (missing headers...).
    #[error("{registry}: protocol error: {reason}")]
    Protocol { registry: String, reason: String },
}

/// The one mapping from backend errors to core errors.
pub(crate) fn to_core(e: OciError) -> Error {
    match e {
        OciError::Connect { registry, source } => {
            Error::unavailable(format!("{registry}: {}", describe(&source)))
        }
        OciError::Status {
            registry,
            what,
            status,
            body,
        } => {
            let msg = format!("{registry}: {what}: HTTP {status}: {}", short(&body));
            match status {
                404 => Error::not_found(msg),
                401 | 403 => Error::permission_denied(msg),
                408 | 429 | 500..=599 => Error::unavailable(msg),
                400 | 413 | 415 | 422 => ValidationError::malformed("registry request", msg).into(),
                _ => Error::backend("oci", msg, false),
            }
        }
        OciError::Tampered {
            what,
            expected,
            actual,
        } => Error::tampered(what, expected, actual),
        OciError::TooLarge { what, limit } => {
            ValidationError::malformed(what, format!("larger than the {limit}-byte limit")).into()
        }
        OciError::Invalid(v) => Error::InvalidInput(v),
        OciError::Io { what, source } => {
            if source.kind() == std::io::ErrorKind::NotFound {
                Error::not_found(format!("{what}: {source}"))
            } else {
                ValidationError::malformed(what, source).into()
            }
        }
        OciError::Challenge { registry, source } => {
            Error::backend("oci", format!("{registry}: {source}"), false)
        }
        OciError::Auth { registry, reason } => Error::backend(
            "oci",
            format!("{registry}: token authentication: {reason}"),
            false,
        ),
        OciError::Protocol { registry, reason } => {
            Error::backend("oci", format!("{registry}: {reason}"), true)
        }
    }
}

impl From<OciError> for Error {
    fn from(e: OciError) -> Self {
        to_core(e)
    }
}

fn describe(e: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

fn short(body: &str) -> String {
    body.chars().take(300).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16) -> Error {
        to_core(OciError::Status {
            registry: "r".into(),
            what: "GET x".into(),
            status: code,
            body: String::new(),
        })
    }

    #[test]
    fn statuses_map_to_semantic_errors() {
        assert_eq!(status(404).kind(), "not_found");
        assert_eq!(status(401).kind(), "permission_denied");
        assert_eq!(status(403).kind(), "permission_denied");
        assert_eq!(status(503).kind(), "unavailable");
        assert_eq!(status(500).kind(), "unavailable");
        assert_eq!(status(400).kind(), "invalid_input");
        assert_eq!(status(418).kind(), "backend");
        assert_eq!(
            to_core(OciError::TooLarge {
                what: "manifest".into(),
                limit: 1
            })
            .kind(),
            "invalid_input"
        );
    }
}
