//! The controller: one core [`Supervisor`] per `Br2kService`, driven by kube-runtime.
//!
//! Each reconcile builds the resource's status once ([`status`]) and writes it once;
//! [`events`] tells about recoveries; [`watch`] runs the kube-runtime controllers.

mod events;
mod status;
mod watch;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use br2k_core::supervisor::Supervisor;
use br2k_core::{Error, Finding, Replicator, ServiceId};
use br2k_k8s::KubeReplicator;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::{Client, ResourceExt};
use parking_lot::Mutex;

use crate::backends::Backends;
use crate::crd::{Br2kService, Br2kServiceSpec, LastRecovery};
use crate::failover::Failover;
use crate::metrics::Metrics;
use events::{describe_actions, finding_names, publish};
use status::{StatusUpdate, assess, now, now_wrong, write_status};
pub use watch::run;

/// Finalizer put on every `Br2kService`: deleting the resource removes its workload.
pub const FINALIZER: &str = "br2k.io/workload";

/// Errors of one reconcile (they lead to a per-object backoff, never a crash).
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    /// A br2k operation failed.
    #[error(transparent)]
    Br2k(#[from] Error),
    /// A Kubernetes call failed.
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    /// The finalizer machinery failed.
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<OperatorError>>),
}

/// Which namespaces the operator serves, from its configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    /// Namespaces whose `Br2kService` resources (and workloads) are watched; empty:
    /// every namespace. With a list, every watch is namespaced, so namespaced Roles
    /// suffice (Nodes, cluster-scoped, are only read).
    pub watch_namespaces: Vec<String>,
    /// Namespaces other than its own that a resource may run its workload in
    /// (`spec.namespace`); any other is refused with `NamespaceNotAllowed`.
    pub allowed_target_namespaces: Vec<String>,
}

impl Scope {
    /// Whether a resource in `resource_ns` may run its workload in `target`.
    pub fn allows_target(&self, resource_ns: &str, target: &str) -> bool {
        target == resource_ns || self.allowed_target_namespaces.iter().any(|n| n == target)
    }

    /// The namespaces whose workloads a controller for the resources of `ns` must
    /// watch: `ns` and every allowed target namespace.
    fn workload_namespaces(&self, ns: &str) -> Vec<String> {
        let mut out = vec![ns.to_owned()];
        for n in &self.allowed_target_namespaces {
            if !out.contains(n) {
                out.push(n.clone());
            }
        }
        out
    }
}

/// The resource managing each workload, by (workload namespace, service id).
type Index = Arc<Mutex<HashMap<(String, String), ObjectRef<Br2kService>>>>;

/// Shared state of the controller.
pub struct Context {
    client: Client,
    backends: Arc<dyn Backends>,
    metrics: Metrics,
    identity: String,
    resync: Duration,
    scope: Scope,
    supervisors: Mutex<HashMap<String, (Br2kServiceSpec, Arc<Supervisor>)>>,
    index: Index,
    failures: Mutex<HashMap<String, (u32, std::time::Instant)>>,
    /// Consecutive reconciles that left each resource short of healthy.
    unsettled: Mutex<HashMap<String, u32>>,
    /// Whole-cluster failover of services placed across clusters, if configured.
    failover: std::sync::OnceLock<Arc<Failover>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("backends", &self.backends)
            .field("resync", &self.resync)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// A context reporting events as `identity`, resyncing healthy services every
    /// `resync`, serving every namespace (workloads only in their resource's own).
    pub fn new(
        client: Client,
        backends: Arc<dyn Backends>,
        metrics: Metrics,
        identity: &str,
        resync: Duration,
    ) -> Arc<Self> {
        Self::scoped(
            client,
            backends,
            metrics,
            identity,
            resync,
            Scope::default(),
        )
    }

