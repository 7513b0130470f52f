//! The controller: one core [`Supervisor`] per `Br2kService`, driven by kube-runtime.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use br2k_core::supervisor::Supervisor;
use br2k_core::supervisor::is_workload_finding;
use br2k_core::{Error, Finding, Outcome, RecoveryAction, RecoveryReport, Replicator, ServiceId};
use br2k_k8s::KubeReplicator;
use br2k_k8s::names::{LABEL_SERVICE_ID, MANAGED_SELECTOR};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::events::v1::Event as KubeEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::watcher::{self, watcher};
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

type Index = Arc<Mutex<HashMap<(String, String), ObjectRef<Br2kService>>>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

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

/// One line naming each action and, when it failed, why.
fn describe_actions(report: &RecoveryReport) -> String {
    let names: Vec<String> = report
        .actions
        .iter()
        .map(|a| {
            let name = match &a.action {
                RecoveryAction::ApplyRecord { registry, .. } => format!("apply from {registry}"),
                RecoveryAction::ReplaceReplicas { replicas } => {
                    format!("replace {}", replicas.join(" "))
                }
                RecoveryAction::RemoveWorkload => "remove workload".into(),
                RecoveryAction::RepairImage { from, to } => format!("repair image {from} -> {to}"),
                RecoveryAction::UseLastVerifiedRecord => "use last verified record".into(),
                RecoveryAction::Wait { reason } => format!("wait ({reason})"),
                other => format!("{other:?}"),
            };
            match &a.error {
                Some(e) => format!("{name} FAILED: {e}"),
                None => name,
            }
        })
        .collect();
    if names.is_empty() {
        "no action".into()
    } else {
        names.join("; ")
    }
}

/// Names of findings, comma separated.
fn finding_names(findings: &[Finding]) -> String {
    let names: Vec<&str> = findings.iter().map(Finding::name).collect();
    if names.is_empty() {
        "nothing".into()
    } else {
        names.join(", ")
    }
}

/// Records one recovery as its own Event (events.k8s.io/v1), so that every
/// recovery keeps its own note (an event recorder would fold a series under the
/// first note).
async fn publish(ctx: &Context, obj: &Br2kService, report: &RecoveryReport) {
    let ok = report.outcome == Outcome::Recovered;
    let mut note = format!(
        "{}: found {}; {}; {} ms; outcome {:?}; still wrong: {}",
        report.id,
        finding_names(&report.diagnosis.findings),
        describe_actions(report),
        report.duration.as_millis(),
        report.outcome,
        finding_names(&report.remaining),
    );
    if note.len() > 1000 {
        let mut cut = 1000;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
    }
    let ns = obj.namespace().unwrap_or_default();
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let ev = KubeEvent {
        metadata: ObjectMeta {
            name: Some(format!("{}.{stamp:x}", obj.name_any())),
            namespace: Some(ns.clone()),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(Timestamp::now())),
        type_: Some(if ok { "Normal" } else { "Warning" }.into()),
        reason: Some(
            if ok {
                "Recovered"
            } else {
                "RecoveryIncomplete"
            }
            .into(),
        ),
        action: Some("Recover".into()),
        note: Some(note),
        regarding: Some(obj.object_ref(&())),
        reporting_controller: Some("br2k.io/operator".into()),
        reporting_instance: Some(ctx.identity.clone()),
        ..KubeEvent::default()
    };
    let api: Api<KubeEvent> = Api::namespaced(ctx.client.clone(), &ns);
    if let Err(e) = api.create(&PostParams::default(), &ev).await {
        tracing::warn!(error = %e, "publishing event failed");
    }
}

/// The message of a recovery action that a backend refused as invalid input (the
/// API server answered 400/422 to what the record asks for), if any.
fn refused_by_backend(report: &RecoveryReport) -> Option<String> {
    report
        .actions
        .iter()
        .find(|o| o.error_kind == Some(br2k_core::ErrorKind::InvalidInput))
        .and_then(|o| o.error.clone())
}

