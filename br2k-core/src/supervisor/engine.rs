//! [`Supervisor`]: the generic [`Recoverer`] over a [`Registry`], a [`Replicator`] and
//! one or more [`ImageStore`]s.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::decide::{ImageHealth, ImageStatus, converged, diagnose, is_workload_finding, plan};
use super::queue::{Backoffs, Queue};
use crate::diagnosis::{
    ActionOutcome, Diagnosis, Finding, Outcome, RecoveryAction, RecoveryReport,
};
use crate::digest::Digest;
use crate::error::{Error, Result, ValidationError};
use crate::id::ServiceId;
use crate::image::Repository;
use crate::observed::ObservedState;
use crate::record::{Account, ServiceRecord, ServiceState};
use crate::recoverer::Recoverer;
use crate::registry::Registry;
use crate::replicator::Replicator;
use crate::store::ImageStore;

/// Events buffered per subscriber by default; a slower subscriber loses the oldest.
const EVENT_BUFFER: usize = 1024;

/// How often a recovery re-observes the workload while it waits for it to match the
/// record.
const SETTLE_POLL: Duration = Duration::from_millis(25);

/// How long a registry whose copy a repair could not fix is left alone before the
/// next repair attempt (its finding is still reported on every diagnosis).
const UNREPAIRABLE_RETRY: Duration = Duration::from_secs(600);

/// One recovery made by a running [`Supervisor`] (services found healthy produce no
/// event).
#[derive(Debug, Clone)]
pub struct SupervisorEvent {
    /// The service.
    pub id: ServiceId,
    /// What was found and done.
    pub report: RecoveryReport,
    /// When the diagnosis that found the problem completed.
    pub detected_at: Instant,
}

/// Counters of a [`Supervisor`] since it was built.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SupervisorMetrics {
    /// Reconciles run (diagnose, then recover when needed).
    pub reconciles: u64,
    /// Reconciles that found something wrong and acted.
    pub recoveries: u64,
    /// Recoveries whose outcome was partial or failed.
    pub failed_recoveries: u64,
    /// Reconciles that could not diagnose at all (e.g. replicator unreachable).
    pub errors: u64,
    /// Change events received from the registry and the replicator.
    pub change_events: u64,
    /// Recoveries per finding name ([`Finding::name`]).
    pub recoveries_by_finding: BTreeMap<String, u64>,
}

/// Tuning of a [`Supervisor`].
#[derive(Debug, Clone)]
pub(super) struct Config {
    pub resync: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub concurrency: usize,
    pub verify_ttl: Duration,
    pub event_buffer: usize,
    pub settle_timeout: Duration,
    /// Accounts whose services may be deployed (`None`: any owner).
    pub allowed_owners: Option<Vec<Account>>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            resync: Duration::from_secs(30),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            concurrency: 8,
            verify_ttl: Duration::from_secs(300),
            event_buffer: EVENT_BUFFER,
            settle_timeout: Duration::from_secs(15),
            allowed_owners: None,
        }
    }
}

/// Builds a [`Supervisor`]; see [`Supervisor::builder`].
#[derive(Default)]
pub struct SupervisorBuilder {
    registry: Option<Arc<dyn Registry>>,
    replicator: Option<Arc<dyn Replicator>>,
    stores: Vec<Arc<dyn ImageStore>>,
    config: Config,
}

impl fmt::Debug for SupervisorBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SupervisorBuilder")
            .field("registry", &self.registry)
            .field("replicator", &self.replicator)
            .field("stores", &self.stores)
            .field("config", &self.config)
            .finish()
    }
}

impl SupervisorBuilder {
    /// The service registry to read records from (required; never written to).
    pub fn registry(mut self, registry: Arc<dyn Registry>) -> Self {
        self.registry = Some(registry);
        self
    }

    /// The replicator running the workloads (required).
    pub fn replicator(mut self, replicator: Arc<dyn Replicator>) -> Self {
        self.replicator = Some(replicator);
        self
    }

    /// Adds an image store; call once per registry, primary first. Applies pull from
    /// the first store whose copy of the image verifies.
    pub fn image_store(mut self, store: Arc<dyn ImageStore>) -> Self {
        self.stores.push(store);
        self
    }

    /// Period of the full resync over every known service (default 30 s).
    pub fn resync(mut self, every: Duration) -> Self {
        self.config.resync = every;
        self
    }

