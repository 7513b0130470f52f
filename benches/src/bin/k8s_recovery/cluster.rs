//! The cluster side of the measurements: replicators whose pods run on kwok's fake
//! nodes, a supervisor over them, and private pools of fake nodes.

use std::sync::Arc;
use std::time::Duration;

use br2k_benches::measure::create_kwok_nodes;
use br2k_core::Registry;
use br2k_core::memory::InMemoryRegistry;
use br2k_core::supervisor::Supervisor;
use br2k_k8s::{KubeReplicator, KubeReplicatorBuilder};
use k8s_openapi::api::core::v1::{Node, Toleration};
use kube::Client;
use kube::api::Api;
use serde_json::json;
use tokio::sync::watch;

/// A replicator for namespace `ns` whose pods tolerate kwok's fake nodes.
pub(crate) fn kwok_replicator(client: &Client, ns: &str) -> KubeReplicator {
    kwok_builder(ns).build(client.clone())
}

/// A replicator builder for namespace `ns` whose pods tolerate kwok's fake nodes.
/// With `--no-guards`, without br2k's replica guards (for a side-by-side comparison).
pub(crate) fn kwok_builder(ns: &str) -> KubeReplicatorBuilder {
    KubeReplicator::builder(ns)
        .with_toleration(Toleration {
            key: Some("kwok.x-k8s.io/node".into()),
            operator: Some("Exists".into()),
            ..Toleration::default()
        })
        .guard_pods(!std::env::args().any(|a| a == "--no-guards"))
}

/// A supervisor running `Supervisor::run` over an in-memory registry and `rep`.
pub(crate) struct Supervised {
    pub(crate) registry: Arc<InMemoryRegistry>,
    pub(crate) sup: Arc<Supervisor>,
    pub(crate) stop: watch::Sender<bool>,
    pub(crate) runner: tokio::task::JoinHandle<()>,
}

impl Supervised {
    pub(crate) fn start(
        rep: &KubeReplicator,
        name: &str,
    ) -> Result<Self, Box<dyn std::error::Error>> {
        let registry = Arc::new(InMemoryRegistry::new(name));
        let sup = Arc::new(
            Supervisor::builder()
                .registry(registry.clone() as Arc<dyn Registry>)
                .replicator(Arc::new(rep.clone()))
                .resync(Duration::from_secs(30))
                .build()?,
        );
        let (stop, mut stop_rx) = watch::channel(false);
        let runner = tokio::spawn(sup.clone().run(async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        }));
        Ok(Self {
            registry,
            sup,
            stop,
            runner,
        })
    }

    pub(crate) async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.runner.await;
    }
}

pub(crate) const POOL_KEY: &str = "br2k.io/pool";

/// Creates `count` fake kwok nodes labelled `br2k.io/pool=<pool>` (tainted with it when
/// `tainted`, so only pods tolerating it land there) and waits until they are Ready.
/// kwok initializes nodes created without a status with a large capacity (the default
/// cluster nodes hold 110 pods each).
pub(crate) async fn fake_nodes(
    client: &Client,
    pool: &str,
    count: usize,
    tainted: bool,
) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let nodes: Api<Node> = Api::all(client.clone());
    let names: Vec<String> = (0..count).map(|i| format!("br2k-{pool}-{i}")).collect();
    let taints = if tainted {
        json!([{"key": POOL_KEY, "value": pool, "effect": "NoSchedule"}])
    } else {
        json!([])
    };
    let mut labels = serde_json::Map::new();
    labels.insert(POOL_KEY.into(), pool.into());
    create_kwok_nodes(client, &names, &labels, taints).await?;
    for name in &names {
        while !nodes
            .get(name)
            .await
            .map(|n| !br2k_k8s::parse::node_failed(&n))
            .unwrap_or(false)
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(names)
}
