//! The private error of the OCI backend and its one mapping to [`br2k_core::Error`].

use br2k_core::{Error, ValidationError};
use oci_client::errors::{DigestError, OciDistributionError, OciErrorCode};

/// What went wrong talking to a registry.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OciError {
    /// Could not connect, or the connection broke / timed out.
    #[error("{registry}: connection failed: {source}")]
    Connect {
        registry: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// An `oci_client` operation failed (classified by [`classify`]).
    #[error("{registry}: {what}: {source}")]
    Client {
        registry: String,
        what: String,
        source: OciDistributionError,
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
        source: crate::challenge::ChallengeError,
    },
    /// Token authentication cannot proceed (bad token answer, insecure realm).
    #[error("{registry}: token authentication: {reason}")]
    Auth { registry: String, reason: String },
}

impl OciError {
    /// Whether the registry refused the request's credentials (HTTP 401), so that a
    /// fresh token may help.
    pub(crate) fn is_unauthorized(&self) -> bool {
        match self {
            OciError::Status { status, .. } => *status == 401,
            OciError::Client { source, .. } => matches!(classify(source), Class::Status(401)),
            _ => false,
        }
    }
}

/// What an [`OciDistributionError`] means for br2k.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Class {
    /// An HTTP status (known or implied by the registry's error code).
    Status(u16),
    /// The registry's error envelope names no status br2k knows: not retryable.
    Refused,
    /// The connection failed or broke (connect, timeout, reset, body).
    Connection,
    /// Bytes that do not match their digest.
    Tampered,
    /// A malformed answer or input (JSON, media type, schema version, empty push).
    Invalid,
    /// The registry broke the protocol (missing `Location`, unexpected 2xx).
    Protocol,
    /// Anything else (URL building, client setup): not retryable.
    Other,
}

/// The io error carries a digest verification failure of oci-client's verifying stream.
pub(crate) fn is_digest_io(e: &std::io::Error) -> bool {
    e.get_ref()
        .is_some_and(|inner| inner.downcast_ref::<DigestError>().is_some())
}

/// Classifies an oci-client error. Distribution answers 4xx with an error envelope
/// (oci-client keeps the envelope, not the status): its codes imply the status.
pub(crate) fn classify(e: &OciDistributionError) -> Class {
    use OciDistributionError as E;
    match e {
        E::RequestError(r) => match r.status() {
            Some(s) => Class::Status(s.as_u16()),
            None if r.is_builder() => Class::Other,
            None => Class::Connection,
        },
        E::ServerError { code, .. } => Class::Status(*code),
        E::UnauthorizedError { .. } => Class::Status(401),
        E::AuthenticationFailure(_) => Class::Status(401),
        E::RegistryError { envelope, .. } => {
            let code = envelope.errors.first().map(|x| &x.code);
            match code {
                Some(
                    OciErrorCode::BlobUnknown
                    | OciErrorCode::BlobUploadUnknown
                    | OciErrorCode::ManifestUnknown
                    | OciErrorCode::ManifestBlobUnknown
                    | OciErrorCode::NameUnknown
                    | OciErrorCode::NotFound,
                ) => Class::Status(404),
                Some(OciErrorCode::Unauthorized) => Class::Status(401),
                Some(OciErrorCode::Denied) => Class::Status(403),
                Some(OciErrorCode::Toomanyrequests) => Class::Status(429),
                Some(
                    OciErrorCode::DigestInvalid
                    | OciErrorCode::ManifestInvalid
                    | OciErrorCode::ManifestUnverified
                    | OciErrorCode::NameInvalid
                    | OciErrorCode::SizeInvalid
                    | OciErrorCode::TagInvalid
                    | OciErrorCode::BlobUploadInvalid,
                ) => Class::Status(400),
                _ => Class::Refused,
            }
        }
        E::DigestError(DigestError::VerificationError { .. }) => Class::Tampered,
        E::DigestError(_) => Class::Invalid,
        E::IoError(io) if is_digest_io(io) => Class::Tampered,
        E::IoError(_) => Class::Connection,
        E::JsonError(_)
        | E::ManifestEncodingError(_)
        | E::ManifestParsingError(_)
        | E::VersionedParsingError(_)
        | E::UnsupportedMediaTypeError(_)
        | E::UnsupportedSchemaVersionError(_)
        | E::IncompatibleLayerMediaTypeError(_)
        | E::PushNoDataError
        | E::PushLayerNoDataError
        | E::PullNoLayersError => Class::Invalid,
        E::SpecViolationError(_)
        | E::RegistryNoLocationError
        | E::RegistryNoDigestError
        | E::HeaderValueError(_)
        | E::RegistryTokenDecodeError(_) => Class::Protocol,
        E::ImageManifestNotFoundError(_) => Class::Status(404),
        _ => Class::Other,
    }
}

fn status_error(msg: String, status: u16) -> Error {
    match status {
        404 => Error::not_found(msg),
        401 | 403 => Error::permission_denied(msg),
        408 | 429 | 500..=599 => Error::unavailable(msg),
        400 | 413 | 415 | 422 => ValidationError::malformed("registry request", msg).into(),
        _ => Error::backend("oci", msg, false),
    }
}

