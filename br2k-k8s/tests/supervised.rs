//! Every drift class restored by the core `Supervisor::run` loop (event-driven through
//! the replicator's shared watchers) on the real control plane: StatefulSet deleted,
//! image changed, scaled, template edited, pod failed by kwok's chaos stage, node made
//! NotReady by kwok's chaos stage; an autoscaler's change inside the bounds is left
//! alone.

mod common;

use std::sync::Arc;
use std::time::Duration;

use br2k_core::conformance::sample_spec;
use br2k_core::memory::InMemoryRegistry;
use br2k_core::supervisor::Supervisor;
use br2k_core::{Autoscaling, Registry, Replicator, ServiceId, ServiceRecord, ServiceSpec};
use br2k_k8s::{KubeReplicator, Names};
use common::{NodePool, TestNs, fresh_id, wait_for, wait_matches};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::json;
use tokio::sync::watch;

/// Generous: CI runs this on a loaded 2-core machine.
const TIMEOUT: Duration = Duration::from_secs(120);

fn intruder() -> PatchParams {
    PatchParams {
        field_manager: Some("intruder".into()),
        ..PatchParams::default()
    }
}

/// A supervisor over an in-memory registry and `rep`, running until dropped.
struct Running {
    sup: Arc<Supervisor>,
    registry: Arc<InMemoryRegistry>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    fn start(rep: &KubeReplicator) -> Self {
        let registry = Arc::new(InMemoryRegistry::new("owner"));
        let sup = Arc::new(
            Supervisor::builder()
                .registry(registry.clone() as Arc<dyn Registry>)
                .replicator(Arc::new(rep.clone()))
                // Long enough that recoveries below come from watch events.
                .resync(Duration::from_secs(600))
                .build()
                .expect("supervisor"),
        );
        let (stop, mut rx) = watch::channel(false);
        let task = tokio::spawn(sup.clone().run(async move {
            let _ = rx.wait_for(|s| *s).await;
        }));
        Self {
            sup,
            registry,
            stop,
            task,
        }
    }

    async fn register(&self, id: &ServiceId, spec: &ServiceSpec) -> ServiceRecord {
        self.registry.register(id, spec).await.expect("register");
        self.registry.resume(id).await.expect("resume")
    }

    fn recoveries(&self, finding: &str) -> u64 {
        self.sup
            .metrics()
            .recoveries_by_finding
            .get(finding)
            .copied()
            .unwrap_or(0)
    }

    /// Waits until the supervisor counted a recovery for `finding` beyond `before`.
    async fn wait_recovery(&self, finding: &str, before: u64) {
        wait_for(TIMEOUT, &format!("a {finding} recovery"), || async {
            let n = self.recoveries(finding);
            if n > before {
                Ok(())
            } else {
                Err(format!("{:?}", self.sup.metrics().recoveries_by_finding))
            }
        })
        .await;
    }

