//! `operator_scale`: one operator process supervising N `Br2kService` resources
//! (default 1,000) on the real control plane; reports its RSS and idle CPU.
//!
//! The operator runs in this process (the library entry point the binary uses, with
//! leader election) over in-process backends: an in-memory registry holding the N
//! services (1 replica each) and no image store, so what is measured is the operator
//! and its Kubernetes side (one supervisor per resource, the shared watch cache).
//! 3 extra fake kwok nodes without the 110-pod limit hold the pods.
//!
//! Usage (stack up, `source .stack/env`):
//! `cargo run --release -p br2k-benches --bin operator_scale -- [--services N]`

use std::sync::Arc;
use std::time::{Duration, Instant};

use br2k_benches::measure::{arg, create_kwok_nodes, create_test_namespace, rss_and_cpu, run_id};
use br2k_core::Registry;
use br2k_core::conformance::sample_spec;
use br2k_core::memory::InMemoryRegistry;
use br2k_core::{Replicator, ServiceId};
use br2k_operator::backends::{ReplicatorPool, SharedBackends};
use br2k_operator::controller::Context;
use br2k_operator::crd::{Br2kService, Br2kServiceSpec};
use br2k_operator::lease::LeaseConfig;
use br2k_operator::metrics::Metrics;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Namespace, Node};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

type Error = Box<dyn std::error::Error>;

#[tokio::main]
async fn main() -> Result<(), Error> {
    br2k_k8s::install_crypto_provider();
    let services: usize = arg("--services", 1000);
    let client = Client::try_default().await?;
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
    for file in ["crd.yaml", "rbac.yaml"] {
        let text = std::fs::read_to_string(format!("{root}/{file}"))?;
        br2k_operator::manifests::apply(&client, &text, "br2k-bench").await?;
    }
    let crs_all: Api<Br2kService> = Api::all(client.clone());
    while crs_all.list(&ListParams::default().limit(1)).await.is_err() {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let run = run_id();
    let ns = format!("br2k-opscale-{run}");
    create_test_namespace(&client, &ns).await?;
    // Room for the pods: 3 fake nodes created without a status (kwok gives them a
    // large capacity; the cluster's own nodes hold 110 pods each).
    let node_names: Vec<String> = (0..3).map(|i| format!("br2k-opscale-{run}-{i}")).collect();
    create_kwok_nodes(&client, &node_names, &serde_json::Map::new(), json!([])).await?;

    let registry = Arc::new(InMemoryRegistry::new("bench"));
    let mut spec = sample_spec("registry.test:5000");
    spec.replicas = 1;
    for i in 0..services {
        let id = ServiceId::new(format!("s{i}"))?;
        registry.register(&id, &spec).await?;
        registry.resume(&id).await?;
    }
    let replicators = ReplicatorPool::default();
    let backends = Arc::new(SharedBackends {
        registry: registry.clone() as Arc<dyn Registry>,
        stores: vec![],
        replicators: replicators.clone(),
    });
    let (rss0, _) = rss_and_cpu();
    let metrics = Metrics::default();
    let ctx = Context::new(
        client.clone(),
        backends,
        metrics.clone(),
        "operator-scale",
        Duration::from_secs(30),
    );
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let operator = tokio::spawn(br2k_operator::run_with_leader_election(
        ctx,
        client.clone(),
        LeaseConfig {
            name: format!("br2k-opscale-{run}"),
            namespace: "br2k-system".into(),
            identity: "operator-scale".into(),
            duration: Duration::from_secs(15),
        },
        stop_rx,
    ));

    let start = Instant::now();
    let crs: Api<Br2kService> = Api::namespaced(client.clone(), &ns);
    for i in 0..services {
        let spec = Br2kServiceSpec {
            namespace: Some(ns.clone()),
            ..Br2kServiceSpec::for_service(format!("s{i}"))
        };
        crs.create(
            &PostParams::default(),
            &Br2kService::new(&format!("s{i}"), spec),
        )
        .await?;
    }
    let created = start.elapsed();
    // Every StatefulSet Ready, then no change for 30 s (at most 15 minutes).
    let stss: Api<StatefulSet> = Api::namespaced(client.clone(), &ns);
    let ready = |list: &[StatefulSet]| {
        list.iter()
            .filter(|s| s.status.as_ref().and_then(|st| st.ready_replicas) == Some(1))
            .count()
    };
    loop {
        let list = stss.list(&ListParams::default()).await?.items;
        if ready(&list) >= services || start.elapsed() > Duration::from_secs(900) {
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let all_ready = start.elapsed();
    let rep = replicators.get(&client, &ns);
    assert_eq!(rep.managed().await?.len(), services, "managed workloads");
    tokio::time::sleep(Duration::from_secs(30)).await;
    let (rss1, cpu1) = rss_and_cpu();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let (rss2, cpu2) = rss_and_cpu();
    let phases: usize = crs
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .filter(|c| c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Healthy"))
        .count();

    println!("Br2kService resources:            {services}");
    println!("created in:                       {created:?}");
    println!("all StatefulSets Ready after:     {all_ready:?}");
    println!("resources with phase Healthy:     {phases}");
    println!(
        "RSS before start / Ready + 30 s / + 60 s idle: {} / {} / {} MiB",
        rss0 / 1024,
        rss1 / 1024,
        rss2 / 1024
    );
    println!(
        "idle CPU over 60 s:               {:.1} % of one core",
        (cpu2 - cpu1) / 60.0 * 100.0
    );

    // Clean up with the operator still running (it removes its finalizers).
    for c in crs.list(&ListParams::default()).await?.items {
        let _ = crs.delete(&c.name_any(), &DeleteParams::default()).await;
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    while !crs.list(&ListParams::default()).await?.items.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let _ = stop.send(true);
    let _ = operator.await;
    Api::<Namespace>::all(client.clone())
        .delete(&ns, &DeleteParams::background())
        .await?;
    let nodes: Api<Node> = Api::all(client.clone());
    for name in &node_names {
        let _ = nodes.delete(name, &DeleteParams::default()).await;
    }
    Ok(())
}
