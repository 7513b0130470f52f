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
//!   [`Checkpoint`] and compacts the log behind the previous checkpoint. A starting
//!   replica restores the newest checkpoint (digest verified) and replays from it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::artifact::Image;
use crate::digest::Digest;
use crate::error::{Error, Result, ValidationError};
use crate::id::ServiceId;
use crate::image::Repository;
use crate::log::{Entry, LeaderInfo, Leadership, ReplicatedLog};
use crate::record::{Checkpoint, Location};
use crate::registry::Registry;
use crate::store::ImageStore;

#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod snapshot;
pub mod testkit;

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

    /// Applies `command`; `effect` is the logged result of a [`Replica::once`] effect.
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

/// Settings of a [`Replica`].
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
        })
    }
}

/// One logged operation (the payload of a log entry).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Op<C> {
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

/// What a waiter receives once its entry is applied.
type Outcome<O> = std::result::Result<Option<O>, String>;

/// Waiters by entry id or once-key.
type Waiters<O> = HashMap<String, Vec<oneshot::Sender<Outcome<O>>>>;

/// The replicated part of a replica: state machine plus bookkeeping, all of it
/// derived from the log and included in snapshots.
#[derive(Debug, Clone)]
struct Applied<S: StateMachine> {
    sm: S,
    index: u64,
    term: u64,
    dedupe: HashMap<String, S::Output>,
    dedupe_order: VecDeque<String>,
    pending: BTreeMap<String, S::Command>,
    skipped: u64,
}

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
    stats: Stats,
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
        let applied = Applied {
            sm: initial,
            index: 0,
            term: 0,
            dedupe: HashMap::new(),
            dedupe_order: VecDeque::new(),
            pending: BTreeMap::new(),
            skipped: 0,
        };
        let shared = Arc::new(Shared {
            cfg,
            log,
            registry,
            store,
            effect,
            applied: Mutex::new(applied),
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
        let waiting = {
            let applied = s.applied.lock();
            if let Some(out) = applied.dedupe.get(&okey) {
                return Ok(out.clone());
            }
            applied.pending.contains_key(key).then(|| s.wait_for(&okey))
        };
        if let Some(rx) = waiting {
            return s.await_outcome(rx).await;
        }
        let id = s.next_id();
        let intent = Op::Intent {
            id: id.clone(),
            key: key.to_owned(),
            cmd: command.clone(),
        };
        let rx = s.wait_for(&okey);
        match s.submit(&id, &intent).await {
            // Our intent is the one logged: run the effect (after checking that the
            // fencing token is still current) and log its result.
            Ok(_) => {
                s.clone()
                    .resolve(effect, key.to_owned(), command, false)
                    .await?
            }
            // A concurrent intent with the same key won: wait for its result.
            Err(ReplicaError::Failed(Error::Conflict { reason })) if reason == DUPLICATE_INTENT => {
                if let Some(out) = s.applied.lock().dedupe.get(&okey) {
                    return Ok(out.clone());
                }
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

const DUPLICATE_INTENT: &str = "duplicate intent";

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
            Ok(Ok(Err(reason))) => Err(Error::conflict(reason).into()),
            Ok(Err(_)) => Err(Error::unavailable("replica stopped").into()),
            Err(_) => Err(Error::unavailable("timed out waiting for commit and apply").into()),
        }
    }

    /// Appends `op` through the batcher and waits until it is applied here.
    async fn submit(
        &self,
        id: &str,
        op: &Op<S::Command>,
    ) -> Result<Option<S::Output>, ReplicaError> {
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
            Ok(Ok(Ok(out))) => Ok(out),
            Ok(Ok(Err(reason))) => Err(Error::conflict(reason).into()),
            Ok(Err(_)) => Err(Error::unavailable("replica stopped").into()),
            Err(_) => Err(Error::unavailable("timed out waiting for apply").into()),
        }
    }

    async fn batch_loop(self: Arc<Self>, mut rx: mpsc::Receiver<Pending>) {
        let max = self.cfg.max_batch.max(1);
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < max {
                match rx.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            let lead = self.leadership.lock().clone();
            let result = match lead {
                Some(l) => {
                    let data = batch.iter().map(|p| p.data.clone()).collect();
                    self.log.append(&l, data).await.map(drop)
                }
                None => Err(Error::conflict("not the leader")),
            };
            match &result {
                Ok(()) => {
                    self.stats.appends.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .appended_entries
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                }
                Err(Error::Conflict { .. }) => self.lost.notify_one(),
                Err(e) => tracing::warn!(error = %e, "append failed"),
            }
            for p in batch {
                let r = match &result {
                    Ok(()) => Ok(()),
                    Err(Error::Conflict { reason }) => Err(Error::conflict(reason)),
                    Err(e) => Err(Error::unavailable(format!("append failed: {e}"))),
                };
                let _ = p.ack.send(r);
            }
        }
    }

    /// Follows the log from the applied index, restoring the newest checkpoint when
    /// the needed entries were compacted away.
    async fn apply_loop(self: Arc<Self>) {
        loop {
            let from = self.applied.lock().index + 1;
            let mut stream = match self.log.watch(from).await {
                Ok(s) => s,
                Err(Error::NotFound { .. }) => {
                    if let Err(e) = self.restore_newest(true).await {
                        tracing::error!(error = %e, "cannot restore the newest checkpoint");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    continue;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "watch failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
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

    fn apply_entry(self: &Arc<Self>, entry: &Entry) {
        let mut notify: Vec<(String, Outcome<S::Output>)> = Vec::new();
        let snapshot_due;
        {
            let mut a = self.applied.lock();
            if entry.index != a.index + 1 {
                // Already applied (or a gap, which the log must not produce).
                if entry.index > a.index + 1 {
                    tracing::error!(index = entry.index, applied = a.index, "gap in the log");
                }
                return;
            }
            a.index = entry.index;
            a.term = entry.term;
            match serde_json::from_slice::<Op<S::Command>>(&entry.data) {
                Err(e) => {
                    a.skipped += 1;
                    tracing::warn!(index = entry.index, error = %e, "skipping a malformed entry");
                }
                Ok(Op::Noop { id }) => notify.push((id, Ok(None))),
                Ok(Op::Cmd { id, key, cmd }) => {
                    let out = match key.as_ref().and_then(|k| a.dedupe.get(k)) {
                        Some(out) => out.clone(),
                        None => {
                            let out = a.sm.apply(&cmd, None);
                            if let Some(k) = key {
                                remember(&mut a, k, out.clone(), self.cfg.dedupe_capacity);
                            }
                            out
                        }
                    };
                    notify.push((id, Ok(Some(out))));
                }
                Ok(Op::Intent { id, key, cmd }) => {
                    let okey = format!("o:{key}");
                    if !a.dedupe.contains_key(&okey) && !a.pending.contains_key(&key) {
                        a.pending.insert(key, cmd);
                        notify.push((id, Ok(None)));
                    } else {
                        notify.push((id, Err(DUPLICATE_INTENT.to_owned())));
                    }
                }
                Ok(Op::Done { id, key, effect }) => {
                    let okey = format!("o:{key}");
                    let result = match (a.pending.remove(&key), hex::decode(&effect)) {
                        (Some(cmd), Ok(effect)) => {
                            let out = a.sm.apply(&cmd, Some(&effect));
                            remember(&mut a, okey.clone(), out.clone(), self.cfg.dedupe_capacity);
                            Ok(Some(out))
                        }
                        (Some(cmd), Err(e)) => {
                            a.pending.insert(key.clone(), cmd);
                            Err(format!("malformed effect result: {e}"))
                        }
                        (None, _) => Ok(a.dedupe.get(&okey).cloned()),
                    };
                    notify.push((id, result.clone()));
                    notify.push((okey, result));
                }
                Ok(Op::Aborted { id, key, reason }) => {
                    a.pending.remove(&key);
                    let reason = format!("effect for {key} failed: {reason}");
                    notify.push((id, Err(reason.clone())));
                    notify.push((format!("o:{key}"), Err(reason)));
                }
            }
            snapshot_due = self.cfg.snapshot_every > 0
                && a.index.is_multiple_of(self.cfg.snapshot_every)
                && *self.role.borrow() == ReplicaRole::Leader;
        }
        self.applied_tx.send_replace(entry.index);
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
        if snapshot_due && self.snapshotting.swap(true, Ordering::AcqRel) {
            // One is being taken: a due checkpoint must not be lost (entries can be
            // applied faster than a snapshot is pushed and recorded).
            self.snapshot_pending.store(true, Ordering::Release);
        } else if snapshot_due {
            let me = self.clone();
            tokio::spawn(async move {
                loop {
                    let copy = me.applied.lock().clone();
                    if let Err(e) = me.checkpoint(copy).await {
                        tracing::warn!(error = %e, "checkpoint failed");
                    }
                    if me.snapshot_pending.swap(false, Ordering::AcqRel)
                        && *me.role.borrow() == ReplicaRole::Leader
                    {
                        continue;
                    }
                    me.snapshotting.store(false, Ordering::Release);
                    // One that fell due between the check and the release is taken
                    // here, unless another task has started meanwhile.
                    if !(me.snapshot_pending.load(Ordering::Acquire)
                        && *me.role.borrow() == ReplicaRole::Leader
                        && !me.snapshotting.swap(true, Ordering::AcqRel))
                    {
                        break;
                    }
                    me.snapshot_pending.store(false, Ordering::Release);
                }
            });
        }
    }

    /// Keeps the observed leader up to date (push based).
    async fn observe_loop(self: Arc<Self>) {
        loop {
            match self.log.observe().await {
                Ok(mut stream) => {
                    while let Some(item) = stream.next().await {
                        match item {
                            Ok(info) => {
                                self.leader.send_replace(info);
                            }
                            Err(_) => break,
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "observe failed"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn leadership_loop(self: Arc<Self>) {
        loop {
            let lead = match self.log.campaign(&self.cfg.endpoint).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::debug!(error = %e, "campaign failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            *self.leadership.lock() = Some(lead.clone());
            if let Err(e) = self.clone().lead(&lead).await {
                tracing::warn!(error = %e, "leadership ended");
            }
            *self.leadership.lock() = None;
            self.role.send_replace(ReplicaRole::Follower);
            let _ = self.log.resign(&lead).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Serves as leader until the leadership is lost.
    async fn lead(self: Arc<Self>, lead: &Leadership) -> Result<()> {
        // Barrier: everything committed by earlier leaders is applied before serving.
        let id = self.next_id();
        let rx = self.wait_for(&id);
        let data = serde_json::to_vec(&Op::<S::Command>::Noop { id: id.clone() })
            .map_err(|e| Error::backend("replica", e, false))?;
        let range = self.log.append(lead, vec![Bytes::from(data)]).await?;
        match tokio::time::timeout(self.cfg.request_timeout, rx).await {
            Ok(Ok(_)) => {}
            _ => {
                self.waiters.lock().remove(&id);
                return Err(Error::unavailable(format!(
                    "barrier {} not applied in time",
                    range.end()
                )));
            }
        }
        self.role.send_replace(ReplicaRole::Leader);
        // Published once per leadership change, never per request.
        match Location::new(self.cfg.endpoint.clone(), lead.term) {
            Ok(loc) => match self.registry.set_location(&self.cfg.service, &loc).await {
                Ok(()) => {
                    self.stats
                        .locations_published
                        .fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => tracing::warn!(error = %e, "cannot publish the leader location"),
            },
            Err(e) => tracing::warn!(error = %e, "invalid endpoint"),
        }
        // Intents left by an earlier leader: resolve by key, never rerun blindly.
        let pending: Vec<(String, S::Command)> = self
            .applied
            .lock()
            .pending
            .iter()
            .map(|(k, c)| (k.clone(), c.clone()))
            .collect();
        if let Some(effect) = self.effect.clone() {
            for (key, cmd) in pending {
                let me = self.clone();
                let effect = effect.clone();
                tokio::spawn(async move {
                    if let Err(e) = me.resolve(effect, key.clone(), cmd, true).await {
                        tracing::warn!(key, error = %e, "cannot resolve a pending effect");
                    }
                });
            }
        }
        let mut leader_rx = self.leader.subscribe();
        loop {
            tokio::select! {
                _ = self.lost.notified() => {
                    if !self.still_leader(lead).await {
                        return Err(Error::conflict("fencing token is stale"));
                    }
                }
                changed = leader_rx.changed() => {
                    if changed.is_err() {
                        return Err(Error::unavailable("observer stopped"));
                    }
                    let now = leader_rx.borrow_and_update().clone();
                    if now.as_ref().is_none_or(|l| l.term != lead.term)
                        && !self.still_leader(lead).await
                    {
                        return Err(Error::conflict("another leader was elected"));
                    }
                }
            }
        }
    }

    async fn still_leader(&self, lead: &Leadership) -> bool {
        matches!(self.log.leader().await, Ok(Some(l)) if l.term == lead.term)
    }

    /// Resolves the effect of an intent: looks its key up first when the intent may
    /// have run under an earlier leader, runs it otherwise, and logs the result.
    async fn resolve(
        self: Arc<Self>,
        effect: Arc<dyn Effect<S::Command>>,
        key: String,
        cmd: S::Command,
        inherited: bool,
    ) -> Result<(), ReplicaError> {
        let found = if inherited {
            effect.lookup(&key, &cmd).await?
        } else {
            None
        };
        let result = match found {
            Some(r) => Ok(r),
            None => {
                let lead = self.leadership.lock().clone();
                let current = match &lead {
                    Some(l) => self.still_leader(l).await,
                    None => false,
                };
                if !current {
                    return Err(self.not_leader());
                }
                self.stats.effects_run.fetch_add(1, Ordering::Relaxed);
                effect.run(&key, &cmd).await
            }
        };
        let id = self.next_id();
        let op = match result {
            Ok(r) => Op::Done {
                id: id.clone(),
                key,
                effect: hex::encode(r),
            },
            Err(e) => Op::Aborted {
                id: id.clone(),
                key,
                reason: e.to_string(),
            },
        };
        match self.submit(&id, &op).await {
            Ok(_) => Ok(()),
            // The Aborted entry reports the failure through the waiters.
            Err(ReplicaError::Failed(Error::Conflict { .. })) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn remember<S: StateMachine>(a: &mut Applied<S>, key: String, out: S::Output, capacity: usize) {
    if a.dedupe.insert(key.clone(), out).is_none() {
        a.dedupe_order.push_back(key);
    }
    while a.dedupe_order.len() > capacity.max(1) {
        if let Some(old) = a.dedupe_order.pop_front() {
            a.dedupe.remove(&old);
        }
    }
}

impl<S: StateMachine> Shared<S> {
    /// Snapshots `copy` off the apply path, pushes it, records the checkpoint and
    /// compacts the log behind the previous checkpoint.
    async fn checkpoint(self: &Arc<Self>, copy: Applied<S>) -> Result<Checkpoint> {
        let (index, term) = (copy.index, copy.term);
        let bytes = tokio::task::spawn_blocking(move || snapshot::encode(&copy))
            .await
            .map_err(|e| Error::backend("replica", e, false))??;
        let image = Image::snapshot(bytes);
        let digest: Digest = self
            .store
            .push(&self.cfg.snapshot_repository, &image, None)
            .await?;
        let prev = self.registry.active(&self.cfg.service).await?.checkpoint;
        if prev.as_ref().is_some_and(|p| p.log_index >= index) {
            return Err(Error::conflict("a newer checkpoint is recorded"));
        }
        let cp = Checkpoint {
            snapshot: digest,
            log_index: index,
            term,
            state_version: prev.map_or(0, |p| p.state_version) + 1,
        };
        self.registry
            .record_checkpoint(&self.cfg.service, &cp)
            .await?;
        self.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
        let compact_to = {
            let mut cps = self.checkpoints.lock();
            cps.push_back(index);
            while cps.len() > 2 {
                cps.pop_front();
            }
            (cps.len() == 2).then(|| cps[0])
        };
        if let Some(up_to) = compact_to {
            self.log.compact(up_to).await?;
        }
        Ok(cp)
    }

    /// Restores the newest recorded checkpoint if it is ahead of the applied state
    /// (always when `needed`, i.e. the log behind it is compacted).
    async fn restore_newest(&self, needed: bool) -> Result<()> {
        let record = match self.registry.active(&self.cfg.service).await {
            Ok(r) => r,
            Err(Error::NotFound { .. }) if !needed => return Ok(()),
            Err(e) => return Err(e),
        };
        let Some(cp) = record.checkpoint else {
            return if needed {
                Err(Error::not_found(
                    "a checkpoint: the log is compacted and none is recorded",
                ))
            } else {
                Ok(())
            };
        };
        if cp.log_index <= self.applied.lock().index {
            return Ok(());
        }
        let image = self
            .store
            .pull(&self.cfg.snapshot_repository, &cp.snapshot)
            .await?;
        if image.digest != cp.snapshot {
            return Err(Error::tampered("snapshot", cp.snapshot, image.digest));
        }
        let layer = image
            .layers
            .first()
            .ok_or_else(|| ValidationError::malformed("snapshot", "no layer"))?;
        let mut fresh = self.applied.lock().clone();
        let data = layer.data.clone();
        let restored = tokio::task::spawn_blocking(move || {
            snapshot::decode(&mut fresh, &data).map(|()| fresh)
        })
        .await
        .map_err(|e| Error::backend("replica", e, false))??;
        if restored.index != cp.log_index {
            return Err(Error::tampered(
                "snapshot log index",
                cp.log_index,
                restored.index,
            ));
        }
        let index = restored.index;
        *self.applied.lock() = restored;
        self.applied_tx.send_replace(index);
        tracing::info!(index, version = cp.state_version, "restored checkpoint");
        Ok(())
    }
}
