//! One shared watcher per kind, caching the objects in reflector stores (read by
//! `observe`) and feeding a broadcast of changed service ids.

use std::fmt::Debug;

use br2k_core::ServiceId;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use crate::names::{LABEL_SERVICE_ID, MANAGED_SELECTOR};

/// Change notifications buffered per subscriber; a slower subscriber loses the oldest
/// and is expected to resync (the supervisor also observes periodically).
const BUFFER: usize = 16384;

/// Watches StatefulSets, Pods, Services, PodDisruptionBudgets and ConfigMaps labelled
/// `app.kubernetes.io/managed-by=br2k` in one namespace (one watch per kind for all
/// services), keeps them in reflector stores, and broadcasts the service id of every
/// object that changed (after its store was updated). Nodes are cached too (a replica
/// on a failed node has failed); a failed or deleted node notifies the services with
/// a pod on it.
///
/// Watch errors are retried with kube-runtime's default backoff; after a restart the
/// re-listed objects are reported again, so nothing is missed for long.
#[derive(Debug)]
pub struct WatchHub {
    tx: broadcast::Sender<ServiceId>,
    tasks: Vec<JoinHandle<()>>,
    /// Cached StatefulSets.
    pub(crate) stss: Store<StatefulSet>,
    /// Cached Pods.
    pub(crate) pods: Store<Pod>,
    /// Cached Services.
    pub(crate) svcs: Store<Service>,
    /// Cached PodDisruptionBudgets.
    pub(crate) pdbs: Store<PodDisruptionBudget>,
    /// Cached ConfigMaps.
    pub(crate) cms: Store<ConfigMap>,
    /// Cached Nodes (all of them).
    pub(crate) nodes: Store<Node>,
}

fn service_id<K: Resource>(obj: &K) -> Option<ServiceId> {
    let v = obj.meta().labels.as_ref()?.get(LABEL_SERVICE_ID)?;
    ServiceId::new(v).ok()
}

/// The services running a pod on `node` (from the pod cache).
fn services_on(pods: &Store<Pod>, node: &str) -> Vec<ServiceId> {
    pods.state()
        .iter()
        .filter(|p| {
            p.spec
                .as_ref()
                .and_then(|s| s.node_name.as_deref())
                .is_some_and(|n| n == node)
        })
        .filter_map(|p| service_id(p.as_ref()))
        .collect()
}

fn spawn<K>(
    api: Api<K>,
    config: watcher::Config,
    tx: broadcast::Sender<ServiceId>,
    ids: impl Fn(&K, bool) -> Vec<ServiceId> + Send + 'static,
) -> (Store<K>, JoinHandle<()>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let task = tokio::spawn(async move {
        let stream = watcher(api, config)
            .default_backoff()
            // Managed fields are never read: do not keep them in memory.
            .modify(|o: &mut K| o.managed_fields_mut().clear());
        let mut events = reflector::reflector(writer, stream).boxed();
        while let Some(event) = events.next().await {
            let (obj, deleted) = match event {
                Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => (o, false),
                Ok(watcher::Event::Delete(o)) => (o, true),
                Ok(watcher::Event::Init | watcher::Event::InitDone) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "br2k watch failed; retrying");
                    continue;
                }
            };
            for id in ids(&obj, deleted) {
                // No subscriber is not an error.
                let _ = tx.send(id);
            }
        }
    });
    (reader, task)
}

impl WatchHub {
    /// Starts the watchers (needs a Tokio runtime).
    pub fn start(client: Client, namespace: &str) -> Self {
        let (tx, _) = broadcast::channel(BUFFER);
        let managed = || watcher::Config::default().labels(MANAGED_SELECTOR);
        fn own<K: Resource>(o: &K, _: bool) -> Vec<ServiceId> {
            service_id(o).into_iter().collect()
        }
        let (stss, t1) = spawn(
            Api::<StatefulSet>::namespaced(client.clone(), namespace),
            managed(),
            tx.clone(),
            own,
        );
        let (pods, t2) = spawn(
            Api::<Pod>::namespaced(client.clone(), namespace),
            managed(),
            tx.clone(),
            own,
        );
        let (svcs, t3) = spawn(
            Api::<Service>::namespaced(client.clone(), namespace),
            managed(),
            tx.clone(),
            own,
        );
        let (pdbs, t4) = spawn(
            Api::<PodDisruptionBudget>::namespaced(client.clone(), namespace),
            managed(),
            tx.clone(),
            own,
        );
        let (cms, t5) = spawn(
            Api::<ConfigMap>::namespaced(client.clone(), namespace),
            managed(),
            tx.clone(),
            own,
        );
        // A failed or deleted node: every service with a pod there looks again at
        // once (instead of when the node controller updates the pods).
        let pod_cache = pods.clone();
        let (nodes, t6) = spawn(
            Api::<Node>::all(client),
            watcher::Config::default(),
            tx.clone(),
            move |n: &Node, deleted| match n.metadata.name.as_deref() {
                Some(name) if deleted || crate::parse::node_failed(n) => {
                    services_on(&pod_cache, name)
                }
                _ => Vec::new(),
            },
        );
        Self {
            tx,
            tasks: vec![t1, t2, t3, t4, t5, t6],
            stss,
            pods,
            svcs,
            pdbs,
            cms,
            nodes,
        }
    }

    /// Waits until every store holds its initial list; `false` after `timeout`
    /// (e.g. a watch the RBAC forbids).
    pub(crate) async fn ready(&self, timeout: std::time::Duration) -> bool {
        let all = async {
            let r = futures::join!(
                self.stss.wait_until_ready(),
                self.pods.wait_until_ready(),
                self.svcs.wait_until_ready(),
                self.pdbs.wait_until_ready(),
                self.cms.wait_until_ready(),
                self.nodes.wait_until_ready(),
            );
            r.0.is_ok() && r.1.is_ok() && r.2.is_ok() && r.3.is_ok() && r.4.is_ok() && r.5.is_ok()
        };
        tokio::time::timeout(timeout, all).await.unwrap_or(false)
    }

    /// A new subscriber receiving changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<ServiceId> {
        self.tx.subscribe()
    }
}

impl Drop for WatchHub {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}
