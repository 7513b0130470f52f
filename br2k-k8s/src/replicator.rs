//! [`KubeReplicator`]: runs service records as StatefulSets on Kubernetes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use br2k_core::{
    ObservedReplica, ObservedState, Replicator, Result, ServiceId, ServiceRecord, WorkloadTemplate,
};
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt, TryFutureExt};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Service, Toleration};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::OnceCell;
use tokio_stream::wrappers::BroadcastStream;

use crate::build::{self, Placement, Rollout};
use crate::error::{KubeError, is_conflict, is_not_found, to_core};
use crate::names::{
    ANNOTATION_CONFIG_HASH, LABEL_RECORD_VERSION, LABEL_SERVICE_ID, MANAGED_SELECTOR, MANAGER,
    Names, selector_string,
};
use crate::ownership;
use crate::parse;
use crate::watch::WatchHub;

/// Env var naming the namespace [`KubeReplicator::from_env`] uses.
pub const NAMESPACE_ENV: &str = "BR2K_K8S_NAMESPACE";

/// Runs each service record as a StatefulSet (plus a headless and a client Service, a
/// PodDisruptionBudget, a ConfigMap and, with `spec.autoscaling`, a
/// HorizontalPodAutoscaler) in one namespace, with server-side apply under the one
/// field manager `br2k`.
///
/// Object names derive from the service id (see [`Names`]); every object carries the
/// labels `app.kubernetes.io/managed-by=br2k`, `br2k.io/service-id` and
/// `br2k.io/record-version` and the annotation `br2k.io/spec-hash`. The ConfigMap is
/// the owner of every other object, so deleting it cascades. Replica pods get the
/// ConfigMap as a second owner too (see [`KubeReplicatorBuilder::guard_pods`]): a
/// deleted StatefulSet leaves them running and the re-applied one adopts them.
///
/// Rolling updates are gated: `apply` lets the StatefulSet controller roll the pods
/// (`partition: 0`) only when some replica does not run the record's template yet (a
/// new record version); when every replica runs it, the StatefulSet is applied frozen
/// (`partition` = replicas), so a template changed behind br2k's back reaches no pod.
///
/// [`Replicator::observe`] rebuilds everything from live objects (see [`crate::parse`])
/// as held by the shared watch cache. It reads its own writes: right after an `apply`
/// or `remove` of a service, `observe` of that service waits until the cache has seen
/// what was written (by resource version; usually one watch delivery), and reads the
/// API server if that takes longer than a second.
/// [`Replicator::changes`] is fed by the same watchers, one per kind for the namespace.
/// Clones share the client and the watchers.
#[derive(Clone)]
pub struct KubeReplicator {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    namespace: String,
    placement: Placement,
    guard_pods: bool,
    hub: OnceCell<WatchHub>,
    cache_usable: OnceCell<bool>,
    /// The last write of each service that the watch cache may not show yet.
    written: Mutex<HashMap<ServiceId, (Written, Instant)>>,
}

/// What `apply` or `remove` last wrote for a service (see [`KubeReplicator`]'s
/// read-your-writes).
#[derive(Debug)]
enum Written {
    /// The objects `apply` wrote, with the resource versions the API server returned.
    Applied(Vec<(Kind, String, Option<String>)>),
    /// `remove` deleted the service's objects.
    Removed,
}

/// The kinds `apply` writes.
#[derive(Debug, Clone, Copy)]
enum Kind {
    ConfigMap,
    StatefulSet,
    Service,
    PodDisruptionBudget,
}

/// How long `observe` waits for the watch cache to show this replicator's own last
/// write of a service before it reads the API server instead.
const READ_YOUR_WRITES_WAIT: Duration = Duration::from_secs(1);

/// After this long the watch cache is trusted again for a service even if it never
/// showed the write (someone else changed or deleted the object since).
const READ_YOUR_WRITES_WINDOW: Duration = Duration::from_secs(10);

/// The resource version of object `name` in `ns` as the watch cache holds it.
fn cached_version<K>(store: &Store<K>, name: &str, ns: &str) -> Option<String>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    store
        .get(&ObjectRef::new(name).within(ns))
        .and_then(|o| o.meta().resource_version.clone())
}

/// Whether cached resource version `cached` is at least `written`. Kubernetes
/// resource versions are etcd revisions (integers) in practice; anything else only
/// compares equal.
fn version_reached(cached: &str, written: &str) -> bool {
    match (cached.parse::<u64>(), written.parse::<u64>()) {
        (Ok(c), Ok(w)) => c >= w,
        _ => cached == written,
    }
}

impl fmt::Debug for KubeReplicator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KubeReplicator")
            .field("namespace", &self.inner.namespace)
            .field("placement", &self.inner.placement)
            .finish_non_exhaustive()
    }
}

/// Builds a [`KubeReplicator`].
#[derive(Debug, Clone)]
pub struct KubeReplicatorBuilder {
    namespace: String,
    placement: Placement,
    guard_pods: bool,
}

impl KubeReplicatorBuilder {
    /// Adds a toleration to every pod (e.g. for tainted fake or dedicated nodes).
    pub fn with_toleration(mut self, toleration: Toleration) -> Self {
        self.placement.tolerations.push(toleration);
        self
    }

    /// Adds a node selector entry to every pod.
    pub fn with_node_selector(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.placement
            .node_selector
            .insert(key.into(), value.into());
        self
    }

