//! The replica runtime: execution replication of a host service over a
//! [`ReplicatedLog`].
//!
//! Every replica applies the same commands in log order to its [`StateMachine`].
//! - [`Replica::replicate`] appends a command (concurrent commands are batched into one
//!   append), waits until it is committed **and** applied on this replica, and only then
//!   returns its output.
//! - [`Replica::once`] runs a side effect (e.g. sending a chain transaction) on the
//!   leader only: an intent is logged first, then the effect runs, then its result is
//!   logged so every replica applies the result without running the effect. A new
//!   leader finds intents without a result and resolves them by their idempotency key
//!   with [`Effect::lookup`] before ever running them again.
//! - Client idempotency keys deduplicate retries: the first result is returned again.
//! - Followers answer [`ReplicaError::NotLeader`] with the leader's location; the
//!   leader publishes its location to the [`Registry`] once per leadership change.
//! - State versions: every `snapshot_every` entries the leader snapshots a clone of the
//!   state off the apply path, pushes it as an OCI artifact, records the
//!   [`Checkpoint`](crate::record::Checkpoint) and compacts the log behind the
//!   previous checkpoint. A starting replica restores the newest checkpoint (digest
//!   verified) and replays from it.
//!
//! Layout: the API types in `api`, applying an entry as a pure function (and the
//! loop that feeds it the log) in `apply`, campaigning, leading and batching in
//! `leader`, checkpoints in `checkpoint` (their byte format in `snapshot`); the
//! [`Replica`] handle and the request path stay here.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::error::{Error, Result, ValidationError};
use crate::log::{LeaderInfo, Leadership, ReplicatedLog};
use crate::record::Location;
use crate::registry::Registry;
use crate::store::ImageStore;

mod api;
mod apply;
mod checkpoint;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod leader;
mod snapshot;
#[cfg(feature = "conformance")]
pub mod testkit;

pub use api::{Effect, ReplicaConfig, ReplicaError, ReplicaRole, StateMachine, Stats};
use apply::{Applied, Op, Outcome, Rejection};
use leader::RESOLVE_RETRY_FIRST;

/// Waiters by entry id or once-key.
type Waiters<O> = HashMap<String, Vec<oneshot::Sender<Outcome<O>>>>;

struct Shared<S: StateMachine> {
    cfg: ReplicaConfig,
    log: Arc<dyn ReplicatedLog>,
    registry: Arc<dyn Registry>,
    store: Arc<dyn ImageStore>,
    effect: Option<Arc<dyn Effect<S::Command>>>,
    applied: Mutex<Applied<S>>,
    applied_tx: watch::Sender<u64>,
    waiters: Mutex<Waiters<S::Output>>,
    role: watch::Sender<ReplicaRole>,
    leadership: Mutex<Option<Leadership>>,
    leader: watch::Sender<Option<LeaderInfo>>,
    lost: tokio::sync::Notify,
    batch_tx: mpsc::Sender<Pending>,
    ids: AtomicU64,
    nonce: u64,
    snapshotting: AtomicBool,
    /// A checkpoint fell due while another was being taken: take one more after it.
    snapshot_pending: AtomicBool,
    checkpoints: Mutex<VecDeque<u64>>,
    /// Once-keys a task of this replica is resolving (see [`Claim`]).
    resolving: Mutex<HashSet<String>>,
    stats: Stats,
}

/// The right to resolve one once-key on this replica, held by the one task that
/// resolves it: two resolvers of a key could both find nothing on chain and both run
/// its effect. Released when dropped.
struct Claim<S: StateMachine> {
    shared: Arc<Shared<S>>,
    key: String,
}

impl<S: StateMachine> Drop for Claim<S> {
    fn drop(&mut self) {
        self.shared.resolving.lock().remove(&self.key);
    }
}

struct Pending {
    data: Bytes,
    ack: oneshot::Sender<Result<()>>,
}

/// A running replica of a host service.
pub struct Replica<S: StateMachine> {
    shared: Arc<Shared<S>>,
    tasks: Vec<JoinHandle<()>>,
}

impl<S: StateMachine> Debug for Replica<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("endpoint", &self.shared.cfg.endpoint)
            .field("role", &*self.shared.role.borrow())
            .finish()
    }
}