    /// Waits until the supervisor made no recovery for 1 s, so that a repair still
    /// queued for the previous drift (the watch cache can lag an apply) does not undo
    /// the next injected drift before the supervisor has diagnosed it.
    async fn settle(&self) {
        let quiet = Duration::from_secs(1);
        let start = std::time::Instant::now();
        let mut last = self.sup.metrics().recoveries;
        let mut since = std::time::Instant::now();
        while since.elapsed() < quiet && start.elapsed() < TIMEOUT {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let n = self.sup.metrics().recoveries;
            if n != last {
                last = n;
                since = std::time::Instant::now();
            }
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

#[tokio::test]
#[ignore = "needs stack"]
async fn supervisor_restores_every_drift_class() {
    let ns = TestNs::new("sup").await;
    let rep = ns.replicator();
    let run = Running::start(&rep);
    let id = fresh_id("sup");
    let record = run.register(&id, &sample_spec("registry.test:5000")).await;
    wait_matches(&rep, &record, TIMEOUT).await;
    run.settle().await;
    let names = Names::of(&id);
    let stss: Api<StatefulSet> = Api::namespaced(ns.client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);

    // Deleted StatefulSet.
    let before = run.recoveries("missing_workload");
    stss.delete(&names.base, &DeleteParams::background())
        .await
        .expect("delete");
    run.wait_recovery("missing_workload", before).await;
    wait_matches(&rep, &record, TIMEOUT).await;
    run.settle().await;

    // Image changed.
    let other = record
        .spec
        .image
        .with_digest(br2k_core::Digest::of(b"supervised intruder"));
    let before = run.recoveries("image_drifted");
    stss.patch(
        &names.base,
        &intruder(),
        &Patch::Strategic(json!({"spec": {"template": {"spec": {"containers": [
            {"name": "app", "image": other.to_string()}
        ]}}}})),
    )
    .await
    .expect("change image");
    run.wait_recovery("image_drifted", before).await;
    wait_matches(&rep, &record, TIMEOUT).await;
    run.settle().await;

    // Scaled.
    let before = run.recoveries("replicas_drifted");
    stss.patch_scale(
        &names.base,
        &intruder(),
        &Patch::Merge(json!({"spec": {"replicas": 5}})),
    )
    .await
    .expect("scale");
    run.wait_recovery("replicas_drifted", before).await;
    wait_matches(&rep, &record, TIMEOUT).await;
    run.settle().await;

    // Template edited.
    let before = run.recoveries("template_tampered");
    stss.patch(
        &names.base,
        &intruder(),
        &Patch::Strategic(json!({"spec": {"template": {"spec": {"containers": [
            {"name": "app", "args": ["--backdoor"]}
        ]}}}})),
    )
    .await
    .expect("edit template");
    run.wait_recovery("template_tampered", before).await;
    wait_matches(&rep, &record, TIMEOUT).await;
    run.settle().await;

    // Pod failed (kwok's chaos stage): a new pod with the same identity is Ready.
    let victim = format!("{}-1", names.base);
    let old_uid = pods.get(&victim).await.expect("pod").metadata.uid;
    pods.patch(
        &victim,
        &intruder(),
        &Patch::Merge(json!({"metadata": {"labels": {
            "pod-container-running-failed.stage.kwok.x-k8s.io": "true"
        }}})),
    )
    .await
    .expect("label pod");
    wait_for(TIMEOUT, "failed pod replaced", || async {
        match pods.get_opt(&victim).await {
            Ok(Some(p)) if p.metadata.uid != old_uid => Ok(()),
            other => Err(format!("{:?}", other.map(|p| p.map(|p| p.status)))),
        }
    })
    .await;
    wait_matches(&rep, &record, TIMEOUT).await;
    run.settle().await;

    run.stop().await;
    ns.cleanup().await;
}

#[tokio::test]
#[ignore = "needs stack"]
async fn supervisor_moves_replicas_off_a_not_ready_node() {
    let ns = TestNs::new("supnode").await;
    let pool = NodePool::new(&ns.client, 2).await;
    let rep = pool.replicator(&ns);
    let run = Running::start(&rep);
    let id = fresh_id("supnode");
    let record = run.register(&id, &sample_spec("registry.test:5000")).await;
    wait_matches(&rep, &record, TIMEOUT).await;
    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    let bad = pool.nodes[0].clone();
    let on_bad = || async {
        pods.list(&ListParams::default().fields(&format!("spec.nodeName={bad}")))
            .await
            .map(|l| l.items.len())
            .map_err(|e| e.to_string())
    };
    assert!(on_bad().await.expect("list") > 0, "replicas on both nodes");
    let before = run.recoveries("replicas_unhealthy");
    Api::<Node>::all(ns.client.clone())
        .patch(
            &bad,
            &intruder(),
            &Patch::Merge(json!({"metadata": {"labels": {
                "node-not-ready.stage.kwok.x-k8s.io": "true"
            }}})),
        )
        .await
        .expect("label node");
    run.wait_recovery("replicas_unhealthy", before).await;
    wait_for(TIMEOUT, "no replica on the NotReady node", || async {
        match on_bad().await? {
            0 => Ok(()),
            n => Err(format!("{n} left")),
        }
    })
    .await;
    wait_matches(&rep, &record, TIMEOUT).await;
    run.stop().await;
    pool.cleanup().await;
    ns.cleanup().await;
}

#[tokio::test]
#[ignore = "needs stack"]
async fn supervisor_leaves_an_autoscaler_change_alone() {
    let ns = TestNs::new("suphpa").await;
    let rep = ns.replicator();
    let run = Running::start(&rep);
    let id = fresh_id("suphpa");
    let mut spec = sample_spec("registry.test:5000");
    spec.autoscaling = Some(Autoscaling {
        min_replicas: 2,
        max_replicas: 5,
    });
    let record = run.register(&id, &spec).await;
    wait_matches(&rep, &record, TIMEOUT).await;
    let stss: Api<StatefulSet> = Api::namespaced(ns.client.clone(), &ns.name);
    let base = Names::of(&id).base;
    let reconciles = run.sup.metrics().reconciles;
    stss.patch_scale(
        &base,
        &PatchParams {
            field_manager: Some("autoscaler".into()),
            ..PatchParams::default()
        },
        &Patch::Merge(json!({"spec": {"replicas": 4}})),
    )
    .await
    .expect("scale");
    wait_for(TIMEOUT, "4 replicas ready", || async {
        let o = rep
            .observe(&id)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("gone")?;
        if o.desired_replicas == 4 && o.ready_replicas == 4 {
            Ok(())
        } else {
            Err(format!("{}/{}", o.ready_replicas, o.desired_replicas))
        }
    })
    .await;
    // The supervisor saw the change (watch events) and let it be.
    wait_for(TIMEOUT, "the supervisor looked at it", || async {
        if run.sup.metrics().reconciles > reconciles {
            Ok(())
        } else {
            Err("no reconcile yet".to_owned())
        }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let o = rep.observe(&id).await.expect("observe").expect("live");
    assert_eq!(o.desired_replicas, 4, "the autoscaler's count is kept");
    assert_eq!(
        run.recoveries("replicas_drifted"),
        0,
        "{:?}",
        run.sup.metrics()
    );
    run.stop().await;
    ns.cleanup().await;
}