    /// Whether the watch hub guards the running replicas (default `true`):
    ///
    /// - Replica pods get a second owner reference to the service's ConfigMap. Deleting
    ///   the StatefulSet then leaves them running (the garbage collector keeps a
    ///   dependent while any owner exists), and re-applying the StatefulSet adopts
    ///   them (br2k replaces the dead controller reference at once) instead of
    ///   recreating them. Removing the service still deletes them. Needs `patch`
    ///   on pods.
    /// - Rolling updates are gated: `apply` lets the controller roll pods only for a
    ///   new record version, and after the roll completes the StatefulSet is frozen
    ///   again (`partition` = replicas, see [`crate::build::Rollout`]), so a tampered
    ///   template restarts no pod before br2k reverts it.
    ///
    /// With `false`, every apply lets the controller roll (`partition: 0`) and pods
    /// have only their StatefulSet as owner.
    pub fn guard_pods(mut self, on: bool) -> Self {
        self.guard_pods = on;
        self
    }

    /// Builds the replicator on `client`.
    pub fn build(self, client: Client) -> KubeReplicator {
        KubeReplicator {
            inner: Arc::new(Inner {
                client,
                namespace: self.namespace,
                placement: self.placement,
                guard_pods: self.guard_pods,
                hub: OnceCell::new(),
                cache_usable: OnceCell::new(),
                written: Mutex::new(HashMap::new()),
            }),
        }
    }
}

fn apply_params() -> PatchParams {
    PatchParams::apply(MANAGER).force()
}

async fn get_opt<K>(api: &Api<K>, name: &str, what: &str) -> Result<Option<K>, KubeError>
where
    K: Resource + Clone + DeserializeOwned + fmt::Debug,
{
    api.get_opt(name)
        .await
        .map_err(|e| KubeError::client(format!("get {what} {name}"), e))
}

async fn apply_obj<K>(api: &Api<K>, name: &str, obj: &K, what: &str) -> Result<K, KubeError>
where
    K: Resource + Clone + DeserializeOwned + Serialize + fmt::Debug,
{
    api.patch(name, &apply_params(), &Patch::Apply(obj))
        .await
        .map_err(|e| KubeError::client(format!("apply {what} {name}"), e))
}

async fn delete_opt<K>(
    api: &Api<K>,
    name: &str,
    params: &DeleteParams,
    what: &str,
) -> Result<(), KubeError>
where
    K: Resource + Clone + DeserializeOwned + fmt::Debug,
{
    match api.delete(name, params).await {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(KubeError::client(format!("delete {what} {name}"), e)),
    }
}

/// The metadata of object `name`, if it exists.
async fn meta_of<K>(api: &Api<K>, name: &str, what: &str) -> Result<Option<ObjectMeta>, KubeError>
where
    K: Resource + Clone + DeserializeOwned + fmt::Debug,
{
    Ok(get_opt(api, name, what).await?.map(|o| o.meta().clone()))
}

/// When `check` is set: reads object `name` and, if other writers set fields on it,
/// makes br2k their owner ([`ownership::take_over`]), conditional on the version
/// read (read again and retried when the object changed meanwhile, e.g. its status).
async fn release_foreign<K>(
    check: bool,
    api: &Api<K>,
    name: &str,
    what: &str,
) -> Result<(), KubeError>
where
    K: Resource + Clone + DeserializeOwned + fmt::Debug,
{
    if !check {
        return Ok(());
    }
    let mut attempt = 0;
    loop {
        let Some(live) = get_opt(api, name, what).await? else {
            return Ok(());
        };
        let Some(fields) = ownership::take_over(live.meta()) else {
            return Ok(());
        };
        tracing::info!(object = %format!("{what}/{name}"), "taking over fields set by other writers, to remove them");
        let patch = serde_json::json!({
            "metadata": {
                "managedFields": fields,
                "resourceVersion": live.meta().resource_version,
            }
        });
        let params = PatchParams {
            field_manager: Some(MANAGER.into()),
            ..PatchParams::default()
        };
        match api.patch(name, &params, &Patch::Merge(patch)).await {
            Ok(_) => return Ok(()),
            Err(e) if is_conflict(&e) && attempt < 5 => attempt += 1,
            Err(e) => {
                return Err(KubeError::client(
                    format!("take over fields of {what} {name}"),
                    e,
                ));
            }
        }
    }
}

impl KubeReplicator {
    /// A builder for namespace `namespace`.
    pub fn builder(namespace: impl Into<String>) -> KubeReplicatorBuilder {
        KubeReplicatorBuilder {
            namespace: namespace.into(),
            placement: Placement::default(),
            guard_pods: true,
        }
    }

    /// A replicator in `namespace` with default placement.
    pub fn new(client: Client, namespace: impl Into<String>) -> Self {
        Self::builder(namespace).build(client)
    }

    /// A replicator using the default client configuration (`KUBECONFIG`, in-cluster
    /// service account) and the namespace from `BR2K_K8S_NAMESPACE` (default
    /// `default`).
    pub async fn from_env() -> Result<Self> {
        crate::install_crypto_provider();
        let client = Client::try_default()
            .await
            .map_err(|e| to_core(KubeError::Config(e.to_string())))?;
        let ns = std::env::var(NAMESPACE_ENV).unwrap_or_else(|_| "default".into());
        Ok(Self::new(client, ns))
    }