    /// Per-service retry delay after a failed recovery: starts at `min`, doubles per
    /// consecutive failure up to `max`, with jitter (default 500 ms to 60 s).
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.config.backoff_min = min;
        self.config.backoff_max = max;
        self
    }

    /// Most reconciles running at once (default 8).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.config.concurrency = n;
        self
    }

    /// Events kept for subscribers of [`Supervisor::subscribe`] (default 1,024); a
    /// slower subscriber loses the oldest. The buffer is allocated when the
    /// supervisor is built, so hosts running many supervisors without subscribers
    /// (one per resource) should keep it small.
    pub fn event_buffer(mut self, events: usize) -> Self {
        self.config.event_buffer = events;
        self
    }

    /// How long a successful verification of an image in a store is trusted before
    /// its bytes are pulled and verified again (default 5 min). Presence (`has`) is
    /// checked on every diagnosis regardless.
    pub fn verify_ttl(mut self, ttl: Duration) -> Self {
        self.config.verify_ttl = ttl;
        self
    }

    /// How long a recovery waits, after its actions, for the live workload to match
    /// the record with every replica ready before it reports [`Outcome::Partial`]
    /// instead of [`Outcome::Recovered`] (default 15 s).
    pub fn settle_timeout(mut self, timeout: Duration) -> Self {
        self.config.settle_timeout = timeout;
        self
    }

    /// Deploys only services whose on-chain owner is one of `owners` (compared
    /// without regard to case); any other record is refused with
    /// [`Error::PermissionDenied`] and nothing is applied for it. Without this, any
    /// account that registers a service id decides what runs.
    pub fn allowed_owners(mut self, owners: impl IntoIterator<Item = Account>) -> Self {
        self.config.allowed_owners = Some(owners.into_iter().collect());
        self
    }

    /// Builds the supervisor; [`Error::InvalidInput`] when the registry or replicator
    /// is missing, the backoff bounds are inverted or zero, or concurrency or resync
    /// is zero.
    pub fn build(self) -> Result<Supervisor> {
        let bad = |reason: &str| Error::from(ValidationError::malformed("supervisor", reason));
        let registry = self.registry.ok_or_else(|| bad("a registry is required"))?;
        let replicator = self
            .replicator
            .ok_or_else(|| bad("a replicator is required"))?;
        let c = &self.config;
        if c.backoff_min.is_zero() || c.backoff_min > c.backoff_max {
            return Err(bad("backoff needs 0 < min <= max"));
        }
        if c.concurrency == 0 {
            return Err(bad("concurrency must be at least 1"));
        }
        if c.resync.is_zero() {
            return Err(bad("resync period must not be zero"));
        }
        if c.event_buffer == 0 {
            return Err(bad("event buffer must hold at least 1 event"));
        }
        let event_buffer = c.event_buffer;
        Ok(Supervisor {
            registry,
            replicator,
            stores: self.stores,
            backoffs: Backoffs::new(self.config.backoff_min, self.config.backoff_max),
            config: self.config,
            records: Mutex::default(),
            verified: Mutex::default(),
            unrepairable: Mutex::default(),
            services: Mutex::default(),
            queue: Queue::default(),
            events: broadcast::channel(event_buffer).0,
            metrics: Mutex::default(),
            change_events: AtomicU64::new(0),
        })
    }
}

/// What a diagnosis was computed from.
#[derive(Debug, Clone)]
struct Context {
    record: Option<ServiceRecord>,
    observed: Option<ObservedState>,
    images: Vec<ImageHealth>,
}

