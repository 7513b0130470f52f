//! The desired state of a service: [`ServiceSpec`] and its canonical hash.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::ValidationError;
use crate::image::ImageRef;

/// Largest accepted canonical spec, in bytes (specs travel in chain events).
pub const MAX_SPEC_BYTES: usize = 64 * 1024;

/// Most replicas a spec may ask for.
pub const MAX_REPLICAS: u32 = 1000;

/// A network port the service listens on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Port {
    /// Port name (a DNS-1123 label of at most 15 characters).
    pub name: String,
    /// Container port, 1-65535.
    pub port: u16,
}

/// How a probe checks a replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ProbeCheck {
    /// HTTP GET on `path` at `port`; 2xx/3xx is healthy.
    Http {
        /// Request path, starting with `/`.
        path: String,
        /// Container port.
        port: u16,
    },
    /// TCP connect to `port`.
    Tcp {
        /// Container port.
        port: u16,
    },
    /// Run a command in the container; exit 0 is healthy.
    Exec {
        /// The command and its arguments.
        command: Vec<String>,
    },
}

/// One probe: what to check and how often.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    /// What to check.
    pub check: ProbeCheck,
    /// Seconds between checks (1-3600).
    pub period_seconds: u32,
    /// Consecutive failures before the replica counts as failed (1-100).
    pub failure_threshold: u32,
}

/// Startup, readiness and liveness probes.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Probes {
    /// Gates the other probes until the replica has started.
    pub startup: Option<Probe>,
    /// Decides whether the replica receives traffic.
    pub readiness: Option<Probe>,
    /// Restarts the replica when it fails.
    pub liveness: Option<Probe>,
}

/// Resources per replica (requests equal limits).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU in millicores.
    pub cpu_millis: Option<u32>,
    /// Memory in MiB.
    pub memory_mib: Option<u32>,
}

/// A reference to a secret held outside the chain (a Kubernetes Secret): only names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretEnv {
    /// Environment variable name in the container.
    pub name: String,
    /// Name of the secret object.
    pub secret: String,
    /// Key inside the secret object.
    pub key: String,
}

/// Which fields an autoscaler may own; changes to them inside the bounds are not drift.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Autoscaling {
    /// Fewest replicas the autoscaler may set.
    pub min_replicas: u32,
    /// Most replicas the autoscaler may set.
    pub max_replicas: u32,
}

/// The desired state of a service, as recorded in the registry.
///
/// Holds no secrets: environment values are checked for secret-looking content, and
/// secrets are referenced by name through [`SecretEnv`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Image, pinned by digest.
    pub image: ImageRef,
    /// Number of replicas.
    pub replicas: u32,
    /// Arguments passed to the container entrypoint.
    #[serde(default)]
    pub args: Vec<String>,
    /// Ports.
    #[serde(default)]
    pub ports: Vec<Port>,
    /// Non-secret environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Environment taken from secrets held off chain.
    #[serde(default)]
    pub secret_env: Vec<SecretEnv>,
    /// Resources per replica.
    #[serde(default)]
    pub resources: Resources,
    /// Probes.
    #[serde(default)]
    pub probes: Probes,
    /// Autoscaler ownership of the replica count, if any.
    #[serde(default)]
    pub autoscaling: Option<Autoscaling>,
    /// Clusters that may run the service, most preferred first (see
    /// [`crate::failover`]). Empty: the service is not placed across clusters (every
    /// operator serving it runs it). Left out of the canonical form when empty, so
    /// specs without it keep their hash.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clusters: Vec<String>,
}

/// Most clusters a spec may name.
pub const MAX_CLUSTERS: usize = 8;

const SECRET_WORDS: [&str; 7] = [
    "PASSWORD",
    "PASSWD",
    "SECRET",
    "TOKEN",
    "PRIVATE_KEY",
    "PRIVATEKEY",
    "API_KEY",
];

