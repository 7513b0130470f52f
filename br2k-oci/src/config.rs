//! Connection settings of one registry: host, transport, credentials, platform.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use br2k_core::{Digest, Error, ValidationError};

/// A secret string (password or token). Its `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// Reads a secret from environment variable `var`.
    pub fn from_env(var: &str) -> Result<Self, Error> {
        std::env::var(var).map(Self).map_err(|_| {
            ValidationError::malformed(
                "credentials",
                format!("environment variable {var} is not set"),
            )
            .into()
        })
    }

    /// Reads a secret from a file (trailing newline removed).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, Error> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            ValidationError::malformed(
                "credentials",
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        Ok(Self(text.trim_end_matches(['\n', '\r']).to_owned()))
    }

    /// The secret value. Only for building request headers.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// How requests authenticate (see the crate documentation, "Authentication").
///
/// With `Anonymous` and `Basic`, registry token authentication (a `401` with a
/// `Bearer realm=...` challenge) is handled automatically.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Auth {
    /// No credentials (anonymous tokens where the registry uses a token server).
    #[default]
    Anonymous,
    /// A user name and password: HTTP basic authentication to the registry, or to
    /// its token server when the registry asks for bearer tokens.
    Basic {
        /// User name.
        username: String,
        /// Password.
        password: Secret,
    },
    /// A static bearer token (`Authorization: Bearer ...`), sent as is on every
    /// request and never refreshed.
    Bearer(Secret),
}

/// The platform picked from a multi-platform image index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlatformSpec {
    /// Operating system, e.g. `linux`.
    pub os: String,
    /// CPU architecture, e.g. `amd64`.
    pub architecture: String,
    /// Optional variant, e.g. `v8`.
    pub variant: Option<String>,
}

impl Default for PlatformSpec {
    fn default() -> Self {
        Self {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        }
    }
}

impl PlatformSpec {
    /// Parses `os/arch[/variant]`.
    pub fn parse(value: &str) -> Result<Self, ValidationError> {
        let parts: Vec<&str> = value.split('/').collect();
        let bad = || {
            ValidationError::malformed("platform", format!("{value:?} is not os/arch[/variant]"))
        };
        if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.is_empty()) {
            return Err(bad());
        }
        Ok(Self {
            os: parts[0].into(),
            architecture: parts[1].into(),
            variant: parts.get(2).map(|v| (*v).to_owned()),
        })
    }
}

impl fmt::Display for PlatformSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// One step of a blob transfer into a store, for progress displays (see
/// [`OciConfig::with_progress`]). Reported by the store that receives the blob: the
/// target of a push or of a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BlobProgress {
    /// The blob starts moving (`size` bytes).
    Started {
        /// Blob digest.
        digest: Digest,
        /// Size in bytes.
        size: u64,
    },
    /// `bytes` more bytes of a streamed copy went through.
    Bytes {
        /// Blob digest.
        digest: Digest,
        /// Bytes since the last event.
        bytes: u64,
    },
    /// The store already had the blob (or mounted it from another repository).
    Skipped {
        /// Blob digest.
        digest: Digest,
        /// Size in bytes.
        size: u64,
    },
    /// The blob is stored.
    Done {
        /// Blob digest.
        digest: Digest,
        /// Size in bytes.
        size: u64,
    },
}

/// A receiver of [`BlobProgress`] events.
#[derive(Clone)]
pub(crate) struct ProgressSink(pub(crate) Arc<dyn Fn(BlobProgress) + Send + Sync>);

impl std::fmt::Debug for ProgressSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<progress callback>")
    }
}

/// Settings of an [`crate::OciImageStore`]; build with [`OciConfig::new`] and `with_*`.
#[derive(Clone, Debug)]
pub struct OciConfig {
    pub(crate) registry: String,
    pub(crate) insecure: bool,
    pub(crate) auth: Auth,
    pub(crate) platform: PlatformSpec,
    pub(crate) concurrency: usize,
    pub(crate) connect_timeout: std::time::Duration,
    pub(crate) read_timeout: std::time::Duration,
    pub(crate) progress: Option<ProgressSink>,
}

