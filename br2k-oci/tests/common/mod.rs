//! Helpers for integration tests: throwaway Distribution registries and a fake one.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use br2k_core::{Digest, Repository};
use br2k_oci::{OciConfig, OciImageStore};

/// A `docker-registry` process of our own on a free loopback port.
pub struct Registry {
    pub addr: String,
    pub root: tempfile::TempDir,
    config: PathBuf,
    /// The registry's own output: its access log (one line per request served).
    log: PathBuf,
    child: Option<Child>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn registry_bin() -> String {
    std::env::var("BR2K_REGISTRY_BIN").unwrap_or_else(|_| "/usr/bin/docker-registry".into())
}

impl Registry {
    pub fn spawn() -> Self {
        Self::spawn_with(None)
    }

    /// A registry requiring HTTP basic auth from the given htpasswd lines.
    pub fn spawn_with_htpasswd(lines: &str) -> Self {
        Self::spawn_with(Some(lines))
    }

    /// A registry delegating authentication to a token server (`auth: token:`): it
    /// trusts tokens of `issuer` for `service` signed by the key of the PEM
    /// certificate(s) in `root_cert_bundle`, and sends clients to `realm`.
    pub fn spawn_with_token_auth(
        realm: &str,
        service: &str,
        issuer: &str,
        root_cert_bundle: &std::path::Path,
    ) -> Self {
        Self::spawn_with_auth(|_| {
            format!(
                "auth:\n  token:\n    realm: \"{realm}\"\n    service: \"{service}\"\n    issuer: \"{issuer}\"\n    rootcertbundle: {}\n",
                root_cert_bundle.display()
            )
        })
    }

    fn spawn_with(htpasswd: Option<&str>) -> Self {
        Self::spawn_with_auth(|root| match htpasswd {
            Some(lines) => {
                let path = root.join("htpasswd");
                std::fs::write(&path, lines).unwrap();
                format!(
                    "auth:\n  htpasswd:\n    realm: br2k\n    path: {}\n",
                    path.display()
                )
            }
            None => String::new(),
        })
    }

    /// A registry whose config ends with the `auth:` section `auth(root)` returns.
    fn spawn_with_auth(auth: impl FnOnce(&std::path::Path) -> String) -> Self {
        let root = tempfile::tempdir().unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let config = root.path().join("config.yml");
        let mut text = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
            root.path().join("data").display()
        );
        text.push_str(&auth(root.path()));
        std::fs::write(&config, text).unwrap();
        let log = root.path().join("registry.log");
        let mut r = Self {
            addr,
            root,
            config,
            log,
            child: None,
        };
        r.start();
        r
    }

    pub fn start(&mut self) {
        assert!(self.child.is_none());
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(registry_bin())
            .arg("serve")
            .arg(&self.config)
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("spawn docker-registry (apt-get install docker-registry)");
        self.child = Some(child);
        let start = Instant::now();
        while std::net::TcpStream::connect(&self.addr).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "registry did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Runs the registry's offline garbage collection (the registry must be stopped).
    pub fn garbage_collect(&self) {
        assert!(self.child.is_none(), "stop the registry first");
        let out = Command::new(registry_bin())
            .arg("garbage-collect")
            .arg(&self.config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The requests this registry has served so far, from its own access log:
    /// `(method, path)` in order.
    pub fn served(&self) -> Vec<(String, String)> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                // Combined log format: ... "METHOD /path HTTP/1.1" status ...
                let (_, rest) = l.split_once(" \"")?;
                let (req, _) = rest.split_once('"')?;
                let mut it = req.split(' ');
                let (method, path, proto) = (it.next()?, it.next()?, it.next()?);
                proto
                    .starts_with("HTTP/")
                    .then(|| (method.to_owned(), path.to_owned()))
            })
            .collect()
    }

    /// The requests served after the first `since` ones, once at least `expect` have
    /// arrived (the access log line follows the response) and no more for 200 ms.
    pub fn served_since(&self, since: usize, expect: usize) -> Vec<(String, String)> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut seen = self.served().len();
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let now = self.served().len();
            if (now >= since + expect && now == seen) || Instant::now() > deadline {
                return self.served().split_off(since.min(now));
            }
            seen = now;
        }
    }

    pub fn store(&self) -> OciImageStore {
        OciImageStore::insecure(&self.addr).unwrap()
    }

    pub fn store_with(&self, f: impl FnOnce(OciConfig) -> OciConfig) -> OciImageStore {
        OciImageStore::new(f(OciConfig::new(&self.addr).unwrap().with_insecure(true))).unwrap()
    }

    /// The data file of blob `d` in this registry's storage.
    pub fn blob_data(&self, d: &Digest) -> PathBuf {
        let hex = d.hex();
        self.root
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(&hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The shared registries of the stack, or two of our own when the stack is not up.
pub fn shared_registries() -> (Vec<String>, Vec<Registry>) {
    match std::env::var("BR2K_OCI_REGISTRIES") {
        Ok(v) if !v.trim().is_empty() => {
            (v.split(',').map(|s| s.trim().to_owned()).collect(), vec![])
        }
        _ => {
            let own = vec![Registry::spawn(), Registry::spawn()];
            (own.iter().map(|r| r.addr.clone()).collect(), own)
        }
    }
}

/// A fresh repository name.
pub fn fresh_repo(prefix: &str) -> Repository {
    let n: u64 = rand::random();
    Repository::new(format!("br2k-test/{prefix}-{n:016x}")).unwrap()
}