/// Reports an invalid resource (`Valid=False` with `reason`) and waits for it to
/// change: nothing is retried until then.
async fn refuse(
    obj: &Br2kService,
    ctx: &Context,
    reason: &str,
    message: String,
) -> Result<Action, OperatorError> {
    write_status(
        obj,
        &ctx.client,
        "Error",
        vec![
            condition("Valid", false, reason, message),
            condition("Ready", false, "InvalidSpec", "the spec is invalid"),
        ],
        None,
        None,
    )
    .await?;
    Ok(Action::await_change())
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
        Err(e) => return refuse(&obj, &ctx, "InvalidServiceId", e.to_string()).await,
    };
    // The workload stays in the resource's namespace unless the operator's own
    // configuration allows another: nothing is read or applied for it otherwise.
    if !ctx.scope.allows_target(&cr_ns, &ns) {
        lock(&ctx.supervisors).remove(&key);
        return refuse(
            &obj,
            &ctx,
            "NamespaceNotAllowed",
            format!(
                "the workload namespace {ns} is not the resource's ({cr_ns}) and the operator's configuration does not allow it (--allow-target-namespace)"
            ),
        )
        .await;
    }
    lock(&ctx.index).insert((ns.clone(), id.to_string()), ObjectRef::from_obj(&*obj));
    let sup = match ctx.supervisor(&key, &cr_ns, &ns, &obj.spec).await {
        Ok(s) => s,
        Err(Error::InvalidInput(e)) => {
            return refuse(&obj, &ctx, "InvalidSpec", e.to_string()).await;
        }
        Err(e) => {
            ctx.metrics.chain_available(&key, false);
            write_status(
                &obj,
                &ctx.client,
                "Error",
                vec![
                    condition("Valid", true, "Valid", "spec is valid"),
                    condition("ChainAvailable", false, "Unreachable", e.to_string()),
                    condition(
                        "Ready",
                        false,
                        "ChainUnavailable",
                        "cannot read the service registry on chain",
                    ),
                ],
                None,
                None,
            )
            .await?;
            return Err(e.into());
        }
    };
    ctx.metrics.reconcile();
    let report = match sup.reconcile(&id).await {
        Ok(r) => r,
        Err(Error::PermissionDenied { reason }) => {
            // The record's owner is not one this operator may deploy for: nothing is
            // applied; checked again rarely (an ownership transfer may change it).
            write_status(
                &obj,
                &ctx.client,
                "Error",
                vec![
                    condition("Valid", false, "OwnerNotAllowed", reason),
                    condition("Ready", false, "OwnerNotAllowed", "not deployed"),
                ],
                None,
                None,
            )
            .await?;
            return Ok(Action::requeue(jittered(Duration::from_secs(60))));
        }
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
    // What is wrong now: nothing when the diagnosis was clean, else what the
    // recovery left (observed again after acting).
    let now_wrong: &[Finding] = if report.diagnosis.is_healthy() {
        &[]
    } else {
        &report.remaining
    };
    let chain_down = now_wrong
        .iter()
        .any(|f| matches!(f, Finding::ChainEndpointDown { .. }));
    ctx.metrics.chain_available(&key, !chain_down);
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
        write_status(
            &obj,
            &ctx.client,
            "Error",
            vec![
                condition("Valid", true, "Valid", "spec is valid"),
                condition(
                    "ChainAvailable",
                    true,
                    "Reachable",
                    "the service registry answers",
                ),
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
    let image_problems: Vec<String> = now_wrong
        .iter()
        .filter_map(|f| match f {
            Finding::ImageTampered { registry, .. } => Some(format!("{registry}: corrupt copy")),
            Finding::ImageUnavailable { registry } => Some(format!("{registry}: missing")),
            Finding::RegistryDown { registry } => Some(format!("{registry}: unreachable")),
            _ => None,
        })
        .chain(
            unrepairable
                .iter()
                .map(|(r, d)| format!("{r}: unrepairable copy of {d}, not used as a source")),
        )
        .collect();
    let workload_wrong: Vec<&Finding> = now_wrong
        .iter()
        .filter(|f| is_workload_finding(f))
        .collect();
    let workload_ready = report.converged && workload_wrong.is_empty();
    let healthy = workload_ready && now_wrong.is_empty() && unrepairable.is_empty();
    // The API server refused what the record asks for: no retry will change that,
    // only a new record (checked again at the capped backoff) or a new operator.
    let refused = refused_by_backend(&report);
    let valid = match &refused {
        Some(why) => condition("Valid", false, "RefusedByKubernetes", why.clone()),
        None => condition("Valid", true, "Valid", "spec is valid"),
    };
    let phase = if refused.is_some() {
        "Error"
    } else if healthy {
        "Healthy"
    } else if workload_ready {
        // Serving the record, but something it relies on is wrong.
        "Degraded"
    } else if report.outcome == Outcome::Failed {
        "Degraded"
    } else {
        "Recovering"
    };
    write_status(
        &obj,
        &ctx.client,
        phase,
        vec![
            valid,
            condition(
                "ChainAvailable",
                !chain_down,
                if chain_down {
                    "Unreachable"
                } else {
                    "Reachable"
                },
                if chain_down {
                    "no chain endpoint answers; using the last verified record"
                } else {
                    "the service registry answers"
                },
            ),
            condition(
                "ImageVerified",
                image_problems.is_empty(),
                if image_problems.is_empty() {
                    "Verified"
                } else {
                    "RegistryProblem"
                },
                if image_problems.is_empty() {
                    "every registry serves the recorded digest, verified".to_owned()
                } else {
                    image_problems.join("; ")
                },
            ),
            condition(
                "WorkloadReady",
                workload_ready,
                if workload_ready {
                    "AllReplicasReady"
                } else {
                    "NotConverged"
                },
                if workload_ready {
                    "every replica is ready on the recorded digest".to_owned()
                } else if workload_wrong.is_empty() {
                    "replicas are starting".to_owned()
                } else {
                    format!("still wrong: {}", finding_names(now_wrong))
                },
            ),
            condition(
                "Ready",
                healthy,
                phase,
                format!("{} finding(s) left at record v{version}", now_wrong.len()),
            ),
        ],
        Some(version),
        last,
    )
    .await?;
    Ok(if healthy {
        lock(&ctx.unsettled).remove(&key);
        Action::requeue(ctx.resync)
    } else {
        // Retry with a growing, jittered delay; a change of the workload's objects
        // still wakes the resource at once.
        let n = {
            let mut u = lock(&ctx.unsettled);
            let n = u.entry(key.clone()).or_insert(0);
            *n = n.saturating_add(1);
            *n
        };
        // A refusal is not undone by retrying soon: at least 10 s between tries.
        let floor = if refused.is_some() {
            REFUSED_RETRY
        } else {
            Duration::ZERO
        };
        Action::requeue(jittered(unsettled_backoff(n).max(floor)))
    })
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
    lock(&ctx.supervisors).remove(&key);
    lock(&ctx.failures).remove(&key);
    lock(&ctx.unsettled).remove(&key);
    ctx.metrics.forget(&key);
    let ns = workload_namespace(&obj);
    let cr_ns = obj.namespace().unwrap_or_default();
    // A resource naming a namespace it may not use never deployed there: removing
    // the service of that id there would delete a workload it does not own.
    if !ctx.scope.allows_target(&cr_ns, &ns) {
        return Ok(Action::await_change());
    }
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
        let delay = jittered(backoff(entry.0));
        entry.1 = std::time::Instant::now() + delay;
        delay
    };
    ctx.metrics.reconcile_error();
    tracing::warn!(resource = %key, error = %err, retry_in = ?delay, "reconcile failed");
    Action::requeue(delay)
}

/// Maps a workload object to the resource managing it (by namespace and service id
/// label); with `only`, only resources of that namespace.
fn mapper<K: Resource>(
    index: Index,
    only: Option<String>,
) -> impl Fn(K) -> Option<ObjectRef<Br2kService>> + Clone {
    move |obj: K| {
        let ns = obj.meta().namespace.clone()?;
        let id = obj.meta().labels.as_ref()?.get(LABEL_SERVICE_ID)?.clone();
        let found = lock(&index).get(&(ns, id)).cloned()?;
        match &only {
            Some(n) if found.namespace.as_deref() != Some(n.as_str()) => None,
            _ => Some(found),
        }
    }
}

/// Hash of what should wake a resource: its generation, whether it is being deleted,
/// and its finalizers.
fn spec_or_lifecycle(obj: &Br2kService) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    obj.metadata.generation.hash(&mut h);
    obj.metadata.deletion_timestamp.is_some().hash(&mut h);
    obj.metadata.finalizers.hash(&mut h);
    Some(h.finish())
}

