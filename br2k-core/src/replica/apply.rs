//! Applying the log: the logged operations ([`Op`]), the replicated state they build
//! ([`Applied`]), applying one entry as a pure function of that state
//! ([`Applied::apply`]), and the loop that follows the log and answers waiters.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::{ReplicaRole, Shared, StateMachine};
use crate::error::Error;
use crate::log::Entry;

/// First wait before a replica the log was compacted past asks for a newer checkpoint
/// again.
const RESTORE_RETRY_FIRST: Duration = Duration::from_millis(200);
/// Longest such wait.
const RESTORE_RETRY_MAX: Duration = Duration::from_secs(5);

/// At debug level, a state fingerprint is logged every this many entries.
const FINGERPRINT_EVERY: u64 = 10;

/// One logged operation (the payload of a log entry).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub(super) enum Op<C> {
    /// A leadership barrier.
    Noop { id: String },
    /// A replicated command.
    Cmd {
        id: String,
        key: Option<String>,
        cmd: C,
    },
    /// A once-command about to run its effect.
    Intent { id: String, key: String, cmd: C },
    /// The effect's result.
    Done {
        id: String,
        key: String,
        effect: String,
    },
    /// The effect failed: the key may be tried again.
    Aborted {
        id: String,
        key: String,
        reason: String,
    },
}

/// Why an applied entry answers its waiter with a conflict (typed, never matched by
/// its text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum Rejection {
    /// An intent with the same key is pending or already done.
    #[error("duplicate intent")]
    DuplicateIntent,
    /// The logged effect result is not hex.
    #[error("malformed effect result: {0}")]
    MalformedEffect(String),
    /// The effect failed, as its `Aborted` entry says.
    #[error("effect for {key} failed: {reason}")]
    EffectFailed { key: String, reason: String },
}

/// What a waiter receives once its entry is applied.
pub(super) type Outcome<O> = std::result::Result<Option<O>, Rejection>;

/// Outcomes to deliver, by entry id or once-key.
pub(super) type Notices<O> = Vec<(String, Outcome<O>)>;

/// The replicated part of a replica: state machine plus bookkeeping, all of it
/// derived from the log and included in snapshots.
#[derive(Debug, Clone)]
pub(super) struct Applied<S: StateMachine> {
    pub(super) sm: S,
    pub(super) index: u64,
    pub(super) term: u64,
    pub(super) dedupe: HashMap<String, S::Output>,
    pub(super) dedupe_order: VecDeque<String>,
    pub(super) pending: BTreeMap<String, S::Command>,
    pub(super) skipped: u64,
}

impl<S: StateMachine> Applied<S> {
    /// The state before the first entry.
    pub(super) fn new(sm: S) -> Self {
        Self {
            sm,
            index: 0,
            term: 0,
            dedupe: HashMap::new(),
            dedupe_order: VecDeque::new(),
            pending: BTreeMap::new(),
            skipped: 0,
        }
    }

    /// Applies `entry` when it is the next one, as every replica does, and returns
    /// what its waiters (by entry id or once-key) receive. `None` when it is not the
    /// next entry: already applied, or a gap (which the log must not produce).
    /// Depends only on the state and the entry; a malformed entry is skipped
    /// (counted, the same on every replica).
    pub(super) fn apply(
        &mut self,
        entry: &Entry,
        dedupe_capacity: usize,
    ) -> Option<Notices<S::Output>> {
        if entry.index != self.index + 1 {
            if entry.index > self.index + 1 {
                tracing::error!(index = entry.index, applied = self.index, "gap in the log");
            }
            return None;
        }
        self.index = entry.index;
        self.term = entry.term;
        let mut notify = Vec::new();
        match serde_json::from_slice::<Op<S::Command>>(&entry.data) {
            Err(e) => {
                self.skipped += 1;
                tracing::warn!(index = entry.index, error = %e, "skipping a malformed entry");
            }
            Ok(Op::Noop { id }) => notify.push((id, Ok(None))),
            Ok(Op::Cmd { id, key, cmd }) => {
                let out = match key.as_ref().and_then(|k| self.dedupe.get(k)) {
                    Some(out) => out.clone(),
                    None => {
                        let out = self.sm.apply(&cmd, None);
                        if let Some(k) = key {
                            self.remember(k, out.clone(), dedupe_capacity);
                        }
                        out
                    }
                };
                notify.push((id, Ok(Some(out))));
            }
            Ok(Op::Intent { id, key, cmd }) => {
                let okey = format!("o:{key}");
                if !self.dedupe.contains_key(&okey) && !self.pending.contains_key(&key) {
                    self.pending.insert(key, cmd);
                    notify.push((id, Ok(None)));
                } else {
                    notify.push((id, Err(Rejection::DuplicateIntent)));
                }
            }
            Ok(Op::Done { id, key, effect }) => {
                let okey = format!("o:{key}");
                let result = match (self.pending.remove(&key), hex::decode(&effect)) {
                    (Some(cmd), Ok(effect)) => {
                        let out = self.sm.apply(&cmd, Some(&effect));
                        self.remember(okey.clone(), out.clone(), dedupe_capacity);
                        Ok(Some(out))
                    }
                    (Some(cmd), Err(e)) => {
                        self.pending.insert(key.clone(), cmd);
                        Err(Rejection::MalformedEffect(e.to_string()))
                    }
                    (None, _) => Ok(self.dedupe.get(&okey).cloned()),
                };
                notify.push((id, result.clone()));
                notify.push((okey, result));
            }
            Ok(Op::Aborted { id, key, reason }) => {
                self.pending.remove(&key);
                let okey = format!("o:{key}");
                let rejection = Rejection::EffectFailed { key, reason };
                notify.push((id, Err(rejection.clone())));
                notify.push((okey, Err(rejection)));
            }
        }
        Some(notify)
    }

