//! [`ChainConfig`]: where the registry is and who signs.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use alloy::primitives::Address;
use alloy::signers::local::PrivateKeySigner;
use alloy::transports::http::reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use zeroize::Zeroizing;

use crate::error::ChainError;

/// A secret string (a private key or a keystore password): zeroed when dropped, never
/// printed.
#[derive(Clone)]
pub(crate) struct Secret(SecretString);

impl Secret {
    fn new(value: String) -> Self {
        Self(SecretString::from(value))
    }

    fn expose(&self) -> &str {
        self.0.expose_secret()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Which block the record reads are made at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ReadDepth {
    /// The endpoints' latest block.
    #[default]
    Latest,
    /// `n` blocks below the latest block (`latest - n`).
    Behind(u64),
    /// The `safe` block of the endpoints.
    Safe,
    /// The `finalized` block of the endpoints.
    Finalized,
}

impl FromStr for ReadDepth {
    type Err = br2k_core::Error;

    /// Parses `latest`, `latest-N` (or just `N`), `safe` or `finalized`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        let bad = || {
            br2k_core::Error::from(br2k_core::ValidationError::malformed(
                "read depth",
                "expected latest, latest-N, safe or finalized",
            ))
        };
        match s.as_str() {
            "latest" => Ok(Self::Latest),
            "safe" => Ok(Self::Safe),
            "finalized" => Ok(Self::Finalized),
            other => {
                let n = other
                    .strip_prefix("latest")
                    .map(|r| r.trim().trim_start_matches('-').trim())
                    .unwrap_or(other);
                let n: u64 = n.parse().map_err(|_| bad())?;
                Ok(if n == 0 {
                    Self::Latest
                } else {
                    Self::Behind(n)
                })
            }
        }
    }
}

/// Where the signing key comes from.
#[derive(Clone, Debug)]
pub(crate) enum SignerSource {
    /// A hex private key (from an environment variable or a file).
    Key(Secret),
    /// An encrypted JSON keystore and its password.
    Keystore { path: PathBuf, password: Secret },
}

impl SignerSource {
    pub(crate) fn load(&self) -> Result<PrivateKeySigner, ChainError> {
        match self {
            SignerSource::Key(key) => PrivateKeySigner::from_str(key.expose().trim())
                .map_err(|_| ChainError::Config("private key is not 32 bytes of hex".into())),
            SignerSource::Keystore { path, password } => {
                PrivateKeySigner::decrypt_keystore(path, password.expose().trim()).map_err(|e| {
                    // The error names no key material, only the failure (bad MAC, I/O).
                    ChainError::Config(format!("keystore {}: {e}", path.display()))
                })
            }
        }
    }
}

/// How to reach the registry contract and which key signs.
///
/// `Debug` never shows the key or password, and shows RPC URLs without their path,
/// query or credentials (they may embed API keys).
#[derive(Clone)]
pub struct ChainConfig {
    /// JSON-RPC endpoints of the same chain, tried in order (reads fail over).
    pub rpc_urls: Vec<Url>,
    /// Address of a deployed registry (required by [`crate::ChainRegistry::connect`]).
    pub registry_address: Option<Address>,
    /// Chain id every endpoint must report. When `None`, it is learnt from the
    /// endpoints at connect (all that answer must agree) and pinned for the handle.
    pub expected_chain_id: Option<u64>,
    /// Block at which records are read (default: latest).
    pub read_depth: ReadDepth,
    /// Endpoints that must agree on the block hash at the read height and on the
    /// answer for a record read to be accepted (default 1: the first that answers).
    pub quorum: usize,
    /// Confirmations to wait for after each write (at least 1).
    pub confirmations: u64,
    /// Interval between receipt and event polls.
    pub poll_interval: Duration,
    /// Timeout of one RPC request to one endpoint.
    pub request_timeout: Duration,
    /// How long to wait for a write to be mined and confirmed.
    pub receipt_timeout: Duration,
    /// Most blocks scanned by one `eth_getLogs` of the change stream.
    pub log_block_range: u64,
    pub(crate) signer: Option<SignerSource>,
}

