//! [`EtcdLogConfig`]: the settings of an [`crate::EtcdLog`] and their validation.

use std::time::Duration;

use br2k_core::{Result, ValidationError};

/// Settings of an [`EtcdLog`](crate::EtcdLog).
#[derive(Debug, Clone)]
pub struct EtcdLogConfig {
    /// etcd client endpoints (`http://127.0.0.1:2379`, ...).
    pub endpoints: Vec<String>,
    /// Namespace of this log: every key lives under `namespace/`.
    pub namespace: String,
    /// TTL of this client's lease (session): a crashed leader loses its leadership
    /// after at most this long (the election timeout). etcd rounds it up to whole
    /// seconds and to its own minimum.
    pub lease_ttl: Duration,
    /// Deadline of every unary etcd call (campaigns wait without one).
    pub request_timeout: Duration,
    /// Deadline for establishing a connection.
    pub connect_timeout: Duration,
    /// Largest value bytes put by one transaction: larger appends are staged in
    /// several transactions and committed by the last one. Keep it under etcd's
    /// `--max-request-bytes` (1.5 MiB by default).
    pub max_txn_bytes: usize,
}

impl EtcdLogConfig {
    /// Defaults: 5 s lease TTL, 5 s request timeout, 3 s connect timeout, 1 MB
    /// transactions.
    pub fn new(
        endpoints: impl IntoIterator<Item = impl Into<String>>,
        namespace: impl Into<String>,
    ) -> Self {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            namespace: namespace.into(),
            lease_ttl: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            max_txn_bytes: 1_000_000,
        }
    }

    /// Endpoints from `BR2K_ETCD_ENDPOINTS` (comma-separated), other settings default.
    pub fn from_env(namespace: impl Into<String>) -> Result<Self> {
        let raw = std::env::var("BR2K_ETCD_ENDPOINTS").map_err(|_| {
            ValidationError::malformed("BR2K_ETCD_ENDPOINTS", "is not set or not unicode")
        })?;
        Ok(Self::new(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>(),
            namespace,
        ))
    }

    /// Refuses settings the log cannot work with ([`br2k_core::Error::InvalidInput`]).
    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |what: &str, reason: &str| Err(ValidationError::malformed(what, reason).into());
        if self.endpoints.is_empty() {
            return bad("etcd endpoints", "none given");
        }
        let ns = &self.namespace;
        if ns.is_empty()
            || ns.len() > 200
            || ns.ends_with('/')
            || ns.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return bad(
                "etcd log namespace",
                "must be 1-200 bytes without whitespace or control characters, not ending in '/'",
            );
        }
        if self.lease_ttl < Duration::from_secs(1) {
            return bad("lease TTL", "must be at least 1 s");
        }
        if self.request_timeout.is_zero() || self.connect_timeout.is_zero() {
            return bad("etcd timeouts", "must be positive");
        }
        if self.max_txn_bytes < 64 * 1024 {
            return bad("max_txn_bytes", "must be at least 64 KiB");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use br2k_core::Error;

    use super::*;

    #[test]
    fn config_is_validated() {
        let ok = EtcdLogConfig::new(["http://127.0.0.1:2379"], "ns");
        assert!(ok.validate().is_ok());
        for ns in ["", "a b", "a/"] {
            let c = EtcdLogConfig::new(["http://127.0.0.1:2379"], ns);
            assert!(
                matches!(c.validate(), Err(Error::InvalidInput(_))),
                "{ns:?}"
            );
        }
        let none = EtcdLogConfig::new(Vec::<String>::new(), "ns");
        assert!(matches!(none.validate(), Err(Error::InvalidInput(_))));
    }
}