/// Whether a string looks like a secret: a 32-byte hex key, a URL with credentials,
/// a bearer token, a PEM private key, a credential assignment (`password=`,
/// `token=`, ...), a JSON Web Token or a well-known cloud or forge key.
pub fn looks_secret(value: &str) -> bool {
    let v = value.trim();
    let hexpart = v.strip_prefix("0x").unwrap_or(v);
    if hexpart.len() == 64 && hexpart.bytes().all(|b| b.is_ascii_hexdigit()) {
        return true;
    }
    if let Some((_, rest)) = v.split_once("://") {
        let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
        if authority.contains('@') {
            return true;
        }
    }
    let lower = v.to_ascii_lowercase();
    if lower.starts_with("bearer ") || lower.contains("-----begin") || lower.contains("private key")
    {
        return true;
    }
    if CREDENTIAL_ASSIGNMENTS.iter().any(|a| {
        lower.match_indices(a).any(|(i, _)| {
            // `password=x`, `?token=x`, `--api-key=x`: a key word followed by a value.
            let before = lower[..i].chars().next_back();
            let value = &lower[i + a.len()..];
            before.is_none_or(|c| !c.is_ascii_alphanumeric())
                && value
                    .chars()
                    .next()
                    .is_some_and(|c| !c.is_whitespace() && c != '&')
        })
    }) {
        return true;
    }
    v.split(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | ',' | ';' | '&' | '=' | ':'))
        .any(|word| is_jwt(word) || has_key_prefix(word))
}

/// Credential assignments in URLs, flags and connection strings.
const CREDENTIAL_ASSIGNMENTS: [&str; 9] = [
    "password=",
    "passwd=",
    "pwd=",
    "secret=",
    "token=",
    "apikey=",
    "api-key=",
    "api_key=",
    "access_key=",
];

/// Prefixes of well-known cloud and forge credentials, each with the least length
/// of a real one: AWS access key ids, Google API keys, GitHub, GitLab, Slack,
/// Stripe, npm and PyPI tokens.
const KEY_PREFIXES: [(&str, usize); 14] = [
    ("AKIA", 20),
    ("ASIA", 20),
    ("AIza", 39),
    ("ghp_", 40),
    ("gho_", 40),
    ("ghu_", 40),
    ("ghs_", 40),
    ("ghr_", 40),
    ("github_pat_", 40),
    ("glpat-", 26),
    ("xoxb-", 20),
    ("xoxp-", 20),
    ("sk_live_", 24),
    ("npm_", 40),
];

