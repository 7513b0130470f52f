//! A tmpfs for the mirror's storage.

use super::*;

// ------------------------------------------------------------------ tmpfs

/// A tmpfs mounted at a directory, unmounted on drop.
pub struct Tmpfs {
    /// The mount point.
    pub dir: PathBuf,
    mounted: bool,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`mount -o size=`, e.g. `16m`) at `dir`.
    pub fn mount(dir: &Path, size: &str) -> Result<Self, String> {
        fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let d = dir.to_string_lossy().into_owned();
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "br2k-faults",
                &d,
            ],
        )?;
        Ok(Self {
            dir: dir.to_owned(),
            mounted: true,
        })
    }

    /// Fills the file system with file `name` until it is full; returns the bytes
    /// written.
    pub fn fill(&self, name: &str) -> Result<u64, String> {
        let path = self.dir.join(name);
        let mut f = fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let chunk = vec![0u8; 256 * 1024];
        let mut n = 0u64;
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(k) => n += k as u64,
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
                Err(e) => return Err(format!("fill {}: {e}", path.display())),
            }
        }
        let _ = f.flush();
        Ok(n)
    }

    /// Unmounts (lazily if busy).
    pub fn unmount(&mut self) {
        if !self.mounted {
            return;
        }
        let d = self.dir.to_string_lossy().into_owned();
        if run("umount", &[&d]).is_err()
            && let Err(e) = run("umount", &["-l", &d])
        {
            eprintln!("[faults/operator] umount {d}: {e}");
        }
        self.mounted = false;
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        self.unmount();
    }
}
