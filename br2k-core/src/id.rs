//! Service identifiers.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{ValidationError, truncate};

/// The id of a service: a DNS-1123 label (1-63 characters of `a-z`, `0-9` and `-`,
/// starting and ending with a letter or digit), usable as a Kubernetes name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ServiceId(String);

impl ServiceId {
    /// Validates and wraps `value`.
    pub fn new(value: impl AsRef<str>) -> Result<Self, ValidationError> {
        let value = value.as_ref();
        let err = |reason| ValidationError::ServiceId {
            value: truncate(value),
            reason,
        };
        if value.is_empty() {
            return Err(err("must not be empty"));
        }
        if value.len() > 63 {
            return Err(err("must be at most 63 characters"));
        }
        if !value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(err("only lowercase letters, digits and '-' are allowed"));
        }
        if value.starts_with('-') || value.ends_with('-') {
            return Err(err("must start and end with a letter or digit"));
        }
        Ok(Self(value.to_owned()))
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ServiceId {
    type Err = ValidationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for ServiceId {
    type Error = ValidationError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<ServiceId> for String {
    fn from(value: ServiceId) -> Self {
        value.0
    }
}

impl AsRef<str> for ServiceId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}
