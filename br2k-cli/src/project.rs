//! `br2k.toml`: what the user declares about a service, and how it becomes a
//! [`ServiceSpec`] and an image.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use br2k_core::{
    Digest, Image, ImageRef, Port, Probes, Repository, Resources, SecretEnv, ServiceId, ServiceSpec,
};
use serde::{Deserialize, Serialize};

use crate::error::{CliError, CliResult};

/// The project file name.
pub const FILE: &str = "br2k.toml";
/// Default image size limit (MiB) when `image.max_size_mib` is not set.
pub const DEFAULT_MAX_IMAGE_MIB: u64 = 1024;

/// The parsed `br2k.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Project {
    /// Service id in the registry.
    pub service: String,
    /// Replica count.
    pub replicas: u32,
    /// Where the image comes from.
    pub image: ImageSource,
    /// Container arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Ports.
    #[serde(default)]
    pub ports: Vec<Port>,
    /// Non-secret environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Environment from Kubernetes Secrets (names only).
    #[serde(default)]
    pub secret_env: Vec<SecretEnv>,
    /// Resources per replica.
    #[serde(default)]
    pub resources: Resources,
    /// Probes.
    #[serde(default)]
    pub probes: Probes,
    /// Clusters that may run the service, most preferred first (whole-cluster
    /// failover; empty: not placed across clusters).
    #[serde(default)]
    pub clusters: Vec<String>,
}

/// The image: a directory to package, or an existing image reference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSource {
    /// Directory (relative to `br2k.toml`) whose files are packaged into the image.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Where the directory's files go in the image.
    #[serde(default = "default_dest")]
    pub dest: String,
    /// Entrypoint of the packaged image.
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// An existing image (`host/repo:tag` or `host/repo@sha256:…`) instead of `dir`.
    #[serde(default)]
    pub reference: Option<String>,
    /// Repository in the context's registries (default `br2k/<service>`).
    #[serde(default)]
    pub repository: Option<String>,
    /// Tag pushed with the image (the record pins the digest, never the tag).
    #[serde(default)]
    pub tag: Option<String>,
    /// Largest image accepted, in MiB.
    #[serde(default)]
    pub max_size_mib: Option<u64>,
}

fn default_dest() -> String {
    "/app".into()
}

/// Where the image of a project comes from, resolved.
#[derive(Debug, Clone)]
pub enum Source {
    /// Files to package (sorted paths in the image, file on disk, mode).
    Files(Vec<(String, PathBuf, u32)>),
    /// An existing image.
    Reference(ImageRef),
}

/// The 1-based line and column of byte `offset` in `text`.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

