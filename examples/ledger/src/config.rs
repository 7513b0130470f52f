//! Configuration of the `ledger` binary: command-line flags, falling back to
//! environment variables. Keys come from environment variables or files only (never
//! from flags, which other users can read in the process list) and are never logged.

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use alloy::primitives::Address;
use br2k_core::{Error, Result, ServiceId, ValidationError};

/// Flags (`--name value`) with environment fallbacks.
#[derive(Debug, Clone, Default)]
pub struct Args {
    flags: HashMap<String, String>,
    env: HashMap<String, String>,
}

fn bad(what: &str, reason: impl fmt::Display) -> Error {
    ValidationError::malformed(what, reason).into()
}

impl Args {
    /// Parses `--name value` pairs (and `--name=value`); `env` is the environment.
    pub fn parse(
        args: impl IntoIterator<Item = String>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self> {
        let mut flags = HashMap::new();
        let mut it = args.into_iter();
        while let Some(a) = it.next() {
            let Some(name) = a.strip_prefix("--") else {
                return Err(bad("arguments", format!("unexpected argument {a:?}")));
            };
            let (name, value) = match name.split_once('=') {
                Some((n, v)) => (n.to_owned(), v.to_owned()),
                None => {
                    let v = it
                        .next()
                        .ok_or_else(|| bad("arguments", format!("--{name} needs a value")))?;
                    (name.to_owned(), v)
                }
            };
            if name.contains("key") || name.contains("password") {
                return Err(bad(
                    "arguments",
                    format!("--{name}: pass secrets through the environment or a file"),
                ));
            }
            flags.insert(name, value);
        }
        Ok(Self {
            flags,
            env: env.into_iter().collect(),
        })
    }

    /// The flag `--name`, else the environment variable `var`.
    pub fn get(&self, name: &str, var: &str) -> Option<String> {
        self.flags
            .get(name)
            .or_else(|| self.env.get(var))
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }

    /// An environment variable.
    pub fn env(&self, var: &str) -> Option<String> {
        self.env
            .get(var)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }

    /// A secret from environment variable `var`, else from the file named by
    /// `<var>_FILE`.
    pub fn secret(&self, var: &str) -> Result<Option<Secret>> {
        if let Some(v) = self.env(var) {
            return Ok(Some(Secret(v)));
        }
        match self.env(&format!("{var}_FILE")) {
            Some(path) => std::fs::read_to_string(&path)
                .map(|s| Some(Secret(s.trim().to_owned())))
                .map_err(|e| bad("secret", format!("{var}_FILE: cannot read {path}: {e}"))),
            None => Ok(None),
        }
    }

    fn parsed<T: std::str::FromStr>(&self, name: &str, var: &str, default: T) -> Result<T>
    where
        T::Err: fmt::Display,
    {
        match self.get(name, var) {
            Some(v) => v.parse().map_err(|e| bad(name, format!("{v:?}: {e}"))),
            None => Ok(default),
        }
    }
}

/// A secret string: never printed.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    /// The value (only to build a signer).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Settings of `ledger serve`.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Address to listen on (`--listen`, `LEDGER_LISTEN`; default 127.0.0.1:8080).
    pub listen: SocketAddr,
    /// Advertised endpoint (`--endpoint`, `LEDGER_ENDPOINT`; default `http://<listen>`).
    pub endpoint: String,
    /// Service id in the registry (`--service`, `LEDGER_SERVICE`; default `ledger`).
    pub service: ServiceId,
    /// etcd endpoints (`--etcd`, `BR2K_ETCD_ENDPOINTS`, comma-separated).
    pub etcd: Vec<String>,
    /// Log namespace in etcd (`--namespace`, `LEDGER_NAMESPACE`; default
    /// `br2k-ledger-<service>`).
    pub namespace: String,
    /// Registry host of snapshots (`--oci-registry`, `LEDGER_OCI_REGISTRY`, else the
    /// first of `BR2K_OCI_REGISTRIES`).
    pub oci_registry: String,
    /// Plain HTTP to the registry (`--oci-insecure`, `LEDGER_OCI_INSECURE`; default
    /// true for loopback hosts only).
    pub oci_insecure: bool,
    /// Address of the `Settlement` contract (`--settlement`,
    /// `LEDGER_SETTLEMENT_ADDRESS`).
    pub settlement: Address,
    /// Key signing settlements (`LEDGER_SETTLER_KEY` or `LEDGER_SETTLER_KEY_FILE`).
    pub settler_key: Secret,
    /// Blocks that must hold a settlement before it counts as done
    /// (`--confirmations`, `LEDGER_SETTLEMENT_CONFIRMATIONS`; default
    /// [`crate::settle::DEFAULT_CONFIRMATIONS`]).
    pub settlement_confirmations: u64,
    /// Snapshot every this many entries (`--snapshot-every`, `LEDGER_SNAPSHOT_EVERY`;
    /// default 1000, 0 disables).
    pub snapshot_every: u64,
    /// Largest request body (`--max-body`, `LEDGER_MAX_BODY`; default 16384).
    pub max_body: usize,
    /// etcd lease TTL, i.e. the election timeout (`--lease-ttl-secs`,
    /// `LEDGER_LEASE_TTL_SECS`; default 5).
    pub lease_ttl: Duration,
    /// How long a request waits for commit and apply (`--request-timeout-ms`,
    /// `LEDGER_REQUEST_TIMEOUT_MS`; default 10000).
    pub request_timeout: Duration,
    /// The cluster this replica runs in (`--cluster`, `LEDGER_CLUSTER`): when set,
    /// the replica leads and settles only while its cluster holds the service's
    /// placement lease (whole-cluster failover).
    pub cluster: Option<String>,
}

