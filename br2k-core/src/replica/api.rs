//! The replica's API types: the [`StateMachine`] a host service implements, the
//! [`Effect`] it runs at most once, and the replica's role, errors, settings and
//! counters.

use std::fmt::Debug;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, ValidationError};
use crate::id::ServiceId;
use crate::image::Repository;
use crate::record::Location;

/// A host service's deterministic state.
///
/// `apply` must depend only on the state, the command and the logged effect result:
/// every replica applies the same entries in the same order and must reach the same
/// state. Snapshots are taken from a clone, off the apply path, so make `Clone`
/// cheap (e.g. persistent or `Arc`-shared structures) for large states.
pub trait StateMachine: Clone + Send + Sync + 'static {
    /// A state-changing command.
    type Command: Serialize + DeserializeOwned + Clone + Debug + Send + Sync + 'static;
    /// What applying a command returns to the client.
    type Output: Serialize + DeserializeOwned + Clone + Debug + Send + Sync + 'static;

    /// Rejects a malformed command before it is logged (default: accept).
    fn validate(&self, _command: &Self::Command) -> Result<(), ValidationError> {
        Ok(())
    }

    /// Applies `command`; `effect` is the logged result of a [`Replica::once`](super::Replica::once) effect.
    fn apply(&mut self, command: &Self::Command, effect: Option<&[u8]>) -> Self::Output;

    /// Serializes the whole state (called on a clone, in a blocking task).
    fn snapshot(&self) -> Result<Vec<u8>>;

    /// Replaces the whole state by a snapshot; malformed bytes are
    /// [`Error::InvalidInput`] and leave the state unchanged.
    fn restore(&mut self, bytes: &[u8]) -> Result<()>;
}

/// A side effect run by the leader at most once per idempotency key.
#[async_trait]
pub trait Effect<C>: Send + Sync + Debug {
    /// Whether the effect for `key` already happened (e.g. a transaction carrying
    /// `key` is on chain or pending), and its result if so. Must be reliable: a new
    /// leader runs the effect again only when this says `None`.
    async fn lookup(&self, key: &str, command: &C) -> Result<Option<Vec<u8>>>;

    /// Performs the effect for `key` and returns its result (to be logged).
    async fn run(&self, key: &str, command: &C) -> Result<Vec<u8>>;
}

/// The role of a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplicaRole {
    /// Restoring a checkpoint and catching up with the log.
    Joining,
    /// Applying the leader's entries; redirects clients.
    Follower,
    /// Accepting commands.
    Leader,
}

/// Why a replica did not serve a request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplicaError {
    /// This replica does not lead: retry at `leader` (unknown during an election).
    #[error("not the leader; leader is {}", leader.as_ref().map_or("unknown", |l| l.endpoint.as_str()))]
    NotLeader {
        /// Where the leader is, if known.
        leader: Option<Location>,
    },
    /// Any other failure.
    #[error(transparent)]
    Failed(#[from] Error),
}

impl From<ReplicaError> for Error {
    fn from(e: ReplicaError) -> Self {
        match e {
            ReplicaError::NotLeader { leader } => Error::unavailable(format!(
                "not the leader; leader is {}",
                leader.map_or("unknown".to_owned(), |l| l.endpoint)
            )),
            ReplicaError::Failed(e) => e,
        }
    }
}

/// Settings of a [`Replica`](super::Replica).
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// The replicated service.
    pub service: ServiceId,
    /// This replica's endpoint: its candidate value and published location.
    pub endpoint: String,
    /// Repository of the snapshot artifacts.
    pub snapshot_repository: Repository,
    /// Snapshot every this many entries (0 disables snapshots).
    pub snapshot_every: u64,
    /// Largest serialized command accepted.
    pub max_command_bytes: usize,
    /// Most commands in one append.
    pub max_batch: usize,
    /// Most idempotency keys remembered (oldest forgotten first, deterministically).
    pub dedupe_capacity: usize,
    /// How long a request waits for commit and apply.
    pub request_timeout: Duration,
    /// Whether this replica campaigns for leadership.
    pub campaign: bool,
    /// For a service placed across clusters: lead and run side effects only while
    /// this replica's cluster holds the placement lease (a replica of a cluster that
    /// lost it resigns and stays a follower). `None`: no placement.
    pub placement: Option<crate::failover::PlacementFence>,
}

impl ReplicaConfig {
    /// Defaults: snapshot every 10,000 entries, 64 KiB commands, batches of 512,
    /// 100,000 remembered keys, 10 s request timeout, campaigning.
    pub fn new(service: ServiceId, endpoint: impl Into<String>) -> Result<Self> {
        let endpoint = endpoint.into();
        Location::new(endpoint.clone(), 0)?;
        let snapshot_repository = Repository::new(format!("br2k/{}/snapshots", service.as_str()))?;
        Ok(Self {
            service,
            endpoint,
            snapshot_repository,
            snapshot_every: 10_000,
            max_command_bytes: 64 * 1024,
            max_batch: 512,
            dedupe_capacity: 100_000,
            request_timeout: Duration::from_secs(10),
            campaign: true,
            placement: None,
        })
    }
}

/// Counters of a replica.
#[derive(Debug, Default)]
pub struct Stats {
    /// Appends made by this replica as leader.
    pub appends: AtomicU64,
    /// Entries those appends carried.
    pub appended_entries: AtomicU64,
    /// Snapshots pushed and recorded.
    pub checkpoints: AtomicU64,
    /// Effects run (not looked up) by this replica.
    pub effects_run: AtomicU64,
    /// Location publications by this replica.
    pub locations_published: AtomicU64,
}
