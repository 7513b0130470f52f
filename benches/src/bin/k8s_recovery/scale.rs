//! `--services N`: N services supervised at once; the time to apply and settle them,
//! and the process's memory and CPU while idle.

use std::sync::Arc;
use std::time::{Duration, Instant};

use br2k_benches::measure::rss_and_cpu;
use br2k_core::conformance::sample_spec;
use br2k_core::memory::InMemoryRegistry;
use br2k_core::supervisor::Supervisor;
use br2k_core::{Registry, Replicator, ServiceId};
use br2k_k8s::KubeReplicator;
use k8s_openapi::api::core::v1::Node;
use kube::Client;
use kube::api::{Api, DeleteParams};

use crate::cluster::fake_nodes;

/// Supervises `services` services of 1 replica in namespace `ns` with `sup` (over
/// `registry` and `rep`) and prints the figures.
pub(crate) async fn run(
    client: &Client,
    rep: &KubeReplicator,
    registry: &Arc<InMemoryRegistry>,
    sup: &Arc<Supervisor>,
    ns: &str,
    services: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    // Room for every pod: 3 extra fake nodes without the 110-pod limit.
    let big = fake_nodes(client, &format!("big-{ns}"), 3, false).await?;
    let (rss0, _) = rss_and_cpu();
    let spec = {
        let mut s = sample_spec("registry.test:5000");
        s.replicas = 1;
        s
    };
    let start = Instant::now();
    for i in 0..services {
        let id = ServiceId::new(format!("s{i}"))?;
        registry.register(&id, &spec).await?;
        registry.resume(&id).await?;
    }
    // Wait until every workload exists and is ready.
    loop {
        let managed = rep.managed().await?.len();
        if managed >= services {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let deployed = start.elapsed();
    // Settled: no recovery for 30 s (every pod came up Ready), at most 15 min.
    let mut last = (sup.metrics().recoveries, Instant::now());
    while last.1.elapsed() < Duration::from_secs(30) && start.elapsed() < Duration::from_secs(900) {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let r = sup.metrics().recoveries;
        if r != last.0 {
            last = (r, Instant::now());
        }
    }
    let settled = start.elapsed();
    let before = sup.metrics();
    let (rss1, cpu1) = rss_and_cpu();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let (rss2, cpu2) = rss_and_cpu();
    let idle = sup.metrics();
    println!("settled (no recovery for 30 s) after: {settled:?}");
    println!(
        "during the idle minute: reconciles {} recoveries {}",
        idle.reconciles - before.reconciles,
        idle.recoveries - before.recoveries
    );
    println!("services supervised:          {services}");
    println!("all workloads applied in:     {deployed:?}");
    println!(
        "RSS at start / settled / +60 s idle: {} / {} / {} MiB",
        rss0 / 1024,
        rss1 / 1024,
        rss2 / 1024
    );
    println!(
        "idle CPU over 60 s:           {:.1} % of one core",
        (cpu2 - cpu1) / 60.0 * 100.0
    );
    let m = sup.metrics();
    println!(
        "reconciles: {} recoveries: {} errors: {}",
        m.reconciles, m.recoveries, m.errors
    );
    let nodes: Api<Node> = Api::all(client.clone());
    for name in &big {
        let _ = nodes.delete(name, &DeleteParams::default()).await;
    }
    Ok(())
}
