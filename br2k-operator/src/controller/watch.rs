//! The watches: which changes wake which `Br2kService`, and the kube-runtime
//! controllers that run [`reconcile`](super::reconcile).

use std::sync::Arc;

use br2k_k8s::names::{LABEL_SERVICE_ID, MANAGED_SELECTOR};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Service};
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::controller::Controller;
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::watcher::{self, watcher};
use kube::{Client, Resource};

use super::{Context, Index, error_policy, reconcile};
use crate::crd::Br2kService;

/// Maps a workload object to the resource managing it (by namespace and service id
/// label); with `only`, only resources of that namespace.
fn mapper<K: Resource>(
    index: Index,
    only: Option<String>,
) -> impl Fn(K) -> Option<ObjectRef<Br2kService>> + Clone {
    move |obj: K| {
        let ns = obj.meta().namespace.clone()?;
        let id = obj.meta().labels.as_ref()?.get(LABEL_SERVICE_ID)?.clone();
        let found = index.lock().get(&(ns, id)).cloned()?;
        match &only {
            Some(n) if found.namespace.as_deref() != Some(n.as_str()) => None,
            _ => Some(found),
        }
    }
}

/// Hash of what should wake a resource: its generation, whether it is being deleted,
/// and its finalizers.
fn spec_or_lifecycle(obj: &Br2kService) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    obj.metadata.generation.hash(&mut h);
    obj.metadata.deletion_timestamp.is_some().hash(&mut h);
    obj.metadata.finalizers.hash(&mut h);
    Some(h.finish())
}

/// Runs the controller until `shutdown` completes: `Br2kService`s in every
/// namespace of the context's [`Scope`](super::Scope) (all when it lists none), woken
/// by changes to the workloads they manage (StatefulSets, Pods, Services and
/// ConfigMaps labelled `app.kubernetes.io/managed-by=br2k`). With a list of
/// namespaces, one controller per namespace runs, and every watch is namespaced.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    use futures::FutureExt;
    let boxed: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + Sync>> =
        Box::pin(shutdown);
    let shutdown = boxed.shared();
    if ctx.scope.watch_namespaces.is_empty() {
        run_in(ctx, None, shutdown).await;
    } else {
        let runs = ctx
            .scope
            .watch_namespaces
            .clone()
            .into_iter()
            .map(|ns| run_in(ctx.clone(), Some(ns), shutdown.clone()));
        futures::future::join_all(runs).await;
    }
}

/// A stream of the managed objects of kind `K` in `namespaces` (all when `None`).
fn managed_objects<K>(
    client: &Client,
    namespaces: Option<&[String]>,
) -> impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
    K::DynamicType: Default,
{
    let cfg = || watcher::Config::default().labels(MANAGED_SELECTOR);
    let apis: Vec<Api<K>> = match namespaces {
        None => vec![Api::all(client.clone())],
        Some(list) => list
            .iter()
            .map(|n| Api::namespaced(client.clone(), n))
            .collect(),
    };
    futures::stream::select_all(apis.into_iter().map(|api| {
        watcher(api, cfg())
            .default_backoff()
            .touched_objects()
            .boxed()
    }))
}

/// One controller: the resources of namespace `only` (every namespace when `None`).
async fn run_in(
    ctx: Arc<Context>,
    only: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let index = ctx.index.clone();
    let workload_ns = only.as_deref().map(|n| ctx.scope.workload_namespaces(n));
    let workload_ns = workload_ns.as_deref();
    let api = match &only {
        Some(n) => Api::<Br2kService>::namespaced(client.clone(), n),
        None => Api::<Br2kService>::all(client.clone()),
    };
    // Status writes (the operator's own) do not wake a resource: only a new
    // generation, deletion or finalizer change does.
    let (reader, writer) = reflector::store();
    let resources = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(spec_or_lifecycle, Default::default());
    let wakes = match ctx.failover.get() {
        Some(f) => f.wakes().boxed(),
        None => futures::stream::pending().boxed(),
    };
    Controller::for_stream(resources, reader)
        // A changed placement decision (a failover) reconciles every resource.
        .reconcile_all_on(wakes)
        .watches_stream(
            managed_objects::<StatefulSet>(&client, workload_ns),
            mapper(index.clone(), only.clone()),
        )
        .watches_stream(
            managed_objects::<Pod>(&client, workload_ns),
            mapper(index.clone(), only.clone()),
        )
        .watches_stream(
            managed_objects::<Service>(&client, workload_ns),
            mapper(index.clone(), only.clone()),
        )
        .watches_stream(
            managed_objects::<ConfigMap>(&client, workload_ns),
            mapper(index, only),
        )
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "reconcile error");
            }
        })
        .await;
}
