//! Named targets (`br2k context`): chain endpoints, the registry contract, OCI
//! registries, the cluster. Stored in `$BR2K_CONFIG_DIR/config.toml` (default
//! `~/.config/br2k/config.toml`). Keys only as references (an environment variable or
//! a file name), never their value.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use alloy::primitives::Address;
use serde::{Deserialize, Serialize};

use crate::error::{CliError, CliResult};

/// One named target.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Context {
    /// JSON-RPC endpoints of the chain, tried in order.
    #[serde(default)]
    pub rpc_urls: Vec<String>,
    /// Address of the ServiceRegistry contract.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_contract: Option<String>,
    /// OCI registries, primary first (`host:port`).
    #[serde(default)]
    pub oci_registries: Vec<String>,
    /// Kubeconfig file (default: `$KUBECONFIG` or `~/.kube/config`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<String>,
    /// Context inside the kubeconfig (default: its current context).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kube_context: Option<String>,
    /// Namespace of the `Br2kService` resources and the workloads.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Environment variable holding the hex private key (default `BR2K_PRIVATE_KEY`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_env: Option<String>,
    /// File holding the hex private key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<String>,
}

fn default_namespace() -> String {
    "default".into()
}

/// The config file: contexts and the current one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContextFile {
    /// Name of the context used when none is named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
    /// Contexts by name.
    #[serde(default)]
    pub contexts: BTreeMap<String, Context>,
}

/// The config directory.
pub fn config_dir() -> PathBuf {
    if let Ok(d) = std::env::var("BR2K_CONFIG_DIR")
        && !d.is_empty()
    {
        return PathBuf::from(d);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| ".".into());
    PathBuf::from(home).join(".config/br2k")
}

/// The config file path.
pub fn config_path() -> PathBuf {
    config_dir().join("config.toml")
}

