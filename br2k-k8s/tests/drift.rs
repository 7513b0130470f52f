//! Each drift class on the real API server: inject the drift with a foreign field
//! manager, check that `observe` shows it as the right core finding, and let the core
//! decision logic (`br2k_core::supervisor::{diagnose, plan}`) restore the recorded
//! state through the replicator.

mod common;

use std::time::{Duration, Instant};

use br2k_core::conformance::{sample_record, sample_spec};
use br2k_core::supervisor::{diagnose, plan};
use br2k_core::{
    Autoscaling, Diagnosis, Digest, Finding, RecoveryAction, Replicator, ServiceRecord, ServiceSpec,
};
use br2k_k8s::{KubeReplicator, Names};
use common::{TestNs, fresh_id, wait_for, wait_matches};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Service};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(90);

fn intruder() -> PatchParams {
    PatchParams {
        field_manager: Some("intruder".into()),
        ..PatchParams::default()
    }
}

fn record(prefix: &str) -> ServiceRecord {
    sample_record(&fresh_id(prefix), sample_spec("registry.test:5000"))
}

/// Runs diagnose → plan → act until the live state matches the record; returns the
/// first non-healthy diagnosis seen.
async fn heal(r: &KubeReplicator, record: &ServiceRecord) -> Option<Diagnosis> {
    let start = Instant::now();
    let mut first = None;
    loop {
        let obs = r.observe(&record.id).await.expect("observe");
        let d = diagnose(record, obs.as_ref(), &[]);
        if d.is_healthy() {
            if obs
                .as_ref()
                .is_some_and(|o| common::matches_record(o, record).is_ok())
            {
                return first;
            }
        } else {
            if first.is_none() {
                first = Some(d.clone());
            }
            for action in plan(record, &d, &[]) {
                match action {
                    RecoveryAction::ApplyRecord { .. } => r.apply(record).await.expect("apply"),
                    RecoveryAction::ReplaceReplicas { replicas } => r
                        .replace_replicas(&record.id, &replicas)
                        .await
                        .expect("replace"),
                    RecoveryAction::RemoveWorkload => r.remove(&record.id).await.expect("remove"),
                    _ => {}
                }
            }
        }
        assert!(start.elapsed() < TIMEOUT, "{} not healed: {d:?}", record.id);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `diagnose` reports a finding accepted by `want`.
async fn wait_finding(
    r: &KubeReplicator,
    record: &ServiceRecord,
    want: impl Fn(&Finding) -> bool,
) -> Finding {
    wait_for(TIMEOUT, "drift visible", || async {
        let obs = r.observe(&record.id).await.map_err(|e| e.to_string())?;
        let d = diagnose(record, obs.as_ref(), &[]);
        d.findings
            .iter()
            .find(|f| want(f))
            .cloned()
            .ok_or_else(|| format!("{:?}", d.findings))
    })
    .await
}

async fn start(prefix: &str) -> (TestNs, KubeReplicator, ServiceRecord) {
    let ns = TestNs::new(prefix).await;
    let r = ns.replicator();
    let rec = record(prefix);
    r.apply(&rec).await.expect("apply");
    wait_matches(&r, &rec, TIMEOUT).await;
    (ns, r, rec)
}

#[tokio::test]
#[ignore = "needs stack"]
async fn deleted_statefulset_is_recreated() {
    let (ns, r, rec) = start("del").await;
    let names = Names::of(&rec.id);
    let stss: Api<StatefulSet> = Api::namespaced(ns.client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    // The pod guard gives every replica a second owner: the service's ConfigMap.
    let guarded = guarded_pod_uids(&pods, &rec, &names.config).await;
    assert_eq!(guarded.len(), rec.spec.replicas as usize);

    stss.delete(&names.base, &DeleteParams::background())
        .await
        .expect("delete");
    let f = wait_finding(&r, &rec, |f| matches!(f, Finding::MissingWorkload { .. })).await;
    assert_eq!(f, Finding::MissingWorkload { parts: vec![] });
    heal(&r, &rec).await;
    wait_matches(&r, &rec, TIMEOUT).await;
    // The recreated StatefulSet adopts the running replicas: same pods, not new ones.
    let sts_uid = stss.get(&names.base).await.expect("sts").metadata.uid;
    wait_for(TIMEOUT, "replicas adopted", || async {
        let after = pod_uids(&pods, &rec).await;
        if after.keys().ne(guarded.keys()) {
            return Err(format!("pods replaced: {:?}", after.keys()));
        }
        let adopted = after
            .values()
            .filter(|p| {
                p.metadata
                    .owner_references
                    .iter()
                    .flatten()
                    .any(|o| o.controller == Some(true) && Some(&o.uid) == sts_uid.as_ref())
            })
            .count();
        if adopted == after.len() {
            Ok(())
        } else {
            Err(format!("{adopted} adopted"))
        }
    })
    .await;

    // Removing the service still removes the guarded pods (the last owner is gone).
    r.remove(&rec.id).await.expect("remove");
    wait_for(TIMEOUT, "pods removed", || async {
        let left = pod_uids(&pods, &rec).await;
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("{} pods left", left.len()))
        }
    })
    .await;
    ns.cleanup().await;
}

/// The service's pods by uid.
async fn pod_uids(pods: &Api<Pod>, rec: &ServiceRecord) -> std::collections::BTreeMap<String, Pod> {
    let lp = ListParams::default().labels(&format!("br2k.io/service-id={}", rec.id));
    pods.list(&lp)
        .await
        .expect("list pods")
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| Some((p.metadata.uid.clone()?, p)))
        .collect()
}

