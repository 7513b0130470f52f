//! The controller: one core [`Supervisor`] per `Br2kService`, driven by kube-runtime.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use br2k_core::supervisor::Supervisor;
use br2k_core::{Error, Finding, Outcome, RecoveryReport, Replicator, ServiceId};
use br2k_k8s::KubeReplicator;
use br2k_k8s::names::{LABEL_SERVICE_ID, MANAGED_SELECTOR};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;

use crate::backends::Backends;
use crate::crd::{Br2kService, Br2kServiceSpec, Br2kServiceStatus, Condition, LastRecovery};
use crate::metrics::Metrics;

/// Finalizer put on every `Br2kService`: deleting the resource removes its workload.
pub const FINALIZER: &str = "br2k.io/workload";

/// Field manager of status writes.
const MANAGER: &str = "br2k-operator";

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

type Index = Arc<Mutex<HashMap<(String, String), ObjectRef<Br2kService>>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Shared state of the controller.
pub struct Context {
    client: Client,
    backends: Arc<dyn Backends>,
    metrics: Metrics,
    recorder: Recorder,
    resync: Duration,
    supervisors: Mutex<HashMap<String, (Br2kServiceSpec, Arc<Supervisor>)>>,
    index: Index,
    failures: Mutex<HashMap<String, (u32, std::time::Instant)>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("backends", &self.backends)
            .field("resync", &self.resync)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// A context reporting events as `identity`, resyncing healthy services every
    /// `resync`.
    pub fn new(
        client: Client,
        backends: Arc<dyn Backends>,
        metrics: Metrics,
        identity: &str,
        resync: Duration,
    ) -> Arc<Self> {
        let reporter = Reporter {
            controller: "br2k-operator".into(),
            instance: Some(identity.to_owned()),
        };
        Arc::new(Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            backends,
            metrics,
            resync,
            supervisors: Mutex::default(),
            index: Arc::default(),
            failures: Mutex::default(),
        })
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
        if let Some((s, sup)) = lock(&self.supervisors).get(key)
            && s == spec
        {
            return Ok(sup.clone());
        }
        let sup = Arc::new(
            self.backends
                .supervisor(&self.client, cr_ns, ns, spec)
                .await?,
        );
        lock(&self.supervisors).insert(key.to_owned(), (spec.clone(), sup.clone()));
        Ok(sup)
    }
}

fn now() -> String {
    Timestamp::now().to_string()
}

fn condition(type_: &str, ok: bool, reason: &str, message: impl Into<String>) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: now(),
    }
}

/// Merges `new` conditions into `old`, keeping the transition time of unchanged ones.
fn merge_conditions(old: &[Condition], new: Vec<Condition>) -> Vec<Condition> {
    let mut out: Vec<Condition> = old
        .iter()
        .filter(|o| !new.iter().any(|n| n.type_ == o.type_))
        .cloned()
        .collect();
    for mut n in new {
        if let Some(o) = old.iter().find(|o| o.type_ == n.type_)
            && o.status == n.status
        {
            n.last_transition_time = o.last_transition_time.clone();
        }
        out.push(n);
    }
    out.sort_by(|a, b| a.type_.cmp(&b.type_));
    out
}

async fn write_status(
    obj: &Br2kService,
    client: &Client,
    phase: &str,
    conditions: Vec<Condition>,
    observed_version: Option<u64>,
    last_recovery: Option<LastRecovery>,
) -> Result<(), OperatorError> {
    let ns = obj.namespace().unwrap_or_default();
    let api: Api<Br2kService> = Api::namespaced(client.clone(), &ns);
    let old = obj.status.clone().unwrap_or_default();
    let status = Br2kServiceStatus {
        observed_version: observed_version.or(old.observed_version),
        phase: Some(phase.to_owned()),
        conditions: merge_conditions(&old.conditions, conditions),
        last_recovery: last_recovery.or(old.last_recovery.clone()),
        observed_generation: obj.metadata.generation,
    };
    if status == old {
        return Ok(());
    }
    api.patch_status(
        &obj.name_any(),
        &PatchParams::apply(MANAGER),
        &Patch::Merge(json!({ "status": status })),
    )
    .await?;
    Ok(())
}

fn workload_namespace(obj: &Br2kService) -> String {
    obj.spec
        .namespace
        .clone()
        .unwrap_or_else(|| obj.namespace().unwrap_or_default())
}

