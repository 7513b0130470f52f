//! The replicated log trait: an ordered, durable, fenced sequence of entries with a
//! leader election, the substrate of execution replication (see [`crate::replica`]).
//!
//! Indexes start at 1; an empty log has `last_index() == 0` and `first_index() == 1`.
//! Only the holder of the current [`Leadership`] may append: every append is guarded by
//! its fencing token (`term`), so a deposed leader's writes are refused with
//! [`crate::Error::Conflict`] and never interleave with the new leader's.

use std::fmt::Debug;
use std::ops::RangeInclusive;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};

use crate::error::Result;

mod memory;

pub use memory::InMemoryLog;

/// Default largest payload of one entry accepted by [`ReplicatedLog::append`].
pub const MAX_ENTRY_BYTES: usize = 1024 * 1024;

/// One committed log entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Position in the log, starting at 1.
    pub index: u64,
    /// Fencing token (term) of the leader that appended it.
    pub term: u64,
    /// Opaque payload.
    pub data: Bytes,
}

/// Proof of leadership returned by [`ReplicatedLog::campaign`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leadership {
    /// The candidate value that won (a replica's endpoint, by convention).
    pub candidate: String,
    /// Fencing token: strictly greater than every earlier leadership's term on the
    /// same log.
    pub term: u64,
    /// Backend-specific handle of the leadership (e.g. the etcd leader key).
    pub key: String,
}

/// The current leader as seen by any client of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderInfo {
    /// The candidate value of the leader.
    pub candidate: String,
    /// Its fencing token.
    pub term: u64,
}

/// A stream of entries in index order, without gaps. An error ends the stream.
pub type EntryStream = BoxStream<'static, Result<Entry>>;

/// A stream of leader changes: the current leader first, then every change (`None`
/// while there is no leader). An error ends the stream.
pub type LeaderStream = BoxStream<'static, Result<Option<LeaderInfo>>>;

/// An ordered, replicated, fenced log with leader election.
///
/// Errors: an unreachable backend is [`crate::Error::Unavailable`] (retryable: the
/// outcome of a failed append is then unknown); a stale or foreign fencing token is
/// [`crate::Error::Conflict`] (nothing was written); reading below
/// [`ReplicatedLog::first_index`] is [`crate::Error::NotFound`] (compacted); invalid
/// arguments are [`crate::Error::InvalidInput`].
#[async_trait]
pub trait ReplicatedLog: Send + Sync + Debug {
    /// Campaigns for leadership as `candidate` and returns once elected (waits while
    /// another client leads). The leadership lasts while this client's session
    /// (lease) lives, until [`ReplicatedLog::resign`]. Campaigning again while leading
    /// returns the current leadership (idempotent).
    async fn campaign(&self, candidate: &str) -> Result<Leadership>;

    /// Gives leadership up so another candidate may win. Idempotent: resigning a
    /// leadership that is already lost is a no-op.
    async fn resign(&self, leadership: &Leadership) -> Result<()>;

    /// The current leader, if any.
    async fn leader(&self) -> Result<Option<LeaderInfo>>;

    /// Observes leader changes (push based, no polling by the caller).
    async fn observe(&self) -> Result<LeaderStream>;

    /// Appends `entries` atomically at the end of the log if `leadership` is still
    /// current, and returns their index range once committed. Not idempotent: every
    /// successful call adds entries. A stale token is [`crate::Error::Conflict`]; no
    /// entries or an entry over [`MAX_ENTRY_BYTES`] is [`crate::Error::InvalidInput`].
    async fn append(
        &self,
        leadership: &Leadership,
        entries: Vec<Bytes>,
    ) -> Result<RangeInclusive<u64>>;

    /// Up to `max` committed entries from index `from` on (fewer at the end of the
    /// log; empty past it). `from` below the first index is [`crate::Error::NotFound`].
    async fn read(&self, from: u64, max: usize) -> Result<Vec<Entry>>;

    /// Every entry from index `from` on: those already committed, then new ones as
    /// they commit, in order and without gaps. `from` below the first index is
    /// [`crate::Error::NotFound`].
    async fn watch(&self, from: u64) -> Result<EntryStream>;

    /// Discards entries up to and including `up_to`. Idempotent: compacting below the
    /// first index is a no-op. `up_to` past the last index is
    /// [`crate::Error::InvalidInput`].
    async fn compact(&self, up_to: u64) -> Result<()>;

    /// Index of the oldest retained entry (`last_index() + 1` when none is retained).
    async fn first_index(&self) -> Result<u64>;

    /// Index of the newest entry, 0 for an empty log.
    async fn last_index(&self) -> Result<u64>;
}

/// Checks the arguments of an append: at least one entry, none larger than `max`.
pub fn check_entries(entries: &[Bytes], max: usize) -> Result<()> {
    use crate::error::ValidationError;
    if entries.is_empty() {
        return Err(ValidationError::malformed("log append", "no entries").into());
    }
    if let Some(e) = entries.iter().find(|e| e.len() > max) {
        return Err(ValidationError::malformed(
            "log entry",
            format!("{} bytes is over the limit of {max}", e.len()),
        )
        .into());
    }
    Ok(())
}