    /// Like [`Context::new`], serving the namespaces of `scope`.
    pub fn scoped(
        client: Client,
        backends: Arc<dyn Backends>,
        metrics: Metrics,
        identity: &str,
        resync: Duration,
        scope: Scope,
    ) -> Arc<Self> {
        Arc::new(Self {
            identity: identity.to_owned(),
            client,
            backends,
            metrics,
            resync,
            scope,
            supervisors: Mutex::default(),
            index: Arc::default(),
            failures: Mutex::default(),
            unsettled: Mutex::default(),
            failover: std::sync::OnceLock::new(),
        })
    }

    /// Serves services placed across clusters with `failover` (set once, before
    /// the controller runs; the backends must follow its decisions).
    pub fn set_failover(&self, failover: Arc<Failover>) {
        let _ = self.failover.set(failover);
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    async fn supervisor(
        &self,
        key: &str,
        cr_ns: &str,
        ns: &str,
        spec: &Br2kServiceSpec,
    ) -> Result<Arc<Supervisor>, Error> {
        if let Some((s, sup)) = self.supervisors.lock().get(key)
            && s == spec
        {
            return Ok(sup.clone());
        }
        let sup = Arc::new(
            self.backends
                .supervisor(&self.client, cr_ns, ns, spec)
                .await?,
        );
        self.supervisors
            .lock()
            .insert(key.to_owned(), (spec.clone(), sup.clone()));
        Ok(sup)
    }
}

fn workload_namespace(obj: &Br2kService) -> String {
    obj.spec
        .namespace
        .clone()
        .unwrap_or_else(|| obj.namespace().unwrap_or_default())
}

/// What a reconcile does after its one status write.
enum Next {
    /// Return this.
    Done(Result<Action, OperatorError>),
    /// The service was reconciled: requeue after the resync period when `healthy`,
    /// else after the growing backoff of unsettled resources (at least
    /// [`REFUSED_RETRY`] when the API server `refused` the record).
    Settle { healthy: bool, refused: bool },
}

/// A reconcile's status (none: leave it) and what to do after writing it.
type Decision = (Option<StatusUpdate>, Next);

/// Refuses an invalid resource (`Valid=False` with `reason`) and waits for it to
/// change: nothing is retried until then.
fn refuse(reason: &str, message: String) -> Decision {
    (
        Some(StatusUpdate::refused(reason, message)),
        Next::Done(Ok(Action::await_change())),
    )
}

async fn apply(obj: Arc<Br2kService>, ctx: Arc<Context>) -> Result<Action, OperatorError> {
    let key = format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any());
    let (update, next) = decide(&obj, &ctx, &key).await;
    // The one status write of this reconcile.
    if let Some(update) = update {
        write_status(&obj, &ctx.client, update).await?;
    }
    match next {
        Next::Done(r) => r,
        Next::Settle { healthy, refused } => Ok(settle(&ctx, &key, healthy, refused)),
    }
}

