//! Helpers shared by the integration tests (real control plane from the local stack).

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use br2k_core::{ObservedState, Replicator, ServiceId, ServiceRecord};
use br2k_k8s::KubeReplicator;
use k8s_openapi::api::core::v1::{Namespace, Node, NodeSpec, Taint, Toleration};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, DeleteParams, PostParams};

/// Label on every namespace and node a test creates (for manual cleanup).
pub const TEST_LABEL: &str = "br2k.io/test";

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A short unique suffix for names of this test run.
pub fn unique() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(
        "{:x}{n}",
        (nanos as u64 ^ u64::from(std::process::id())) & 0xff_ffff
    )
}

/// A client from `KUBECONFIG` (written by `scripts/stack up`).
pub async fn client() -> Client {
    br2k_k8s::install_crypto_provider();
    assert!(
        std::env::var_os("KUBECONFIG").is_some(),
        "KUBECONFIG must point at the local stack (source .stack/env)"
    );
    Client::try_default()
        .await
        .expect("kube client from KUBECONFIG")
}

/// A fresh namespace `br2k-<prefix>-<unique>`; delete it with [`TestNs::cleanup`].
pub struct TestNs {
    /// Namespace name.
    pub name: String,
    /// Client.
    pub client: Client,
}

impl TestNs {
    /// Creates the namespace.
    pub async fn new(prefix: &str) -> Self {
        let client = client().await;
        let name = format!("br2k-{prefix}-{}", unique());
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(BTreeMap::from([(TEST_LABEL.to_owned(), "true".to_owned())])),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("create namespace");
        Self { name, client }
    }

    /// A replicator for this namespace tolerating kwok's fake-node taint.
    pub fn replicator(&self) -> KubeReplicator {
        KubeReplicator::builder(&self.name)
            .with_toleration(Toleration {
                key: Some("kwok.x-k8s.io/node".into()),
                operator: Some("Exists".into()),
                ..Toleration::default()
            })
            .build(self.client.clone())
    }

    /// Deletes the namespace (and everything in it).
    pub async fn cleanup(self) {
        let _ = Api::<Namespace>::all(self.client.clone())
            .delete(&self.name, &DeleteParams::background())
            .await;
    }
}

/// A private pool of `n` fake nodes for one test: labelled and tainted
/// `br2k.io/pool=<pool>` so only that test's pods (via [`pool_replicator`]) land on them.
pub struct NodePool {
    /// Pool name.
    pub pool: String,
    /// Node names.
    pub nodes: Vec<String>,
    client: Client,
}

/// Pool label/taint key.
pub const POOL_KEY: &str = "br2k.io/pool";

impl NodePool {
    /// Creates `n` Node objects; kwok (managing all nodes) makes them Ready.
    pub async fn new(client: &Client, n: usize) -> Self {
        let pool = format!("pool-{}", unique());
        let api = Api::<Node>::all(client.clone());
        let mut nodes = Vec::new();
        for i in 0..n {
            let name = format!("br2k-{pool}-{i}");
            let node = Node {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    labels: Some(BTreeMap::from([
                        (TEST_LABEL.to_owned(), "true".to_owned()),
                        (POOL_KEY.to_owned(), pool.clone()),
                        ("kubernetes.io/hostname".to_owned(), name.clone()),
                        ("type".to_owned(), "kwok".to_owned()),
                    ])),
                    annotations: Some(BTreeMap::from([(
                        "kwok.x-k8s.io/node".to_owned(),
                        "fake".to_owned(),
                    )])),
                    ..ObjectMeta::default()
                },
                spec: Some(NodeSpec {
                    taints: Some(vec![Taint {
                        key: POOL_KEY.into(),
                        value: Some(pool.clone()),
                        effect: "NoSchedule".into(),
                        ..Taint::default()
                    }]),
                    ..NodeSpec::default()
                }),
                ..Node::default()
            };
            api.create(&PostParams::default(), &node)
                .await
                .expect("create node");
            nodes.push(name);
        }
        let pool = Self {
            pool,
            nodes,
            client: client.clone(),
        };
        for name in &pool.nodes {
            wait_for(
                Duration::from_secs(60),
                &format!("node {name} ready"),
                || async {
                    let n = api.get(name).await.map_err(|e| e.to_string())?;
                    if br2k_k8s::parse::node_failed(&n) {
                        Err("not ready".into())
                    } else {
                        Ok(())
                    }
                },
            )
            .await;
        }
        pool
    }

    /// A replicator in `ns` whose pods only run on this pool.
    pub fn replicator(&self, ns: &TestNs) -> KubeReplicator {
        KubeReplicator::builder(&ns.name)
            .with_toleration(Toleration {
                key: Some(POOL_KEY.into()),
                operator: Some("Equal".into()),
                value: Some(self.pool.clone()),
                effect: Some("NoSchedule".into()),
                ..Toleration::default()
            })
            .with_toleration(Toleration {
                key: Some("kwok.x-k8s.io/node".into()),
                operator: Some("Exists".into()),
                ..Toleration::default()
            })
            .with_node_selector(POOL_KEY, self.pool.clone())
            .build(ns.client.clone())
    }

    /// Deletes the pool's nodes.
    pub async fn cleanup(self) {
        let api = Api::<Node>::all(self.client.clone());
        for n in &self.nodes {
            let _ = api.delete(n, &DeleteParams::default()).await;
        }
    }
}

/// Polls `check` every 50 ms until it is `Ok`; panics with the last error after
/// `timeout`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        match check().await {
            Ok(v) => return v,
            Err(e) if start.elapsed() >= timeout => {
                panic!("{what}: not reached after {timeout:?}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Whether `obs` runs `record` exactly: template, replica count, every replica ready
/// on the recorded digest, no missing part.
pub fn matches_record(obs: &ObservedState, record: &ServiceRecord) -> Result<(), String> {
    let want = br2k_core::WorkloadTemplate::from_spec(&record.spec);
    if obs.template != want {
        return Err(format!(
            "template differs in {:?} (image {})",
            obs.template.differing_fields(&want),
            obs.template.image
        ));
    }
    if obs.desired_replicas != record.desired_replicas()
        || obs.ready_replicas != record.desired_replicas()
    {
        return Err(format!(
            "desired {} ready {}, want {}",
            obs.desired_replicas,
            obs.ready_replicas,
            record.desired_replicas()
        ));
    }
    if !obs.unhealthy().is_empty() {
        return Err(format!("unhealthy {:?}", obs.unhealthy()));
    }
    if let Some(r) = obs
        .replicas
        .iter()
        .find(|r| r.image_digest.as_ref() != record.spec.image.digest())
    {
        return Err(format!("{} runs {:?}", r.name, r.image_digest));
    }
    if !obs.missing_parts.is_empty() {
        return Err(format!("missing {:?}", obs.missing_parts));
    }
    Ok(())
}

/// Waits until the workload of `record` matches it.
pub async fn wait_matches(
    r: &dyn Replicator,
    record: &ServiceRecord,
    timeout: Duration,
) -> ObservedState {
    wait_for(
        timeout,
        &format!("{} matches its record", record.id),
        || async {
            match r.observe(&record.id).await {
                Ok(Some(o)) => matches_record(&o, record).map(|()| o),
                Ok(None) => Err("no workload".into()),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await
}

/// A service id `<prefix>-<unique>`.
pub fn fresh_id(prefix: &str) -> ServiceId {
    ServiceId::new(format!("{prefix}-{}", unique())).expect("valid id")
}
