//! What a replicator sees live.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::id::ServiceId;
use crate::image::ImageRef;
use crate::spec::{Port, Probes, Resources, SecretEnv, ServiceSpec};

/// The fields of a replica template that must match the record: everything in the
/// spec except the replica count. Replicators rebuild it from live objects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadTemplate {
    /// Image reference in the template.
    pub image: ImageRef,
    /// Container arguments.
    pub args: Vec<String>,
    /// Ports.
    pub ports: Vec<Port>,
    /// Plain environment.
    pub env: BTreeMap<String, String>,
    /// Secret-backed environment.
    pub secret_env: Vec<SecretEnv>,
    /// Resources.
    pub resources: Resources,
    /// Probes.
    pub probes: Probes,
}

impl WorkloadTemplate {
    /// The template a spec asks for.
    pub fn from_spec(spec: &ServiceSpec) -> Self {
        Self {
            image: spec.image.clone(),
            args: spec.args.clone(),
            ports: spec.ports.clone(),
            env: spec.env.clone(),
            secret_env: spec.secret_env.clone(),
            resources: spec.resources.clone(),
            probes: spec.probes.clone(),
        }
    }

    /// Names of the fields (other than the image) that differ from `other`.
    pub fn differing_fields(&self, other: &WorkloadTemplate) -> Vec<&'static str> {
        let mut out = Vec::new();
        if self.args != other.args {
            out.push("args");
        }
        if self.ports != other.ports {
            out.push("ports");
        }
        if self.env != other.env {
            out.push("env");
        }
        if self.secret_env != other.secret_env {
            out.push("secret_env");
        }
        if self.resources != other.resources {
            out.push("resources");
        }
        if self.probes != other.probes {
            out.push("probes");
        }
        out
    }
}

/// One replica as seen live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedReplica {
    /// Stable replica name (e.g. `ledger-0`).
    pub name: String,
    /// Image digest the replica actually runs, if reported.
    pub image_digest: Option<Digest>,
    /// Whether it is ready.
    pub ready: bool,
    /// Whether it has failed (crashed, evicted, its node lost).
    pub failed: bool,
}

/// The live state of one service's workload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedState {
    /// Service id.
    pub id: ServiceId,
    /// Record version the workload was applied from (from its labels; informational).
    pub applied_version: Option<u64>,
    /// Replica count of the live workload object.
    pub desired_replicas: u32,
    /// Replicas ready now.
    pub ready_replicas: u32,
    /// Live template, rebuilt from the objects (not from annotations).
    pub template: WorkloadTemplate,
    /// The replicas.
    pub replicas: Vec<ObservedReplica>,
    /// Supporting objects (services, budgets, config) that are missing.
    pub missing_parts: Vec<String>,
    /// Fields of the workload's objects set by someone other than the replicator
    /// (e.g. an env var added with `kubectl patch`), each as `object: field (by
    /// manager)`. They are drift even where the rebuilt template cannot show them.
    #[serde(default)]
    pub foreign_fields: Vec<String>,
}

impl ObservedState {
    /// Names of replicas that failed or are not ready.
    pub fn unhealthy(&self) -> Vec<String> {
        self.replicas
            .iter()
            .filter(|r| r.failed || !r.ready)
            .map(|r| r.name.clone())
            .collect()
    }
}
