//! [`KubeReplicator`]: runs service records as StatefulSets on Kubernetes.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use br2k_core::{Error, ObservedState, Replicator, Result, ServiceId, ServiceRecord};
use futures::stream::BoxStream;
use futures::{StreamExt, TryFutureExt};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service, Toleration};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, ListParams};
use kube::{Client, Resource};
use tokio::sync::OnceCell;
use tokio_stream::wrappers::BroadcastStream;

use crate::build::Placement;
use crate::error::KubeError;
use crate::names::{LABEL_SERVICE_ID, MANAGED_SELECTOR, Names};
use crate::parse;
use crate::watch::WatchHub;

mod apply;
mod observe;
mod read_your_writes;
mod requests;

use read_your_writes::{Writes, Written};
use requests::{delete_if_ours, delete_opt, meta_of};

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
    written: Writes,
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
                written: Writes::default(),
            }),
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
            .map_err(|e| Error::from(KubeError::Config(e.to_string())))?;
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

    async fn remove_inner(&self, id: &ServiceId) -> Result<(), KubeError> {
        let names = Names::of(id);
        let bg = DeleteParams::background();
        let stss: Api<StatefulSet> = self.api();
        let svcs: Api<Service> = self.api();
        let pdbs: Api<PodDisruptionBudget> = self.api();
        let hpas: Api<HorizontalPodAutoscaler> = self.api();
        let cms: Api<ConfigMap> = self.api();
        let (sts, headless, client, pdb, hpa, cm) = futures::try_join!(
            meta_of(&stss, &names.base, "statefulset"),
            meta_of(&svcs, &names.headless, "service"),
            meta_of(&svcs, &names.base, "service"),
            meta_of(&pdbs, &names.base, "poddisruptionbudget"),
            meta_of(&hpas, &names.base, "autoscaler"),
            meta_of(&cms, &names.config, "configmap"),
        )?;
        // Everything is owned by the ConfigMap; deleting each object explicitly makes
        // the removal visible at once instead of after the garbage collector ran.
        futures::try_join!(
            delete_if_ours(&stss, &names.base, sts, id, &bg, "statefulset"),
            delete_if_ours(&svcs, &names.headless, headless, id, &bg, "service"),
            delete_if_ours(&svcs, &names.base, client, id, &bg, "service"),
            delete_if_ours(&pdbs, &names.base, pdb, id, &bg, "poddisruptionbudget"),
            delete_if_ours(&hpas, &names.base, hpa, id, &bg, "autoscaler"),
        )?;
        delete_if_ours(&cms, &names.config, cm, id, &bg, "configmap").await?;
        self.inner.written.note(id, Written::Removed);
        Ok(())
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

#[async_trait]
impl Replicator for KubeReplicator {
    async fn apply(&self, record: &ServiceRecord) -> Result<()> {
        self.apply_inner(record).await.map_err(Error::from)
    }

    async fn observe(&self, id: &ServiceId) -> Result<Option<ObservedState>> {
        self.observe_inner(id).await.map_err(Error::from)
    }

    async fn remove(&self, id: &ServiceId) -> Result<()> {
        self.remove_inner(id).await.map_err(Error::from)
    }

    async fn replace_replicas(&self, id: &ServiceId, replicas: &[String]) -> Result<()> {
        self.replace_inner(id, replicas).await.map_err(Error::from)
    }

    async fn managed(&self) -> Result<Vec<ServiceId>> {
        self.managed_inner().await.map_err(Error::from)
    }

    async fn changes(&self) -> Result<BoxStream<'static, ServiceId>> {
        let rx = self.hub().await.subscribe();
        Ok(BroadcastStream::new(rx)
            .filter_map(|item| async move { item.ok() })
            .boxed())
    }
}