impl Project {
    /// Parses `text` (named `path` in errors): a TOML error names line and column.
    pub fn parse(text: &str, path: &Path) -> CliResult<Self> {
        let p: Project = toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .map(|s| {
                    let (l, c) = line_col(text, s.start);
                    format!(":{l}:{c}")
                })
                .unwrap_or_default();
            CliError::usage(format!(
                "{}{at}: {}",
                path.display(),
                e.message().trim().replace('\n', " ")
            ))
            .hint("fix the field at that line and column (`br2k init` writes a commented example)")
        })?;
        p.check(path)?;
        Ok(p)
    }

    /// Reads and parses the file at `path`.
    pub fn load(path: &Path) -> CliResult<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            CliError::usage(format!("cannot read {}: {e}", path.display()))
                .hint("run `br2k init` to write one, or pass --file")
        })?;
        Self::parse(&text, path)
    }

    fn check(&self, path: &Path) -> CliResult<()> {
        let bad = |m: String| CliError::usage(format!("{}: {m}", path.display()));
        ServiceId::new(&self.service).map_err(|e| bad(format!("service: {e}")))?;
        match (&self.image.dir, &self.image.reference) {
            (Some(_), Some(_)) => {
                return Err(bad("image: set `dir` or `reference`, not both".into()));
            }
            (None, None) => return Err(bad("image: set `dir` or `reference`".into())),
            _ => {}
        }
        if self.image.dir.is_some() && self.image.entrypoint.is_empty() {
            return Err(bad(
                "image.entrypoint: a packaged directory needs an entrypoint".into(),
            ));
        }
        Repository::new(self.repository_name())
            .map_err(|e| bad(format!("image.repository: {e}")))?;
        // The rest is the spec's own validation (with a placeholder digest).
        self.spec("127.0.0.1:5000", Digest::of(b"placeholder"))
            .map_err(|e| bad(e.cause))?;
        Ok(())
    }

    /// The service id.
    pub fn id(&self) -> ServiceId {
        ServiceId::new(&self.service).expect("checked at parse")
    }

    /// Repository name in the context's registries.
    pub fn repository_name(&self) -> String {
        self.image
            .repository
            .clone()
            .unwrap_or_else(|| format!("br2k/{}", self.service))
    }

    /// The repository.
    pub fn repository(&self) -> Repository {
        Repository::new(self.repository_name()).expect("checked at parse")
    }

    /// The image size limit in bytes.
    pub fn max_image_bytes(&self) -> u64 {
        self.image.max_size_mib.unwrap_or(DEFAULT_MAX_IMAGE_MIB) * 1024 * 1024
    }

    /// The spec this project declares for image `digest` in registry `primary`.
    pub fn spec(&self, primary: &str, digest: Digest) -> CliResult<ServiceSpec> {
        let image = ImageRef::new(primary, self.repository(), None, Some(digest))?;
        let spec = ServiceSpec {
            image,
            replicas: self.replicas,
            args: self.args.clone(),
            ports: self.ports.clone(),
            env: self.env.clone(),
            secret_env: self.secret_env.clone(),
            resources: self.resources.clone(),
            probes: self.probes.clone(),
            autoscaling: None,
            clusters: self.clusters.clone(),
        };
        spec.validate()?;
        Ok(spec)
    }

    /// The image source, with `dir` resolved against `base` (the directory of
    /// `br2k.toml`) and its files listed.
    pub fn source(&self, base: &Path) -> CliResult<Source> {
        if let Some(r) = &self.image.reference {
            return Ok(Source::Reference(
                ImageRef::parse(r).map_err(|e| CliError::usage(format!("image.reference: {e}")))?,
            ));
        }
        let dir = base.join(self.image.dir.as_ref().expect("dir or reference"));
        let mut files = Vec::new();
        walk(&dir, &dir, &self.image.dest, &mut files)
            .map_err(|e| CliError::usage(format!("image.dir {}: {e}", dir.display())))?;
        files.sort();
        if files.is_empty() {
            return Err(CliError::usage(format!(
                "image.dir {} has no files",
                dir.display()
            )));
        }
        Ok(Source::Files(files))
    }
}

fn walk(
    root: &Path,
    dir: &Path,
    dest: &str,
    out: &mut Vec<(String, PathBuf, u32)>,
) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        // br2k's own files never go into the image (a `dir = "."` project would
        // otherwise change its digest with every journal write).
        let name = entry.file_name();
        if matches!(
            name.to_str(),
            Some(".br2k" | "br2k.toml" | "br2k.journal.json" | "br2k.journal.json.tmp")
        ) {
            continue;
        }
        let meta = std::fs::metadata(&path)?;
        if meta.is_dir() {
            walk(root, &path, dest, out)?;
        } else if meta.is_file() {
            let rel = path.strip_prefix(root).expect("under root");
            let in_image = format!("{}/{}", dest.trim_end_matches('/'), rel.to_string_lossy());
            out.push((in_image, path.clone(), meta.permissions().mode() & 0o7777));
        }
    }
    Ok(())
}

/// Total bytes of the files of a directory source.
pub fn source_bytes(files: &[(String, PathBuf, u32)]) -> u64 {
    files
        .iter()
        .map(|(_, p, _)| std::fs::metadata(p).map_or(0, |m| m.len()))
        .sum()
}