async fn publish(ctx: &Context, obj: &Br2kService, report: &RecoveryReport) {
    let findings: Vec<&str> = report
        .diagnosis
        .findings
        .iter()
        .map(Finding::name)
        .collect();
    let ok = report.outcome == Outcome::Recovered;
    let ev = Event {
        type_: if ok {
            EventType::Normal
        } else {
            EventType::Warning
        },
        reason: if ok {
            "Recovered"
        } else {
            "RecoveryIncomplete"
        }
        .into(),
        note: Some(format!(
            "{}: found {}; {} action(s) in {} ms, outcome {:?}",
            report.id,
            findings.join(", "),
            report.actions.len(),
            report.duration.as_millis(),
            report.outcome
        )),
        action: "Recover".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &obj.object_ref(&())).await {
        tracing::warn!(error = %e, "publishing event failed");
    }
}

async fn apply(obj: Arc<Br2kService>, ctx: Arc<Context>) -> Result<Action, OperatorError> {
    let cr_ns = obj.namespace().unwrap_or_default();
    let key = format!("{cr_ns}/{}", obj.name_any());
    let ns = workload_namespace(&obj);
    // Honour the per-object backoff whatever woke us (watch events included), so a
    // failing resource never hammers its backends or the API server.
    if let Some((_, until)) = lock(&ctx.failures).get(&key).copied() {
        let now = std::time::Instant::now();
        if until > now {
            return Ok(Action::requeue(until - now));
        }
    }
    let id = match ServiceId::new(&obj.spec.service_id) {
        Ok(id) => id,
        Err(e) => {
            write_status(
                &obj,
                &ctx.client,
                "Error",
                vec![
                    condition("Valid", false, "InvalidServiceId", e.to_string()),
                    condition("Ready", false, "InvalidSpec", "the spec is invalid"),
                ],
                None,
                None,
            )
            .await?;
            // Nothing to retry until the resource changes.
            return Ok(Action::await_change());
        }
    };
    lock(&ctx.index).insert((ns.clone(), id.to_string()), ObjectRef::from_obj(&*obj));
    let sup = match ctx.supervisor(&key, &cr_ns, &ns, &obj.spec).await {
        Ok(s) => s,
        Err(Error::InvalidInput(e)) => {
            write_status(
                &obj,
                &ctx.client,
                "Error",
                vec![
                    condition("Valid", false, "InvalidSpec", e.to_string()),
                    condition("Ready", false, "InvalidSpec", "the spec is invalid"),
                ],
                None,
                None,
            )
            .await?;
            return Ok(Action::await_change());
        }
        Err(e) => {
            ctx.metrics.chain_available(&key, false);
            write_status(
                &obj,
                &ctx.client,
                "Error",
                vec![
                    condition("Valid", true, "Valid", "spec is valid"),
                    condition("RegistryAvailable", false, "Unreachable", e.to_string()),
                    condition(
                        "Ready",
                        false,
                        "RegistryUnavailable",
                        "cannot read the registry",
                    ),
                ],
                None,
                None,
            )
            .await?;
            return Err(e.into());
        }
    };
    let report = match sup.reconcile(&id).await {
        Ok(r) => r,
        Err(e) => {
            write_status(
                &obj,
                &ctx.client,
                "Error",
                vec![condition("Ready", false, "ReconcileFailed", e.to_string())],
                None,
                None,
            )
            .await?;
            return Err(e.into());
        }
    };
    lock(&ctx.failures).remove(&key);
    let chain_down = report
        .diagnosis
        .findings
        .iter()
        .any(|f| matches!(f, Finding::ChainEndpointDown { .. }));
    ctx.metrics.chain_available(&key, !chain_down);
    for host in sup.registries() {
        let down = report
            .diagnosis
            .findings
            .iter()
            .any(|f| matches!(f, Finding::RegistryDown { registry } if *registry == host));
        ctx.metrics.registry_available(&host, !down);
    }
    let Some(version) = report.diagnosis.record_version else {
        write_status(
            &obj,
            &ctx.client,
            "Error",
            vec![
                condition("Valid", true, "Valid", "spec is valid"),
                condition("RegistryAvailable", true, "Reachable", "registry answers"),
                condition(
                    "Ready",
                    false,
                    "NotRegistered",
                    format!("service {id} is not registered"),
                ),
            ],
            None,
            None,
        )
        .await?;
        return Ok(Action::requeue(ctx.resync * 6));
    };
    let healthy = report.diagnosis.is_healthy();
    let mut last = None;
    if !healthy {
        for f in &report.diagnosis.findings {
            ctx.metrics.recovery(f.name());
        }
        ctx.metrics.time_to_recover(report.duration);
        publish(&ctx, &obj, &report).await;
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
    let (phase, ready) = match report.outcome {
        Outcome::Healthy => ("Healthy", true),
        Outcome::Recovered => ("Recovering", false),
        Outcome::Partial | Outcome::Failed => ("Degraded", false),
    };
    write_status(
        &obj,
        &ctx.client,
        phase,
        vec![
            condition("Valid", true, "Valid", "spec is valid"),
            condition(
                "RegistryAvailable",
                !chain_down,
                if chain_down {
                    "Unreachable"
                } else {
                    "Reachable"
                },
                if chain_down {
                    "using the last verified record"
                } else {
                    "registry answers"
                },
            ),
            condition(
                "Ready",
                ready,
                phase,
                format!(
                    "{} finding(s) at record v{version}",
                    report.diagnosis.findings.len()
                ),
            ),
        ],
        Some(version),
        last,
    )
    .await?;
    Ok(if healthy {
        Action::requeue(ctx.resync)
    } else {
        // Check again soon that the recovery converged.
        Action::requeue(Duration::from_millis(500))
    })
}

async fn cleanup(obj: Arc<Br2kService>, ctx: Arc<Context>) -> Result<Action, OperatorError> {
    let key = format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any());
    lock(&ctx.supervisors).remove(&key);
    lock(&ctx.failures).remove(&key);
    ctx.metrics.forget(&key);
    let ns = workload_namespace(&obj);
    if let Ok(id) = ServiceId::new(&obj.spec.service_id) {
        lock(&ctx.index).remove(&(ns.clone(), id.to_string()));
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
        let mut f = lock(&ctx.failures);
        let entry = f
            .entry(key.clone())
            .or_insert((0, std::time::Instant::now()));
        entry.0 += 1;
        let delay = backoff(entry.0);
        entry.1 = std::time::Instant::now() + delay;
        delay
    };
    ctx.metrics.reconcile_error();
    tracing::warn!(resource = %key, error = %err, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

fn mapper<K: Resource>(index: Index) -> impl Fn(K) -> Option<ObjectRef<Br2kService>> + Clone {
    move |obj: K| {
        let ns = obj.meta().namespace.clone()?;
        let id = obj.meta().labels.as_ref()?.get(LABEL_SERVICE_ID)?.clone();
        lock(&index).get(&(ns, id)).cloned()
    }
}

/// Runs the controller until `shutdown` completes: `Br2kService`s in every
/// namespace, woken by changes to the workloads they manage (StatefulSets, Pods,
/// Services and ConfigMaps labelled `app.kubernetes.io/managed-by=br2k`).
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let managed = || watcher::Config::default().labels(MANAGED_SELECTOR);
    let index = ctx.index.clone();
    Controller::new(
        Api::<Br2kService>::all(client.clone()),
        watcher::Config::default(),
    )
    .watches(
        Api::<StatefulSet>::all(client.clone()),
        managed(),
        mapper(index.clone()),
    )
    .watches(
        Api::<Pod>::all(client.clone()),
        managed(),
        mapper(index.clone()),
    )
    .watches(
        Api::<Service>::all(client.clone()),
        managed(),
        mapper(index.clone()),
    )
    .watches(Api::<ConfigMap>::all(client), managed(), mapper(index))
    .graceful_shutdown_on(shutdown)
    .run(reconcile, error_policy, ctx)
    .for_each(|res| async move {
        if let Err(e) = res {
            tracing::debug!(error = %e, "reconcile error");
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(5), Duration::from_secs(16));
        assert_eq!(backoff(40), Duration::from_secs(300));
    }

    #[test]
    fn unchanged_conditions_keep_their_transition_time() {
        let mut old = condition("Ready", true, "Healthy", "ok");
        old.last_transition_time = "2020-01-01T00:00:00Z".into();
        let merged = merge_conditions(
            std::slice::from_ref(&old),
            vec![condition("Ready", true, "Healthy", "ok")],
        );
        assert_eq!(merged[0].last_transition_time, "2020-01-01T00:00:00Z");
        let merged = merge_conditions(&[old], vec![condition("Ready", false, "Degraded", "x")]);
        assert_ne!(merged[0].last_transition_time, "2020-01-01T00:00:00Z");
    }
}