impl OciConfig {
    /// Settings for `registry` (`host[:port]`): HTTPS, anonymous, linux/amd64,
    /// 6 parallel blob transfers.
    pub fn new(registry: impl Into<String>) -> Result<Self, Error> {
        let registry = registry.into();
        // Validate the host through an image reference.
        br2k_core::ImageRef::new(&registry, br2k_core::Repository::new("x")?, None, None)?;
        Ok(Self {
            registry,
            insecure: false,
            auth: Auth::Anonymous,
            platform: PlatformSpec::default(),
            concurrency: 6,
            connect_timeout: std::time::Duration::from_secs(5),
            read_timeout: std::time::Duration::from_secs(60),
            progress: None,
        })
    }

    /// Marks the registry as plain HTTP (no TLS). Only for registries explicitly
    /// known to be insecure, such as loopback test registries.
    pub fn with_insecure(mut self, insecure: bool) -> Self {
        self.insecure = insecure;
        self
    }

    /// Sets the credentials.
    pub fn with_auth(mut self, auth: Auth) -> Self {
        self.auth = auth;
        self
    }

    /// Reads credentials from the environment: `<PREFIX>_TOKEN` or `<PREFIX>_TOKEN_FILE`
    /// (bearer), else `<PREFIX>_USERNAME` with `<PREFIX>_PASSWORD` or
    /// `<PREFIX>_PASSWORD_FILE` (basic), else anonymous.
    pub fn with_auth_from_env(mut self, prefix: &str) -> Result<Self, Error> {
        let var = |s: &str| format!("{prefix}_{s}");
        self.auth = if std::env::var_os(var("TOKEN")).is_some() {
            Auth::Bearer(Secret::from_env(&var("TOKEN"))?)
        } else if let Some(path) = std::env::var_os(var("TOKEN_FILE")) {
            Auth::Bearer(Secret::from_file(path)?)
        } else if let Ok(username) = std::env::var(var("USERNAME")) {
            let password = match std::env::var_os(var("PASSWORD_FILE")) {
                Some(path) => Secret::from_file(path)?,
                None => Secret::from_env(&var("PASSWORD"))?,
            };
            Auth::Basic { username, password }
        } else {
            Auth::Anonymous
        };
        Ok(self)
    }

    /// Sets the platform picked from image indexes.
    pub fn with_platform(mut self, platform: PlatformSpec) -> Self {
        self.platform = platform;
        self
    }

    /// Sets how many blobs are transferred at once (at least 1).
    pub fn with_concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// Sets the TCP connect timeout.
    pub fn with_connect_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Calls `progress` for every blob this store receives (pushes to it and copies
    /// into it): started, bytes (streamed copies), skipped, done. For progress bars;
    /// the callback must not block.
    pub fn with_progress(mut self, progress: Arc<dyn Fn(BlobProgress) + Send + Sync>) -> Self {
        self.progress = Some(ProgressSink(progress));
        self
    }

    /// Reports `event` to the progress callback, if any.
    pub(crate) fn report(&self, event: BlobProgress) {
        if let Some(p) = &self.progress {
            (p.0)(event);
        }
    }

    /// The registry host.
    pub fn registry(&self) -> &str {
        &self.registry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_redacts_secrets() {
        let cfg = OciConfig::new("127.0.0.1:5000")
            .unwrap()
            .with_auth(Auth::Basic {
                username: "u".into(),
                password: Secret::new("hunter2"),
            });
        let text = format!("{cfg:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("redacted"));
        let tok = format!("{:?}", Auth::Bearer(Secret::new("tok-123")));
        assert!(!tok.contains("tok-123"));
    }

    #[test]
    fn invalid_registry_rejected() {
        assert!(matches!(
            OciConfig::new("bad host!").unwrap_err(),
            Error::InvalidInput(_)
        ));
    }

    #[test]
    fn platform_parse() {
        let p = PlatformSpec::parse("linux/arm64/v8").unwrap();
        assert_eq!(p.variant.as_deref(), Some("v8"));
        assert_eq!(p.to_string(), "linux/arm64/v8");
        assert!(PlatformSpec::parse("linux").is_err());
        assert!(PlatformSpec::parse("linux//x").is_err());
    }
}
