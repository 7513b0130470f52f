//! Whole-cluster failover: exactly one cluster runs a multi-cluster service at a time.
//!
//! A service whose spec lists [`clusters`](crate::ServiceSpec::clusters) is *placed*:
//! one operator runs in each listed cluster, and the cluster whose operator holds the
//! service's **placement lease** runs it; the others keep it paused (a warm standby).
//! The lease is the leadership of a [`ReplicatedLog`] namespace of its own
//! ([`placement_namespace`]), held by the operator's session (lease) on the log's
//! etcd cluster: it lives outside every Kubernetes cluster, so it survives the loss of
//! any one of them, and it expires within its TTL when the holder dies or is cut off.
//! Its fencing token (the leadership term) is the placement **epoch**: strictly
//! greater for every new holder. The winner records `(cluster, epoch)` on chain
//! ([`crate::Registry::set_placement`], which refuses an epoch that is not newer), and
//! replicas given a [`PlacementFence`] lead and run side effects only while their
//! cluster holds the lease.
//!
//! Why not the chain for the lease itself: a lease must be renewed every few seconds
//! and must expire on its own; on a chain every renewal is a transaction (gas, block
//! time, finality), and a lost holder cannot be detected faster than blocks are
//! final. The etcd lease gives expiry in seconds and a fencing token; the chain keeps
//! the tamper-evident record of who was placed when.
//!
//! Each operator also holds a **heartbeat** (leadership of [`heartbeat_namespace`])
//! while its own API server answers. A standby counts the listed clusters without a
//! heartbeat: when more than [`FailoverConfig::max_lost_share`] of them look lost at
//! once, it does not take over (the **brake**: a partition of the observer is more
//! likely than a mass failure), and its status says why.

mod engine;

pub use engine::{
    ClusterHeartbeat, Decisions, OpenLog, PlacedRegistry, PlacementFence, ServicePlacement,
    note_progress,
};

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::id::ServiceId;
use crate::log::LeaderInfo;

/// The log namespace whose leadership is the placement lease of `service`.
pub fn placement_namespace(service: &ServiceId) -> String {
    format!("br2k/placement/{}", service.as_str())
}

/// The log namespace whose leadership is the heartbeat of `cluster`.
pub fn heartbeat_namespace(cluster: &str) -> String {
    format!("br2k/clusters/{cluster}")
}

/// Settings of a cluster's failover.
#[derive(Debug, Clone)]
pub struct FailoverConfig {
    /// This cluster's name (see [`crate::check_cluster_name`]).
    pub cluster: String,
    /// Above this share of the listed clusters without a heartbeat, no takeover
    /// happens (default 0.5: with two clusters, one lost still fails over).
    pub max_lost_share: f64,
    /// A standby waits this long per more-preferred live cluster before it
    /// campaigns, so the most preferred live standby usually wins (default 1 s).
    pub rank_delay: Duration,
    /// How often the lease and the heartbeats are read (default 250 ms).
    pub poll: Duration,
}

impl FailoverConfig {
    /// Defaults for `cluster` (validated).
    pub fn new(cluster: impl Into<String>) -> crate::Result<Self> {
        let cluster = cluster.into();
        crate::record::check_cluster_name(&cluster)?;
        Ok(Self {
            cluster,
            max_lost_share: 0.5,
            rank_delay: Duration::from_secs(1),
            poll: Duration::from_millis(250),
        })
    }
}

/// What one cluster's operator does about one placed service, decided by [`decide`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Decision {
    /// This cluster holds the lease at `epoch`: run the service.
    Active {
        /// The lease's fencing token.
        epoch: u64,
    },
    /// Another cluster holds the lease: keep the service paused here.
    Standby {
        /// The holder.
        active: String,
        /// Its epoch.
        epoch: u64,
    },
    /// Nobody holds the lease: campaign after `delay` (this cluster's rank among the
    /// live listed clusters times [`FailoverConfig::rank_delay`]).
    Campaign {
        /// How long to wait first.
        #[serde(with = "millis")]
        delay: Duration,
    },
    /// Nobody holds the lease, but too many listed clusters look lost to take over.
    Braked {
        /// The listed clusters without a heartbeat.
        lost: Vec<String>,
        /// How many clusters are listed.
        listed: usize,
    },
    /// This cluster's own API server does not answer: it must not hold the lease.
    Unhealthy,
    /// This cluster is not among the service's clusters: never run it here.
    NotListed,
}

impl Decision {
    /// Whether the service must run in this cluster.
    pub fn runs_here(&self) -> bool {
        matches!(self, Decision::Active { .. })
    }

    /// Its name, as serialized in `kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            Decision::Active { .. } => "active",
            Decision::Standby { .. } => "standby",
            Decision::Campaign { .. } => "campaign",
            Decision::Braked { .. } => "braked",
            Decision::Unhealthy => "unhealthy",
            Decision::NotListed => "not_listed",
        }
    }
}

mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

/// The pure decision of cluster `me` about a service listing `listed` (preference
/// order), given the lease `holder`, the clusters whose heartbeat is `alive`, and
/// whether `me`'s own API server is `healthy`.
pub fn decide(
    cfg: &FailoverConfig,
    listed: &[String],
    holder: Option<&LeaderInfo>,
    alive: &BTreeSet<String>,
    healthy: bool,
) -> Decision {
    let me = cfg.cluster.as_str();
    if !listed.iter().any(|c| c == me) {
        return Decision::NotListed;
    }
    if !healthy {
        return Decision::Unhealthy;
    }
    if let Some(h) = holder {
        return if h.candidate == me {
            Decision::Active { epoch: h.term }
        } else {
            Decision::Standby {
                active: h.candidate.clone(),
                epoch: h.term,
            }
        };
    }
    let lost: Vec<String> = listed
        .iter()
        .filter(|c| c.as_str() != me && !alive.contains(c.as_str()))
        .cloned()
        .collect();
    if lost.len() as f64 > cfg.max_lost_share * listed.len() as f64 {
        return Decision::Braked {
            lost,
            listed: listed.len(),
        };
    }
    let rank = listed
        .iter()
        .take_while(|c| c.as_str() != me)
        .filter(|c| alive.contains(c.as_str()))
        .count();
    Decision::Campaign {
        delay: cfg.rank_delay * rank as u32,
    }
}

/// When the steps of the last failover to this cluster happened (Unix milliseconds).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeline {
    /// This cluster's operator saw no holder of the lease (the active cluster lost).
    pub detected: Option<u64>,
    /// The lease was won: the previous holder's lease had expired or was released.
    pub lease_acquired: Option<u64>,
    /// The new placement was recorded on chain.
    pub recorded: Option<u64>,
    /// The workload was applied in this cluster.
    pub deployed: Option<u64>,
    /// Every replica was Ready.
    pub ready: Option<u64>,
}

/// What a cluster's operator knows about a placed service, for its status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlacementStatus {
    /// The latest decision.
    pub decision: Decision,
    /// The cluster holding the lease, if known.
    pub active_cluster: Option<String>,
    /// Its epoch.
    pub epoch: Option<u64>,
    /// The last failover to this cluster.
    pub timeline: Timeline,
    /// Why nothing happens, when something should (brake, unreachable lease, chain).
    pub message: Option<String>,
}

/// Unix time in milliseconds.
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests;