    /// The namespace the workloads live in.
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// The client.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as Resource>::DynamicType: Default,
    {
        Api::namespaced(self.inner.client.clone(), &self.inner.namespace)
    }

    /// Refuses to write when an object of a name br2k would write exists and is not
    /// br2k's for `id` (another service's, or created by someone else): a force-apply
    /// would take it over. Objects the watch cache holds are checked there; the others
    /// are read from the API server.
    async fn refuse_foreign_objects(&self, names: &Names, id: &ServiceId) -> Result<(), KubeError> {
        let ns = self.namespace();
        let hub = self.cache().await;
        let cached = |meta: Option<ObjectMeta>| meta.filter(|m| meta_owned_by(m, id));
        let (sts, headless, client, pdb, cm) = match hub {
            Some(h) => (
                cached(
                    h.stss
                        .get(&ObjectRef::new(&names.base).within(ns))
                        .map(|o| o.metadata.clone()),
                ),
                cached(
                    h.svcs
                        .get(&ObjectRef::new(&names.headless).within(ns))
                        .map(|o| o.metadata.clone()),
                ),
                cached(
                    h.svcs
                        .get(&ObjectRef::new(&names.base).within(ns))
                        .map(|o| o.metadata.clone()),
                ),
                cached(
                    h.pdbs
                        .get(&ObjectRef::new(&names.base).within(ns))
                        .map(|o| o.metadata.clone()),
                ),
                cached(
                    h.cms
                        .get(&ObjectRef::new(&names.config).within(ns))
                        .map(|o| o.metadata.clone()),
                ),
            ),
            None => (None, None, None, None, None),
        };
        let stss: Api<StatefulSet> = self.api();
        let svcs: Api<Service> = self.api();
        let pdbs: Api<PodDisruptionBudget> = self.api();
        let cms: Api<ConfigMap> = self.api();
        // What the cache shows as ours needs no read; anything else is read.
        let read = |known: Option<ObjectMeta>, fut| async move {
            match known {
                Some(m) => Ok(Some(m)),
                None => fut.await,
            }
        };
        let found = futures::try_join!(
            read(sts, meta_of(&stss, &names.base, "statefulset").boxed()),
            read(headless, meta_of(&svcs, &names.headless, "service").boxed()),
            read(client, meta_of(&svcs, &names.base, "service").boxed()),
            read(
                pdb,
                meta_of(&pdbs, &names.base, "poddisruptionbudget").boxed()
            ),
            read(cm, meta_of(&cms, &names.config, "configmap").boxed()),
        )?;
        let all = [
            ("statefulset", &names.base, found.0),
            ("service", &names.headless, found.1),
            ("service", &names.base, found.2),
            ("poddisruptionbudget", &names.base, found.3),
            ("configmap", &names.config, found.4),
        ];
        for (kind, name, meta) in all {
            if let Some(m) = meta.filter(|m| !meta_owned_by(m, id)) {
                let holder = m
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(LABEL_SERVICE_ID))
                    .map_or("another writer (no br2k service label)".to_owned(), |s| {
                        format!("br2k service {s}")
                    });
                return Err(KubeError::Foreign(format!(
                    "{kind} {ns}/{name} exists and belongs to {holder}, not to service {id}: \
                     br2k neither overwrites nor deletes it"
                )));
            }
        }
        Ok(())
    }

    async fn apply_inner(&self, record: &ServiceRecord) -> Result<(), KubeError> {
        let ns = self.namespace();
        let names = Names::of(&record.id);
        let cms: Api<ConfigMap> = self.api();
        let stss: Api<StatefulSet> = self.api();
        let svcs: Api<Service> = self.api();
        let pdbs: Api<PodDisruptionBudget> = self.api();
        let hpas: Api<HorizontalPodAutoscaler> = self.api();

        let cm_obj = build::config_map(record, &names, ns);

        let live = if record.spec.autoscaling.is_some() {
            get_opt(&stss, &names.base, "statefulset")
                .await?
                .map(|s| parse::sts_replicas(&s))
        } else {
            None
        };
        let replicas = build::replicas_to_apply(record, live);
        let rollout = if self.inner.guard_pods {
            self.rollout_for(record, &names).await
        } else {
            Rollout::Roll
        };

        let has_ports = !record.spec.ports.is_empty();
        self.refuse_foreign_objects(&names, &record.id).await?;
        self.release_foreign_fields(&names).await?;
        let dependents = |owner: Option<OwnerReference>| {
            let mut sts =
                build::stateful_set(record, &names, ns, replicas, rollout, &self.inner.placement);
            build::set_owner(&mut sts.metadata, owner.clone());
            let mut headless = build::headless_service(record, &names, ns);
            build::set_owner(&mut headless.metadata, owner.clone());
            let mut client_svc = build::client_service(record, &names, ns);
            build::set_owner(&mut client_svc.metadata, owner.clone());
            let mut pdb = build::disruption_budget(record, &names, ns, replicas);
            build::set_owner(&mut pdb.metadata, owner.clone());
            let hpa = build::autoscaler(record, &names, ns).map(|mut h| {
                build::set_owner(&mut h.metadata, owner.clone());
                h
            });
            let (stss, svcs, pdbs, hpas, names) = (&stss, &svcs, &pdbs, &hpas, &names);
            async move {
                let hpa_fut = async {
                    match &hpa {
                        Some(h) => apply_obj(hpas, &names.base, h, "autoscaler")
                            .await
                            .map(drop),
                        None => {
                            delete_opt(hpas, &names.base, &DeleteParams::default(), "autoscaler")
                                .await
                        }
                    }
                };
                // Kubernetes refuses a cluster-IP Service without ports: a service
                // without ports gets only the headless one.
                let client_fut = async {
                    if has_ports {
                        apply_obj(svcs, &names.base, &client_svc, "service")
                            .await
                            .map(Some)
                    } else {
                        delete_opt(svcs, &names.base, &DeleteParams::default(), "service")
                            .await
                            .map(|()| None)
                    }
                };
                futures::try_join!(
                    apply_obj(stss, &names.base, &sts, "statefulset"),
                    apply_obj(svcs, &names.headless, &headless, "service"),
                    client_fut,
                    apply_obj(pdbs, &names.base, &pdb, "poddisruptionbudget"),
                    hpa_fut,
                )
                .map(|(sts, headless, client_svc, pdb, ())| (sts, headless, client_svc, pdb))
            }
        };

        // The ConfigMap owns everything else, so its UID goes into every owner
        // reference. When the watch cache knows it (the usual case for a recovery),
        // everything is applied at once; if the ConfigMap turns out to have been
        // replaced meanwhile, the dependents are applied again with the new UID.
        let known_owner = self
            .cache()
            .await
            .and_then(|hub| hub.cms.get(&ObjectRef::new(&names.config).within(ns)))
            .filter(|cm| owned_by(cm.as_ref(), &record.id))
            .and_then(|cm| build::owner_reference(&cm));
        let (cm, (sts, headless, client_svc, pdb)) = match known_owner {
            Some(owner) => {
                let (cm, deps) = futures::join!(
                    apply_obj(&cms, &names.config, &cm_obj, "configmap"),
                    dependents(Some(owner.clone())),
                );
                let cm = cm?;
                if cm.metadata.uid.as_deref() == Some(owner.uid.as_str()) {
                    (cm, deps?)
                } else {
                    let deps = dependents(build::owner_reference(&cm)).await?;
                    (cm, deps)
                }
            }
            None => {
                let cm = apply_obj(&cms, &names.config, &cm_obj, "configmap").await?;
                let deps = dependents(build::owner_reference(&cm)).await?;
                (cm, deps)
            }
        };
        let rv = |m: &ObjectMeta| m.resource_version.clone();
        self.note_written(
            &record.id,
            Written::Applied(
                vec![
                    (Kind::ConfigMap, names.config.clone(), rv(&cm.metadata)),
                    (Kind::StatefulSet, names.base.clone(), rv(&sts.metadata)),
                    (
                        Kind::Service,
                        names.headless.clone(),
                        rv(&headless.metadata),
                    ),
                ]
                .into_iter()
                .chain(client_svc.map(|s| (Kind::Service, names.base.clone(), rv(&s.metadata))))
                .chain([(
                    Kind::PodDisruptionBudget,
                    names.base.clone(),
                    rv(&pdb.metadata),
                )])
                .collect(),
            ),
        );
        if self.inner.guard_pods {
            self.adopt(&record.id, &sts).await;
        }
        Ok(())
    }

    /// Moves fields that other writers set on the objects of `names` into br2k's
    /// ownership, so that the apply that follows removes them. Objects the watch
    /// cache shows without foreign fields are skipped (no request); without a usable
    /// cache each object is read from the API server.
    async fn release_foreign_fields(&self, names: &Names) -> Result<(), KubeError> {
        let ns = self.namespace();
        let hub = self.cache().await;
        let flagged = |meta: Option<&ObjectMeta>| {
            hub.is_none()
                || meta.is_some_and(|m| m.managed_fields.as_ref().is_some_and(|f| !f.is_empty()))
        };
        let (cm, sts, headless, client, pdb) = match hub {
            Some(hub) => {
                let headless = ObjectRef::new(&names.headless).within(ns);
                let config = ObjectRef::new(&names.config).within(ns);
                (
                    flagged(hub.cms.get(&config).as_deref().map(|o| &o.metadata)),
                    flagged(
                        hub.stss
                            .get(&ObjectRef::new(&names.base).within(ns))
                            .as_deref()
                            .map(|o| &o.metadata),
                    ),
                    flagged(hub.svcs.get(&headless).as_deref().map(|o| &o.metadata)),
                    flagged(
                        hub.svcs
                            .get(&ObjectRef::new(&names.base).within(ns))
                            .as_deref()
                            .map(|o| &o.metadata),
                    ),
                    flagged(
                        hub.pdbs
                            .get(&ObjectRef::new(&names.base).within(ns))
                            .as_deref()
                            .map(|o| &o.metadata),
                    ),
                )
            }
            None => (true, true, true, true, true),
        };
        let cms: Api<ConfigMap> = self.api();
        let stss: Api<StatefulSet> = self.api();
        let svcs: Api<Service> = self.api();
        let pdbs: Api<PodDisruptionBudget> = self.api();
        futures::try_join!(
            release_foreign(cm, &cms, &names.config, "configmap"),
            release_foreign(sts, &stss, &names.base, "statefulset"),
            release_foreign(headless, &svcs, &names.headless, "service"),
            release_foreign(client, &svcs, &names.base, "service"),
            release_foreign(pdb, &pdbs, &names.base, "poddisruptionbudget"),
        )?;
        Ok(())
    }

    /// Makes `sts` the controller of the guarded replica pods of `id` that have no
    /// live controller (their StatefulSet was deleted and `sts` re-creates it), as
    /// the StatefulSet controller would on its next sync, but at once and in parallel.
    /// Best effort: the controller adopts whatever this misses.
    async fn adopt(&self, id: &ServiceId, sts: &StatefulSet) {
        let (Some(hub), Some(uid), Some(name)) = (
            self.cache().await,
            sts.metadata.uid.as_deref(),
            sts.metadata.name.as_deref(),
        ) else {
            return;
        };
        let pods: Api<Pod> = self.api();
        let orphans = hub.pods_of(id).into_iter().filter_map(|p| {
            let refs = p.metadata.owner_references.as_deref().unwrap_or_default();
            let guarded = refs.iter().any(|r| r.kind == "ConfigMap");
            let controller = refs.iter().find(|r| r.controller == Some(true));
            // Another controller uid than the live StatefulSet's: that one was deleted.
            let stale = controller.filter(|c| c.kind == "StatefulSet" && c.uid != uid);
            let adoptable = guarded
                && p.metadata.deletion_timestamp.is_none()
                && (controller.is_none() || stale.is_some());
            adoptable.then(|| {
                let mut refs = vec![serde_json::json!({
                    "apiVersion": "apps/v1", "kind": "StatefulSet", "name": name, "uid": uid,
                    // No blockOwnerDeletion: setting it may need permission on the
                    // StatefulSet's finalizers (OwnerReferencesPermissionEnforcement).
                    "controller": true,
                })];
                if let Some(old) = stale {
                    refs.push(serde_json::json!({"$patch": "delete", "uid": old.uid}));
                }
                let patch = serde_json::json!({"metadata": {
                    "uid": p.metadata.uid, "ownerReferences": refs,
                }});
                (p.metadata.name.clone().unwrap_or_default(), patch)
            })
        });
        let patches = orphans.map(|(pod, patch)| {
            let pods = &pods;
            async move {
                if let Err(e) = pods
                    .patch(&pod, &PatchParams::default(), &Patch::Strategic(patch))
                    .await
                {
                    tracing::debug!(pod = %pod, error = %e, "br2k: adopting a replica failed");
                }
            }
        });
        futures::future::join_all(patches).await;
    }

    /// [`Rollout::Frozen`] when the watch cache shows replicas and every live replica
    /// already runs the record's template (so a differing live template is tampering,
    /// and no pod needs to change); [`Rollout::Roll`] otherwise, including when the
    /// cache is not usable. After a roll completes, the watch hub freezes the
    /// StatefulSet again.
    async fn rollout_for(&self, record: &ServiceRecord, names: &Names) -> Rollout {
        let Some(hub) = self.cache().await else {
            return Rollout::Roll;
        };
        // A pod that started with the record's config hash read the record's values,
        // whatever the live ConfigMap says now (it may be tampered): its environment
        // is resolved against the ConfigMap the record asks for.
        let cm = build::config_map(record, names, self.namespace());
        let want = WorkloadTemplate::from_spec(&record.spec);
        let want_config = build::config_hash(&record.spec);
        let pods: Vec<_> = hub
            .pods_of(&record.id)
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect();
        // A pod read its environment when it started: the config hash it started with
        // says which values it has.
        let runs_record = |p: &Pod| {
            let started_with = p
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ANNOTATION_CONFIG_HASH));
            started_with == Some(&want_config)
                && p.spec
                    .as_ref()
                    .and_then(|s| parse::template_of_pod(s, Some(&cm)).ok())
                    .is_some_and(|mut t| {
                        // The same digest from another registry (a switch to a
                        // mirror) is the same image: no reason to restart a pod.
                        if t.image.digest().is_some() && t.image.digest() == want.image.digest() {
                            t.image = want.image.clone();
                        }
                        t == want
                    })
        };
        if !pods.is_empty() && pods.iter().all(|p| runs_record(p)) {
            Rollout::Frozen
        } else {
            Rollout::Roll
        }
    }

    /// The synced watch cache, or `None` when it is not usable.
    async fn cache(&self) -> Option<&WatchHub> {
        let hub = self.hub().await;
        let usable = *self
            .inner
            .cache_usable
            .get_or_init(|| async {
                let ok = hub.ready(CACHE_SYNC_WAIT).await;
                if !ok {
                    tracing::warn!(
                        namespace = %self.inner.namespace,
                        "br2k watch cache did not sync; observe reads the API server"
                    );
                }
                ok
            })
            .await;
        usable.then_some(hub)
    }

    /// The live objects of `id` from the shared watch cache, or `None` when the cache
    /// is not usable (its watches did not sync, e.g. for lack of RBAC).
    async fn live_from_cache(&self, id: &ServiceId) -> Option<Option<Live>> {
        let hub = self.cache().await?;
        let ns = self.namespace();
        let names = Names::of(id);
        let Some(sts) = hub.stss.get(&ObjectRef::new(&names.base).within(ns)) else {
            return Some(None);
        };
        let pods = hub.pods_of(id).into_iter().map(|p| (*p).clone()).collect();
        let healthy_nodes = hub
            .nodes
            .state()
            .iter()
            .filter(|n| !parse::node_failed(n))
            .filter_map(|n| n.metadata.name.clone())
            .collect();
        let svc = |name: &str| {
            hub.svcs
                .get(&ObjectRef::new(name).within(ns))
                .map(|o| (*o).clone())
        };
        Some(Some(Live {
            sts: (*sts).clone(),
            cm: hub
                .cms
                .get(&ObjectRef::new(&names.config).within(ns))
                .map(|o| (*o).clone()),
            headless: svc(&names.headless),
            client_svc: svc(&names.base),
            pdb: hub
                .pdbs
                .get(&ObjectRef::new(&names.base).within(ns))
                .map(|o| (*o).clone()),
            pods,
            healthy_nodes,
        }))
    }

    /// The live objects of `id`, read from the API server.
    async fn live_from_api(&self, id: &ServiceId) -> Result<Option<Live>, KubeError> {
        let names = Names::of(id);
        let stss: Api<StatefulSet> = self.api();
        let Some(sts) = get_opt(&stss, &names.base, "statefulset").await? else {
            return Ok(None);
        };
        let cms: Api<ConfigMap> = self.api();
        let svcs: Api<Service> = self.api();
        let pdbs: Api<PodDisruptionBudget> = self.api();
        let pods: Api<Pod> = self.api();
        let nodes: Api<Node> = Api::all(self.inner.client.clone());
        let selector = selector_string(id);
        let lp = ListParams::default().labels(&selector);
        let all = ListParams::default();
        let (cm, headless, client_svc, pdb, pod_list, node_list) = futures::try_join!(
            get_opt(&cms, &names.config, "configmap"),
            get_opt(&svcs, &names.headless, "service"),
            get_opt(&svcs, &names.base, "service"),
            get_opt(&pdbs, &names.base, "poddisruptionbudget"),
            pods.list(&lp)
                .map_err(|e| KubeError::client(format!("list pods {selector}"), e)),
            nodes
                .list(&all)
                .map_err(|e| KubeError::client("list nodes", e)),
        )?;
        let healthy_nodes = node_list
            .items
            .iter()
            .filter(|n| !parse::node_failed(n))
            .filter_map(|n| n.metadata.name.clone())
            .collect();
        Ok(Some(Live {
            sts,
            cm,
            headless,
            client_svc,
            pdb,
            pods: pod_list.items,
            healthy_nodes,
        }))
    }

    async fn observe_inner(&self, id: &ServiceId) -> Result<Option<ObservedState>, KubeError> {
        // Checked before reading the cache, which only moves forward.
        let from_cache = match self.cache().await {
            Some(hub) if self.cache_caught_up(hub, id).await => self.live_from_cache(id).await,
            _ => None,
        };
        let live = match from_cache {
            Some(live) => live,
            None => self.live_from_api(id).await?,
        };
        match live {
            Some(live) if owned_by(&live.sts, id) => observed_of(id, &live).map(Some),
            _ => Ok(None),
        }
    }

    async fn remove_inner(&self, id: &ServiceId) -> Result<(), KubeError> {
        let names = Names::of(id);
        let bg = DeleteParams::background();
        let stss: Api<StatefulSet> = self.api();
        let svcs: Api<Service> = self.api();
        let pdbs: Api<PodDisruptionBudget> = self.api();
        let hpas: Api<HorizontalPodAutoscaler> = self.api();
        let cms: Api<ConfigMap> = self.api();
        // Only objects that are br2k's for `id` are deleted: an object of the same
        // name that another writer or service holds stays.
        let ours = |m: Option<ObjectMeta>| m.is_some_and(|m| meta_owned_by(&m, id));
        let (sts, headless, client, pdb, hpa, cm) = futures::try_join!(
            meta_of(&stss, &names.base, "statefulset"),
            meta_of(&svcs, &names.headless, "service"),
            meta_of(&svcs, &names.base, "service"),
            meta_of(&pdbs, &names.base, "poddisruptionbudget"),
            meta_of(&hpas, &names.base, "autoscaler"),
            meta_of(&cms, &names.config, "configmap"),
        )?;
        let delete_if = |ours: bool, fut| async move { if ours { fut.await } else { Ok(()) } };
        // Everything is owned by the ConfigMap; deleting each object explicitly makes
        // the removal visible at once instead of after the garbage collector ran.
        futures::try_join!(
            delete_if(
                ours(sts),
                delete_opt(&stss, &names.base, &bg, "statefulset").boxed()
            ),
            delete_if(
                ours(headless),
                delete_opt(&svcs, &names.headless, &bg, "service").boxed()
            ),
            delete_if(
                ours(client),
                delete_opt(&svcs, &names.base, &bg, "service").boxed()
            ),
            delete_if(
                ours(pdb),
                delete_opt(&pdbs, &names.base, &bg, "poddisruptionbudget").boxed()
            ),
            delete_if(
                ours(hpa),
                delete_opt(&hpas, &names.base, &bg, "autoscaler").boxed()
            ),
        )?;
        if ours(cm) {
            delete_opt(&cms, &names.config, &bg, "configmap").await?;
        }
        self.note_written(id, Written::Removed);
        Ok(())
    }

    /// Waits until the watch cache shows the last write of `id` (usually one watch
    /// delivery, milliseconds); `false` after [`READ_YOUR_WRITES_WAIT`].
    async fn cache_caught_up(&self, hub: &WatchHub, id: &ServiceId) -> bool {
        if self.cache_shows_writes(hub, id) {
            return true;
        }
        let mut changes = hub.subscribe();
        let deadline = tokio::time::Instant::now() + READ_YOUR_WRITES_WAIT;
        loop {
            // Checked after subscribing, so no delivery between check and wait is lost;
            // deliveries for other services wake the loop too, and so does a short
            // tick (a watch may advance with objects no service owns).
            if self.cache_shows_writes(hub, id) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            let tick = tokio::time::Instant::now() + Duration::from_millis(10);
            let _ = tokio::time::timeout_at(tick.min(deadline), changes.recv()).await;
        }
    }

    fn note_written(&self, id: &ServiceId, written: Written) {
        self.inner
            .written
            .lock()
            .expect("written lock")
            .insert(id.clone(), (written, Instant::now()));
    }

    /// Whether the watch cache shows the last write of `id` (or there is none to wait
    /// for); forgets the write once it does. An applied object counts as shown once
    /// its kind's watch has delivered its written resource version (so also when it
    /// was changed or deleted again since); a removal once the StatefulSet is gone
    /// from the cache.
    fn cache_shows_writes(&self, hub: &WatchHub, id: &ServiceId) -> bool {
        let mut written = self.inner.written.lock().expect("written lock");
        let Some((w, at)) = written.get(id) else {
            return true;
        };
        let ns = self.namespace();
        let seen = at.elapsed() > READ_YOUR_WRITES_WINDOW
            || match w {
                Written::Applied(objects) => objects.iter().all(|(kind, name, rv)| {
                    let seen = match kind {
                        Kind::ConfigMap => &hub.seen_cms,
                        Kind::StatefulSet => &hub.seen_stss,
                        Kind::Service => &hub.seen_svcs,
                        Kind::PodDisruptionBudget => &hub.seen_pdbs,
                    };
                    // The cached object is looked up only when the written version is
                    // not a revision (this runs every few milliseconds while waiting).
                    let cached = || match kind {
                        Kind::ConfigMap => cached_version(&hub.cms, name, ns),
                        Kind::StatefulSet => cached_version(&hub.stss, name, ns),
                        Kind::Service => cached_version(&hub.svcs, name, ns),
                        Kind::PodDisruptionBudget => cached_version(&hub.pdbs, name, ns),
                    };
                    match rv {
                        Some(w) => match w.parse::<u64>() {
                            Ok(w) => seen.load(Ordering::Acquire) >= w,
                            // Not a revision: only the same version in the cache.
                            Err(_) => cached().is_some_and(|c| version_reached(&c, w)),
                        },
                        // No version returned: the object's presence must do.
                        None => cached().is_some(),
                    }
                }),
                Written::Removed => hub
                    .stss
                    .get(&ObjectRef::new(&Names::of(id).base).within(ns))
                    .is_none(),
            };
        if seen {
            written.remove(id);
        }
        seen
    }

    async fn replace_inner(&self, id: &ServiceId, replicas: &[String]) -> Result<(), KubeError> {
        let names = Names::of(id);
        let pods: Api<Pod> = self.api();
        // Failed replicas may sit on a lost node whose kubelet never confirms a
        // graceful deletion: delete at once so the StatefulSet recreates them.
        let dp = DeleteParams::default().grace_period(0);
        let deletions = replicas
            .iter()
            .filter(|name| parse::ordinal(&names.base, name).is_some())
            .map(|name| delete_opt(&pods, name, &dp, "pod"));
        futures::future::try_join_all(deletions).await?;
        Ok(())
    }

    async fn managed_inner(&self) -> Result<Vec<ServiceId>, KubeError> {
        let lp = ListParams::default().labels(MANAGED_SELECTOR);
        let stss: Api<StatefulSet> = self.api();
        let cms: Api<ConfigMap> = self.api();
        let (a, b) = futures::try_join!(
            stss.list_metadata(&lp)
                .map_err(|e| KubeError::client("list statefulsets", e)),
            cms.list_metadata(&lp)
                .map_err(|e| KubeError::client("list configmaps", e)),
        )?;
        let ids: BTreeSet<ServiceId> = a
            .items
            .iter()
            .map(|o| &o.metadata)
            .chain(b.items.iter().map(|o| &o.metadata))
            .filter_map(|m| m.labels.as_ref()?.get(LABEL_SERVICE_ID))
            .filter_map(|v| ServiceId::new(v).ok())
            .collect();
        Ok(ids.into_iter().collect())
    }

    async fn hub(&self) -> &WatchHub {
        self.inner
            .hub
            .get_or_init(|| async {
                WatchHub::start(
                    self.inner.client.clone(),
                    &self.inner.namespace,
                    self.inner.guard_pods,
                )
            })
            .await
    }
}

