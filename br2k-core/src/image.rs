//! Image references: `registry/repository[:tag][@sha256:...]`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{ValidationError, truncate};

/// Registry used when a reference names none (as Docker does).
pub const DEFAULT_REGISTRY: &str = "docker.io";

/// A repository path inside a registry, e.g. `team/ledger`.
///
/// Components are lowercase alphanumerics joined by `.`, `_`, `__` or runs of `-`,
/// separated by `/`; at most 255 characters.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Repository(String);

impl Repository {
    /// Validates and wraps a repository path.
    pub fn new(value: impl AsRef<str>) -> Result<Self, ValidationError> {
        let value = value.as_ref();
        let err = |reason| ValidationError::ImageRef {
            value: truncate(value),
            reason,
        };
        if value.is_empty() {
            return Err(err("repository must not be empty"));
        }
        if value.len() > 255 {
            return Err(err("repository must be at most 255 characters"));
        }
        for component in value.split('/') {
            if !valid_path_component(component) {
                return Err(err(
                    "repository components must be lowercase alphanumerics separated by '.', '_', '__' or '-'",
                ));
            }
        }
        Ok(Self(value.to_owned()))
    }

    /// The path as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn valid_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        // a separator run: '.', '_', '__', or one or more '-'
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || i >= b.len() || !is_alnum(b[i]) {
            return false;
        }
    }
    true
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

fn valid_registry(host: &str) -> bool {
    let (name, port) = match host.rsplit_once(':') {
        Some((n, p)) => (n, Some(p)),
        None => (host, None),
    };
    if let Some(p) = port
        && (p.is_empty()
            || p.len() > 5
            || !p.bytes().all(|b| b.is_ascii_digit())
            || p.parse::<u32>().map_or(true, |n| n > 65535))
    {
        return false;
    }
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b.len() <= 63
                && b[0].is_ascii_alphanumeric()
                && b[b.len() - 1].is_ascii_alphanumeric()
                && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        })
}

pub(crate) fn valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

impl fmt::Display for Repository {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Repository {
    type Error = ValidationError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<Repository> for String {
    fn from(value: Repository) -> Self {
        value.0
    }
}

/// A reference to an image: registry host, repository, optional tag, optional digest.
///
/// Anything deployed must carry a digest ([`ImageRef::require_digest`]); the tag is
/// informational once the digest is known.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ImageRef {
    registry: String,
    repository: Repository,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl ImageRef {
    /// Parses `[registry/]repository[:tag][@sha256:<hex>]`.
    ///
    /// The first path component is the registry when it contains `.` or `:` or is
    /// `localhost`; otherwise the registry is [`DEFAULT_REGISTRY`].
    pub fn parse(value: &str) -> Result<Self, ValidationError> {
        let err = |reason| ValidationError::ImageRef {
            value: truncate(value),
            reason,
        };
        if value.is_empty() {
            return Err(err("must not be empty"));
        }
        if value.len() > 512 {
            return Err(err("must be at most 512 characters"));
        }
        let (name_tag, digest) = match value.split_once('@') {
            Some((n, d)) => (
                n,
                Some(
                    Digest::parse(d)
                        .map_err(|_| err("digest must be sha256:<64 lowercase hex>"))?,
                ),
            ),
            None => (value, None),
        };
        // A tag is after the last ':' that follows the last '/'.
        let last_slash = name_tag.rfind('/');
        let (name, tag) = match name_tag.rfind(':') {
            Some(colon) if last_slash.is_none_or(|s| colon > s) => {
                (&name_tag[..colon], Some(&name_tag[colon + 1..]))
            }
            _ => (name_tag, None),
        };
        if let Some(t) = tag
            && !valid_tag(t)
        {
            return Err(err("tag must match [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"));
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                if !valid_registry(first) {
                    return Err(err("invalid registry host"));
                }
                (first.to_owned(), rest.to_owned())
            }
            _ => {
                let path = if name.contains('/') {
                    name.to_owned()
                } else {
                    format!("library/{name}")
                };
                (DEFAULT_REGISTRY.to_owned(), path)
            }
        };
        let repository = Repository::new(&path).map_err(|_| {
            err("repository components must be lowercase alphanumerics separated by '.', '_', '__' or '-'")
        })?;
        Ok(Self {
            registry,
            repository,
            tag: tag.map(str::to_owned),
            digest,
        })
    }

    /// Builds a reference from parts. The registry host must contain `.` or `:` or be
    /// `localhost`, so that the written form parses back to the same reference.
    pub fn new(
        registry: impl AsRef<str>,
        repository: Repository,
        tag: Option<&str>,
        digest: Option<Digest>,
    ) -> Result<Self, ValidationError> {
        let registry = registry.as_ref();
        if !valid_registry(registry) {
            return Err(ValidationError::ImageRef {
                value: truncate(registry),
                reason: "invalid registry host",
            });
        }
        // Otherwise the written form would read back as a Docker Hub repository path.
        if !(registry.contains('.') || registry.contains(':') || registry == "localhost") {
            return Err(ValidationError::ImageRef {
                value: truncate(registry),
                reason: "registry host must contain '.' or ':' or be localhost",
            });
        }
        if let Some(t) = tag
            && !valid_tag(t)
        {
            return Err(ValidationError::ImageRef {
                value: truncate(t),
                reason: "tag must match [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}",
            });
        }
        Ok(Self {
            registry: registry.to_owned(),
            repository,
            tag: tag.map(str::to_owned),
            digest,
        })
    }

    /// Registry host (with port if any).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// Repository path.
    pub fn repository(&self) -> &Repository {
        &self.repository
    }

    /// Tag, if any.
    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// Digest, if pinned.
    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// The digest, or a typed error when the reference is not pinned.
    pub fn require_digest(&self) -> Result<&Digest, ValidationError> {
        self.digest
            .as_ref()
            .ok_or_else(|| ValidationError::ImageRef {
                value: truncate(&self.to_string()),
                reason: "a deployed image must be pinned by digest (@sha256:...)",
            })
    }

    /// The same reference pinned to `digest`.
    pub fn with_digest(&self, digest: Digest) -> Self {
        Self {
            digest: Some(digest),
            ..self.clone()
        }
    }

    /// The same repository and digest in another registry (a mirror).
    pub fn with_registry(&self, registry: &str) -> Result<Self, ValidationError> {
        Self::new(
            registry,
            self.repository.clone(),
            self.tag.as_deref(),
            self.digest,
        )
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl FromStr for ImageRef {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl TryFrom<String> for ImageRef {
    type Error = ValidationError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<ImageRef> for String {
    fn from(value: ImageRef) -> Self {
        value.to_string()
    }
}