/// A fingerprint of what goes into the image: paths, modes, contents, entrypoint.
/// Equal fingerprints build equal images (the builder is reproducible).
pub fn fingerprint(files: &[(String, PathBuf, u32)], entrypoint: &[String]) -> CliResult<Digest> {
    use std::io::Read;
    let mut acc = Vec::with_capacity(64 * (files.len() + 1));
    acc.extend_from_slice(
        serde_json::to_string(entrypoint)
            .unwrap_or_default()
            .as_bytes(),
    );
    let mut buf = vec![0u8; 1 << 20];
    for (p, disk, mode) in files {
        let mut h = Vec::new();
        let mut f = std::fs::File::open(disk)
            .map_err(|e| CliError::fail(format!("{}: {e}", disk.display())))?;
        // Hash by chunks: digest of the chunk digests (enough for change detection).
        loop {
            let n = f
                .read(&mut buf)
                .map_err(|e| CliError::fail(format!("{}: {e}", disk.display())))?;
            if n == 0 {
                break;
            }
            h.extend_from_slice(Digest::of(&buf[..n]).as_bytes());
        }
        let file_digest = Digest::of(&h);
        acc.extend_from_slice(p.as_bytes());
        acc.push(0);
        acc.extend_from_slice(format!("{mode:o}").as_bytes());
        acc.extend_from_slice(file_digest.as_bytes());
    }
    Ok(Digest::of(&acc))
}

/// Builds the image of a directory source (reproducible: equal input, equal digest).
pub fn build_image(files: &[(String, PathBuf, u32)], entrypoint: &[String]) -> CliResult<Image> {
    let mut b = br2k_oci::ImageBuilder::new();
    for (p, disk, mode) in files {
        b = b.file_from_disk(p, disk, *mode)?;
    }
    Ok(b.entrypoint(entrypoint.iter().cloned()).build()?)
}

