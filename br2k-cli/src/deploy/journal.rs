//! The deployment journal (each finished step of a deploy, next to `br2k.toml`) and
//! the record fields a deploy changes.

use std::path::Path;

use br2k_core::ServiceSpec;
use serde::{Deserialize, Serialize};

use crate::error::{CliError, CliResult};

/// The journal file name (next to `br2k.toml`).
pub const JOURNAL: &str = "br2k.journal.json";

/// The deployment journal: each finished step and its result. It is a record and a
/// cache: every rerun checks it against the chain, the registries and the cluster.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Journal {
    /// Service id.
    pub service: String,
    /// Registry contract the journal is about.
    pub contract: String,
    /// The image was built (directory sources).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<BuildStep>,
    /// Every registry holds the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<PushStep>,
    /// The record pins the spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<ChainStep>,
    /// The resource is applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apply: Option<ApplyStep>,
    /// Every replica was Ready on the digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<ReadyStep>,
}

/// Result of the build step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildStep {
    /// Fingerprint of the source.
    pub fingerprint: String,
    /// Manifest digest of the built image.
    pub digest: String,
    /// Image size in bytes.
    pub bytes: u64,
}

/// Result of the push step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PushStep {
    /// The digest every registry holds.
    pub digest: String,
    /// The registries, primary first.
    pub registries: Vec<String>,
    /// Blobs uploaded by this step.
    pub blobs_pushed: u64,
}

/// Result of the chain step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChainStep {
    /// Spec hash now active.
    pub spec_hash: String,
    /// Active version.
    pub version: u64,
    /// Transaction that published it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx: Option<String>,
    /// Block of that transaction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<u64>,
}

/// Result of the apply step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApplyStep {
    /// `namespace/name` of the resource.
    pub resource: String,
    /// Record version the resource was applied for (the roll-out waited on).
    pub version: u64,
}

/// Result of the wait step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReadyStep {
    /// Version that was Ready.
    pub version: u64,
    /// Ready replicas.
    pub replicas: u32,
}

impl Journal {
    /// Reads the journal at `path` for `service` on `contract` (a fresh one when absent
    /// or about something else).
    pub fn load(path: &Path, service: &str, contract: &str) -> Self {
        let fresh = || Journal {
            service: service.to_owned(),
            contract: contract.to_owned(),
            ..Default::default()
        };
        match std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Journal>(&b).ok())
        {
            Some(j) if j.service == service && j.contract == contract => j,
            _ => fresh(),
        }
    }

    /// Writes the journal atomically.
    pub fn save(&self, path: &Path) -> CliResult<()> {
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(self).expect("journal serializes");
        std::fs::write(&tmp, text)
            .and_then(|_| std::fs::rename(&tmp, path))
            .map_err(|e| CliError::fail(format!("write {}: {e}", path.display())))
    }
}

/// One field of the record that changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldChange {
    /// Field name.
    pub field: String,
    /// Old value (JSON), `None` when the service is not registered.
    pub old: Option<String>,
    /// New value (JSON).
    pub new: String,
}

/// The on-chain fields that differ between `old` and `new` (every field set in `new`
/// when `old` is `None`).
pub fn spec_changes(old: Option<&ServiceSpec>, new: &ServiceSpec) -> Vec<FieldChange> {
    let newv = serde_json::to_value(new).expect("spec serializes");
    let oldv = old.map(|o| serde_json::to_value(o).expect("spec serializes"));
    let mut out = Vec::new();
    if let serde_json::Value::Object(n) = &newv {
        for (k, v) in n {
            let o = oldv.as_ref().and_then(|o| o.get(k));
            let empty = v.is_null()
                || v.as_array().is_some_and(Vec::is_empty)
                || v.as_object()
                    .is_some_and(|m| m.values().all(serde_json::Value::is_null));
            // A new service lists only the fields it sets.
            if old.is_none() && empty {
                continue;
            }
            if o != Some(v) {
                out.push(FieldChange {
                    field: k.clone(),
                    old: o.map(|o| o.to_string()),
                    new: v.to_string(),
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use br2k_core::{Digest, ImageRef, Repository};

    fn spec(d: &[u8], replicas: u32) -> ServiceSpec {
        let image = ImageRef::new(
            "127.0.0.1:5000",
            Repository::new("br2k/x").expect("repo"),
            None,
            Some(Digest::of(d)),
        )
        .expect("ref");
        ServiceSpec::new(image, replicas).expect("spec")
    }

    #[test]
    fn spec_changes_lists_changed_fields_old_to_new() {
        let a = spec(b"a", 3);
        assert!(spec_changes(Some(&a), &a).is_empty());
        let b = spec(b"b", 5);
        let c = spec_changes(Some(&a), &b);
        let fields: Vec<&str> = c.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(fields, vec!["image", "replicas"]);
        assert_eq!(c[1].old.as_deref(), Some("3"));
        assert_eq!(c[1].new, "5");
        let all = spec_changes(None, &a);
        assert!(all.iter().all(|c| c.old.is_none()));
        let fields: Vec<&str> = all.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(
            fields,
            vec!["image", "replicas"],
            "empty fields of a new service are left out"
        );
    }

    #[test]
    fn the_journal_is_reset_for_another_service_or_contract() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join(JOURNAL);
        let mut j = Journal::load(&path, "a", "0x1");
        j.chain = Some(ChainStep {
            spec_hash: "h".into(),
            version: 2,
            tx: None,
            block: None,
        });
        j.save(&path).expect("save");
        assert_eq!(Journal::load(&path, "a", "0x1"), j);
        assert!(Journal::load(&path, "b", "0x1").chain.is_none());
        assert!(Journal::load(&path, "a", "0x2").chain.is_none());
    }
}