impl<S: StateMachine> Replica<S> {
    /// Starts a replica: restores the newest recorded checkpoint if it is ahead of
    /// `initial` (a checkpoint that fails verification is [`Error::Tampered`] and the
    /// replica refuses to start), then follows the log and campaigns.
    pub async fn start(
        cfg: ReplicaConfig,
        initial: S,
        log: Arc<dyn ReplicatedLog>,
        registry: Arc<dyn Registry>,
        store: Arc<dyn ImageStore>,
        effect: Option<Arc<dyn Effect<S::Command>>>,
    ) -> Result<Self> {
        let (batch_tx, batch_rx) = mpsc::channel(cfg.max_batch.max(1) * 4);
        let shared = Arc::new(Shared {
            cfg,
            log,
            registry,
            store,
            effect,
            applied: Mutex::new(Applied::new(initial)),
            applied_tx: watch::Sender::new(0),
            waiters: Mutex::default(),
            role: watch::Sender::new(ReplicaRole::Joining),
            leadership: Mutex::new(None),
            leader: watch::Sender::new(None),
            lost: tokio::sync::Notify::new(),
            batch_tx,
            ids: AtomicU64::new(0),
            nonce: rand::random(),
            snapshotting: AtomicBool::new(false),
            snapshot_pending: AtomicBool::new(false),
            checkpoints: Mutex::default(),
            resolving: Mutex::default(),
            stats: Stats::default(),
        });
        shared.restore_newest(false).await?;
        let target = shared.log.last_index().await?;
        let mut tasks = vec![
            tokio::spawn(shared.clone().apply_loop()),
            tokio::spawn(shared.clone().observe_loop()),
            tokio::spawn(shared.clone().batch_loop(batch_rx)),
        ];
        // Joining until caught up with the log as it was at start.
        let mut rx = shared.applied_tx.subscribe();
        rx.wait_for(|i| *i >= target)
            .await
            .map_err(|_| Error::unavailable("replica stopped while joining"))?;
        shared.role.send_replace(ReplicaRole::Follower);
        if shared.cfg.campaign {
            tasks.push(tokio::spawn(shared.clone().leadership_loop()));
        }
        Ok(Self { shared, tasks })
    }

    /// Stops every task of this replica at once, as a crash would (nothing is
    /// resigned: the log's session expires on its own).
    pub fn kill(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
        self.shared.role.send_replace(ReplicaRole::Follower);
    }

    /// Resigns leadership (if held) and stops.
    pub async fn shutdown(mut self) {
        let lead = self.shared.leadership.lock().take();
        self.kill();
        if let Some(l) = lead {
            let _ = self.shared.log.resign(&l).await;
        }
    }

    /// Current role.
    pub fn role(&self) -> ReplicaRole {
        *self.shared.role.borrow()
    }

    /// Waits until the role is `role`.
    pub async fn wait_role(&self, role: ReplicaRole) {
        let mut rx = self.shared.role.subscribe();
        let _ = rx.wait_for(|r| *r == role).await;
    }

    /// This replica's endpoint.
    pub fn endpoint(&self) -> &str {
        &self.shared.cfg.endpoint
    }

    /// The leader as last observed.
    pub fn leader(&self) -> Option<LeaderInfo> {
        self.shared.leader.borrow().clone()
    }

    /// Index of the last applied entry.
    pub fn applied_index(&self) -> u64 {
        self.shared.applied.lock().index
    }

