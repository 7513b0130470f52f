//! The ledger's snapshot registry: Distribution on a small tmpfs, behind a proxy.

use super::*;

/// The snapshot registry: Distribution with its root on a tmpfs, behind a proxy.
pub struct SnapshotRegistry {
    mount: PathBuf,
    child: Child,
    /// The proxy the replicas use.
    pub proxy: Proxy,
    fill: PathBuf,
}

impl SnapshotRegistry {
    /// Mounts a fresh tmpfs at `<dir>/registry`, starts the registry on it and a proxy.
    pub async fn start(bin: &str, dir: &Path) -> Result<Self, String> {
        let mount = dir.join("registry");
        std::fs::create_dir_all(&mount).map_err(|e| e.to_string())?;
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={REGISTRY_TMPFS}"),
                "tmpfs",
            ])
            .arg(&mount)
            .status()
            .map_err(|e| format!("mount: {e}"))?;
        if !st.success() {
            return Err(format!("mount tmpfs on {}: {st}", mount.display()));
        }
        let addr = format!("127.0.0.1:{}", free_port()?);
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                mount.join("data").display()
            ),
        )
        .map_err(|e| e.to_string())?;
        let log = std::fs::File::create(dir.join("registry.log")).map_err(|e| e.to_string())?;
        let child = Command::new(bin)
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("spawn registry {bin}: {e}"))?;
        let mut me = Self {
            fill: mount.join("fill"),
            mount,
            child,
            proxy: Proxy::start(addr.parse().map_err(|e| format!("{e}"))?).await?,
        };
        if let Err(e) = wait_port(&addr, Duration::from_secs(30)) {
            me.stop();
            return Err(e);
        }
        Ok(me)
    }

    /// Fills the tmpfs (a file grown until the disk is full).
    pub fn fill_disk(&self) -> Result<u64, String> {
        use std::io::Write;
        let mut f = std::fs::File::create(&self.fill).map_err(|e| e.to_string())?;
        let chunk = vec![0xa5u8; 1 << 16];
        let mut n = 0u64;
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(w) => n += w as u64,
                Err(_) => break,
            }
        }
        let _ = f.flush();
        Ok(n)
    }

    /// Frees the disk again.
    pub fn free_disk(&self) {
        let _ = std::fs::remove_file(&self.fill);
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = Command::new("umount").arg(&self.mount).status();
    }
}

impl Drop for SnapshotRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}
