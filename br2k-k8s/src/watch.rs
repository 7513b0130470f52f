//! One shared watcher per kind, caching the objects in reflector stores (read by
//! `observe`) and feeding a broadcast of changed service ids; plus the pod guard that
//! keeps replicas alive when their StatefulSet is deleted.

use std::collections::HashSet;
use std::fmt::Debug;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use br2k_core::ServiceId;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;

use crate::error::is_forbidden;
use crate::names::{LABEL_SERVICE_ID, MANAGED_SELECTOR, Names};

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
    /// How far the StatefulSet watch has delivered.
    pub(crate) seen_stss: Seen,
    /// How far the Service watch has delivered.
    pub(crate) seen_svcs: Seen,
    /// How far the PodDisruptionBudget watch has delivered.
    pub(crate) seen_pdbs: Seen,
    /// How far the ConfigMap watch has delivered.
    pub(crate) seen_cms: Seen,
}

/// Object `name` of namespace `ns` as the watch cache `store` holds it.
pub(crate) fn cached<K>(store: &Store<K>, name: &str, ns: &str) -> Option<Arc<K>>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    store.get(&ObjectRef::new(name).within(ns))
}

/// The metadata of [`cached`] object `name`.
pub(crate) fn cached_meta<K>(store: &Store<K>, name: &str, ns: &str) -> Option<ObjectMeta>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    cached(store, name, ns).map(|o| o.meta().clone())
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

/// The highest resource version one watch has delivered into its store (`0` before
/// any). A watch delivers events in resource-version order, so once it reaches `v`
/// its store holds every change of its kind up to `v`.
pub(crate) type Seen = Arc<AtomicU64>;