fn has_key_prefix(word: &str) -> bool {
    KEY_PREFIXES.iter().any(|(p, min)| {
        word.starts_with(p)
            && word.len() >= *min
            && word[p.len()..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    }) || (word.starts_with("pypi-AgE") && word.len() >= 40)
}

/// A JSON Web Token: three base64url parts, the header a JSON object (`eyJ`).
fn is_jwt(word: &str) -> bool {
    let parts: Vec<&str> = word.split('.').collect();
    parts.len() == 3
        && parts[0].starts_with("eyJ")
        && parts[..2].iter().all(|p| p.len() >= 8)
        && parts.iter().all(|p| {
            p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn is_dns_label(s: &str, max: usize) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= max
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

fn is_env_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphabetic() || b[0] == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

impl ServiceSpec {
    /// A minimal valid spec: `image` (must be pinned) and `replicas`.
    pub fn new(image: ImageRef, replicas: u32) -> Result<Self, ValidationError> {
        let spec = Self {
            image,
            replicas,
            args: Vec::new(),
            ports: Vec::new(),
            env: BTreeMap::new(),
            secret_env: Vec::new(),
            resources: Resources::default(),
            probes: Probes::default(),
            autoscaling: None,
            clusters: Vec::new(),
        };
        spec.validate()?;
        Ok(spec)
    }

    /// Checks every field; the first problem is returned as a typed error.
    pub fn validate(&self) -> Result<(), ValidationError> {
        self.image.require_digest()?;
        if self.replicas > MAX_REPLICAS {
            return Err(ValidationError::spec(
                "replicas",
                format!("must be at most {MAX_REPLICAS}"),
            ));
        }
        if self.args.len() > 256 || self.args.iter().any(|a| a.len() > 4096) {
            return Err(ValidationError::spec(
                "args",
                "at most 256 arguments of 4096 bytes",
            ));
        }
        for (i, a) in self.args.iter().enumerate() {
            if looks_secret(a) {
                return Err(ValidationError::spec(
                    format!("args[{i}]"),
                    "looks like a secret; use secret_env",
                ));
            }
        }
        let mut names = std::collections::BTreeSet::new();
        let mut numbers = std::collections::BTreeSet::new();
        for (i, p) in self.ports.iter().enumerate() {
            // Kubernetes' IANA service name: a DNS label with a letter and no "--".
            if !is_dns_label(&p.name, 15)
                || !p.name.bytes().any(|c| c.is_ascii_lowercase())
                || p.name.contains("--")
            {
                return Err(ValidationError::spec(
                    format!("ports[{i}].name"),
                    "must be a DNS label of at most 15 characters with a letter and no \"--\"",
                ));
            }
            if !numbers.insert(p.port) {
                return Err(ValidationError::spec(
                    format!("ports[{i}].port"),
                    "duplicate port number",
                ));
            }
            if p.port == 0 {
                return Err(ValidationError::spec(
                    format!("ports[{i}].port"),
                    "must be 1-65535",
                ));
            }
            if !names.insert(&p.name) {
                return Err(ValidationError::spec(
                    format!("ports[{i}].name"),
                    "duplicate port name",
                ));
            }
        }
        if self.env.len() > 256 {
            return Err(ValidationError::spec("env", "at most 256 variables"));
        }
        for (k, v) in &self.env {
            if !is_env_name(k) {
                return Err(ValidationError::spec(
                    format!("env.{k}"),
                    "must be a C identifier",
                ));
            }
            let upper = k.to_ascii_uppercase();
            if SECRET_WORDS.iter().any(|w| upper.contains(w)) {
                return Err(ValidationError::spec(
                    format!("env.{k}"),
                    "names a secret; use secret_env to reference it",
                ));
            }
            if v.len() > 4096 {
                return Err(ValidationError::spec(
                    format!("env.{k}"),
                    "value longer than 4096 bytes",
                ));
            }
            if looks_secret(v) {
                return Err(ValidationError::spec(
                    format!("env.{k}"),
                    "value looks like a secret; use secret_env",
                ));
            }
        }
        for (i, s) in self.secret_env.iter().enumerate() {
            if !is_env_name(&s.name) {
                return Err(ValidationError::spec(
                    format!("secret_env[{i}].name"),
                    "must be a C identifier",
                ));
            }
            if self.env.contains_key(&s.name) {
                return Err(ValidationError::spec(
                    format!("secret_env[{i}].name"),
                    "also set in env",
                ));
            }
            if !is_dns_label(&s.secret, 63) {
                return Err(ValidationError::spec(
                    format!("secret_env[{i}].secret"),
                    "must be a DNS label",
                ));
            }
            if s.key.is_empty()
                || s.key.len() > 253
                || !s
                    .key
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
            {
                return Err(ValidationError::spec(
                    format!("secret_env[{i}].key"),
                    "must be a valid secret key",
                ));
            }
        }
        for (name, probe) in [
            ("startup", &self.probes.startup),
            ("readiness", &self.probes.readiness),
            ("liveness", &self.probes.liveness),
        ] {
            let Some(p) = probe else { continue };
            let field = format!("probes.{name}");
            if !(1..=3600).contains(&p.period_seconds) {
                return Err(ValidationError::spec(
                    format!("{field}.period_seconds"),
                    "must be 1-3600",
                ));
            }
            if !(1..=100).contains(&p.failure_threshold) {
                return Err(ValidationError::spec(
                    format!("{field}.failure_threshold"),
                    "must be 1-100",
                ));
            }
            match &p.check {
                ProbeCheck::Http { path, port } => {
                    if !path.starts_with('/') || path.len() > 1024 {
                        return Err(ValidationError::spec(
                            format!("{field}.check.path"),
                            "must start with '/'",
                        ));
                    }
                    if looks_secret(path) {
                        return Err(ValidationError::spec(
                            format!("{field}.check.path"),
                            "looks like it carries a secret; probes go on chain",
                        ));
                    }
                    if *port == 0 {
                        return Err(ValidationError::spec(
                            format!("{field}.check.port"),
                            "must be 1-65535",
                        ));
                    }
                }
                ProbeCheck::Tcp { port } => {
                    if *port == 0 {
                        return Err(ValidationError::spec(
                            format!("{field}.check.port"),
                            "must be 1-65535",
                        ));
                    }
                }
                ProbeCheck::Exec { command } => {
                    if command.is_empty() {
                        return Err(ValidationError::spec(
                            format!("{field}.check.command"),
                            "must not be empty",
                        ));
                    }
                    if let Some(i) = command.iter().position(|c| looks_secret(c)) {
                        return Err(ValidationError::spec(
                            format!("{field}.check.command[{i}]"),
                            "looks like a secret; probes go on chain, read it from secret_env",
                        ));
                    }
                }
            }
        }
        if let Some(a) = &self.autoscaling {
            if a.min_replicas > a.max_replicas || a.max_replicas > MAX_REPLICAS {
                return Err(ValidationError::spec(
                    "autoscaling",
                    "need min_replicas <= max_replicas <= 1000",
                ));
            }
            if !(a.min_replicas..=a.max_replicas).contains(&self.replicas) {
                return Err(ValidationError::spec(
                    "replicas",
                    "must lie within the autoscaling bounds",
                ));
            }
        }
        if self.clusters.len() > MAX_CLUSTERS {
            return Err(ValidationError::spec(
                "clusters",
                format!("at most {MAX_CLUSTERS} clusters"),
            ));
        }
        for (i, c) in self.clusters.iter().enumerate() {
            crate::record::check_cluster_name(c)
                .map_err(|e| ValidationError::spec(format!("clusters[{i}]"), e.to_string()))?;
            if self.clusters[..i].contains(c) {
                return Err(ValidationError::spec(
                    format!("clusters[{i}]"),
                    format!("{c:?} is named twice"),
                ));
            }
        }
        let len = self.canonical_bytes().len();
        if len > MAX_SPEC_BYTES {
            return Err(ValidationError::spec(
                "",
                format!("canonical form is {len} bytes, limit {MAX_SPEC_BYTES}"),
            ));
        }
        Ok(())
    }

    /// The canonical serialization: JSON with object keys sorted at every level and no
    /// insignificant whitespace. Two equal specs give equal bytes whatever their field
    /// order was when parsed.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let value = serde_json::to_value(self).expect("a spec always serializes");
        let mut out = Vec::with_capacity(256);
        write_canonical(&value, &mut out);
        out
    }

    /// The canonical spec hash: SHA-256 of [`ServiceSpec::canonical_bytes`].
    pub fn spec_hash(&self) -> Digest {
        Digest::of(&self.canonical_bytes())
    }

    /// Parses spec bytes from an untrusted source (JSON in any field order) and
    /// validates the result.
    pub fn from_json_bytes(bytes: &[u8]) -> Result<Self, ValidationError> {
        if bytes.len() > MAX_SPEC_BYTES {
            return Err(ValidationError::malformed(
                "spec bytes",
                format!(
                    "{} bytes exceed the {MAX_SPEC_BYTES}-byte limit",
                    bytes.len()
                ),
            ));
        }
        let spec: ServiceSpec = serde_json::from_slice(bytes)
            .map_err(|e| ValidationError::malformed("spec JSON", e))?;
        spec.validate()?;
        Ok(spec)
    }

    /// The replica count an autoscaler may set without it counting as drift.
    pub fn allows_replicas(&self, replicas: u32, recorded: u32) -> bool {
        match &self.autoscaling {
            Some(a) => (a.min_replicas..=a.max_replicas).contains(&replicas),
            None => replicas == recorded,
        }
    }
}

/// Writes `value` as canonical JSON (sorted keys, compact).
pub fn write_canonical(value: &serde_json::Value, out: &mut Vec<u8>) {
    use serde_json::Value;
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(serde_json::to_string(k).expect("string").as_bytes());
                out.push(b':');
                write_canonical(&map[k], out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(v, out);
            }
            out.push(b']');
        }
        other => out.extend_from_slice(serde_json::to_string(other).expect("scalar").as_bytes()),
    }
}
