//! One shared watcher per kind, feeding a broadcast of changed service ids.

use std::fmt::Debug;

use br2k_core::ServiceId;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use crate::names::{LABEL_SERVICE_ID, MANAGED_SELECTOR};

/// Change notifications buffered per subscriber; a slower subscriber loses the oldest
/// and is expected to resync (the supervisor also observes periodically).
const BUFFER: usize = 16384;

/// Watches StatefulSets, Pods, Services, PodDisruptionBudgets and ConfigMaps labelled
/// `app.kubernetes.io/managed-by=br2k` in one namespace (one watch per kind for all
/// services) and broadcasts the service id of every object that changed.
///
/// Watch errors are retried with kube-runtime's default backoff; after a restart the
/// re-listed objects are reported again, so nothing is missed for long.
#[derive(Debug)]
pub struct WatchHub {
    tx: broadcast::Sender<ServiceId>,
    tasks: Vec<JoinHandle<()>>,
}

fn service_id<K: Resource>(obj: &K) -> Option<ServiceId> {
    let v = obj.meta().labels.as_ref()?.get(LABEL_SERVICE_ID)?;
    ServiceId::new(v).ok()
}

fn spawn<K>(api: Api<K>, tx: broadcast::Sender<ServiceId>) -> JoinHandle<()>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    tokio::spawn(async move {
        let config = watcher::Config::default().labels(MANAGED_SELECTOR);
        let mut events = watcher(api, config).default_backoff().boxed();
        while let Some(event) = events.next().await {
            match event {
                Ok(
                    watcher::Event::Apply(o)
                    | watcher::Event::Delete(o)
                    | watcher::Event::InitApply(o),
                ) => {
                    if let Some(id) = service_id(&o) {
                        // No subscriber is not an error.
                        let _ = tx.send(id);
                    }
                }
                Ok(watcher::Event::Init | watcher::Event::InitDone) => {}
                Err(e) => tracing::warn!(error = %e, "br2k watch failed; retrying"),
            }
        }
    })
}

impl WatchHub {
    /// Starts the watchers (needs a Tokio runtime).
    pub fn start(client: Client, namespace: &str) -> Self {
        let (tx, _) = broadcast::channel(BUFFER);
        let tasks = vec![
            spawn(
                Api::<StatefulSet>::namespaced(client.clone(), namespace),
                tx.clone(),
            ),
            spawn(
                Api::<Pod>::namespaced(client.clone(), namespace),
                tx.clone(),
            ),
            spawn(
                Api::<Service>::namespaced(client.clone(), namespace),
                tx.clone(),
            ),
            spawn(
                Api::<PodDisruptionBudget>::namespaced(client.clone(), namespace),
                tx.clone(),
            ),
            spawn(Api::<ConfigMap>::namespaced(client, namespace), tx.clone()),
        ];
        Self { tx, tasks }
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