fn spawn<K>(
    api: Api<K>,
    config: watcher::Config,
    tx: broadcast::Sender<ServiceId>,
    ids: impl Fn(&K, bool) -> Vec<ServiceId> + Send + 'static,
) -> (Store<K>, Seen, JoinHandle<()>)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let seen = Seen::default();
    let seen_here = seen.clone();
    let task = tokio::spawn(async move {
        let stream = watcher(api, config)
            .default_backoff()
            // Of the managed fields only other writers' entries are read (drift):
            // keep just those (usually none) in memory.
            .modify(|o: &mut K| o.managed_fields_mut().retain(crate::ownership::is_foreign));
        let mut events = reflector::reflector(writer, stream).boxed();
        // A (re-)list fills the store only at its end: its versions count from then.
        let mut listed = 0;
        let version = |o: &K| {
            o.meta()
                .resource_version
                .as_deref()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        while let Some(event) = events.next().await {
            let (obj, deleted) = match event {
                Ok(watcher::Event::Apply(o)) => {
                    // The store holds this event already (the reflector writes first).
                    seen_here.fetch_max(version(&o), Ordering::Release);
                    (o, false)
                }
                Ok(watcher::Event::Delete(o)) => {
                    seen_here.fetch_max(version(&o), Ordering::Release);
                    (o, true)
                }
                Ok(watcher::Event::InitApply(o)) => {
                    listed = listed.max(version(&o));
                    (o, false)
                }
                Ok(watcher::Event::Init) => {
                    listed = 0;
                    continue;
                }
                Ok(watcher::Event::InitDone) => {
                    seen_here.fetch_max(listed, Ordering::Release);
                    continue;
                }
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
    (reader, seen, task)
}

impl WatchHub {
    /// Starts the watchers (needs a Tokio runtime); with `guard_pods`, also the pod
    /// guard, which gives each replica pod a second owner reference to its service's
    /// ConfigMap so that deleting the StatefulSet does not delete the replicas.
    pub fn start(client: Client, namespace: &str, guard_pods: bool) -> Self {
        let (tx, _) = broadcast::channel(BUFFER);
        let managed = || watcher::Config::default().labels(MANAGED_SELECTOR);
        fn own<K: Resource>(o: &K, _: bool) -> Vec<ServiceId> {
            service_id(o).into_iter().collect()
        }
        let (guard_tx, guard_rx) = mpsc::unbounded_channel();
        let sts_guard_tx = guard_tx.clone();
        let (stss, seen_stss, t1) = spawn(
            Api::<StatefulSet>::namespaced(client.clone(), namespace),
            managed(),
            tx.clone(),
            move |sts: &StatefulSet, deleted| {
                if guard_pods
                    && !deleted
                    && roll_finished(sts)
                    && let (Some(name), Some(version)) = (
                        sts.metadata.name.clone(),
                        sts.metadata.resource_version.clone(),
                    )
                {
                    let replicas = sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
                    let _ = sts_guard_tx.send(GuardEvent::RollFinished(name, version, replicas));
                }
                own(sts, deleted)
            },
        );
        let (pods, _, t2) = spawn(
            Api::<Pod>::namespaced(client.clone(), namespace),
            managed(),
            tx.clone(),
            move |p: &Pod, deleted| {
                if guard_pods {
                    let _ = guard_tx.send(GuardEvent::of(p, deleted));
                }
                own(p, deleted)
            },
        );
        let (svcs, seen_svcs, t3) = spawn(
            Api::<Service>::namespaced(client.clone(), namespace),
            managed(),
            tx.clone(),
            own,
        );
        let (pdbs, seen_pdbs, t4) = spawn(
            Api::<PodDisruptionBudget>::namespaced(client.clone(), namespace),
            managed(),
            tx.clone(),
            own,
        );
        let (cms, seen_cms, t5) = spawn(
            Api::<ConfigMap>::namespaced(client.clone(), namespace),
            managed(),
            tx.clone(),
            own,
        );
        // A failed or deleted node: every service with a pod there looks again at
        // once (instead of when the node controller updates the pods).
        let pod_cache = pods.clone();
        let t7 = tokio::spawn(guard_pods_task(
            Api::<Pod>::namespaced(client.clone(), namespace),
            Api::<StatefulSet>::namespaced(client.clone(), namespace),
            cms.clone(),
            namespace.to_owned(),
            guard_rx,
        ));
        let (nodes, _, t6) = spawn(
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
            tasks: vec![t1, t2, t3, t4, t5, t6, t7],
            stss,
            pods,
            svcs,
            pdbs,
            cms,
            nodes,
            seen_stss,
            seen_svcs,
            seen_pdbs,
            seen_cms,
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

    /// The cached pods of service `id` (by its selector labels).
    pub(crate) fn pods_of(&self, id: &ServiceId) -> Vec<std::sync::Arc<Pod>> {
        let selector = crate::names::selector_labels(id);
        self.pods.state_filter(|p| {
            p.metadata.labels.as_ref().is_some_and(|l| {
                selector
                    .iter()
                    .all(|(k, v)| l.get(k).is_some_and(|x| x == v))
            })
        })
    }

    /// A new subscriber receiving changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<ServiceId> {
        self.tx.subscribe()
    }
}

/// A pod event for the pod guard.
#[derive(Debug)]
enum GuardEvent {
    /// A live pod lacking the ConfigMap owner reference: (uid, name, service id).
    Unguarded(String, String, ServiceId),
    /// A pod that is guarded already, or deleted: forget its uid.
    Done(String),
    /// A StatefulSet finished rolling its pods to the template: freeze it again
    /// (name, resource version seen, replicas).
    RollFinished(String, String, i32),
    /// Nothing to do.
    Skip,
}

impl GuardEvent {
    fn of(pod: &Pod, deleted: bool) -> Self {
        let Some(uid) = pod.metadata.uid.clone() else {
            return Self::Skip;
        };
        let refs = pod.metadata.owner_references.as_deref().unwrap_or_default();
        let guarded = refs.iter().any(|r| r.kind == "ConfigMap");
        if deleted || guarded || pod.metadata.deletion_timestamp.is_some() {
            return Self::Done(uid);
        }
        let by_statefulset = refs
            .iter()
            .any(|r| r.controller == Some(true) && r.kind == "StatefulSet");
        match (by_statefulset, service_id(pod), pod.metadata.name.clone()) {
            (true, Some(id), Some(name)) => Self::Unguarded(uid, name, id),
            _ => Self::Skip,
        }
    }
}

/// The pod guard: gives every replica pod a second, non-controller owner reference to
/// its service's ConfigMap (the root of the service's objects).
///
/// The garbage collector deletes a dependent only when all of its owners are gone, so
/// when somebody deletes the StatefulSet the replicas keep running (the collector just
/// drops the dangling reference), and the StatefulSet br2k re-applies adopts them at
/// once instead of recreating every pod. Removing the service (deleting the ConfigMap)
/// still removes the pods. One strategic-merge patch per new pod; errors (e.g. no
/// `patch` permission on pods) are logged and leave the pod as the StatefulSet made it.
/// (When br2k re-applies a deleted StatefulSet, it replaces the pods' dead controller
/// reference itself: see `KubeReplicator`'s adoption after apply.)
async fn guard_pods_task(
    api: Api<Pod>,
    stss_api: Api<StatefulSet>,
    cms: Store<ConfigMap>,
    namespace: String,
    mut events: mpsc::UnboundedReceiver<GuardEvent>,
) {
    // Pods patched already, until their guarded or deleted state is seen.
    let mut sent: HashSet<String> = HashSet::new();
    while let Some(event) = events.recv().await {
        let (uid, name, id) = match event {
            GuardEvent::Unguarded(uid, name, id) => (uid, name, id),
            GuardEvent::Done(uid) => {
                sent.remove(&uid);
                continue;
            }
            GuardEvent::RollFinished(sts, version, replicas) => {
                freeze(&stss_api, &sts, &version, replicas).await;
                continue;
            }
            GuardEvent::Skip => continue,
        };
        if sent.contains(&uid) {
            continue;
        }
        let config = Names::of(&id).config;
        let Some(cm) = cached(&cms, &config, &namespace) else {
            continue;
        };
        let Some(cm_uid) = cm.metadata.uid.clone() else {
            continue;
        };
        let patch = serde_json::json!({"metadata": {
            // The pod's uid is immutable: a replacement pod of the same name makes
            // the patch fail instead of guarding a pod this event did not describe.
            "uid": uid,
            "ownerReferences": [{
                "apiVersion": "v1", "kind": "ConfigMap", "name": config, "uid": cm_uid,
            }],
        }});
        match api
            .patch(&name, &PatchParams::default(), &Patch::Strategic(patch))
            .await
        {
            Ok(_) => {
                sent.insert(uid);
            }
            Err(e) if is_forbidden(&e) => {
                // No permission: do not retry this pod on each of its events.
                tracing::warn!(pod = %name, error = %e, "br2k pod guard: may not patch pods");
                sent.insert(uid);
            }
            Err(e) => tracing::debug!(pod = %name, error = %e, "br2k pod guard: patch failed"),
        }
    }
}

/// Whether `sts` rolled every pod to its template (br2k applied it with
/// `partition: 0`) and all of them are Ready: time to freeze it again.
fn roll_finished(sts: &StatefulSet) -> bool {
    let (Some(spec), Some(st)) = (sts.spec.as_ref(), sts.status.as_ref()) else {
        return false;
    };
    let replicas = spec.replicas.unwrap_or(1);
    let partition = spec
        .update_strategy
        .as_ref()
        .and_then(|u| u.rolling_update.as_ref())
        .and_then(|r| r.partition)
        .unwrap_or(0);
    replicas > 0
        && partition < replicas
        && st.observed_generation.is_some()
        && st.observed_generation >= sts.metadata.generation
        && st.current_revision.is_some()
        && st.current_revision == st.update_revision
        && st.updated_replicas == Some(replicas)
        && st.ready_replicas == Some(replicas)
}

/// Sets the partition of StatefulSet `name` to its replica count, so the controller
/// updates no pod after a template change (see [`crate::build::Rollout::Frozen`]). The
/// write is conditional on `version`, the resource version in which the roll was seen
/// finished, and made under its own field manager; br2k's next apply takes the field
/// back.
async fn freeze(api: &Api<StatefulSet>, name: &str, version: &str, replicas: i32) {
    let patch = serde_json::json!({
        "metadata": {"resourceVersion": version},
        "spec": {"updateStrategy": {
            "type": "RollingUpdate",
            "rollingUpdate": {"partition": replicas},
        }},
    });
    let params = PatchParams {
        field_manager: Some(FREEZE_MANAGER.into()),
        ..PatchParams::default()
    };
    if let Err(e) = api.patch(name, &params, &Patch::Merge(patch)).await {
        tracing::debug!(statefulset = %name, error = %e, "br2k: freeze failed");
    }
}

/// Field manager of the partition write that freezes a StatefulSet after a roll.
const FREEZE_MANAGER: &str = "br2k-freeze";

impl Drop for WatchHub {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{
        RollingUpdateStatefulSetStrategy, StatefulSetSpec, StatefulSetStatus,
        StatefulSetUpdateStrategy,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};

    fn owner(kind: &str, uid: &str, controller: bool) -> OwnerReference {
        OwnerReference {
            api_version: "v1".into(),
            kind: kind.into(),
            name: "x".into(),
            uid: uid.into(),
            controller: Some(controller),
            block_owner_deletion: None,
        }
    }

    fn pod(owners: Vec<OwnerReference>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("svc-0".into()),
                uid: Some("pod-uid".into()),
                labels: Some([(LABEL_SERVICE_ID.to_owned(), "svc".to_owned())].into()),
                owner_references: Some(owners),
                ..ObjectMeta::default()
            },
            ..Pod::default()
        }
    }

    #[test]
    fn only_live_statefulset_pods_without_the_guard_are_patched() {
        let by_sts = pod(vec![owner("StatefulSet", "s", true)]);
        assert!(matches!(
            GuardEvent::of(&by_sts, false),
            GuardEvent::Unguarded(uid, name, id) if uid == "pod-uid" && name == "svc-0" && id.as_str() == "svc"
        ));
        let guarded = pod(vec![
            owner("StatefulSet", "s", true),
            owner("ConfigMap", "c", false),
        ]);
        assert!(matches!(
            GuardEvent::of(&guarded, false),
            GuardEvent::Done(_)
        ));
        assert!(matches!(GuardEvent::of(&by_sts, true), GuardEvent::Done(_)));
        let mut terminating = by_sts.clone();
        terminating.metadata.deletion_timestamp = Some(Time(Default::default()));
        assert!(matches!(
            GuardEvent::of(&terminating, false),
            GuardEvent::Done(_)
        ));
        let foreign = pod(vec![owner("ReplicaSet", "r", true)]);
        assert!(matches!(GuardEvent::of(&foreign, false), GuardEvent::Skip));
    }

    fn sts(partition: i32, status: StatefulSetStatus) -> StatefulSet {
        StatefulSet {
            metadata: ObjectMeta {
                generation: Some(4),
                ..ObjectMeta::default()
            },
            spec: Some(StatefulSetSpec {
                replicas: Some(3),
                update_strategy: Some(StatefulSetUpdateStrategy {
                    type_: Some("RollingUpdate".into()),
                    rolling_update: Some(RollingUpdateStatefulSetStrategy {
                        partition: Some(partition),
                        ..Default::default()
                    }),
                }),
                ..StatefulSetSpec::default()
            }),
            status: Some(status),
        }
    }

    fn done() -> StatefulSetStatus {
        StatefulSetStatus {
            observed_generation: Some(4),
            current_revision: Some("r2".into()),
            update_revision: Some("r2".into()),
            updated_replicas: Some(3),
            ready_replicas: Some(3),
            replicas: 3,
            ..StatefulSetStatus::default()
        }
    }

    #[test]
    fn a_finished_roll_is_frozen_again_and_nothing_else() {
        assert!(roll_finished(&sts(0, done())));
        assert!(!roll_finished(&sts(3, done())), "already frozen");
        let rolling = StatefulSetStatus {
            current_revision: Some("r1".into()),
            ..done()
        };
        assert!(
            !roll_finished(&sts(0, rolling)),
            "pods still on the old revision"
        );
        let unseen = StatefulSetStatus {
            observed_generation: Some(3),
            ..done()
        };
        assert!(!roll_finished(&sts(0, unseen)), "spec not seen yet");
        let not_ready = StatefulSetStatus {
            ready_replicas: Some(2),
            ..done()
        };
        assert!(!roll_finished(&sts(0, not_ready)), "a replica not Ready");
    }
}