/// The one mapping from backend errors to core errors.
pub(crate) fn to_core(e: OciError) -> Error {
    match e {
        OciError::Connect { registry, source } => {
            Error::unavailable(format!("{registry}: {}", describe(&*source)))
        }
        OciError::Client {
            registry,
            what,
            source,
        } => {
            let msg = format!("{registry}: {what}: {}", short(&describe(&source)));
            match classify(&source) {
                Class::Status(s) => status_error(msg, s),
                Class::Connection => Error::unavailable(msg),
                Class::Tampered => match source {
                    OciDistributionError::DigestError(DigestError::VerificationError {
                        expected,
                        actual,
                    }) => Error::tampered(format!("{registry}: {what}"), expected, actual),
                    _ => Error::tampered(msg, "content matching its digest", "other bytes"),
                },
                Class::Invalid => ValidationError::malformed("registry answer", msg).into(),
                Class::Protocol => Error::backend("oci", msg, true),
                Class::Refused | Class::Other => Error::backend("oci", msg, false),
            }
        }
        OciError::Status {
            registry,
            what,
            status,
            body,
        } => status_error(
            format!("{registry}: {what}: HTTP {status}: {}", short(&body)),
            status,
        ),
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
    }
}

impl From<OciError> for Error {
    fn from(e: OciError) -> Self {
        to_core(e)
    }
}

fn describe(e: &(dyn std::error::Error + 'static)) -> String {
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
        assert_eq!(status(404).kind(), br2k_core::ErrorKind::NotFound);
        assert_eq!(status(401).kind(), br2k_core::ErrorKind::PermissionDenied);
        assert_eq!(status(403).kind(), br2k_core::ErrorKind::PermissionDenied);
        assert_eq!(status(503).kind(), br2k_core::ErrorKind::Unavailable);
        assert_eq!(status(500).kind(), br2k_core::ErrorKind::Unavailable);
        assert_eq!(status(400).kind(), br2k_core::ErrorKind::InvalidInput);
        assert_eq!(status(418).kind(), br2k_core::ErrorKind::Backend);
        assert_eq!(
            to_core(OciError::TooLarge {
                what: "manifest".into(),
                limit: 1
            })
            .kind(),
            br2k_core::ErrorKind::InvalidInput
        );
    }

    fn client(source: OciDistributionError) -> Error {
        to_core(OciError::Client {
            registry: "r".into(),
            what: "GET blob x".into(),
            source,
        })
    }

    fn envelope(code: &str) -> OciDistributionError {
        let body = format!(r#"{{"errors":[{{"code":"{code}","message":"m"}}]}}"#);
        OciDistributionError::RegistryError {
            envelope: serde_json::from_str(&body).unwrap(),
            url: "http://r/v2/x".into(),
        }
    }

    #[test]
    fn oci_client_errors_map_to_semantic_errors() {
        for (code, kind) in [
            ("BLOB_UNKNOWN", br2k_core::ErrorKind::NotFound),
            ("MANIFEST_UNKNOWN", br2k_core::ErrorKind::NotFound),
            ("NAME_UNKNOWN", br2k_core::ErrorKind::NotFound),
            ("UNAUTHORIZED", br2k_core::ErrorKind::PermissionDenied),
            ("DENIED", br2k_core::ErrorKind::PermissionDenied),
            ("TOOMANYREQUESTS", br2k_core::ErrorKind::Unavailable),
            ("DIGEST_INVALID", br2k_core::ErrorKind::InvalidInput),
            ("MANIFEST_INVALID", br2k_core::ErrorKind::InvalidInput),
            ("UNSUPPORTED", br2k_core::ErrorKind::Backend),
        ] {
            assert_eq!(client(envelope(code)).kind(), kind, "{code}");
        }
        let server = |code| OciDistributionError::ServerError {
            code,
            url: "http://r/v2/x".into(),
            message: String::new(),
        };
        assert_eq!(
            client(server(503)).kind(),
            br2k_core::ErrorKind::Unavailable
        );
        assert_eq!(client(server(404)).kind(), br2k_core::ErrorKind::NotFound);
        assert_eq!(
            client(server(401)).kind(),
            br2k_core::ErrorKind::PermissionDenied
        );
        let unauthorized = OciDistributionError::UnauthorizedError {
            url: "http://r/v2/x".into(),
        };
        assert!(
            OciError::Client {
                registry: "r".into(),
                what: "x".into(),
                source: unauthorized,
            }
            .is_unauthorized()
        );
        let e = client(
            DigestError::VerificationError {
                expected: "sha256:aa".into(),
                actual: "sha256:bb".into(),
            }
            .into(),
        );
        assert!(matches!(e, Error::Tampered { .. }), "{e}");
        // oci-client's verifying download stream fails with an io error around it.
        let io = std::io::Error::other(DigestError::VerificationError {
            expected: "sha256:aa".into(),
            actual: "sha256:bb".into(),
        });
        assert!(is_digest_io(&io));
        assert_eq!(
            client(OciDistributionError::IoError(io)).kind(),
            br2k_core::ErrorKind::Tampered
        );
        let broken = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert!(!is_digest_io(&broken));
        let e = client(OciDistributionError::IoError(broken));
        assert_eq!(e.kind(), br2k_core::ErrorKind::Unavailable);
        assert!(e.is_retryable());
        assert_eq!(
            client(OciDistributionError::ManifestParsingError("x".into())).kind(),
            br2k_core::ErrorKind::InvalidInput
        );
    }
}