impl ServeConfig {
    /// Reads the settings; a missing or malformed one is [`Error::InvalidInput`].
    pub fn from_args(a: &Args) -> Result<Self> {
        let listen: SocketAddr = a.parsed(
            "listen",
            "LEDGER_LISTEN",
            SocketAddr::from(([127, 0, 0, 1], 8080)),
        )?;
        let endpoint = a
            .get("endpoint", "LEDGER_ENDPOINT")
            .unwrap_or_else(|| format!("http://{listen}"));
        let service = ServiceId::new(
            a.get("service", "LEDGER_SERVICE")
                .unwrap_or_else(|| "ledger".into()),
        )?;
        let etcd: Vec<String> = a
            .get("etcd", "BR2K_ETCD_ENDPOINTS")
            .ok_or_else(|| bad("etcd endpoints", "set --etcd or BR2K_ETCD_ENDPOINTS"))?
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        let namespace = a
            .get("namespace", "LEDGER_NAMESPACE")
            .unwrap_or_else(|| format!("br2k-ledger-{}", service.as_str()));
        let oci_registry = a
            .get("oci-registry", "LEDGER_OCI_REGISTRY")
            .or_else(|| {
                a.env("BR2K_OCI_REGISTRIES")
                    .and_then(|v| v.split(',').next().map(|s| s.trim().to_owned()))
            })
            .ok_or_else(|| {
                bad(
                    "OCI registry",
                    "set --oci-registry, LEDGER_OCI_REGISTRY or BR2K_OCI_REGISTRIES",
                )
            })?;
        let loopback = oci_registry.starts_with("127.") || oci_registry.starts_with("localhost");
        let oci_insecure = a.parsed("oci-insecure", "LEDGER_OCI_INSECURE", loopback)?;
        let settlement = a
            .get("settlement", "LEDGER_SETTLEMENT_ADDRESS")
            .ok_or_else(|| bad("settlement address", "set LEDGER_SETTLEMENT_ADDRESS"))?
            .parse()
            .map_err(|e| bad("settlement address", e))?;
        let settler_key = a.secret("LEDGER_SETTLER_KEY")?.ok_or_else(|| {
            bad(
                "settler key",
                "set LEDGER_SETTLER_KEY or LEDGER_SETTLER_KEY_FILE",
            )
        })?;
        Ok(Self {
            listen,
            endpoint,
            service,
            etcd,
            namespace,
            oci_registry,
            oci_insecure,
            settlement,
            settler_key,
            settlement_confirmations: a
                .parsed(
                    "confirmations",
                    "LEDGER_SETTLEMENT_CONFIRMATIONS",
                    crate::settle::DEFAULT_CONFIRMATIONS,
                )?
                .max(1),
            snapshot_every: a.parsed("snapshot-every", "LEDGER_SNAPSHOT_EVERY", 1000)?,
            max_body: a.parsed("max-body", "LEDGER_MAX_BODY", 16 * 1024)?,
            lease_ttl: Duration::from_secs(a.parsed(
                "lease-ttl-secs",
                "LEDGER_LEASE_TTL_SECS",
                5,
            )?),
            request_timeout: Duration::from_millis(a.parsed(
                "request-timeout-ms",
                "LEDGER_REQUEST_TIMEOUT_MS",
                10_000,
            )?),
            cluster: match a.get("cluster", "LEDGER_CLUSTER") {
                Some(c) => {
                    br2k_core::check_cluster_name(&c)?;
                    Some(c)
                }
                None => None,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318";

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn flags_override_env_and_keys_stay_hidden() {
        let a = Args::parse(
            args(&["--listen", "127.0.0.1:9000", "--service=ledger-a"]),
            env(&[
                ("LEDGER_LISTEN", "127.0.0.1:1"),
                (
                    "BR2K_ETCD_ENDPOINTS",
                    "http://127.0.0.1:2379, http://127.0.0.1:2380",
                ),
                ("BR2K_OCI_REGISTRIES", "127.0.0.1:5000,127.0.0.1:5001"),
                (
                    "LEDGER_SETTLEMENT_ADDRESS",
                    "0x5FbDB2315678afecb367f032d93F642f64180aa3",
                ),
                ("LEDGER_SETTLER_KEY", KEY),
            ]),
        )
        .unwrap();
        let c = ServeConfig::from_args(&a).unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.endpoint, "http://127.0.0.1:9000");
        assert_eq!(c.service.as_str(), "ledger-a");
        assert_eq!(c.etcd.len(), 2);
        assert_eq!(c.oci_registry, "127.0.0.1:5000");
        assert!(c.oci_insecure);
        assert!(!format!("{c:?}").contains(KEY));
    }

    #[test]
    fn bad_input_is_refused() {
        assert!(Args::parse(args(&["stray"]), env(&[])).is_err());
        assert!(Args::parse(args(&["--listen"]), env(&[])).is_err());
        assert!(Args::parse(args(&["--settler-key", KEY]), env(&[])).is_err());
        let a = Args::parse(args(&["--listen", "nope"]), env(&[])).unwrap();
        let e = ServeConfig::from_args(&a).unwrap_err();
        assert_eq!(e.kind(), br2k_core::ErrorKind::InvalidInput);
        let a = Args::parse(
            args(&[]),
            env(&[
                ("BR2K_ETCD_ENDPOINTS", "http://127.0.0.1:2379"),
                ("BR2K_OCI_REGISTRIES", "127.0.0.1:5000"),
                ("LEDGER_SETTLEMENT_ADDRESS", "0x12"),
                ("LEDGER_SETTLER_KEY", KEY),
            ]),
        )
        .unwrap();
        assert!(ServeConfig::from_args(&a).is_err());
    }
}
