//! `k8s_recovery`: time to recover per drift class on the real control plane.
//!
//! For each class: inject the drift with a foreign field manager, then measure until
//! `observe` shows the recorded state again with every replica Ready **and** the
//! StatefulSet controller agrees (`kubectl rollout status` checks on a StatefulSet newer
//! than the injected one: generation observed, replicas Ready, no pending update).
//! `--classes a,b` runs only those classes; `--no-node` skips the node class; trials
//! start `--gap-ms` apart (default 1,000, see [`gap`]); `--no-guards` turns off the
//! replicator's replica guards (`guard_pods(false)`) for comparison. Recovery is the
//! core `Supervisor::run` loop (event-driven through the replicator's shared
//! watchers) over an in-memory registry and the `KubeReplicator`. The floor is one
//! plain server-side apply of the StatefulSet (a changed annotation), round trip.
//!
//! Usage: `cargo run --release -p br2k-benches --bin k8s_recovery -- [--trials N] [--services N]` with `KUBECONFIG` set.
//! `--services N` (N > 0) instead supervises N services at once and reports the
//! process RSS and CPU time while idle.

mod cluster;
mod scale;

use std::time::{Duration, Instant};

use br2k_benches::measure::{arg, create_test_namespace, run_id};
use br2k_core::conformance::sample_spec;
use br2k_core::memory::InMemoryRegistry;
use br2k_core::supervisor::SupervisorEvent;
use br2k_core::{Registry, Replicator, ServiceId, ServiceRecord, WorkloadTemplate};
use br2k_k8s::{KubeReplicator, Names};
use cluster::{POOL_KEY, Supervised, fake_nodes, kwok_builder, kwok_replicator};
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Toleration};
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;
use tokio::sync::broadcast;

fn intruder() -> PatchParams {
    PatchParams {
        field_manager: Some("intruder".into()),
        ..PatchParams::default()
    }
}

fn matches(o: &br2k_core::ObservedState, r: &ServiceRecord) -> bool {
    o.template == WorkloadTemplate::from_spec(&r.spec)
        && o.desired_replicas == r.desired_replicas()
        && o.ready_replicas == r.desired_replicas()
        && o.unhealthy().is_empty()
        && o.missing_parts.is_empty()
        && o.replicas
            .iter()
            .all(|x| x.image_digest.as_ref() == r.spec.image.digest())
}

/// When each phase of one trial was first seen, relative to the injection.
#[derive(Debug, Default, Clone, Copy)]
struct Phases {
    /// First watch event of the replicator's shared watchers.
    event: Option<Duration>,
    /// The supervisor's diagnosis found the drift.
    detected: Option<Duration>,
    /// The supervisor's recovery actions (the apply) returned.
    applied: Option<Duration>,
    /// `observe` shows the recorded template, replica count and parts again.
    spec_restored: Option<Duration>,
    /// Every replica Ready on the recorded digest (the measured time to recover).
    ready: Duration,
}

fn spec_ok(o: &br2k_core::ObservedState, r: &ServiceRecord) -> bool {
    o.template == WorkloadTemplate::from_spec(&r.spec)
        && o.desired_replicas == r.desired_replicas()
        && o.missing_parts.is_empty()
}

/// What proves that the injected drift happened before a trial counts as recovered.
#[derive(Debug, Clone)]
enum Gate {
    /// Nothing (set-up and floor runs).
    None,
    /// The watch cache must first have shown the drift (a failed pod or node: the
    /// failure stays until br2k acts).
    Seen,
    /// The StatefulSet read from the API server must be newer than the one before the
    /// injection: another uid (re-created) or a generation at least 2 higher (the
    /// injected change and br2k's revert). Independent of how fast the cache saw it.
    Sts {
        uid: Option<String>,
        generation: i64,
    },
}