/// Waits until every replica pod has a non-controller owner reference to `config`.
async fn guarded_pod_uids(
    pods: &Api<Pod>,
    rec: &ServiceRecord,
    config: &str,
) -> std::collections::BTreeMap<String, Pod> {
    wait_for(TIMEOUT, "pods guarded", || async {
        let all = pod_uids(pods, rec).await;
        let guarded = all
            .values()
            .filter(|p| {
                p.metadata.owner_references.iter().flatten().any(|o| {
                    o.kind == "ConfigMap" && o.name == config && o.controller != Some(true)
                })
            })
            .count();
        if all.len() == rec.spec.replicas as usize && guarded == all.len() {
            Ok(all)
        } else {
            Err(format!("{guarded} of {} pods guarded", all.len()))
        }
    })
    .await
}

#[tokio::test]
#[ignore = "needs stack"]
async fn deleted_service_part_is_restored() {
    let (ns, r, rec) = start("part").await;
    let svcs: Api<k8s_openapi::api::core::v1::Service> =
        Api::namespaced(ns.client.clone(), &ns.name);
    svcs.delete(&Names::of(&rec.id).headless, &DeleteParams::default())
        .await
        .expect("delete");
    let f = wait_finding(&r, &rec, |f| matches!(f, Finding::MissingWorkload { .. })).await;
    assert_eq!(
        f,
        Finding::MissingWorkload {
            parts: vec!["headless-service".into()]
        }
    );
    heal(&r, &rec).await;
    ns.cleanup().await;
}

#[tokio::test]
#[ignore = "needs stack"]
async fn changed_image_is_restored() {
    let (ns, r, rec) = start("img").await;
    let stss: Api<StatefulSet> = Api::namespaced(ns.client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    // After the first roll the StatefulSet is frozen: no pod follows a tampered template.
    wait_frozen(&stss, &Names::of(&rec.id).base).await;
    let before = pod_uids(&pods, &rec).await;
    let other = rec.spec.image.with_digest(Digest::of(b"intruder image"));
    stss.patch(
        &Names::of(&rec.id).base,
        &intruder(),
        &Patch::Strategic(json!({"spec": {"template": {"spec": {"containers": [
            {"name": "app", "image": other.to_string()}
        ]}}}})),
    )
    .await
    .expect("patch image");
    let f = wait_finding(&r, &rec, |f| matches!(f, Finding::ImageDrifted { .. })).await;
    assert_eq!(
        f,
        Finding::ImageDrifted {
            expected: *rec.spec.image.digest().unwrap(),
            observed: other.to_string()
        }
    );
    heal(&r, &rec).await;
    // Reverted without restarting a replica: the same pods, on the recorded revision.
    wait_rolled_out(&stss, &Names::of(&rec.id).base).await;
    let after = pod_uids(&pods, &rec).await;
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>()
    );
    ns.cleanup().await;
}

/// A service rolled out to a version 2 whose spec is `change`d from version 1's.
struct Rolled {
    ns: TestNs,
    r: KubeReplicator,
    v2: ServiceRecord,
    stss: Api<StatefulSet>,
    pods: Api<Pod>,
    /// The StatefulSet's name.
    name: String,
    /// The replicas that ran version 1, by UID.
    before: std::collections::BTreeMap<String, Pod>,
}