/// How long the first `observe` waits for the watch cache to sync before falling
/// back to reading the API server.
const CACHE_SYNC_WAIT: Duration = Duration::from_secs(15);

/// The live objects of one service.
struct Live {
    sts: StatefulSet,
    cm: Option<ConfigMap>,
    headless: Option<Service>,
    client_svc: Option<Service>,
    pdb: Option<PodDisruptionBudget>,
    pods: Vec<Pod>,
    healthy_nodes: BTreeSet<String>,
}

/// Recomputes what matters from the live objects (never from annotations alone).
fn observed_of(id: &ServiceId, live: &Live) -> Result<ObservedState, KubeError> {
    let names = Names::of(id);
    let template = parse::template_of(&live.sts, live.cm.as_ref())?;
    // A service without ports has no client Service (Kubernetes requires ports for
    // one); the headless Service needs none.
    let wants_client_service = !template.ports.is_empty();
    let mut missing_parts = Vec::new();
    for (part, present) in [
        ("config", live.cm.as_ref().is_some_and(|o| owned_by(o, id))),
        (
            "headless-service",
            live.headless.as_ref().is_some_and(|o| owned_by(o, id)),
        ),
        (
            "service",
            !wants_client_service || live.client_svc.as_ref().is_some_and(|o| owned_by(o, id)),
        ),
        (
            "disruption-budget",
            live.pdb.as_ref().is_some_and(|o| owned_by(o, id)),
        ),
    ] {
        if !present {
            missing_parts.push(part.to_owned());
        }
    }

    let desired = parse::sts_replicas(&live.sts);
    let mut foreign_fields = ownership::foreign_fields("statefulset", &live.sts.metadata);
    let parts = [
        ("configmap", live.cm.as_ref().map(|o| &o.metadata)),
        ("service", live.headless.as_ref().map(|o| &o.metadata)),
        ("service", live.client_svc.as_ref().map(|o| &o.metadata)),
        (
            "poddisruptionbudget",
            live.pdb.as_ref().map(|o| &o.metadata),
        ),
    ];
    for (kind, meta) in parts {
        if let Some(m) = meta.filter(|m| meta_owned_by(m, id)) {
            foreign_fields.extend(ownership::foreign_fields(kind, m));
        }
    }
    // A hardening field another writer removed leaves no foreign owner in
    // managedFields: compare the live template with what br2k sets.
    if let Some(pod) = live
        .sts
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
    {
        foreign_fields.extend(crate::build::hardening_gaps(pod).into_iter().map(|f| {
            format!(
                "statefulset/{}: spec.template.spec.{f} (missing)",
                names.base
            )
        }));
    }

    let failed_nodes: BTreeSet<String> = live
        .pods
        .iter()
        .filter_map(|p| p.spec.as_ref().and_then(|s| s.node_name.clone()))
        .filter(|n| !live.healthy_nodes.contains(n))
        .collect();

    let mut by_ordinal: BTreeMap<u32, ObservedReplica> = BTreeMap::new();
    for pod in &live.pods {
        let Some(name) = pod.metadata.name.as_deref() else {
            continue;
        };
        match parse::ordinal(&names.base, name) {
            Some(i) if i < desired => {
                by_ordinal.insert(i, parse::replica_of(pod, &failed_nodes));
            }
            _ => {}
        }
    }
    let replicas: Vec<ObservedReplica> = (0..desired)
        .map(|i| {
            by_ordinal.remove(&i).unwrap_or_else(|| ObservedReplica {
                // Not created (yet): counts as not ready.
                name: format!("{}-{i}", names.base),
                image_digest: None,
                ready: false,
                failed: false,
            })
        })
        .collect();
    let ready_replicas = replicas.iter().filter(|r| r.ready && !r.failed).count() as u32;
    let applied_version = live
        .sts
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_RECORD_VERSION))
        .and_then(|v| v.parse().ok());
    Ok(ObservedState {
        id: id.clone(),
        applied_version,
        desired_replicas: desired,
        ready_replicas,
        template,
        replicas,
        missing_parts,
        foreign_fields,
    })
}

