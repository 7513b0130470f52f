//! What the service registry records: [`ServiceRecord`] and its parts.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::ValidationError;
use crate::id::ServiceId;
use crate::spec::{ServiceSpec, looks_secret};

/// Lifecycle state of a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceState {
    /// Registered, not yet started: nothing runs.
    Ready,
    /// Running with the recorded replica count.
    Running,
    /// Kept deployed with zero replicas.
    Paused,
    /// Removed from the cluster; can be started again.
    Stopped,
}

impl ServiceState {
    /// Stable numeric code (as stored on chain).
    pub fn code(self) -> u8 {
        match self {
            ServiceState::Ready => 0,
            ServiceState::Running => 1,
            ServiceState::Paused => 2,
            ServiceState::Stopped => 3,
        }
    }

    /// Inverse of [`ServiceState::code`].
    pub fn from_code(code: u8) -> Result<Self, ValidationError> {
        Ok(match code {
            0 => ServiceState::Ready,
            1 => ServiceState::Running,
            2 => ServiceState::Paused,
            3 => ServiceState::Stopped,
            other => {
                return Err(ValidationError::malformed(
                    "service state",
                    format!("unknown code {other}"),
                ));
            }
        })
    }

    /// Whether moving from `self` to `to` is allowed. `pause` needs Running, `resume`
    /// (to Running) works from Ready, Paused or Stopped, `stop` from anything but Stopped.
    pub fn can_become(self, to: ServiceState) -> bool {
        use ServiceState::*;
        matches!(
            (self, to),
            (Ready | Paused | Stopped, Running)
                | (Running, Paused)
                | (Ready | Running | Paused, Stopped)
        )
    }
}

impl fmt::Display for ServiceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServiceState::Ready => "ready",
            ServiceState::Running => "running",
            ServiceState::Paused => "paused",
            ServiceState::Stopped => "stopped",
        })
    }
}

/// An account that acts on the registry (an address on chain, a name in memory).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Account(pub String);

impl fmt::Display for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A role an owner grants on one service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// May publish, scale, pause/resume/stop and roll back.
    Operator,
    /// May record checkpoints and the service location.
    Replica,
}

/// A recorded state version: a snapshot stored as an OCI artifact plus the log
/// position it covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Digest of the snapshot artifact.
    pub snapshot: Digest,
    /// Last log index included in the snapshot.
    pub log_index: u64,
    /// Leadership term in which it was taken.
    pub term: u64,
    /// State version: the number of checkpoints so far, increasing by one.
    pub state_version: u64,
}

/// Where clients reach the service leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Location {
    /// Leader endpoint, e.g. `http://10.0.0.7:8080` (never with credentials).
    pub endpoint: String,
    /// Leadership term of that leader.
    pub term: u64,
}

impl Location {
    /// Validates an endpoint: at most 256 bytes, no credentials, no query, no spaces.
    pub fn new(endpoint: impl Into<String>, term: u64) -> Result<Self, ValidationError> {
        let endpoint = endpoint.into();
        let bad = |r: &str| ValidationError::malformed("location endpoint", r);
        if endpoint.is_empty() || endpoint.len() > 256 {
            return Err(bad("must be 1-256 bytes"));
        }
        if endpoint
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(bad("must not contain whitespace"));
        }
        if endpoint.contains('?') || looks_secret(&endpoint) {
            return Err(bad("must not carry credentials or query parameters"));
        }
        Ok(Self { endpoint, term })
    }
}

/// Which cluster runs the service, and the epoch (fencing token) of that choice.
///
/// Recorded by the operator of the cluster that won the service's placement lease;
/// the epoch only grows, so a cluster that comes back after a failover sees a newer
/// epoch than its own and stands down.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// Name of the active cluster (a DNS label of at most 32 bytes).
    pub cluster: String,
    /// Fencing token of the placement lease: strictly greater for every new holder.
    pub epoch: u64,
}

impl Placement {
    /// Validates the cluster name (see [`check_cluster_name`]).
    pub fn new(cluster: impl Into<String>, epoch: u64) -> Result<Self, ValidationError> {
        let cluster = cluster.into();
        check_cluster_name(&cluster)?;
        Ok(Self { cluster, epoch })
    }
}