/// The commented `br2k.toml` that `br2k init` writes.
pub fn template(service: &str) -> String {
    format!(
        r#"# br2k.toml: what `br2k deploy` puts on chain and runs. Non-secret only: this file's
# content (except `image.dir`) becomes the service record, readable by anyone on chain.

# Service id in the on-chain registry (a DNS-1123 label: lowercase letters, digits, '-').
service = "{service}"

# Replicas to run (the record's desired count; `br2k scale` changes it later).
replicas = 3

# Arguments passed to the entrypoint.
args = []

[image]
# A directory (relative to this file) whose files are packaged into a single-layer OCI
# image without Docker; they land under `dest` in the image.
dir = "app"
dest = "/app"
# The entrypoint of the packaged image.
entrypoint = ["/app/run.sh"]
# Instead of `dir`: an existing image, copied into the context's registries and pinned
# by digest, e.g. reference = "127.0.0.1:5000/team/app:1.0"
# Repository in the context's registries (default "br2k/<service>").
# repository = "br2k/{service}"
# Tag pushed along (the record always pins the digest, never the tag).
tag = "latest"
# Refuse images larger than this (MiB).
max_size_mib = 1024

# Ports the service listens on (name: DNS label of at most 15 characters).
[[ports]]
name = "http"
port = 8080

# Non-secret environment. Names or values that look like secrets are refused: use
# secret_env to reference a Kubernetes Secret by name instead.
[env]
LOG_LEVEL = "info"

# [[secret_env]]
# name = "DB_PASSWORD"   # variable in the container
# secret = "db"          # Kubernetes Secret in the service's namespace
# key = "password"       # key in that Secret

# Resources per replica (requests = limits).
[resources]
cpu_millis = 100
memory_mib = 128

# Probes: check = {{ http = {{ path, port }} }} | {{ tcp = {{ port }} }} | {{ exec = {{ command }} }}
[probes.readiness]
check = {{ tcp = {{ port = 8080 }} }}
period_seconds = 5
failure_threshold = 3
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_template_parses_and_gives_a_valid_spec() {
        let p = Project::parse(&template("hello"), Path::new("br2k.toml")).expect("template");
        assert_eq!(p.service, "hello");
        assert_eq!(p.replicas, 3);
        assert_eq!(p.repository_name(), "br2k/hello");
        let spec = p.spec("127.0.0.1:5000", Digest::of(b"x")).expect("spec");
        assert_eq!(spec.ports.len(), 1);
        assert!(spec.probes.readiness.is_some());
        assert_eq!(
            spec.image.to_string(),
            format!("127.0.0.1:5000/br2k/hello@{}", Digest::of(b"x"))
        );
    }

    #[test]
    fn a_toml_error_names_line_and_column() {
        let text = "service = \"a\"\nreplicas = \"three\"\n";
        let e = Project::parse(text, Path::new("x/br2k.toml")).expect_err("bad type");
        assert!(e.cause.starts_with("x/br2k.toml:2:12: "), "{}", e.cause);
        assert_eq!(e.code, crate::error::EXIT_USAGE);
        let e = Project::parse("service = \n", Path::new("br2k.toml")).expect_err("syntax");
        assert!(e.cause.starts_with("br2k.toml:1:"), "{}", e.cause);
    }

    #[test]
    fn secrets_and_bad_fields_are_refused() {
        let base = template("hello");
        let with_secret = base.replace("LOG_LEVEL = \"info\"", "DB_PASSWORD = \"x\"");
        let e = Project::parse(&with_secret, Path::new("br2k.toml")).expect_err("secret");
        assert!(e.cause.contains("env.DB_PASSWORD"), "{}", e.cause);
        let both = base.replace("tag = \"latest\"", "reference = \"h:1/a/b:1\"");
        assert!(Project::parse(&both, Path::new("br2k.toml")).is_err());
        let unknown = format!("{base}\nreplica = 2\n");
        let e = Project::parse(&unknown, Path::new("br2k.toml")).expect_err("unknown");
        assert!(e.cause.contains("unknown field"), "{}", e.cause);
        let id = base.replace("service = \"hello\"", "service = \"Hello_World\"");
        assert!(Project::parse(&id, Path::new("br2k.toml")).is_err());
    }

    #[test]
    fn br2k_own_files_are_not_packaged() {
        let dir = tempfile::tempdir().expect("dir");
        let base = dir.path();
        std::fs::write(base.join("run.sh"), b"#!/bin/sh\n").expect("write");
        std::fs::write(base.join("br2k.journal.json"), b"{}").expect("write");
        std::fs::write(base.join("br2k.toml"), b"service = 'x'").expect("write");
        std::fs::create_dir_all(base.join(".br2k/image")).expect("dir");
        std::fs::write(base.join(".br2k/image/index.json"), b"{}").expect("write");
        let text = template("hello").replace("dir = \"app\"", "dir = \".\"");
        let p = Project::parse(&text, Path::new("br2k.toml")).expect("project");
        let Source::Files(files) = p.source(base).expect("source") else {
            panic!("a directory source");
        };
        let paths: Vec<&str> = files.iter().map(|f| f.0.as_str()).collect();
        assert_eq!(paths, vec!["/app/run.sh"]);
    }

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("ab\ncd", 0), (1, 1));
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
    }

    #[test]
    fn the_fingerprint_follows_content_and_mode() {
        let dir = tempfile::tempdir().expect("dir");
        let f = dir.path().join("run.sh");
        std::fs::write(&f, b"#!/bin/sh\n").expect("write");
        let files = vec![("/app/run.sh".to_owned(), f.clone(), 0o755)];
        let ep = vec!["/app/run.sh".to_owned()];
        let a = fingerprint(&files, &ep).expect("fp");
        assert_eq!(a, fingerprint(&files, &ep).expect("fp"));
        let mode = vec![("/app/run.sh".to_owned(), f.clone(), 0o644)];
        assert_ne!(a, fingerprint(&mode, &ep).expect("fp"));
        std::fs::write(&f, b"#!/bin/sh\necho\n").expect("write");
        assert_ne!(a, fingerprint(&files, &ep).expect("fp"));
        // The builder is reproducible: the same files give the same digest.
        let i1 = build_image(&files, &ep).expect("build");
        let i2 = build_image(&files, &ep).expect("build");
        assert_eq!(i1.digest, i2.digest);
    }
}