/// Whether a live object carries the service-id label of `id` (objects of the same
/// name not made by br2k for this service are ignored).
fn owned_by<K: Resource>(obj: &K, id: &ServiceId) -> bool {
    meta_owned_by(obj.meta(), id)
}

/// [`owned_by`] on an object's metadata.
fn meta_owned_by(meta: &ObjectMeta, id: &ServiceId) -> bool {
    meta.labels
        .as_ref()
        .and_then(|l| l.get(LABEL_SERVICE_ID))
        .is_some_and(|v| v == id.as_str())
}

#[async_trait]
impl Replicator for KubeReplicator {
    async fn apply(&self, record: &ServiceRecord) -> Result<()> {
        self.apply_inner(record).await.map_err(to_core)
    }

    async fn observe(&self, id: &ServiceId) -> Result<Option<ObservedState>> {
        self.observe_inner(id).await.map_err(to_core)
    }

    async fn remove(&self, id: &ServiceId) -> Result<()> {
        self.remove_inner(id).await.map_err(to_core)
    }

    async fn replace_replicas(&self, id: &ServiceId, replicas: &[String]) -> Result<()> {
        self.replace_inner(id, replicas).await.map_err(to_core)
    }

    async fn managed(&self) -> Result<Vec<ServiceId>> {
        self.managed_inner().await.map_err(to_core)
    }

    async fn changes(&self) -> Result<BoxStream<'static, ServiceId>> {
        let rx = self.hub().await.subscribe();
        Ok(BroadcastStream::new(rx)
            .filter_map(|item| async move { item.ok() })
            .boxed())
    }
}

#[cfg(test)]
mod tests {
    use super::version_reached;

    #[test]
    fn resource_versions_compare_as_revisions_when_they_are_numbers() {
        assert!(version_reached("120", "120"));
        assert!(version_reached("121", "120"));
        assert!(!version_reached("119", "120"));
        assert!(version_reached("1000", "999"), "numeric, not lexical");
        assert!(version_reached("opaque-a", "opaque-a"));
        assert!(!version_reached("opaque-b", "opaque-a"));
        assert!(!version_reached("12", "opaque"));
    }
}
