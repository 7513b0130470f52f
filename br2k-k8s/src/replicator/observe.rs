//! `observe` of [`KubeReplicator`]: the live objects of a service from the watch cache
//! (once it shows this replicator's own last write) or from the API server, rebuilt
//! into an [`ObservedState`] by [`crate::parse`].

use br2k_core::{ObservedState, ServiceId};
use futures::TryFutureExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, ListParams};

use super::KubeReplicator;
use super::requests::get_opt;
use crate::error::KubeError;
use crate::names::{Names, selector_string};
use crate::parse::{self, Live, owned_by};
use crate::watch::cached;

impl KubeReplicator {
    /// The live objects of `id` from the shared watch cache, or `None` when the cache
    /// is not usable (its watches did not sync, e.g. for lack of RBAC).
    async fn live_from_cache(&self, id: &ServiceId) -> Option<Option<Live>> {
        let hub = self.cache().await?;
        let ns = self.namespace();
        let names = Names::of(id);
        let Some(sts) = cached(&hub.stss, &names.base, ns) else {
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
        let svc = |name: &str| cached(&hub.svcs, name, ns).map(|o| (*o).clone());
        Some(Some(Live {
            sts: (*sts).clone(),
            cm: cached(&hub.cms, &names.config, ns).map(|o| (*o).clone()),
            headless: svc(&names.headless),
            client_svc: svc(&names.base),
            pdb: cached(&hub.pdbs, &names.base, ns).map(|o| (*o).clone()),
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

    pub(super) async fn observe_inner(
        &self,
        id: &ServiceId,
    ) -> Result<Option<ObservedState>, KubeError> {
        // Checked before reading the cache, which only moves forward.
        let from_cache = match self.cache().await {
            Some(hub)
                if self
                    .inner
                    .written
                    .caught_up(hub, self.namespace(), id)
                    .await =>
            {
                self.live_from_cache(id).await
            }
            _ => None,
        };
        let live = match from_cache {
            Some(live) => live,
            None => self.live_from_api(id).await?,
        };
        match live {
            Some(live) if owned_by(&live.sts, id) => Ok(Some(parse::observed_of(id, &live)?)),
            _ => Ok(None),
        }
    }
}