impl ContextFile {
    /// Reads the config file (empty when it does not exist).
    pub fn load() -> CliResult<Self> {
        let path = config_path();
        match std::fs::read_to_string(&path) {
            Ok(text) => toml::from_str(&text).map_err(|e| {
                let at = e
                    .span()
                    .map(|s| {
                        let (l, c) = crate::project::line_col(&text, s.start);
                        format!(":{l}:{c}")
                    })
                    .unwrap_or_default();
                CliError::usage(format!("{}{at}: {}", path.display(), e.message().trim()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(CliError::fail(format!("{}: {e}", path.display()))),
        }
    }

    /// Writes the config file (atomically).
    pub fn save(&self) -> CliResult<()> {
        let path = config_path();
        let dir = config_dir();
        std::fs::create_dir_all(&dir)
            .map_err(|e| CliError::fail(format!("{}: {e}", dir.display())))?;
        let text = format!(
            "# br2k contexts (`br2k context set/use`). Keys appear only as references.\n{}",
            toml::to_string_pretty(self).map_err(CliError::fail)?
        );
        let tmp = path.with_extension("toml.tmp");
        std::fs::write(&tmp, text)
            .map_err(|e| CliError::fail(format!("{}: {e}", tmp.display())))?;
        std::fs::rename(&tmp, &path).map_err(|e| CliError::fail(format!("{}: {e}", path.display())))
    }

    /// The context named `name`, or the current one.
    pub fn resolve(&self, name: Option<&str>) -> CliResult<(String, Context)> {
        let name = match name.or(self.current.as_deref()) {
            Some(n) => n.to_owned(),
            None => {
                return Err(CliError::usage("no context selected").hint(
                    "create one: `br2k context set local --rpc http://127.0.0.1:8545 --oci 127.0.0.1:5000 --oci 127.0.0.1:5001 --use`",
                ));
            }
        };
        let ctx = self.contexts.get(&name).cloned().ok_or_else(|| {
            CliError::usage(format!("no context named {name:?}"))
                .hint("list them with `br2k context list`")
        })?;
        Ok((name, ctx))
    }
}

impl Context {
    /// The RPC URLs, parsed.
    pub fn urls(&self) -> CliResult<Vec<alloy::transports::http::reqwest::Url>> {
        if self.rpc_urls.is_empty() {
            return Err(CliError::usage("the context has no RPC endpoint")
                .hint("`br2k context set NAME --rpc URL`"));
        }
        Ok(br2k_chain::ChainConfig::parse_urls(
            &self.rpc_urls.join(","),
        )?)
    }

    /// The registry contract address.
    pub fn contract(&self) -> CliResult<Address> {
        let a = self.registry_contract.as_deref().ok_or_else(|| {
            CliError::usage("the context names no registry contract")
                .hint("deploy one with `br2k contract deploy` (it records the address here)")
        })?;
        a.parse()
            .map_err(|_| CliError::usage(format!("registry_contract {a:?} is not an address")))
    }

    /// The signing key, read from the environment variable or file the context names.
    /// Never printed.
    pub fn key(&self) -> CliResult<Option<String>> {
        if let Some(f) = &self.key_file {
            let k = std::fs::read_to_string(f)
                .map_err(|e| CliError::usage(format!("key_file {f}: {e}")))?;
            return Ok(Some(k.trim().to_owned()));
        }
        let var = self.key_env.as_deref().unwrap_or("BR2K_PRIVATE_KEY");
        Ok(std::env::var(var).ok().filter(|v| !v.trim().is_empty()))
    }

    /// The chain configuration, with the signer when `sign` (an error without a key).
    pub fn chain_config(&self, sign: bool) -> CliResult<br2k_chain::ChainConfig> {
        let mut c =
            br2k_chain::ChainConfig::new(self.urls()?).with_request_timeout(Duration::from_secs(5));
        c.receipt_timeout = Duration::from_secs(30);
        if let Some(a) = &self.registry_contract {
            c = c.with_registry(a.parse().map_err(|_| {
                CliError::usage(format!("registry_contract {a:?} is not an address"))
            })?);
        }
        if sign {
            let key = self.key()?.ok_or_else(|| {
                let var = self.key_env.as_deref().unwrap_or("BR2K_PRIVATE_KEY");
                CliError::usage("no signing key").hint(format!(
                    "set {var} (hex private key) or the context's key_file"
                ))
            })?;
            c = c.with_private_key(key);
        }
        Ok(c)
    }

    /// The primary OCI registry.
    pub fn primary(&self) -> CliResult<&str> {
        self.oci_registries
            .first()
            .map(String::as_str)
            .ok_or_else(|| {
                CliError::usage("the context lists no OCI registry")
                    .hint("`br2k context set NAME --oci HOST:PORT` (primary first)")
            })
    }

    /// One store per registry, primary first (loopback registries over plain HTTP).
    pub fn stores(&self) -> CliResult<Vec<br2k_oci::OciImageStore>> {
        self.primary()?;
        self.oci_registries.iter().map(|h| store_for(h)).collect()
    }

    /// A kube client for the context's cluster.
    pub async fn kube(&self) -> CliResult<kube::Client> {
        br2k_k8s::install_crypto_provider();
        let opts = kube::config::KubeConfigOptions {
            context: self.kube_context.clone(),
            ..Default::default()
        };
        let config = match &self.kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path)
                    .map_err(|e| CliError::usage(format!("kubeconfig {path}: {e}")))?;
                kube::Config::from_custom_kubeconfig(kc, &opts).await
            }
            None => kube::Config::from_kubeconfig(&opts).await,
        }
        .map_err(|e| CliError::usage(format!("kubeconfig: {e}")))?;
        let mut config = config;
        config.connect_timeout = Some(Duration::from_secs(5));
        config.read_timeout = Some(Duration::from_secs(30));
        kube::Client::try_from(config).map_err(|e| CliError::fail(format!("kube client: {e}")))
    }
}

/// A store for registry `host` (plain HTTP for loopback hosts).
pub fn store_for(host: &str) -> CliResult<br2k_oci::OciImageStore> {
    store_with_progress(host, None)
}

/// A store for registry `host` reporting blob progress to `progress`.
pub fn store_with_progress(
    host: &str,
    progress: Option<std::sync::Arc<dyn Fn(br2k_oci::BlobProgress) + Send + Sync>>,
) -> CliResult<br2k_oci::OciImageStore> {
    let loopback = host.starts_with("127.") || host.starts_with("localhost");
    let mut cfg = br2k_oci::OciConfig::new(host.to_owned())?
        .with_insecure(loopback)
        .with_connect_timeout(Duration::from_secs(3));
    if let Some(p) = progress {
        cfg = cfg.with_progress(p);
    }
    Ok(br2k_oci::OciImageStore::new(cfg)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_context_file_round_trips_and_holds_no_key() {
        let mut f = ContextFile::default();
        f.contexts.insert(
            "local".into(),
            Context {
                rpc_urls: vec!["http://127.0.0.1:8545".into()],
                oci_registries: vec!["127.0.0.1:5000".into()],
                key_env: Some("MY_KEY".into()),
                namespace: "apps".into(),
                ..Default::default()
            },
        );
        f.current = Some("local".into());
        let text = toml::to_string_pretty(&f).expect("ser");
        let back: ContextFile = toml::from_str(&text).expect("de");
        assert_eq!(back, f);
        let (name, ctx) = back.resolve(None).expect("current");
        assert_eq!(name, "local");
        assert_eq!(ctx.primary().expect("primary"), "127.0.0.1:5000");
        assert!(back.resolve(Some("other")).is_err());
        assert!(ContextFile::default().resolve(None).is_err());
    }
}
