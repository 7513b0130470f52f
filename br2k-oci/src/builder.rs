//! A daemonless image builder: files → one reproducible tar+gzip layer, config, manifest.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;

use br2k_core::artifact::{OCI_CONFIG, OCI_LAYER_GZIP};
use br2k_core::{Blob, Digest, Error, Image, Result, ValidationError};
use serde_json::json;

use crate::config::PlatformSpec;

/// Builds a single-layer OCI image from in-memory files, like ko or jib.
///
/// Output is reproducible: entries are sorted, owned by root, with mtime 0, and the
/// gzip header carries no timestamp; equal inputs give equal digests.
///
/// The image runs as a numeric non-root user ([`DEFAULT_USER`] unless
/// [`ImageBuilder::user`] says otherwise), so that pods with `runAsNonRoot: true` (as
/// br2k-k8s makes them) start it; the files stay owned by root and readable by all.
#[derive(Debug, Clone)]
pub struct ImageBuilder {
    files: BTreeMap<String, (Vec<u8>, u32)>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
    env: BTreeMap<String, String>,
    workdir: Option<String>,
    labels: BTreeMap<String, String>,
    platform: PlatformSpec,
    user: (u32, u32),
}

/// The user (uid, gid) images run as by default: 65532, the distroless `nonroot`
/// user, recorded as `"65532:65532"` in the config.
pub const DEFAULT_USER: (u32, u32) = (65532, 65532);

impl Default for ImageBuilder {
    fn default() -> Self {
        Self {
            files: BTreeMap::new(),
            entrypoint: Vec::new(),
            cmd: Vec::new(),
            env: BTreeMap::new(),
            workdir: None,
            labels: BTreeMap::new(),
            platform: PlatformSpec::default(),
            user: DEFAULT_USER,
        }
    }
}

fn check_path(path: &str) -> Result<String> {
    let p = path.trim_start_matches('/');
    let ok = !p.is_empty()
        && p.len() <= 4096
        && !p.contains('\0')
        && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..");
    if ok {
        Ok(p.to_owned())
    } else {
        Err(ValidationError::malformed(
            "image file path",
            format!("{path:?} must be a normalized path without '..'"),
        )
        .into())
    }
}

impl ImageBuilder {
    /// An empty linux/amd64 image.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a file at `path` (inside the image) with `mode` (e.g. `0o755`).
    pub fn file(mut self, path: &str, data: impl Into<Vec<u8>>, mode: u32) -> Result<Self> {
        let p = check_path(path)?;
        self.files.insert(p, (data.into(), mode & 0o7777));
        Ok(self)
    }