/// Starts a service, waits until its StatefulSet is frozen, applies version 2 and waits
/// until the StatefulSet controller has rolled it out.
async fn roll_out_version_2(prefix: &str, change: impl FnOnce(&mut ServiceSpec)) -> Rolled {
    let (ns, r, rec) = start(prefix).await;
    let name = Names::of(&rec.id).base;
    let stss: Api<StatefulSet> = Api::namespaced(ns.client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    wait_frozen(&stss, &name).await;
    let before = pod_uids(&pods, &rec).await;
    let mut spec = rec.spec.clone();
    change(&mut spec);
    let mut v2 = sample_record(&rec.id, spec);
    v2.version = 2;
    v2.latest_version = 2;
    r.apply(&v2).await.expect("apply v2");
    wait_matches(&r, &v2, TIMEOUT).await;
    wait_rolled_out(&stss, &name).await;
    Rolled {
        ns,
        r,
        v2,
        stss,
        pods,
        name,
        before,
    }
}

#[tokio::test]
#[ignore = "needs stack"]
async fn new_record_version_rolls_out_and_is_frozen_again() {
    // Version 2 with another image: an intended change, so every replica rolls to it.
    let t = roll_out_version_2("roll", |spec| {
        spec.image = spec.image.with_digest(Digest::of(b"release 2"));
    })
    .await;
    let after = pod_uids(&t.pods, &t.v2).await;
    assert!(
        after.keys().all(|uid| !t.before.contains_key(uid)),
        "every replica restarted on the new image"
    );
    // Then the StatefulSet is frozen again.
    wait_frozen(&t.stss, &t.name).await;
    t.ns.cleanup().await;
}

#[tokio::test]
#[ignore = "needs stack"]
async fn new_environment_values_restart_the_replicas() {
    // Version 2 changes one environment value and nothing else. The pods read the
    // ConfigMap when they start, so each must restart to get the new value.
    let t = roll_out_version_2("env", |spec| {
        spec.env.insert("LOG_LEVEL".into(), "debug".into());
    })
    .await;
    let want = br2k_k8s::build::config_hash(&t.v2.spec);
    wait_for(
        TIMEOUT,
        "replicas restarted with the new values",
        || async {
            let after = pod_uids(&t.pods, &t.v2).await;
            let fresh = after.keys().all(|uid| !t.before.contains_key(uid));
            let hashes: Vec<_> = after
                .values()
                .map(|p| {
                    p.metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(br2k_k8s::names::ANNOTATION_CONFIG_HASH))
                        .cloned()
                })
                .collect();
            if fresh
                && after.len() == t.v2.spec.replicas as usize
                && hashes.iter().all(|h| h.as_deref() == Some(want.as_str()))
            {
                Ok(())
            } else {
                Err(format!(
                    "fresh {fresh}, {} pods, hashes {hashes:?}",
                    after.len()
                ))
            }
        },
    )
    .await;
    // Then the StatefulSet is frozen again, and re-applying v2 restarts nothing.
    wait_frozen(&t.stss, &t.name).await;
    let settled = pod_uids(&t.pods, &t.v2).await;
    t.r.apply(&t.v2).await.expect("re-apply v2");
    wait_frozen(&t.stss, &t.name).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let again = pod_uids(&t.pods, &t.v2).await;
    assert_eq!(
        again.keys().collect::<Vec<_>>(),
        settled.keys().collect::<Vec<_>>(),
        "no replica restarted for an unchanged record"
    );
    t.ns.cleanup().await;
}

/// Waits until the StatefulSet's partition equals its replica count (frozen).
async fn wait_frozen(stss: &Api<StatefulSet>, name: &str) {
    wait_for(TIMEOUT, "statefulset frozen", || async {
        let sts = stss.get(name).await.map_err(|e| e.to_string())?;
        let spec = sts.spec.unwrap_or_default();
        let partition = spec
            .update_strategy
            .and_then(|u| u.rolling_update)
            .and_then(|r| r.partition);
        if partition.is_some() && partition == spec.replicas {
            Ok(())
        } else {
            Err(format!(
                "partition {partition:?}, replicas {:?}",
                spec.replicas
            ))
        }
    })
    .await
}