impl Gate {
    /// The gate for a StatefulSet change, from the object before the injection.
    fn sts(before: &StatefulSet) -> Self {
        Gate::Sts {
            uid: before.metadata.uid.clone(),
            generation: before.metadata.generation.unwrap_or(0),
        }
    }
}

/// Whether the StatefulSet controller itself reports the rollout complete, with the
/// checks of `kubectl rollout status`: it has seen the current spec, at least the
/// desired number of replicas is Ready (for a re-created StatefulSet: the pods are
/// adopted), and no replica waits for an update (current revision = update revision);
/// and the object passes `gate`.
async fn rollout_complete(stss: &Api<StatefulSet>, name: &str, gate: &Gate) -> bool {
    let Ok(sts) = stss.get(name).await else {
        return false;
    };
    if let Gate::Sts { uid, generation } = gate {
        let newer =
            sts.metadata.uid != *uid || sts.metadata.generation.unwrap_or(0) >= generation + 2;
        if !newer {
            return false;
        }
    }
    let want = sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    sts.status.as_ref().is_some_and(|st| {
        st.observed_generation.is_some()
            && st.observed_generation >= sts.metadata.generation
            && st.ready_replicas.unwrap_or(0) >= want
            && st.current_revision == st.update_revision
    })
}

/// Waits until `observe` shows the record with every replica Ready and the
/// StatefulSet controller agrees (see [`rollout_complete`]). `observe` reads
/// the replicator's watch cache (the supervisor's view); it runs after each watch
/// event (coalesced) and at least every 50 ms. `gate` says what proves the injected
/// drift happened first (so a cache not yet updated by the injection does not count
/// as recovered); see [`Gate`].
async fn wait_recovered(
    rep: &KubeReplicator,
    changes: &mut BoxStream<'static, ServiceId>,
    r: &ServiceRecord,
    since: Instant,
    gate: Gate,
) -> Phases {
    let mut ph = Phases::default();
    // Whether the cache has shown the drift (the "spec restored" phase counts after it).
    let mut seen_drift = matches!(gate, Gate::None);
    let stss: Api<StatefulSet> = Api::namespaced(rep.client().clone(), rep.namespace());
    let name = Names::of(&r.id).base;
    loop {
        match rep.observe(&r.id).await {
            Ok(Some(o)) => {
                if !matches(&o, r) {
                    seen_drift = true;
                }
                if seen_drift && ph.spec_restored.is_none() && spec_ok(&o, r) {
                    ph.spec_restored = Some(since.elapsed());
                }
                let gate_passed = match gate {
                    Gate::Seen => seen_drift,
                    Gate::None | Gate::Sts { .. } => true,
                };
                if gate_passed && matches(&o, r) && rollout_complete(&stss, &name, &gate).await {
                    ph.ready = since.elapsed();
                    return ph;
                }
            }
            Ok(None) => seen_drift = true,
            Err(_) => {}
        }
        assert!(
            since.elapsed() < Duration::from_secs(120),
            "{} not recovered",
            r.id
        );
        tokio::select! {
            _ = changes.next() => {
                ph.event.get_or_insert_with(|| since.elapsed());
                // Coalesce a burst of events into one observe.
                while changes.next().now_or_never().flatten().is_some() {}
            }
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}

/// Drains pending watch events and supervisor events before a trial.
fn drain(
    changes: &mut BoxStream<'static, ServiceId>,
    events: &mut broadcast::Receiver<SupervisorEvent>,
) {
    while changes.next().now_or_never().flatten().is_some() {}
    while events.try_recv().is_ok() {}
}

/// Fills the supervisor phases from the first recovery event after `since`.
fn supervisor_phases(
    ph: &mut Phases,
    events: &mut broadcast::Receiver<SupervisorEvent>,
    since: Instant,
) {
    while let Ok(ev) = events.try_recv() {
        if ph.detected.is_none() && ev.detected_at >= since {
            ph.detected = Some(ev.detected_at - since);
            ph.applied = Some(ev.detected_at + ev.report.duration - since);
        }
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn row(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "| {name:<22} | {:>6} | {:>9.1} | {:>9.1} | {:>9.1} |",
        v.len(),
        ms(pct(&v, 0.5)),
        ms(pct(&v, 0.99)),
        ms(*v.last().unwrap())
    );
}

/// Waits `--gap-ms` (default 1,000) before a trial. kube-controller-manager gives each
/// controller a client limited to 20 requests/s (burst 30); trials back to back would
/// spend the StatefulSet controller's burst and measure its rate limiter (~50 ms per
/// request) instead of an isolated incident.
async fn gap() {
    tokio::time::sleep(Duration::from_millis(arg("--gap-ms", 1000u64))).await;
}

/// The node NotReady class, on a private pool of 3 fake nodes (labelled and tainted
/// `br2k.io/pool=<pool>`, so no other workload is touched) in namespace `<ns>-node`
/// with its own supervisor: per trial, kwok's `node-not-ready` chaos stage fails the
/// node running replica `i % 3`; the clock starts when the API server shows the node
/// NotReady; the node is healed (label removed, Ready again) before the next trial.
async fn node_class(
    client: &Client,
    base_ns: &str,
    trials: usize,
) -> Result<Vec<Phases>, Box<dyn std::error::Error>> {
    const CHAOS: &str = "node-not-ready.stage.kwok.x-k8s.io";
    let ns = format!("{base_ns}-node");
    let pool = format!("bench-{base_ns}");
    create_test_namespace(client, &ns).await?;
    let nodes: Api<Node> = Api::all(client.clone());
    let names = fake_nodes(client, &pool, 3, true).await?;
    let node_ready = |name: String| {
        let nodes = nodes.clone();
        async move {
            nodes
                .get(&name)
                .await
                .map(|n| !br2k_k8s::parse::node_failed(&n))
                .unwrap_or(false)
        }
    };
    let rep = kwok_builder(&ns)
        .with_toleration(Toleration {
            key: Some(POOL_KEY.into()),
            operator: Some("Equal".into()),
            value: Some(pool.clone()),
            effect: Some("NoSchedule".into()),
            ..Toleration::default()
        })
        .with_node_selector(POOL_KEY, pool.clone())
        .build(client.clone());
    let supervised = Supervised::start(&rep, "bench-node")?;
    let (registry, sup) = (supervised.registry.clone(), supervised.sup.clone());
    let id = ServiceId::new("bench-node")?;
    registry
        .register(&id, &sample_spec("registry.test:5000"))
        .await?;
    let record = registry.resume(&id).await?;
    let mut changes = rep.changes().await?;
    let mut events = sup.subscribe();
    wait_recovered(&rep, &mut changes, &record, Instant::now(), Gate::None).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let base = Names::of(&id).base;
    let mut v = Vec::new();
    for i in 0..trials {
        let victim = format!("{base}-{}", i % 3);
        let Some(node) = pods.get(&victim).await?.spec.and_then(|s| s.node_name) else {
            return Err(format!("{victim} not scheduled").into());
        };
        gap().await;
        drain(&mut changes, &mut events);
        nodes
            .patch(
                &node,
                &intruder(),
                &Patch::Merge(json!({"metadata": {"labels": {CHAOS: "true"}}})),
            )
            .await?;
        while node_ready(node.clone()).await {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let t = Instant::now();
        let mut ph = wait_recovered(&rep, &mut changes, &record, t, Gate::Seen).await;
        supervisor_phases(&mut ph, &mut events, t);
        v.push(ph);
        nodes
            .patch(
                &node,
                &intruder(),
                &Patch::Merge(json!({"metadata": {"labels": {CHAOS: null}}})),
            )
            .await?;
        while !node_ready(node.clone()).await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    supervised.stop().await;
    for name in &names {
        let _ = nodes.delete(name, &DeleteParams::default()).await;
    }
    Api::<Namespace>::all(client.clone())
        .delete(&ns, &DeleteParams::background())
        .await?;
    Ok(v)
}

/// The floor of the deleted class: what Kubernetes itself needs to bring a new
/// 3-replica StatefulSet (with its Services, PDB and ConfigMap) from one apply to all
/// replicas Ready, in namespace `<ns>-fresh` with no supervisor. Each trial applies a
/// fresh service and removes it afterwards.
async fn fresh_floor(
    client: &Client,
    base_ns: &str,
    trials: usize,
) -> Result<Vec<Duration>, Box<dyn std::error::Error>> {
    let ns = format!("{base_ns}-fresh");
    create_test_namespace(client, &ns).await?;
    let rep = kwok_replicator(client, &ns);
    let registry = InMemoryRegistry::new("bench-fresh");
    let mut changes = rep.changes().await?;
    let mut v = Vec::new();
    for i in 0..trials {
        let id = ServiceId::new(format!("fresh-{i}"))?;
        registry
            .register(&id, &sample_spec("registry.test:5000"))
            .await?;
        let record = registry.resume(&id).await?;
        gap().await;
        while changes.next().now_or_never().flatten().is_some() {}
        let t = Instant::now();
        rep.apply(&record).await?;
        v.push(
            wait_recovered(&rep, &mut changes, &record, t, Gate::None)
                .await
                .ready,
        );
        rep.remove(&id).await?;
    }
    Api::<Namespace>::all(client.clone())
        .delete(&ns, &DeleteParams::background())
        .await?;
    Ok(v)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    br2k_k8s::install_crypto_provider();
    let client = Client::try_default().await?;
    let trials = arg("--trials", 30usize);
    let services = arg("--services", 0usize);
    let ns = format!("br2k-bench-{}", run_id());
    create_test_namespace(&client, &ns).await?;
    let rep = kwok_replicator(&client, &ns);
    let supervised = Supervised::start(&rep, "bench")?;
    let (registry, sup) = (supervised.registry.clone(), supervised.sup.clone());

    if services > 0 {
        scale::run(&client, &rep, &registry, &sup, &ns, services).await?;
    } else {
        let spec = sample_spec("registry.test:5000");
        let id = ServiceId::new("bench")?;
        registry.register(&id, &spec).await?;
        let record = registry.resume(&id).await?;
        let mut changes = rep.changes().await?;
        let mut events = sup.subscribe();
        wait_recovered(&rep, &mut changes, &record, Instant::now(), Gate::None).await;
        let names = Names::of(&id);
        let stss: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);

        let mut floor = Vec::new();
        for i in 0..trials {
            let t = Instant::now();
            stss.patch(
                &names.base,
                &PatchParams::apply("bench-floor").force(),
                &Patch::Apply(json!({
                    "apiVersion": "apps/v1", "kind": "StatefulSet",
                    "metadata": {"name": names.base, "annotations": {"bench/floor": i.to_string()}}
                })),
            )
            .await?;
            floor.push(t.elapsed());
        }

        let fresh = fresh_floor(&client, &ns, trials).await?;

        let other = record
            .spec
            .image
            .with_digest(br2k_core::Digest::of(b"bench intruder"));
        let classes = [
            "statefulset_deleted",
            "image_changed",
            "scaled",
            "template_tampered",
            "pod_failed",
        ];
        // `--classes a,b` runs only those drift classes (default: all).
        let only: Option<Vec<String>> = std::env::args()
            .skip_while(|a| a != "--classes")
            .nth(1)
            .map(|v| v.split(',').map(str::to_owned).collect());
        let mut results = Vec::new();
        for class in classes
            .into_iter()
            .filter(|c| only.as_ref().is_none_or(|o| o.iter().any(|x| x == c)))
        {
            let mut v = Vec::new();
            for i in 0..trials {
                gap().await;
                drain(&mut changes, &mut events);
                let gate = Gate::sts(&stss.get(&names.base).await?);
                let t = Instant::now();
                match class {
                    "statefulset_deleted" => {
                        stss.delete(&names.base, &DeleteParams::background())
                            .await?;
                    }
                    "image_changed" => {
                        stss.patch(&names.base, &intruder(), &Patch::Strategic(json!({"spec": {"template": {"spec": {"containers": [{"name": "app", "image": other.to_string()}]}}}}))).await?;
                    }
                    "scaled" => {
                        stss.patch_scale(
                            &names.base,
                            &intruder(),
                            &Patch::Merge(json!({"spec": {"replicas": 5}})),
                        )
                        .await?;
                    }
                    "template_tampered" => {
                        stss.patch(&names.base, &intruder(), &Patch::Strategic(json!({"spec": {"template": {"spec": {"containers": [{"name": "app", "args": [format!("--backdoor={i}")]}]}}}}))).await?;
                    }
                    _ => {
                        let victim = format!("{}-{}", names.base, i % 3);
                        pods.patch(&victim, &intruder(), &Patch::Merge(json!({"metadata": {"labels": {"pod-container-running-failed.stage.kwok.x-k8s.io": "true"}}}))).await?;
                        // The clock starts when the failure is real (kwok applies it
                        // after its stage delay).
                        loop {
                            let p = pods.get_opt(&victim).await?;
                            let failed = p.as_ref().is_none_or(|p| {
                                p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed")
                                    || p.metadata.labels.as_ref().is_none_or(|l| {
                                        !l.contains_key(
                                            "pod-container-running-failed.stage.kwok.x-k8s.io",
                                        )
                                    })
                            });
                            if failed {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        let t = Instant::now();
                        let mut ph =
                            wait_recovered(&rep, &mut changes, &record, t, Gate::Seen).await;
                        supervisor_phases(&mut ph, &mut events, t);
                        v.push(ph);
                        continue;
                    }
                }
                let mut ph = wait_recovered(&rep, &mut changes, &record, t, gate).await;
                supervisor_phases(&mut ph, &mut events, t);
                v.push(ph);
            }
            results.push((class, v));
        }
        if !std::env::args().any(|a| a == "--no-node") {
            results.push(("node_not_ready", node_class(&client, &ns, trials).await?));
        }
        println!("| drift class            | trials |  p50 (ms) |  p99 (ms) |  max (ms) |");
        println!("|------------------------|--------|-----------|-----------|-----------|");
        row("floor: one SSA", floor);
        row("floor: new sts → Ready", fresh);
        for (c, v) in &results {
            row(c, v.iter().map(|p| p.ready).collect());
        }
        println!("\nPhases, median ms after the injection (n = trials that saw the phase):\n");
        println!(
            "| drift class            | watch event | detected | apply done | spec restored | all Ready |"
        );
        println!(
            "|------------------------|-------------|----------|------------|---------------|-----------|"
        );
        for (c, v) in &results {
            let med = |f: &dyn Fn(&Phases) -> Option<Duration>| {
                let mut x: Vec<Duration> = v.iter().filter_map(f).collect();
                x.sort();
                if x.is_empty() {
                    "-".to_owned()
                } else {
                    format!("{:.1} (n={})", pct(&x, 0.5).as_secs_f64() * 1e3, x.len())
                }
            };
            println!(
                "| {c:<22} | {:>11} | {:>8} | {:>10} | {:>13} | {:>9} |",
                med(&|p| p.event),
                med(&|p| p.detected),
                med(&|p| p.applied),
                med(&|p| p.spec_restored),
                med(&|p| Some(p.ready)),
            );
        }
        let m = sup.metrics();
        println!(
            "\nsupervisor: reconciles {} recoveries {} by finding {:?}",
            m.reconciles, m.recoveries, m.recoveries_by_finding
        );
    }
    supervised.stop().await;
    Api::<Namespace>::all(client)
        .delete(&ns, &DeleteParams::background())
        .await?;
    Ok(())
}