/// Runs the controller until `shutdown` completes: `Br2kService`s in every
/// namespace of the context's [`Scope`] (all when it lists none), woken by changes
/// to the workloads they manage (StatefulSets, Pods, Services and ConfigMaps
/// labelled `app.kubernetes.io/managed-by=br2k`). With a list of namespaces, one
/// controller per namespace runs, and every watch is namespaced.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    use futures::FutureExt;
    let boxed: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + Sync>> =
        Box::pin(shutdown);
    let shutdown = boxed.shared();
    if ctx.scope.watch_namespaces.is_empty() {
        run_in(ctx, None, shutdown).await;
    } else {
        let runs = ctx
            .scope
            .watch_namespaces
            .clone()
            .into_iter()
            .map(|ns| run_in(ctx.clone(), Some(ns), shutdown.clone()));
        futures::future::join_all(runs).await;
    }
}

/// A stream of the managed objects of kind `K` in `namespaces` (all when `None`).
fn managed_objects<K>(
    client: &Client,
    namespaces: Option<&[String]>,
) -> impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default,
{
    let cfg = || watcher::Config::default().labels(MANAGED_SELECTOR);
    let apis: Vec<Api<K>> = match namespaces {
        None => vec![Api::all(client.clone())],
        Some(list) => list
            .iter()
            .map(|n| Api::namespaced(client.clone(), n))
            .collect(),
    };
    futures::stream::select_all(apis.into_iter().map(|api| {
        watcher(api, cfg())
            .default_backoff()
            .touched_objects()
            .boxed()
    }))
}

/// One controller: the resources of namespace `only` (every namespace when `None`).
async fn run_in(
    ctx: Arc<Context>,
    only: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let index = ctx.index.clone();
    let workload_ns = only.as_deref().map(|n| ctx.scope.workload_namespaces(n));
    let workload_ns = workload_ns.as_deref();
    let api = match &only {
        Some(n) => Api::<Br2kService>::namespaced(client.clone(), n),
        None => Api::<Br2kService>::all(client.clone()),
    };
    // Status writes (the operator's own) do not wake a resource: only a new
    // generation, deletion or finalizer change does.
    let (reader, writer) = reflector::store();
    let resources = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(spec_or_lifecycle, Default::default());
    Controller::for_stream(resources, reader)
        .watches_stream(
            managed_objects::<StatefulSet>(&client, workload_ns),
            mapper(index.clone(), only.clone()),
        )
        .watches_stream(
            managed_objects::<Pod>(&client, workload_ns),
            mapper(index.clone(), only.clone()),
        )
        .watches_stream(
            managed_objects::<Service>(&client, workload_ns),
            mapper(index.clone(), only.clone()),
        )
        .watches_stream(
            managed_objects::<ConfigMap>(&client, workload_ns),
            mapper(index, only),
        )
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