/// Longest cluster name: it is stored on chain in one 32-byte word.
pub const MAX_CLUSTER_NAME_BYTES: usize = 32;

/// Checks a cluster name: 1-32 bytes of lowercase letters, digits and `-`, starting
/// and ending with a letter or digit.
pub fn check_cluster_name(name: &str) -> Result<(), ValidationError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_CLUSTER_NAME_BYTES
        && name
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(ValidationError::malformed(
            "cluster name",
            format!("{name:?}: need 1-32 lowercase letters, digits or '-', not at either end"),
        ))
    }
}

/// One published version of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// Version number, starting at 1.
    pub version: u64,
    /// The spec of this version.
    pub spec: ServiceSpec,
    /// Canonical hash of `spec`.
    pub spec_hash: Digest,
    /// Who published it.
    pub publisher: Account,
    /// When (block timestamp or Unix seconds), if known.
    pub published_at: Option<u64>,
}

/// The active record of a service: what must run now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRecord {
    /// Service id.
    pub id: ServiceId,
    /// Active version number (the version pointer).
    pub version: u64,
    /// Number of versions published so far.
    pub latest_version: u64,
    /// Spec of the active version.
    pub spec: ServiceSpec,
    /// Canonical hash of `spec`, as recorded.
    pub spec_hash: Digest,
    /// Desired replica count (the active version's, unless scaled since).
    pub replicas: u32,
    /// Lifecycle state.
    pub state: ServiceState,
    /// Owner account.
    pub owner: Account,
    /// Newest checkpoint, if any.
    pub checkpoint: Option<Checkpoint>,
    /// Current leader location, if published.
    pub location: Option<Location>,
    /// The active cluster and its epoch, if recorded (multi-cluster services).
    #[serde(default)]
    pub placement: Option<Placement>,
    /// Position of the source this was read at (block number, revision), if any.
    pub as_of: Option<u64>,
    /// True when the source was unreachable and this is the last verified copy.
    pub stale: bool,
}

impl ServiceRecord {
    /// Replicas that must run given the state: `replicas` when Running, else 0.
    pub fn desired_replicas(&self) -> u32 {
        match self.state {
            ServiceState::Running => self.replicas,
            _ => 0,
        }
    }

    /// Whether a workload must exist in the cluster (Running or Paused).
    pub fn wants_workload(&self) -> bool {
        matches!(self.state, ServiceState::Running | ServiceState::Paused)
    }

    /// Checks that `spec_hash` is the canonical hash of `spec`.
    pub fn verify(&self) -> Result<(), crate::Error> {
        let actual = self.spec.spec_hash();
        if actual == self.spec_hash {
            Ok(())
        } else {
            Err(crate::Error::tampered(
                format!("spec of {} v{}", self.id, self.version),
                self.spec_hash,
                actual,
            ))
        }
    }
}

/// What changed in the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
#[non_exhaustive]
pub enum ChangeKind {
    /// A service was registered (version 1).
    Registered,
    /// A new version was published and made active.
    Published {
        /// The new version.
        version: u64,
    },
    /// The replica count changed.
    Scaled {
        /// New count.
        replicas: u32,
    },
    /// The lifecycle state changed.
    StateChanged {
        /// New state.
        state: ServiceState,
    },
    /// The active pointer moved back to an earlier version.
    RolledBack {
        /// Now active version.
        version: u64,
    },
    /// A checkpoint was recorded.
    Checkpointed {
        /// The checkpoint.
        checkpoint: Checkpoint,
    },
    /// The leader location changed.
    Relocated {
        /// New location.
        location: Location,
    },
    /// The active cluster changed (a failover or the first placement).
    Placed {
        /// New placement.
        placement: Placement,
    },
    /// Roles or ownership changed.
    RolesChanged,
}

/// One change of one service in the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryChange {
    /// The service.
    pub id: ServiceId,
    /// What changed.
    pub kind: ChangeKind,
    /// Position in the source (block number, sequence), if any.
    pub at: Option<u64>,
}
