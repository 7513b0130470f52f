//! Findings, recovery actions and reports.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::id::ServiceId;

/// One thing found wrong with a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "finding")]
#[non_exhaustive]
pub enum Finding {
    /// The workload (or a required part of it) does not exist.
    MissingWorkload {
        /// Which parts are missing (empty: the whole workload).
        parts: Vec<String>,
    },
    /// A workload runs that the record says must not (service stopped or unknown).
    UnexpectedWorkload,
    /// The live replica count differs from the record (and no autoscaler owns it).
    ReplicasDrifted {
        /// Recorded count.
        desired: u32,
        /// Live count.
        observed: u32,
    },
    /// The live image differs from the recorded digest.
    ImageDrifted {
        /// Recorded digest.
        expected: Digest,
        /// Live reference.
        observed: String,
    },
    /// Template fields other than the image differ from the record.
    TemplateTampered {
        /// The differing fields.
        fields: Vec<String>,
    },
    /// The workload pulls its image from a registry that does not serve the verified
    /// image now (down, missing or corrupt copy) while another registry does.
    ImageSourceUnhealthy {
        /// The registry the live workload names.
        registry: String,
    },
    /// Fields of the workload set by another writer (field manager); the repair
    /// removes them.
    ForeignFields {
        /// Each as `object: field (by manager)`.
        fields: Vec<String>,
    },
    /// Replicas failed or are not ready.
    ReplicasUnhealthy {
        /// Ready count.
        ready: u32,
        /// Desired count.
        desired: u32,
        /// Names of the unhealthy replicas.
        replicas: Vec<String>,
    },
    /// A registry does not hold the recorded image.
    ImageUnavailable {
        /// The registry.
        registry: String,
    },
    /// A registry serves bytes that do not match the recorded digest.
    ImageTampered {
        /// The registry.
        registry: String,
        /// What failed verification.
        detail: String,
    },
    /// A registry cannot be reached.
    RegistryDown {
        /// The registry.
        registry: String,
    },
    /// The chain endpoint(s) cannot be reached; the last verified record is used.
    ChainEndpointDown {
        /// Description of the failure.
        detail: String,
    },
}

impl Finding {
    /// A short stable name, for metrics and tables.
    pub fn name(&self) -> &'static str {
        match self {
            Finding::MissingWorkload { .. } => "missing_workload",
            Finding::UnexpectedWorkload => "unexpected_workload",
            Finding::ReplicasDrifted { .. } => "replicas_drifted",
            Finding::ImageDrifted { .. } => "image_drifted",
            Finding::TemplateTampered { .. } => "template_tampered",
            Finding::ForeignFields { .. } => "foreign_fields",
            Finding::ImageSourceUnhealthy { .. } => "image_source_unhealthy",
            Finding::ReplicasUnhealthy { .. } => "replicas_unhealthy",
            Finding::ImageUnavailable { .. } => "image_unavailable",
            Finding::ImageTampered { .. } => "image_tampered",
            Finding::RegistryDown { .. } => "registry_down",
            Finding::ChainEndpointDown { .. } => "chain_endpoint_down",
        }
    }
}

/// The result of diagnosing one service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diagnosis {
    /// The service.
    pub id: ServiceId,
    /// Record version the diagnosis compared against (None: no record could be read).
    pub record_version: Option<u64>,
    /// Findings; empty means healthy.
    pub findings: Vec<Finding>,
}

impl Diagnosis {
    /// Whether nothing is wrong.
    pub fn is_healthy(&self) -> bool {
        self.findings.is_empty()
    }
}

/// One step the recoverer takes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "action")]
#[non_exhaustive]
pub enum RecoveryAction {
    /// Apply the record to the cluster (recreates, rescales, restores the template).
    ApplyRecord {
        /// Record version applied.
        version: u64,
        /// Registry the image is pulled from (the first healthy one).
        registry: String,
    },
    /// Delete failed replicas so they are recreated.
    ReplaceReplicas {
        /// Replica names.
        replicas: Vec<String>,
    },
    /// Remove a workload that must not run.
    RemoveWorkload,
    /// Copy the image from a healthy registry to one that lost it or serves wrong bytes.
    RepairImage {
        /// Source registry.
        from: String,
        /// Target registry.
        to: String,
    },
    /// Keep serving from the last verified record while the chain is unreachable.
    UseLastVerifiedRecord,
    /// Nothing can be done now (e.g. no registry holds correct bytes); retry later.
    Wait {
        /// Why.
        reason: String,
    },
}

/// How one action went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActionOutcome {
    /// The action.
    pub action: RecoveryAction,
    /// How long it took.
    pub duration: Duration,
    /// Error text when it failed.
    pub error: Option<String>,
    /// The error's kind ([`crate::Error::kind`]) when it failed: `invalid_input` means
    /// a backend refused what the record asks for, which no retry will change.
    #[serde(default)]
    pub error_kind: Option<crate::ErrorKind>,
}

/// Overall result of a recovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Nothing was wrong.
    Healthy,
    /// Every action succeeded and the live state, observed again, matches the record.
    Recovered,
    /// Some actions failed or had to wait, or something remained wrong afterwards.
    Partial,
    /// Every action failed.
    Failed,
}

/// What a recovery did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryReport {
    /// The service.
    pub id: ServiceId,
    /// The diagnosis acted on.
    pub diagnosis: Diagnosis,
    /// Actions with their outcome, in order.
    pub actions: Vec<ActionOutcome>,
    /// Total time.
    pub duration: Duration,
    /// Overall outcome: [`Outcome::Recovered`] only when the live state, observed
    /// again after the actions, matches the record.
    pub outcome: Outcome,
    /// What was still wrong when the recovery ended (empty when recovered).
    #[serde(default)]
    pub remaining: Vec<Finding>,
    /// Whether, when the report was made, the workload ran exactly the record: every
    /// replica ready on the recorded digest (no workload, when none must run).
    #[serde(default)]
    pub converged: bool,
}
