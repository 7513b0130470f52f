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

use super::builder::{Config, SupervisorBuilder};
use super::decide::{ImageHealth, ImageStatus, converged, diagnose, is_workload_finding, plan};
use super::gather::Context;
use super::queue::{Backoffs, Queue};
use crate::diagnosis::{
    ActionOutcome, Diagnosis, Finding, Outcome, RecoveryAction, RecoveryReport,
};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::id::ServiceId;
use crate::image::Repository;
use crate::observed::ObservedState;
use crate::record::{ServiceRecord, ServiceState};
use crate::recoverer::Recoverer;
use crate::registry::Registry;
use crate::replicator::Replicator;
use crate::store::ImageStore;

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
    pub(super) stores: Vec<Arc<dyn ImageStore>>,
    pub(super) config: Config,
    pub(super) records: Mutex<HashMap<ServiceId, ServiceRecord>>,
    pub(super) verified: Mutex<HashMap<(usize, Repository, Digest), tokio::time::Instant>>,
    pub(super) unrepairable: Mutex<HashMap<(usize, Repository, Digest), tokio::time::Instant>>,
    pub(super) services: Mutex<Vec<ServiceId>>,
    pub(super) queue: Queue,
    pub(super) backoffs: Backoffs,
    pub(super) events: broadcast::Sender<SupervisorEvent>,
    pub(super) metrics: Mutex<SupervisorMetrics>,
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
                        self.unrepairable
                            .lock()
                            .insert(key, tokio::time::Instant::now());
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
                    // Another writer changed the workload after it was applied (its
                    // template, replica count or fields differ from the record again):
                    // waiting cannot settle that, and this recovery would block the
                    // next one until the timeout. End it; the next one repairs it.
                    if touched_workload && d.findings.iter().any(is_foreign_change) {
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

/// Whether `f` is a change of the workload's definition that only a writer other
/// than the supervisor makes right after the supervisor applied the record.
fn is_foreign_change(f: &Finding) -> bool {
    matches!(
        f,
        Finding::MissingWorkload { .. }
            | Finding::ReplicasDrifted { .. }
            | Finding::ImageDrifted { .. }
            | Finding::TemplateTampered { .. }
            | Finding::ForeignFields { .. }
    )
}