    /// Entries skipped because they could not be decoded (the same on every replica).
    pub fn skipped_entries(&self) -> u64 {
        self.shared.applied.lock().skipped
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// Reads the local state (possibly stale on a follower).
    pub fn read_local<R>(&self, f: impl FnOnce(&S) -> R) -> R {
        f(&self.shared.applied.lock().sm)
    }

    /// Waits until this replica applied at least `index`.
    pub async fn wait_applied(&self, index: u64) {
        let mut rx = self.shared.applied_tx.subscribe();
        let _ = rx.wait_for(|i| *i >= index).await;
    }

    /// Applies `command` on every replica, in log order, and returns its output once
    /// committed and applied here. With `key`, a retry returns the first output.
    pub async fn replicate(
        &self,
        key: Option<&str>,
        command: S::Command,
    ) -> Result<S::Output, ReplicaError> {
        let s = &self.shared;
        s.leading()?;
        let key = key
            .map(|k| check_key(k).map(|()| format!("r:{k}")))
            .transpose()?;
        s.applied
            .lock()
            .sm
            .validate(&command)
            .map_err(Error::from)?;
        if let Some(k) = &key
            && let Some(out) = s.applied.lock().dedupe.get(k)
        {
            return Ok(out.clone());
        }
        let id = s.next_id();
        let op = Op::Cmd {
            id: id.clone(),
            key,
            cmd: command,
        };
        let out = s.submit(&id, &op).await?;
        out.ok_or_else(|| Error::conflict("command produced no output").into())
    }

    /// Like [`Replica::replicate`] with a JSON-encoded command from a client:
    /// malformed or oversized bytes are [`Error::InvalidInput`].
    pub async fn replicate_json(
        &self,
        key: Option<&str>,
        command: &[u8],
    ) -> Result<S::Output, ReplicaError> {
        if command.len() > self.shared.cfg.max_command_bytes {
            return Err(
                Error::from(oversized(command.len(), self.shared.cfg.max_command_bytes)).into(),
            );
        }
        let cmd: S::Command = serde_json::from_slice(command)
            .map_err(|e| Error::from(ValidationError::malformed("command", e)))?;
        self.replicate(key, cmd).await
    }

    /// Runs the side effect of `command` on the leader exactly once for `key`, logs its
    /// result and applies `command` with it on every replica. A retry with the same
    /// key returns the first output; an intent left by a failed leader is resolved
    /// with [`Effect::lookup`] first.
    pub async fn once(&self, key: &str, command: S::Command) -> Result<S::Output, ReplicaError> {
        let s = &self.shared;
        s.leading()?;
        check_key(key)?;
        let effect = s
            .effect
            .clone()
            .ok_or_else(|| Error::not_supported("once without an effect handler"))?;
        s.applied
            .lock()
            .sm
            .validate(&command)
            .map_err(Error::from)?;
        let okey = format!("o:{key}");
        let logged = {
            let applied = s.applied.lock();
            if let Some(out) = applied.dedupe.get(&okey) {
                return Ok(out.clone());
            }
            applied
                .pending
                .get(key)
                .map(|cmd| (cmd.clone(), s.wait_for(&okey)))
        };
        if let Some((cmd, rx)) = logged {
            // Logged and not resolved. Nobody may be resolving it: the answer to the
            // append of its intent was lost (the intent is in the log, the caller got
            // an error). Resolve it here unless a task already does.
            if let Some(claim) = s.claim(key) {
                s.clone().keep_resolving(claim, effect, cmd, Duration::ZERO);
            }
            return s.await_outcome(rx).await;
        }
        let Some(claim) = s.claim(key) else {
            // Another call with this key is logging its intent: wait for its result.
            let rx = s.wait_for(&okey);
            if let Some(out) = s.applied.lock().dedupe.get(&okey) {
                s.waiters.lock().remove(&okey);
                return Ok(out.clone());
            }
            return s.await_outcome(rx).await;
        };
        let id = s.next_id();
        let intent = Op::Intent {
            id: id.clone(),
            key: key.to_owned(),
            cmd: command.clone(),
        };
        let rx = s.wait_for(&okey);
        match s.submit_outcome(&id, &intent).await {
            // Our intent is the one logged: run the effect (after checking that the
            // fencing token is still current) and log its result.
            // Resolved in a task of its own, not in the caller's future: a caller that
            // goes away (an HTTP client that disconnects drops the request's future)
            // must not leave the effect half done and the intent pending.
            Ok(Ok(_)) => {
                let me = s.clone();
                tokio::spawn(async move {
                    if let Err(e) = me
                        .clone()
                        .resolve(effect.clone(), claim.key.clone(), command.clone(), false)
                        .await
                    {
                        // The intent is logged but its result is not (e.g. the append
                        // of the result failed): without this the key would stay
                        // pending, and every retry wait in vain.
                        tracing::warn!(key = claim.key, error = %e, "cannot resolve an effect; retrying");
                        me.keep_resolving(claim, effect, command, RESOLVE_RETRY_FIRST);
                    }
                });
            }
            // An intent with the same key was logged first (e.g. by an earlier call
            // whose answer was lost): resolve it (looking it up first) if it is still
            // pending, and wait for its result.
            Ok(Err(Rejection::DuplicateIntent)) => {
                let applied = s.applied.lock();
                if let Some(out) = applied.dedupe.get(&okey) {
                    return Ok(out.clone());
                }
                if let Some(cmd) = applied.pending.get(key).cloned() {
                    drop(applied);
                    s.clone().keep_resolving(claim, effect, cmd, Duration::ZERO);
                }
            }
            Ok(Err(rejection)) => {
                s.waiters.lock().remove(&okey);
                return Err(Error::conflict(rejection.to_string()).into());
            }
            Err(e) => {
                s.waiters.lock().remove(&okey);
                return Err(e);
            }
        }
        s.await_outcome(rx).await
    }

    /// A linearizable read on the leader: waits until every entry committed before
    /// the call is applied, then reads the state.
    pub async fn query<R>(&self, f: impl FnOnce(&S) -> R) -> Result<R, ReplicaError> {
        let s = &self.shared;
        s.leading()?;
        let id = s.next_id();
        s.submit(&id, &Op::<S::Command>::Noop { id: id.clone() })
            .await?;
        Ok(f(&s.applied.lock().sm))
    }
}

impl<S: StateMachine> Drop for Replica<S> {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

fn check_key(key: &str) -> Result<()> {
    if key.is_empty() || key.len() > 128 || key.chars().any(|c| c.is_control()) {
        return Err(ValidationError::malformed(
            "idempotency key",
            "must be 1-128 bytes without control characters",
        )
        .into());
    }
    Ok(())
}

fn oversized(len: usize, max: usize) -> ValidationError {
    ValidationError::malformed("command", format!("{len} bytes is over the limit of {max}"))
}

impl<S: StateMachine> Shared<S> {
    fn next_id(&self) -> String {
        format!(
            "{:016x}-{}",
            self.nonce,
            self.ids.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// Claims the resolution of once-key `key` for the caller, unless another task of
    /// this replica holds it.
    fn claim(self: &Arc<Self>, key: &str) -> Option<Claim<S>> {
        self.resolving.lock().insert(key.to_owned()).then(|| Claim {
            shared: self.clone(),
            key: key.to_owned(),
        })
    }

    fn not_leader(&self) -> ReplicaError {
        let leader = self
            .leader
            .borrow()
            .as_ref()
            .filter(|l| l.candidate != self.cfg.endpoint)
            .and_then(|l| Location::new(l.candidate.clone(), l.term).ok());
        ReplicaError::NotLeader { leader }
    }

    fn leading(&self) -> Result<Leadership, ReplicaError> {
        if *self.role.borrow() != ReplicaRole::Leader {
            return Err(self.not_leader());
        }
        self.leadership
            .lock()
            .clone()
            .ok_or_else(|| self.not_leader())
    }

    fn wait_for(&self, id: &str) -> oneshot::Receiver<Outcome<S::Output>> {
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .entry(id.to_owned())
            .or_default()
            .push(tx);
        rx
    }

    async fn await_outcome(
        &self,
        rx: oneshot::Receiver<Outcome<S::Output>>,
    ) -> Result<S::Output, ReplicaError> {
        match tokio::time::timeout(self.cfg.request_timeout, rx).await {
            Ok(Ok(Ok(Some(out)))) => Ok(out),
            Ok(Ok(Ok(None))) => Err(Error::conflict("entry produced no output").into()),
            Ok(Ok(Err(rejection))) => Err(Error::conflict(rejection.to_string()).into()),
            Ok(Err(_)) => Err(Error::unavailable("replica stopped").into()),
            Err(_) => Err(Error::unavailable("timed out waiting for commit and apply").into()),
        }
    }

    /// Appends `op` through the batcher and waits until it is applied here; a
    /// rejection of the applied entry is a conflict.
    async fn submit(
        &self,
        id: &str,
        op: &Op<S::Command>,
    ) -> Result<Option<S::Output>, ReplicaError> {
        self.submit_outcome(id, op)
            .await?
            .map_err(|rejection| Error::conflict(rejection.to_string()).into())
    }

    /// Like [`Shared::submit`], with the applied entry's typed outcome.
    async fn submit_outcome(
        &self,
        id: &str,
        op: &Op<S::Command>,
    ) -> Result<Outcome<S::Output>, ReplicaError> {
        let data = serde_json::to_vec(op)
            .map_err(|e| Error::from(ValidationError::malformed("command", e)))?;
        if data.len() > self.cfg.max_command_bytes + 1024 {
            return Err(Error::from(oversized(data.len(), self.cfg.max_command_bytes)).into());
        }
        let rx = self.wait_for(id);
        let (ack, ack_rx) = oneshot::channel();
        let sent = self
            .batch_tx
            .send(Pending {
                data: Bytes::from(data),
                ack,
            })
            .await;
        let appended = match sent {
            Ok(()) => ack_rx
                .await
                .unwrap_or_else(|_| Err(Error::unavailable("replica stopped"))),
            Err(_) => Err(Error::unavailable("replica stopped")),
        };
        if let Err(e) = appended {
            self.waiters.lock().remove(id);
            return Err(match e {
                Error::Conflict { .. } => self.not_leader(),
                e => e.into(),
            });
        }
        match tokio::time::timeout(self.cfg.request_timeout, rx).await {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(_)) => Err(Error::unavailable("replica stopped").into()),
            Err(_) => Err(Error::unavailable("timed out waiting for apply").into()),
        }
    }
}