/// Waits until the StatefulSet controller has seen the current spec and no replica
/// waits for an update (current revision = update revision), all Ready.
async fn wait_rolled_out(stss: &Api<StatefulSet>, name: &str) {
    wait_for(TIMEOUT, "rollout complete", || async {
        let sts = stss.get(name).await.map_err(|e| e.to_string())?;
        let want = sts.spec.as_ref().and_then(|s| s.replicas);
        let st = sts.status.clone().unwrap_or_default();
        if st.observed_generation >= sts.metadata.generation
            && st.current_revision == st.update_revision
            && st.ready_replicas == want
        {
            Ok(())
        } else {
            Err(format!("{st:?}"))
        }
    })
    .await
}

#[tokio::test]
#[ignore = "needs stack"]
async fn scaled_statefulset_is_restored() {
    let (ns, r, rec) = start("scale").await;
    let stss: Api<StatefulSet> = Api::namespaced(ns.client.clone(), &ns.name);
    stss.patch_scale(
        &Names::of(&rec.id).base,
        &intruder(),
        &Patch::Merge(json!({"spec": {"replicas": 5}})),
    )
    .await
    .expect("scale");
    let f = wait_finding(&r, &rec, |f| matches!(f, Finding::ReplicasDrifted { .. })).await;
    assert_eq!(
        f,
        Finding::ReplicasDrifted {
            desired: 3,
            observed: 5
        }
    );
    heal(&r, &rec).await;
    ns.cleanup().await;
}

#[tokio::test]
#[ignore = "needs stack"]
async fn edited_template_and_config_are_restored() {
    let (ns, r, rec) = start("tmpl").await;
    let names = Names::of(&rec.id);
    let stss: Api<StatefulSet> = Api::namespaced(ns.client.clone(), &ns.name);
    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    wait_frozen(&stss, &names.base).await;
    let before = pod_uids(&pods, &rec).await;
    stss.patch(
        &names.base,
        &intruder(),
        &Patch::Strategic(json!({"spec": {"template": {"spec": {"containers": [
            {"name": "app", "args": ["--debug-backdoor"]}
        ]}}}})),
    )
    .await
    .expect("patch args");
    let f = wait_finding(&r, &rec, |f| matches!(f, Finding::TemplateTampered { .. })).await;
    assert_eq!(
        f,
        Finding::TemplateTampered {
            fields: vec!["args".into()]
        }
    );
    heal(&r, &rec).await;
    wait_rolled_out(&stss, &names.base).await;
    let after = pod_uids(&pods, &rec).await;
    assert_eq!(
        after.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>()
    );

    // The environment lives in the ConfigMap: tampering with it is template drift too.
    let cms: Api<ConfigMap> = Api::namespaced(ns.client.clone(), &ns.name);
    cms.patch(
        &names.config,
        &intruder(),
        &Patch::Merge(json!({"data": {"LOG_LEVEL": "trace"}})),
    )
    .await
    .expect("patch config");
    let f = wait_finding(&r, &rec, |f| matches!(f, Finding::TemplateTampered { .. })).await;
    assert_eq!(
        f,
        Finding::TemplateTampered {
            fields: vec!["env".into()]
        }
    );
    heal(&r, &rec).await;
    ns.cleanup().await;
}