/// The generic recoverer: compares the active record of each service with its live
/// workload and with the image stores, and repairs the difference.
///
/// - Reads the registry, never writes to it. When the registry is unavailable (or
///   serves a record that fails verification) it uses the last verified record it
///   read for that service, marked stale, and reports
///   [`Finding::ChainEndpointDown`].
/// - Image health per store: presence on every diagnosis; bytes verified and the
///   success cached per store and digest for [`SupervisorBuilder::verify_ttl`]. A
///   workload is applied only from a store whose copy was verified just before
///   (never from the cache), and a repaired copy is verified again; a store whose
///   copy a repair could not fix is reported by [`Supervisor::unrepairable`] and not
///   repaired again for 10 minutes.
/// - A recovery re-observes the workload after acting and reports
///   [`Outcome::Recovered`] only when it matches the record with every replica
///   ready on the recorded digest ([`SupervisorBuilder::settle_timeout`]).
/// - [`Supervisor::run`] reacts to both change streams, resyncs periodically and
///   retries failed recoveries with per-service exponential backoff.
pub struct Supervisor {
    pub(super) registry: Arc<dyn Registry>,
    pub(super) replicator: Arc<dyn Replicator>,
    stores: Vec<Arc<dyn ImageStore>>,
    pub(super) config: Config,
    records: Mutex<HashMap<ServiceId, ServiceRecord>>,
    verified: Mutex<HashMap<(usize, Repository, Digest), Instant>>,
    unrepairable: Mutex<HashMap<(usize, Repository, Digest), Instant>>,
    pub(super) services: Mutex<Vec<ServiceId>>,
    pub(super) queue: Queue,
    pub(super) backoffs: Backoffs,
    events: broadcast::Sender<SupervisorEvent>,
    metrics: Mutex<SupervisorMetrics>,
    pub(super) change_events: AtomicU64,
}

impl fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Supervisor")
            .field("registry", &self.registry)
            .field("replicator", &self.replicator)
            .field("stores", &self.stores)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Whether `read` is older than `verified`, a record of the same service verified
/// before: fewer versions (versions are only ever appended), an older checkpoint, or
/// a different answer read at an earlier block.
fn regresses(read: &ServiceRecord, verified: &ServiceRecord) -> bool {
    let checkpoint = |r: &ServiceRecord| r.checkpoint.as_ref().map_or(0, |c| c.state_version);
    if read.latest_version < verified.latest_version || checkpoint(read) < checkpoint(verified) {
        return true;
    }
    let earlier = matches!((read.as_of, verified.as_of), (Some(a), Some(b)) if a < b);
    earlier
        && ServiceRecord {
            as_of: verified.as_of,
            stale: verified.stale,
            ..read.clone()
        } != *verified
}

fn classify(e: &Error) -> ImageStatus {
    match e {
        Error::NotFound { .. } => ImageStatus::Missing,
        Error::Tampered { .. } | Error::InvalidInput(_) => ImageStatus::Tampered(e.to_string()),
        _ => ImageStatus::Down,
    }
}

impl Supervisor {
    /// A builder; `registry` and `replicator` are required.
    pub fn builder() -> SupervisorBuilder {
        SupervisorBuilder::default()
    }

    /// Receives an event for every recovery made by [`Supervisor::run`].
    pub fn subscribe(&self) -> broadcast::Receiver<SupervisorEvent> {
        self.events.subscribe()
    }

    /// A snapshot of the counters.
    pub fn metrics(&self) -> SupervisorMetrics {
        let mut m = self.metrics.lock().clone();
        m.change_events = self.change_events.load(Ordering::Relaxed);
        m
    }

    /// The current (unjittered) retry delay of `id`, when its last recovery failed.
    pub fn backoff(&self, id: &ServiceId) -> Option<Duration> {
        self.backoffs.current(id)
    }

    /// Services queued or being reconciled by [`Supervisor::run`] now.
    pub fn pending(&self) -> usize {
        self.queue.len()
    }

    /// Registry hosts of the image stores, primary first.
    pub fn registries(&self) -> Vec<String> {
        self.stores
            .iter()
            .map(|s| s.registry().to_owned())
            .collect()
    }

