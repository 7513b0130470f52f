//! [`Supervisor`]: the generic [`Recoverer`] over a [`Registry`], a [`Replicator`] and
//! one or more [`ImageStore`]s.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::decide::{ImageHealth, ImageStatus, diagnose, plan};
use super::queue::{Backoffs, Queue};
use crate::diagnosis::{
    ActionOutcome, Diagnosis, Finding, Outcome, RecoveryAction, RecoveryReport,
};
use crate::digest::Digest;
use crate::error::{Error, Result, ValidationError};
use crate::id::ServiceId;
use crate::image::Repository;
use crate::observed::ObservedState;
use crate::record::{ServiceRecord, ServiceState};
use crate::recoverer::Recoverer;
use crate::registry::Registry;
use crate::replicator::Replicator;
use crate::store::ImageStore;

/// Events buffered per subscriber by default; a slower subscriber loses the oldest.
const EVENT_BUFFER: usize = 1024;

/// Locks `m`; every critical section here is a plain map update, so a poisoned lock
/// still holds consistent data.
pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

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
///   success cached per store and digest for [`SupervisorBuilder::verify_ttl`].
/// - [`Supervisor::run`] reacts to both change streams, resyncs periodically and
///   retries failed recoveries with per-service exponential backoff.
pub struct Supervisor {
    pub(super) registry: Arc<dyn Registry>,
    pub(super) replicator: Arc<dyn Replicator>,
    stores: Vec<Arc<dyn ImageStore>>,
    pub(super) config: Config,
    records: Mutex<HashMap<ServiceId, ServiceRecord>>,
    verified: Mutex<HashMap<(usize, Repository, Digest), Instant>>,
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

fn classify(e: &Error) -> ImageStatus {
    match e {
        Error::NotFound { .. } => ImageStatus::Missing,
        Error::Tampered { .. } | Error::InvalidInput(_) => ImageStatus::Tampered(e.to_string()),
        _ => ImageStatus::Down,
    }
}

/// Findings that no action can clear: they persist until the backend comes back.
fn unresolvable(f: &Finding) -> bool {
    matches!(
        f,
        Finding::RegistryDown { .. } | Finding::ChainEndpointDown { .. }
    )
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
        let mut m = lock(&self.metrics).clone();
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

    /// Ids whose last verified record is cached.
    pub(super) fn cached_ids(&self) -> Vec<ServiceId> {
        lock(&self.records).keys().cloned().collect()
    }

    /// Reads the active record, falling back to the last verified copy (stale) when
    /// the registry is unavailable or serves a record that fails verification.
    /// `Ok(None)` when the service is not registered.
    async fn read_record(&self, id: &ServiceId) -> Result<Option<ServiceRecord>> {
        let read = match self.registry.active(id).await {
            Ok(rec) => rec.verify().map(|()| rec),
            Err(e) => Err(e),
        };
        match read {
            Ok(rec) => {
                if !rec.stale {
                    lock(&self.records).insert(id.clone(), rec.clone());
                }
                Ok(Some(rec))
            }
            Err(Error::NotFound { .. }) => {
                lock(&self.records).remove(id);
                Ok(None)
            }
            Err(e) if e.is_retryable() || matches!(e, Error::Tampered { .. }) => {
                let cached = lock(&self.records).get(id).cloned();
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
        let fresh = lock(&self.verified)
            .get(&key)
            .is_some_and(|at| at.elapsed() < self.config.verify_ttl);
        if fresh {
            return ImageStatus::Ok;
        }
        match store.verify(repository, digest).await {
            Ok(()) => {
                lock(&self.verified).insert(key, Instant::now());
                ImageStatus::Ok
            }
            Err(e) => {
                lock(&self.verified).remove(&key);
                classify(&e)
            }
        }
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
                let rec = Self::record_to_apply(record, registry, ctx.observed.as_ref())?;
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
                lock(&self.verified).remove(&(target_index, repository.clone(), digest));
                Ok(())
            }
            RecoveryAction::UseLastVerifiedRecord | RecoveryAction::Wait { .. } => Ok(()),
        }
    }

    async fn act(&self, ctx: &Context, diagnosis: Diagnosis) -> RecoveryReport {
        let start = Instant::now();
        let actions = Self::plan_of(ctx, &diagnosis);
        let mut outcomes = Vec::with_capacity(actions.len());
        for action in actions {
            let t = Instant::now();
            let result = self.execute(&diagnosis.id, ctx, &action).await;
            if let Err(e) = &result {
                tracing::warn!(id = %diagnosis.id, ?action, error = %e, "recovery action failed");
            }
            outcomes.push(ActionOutcome {
                action,
                duration: t.elapsed(),
                error: result.err().map(|e| e.to_string()),
            });
        }
        let failed = outcomes.iter().filter(|o| o.error.is_some()).count();
        let waits = outcomes
            .iter()
            .filter(|o| matches!(o.action, RecoveryAction::Wait { .. }))
            .count();
        let outcome = if diagnosis.is_healthy() {
            Outcome::Healthy
        } else if failed > 0 && failed == outcomes.len() {
            Outcome::Failed
        } else if failed > 0 || waits > 0 || diagnosis.findings.iter().any(unresolvable) {
            Outcome::Partial
        } else {
            Outcome::Recovered
        };
        RecoveryReport {
            id: diagnosis.id.clone(),
            diagnosis,
            actions: outcomes,
            duration: start.elapsed(),
            outcome,
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
                lock(&self.metrics).errors += 1;
                lock(&self.metrics).reconciles += 1;
                return Err(e);
            }
        };
        let diagnosis = Self::diagnosis_of(id, &ctx);
        let report = self.act(&ctx, diagnosis).await;
        let mut m = lock(&self.metrics);
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
            });
        }
        // Plan against fresh facts: the record or the stores may have changed since.
        let ctx = self.gather(&diagnosis.id).await?;
        Ok(self.act(&ctx, diagnosis.clone()).await)
    }
}