/// Reconciles the resource `key` and decides its status.
async fn decide(obj: &Br2kService, ctx: &Context, key: &str) -> Decision {
    let cr_ns = obj.namespace().unwrap_or_default();
    let ns = workload_namespace(obj);
    // Honour the per-object backoff whatever woke us (watch events included), so a
    // failing resource never hammers its backends or the API server.
    if let Some((_, until)) = ctx.failures.lock().get(key).copied() {
        let now = std::time::Instant::now();
        if until > now {
            return (None, Next::Done(Ok(Action::requeue(until - now))));
        }
    }
    let id = match ServiceId::new(&obj.spec.service_id) {
        Ok(id) => id,
        Err(e) => return refuse("InvalidServiceId", e.to_string()),
    };
    // The workload stays in the resource's namespace unless the operator's own
    // configuration allows another: nothing is read or applied for it otherwise.
    if !ctx.scope.allows_target(&cr_ns, &ns) {
        ctx.supervisors.lock().remove(key);
        return refuse(
            "NamespaceNotAllowed",
            format!(
                "the workload namespace {ns} is not the resource's ({cr_ns}) and the operator's configuration does not allow it (--allow-target-namespace)"
            ),
        );
    }
    ctx.index
        .lock()
        .insert((ns.clone(), id.to_string()), ObjectRef::from_obj(obj));
    let sup = match ctx.supervisor(key, &cr_ns, &ns, &obj.spec).await {
        Ok(s) => s,
        Err(Error::InvalidInput(e)) => return refuse("InvalidSpec", e.to_string()),
        Err(e) => {
            ctx.metrics.chain_available(key, false);
            return (
                Some(StatusUpdate::chain_unavailable(&e)),
                Next::Done(Err(e.into())),
            );
        }
    };
    if let Some(f) = ctx.failover.get()
        && let Err(e) = f.ensure(&id).await
    {
        // Until the lease is reachable the service stays as the decisions say
        // (paused here when never placed): retried with the resource's backoff.
        return (
            Some(StatusUpdate::reconcile_failed(&e)),
            Next::Done(Err(e.into())),
        );
    }
    ctx.metrics.reconcile();
    let report = match sup.reconcile(&id).await {
        Ok(r) => r,
        Err(Error::PermissionDenied { reason }) => {
            // The record's owner is not one this operator may deploy for: nothing is
            // applied; checked again rarely (an ownership transfer may change it).
            return (
                Some(StatusUpdate::owner_not_allowed(reason)),
                Next::Done(Ok(Action::requeue(jittered(Duration::from_secs(60))))),
            );
        }
        Err(e) => {
            return (
                Some(StatusUpdate::reconcile_failed(&e)),
                Next::Done(Err(e.into())),
            );
        }
    };
    ctx.failures.lock().remove(key);
    let now_wrong = now_wrong(&report);
    let chain_down = now_wrong
        .iter()
        .any(|f| matches!(f, Finding::ChainEndpointDown { .. }));
    ctx.metrics.chain_available(key, !chain_down);
    let unrepairable = sup.unrepairable();
    for host in sup.registries() {
        let down = now_wrong
            .iter()
            .any(|f| matches!(f, Finding::RegistryDown { registry } if *registry == host));
        ctx.metrics.registry_available(&host, !down);
        ctx.metrics
            .registry_unrepairable(&host, unrepairable.iter().any(|(r, _)| *r == host));
    }
    let Some(version) = report.diagnosis.record_version else {
        return (
            Some(StatusUpdate::not_registered(&id)),
            Next::Done(Ok(Action::requeue(ctx.resync * 6))),
        );
    };
    let mut last = None;
    if !report.diagnosis.is_healthy() {
        for f in &report.diagnosis.findings {
            ctx.metrics.recovery(f.name());
        }
        ctx.metrics.time_to_recover(report.duration);
        tracing::info!(
            resource = %key,
            service = %id,
            found = %finding_names(&report.diagnosis.findings),
            actions = %describe_actions(&report),
            duration_ms = report.duration.as_millis() as u64,
            outcome = ?report.outcome,
            still_wrong = %finding_names(&report.remaining),
            "recovery"
        );
        publish(ctx, obj, &report).await;
        last = Some(LastRecovery {
            time: now(),
            findings: report
                .diagnosis
                .findings
                .iter()
                .map(|f| f.name().to_owned())
                .collect(),
            outcome: format!("{:?}", report.outcome).to_lowercase(),
            duration_ms: report.duration.as_millis() as u64,
        });
    }
    let mut a = assess(&report, &unrepairable, version, last);
    if let Some(f) = ctx.failover.get() {
        if f.decisions().lock().get(&id).is_some_and(|d| d.runs_here()) {
            f.progress(&id, a.healthy);
        }
        a.update.placement = f.view(&id);
    }
    (
        Some(a.update),
        Next::Settle {
            healthy: a.healthy,
            refused: a.refused,
        },
    )
}