    /// Registries whose copy of an image a repair could not fix (it still failed
    /// verification after the copy), with the digest; they are never used as a
    /// source while their copy fails verification.
    pub fn unrepairable(&self) -> Vec<(String, Digest)> {
        let mut out: Vec<(String, Digest)> = self
            .unrepairable
            .lock()
            .iter()
            .filter(|(_, at)| at.elapsed() < UNREPAIRABLE_RETRY)
            .filter_map(|((i, _, d), _)| Some((self.stores.get(*i)?.registry().to_owned(), *d)))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Ids whose last verified record is cached.
    pub(super) fn cached_ids(&self) -> Vec<ServiceId> {
        self.records.lock().keys().cloned().collect()
    }

    /// Reads the active record, falling back to the last verified copy (stale) when
    /// the registry is unavailable or serves a record that fails verification.
    /// `Ok(None)` when the service is not registered.
    async fn read_record(&self, id: &ServiceId) -> Result<Option<ServiceRecord>> {
        let record = self.read_record_unchecked(id).await?;
        if let (Some(r), Some(allowed)) = (&record, &self.config.allowed_owners)
            && !allowed.iter().any(|a| a.0.eq_ignore_ascii_case(&r.owner.0))
        {
            return Err(Error::permission_denied(format!(
                "service {id} is owned by {}, which is not an allowed owner",
                r.owner
            )));
        }
        Ok(record)
    }

    /// [`Self::read_record`] without the owner check.
    async fn read_record_unchecked(&self, id: &ServiceId) -> Result<Option<ServiceRecord>> {
        let read = match self.registry.active(id).await {
            Ok(rec) => rec.verify().map(|()| rec),
            Err(e) => Err(e),
        };
        let verified = self.records.lock().get(id).cloned();
        match read {
            Ok(rec) => {
                if let Some(prev) = verified.filter(|prev| regresses(&rec, prev)) {
                    tracing::warn!(
                        %id,
                        read_version = rec.version,
                        read_latest = rec.latest_version,
                        read_as_of = ?rec.as_of,
                        verified_as_of = ?prev.as_of,
                        "the chain answered with an older record than one already verified (a lagging or lying endpoint, or a reorg); keeping the verified one"
                    );
                    return Ok(Some(ServiceRecord {
                        stale: true,
                        ..prev
                    }));
                }
                if !rec.stale {
                    self.records.lock().insert(id.clone(), rec.clone());
                }
                Ok(Some(rec))
            }
            Err(Error::NotFound { .. }) => match verified {
                // Services are never deregistered: a service verified before that a
                // read says does not exist is a lagging or lying answer, and must not
                // remove a running workload.
                Some(prev) => {
                    tracing::warn!(%id, verified_as_of = ?prev.as_of, "the chain says the service is not registered although its record was verified before; keeping the verified one");
                    Ok(Some(ServiceRecord {
                        stale: true,
                        ..prev
                    }))
                }
                None => Ok(None),
            },
            Err(e) if e.is_retryable() || matches!(e, Error::Tampered { .. }) => {
                let cached = self.records.lock().get(id).cloned();
                match cached {
                    Some(mut rec) => {
                        tracing::debug!(%id, error = %e, "registry unavailable; using the last verified record");
                        rec.stale = true;
                        Ok(Some(rec))
                    }
                    None => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    async fn store_status(
        &self,
        index: usize,
        store: &dyn ImageStore,
        repository: &Repository,
        digest: &Digest,
    ) -> ImageStatus {
        match store.has(repository, digest).await {
            Ok(true) => {}
            Ok(false) => return ImageStatus::Missing,
            Err(e) => return classify(&e),
        }
        let key = (index, repository.clone(), *digest);
        let fresh = self
            .verified
            .lock()
            .get(&key)
            .is_some_and(|at| at.elapsed() < self.config.verify_ttl);
        if fresh {
            return ImageStatus::Ok;
        }
        match store.verify(repository, digest).await {
            Ok(()) => {
                // Whatever made a copy unrepairable is over once it verifies.
                self.unrepairable.lock().remove(&key);
                self.verified.lock().insert(key, Instant::now());
                ImageStatus::Ok
            }
            Err(e) => {
                self.verified.lock().remove(&key);
                classify(&e)
            }
        }
    }

    /// [`Self::store_status`] without the verification cache: the bytes are pulled
    /// and checked now.
    async fn fresh_status(
        &self,
        index: usize,
        store: &dyn ImageStore,
        repository: &Repository,
        digest: &Digest,
    ) -> ImageStatus {
        self.verified
            .lock()
            .remove(&(index, repository.clone(), *digest));
        self.store_status(index, store, repository, digest).await
    }

    /// The registry to apply `record` from: `preferred` if its copy verifies now,
    /// else the first other store (in order) whose copy does.
    async fn verified_source(&self, record: &ServiceRecord, preferred: &str) -> Result<String> {
        let Some(digest) = record.spec.image.digest() else {
            return Ok(preferred.to_owned());
        };
        if self.stores.is_empty() {
            return Ok(preferred.to_owned());
        }
        let repository = record.spec.image.repository();
        let mut order: Vec<(usize, &Arc<dyn ImageStore>)> =
            self.stores.iter().enumerate().collect();
        order.sort_by_key(|(_, s)| s.registry() != preferred);
        for (i, store) in order {
            let status = self
                .fresh_status(i, store.as_ref(), repository, digest)
                .await;
            if status == ImageStatus::Ok {
                return Ok(store.registry().to_owned());
            }
            tracing::warn!(registry = store.registry(), ?status, %digest, "not applying from this registry: its copy does not verify now");
        }
        Err(Error::unavailable(format!(
            "no registry serves a copy of {digest} that verifies now"
        )))
    }

    /// The health of the record's image in every store, in store order.
    async fn image_health(&self, record: &ServiceRecord) -> Vec<ImageHealth> {
        let Some(digest) = record.spec.image.digest() else {
            return Vec::new();
        };
        let repository = record.spec.image.repository();
        let checks = self.stores.iter().enumerate().map(|(i, store)| async move {
            ImageHealth::new(
                store.registry(),
                self.store_status(i, store.as_ref(), repository, digest)
                    .await,
            )
        });
        futures::future::join_all(checks).await
    }

    async fn gather(&self, id: &ServiceId) -> Result<Context> {
        let (record, observed) =
            futures::future::join(self.read_record(id), self.replicator.observe(id)).await;
        let record = record?;
        let observed = observed?;
        let images = match &record {
            Some(r) => self.image_health(r).await,
            None => Vec::new(),
        };
        Ok(Context {
            record,
            observed,
            images,
        })
    }

    fn diagnosis_of(id: &ServiceId, ctx: &Context) -> Diagnosis {
        match &ctx.record {
            Some(r) => diagnose(r, ctx.observed.as_ref(), &ctx.images),
            // Not registered: a workload must not run.
            None => Diagnosis {
                id: id.clone(),
                record_version: None,
                findings: if ctx.observed.is_some() {
                    vec![Finding::UnexpectedWorkload]
                } else {
                    Vec::new()
                },
            },
        }
    }

    fn plan_of(ctx: &Context, diagnosis: &Diagnosis) -> Vec<RecoveryAction> {
        match &ctx.record {
            Some(r) => plan(r, diagnosis, &ctx.images),
            None if diagnosis.findings.contains(&Finding::UnexpectedWorkload) => {
                vec![RecoveryAction::RemoveWorkload]
            }
            None => Vec::new(),
        }
    }

    /// The record to apply: the image re-pointed to `registry` (same repository and
    /// digest), and an autoscaler's live replica count kept when within bounds. The
    /// recorded `spec_hash` is kept: it names the recorded version.
    fn record_to_apply(
        record: &ServiceRecord,
        registry: &str,
        observed: Option<&ObservedState>,
    ) -> Result<ServiceRecord> {
        let mut rec = record.clone();
        if rec.spec.image.registry() != registry {
            rec.spec.image = rec.spec.image.with_registry(registry)?;
        }
        if rec.state == ServiceState::Running
            && rec.spec.autoscaling.is_some()
            && let Some(o) = observed
            && rec.spec.allows_replicas(o.desired_replicas, rec.replicas)
        {
            rec.replicas = o.desired_replicas;
        }
        Ok(rec)
    }

    fn store_named(&self, registry: &str) -> Result<(usize, &Arc<dyn ImageStore>)> {
        self.stores
            .iter()
            .enumerate()
            .find(|(_, s)| s.registry() == registry)
            .ok_or_else(|| Error::not_found(format!("image store {registry}")))
    }

    async fn execute(&self, id: &ServiceId, ctx: &Context, action: &RecoveryAction) -> Result<()> {
        match action {
            RecoveryAction::ApplyRecord { registry, .. } => {
                let record = ctx
                    .record
                    .as_ref()
                    .ok_or_else(|| Error::not_found(format!("record of {id}")))?;
                let registry = self.verified_source(record, registry).await?;
                let rec = Self::record_to_apply(record, &registry, ctx.observed.as_ref())?;
                self.replicator.apply(&rec).await
            }
            RecoveryAction::ReplaceReplicas { replicas } => {
                self.replicator.replace_replicas(id, replicas).await
            }
            RecoveryAction::RemoveWorkload => self.replicator.remove(id).await,
            RecoveryAction::RepairImage { from, to } => {
                let record = ctx
                    .record
                    .as_ref()
                    .ok_or_else(|| Error::not_found(format!("record of {id}")))?;
                let digest = *record.spec.image.require_digest()?;
                let repository = record.spec.image.repository();
                let (_, source) = self.store_named(from)?;
                let (target_index, target) = self.store_named(to)?;
                source.copy_to(repository, &digest, target.as_ref()).await?;
                let key = (target_index, repository.clone(), digest);
                match self
                    .fresh_status(target_index, target.as_ref(), repository, &digest)
                    .await
                {
                    ImageStatus::Ok => {
                        self.unrepairable.lock().remove(&key);
                        Ok(())
                    }
                    status => {
                        self.unrepairable.lock().insert(key, Instant::now());
                        Err(Error::tampered(
                            format!(
                                "{to}/{repository} after repair (the registry keeps its \
                                 existing bytes; reported as unrepairable, not used as a \
                                 source): {status:?}"
                            ),
                            digest,
                            "bytes that still fail verification",
                        ))
                    }
                }
            }
            RecoveryAction::UseLastVerifiedRecord | RecoveryAction::Wait { .. } => Ok(()),
        }
    }

    /// The planned actions, less repairs of copies found unrepairable lately.
    fn actions_for(&self, ctx: &Context, diagnosis: &Diagnosis) -> Vec<RecoveryAction> {
        let mut actions = Self::plan_of(ctx, diagnosis);
        if let Some(record) = &ctx.record
            && let Some(digest) = record.spec.image.digest()
        {
            let repository = record.spec.image.repository();
            let unrepairable = self.unrepairable.lock();
            actions.retain(|a| match a {
                RecoveryAction::RepairImage { to, .. } => {
                    !self.stores.iter().enumerate().any(|(i, s)| {
                        s.registry() == to
                            && unrepairable
                                .get(&(i, repository.clone(), *digest))
                                .is_some_and(|at| at.elapsed() < UNREPAIRABLE_RETRY)
                    })
                }
                _ => true,
            });
        }
        actions
    }

    /// After the actions: re-checks repaired images, then re-observes the workload
    /// until it matches the record with every replica ready (or
    /// `settle_timeout`). Returns what is still wrong and whether it converged.
    async fn settle(
        &self,
        id: &ServiceId,
        ctx: &Context,
        outcomes: &[ActionOutcome],
    ) -> (Vec<Finding>, bool) {
        let touched_workload = outcomes.iter().any(|o| {
            o.error.is_none()
                && matches!(
                    o.action,
                    RecoveryAction::ApplyRecord { .. }
                        | RecoveryAction::ReplaceReplicas { .. }
                        | RecoveryAction::RemoveWorkload
                )
        });
        let mut images = ctx.images.clone();
        if let Some(record) = &ctx.record
            && let Some(digest) = record.spec.image.digest()
        {
            for o in outcomes {
                if let RecoveryAction::RepairImage { to, .. } = &o.action
                    && let Ok((i, store)) = self.store_named(to)
                    && let Some(slot) = images.get_mut(i)
                {
                    let status = self
                        .fresh_status(i, store.as_ref(), record.spec.image.repository(), digest)
                        .await;
                    *slot = ImageHealth::new(to.clone(), status);
                }
            }
        }
        let deadline = tokio::time::Instant::now() + self.config.settle_timeout;
        loop {
            let observed = self.replicator.observe(id).await;
            let last_try = !touched_workload || tokio::time::Instant::now() >= deadline;
            match (observed, &ctx.record) {
                (Ok(observed), Some(record)) => {
                    let d = diagnose(record, observed.as_ref(), &images);
                    let converged = converged(record, observed.as_ref());
                    let settled = converged && !d.findings.iter().any(is_workload_finding);
                    if settled || last_try {
                        return (d.findings, converged);
                    }
                }
                (Ok(observed), None) => {
                    if observed.is_none() {
                        return (Vec::new(), true);
                    }
                    if last_try {
                        return (vec![Finding::UnexpectedWorkload], false);
                    }
                }
                (Err(e), _) => {
                    if last_try {
                        tracing::warn!(%id, error = %e, "cannot observe the workload after recovering it");
                        return (Self::diagnosis_of(id, ctx).findings, false);
                    }
                }
            }
            tokio::time::sleep(SETTLE_POLL).await;
        }
    }

    async fn act(&self, ctx: &Context, diagnosis: Diagnosis) -> RecoveryReport {
        let start = Instant::now();
        let actions = self.actions_for(ctx, &diagnosis);
        let mut outcomes = Vec::with_capacity(actions.len());
        for action in actions {
            let t = Instant::now();
            let result = self.execute(&diagnosis.id, ctx, &action).await;
            if let Err(e) = &result {
                tracing::warn!(id = %diagnosis.id, ?action, error = %e, "recovery action failed");
            }
            let err = result.err();
            outcomes.push(ActionOutcome {
                action,
                duration: t.elapsed(),
                error_kind: err.as_ref().map(|e| e.kind()),
                error: err.map(|e| e.to_string()),
            });
        }
        let failed = outcomes.iter().filter(|o| o.error.is_some()).count();
        let (remaining, converged) = if diagnosis.is_healthy() {
            let converged = match &ctx.record {
                Some(r) => converged(r, ctx.observed.as_ref()),
                None => ctx.observed.is_none(),
            };
            (Vec::new(), converged)
        } else {
            self.settle(&diagnosis.id, ctx, &outcomes).await
        };
        let outcome = if diagnosis.is_healthy() {
            Outcome::Healthy
        } else if failed > 0 && failed == outcomes.len() {
            Outcome::Failed
        } else if failed == 0 && remaining.is_empty() && converged {
            Outcome::Recovered
        } else {
            Outcome::Partial
        };
        RecoveryReport {
            id: diagnosis.id.clone(),
            diagnosis,
            actions: outcomes,
            duration: start.elapsed(),
            outcome,
            remaining,
            converged,
        }
    }

    /// Diagnoses `id` and, when something is wrong, recovers it: one reconcile,
    /// without events or backoff (those belong to [`Supervisor::run`]).
    pub async fn reconcile(&self, id: &ServiceId) -> Result<RecoveryReport> {
        self.reconcile_timed(id).await.map(|(report, _)| report)
    }

    /// [`Supervisor::reconcile`] plus when the diagnosis completed.
    pub(super) async fn reconcile_timed(
        &self,
        id: &ServiceId,
    ) -> Result<(RecoveryReport, Instant)> {
        let ctx = self.gather(id).await;
        let detected_at = Instant::now();
        let ctx = match ctx {
            Ok(ctx) => ctx,
            Err(e) => {
                self.metrics.lock().errors += 1;
                self.metrics.lock().reconciles += 1;
                return Err(e);
            }
        };
        let diagnosis = Self::diagnosis_of(id, &ctx);
        let report = self.act(&ctx, diagnosis).await;
        let mut m = self.metrics.lock();
        m.reconciles += 1;
        if !report.diagnosis.is_healthy() {
            m.recoveries += 1;
            if matches!(report.outcome, Outcome::Partial | Outcome::Failed) {
                m.failed_recoveries += 1;
            }
            for f in &report.diagnosis.findings {
                *m.recoveries_by_finding
                    .entry(f.name().to_owned())
                    .or_default() += 1;
            }
        }
        Ok((report, detected_at))
    }

    pub(super) fn emit(&self, event: SupervisorEvent) {
        // No subscriber is not an error.
        let _ = self.events.send(event);
    }
}

#[async_trait]
impl Recoverer for Supervisor {
    async fn diagnose(&self, id: &ServiceId) -> Result<Diagnosis> {
        let ctx = self.gather(id).await?;
        Ok(Self::diagnosis_of(id, &ctx))
    }

    async fn recover(&self, diagnosis: &Diagnosis) -> Result<RecoveryReport> {
        if diagnosis.is_healthy() {
            return Ok(RecoveryReport {
                id: diagnosis.id.clone(),
                diagnosis: diagnosis.clone(),
                actions: Vec::new(),
                duration: Duration::ZERO,
                outcome: Outcome::Healthy,
                remaining: Vec::new(),
                converged: true,
            });
        }
        // Plan against fresh facts: the record or the stores may have changed since.
        let ctx = self.gather(&diagnosis.id).await?;
        Ok(self.act(&ctx, diagnosis.clone()).await)
    }
}