    /// Adds the file at `src` on disk as `path` with `mode`.
    pub fn file_from_disk(self, path: &str, src: impl AsRef<Path>, mode: u32) -> Result<Self> {
        let src = src.as_ref();
        let data = std::fs::read(src).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::not_found(src.display())
            } else {
                ValidationError::malformed("image file", format!("{}: {e}", src.display())).into()
            }
        })?;
        self.file(path, data, mode)
    }

    /// Sets the entrypoint.
    pub fn entrypoint<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.entrypoint = args.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the default arguments.
    pub fn cmd<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.cmd = args.into_iter().map(Into::into).collect();
        self
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }

    /// Sets the working directory.
    pub fn workdir(mut self, dir: impl Into<String>) -> Self {
        self.workdir = Some(dir.into());
        self
    }

    /// Adds a label.
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.labels.insert(key.into(), value.into());
        self
    }

    /// Sets the platform recorded in the config.
    pub fn platform(mut self, platform: PlatformSpec) -> Self {
        self.platform = platform;
        self
    }

    /// Sets the numeric user and group the image runs as (default [`DEFAULT_USER`]).
    /// Root (uid 0) is refused: Kubernetes does not start it under `runAsNonRoot`.
    pub fn user(mut self, uid: u32, gid: u32) -> Result<Self> {
        if uid == 0 {
            return Err(ValidationError::malformed(
                "image user",
                "uid 0 is root; images run as a non-root user",
            )
            .into());
        }
        self.user = (uid, gid);
        Ok(self)
    }

    /// The uncompressed layer tar.
    fn layer_tar(&self) -> Result<Vec<u8>> {
        let mut dirs = BTreeSet::new();
        for p in self.files.keys() {
            let mut acc = String::new();
            let comps: Vec<&str> = p.split('/').collect();
            for c in &comps[..comps.len() - 1] {
                acc.push_str(c);
                acc.push('/');
                dirs.insert(acc.clone());
            }
        }
        type Entry<'a> = (String, Option<&'a (Vec<u8>, u32)>);
        let mut entries: Vec<Entry<'_>> = dirs.into_iter().map(|d| (d, None)).collect();
        entries.extend(self.files.iter().map(|(p, f)| (p.clone(), Some(f))));
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let mut ar = tar::Builder::new(Vec::new());
        ar.mode(tar::HeaderMode::Deterministic);
        let tar_err = |e: std::io::Error| Error::from(ValidationError::malformed("image layer", e));
        for (path, file) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mtime(0);
            h.set_uid(0);
            h.set_gid(0);
            match file {
                None => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(0o755);
                    h.set_size(0);
                    ar.append_data(&mut h, &path, std::io::empty())
                        .map_err(tar_err)?;
                }
                Some((data, mode)) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(*mode);
                    h.set_size(data.len() as u64);
                    ar.append_data(&mut h, &path, data.as_slice())
                        .map_err(tar_err)?;
                }
            }
        }
        ar.into_inner().map_err(tar_err)
    }

    /// Builds the image: one gzip layer, an OCI config with `rootfs.diff_ids` set to the
    /// digest of the uncompressed tar, and the manifest.
    pub fn build(&self) -> Result<Image> {
        if self.files.is_empty() {
            return Err(ValidationError::malformed("image", "no files added").into());
        }
        let tar = self.layer_tar()?;
        let diff_id = Digest::of(&tar);
        let mut gz = flate2::GzBuilder::new()
            .mtime(0)
            .write(Vec::new(), flate2::Compression::default());
        let gz_err = |e: std::io::Error| Error::from(ValidationError::malformed("image layer", e));
        gz.write_all(&tar).map_err(gz_err)?;
        let layer = gz.finish().map_err(gz_err)?;
        let mut cfg = serde_json::Map::new();
        let (uid, gid) = self.user;
        cfg.insert("User".into(), json!(format!("{uid}:{gid}")));
        if !self.entrypoint.is_empty() {
            cfg.insert("Entrypoint".into(), json!(self.entrypoint));
        }
        if !self.cmd.is_empty() {
            cfg.insert("Cmd".into(), json!(self.cmd));
        }
        if !self.env.is_empty() {
            let env: Vec<String> = self.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
            cfg.insert("Env".into(), json!(env));
        }
        if let Some(w) = &self.workdir {
            cfg.insert("WorkingDir".into(), json!(w));
        }
        if !self.labels.is_empty() {
            cfg.insert("Labels".into(), json!(self.labels));
        }
        let mut config = json!({
            "created": "1970-01-01T00:00:00Z",
            "architecture": self.platform.architecture,
            "os": self.platform.os,
            "config": cfg,
            "rootfs": {"type": "layers", "diff_ids": [diff_id.to_string()]},
            "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "br2k-oci ImageBuilder"}],
        });
        if let Some(v) = &self.platform.variant {
            config["variant"] = json!(v);
        }
        let config_bytes = serde_json::to_vec(&config).expect("json");
        Ok(Image::build(
            Blob::new(OCI_CONFIG, config_bytes),
            vec![Blob::new(OCI_LAYER_GZIP, layer)],
            None,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn sample() -> ImageBuilder {
        ImageBuilder::new()
            .file("/usr/local/bin/svc", b"\x7fELF fake binary".to_vec(), 0o755)
            .unwrap()
            .file("etc/svc.toml", b"port = 8080\n".to_vec(), 0o644)
            .unwrap()
            .entrypoint(["/usr/local/bin/svc"])
            .env("RUST_LOG", "info")
    }

    #[test]
    fn reproducible_and_verified() {
        let a = sample().build().unwrap();
        let b = sample().build().unwrap();
        assert_eq!(a.digest, b.digest);
        a.verify().unwrap();
        let c = sample().env("X", "1").build().unwrap();
        assert_ne!(a.digest, c.digest);
    }

    #[test]
    fn layer_and_config_are_consistent() {
        let img = sample().build().unwrap();
        let mut tar = Vec::new();
        flate2::read::GzDecoder::new(&img.layers[0].data[..])
            .read_to_end(&mut tar)
            .unwrap();
        let cfg: serde_json::Value = serde_json::from_slice(&img.config.data).unwrap();
        assert_eq!(cfg["rootfs"]["diff_ids"][0], Digest::of(&tar).to_string());
        assert_eq!(cfg["config"]["Entrypoint"][0], "/usr/local/bin/svc");
        assert_eq!(cfg["config"]["Env"][0], "RUST_LOG=info");
        let mut ar = tar::Archive::new(&tar[..]);
        let names: Vec<(String, u32, u64)> = ar
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (
                    e.path().unwrap().display().to_string(),
                    h.mode().unwrap(),
                    h.mtime().unwrap(),
                )
            })
            .collect();
        assert!(
            names.contains(&("usr/local/bin/svc".into(), 0o755, 0)),
            "{names:?}"
        );
        assert!(names.iter().any(|(n, _, _)| n == "usr/local/bin/"));
        assert!(names.iter().all(|(_, _, m)| *m == 0));
    }

    #[test]
    fn images_run_as_a_numeric_non_root_user() {
        let cfg = |b: ImageBuilder| {
            let img = b.build().unwrap();
            let v: serde_json::Value = serde_json::from_slice(&img.config.data).unwrap();
            v["config"]["User"].clone()
        };
        assert_eq!(cfg(sample()), "65532:65532");
        assert_eq!(cfg(sample().user(1000, 2000).unwrap()), "1000:2000");
        assert!(sample().user(0, 0).is_err(), "root refused");
    }

    #[test]
    fn bad_paths_rejected() {
        for p in ["", "/", "a/../b", "a//b", "./a"] {
            assert!(ImageBuilder::new().file(p, vec![], 0o644).is_err(), "{p}");
        }
        assert!(ImageBuilder::new().build().is_err());
    }
}