/// The requeue of a reconciled resource (its status written): the resync period
/// when `healthy`, else a growing, jittered delay.
fn settle(ctx: &Context, key: &str, healthy: bool, refused: bool) -> Action {
    if healthy {
        ctx.unsettled.lock().remove(key);
        Action::requeue(ctx.resync)
    } else {
        // Retry with a growing, jittered delay; a change of the workload's objects
        // still wakes the resource at once.
        let n = {
            let mut u = ctx.unsettled.lock();
            let n = u.entry(key.to_owned()).or_insert(0);
            *n = n.saturating_add(1);
            *n
        };
        // A refusal is not undone by retrying soon: at least 10 s between tries.
        let floor = if refused {
            REFUSED_RETRY
        } else {
            Duration::ZERO
        };
        Action::requeue(jittered(unsettled_backoff(n).max(floor)))
    }
}

/// The shortest delay before a record the API server refused is tried again.
const REFUSED_RETRY: Duration = Duration::from_secs(10);

/// Delay before re-checking a resource that is not healthy after `n` consecutive
/// reconciles: 500 ms, doubling, at most 60 s.
pub fn unsettled_backoff(n: u32) -> Duration {
    Duration::from_millis(500u64 << n.saturating_sub(1).min(7)).min(Duration::from_secs(60))
}

/// `d` scaled by a random factor in [0.5, 1.0] (spreads retries of many resources).
fn jittered(d: Duration) -> Duration {
    d.mul_f64(0.5 + rand::random::<f64>() / 2.0)
}

async fn cleanup(obj: Arc<Br2kService>, ctx: Arc<Context>) -> Result<Action, OperatorError> {
    let key = format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any());
    ctx.supervisors.lock().remove(&key);
    ctx.failures.lock().remove(&key);
    ctx.unsettled.lock().remove(&key);
    ctx.metrics.forget(&key);
    let ns = workload_namespace(&obj);
    let cr_ns = obj.namespace().unwrap_or_default();
    // A resource naming a namespace it may not use never deployed there: removing
    // the service of that id there would delete a workload it does not own.
    if !ctx.scope.allows_target(&cr_ns, &ns) {
        return Ok(Action::await_change());
    }
    if let Ok(id) = ServiceId::new(&obj.spec.service_id) {
        ctx.index.lock().remove(&(ns.clone(), id.to_string()));
        KubeReplicator::new(ctx.client.clone(), &ns)
            .remove(&id)
            .await?;
    }
    Ok(Action::await_change())
}

/// One reconcile of a `Br2kService` (with the finalizer).
pub async fn reconcile(obj: Arc<Br2kService>, ctx: Arc<Context>) -> Result<Action, OperatorError> {
    let ns = obj.namespace().unwrap_or_default();
    let api: Api<Br2kService> = Api::namespaced(ctx.client.clone(), &ns);
    finalizer(&api, FINALIZER, obj, |event| async {
        match event {
            FinalizerEvent::Apply(o) => apply(o, ctx.clone()).await,
            FinalizerEvent::Cleanup(o) => cleanup(o, ctx.clone()).await,
        }
    })
    .await
    .map_err(|e| OperatorError::Finalizer(Box::new(e)))
}

/// Per-object exponential backoff: 1 s, 2 s, 4 s ... up to 5 minutes.
pub fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(9)).min(Duration::from_secs(300))
}

/// What to do after a failed reconcile: requeue the object after its own backoff.
pub fn error_policy(obj: Arc<Br2kService>, err: &OperatorError, ctx: Arc<Context>) -> Action {
    let key = format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any());
    let delay = {
        let mut f = ctx.failures.lock();
        let entry = f
            .entry(key.clone())
            .or_insert((0, std::time::Instant::now()));
        entry.0 += 1;
        let delay = jittered(backoff(entry.0));
        entry.1 = std::time::Instant::now() + delay;
        delay
    };
    ctx.metrics.reconcile_error();
    tracing::warn!(resource = %key, error = %err, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

#[cfg(test)]
mod tests;