fn redact_url(url: &Url) -> String {
    format!(
        "{}://{}{}",
        url.scheme(),
        url.host_str().unwrap_or("?"),
        url.port().map(|p| format!(":{p}")).unwrap_or_default()
    )
}

impl fmt::Debug for ChainConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChainConfig")
            .field(
                "rpc_urls",
                &self.rpc_urls.iter().map(redact_url).collect::<Vec<_>>(),
            )
            .field("registry_address", &self.registry_address)
            .field("expected_chain_id", &self.expected_chain_id)
            .field("read_depth", &self.read_depth)
            .field("quorum", &self.quorum)
            .field("confirmations", &self.confirmations)
            .field("poll_interval", &self.poll_interval)
            .field("request_timeout", &self.request_timeout)
            .field("receipt_timeout", &self.receipt_timeout)
            .field("log_block_range", &self.log_block_range)
            .field("signer", &self.signer.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

pub(crate) fn endpoint_label(url: &Url) -> String {
    redact_url(url)
}

/// `text` (an error of the HTTP client, which quotes the request's URL) with every
/// secret part of `url` removed: the whole URL becomes its label, and its user,
/// password, path (API keys live there) and query are replaced wherever they appear.
pub(crate) fn scrub(text: &str, url: &Url) -> String {
    let full = url.as_str();
    let mut out = text
        .replace(full, &redact_url(url))
        .replace(full.trim_end_matches('/'), &redact_url(url));
    let path = url.path().trim_matches('/');
    let secrets = [
        url.username(),
        url.password().unwrap_or(""),
        path,
        url.query().unwrap_or(""),
    ];
    for s in secrets.into_iter().filter(|s| s.len() >= 3) {
        out = out.replace(s, "<redacted>");
    }
    out
}

fn read_secret_file(var: &str, path: &str) -> Result<Secret, ChainError> {
    std::fs::read_to_string(path)
        .map(|s| Secret::new(Zeroizing::new(s).trim().to_owned()))
        .map_err(|e| ChainError::Config(format!("{var}: cannot read {path}: {e}")))
}

impl ChainConfig {
    /// A configuration for `rpc_urls` with defaults: 1 confirmation, 50 ms polls,
    /// 10 s request timeout, 60 s receipt timeout, reads at `latest` with a quorum of 1,
    /// chain id learnt from the endpoints, no signer, no registry address.
    pub fn new(rpc_urls: Vec<Url>) -> Self {
        Self {
            rpc_urls,
            registry_address: None,
            expected_chain_id: None,
            read_depth: ReadDepth::Latest,
            quorum: 1,
            confirmations: 1,
            poll_interval: Duration::from_millis(50),
            request_timeout: Duration::from_secs(10),
            receipt_timeout: Duration::from_secs(60),
            log_block_range: 5_000,
            signer: None,
        }
    }

    /// Parses comma-separated RPC URLs.
    pub fn parse_urls(value: &str) -> br2k_core::Result<Vec<Url>> {
        value
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                Url::parse(s).map_err(|e| {
                    br2k_core::ValidationError::malformed("RPC URL", format!("{e}")).into()
                })
            })
            .collect()
    }

    /// Reads `BR2K_RPC_URLS` (comma-separated), `BR2K_REGISTRY_ADDRESS`,
    /// `BR2K_CHAIN_ID`, `BR2K_CONFIRMATIONS`, `BR2K_READ_DEPTH` (`latest`, `latest-N`,
    /// `safe`, `finalized`), `BR2K_QUORUM` and the signer from `BR2K_PRIVATE_KEY`,
    /// `BR2K_PRIVATE_KEY_FILE`, or `BR2K_KEYSTORE` with `BR2K_KEYSTORE_PASSWORD_FILE`.
    pub fn from_env() -> br2k_core::Result<Self> {
        Self::from_lookup(|name| std::env::var(name).ok()).map_err(Into::into)
    }

    fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ChainError> {
        let env = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let urls = env("BR2K_RPC_URLS")
            .ok_or_else(|| ChainError::Config("BR2K_RPC_URLS is not set".into()))?;
        let mut config = Self::new(Self::parse_urls(&urls).map_err(ChainError::Core)?);
        if config.rpc_urls.is_empty() {
            return Err(ChainError::Config("BR2K_RPC_URLS lists no URL".into()));
        }
        if let Some(a) = env("BR2K_REGISTRY_ADDRESS") {
            config.registry_address = Some(Address::from_str(a.trim()).map_err(|_| {
                ChainError::Config("BR2K_REGISTRY_ADDRESS is not an address".into())
            })?);
        }
        if let Some(c) = env("BR2K_CHAIN_ID") {
            config.expected_chain_id = Some(
                c.trim()
                    .parse()
                    .map_err(|_| ChainError::Config("BR2K_CHAIN_ID is not a number".into()))?,
            );
        }
        if let Some(c) = env("BR2K_CONFIRMATIONS") {
            config.confirmations = c
                .trim()
                .parse()
                .map_err(|_| ChainError::Config("BR2K_CONFIRMATIONS is not a number".into()))?;
        }
        if let Some(d) = env("BR2K_READ_DEPTH") {
            config.read_depth = d.parse().map_err(ChainError::Core)?;
        }
        if let Some(q) = env("BR2K_QUORUM") {
            config.quorum = q
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|&q| q >= 1)
                .ok_or_else(|| ChainError::Config("BR2K_QUORUM is not a number >= 1".into()))?;
        }
        if let Some(key) = lookup("BR2K_PRIVATE_KEY").map(Zeroizing::new)
            && !key.trim().is_empty()
        {
            config.signer = Some(SignerSource::Key(Secret::new(key.trim().to_owned())));
        } else if let Some(path) = env("BR2K_PRIVATE_KEY_FILE") {
            config.signer = Some(SignerSource::Key(read_secret_file(
                "BR2K_PRIVATE_KEY_FILE",
                &path,
            )?));
        } else if let Some(path) = env("BR2K_KEYSTORE") {
            let pw = env("BR2K_KEYSTORE_PASSWORD_FILE").ok_or_else(|| {
                ChainError::Config("BR2K_KEYSTORE needs BR2K_KEYSTORE_PASSWORD_FILE".into())
            })?;
            config.signer = Some(SignerSource::Keystore {
                path: path.into(),
                password: read_secret_file("BR2K_KEYSTORE_PASSWORD_FILE", &pw)?,
            });
        }
        Ok(config)
    }

    /// Signs with this hex private key (kept in memory only, never printed).
    pub fn with_private_key(mut self, key: impl Into<String>) -> Self {
        self.signer = Some(SignerSource::Key(Secret::new(key.into())));
        self
    }

    /// Signs with the key of an encrypted JSON keystore.
    pub fn with_keystore(mut self, path: impl Into<PathBuf>, password: impl Into<String>) -> Self {
        self.signer = Some(SignerSource::Keystore {
            path: path.into(),
            password: Secret::new(password.into()),
        });
        self
    }

    /// Signs with the key of an encrypted JSON keystore whose password is the content of
    /// `password_file` (trimmed); the password is read now and never printed.
    pub fn with_keystore_password_file(
        mut self,
        path: impl Into<PathBuf>,
        password_file: impl AsRef<std::path::Path>,
    ) -> br2k_core::Result<Self> {
        let pw = password_file.as_ref().to_string_lossy().into_owned();
        self.signer = Some(SignerSource::Keystore {
            path: path.into(),
            password: read_secret_file("keystore password file", &pw)?,
        });
        Ok(self)
    }

    /// Uses the registry deployed at `address`.
    pub fn with_registry(mut self, address: Address) -> Self {
        self.registry_address = Some(address);
        self
    }

    /// Requires the endpoints to report `chain_id`.
    pub fn with_chain_id(mut self, chain_id: u64) -> Self {
        self.expected_chain_id = Some(chain_id);
        self
    }

    /// Reads records at `depth`.
    pub fn with_read_depth(mut self, depth: ReadDepth) -> Self {
        self.read_depth = depth;
        self
    }

    /// Accepts a record read only when `quorum` endpoints (at least 1) agree on the
    /// block hash and the answer.
    pub fn with_quorum(mut self, quorum: usize) -> Self {
        self.quorum = quorum.max(1);
        self
    }

    /// Waits for `confirmations` blocks (at least 1) after each write.
    pub fn with_confirmations(mut self, confirmations: u64) -> Self {
        self.confirmations = confirmations.max(1);
        self
    }

    /// Sets the receipt and event poll interval.
    pub fn with_poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// Sets the timeout of one request to one endpoint.
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318";

    fn lookup<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn debug_redacts_keys_passwords_and_url_secrets() {
        let urls =
            ChainConfig::parse_urls("http://user:pw@127.0.0.1:8545/v3/apikey123?x=y").expect("url");
        let config = ChainConfig::new(urls).with_private_key(KEY);
        let dbg = format!("{config:?}");
        assert!(!dbg.contains(KEY), "{dbg}");
        for secret in ["pw", "apikey123", "user"] {
            assert!(!dbg.contains(secret), "{secret} in {dbg}");
        }
        assert!(dbg.contains("http://127.0.0.1:8545"), "{dbg}");
        let ks = ChainConfig::new(vec![]).with_keystore("/k.json", "hunter2");
        assert!(!format!("{ks:?}").contains("hunter2"));
    }

    #[test]
    fn from_env_reads_urls_address_chain_and_key() {
        let config = ChainConfig::from_lookup(lookup(&[
            ("BR2K_RPC_URLS", "http://127.0.0.1:1, http://127.0.0.1:2"),
            (
                "BR2K_REGISTRY_ADDRESS",
                "0x5FbDB2315678afecb367f032d93F642f64180aa3",
            ),
            ("BR2K_CHAIN_ID", "31337"),
            ("BR2K_CONFIRMATIONS", "2"),
            ("BR2K_PRIVATE_KEY", KEY),
        ]))
        .expect("config");
        assert_eq!(config.rpc_urls.len(), 2);
        assert_eq!(config.expected_chain_id, Some(31337));
        assert_eq!(config.confirmations, 2);
        assert!(config.registry_address.is_some());
        let signer = config.signer.as_ref().expect("signer").load().expect("key");
        assert_eq!(
            format!("{:#x}", signer.address()),
            "0x2c7536e3605d9c16a7a3d7b1898e529396a65c23"
        );
    }

    #[test]
    fn from_env_reads_the_read_depth_and_quorum() {
        let config = ChainConfig::from_lookup(lookup(&[
            ("BR2K_RPC_URLS", "http://127.0.0.1:1"),
            ("BR2K_READ_DEPTH", "latest-6"),
            ("BR2K_QUORUM", "2"),
        ]))
        .expect("config");
        assert_eq!(config.read_depth, ReadDepth::Behind(6));
        assert_eq!(config.quorum, 2);
        let defaults = ChainConfig::from_lookup(lookup(&[("BR2K_RPC_URLS", "http://127.0.0.1:1")]))
            .expect("defaults");
        assert_eq!(
            (defaults.read_depth, defaults.quorum),
            (ReadDepth::Latest, 1)
        );
        for (var, value) in [("BR2K_READ_DEPTH", "soon"), ("BR2K_QUORUM", "0")] {
            let e: br2k_core::Error = ChainConfig::from_lookup(lookup(&[
                ("BR2K_RPC_URLS", "http://127.0.0.1:1"),
                (var, value),
            ]))
            .expect_err("rejected")
            .into();
            assert_eq!(
                e.kind(),
                br2k_core::ErrorKind::InvalidInput,
                "{var}={value}: {e}"
            );
        }
    }

    #[test]
    fn from_env_reads_a_keystore_with_a_password_file() {
        let dir = std::env::temp_dir().join(format!("br2k-ks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let password = "correct horse battery staple";
        let key = hex::decode(KEY).expect("hex");
        PrivateKeySigner::encrypt_keystore(
            &dir,
            &mut rand08::thread_rng(),
            &key,
            password,
            Some("key.json"),
        )
        .expect("encrypt");
        let pw_file = dir.join("password");
        std::fs::write(&pw_file, format!("{password}\n")).expect("write");
        let ks = dir.join("key.json").to_string_lossy().into_owned();
        let pw = pw_file.to_string_lossy().into_owned();
        let config = ChainConfig::from_lookup(lookup(&[
            ("BR2K_RPC_URLS", "http://127.0.0.1:1"),
            ("BR2K_KEYSTORE", &ks),
            ("BR2K_KEYSTORE_PASSWORD_FILE", &pw),
        ]))
        .expect("config");
        let dbg = format!("{config:?}");
        assert!(!dbg.contains(password) && !dbg.contains(KEY), "{dbg}");
        let signer = config
            .signer
            .as_ref()
            .expect("signer")
            .load()
            .expect("decrypt");
        assert_eq!(
            format!("{:#x}", signer.address()),
            "0x2c7536e3605d9c16a7a3d7b1898e529396a65c23"
        );

        // Without a password file, or with a wrong password: typed errors naming no secret.
        let e: br2k_core::Error = ChainConfig::from_lookup(lookup(&[
            ("BR2K_RPC_URLS", "http://h:1"),
            ("BR2K_KEYSTORE", &ks),
        ]))
        .expect_err("needs a password file")
        .into();
        assert_eq!(e.kind(), br2k_core::ErrorKind::InvalidInput, "{e}");
        let wrong = ChainConfig::new(vec![]).with_keystore(&ks, "wrong password");
        let e: br2k_core::Error = wrong
            .signer
            .as_ref()
            .expect("s")
            .load()
            .expect_err("wrong password")
            .into();
        assert_eq!(e.kind(), br2k_core::ErrorKind::InvalidInput, "{e}");
        assert!(!e.to_string().contains("wrong password"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn from_env_reads_a_key_file_and_rejects_bad_input() {
        let path = std::env::temp_dir().join(format!("br2k-key-{}", std::process::id()));
        std::fs::write(&path, format!("{KEY}\n")).expect("write");
        let p = path.to_string_lossy().to_string();
        let config = ChainConfig::from_lookup(lookup(&[
            ("BR2K_RPC_URLS", "http://127.0.0.1:1"),
            ("BR2K_PRIVATE_KEY_FILE", &p),
        ]))
        .expect("config");
        config
            .signer
            .as_ref()
            .expect("signer")
            .load()
            .expect("key from file");
        let _ = std::fs::remove_file(&path);

        let err = |vars: &[(&str, &str)]| {
            let e: br2k_core::Error = ChainConfig::from_lookup(lookup(vars))
                .expect_err("rejected")
                .into();
            assert_eq!(e.kind(), br2k_core::ErrorKind::InvalidInput, "{e}");
            e.to_string()
        };
        err(&[]);
        err(&[("BR2K_RPC_URLS", "not a url")]);
        err(&[
            ("BR2K_RPC_URLS", "http://h:1"),
            ("BR2K_REGISTRY_ADDRESS", "0x12"),
        ]);
        err(&[("BR2K_RPC_URLS", "http://h:1"), ("BR2K_CHAIN_ID", "x")]);
        let bad = ChainConfig::new(vec![]).with_private_key("0xdeadbeefsecret");
        let e: br2k_core::Error = bad
            .signer
            .as_ref()
            .expect("s")
            .load()
            .expect_err("bad key")
            .into();
        assert!(!e.to_string().contains("deadbeef"), "{e}");
    }
}