    /// Remembers the output of `key`, forgetting the oldest keys beyond `capacity`.
    fn remember(&mut self, key: String, out: S::Output, capacity: usize) {
        if self.dedupe.insert(key.clone(), out).is_none() {
            self.dedupe_order.push_back(key);
        }
        while self.dedupe_order.len() > capacity.max(1) {
            if let Some(old) = self.dedupe_order.pop_front() {
                self.dedupe.remove(&old);
            }
        }
    }
}

impl<S: StateMachine> Shared<S> {
    /// Follows the log from the applied index, restoring the newest checkpoint when
    /// the needed entries were compacted away.
    pub(super) async fn apply_loop(self: Arc<Self>) {
        let mut behind = RESTORE_RETRY_FIRST;
        loop {
            let from = self.applied.lock().index + 1;
            let mut stream = match self.log.watch(from).await {
                Ok(s) => s,
                Err(Error::NotFound { .. }) => {
                    // Compacted past this replica: only a newer checkpoint helps. None
                    // yet (the record read is older than the compaction, or the chain
                    // is unreachable): wait, longer each time, instead of asking again
                    // at once.
                    match self.restore_newest(true).await {
                        Ok(true) => {
                            behind = RESTORE_RETRY_FIRST;
                            continue;
                        }
                        Ok(false) => tracing::warn!(
                            applied = self.applied.lock().index,
                            retry_in = ?behind,
                            "the log is compacted past this replica and no newer checkpoint is recorded yet"
                        ),
                        Err(e) => {
                            tracing::error!(error = %e, retry_in = ?behind, "cannot restore the newest checkpoint")
                        }
                    }
                    tokio::time::sleep(behind).await;
                    behind = (behind * 2).min(RESTORE_RETRY_MAX);
                    continue;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "watch failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            tracing::debug!(from, "following the log");
            while let Some(item) = stream.next().await {
                match item {
                    Ok(entry) => self.apply_entry(&entry),
                    Err(e) => {
                        tracing::debug!(error = %e, "watch ended");
                        break;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Applies `entry` to the replicated state, answers its waiters, and starts a
    /// checkpoint when one falls due on the leader.
    pub(super) fn apply_entry(self: &Arc<Self>, entry: &Entry) {
        let (notify, snapshot_due) = {
            let mut a = self.applied.lock();
            let Some(notify) = a.apply(entry, self.cfg.dedupe_capacity) else {
                return;
            };
            let due = self.cfg.snapshot_every > 0
                && a.index.is_multiple_of(self.cfg.snapshot_every)
                && *self.role.borrow() == ReplicaRole::Leader;
            (notify, due)
        };
        self.applied_tx.send_replace(entry.index);
        if entry.index.is_multiple_of(FINGERPRINT_EVERY) {
            self.trace_fingerprint("applied");
        }
        if !notify.is_empty() {
            let mut waiters = self.waiters.lock();
            for (id, outcome) in notify {
                if let Some(list) = waiters.remove(&id) {
                    for tx in list {
                        let _ = tx.send(outcome.clone());
                    }
                }
            }
        }
        if snapshot_due {
            self.checkpoint_due();
        }
    }
}

impl<S: StateMachine> Shared<S> {
    /// At debug level: the applied index and a digest of the state machine's snapshot,
    /// to compare replicas' states index by index when chasing a divergence.
    pub(super) fn trace_fingerprint(&self, at: &'static str) {
        if !tracing::enabled!(tracing::Level::DEBUG) {
            return;
        }
        let a = self.applied.lock();
        if let Ok(bytes) = a.sm.snapshot() {
            let digest = crate::digest::Digest::of(&bytes);
            tracing::debug!(at, index = a.index, pending = a.pending.len(), dedupe = a.dedupe.len(), state = %digest.hex(), "fingerprint");
        }
    }
}