#[tokio::test]
#[ignore = "needs stack"]
async fn failed_pod_is_replaced() {
    let (ns, r, rec) = start("podfail").await;
    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    let victim = format!("{}-1", Names::of(&rec.id).base);
    let old_uid = pods.get(&victim).await.expect("pod").metadata.uid;
    // kwok's chaos stage fails the container (exit code 1, phase Failed).
    pods.patch(
        &victim,
        &intruder(),
        &Patch::Merge(json!({"metadata": {"labels": {
            "pod-container-running-failed.stage.kwok.x-k8s.io": "true"
        }}})),
    )
    .await
    .expect("label pod");
    // Either br2k sees it failed and replaces it, or the StatefulSet controller was
    // faster; in both cases a new pod with the same identity must become ready.
    wait_for(TIMEOUT, "failed pod replaced", || async {
        let obs = r.observe(&rec.id).await.map_err(|e| e.to_string())?;
        let d = diagnose(&rec, obs.as_ref(), &[]);
        for a in plan(&rec, &d, &[]) {
            if let RecoveryAction::ReplaceReplicas { replicas } = a {
                r.replace_replicas(&rec.id, &replicas)
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        let p = pods.get(&victim).await.map_err(|e| e.to_string())?;
        if p.metadata.uid == old_uid {
            return Err("old pod still there".into());
        }
        Ok(())
    })
    .await;
    heal(&r, &rec).await;
    ns.cleanup().await;
}

#[tokio::test]
#[ignore = "needs stack"]
async fn pods_on_a_not_ready_node_are_moved() {
    let ns = TestNs::new("node").await;
    let pool = common::NodePool::new(&ns.client, 2).await;
    let r = pool.replicator(&ns);
    let rec = record("node");
    r.apply(&rec).await.expect("apply");
    wait_matches(&r, &rec, TIMEOUT).await;
    let nodes: Api<Node> = Api::all(ns.client.clone());
    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    let bad = pool.nodes[0].clone();
    let on_bad = || async {
        let list = pods
            .list(&ListParams::default().fields(&format!("spec.nodeName={bad}")))
            .await
            .expect("list pods");
        list.items.len()
    };
    assert!(on_bad().await > 0, "spread puts replicas on both nodes");
    nodes
        .patch(
            &bad,
            &intruder(),
            &Patch::Merge(json!({"metadata": {"labels": {
                "node-not-ready.stage.kwok.x-k8s.io": "true"
            }}})),
        )
        .await
        .expect("label node");
    let f = wait_finding(&r, &rec, |f| matches!(f, Finding::ReplicasUnhealthy { .. })).await;
    let Finding::ReplicasUnhealthy { replicas, .. } = f else {
        unreachable!()
    };
    assert!(!replicas.is_empty());
    heal(&r, &rec).await;
    assert_eq!(on_bad().await, 0, "no replica left on the NotReady node");
    pool.cleanup().await;
    ns.cleanup().await;
}

#[tokio::test]
#[ignore = "needs stack"]
async fn autoscaler_changes_inside_the_bounds_are_left_alone() {
    let ns = TestNs::new("hpa").await;
    let r = ns.replicator();
    let mut rec = record("hpa");
    rec.spec.autoscaling = Some(Autoscaling {
        min_replicas: 2,
        max_replicas: 5,
    });
    rec.spec_hash = rec.spec.spec_hash();
    r.apply(&rec).await.expect("apply");
    wait_matches(&r, &rec, TIMEOUT).await;
    let stss: Api<StatefulSet> = Api::namespaced(ns.client.clone(), &ns.name);
    let name = Names::of(&rec.id).base;
    let scale_to = |n: u32| {
        let stss = stss.clone();
        let name = name.clone();
        async move {
            stss.patch_scale(
                &name,
                &PatchParams {
                    field_manager: Some("autoscaler".into()),
                    ..PatchParams::default()
                },
                &Patch::Merge(json!({"spec": {"replicas": n}})),
            )
            .await
            .expect("scale")
        }
    };
    scale_to(4).await;
    wait_for(TIMEOUT, "4 replicas ready", || async {
        let o = r
            .observe(&rec.id)
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
    // A few supervision rounds: nothing to do, the count stays the autoscaler's.
    for _ in 0..10 {
        let obs = r.observe(&rec.id).await.expect("observe");
        let d = diagnose(&rec, obs.as_ref(), &[]);
        assert!(d.is_healthy(), "{d:?}");
        // An apply (e.g. of a new record version) keeps the autoscaler's count too.
        r.apply(&rec).await.expect("apply");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let obs = r.observe(&rec.id).await.expect("observe").expect("live");
    assert_eq!(obs.desired_replicas, 4);

    // Outside the bounds it is drift, and recovery clamps to the bounds.
    scale_to(8).await;
    let f = wait_finding(&r, &rec, |f| matches!(f, Finding::ReplicasDrifted { .. })).await;
    assert_eq!(
        f,
        Finding::ReplicasDrifted {
            desired: 3,
            observed: 8
        }
    );
    r.apply(&rec).await.expect("apply");
    // `observe` reads the watch cache, which can lag the apply by one watch delivery.
    let obs = wait_for(TIMEOUT, "clamped to 5 replicas", || async {
        let o = r
            .observe(&rec.id)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("gone")?;
        if o.desired_replicas == 5 {
            Ok(o)
        } else {
            Err(format!("{} desired", o.desired_replicas))
        }
    })
    .await;
    let d = diagnose(&rec, Some(&obs), &[]);
    assert!(
        !d.findings
            .iter()
            .any(|f| matches!(f, Finding::ReplicasDrifted { .. })),
        "{d:?}"
    );
    ns.cleanup().await;
}

#[tokio::test]
#[ignore = "needs stack"]
async fn fields_of_other_managers_are_found_and_removed() {
    let (ns, r, rec) = start("foreign").await;
    let names = Names::of(&rec.id);
    let stss: Api<StatefulSet> = Api::namespaced(ns.client.clone(), &ns.name);
    let svcs: Api<Service> = Api::namespaced(ns.client.clone(), &ns.name);
    let cms: Api<ConfigMap> = Api::namespaced(ns.client.clone(), &ns.name);
    wait_frozen(&stss, &names.base).await;
    // What the rebuilt template cannot show: a label, an annotation, a volume, an
    // extra env var, a Service selector key and a ConfigMap key, each written by
    // another field manager.
    stss.patch(
        &names.base,
        &intruder(),
        &Patch::Strategic(json!({"spec": {"template": {
            "metadata": {"labels": {"injected": "1"}, "annotations": {"injected": "1"}},
            "spec": {
                "volumes": [{"name": "injected", "emptyDir": {}}],
                "containers": [{"name": "app", "env": [{"name": "INJECTED", "value": "1"}]}]
            }
        }}})),
    )
    .await
    .expect("patch template");
    svcs.patch(
        &names.headless,
        &intruder(),
        &Patch::Merge(json!({"spec": {"selector": {"injected": "1"}}})),
    )
    .await
    .expect("patch service");
    cms.patch(
        &names.config,
        &intruder(),
        &Patch::Merge(json!({"data": {"INJECTED": "1"}})),
    )
    .await
    .expect("patch config");
    let f = wait_finding(&r, &rec, |f| match f {
        Finding::ForeignFields { fields } => {
            fields.iter().any(|f| f.starts_with("service/"))
                && fields.iter().any(|f| f.starts_with("configmap/"))
                && fields.iter().any(|f| f.contains("volumes"))
        }
        _ => false,
    })
    .await;
    let Finding::ForeignFields { fields } = f else {
        unreachable!()
    };
    for want in [
        "spec.template.metadata.labels.injected (by intruder)",
        "spec.template.metadata.annotations.injected (by intruder)",
        "spec.template.spec.volumes[name=injected]",
        "env[name=INJECTED]",
        "-peers: spec.selector (by intruder)",
        "data.INJECTED (by intruder)",
    ] {
        assert!(
            fields.iter().any(|f| f.contains(want)),
            "{want} not in {fields:#?}"
        );
    }
    heal(&r, &rec).await;
    // Read back from the API server, not from br2k: every injected field is gone and
    // no other manager owns anything.
    let sts = stss.get(&names.base).await.expect("sts");
    let text = serde_json::to_string(&sts.spec).unwrap();
    assert!(
        !text.contains("injected") && !text.contains("INJECTED"),
        "{text}"
    );
    let svc = svcs.get(&names.headless).await.expect("svc");
    let selector = svc.spec.and_then(|s| s.selector).unwrap_or_default();
    assert!(!selector.contains_key("injected"), "{selector:?}");
    let cm = cms.get(&names.config).await.expect("cm");
    assert!(!cm.data.unwrap_or_default().contains_key("INJECTED"));
    for meta in [&sts.metadata, &svc.metadata, &cm.metadata] {
        let managers: Vec<_> = meta
            .managed_fields
            .iter()
            .flatten()
            .filter_map(|e| e.manager.as_deref())
            .collect();
        assert!(!managers.contains(&"intruder"), "{managers:?}");
    }
    ns.cleanup().await;
}

#[tokio::test]
#[ignore = "needs stack"]
async fn a_service_without_ports_deploys_with_a_headless_service_only() {
    let ns = TestNs::new("noports").await;
    let r = ns.replicator();
    let mut rec = record("noports");
    rec.spec.ports.clear();
    rec.spec.probes = Default::default();
    rec.spec_hash = rec.spec.spec_hash();
    r.apply(&rec).await.expect("a spec without ports applies");
    wait_matches(&r, &rec, TIMEOUT).await;
    let names = Names::of(&rec.id);
    let svcs: Api<Service> = Api::namespaced(ns.client.clone(), &ns.name);
    let headless = svcs.get(&names.headless).await.expect("headless service");
    assert_eq!(
        headless.spec.and_then(|s| s.cluster_ip).as_deref(),
        Some("None")
    );
    assert!(svcs.get_opt(&names.base).await.unwrap().is_none());
    let obs = r.observe(&rec.id).await.unwrap().expect("observed");
    assert!(obs.missing_parts.is_empty(), "{:?}", obs.missing_parts);
    ns.cleanup().await;
}

#[tokio::test]
#[ignore = "needs stack"]
async fn pods_are_hardened_and_a_privileged_patch_is_reverted() {
    let (ns, r, rec) = start("hardened").await;
    let names = Names::of(&rec.id);
    let stss: Api<StatefulSet> = Api::namespaced(ns.client.clone(), &ns.name);
    wait_frozen(&stss, &names.base).await;
    let hardened = |sts: &StatefulSet| {
        let pod = sts.spec.as_ref()?.template.spec.as_ref()?;
        let c = pod.containers.first()?.security_context.as_ref()?;
        Some((
            pod.automount_service_account_token,
            c.privileged,
            c.allow_privilege_escalation,
            c.capabilities.as_ref()?.drop.clone(),
            c.seccomp_profile.as_ref()?.type_.clone(),
        ))
    };
    let want = Some((
        Some(false),
        Some(false),
        Some(false),
        Some(vec!["ALL".to_owned()]),
        "RuntimeDefault".to_owned(),
    ));
    // Read back from the API server: the template br2k applied.
    assert_eq!(hardened(&stss.get(&names.base).await.expect("sts")), want);
    // Another manager makes the pods privileged and mounts the token.
    stss.patch(
        &names.base,
        &intruder(),
        &Patch::Strategic(json!({"spec": {"template": {"spec": {
            "automountServiceAccountToken": true,
            "containers": [{"name": "app", "securityContext": {
                "privileged": true, "allowPrivilegeEscalation": true,
                "capabilities": {"add": ["SYS_ADMIN"]}
            }}]
        }}}})),
    )
    .await
    .expect("patch");
    // Seen through the replicator's watch cache, then repaired.
    let found = wait_finding(&r, &rec, |f| {
        matches!(f, Finding::ForeignFields { fields } if fields.iter().any(|f| f.contains("privileged")))
    })
    .await;
    heal(&r, &rec).await;
    let sts = stss.get(&names.base).await.expect("sts");
    assert_eq!(hardened(&sts), want, "after repairing {found:?}");
    let caps = serde_json::to_string(&sts.spec).unwrap();
    assert!(!caps.contains("SYS_ADMIN"), "{caps}");
    ns.cleanup().await;
}

/// Runs `$BR2K_KUBECTL_BIN -n NS ARGS...` (kubectl's own field managers); panics on a
/// failure.
fn kubectl(ns: &str, args: &[&str]) -> String {
    let bin = std::env::var("BR2K_KUBECTL_BIN").expect("BR2K_KUBECTL_BIN (source .stack/env)");
    let out = std::process::Command::new(bin)
        .args(["-n", ns])
        .args(args)
        .output()
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
#[ignore = "needs stack"]
async fn replicas_run_as_non_root_and_a_foreign_patch_turning_it_off_is_reverted() {
    let (ns, r, rec) = start("nonroot").await;
    let names = Names::of(&rec.id);
    let stss: Api<StatefulSet> = Api::namespaced(ns.client.clone(), &ns.name);
    wait_frozen(&stss, &names.base).await;
    let non_root = |sts: &StatefulSet| {
        sts.spec.as_ref()?.template.spec.as_ref()?.containers[0]
            .security_context
            .as_ref()?
            .run_as_non_root
    };
    // Read back from the API server: the template br2k applied.
    assert_eq!(
        non_root(&stss.get(&names.base).await.expect("sts")),
        Some(true)
    );
    // The pods the StatefulSet controller made from it carry it too.
    let pods: Api<Pod> = Api::namespaced(ns.client.clone(), &ns.name);
    let lp = ListParams::default().labels(&format!("br2k.io/service-id={}", rec.id));
    let listed = pods.list(&lp).await.expect("pods").items;
    assert!(!listed.is_empty());
    for p in &listed {
        let sc = p.spec.as_ref().unwrap().containers[0]
            .security_context
            .as_ref();
        assert_eq!(sc.and_then(|s| s.run_as_non_root), Some(true), "{p:?}");
    }
    // Another writer (kubectl, with its own field manager) turns it off.
    let patch = r#"{"spec":{"template":{"spec":{"containers":[{"name":"app","securityContext":{"runAsNonRoot":false}}]}}}}"#;
    kubectl(
        &ns.name,
        &["patch", "statefulset", &names.base, "-p", patch],
    );
    let live = stss.get(&names.base).await.expect("sts");
    assert_eq!(non_root(&live), Some(false), "patch applied");
    let found = wait_finding(&r, &rec, |f| {
        matches!(f, Finding::ForeignFields { fields } if fields.iter().any(|f| f.contains("runAsNonRoot")))
    })
    .await;
    heal(&r, &rec).await;
    let sts = stss.get(&names.base).await.expect("sts");
    assert_eq!(non_root(&sts), Some(true), "after repairing {found:?}");
    // A JSON patch that removes the field leaves no foreign owner in managedFields;
    // the comparison with the hardened template finds it all the same.
    let remove = r#"[{"op":"remove","path":"/spec/template/spec/containers/0/securityContext/runAsNonRoot"}]"#;
    kubectl(
        &ns.name,
        &[
            "patch",
            "statefulset",
            &names.base,
            "--type",
            "json",
            "-p",
            remove,
        ],
    );
    let live = stss.get(&names.base).await.expect("sts");
    assert_eq!(non_root(&live), None, "field removed");
    let found = wait_finding(&r, &rec, |f| {
        matches!(f, Finding::ForeignFields { fields } if fields.iter().any(|f| f.contains("runAsNonRoot (missing)")))
    })
    .await;
    heal(&r, &rec).await;
    let sts = stss.get(&names.base).await.expect("sts");
    assert_eq!(non_root(&sts), Some(true), "after repairing {found:?}");
    ns.cleanup().await;
}

/// An object of a name br2k would write that someone else holds is neither taken
/// over by a force-apply nor deleted by a removal; two services whose names used to
/// collide (`x` and `x-peers`) run side by side.
#[tokio::test]
#[ignore = "needs stack"]
async fn objects_of_others_are_neither_overwritten_nor_deleted() {
    let ns = TestNs::new("foreign").await;
    let r = ns.replicator();
    let rec = record("foreign");
    let names = Names::of(&rec.id);
    // Another writer already holds the client Service's name.
    let svc = format!(
        r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"{}","labels":{{"owner":"someone-else"}}}},"spec":{{"ports":[{{"port":1234}}],"selector":{{"app":"theirs"}}}}}}"#,
        names.base
    );
    let file = std::env::temp_dir().join(format!("br2k-foreign-{}.json", ns.name));
    std::fs::write(&file, svc).expect("write");
    kubectl(&ns.name, &["create", "-f", file.to_str().expect("path")]);
    let err = r
        .apply(&rec)
        .await
        .expect_err("a foreign object is refused");
    assert_eq!(err.kind(), br2k_core::ErrorKind::Conflict, "{err}");
    assert!(err.to_string().contains("another writer"), "{err}");
    // Read back from the API server: their Service is untouched, nothing of ours exists.
    let svcs: Api<Service> = Api::namespaced(ns.client.clone(), &ns.name);
    let theirs = svcs.get(&names.base).await.expect("their service");
    let labels = theirs.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels.get("owner").map(String::as_str),
        Some("someone-else")
    );
    assert!(!labels.contains_key("br2k.io/service-id"), "{labels:?}");
    let port = theirs
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .map(|p| p[0].port);
    assert_eq!(port, Some(1234));
    let stss: Api<StatefulSet> = Api::namespaced(ns.client.clone(), &ns.name);
    assert!(stss.get_opt(&names.base).await.expect("get").is_none());
    // A removal of the service leaves their object alone.
    r.remove(&rec.id).await.expect("remove");
    assert!(svcs.get_opt(&names.base).await.expect("get").is_some());

    // `x` and `x-peers`: the headless Service of one is not the client Service of the other.
    let x_id = fresh_id("cx");
    let x = sample_record(&x_id, sample_spec("registry.test:5000"));
    let x_peers = sample_record(
        &br2k_core::ServiceId::new(format!("{x_id}-peers")).unwrap(),
        sample_spec("registry.test:5000"),
    );
    r.apply(&x).await.expect("apply x");
    r.apply(&x_peers).await.expect("apply x-peers");
    wait_matches(&r, &x, TIMEOUT).await;
    wait_matches(&r, &x_peers, TIMEOUT).await;
    for rec in [&x, &x_peers] {
        let n = Names::of(&rec.id);
        for name in [&n.base, &n.headless] {
            let s = svcs.get(name).await.expect("service");
            let id = s.metadata.labels.unwrap_or_default()["br2k.io/service-id"].clone();
            assert_eq!(id, rec.id.as_str(), "service {name}");
        }
    }
    let _ = std::fs::remove_file(file);
    ns.cleanup().await;
}
