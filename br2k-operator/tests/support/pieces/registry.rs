//! Distribution registry processes of a harness's own.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use br2k_core::Digest;
use tokio::net::TcpStream;

use super::{free_port, log_pair, poll, record_pid};

/// A Distribution registry process on a loopback port with its own storage; it can
/// be stopped and started again on the same port and storage.
pub struct RegistryProc {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// The storage root (`rootdirectory`).
    pub data: PathBuf,
    config: PathBuf,
    log: PathBuf,
    bin: String,
    detach: bool,
    child: Option<Child>,
}

impl RegistryProc {
    /// Writes the config of a registry under `root` (storage in `root/data`, which
    /// the caller may have mounted; its log `root/registry.log`) and starts it,
    /// `detach`ed or not (see the module's text).
    pub async fn spawn(bin: &str, root: &Path, detach: bool) -> Result<Self, String> {
        let data = root.join("data");
        fs::create_dir_all(&data).map_err(|e| format!("{}: {e}", data.display()))?;
        let addr = format!("127.0.0.1:{}", free_port()?);
        let config = root.join("config.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                data.display()
            ),
        )
        .map_err(|e| format!("{}: {e}", config.display()))?;
        let mut r = Self {
            addr,
            data,
            log: root.join("registry.log"),
            config,
            bin: bin.to_owned(),
            detach,
            child: None,
        };
        r.start().await?;
        Ok(r)
    }

    /// Starts the process and waits until its port accepts connections.
    pub async fn start(&mut self) -> Result<(), String> {
        if self.child.is_some() {
            return Ok(());
        }
        let (out, err) = log_pair(&self.log)?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("serve")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        if self.detach {
            cmd.process_group(0);
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", self.bin))?;
        if self.detach {
            record_pid(&self.log, child.id());
        }
        self.child = Some(child);
        let addr = self.addr.clone();
        poll(Duration::from_secs(15), "registry listening", async || {
            TcpStream::connect(&addr)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        })
        .await
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The repository directory of `repo` in the storage.
    pub fn repo_dir(&self, repo: &str) -> PathBuf {
        self.data.join("docker/registry/v2/repositories").join(repo)
    }

    /// The data file of blob `d` in the storage.
    pub fn blob_data(&self, d: &Digest) -> PathBuf {
        let hex = d.hex();
        self.data
            .join("docker/registry/v2/blobs/sha256")
            .join(hex.get(..2).unwrap_or(&hex))
            .join(&hex)
            .join("data")
    }
}

impl Drop for RegistryProc {
    fn drop(&mut self) {
        self.stop();
    }
}
