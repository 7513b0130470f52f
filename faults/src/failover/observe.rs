//! What the trials observe, each read independently: the chain's placement, the
//! clusters' StatefulSets, pods, control planes and statuses, the replicas' leaders.

use br2k_core::Registry;
use br2k_operator::crd::Br2kService;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use serde_json::Value;

use super::member::Member;
use super::rig::{REPLICAS, Rig};
use crate::ledger::Client;

impl Rig {
    /// The placement recorded on chain: (cluster, epoch).
    pub async fn placed(&self) -> Result<(String, u64), String> {
        let r = self
            .chain
            .active(&self.id)
            .await
            .map_err(|e| e.to_string())?;
        let p = r.placement.ok_or("no placement on chain yet")?;
        Ok((p.cluster, p.epoch))
    }

    /// Whether every replica is Ready in `m`, read from its API server: the
    /// StatefulSet asks for all of them and its controller saw that spec, and as
    /// many pods of the service are Ready and not being deleted (a StatefulSet's
    /// status alone may be stale while its controller restarts).
    pub async fn ready_replicas(&self, m: &Member) -> Result<(), String> {
        let s = self.statefulset(m).await?;
        let spec = s.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
        let observed = s.status.as_ref().and_then(|s| s.observed_generation);
        if spec != REPLICAS as i32 || observed < s.metadata.generation {
            return Err(format!("{}: spec {spec}, observed {observed:?}", m.name));
        }
        let ready = self.ready_pods(m).await?.len();
        if ready == REPLICAS {
            Ok(())
        } else {
            Err(format!("{}: {ready}/{REPLICAS} pods ready", m.name))
        }
    }

    /// The ordinals of the service's pods in `m` that are Ready and not being
    /// deleted.
    pub(super) async fn ready_pods(&self, m: &Member) -> Result<Vec<usize>, String> {
        let base = br2k_k8s::names::Names::of(&self.id).base;
        let pods = Api::<Pod>::namespaced(m.client.clone(), &self.ns)
            .list(&ListParams::default().labels(&format!(
                "{}={}",
                br2k_k8s::names::LABEL_SERVICE_ID,
                self.id
            )))
            .await
            .map_err(|e| format!("{}: pods: {e}", m.name))?;
        let mut ready = Vec::new();
        for p in &pods.items {
            let name = p.metadata.name.clone().unwrap_or_default();
            let ordinal = name
                .strip_prefix(&format!("{base}-"))
                .and_then(|o| o.parse::<usize>().ok());
            let is_ready = p
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            if let Some(o) = ordinal
                && o < REPLICAS
                && is_ready
                && p.metadata.deletion_timestamp.is_none()
            {
                ready.push(o);
            }
        }
        Ok(ready)
    }

    /// Whether the control plane of `m` works again after its API server returned:
    /// the controller manager and the scheduler renewed their leases in the last 3 s
    /// (after an API-server restart they may wait out their old lease, 15 s, before
    /// they act again, as on any cluster).
    pub async fn control_plane_ready(&self, m: &Member) -> Result<(), String> {
        use k8s_openapi::api::coordination::v1::Lease;
        let leases: Api<Lease> = Api::namespaced(m.client.clone(), "kube-system");
        for name in ["kube-controller-manager", "kube-scheduler"] {
            let l = leases.get(name).await.map_err(|e| format!("{name}: {e}"))?;
            let renewed = l
                .spec
                .and_then(|s| s.renew_time)
                .ok_or_else(|| format!("{name}: never renewed"))?;
            let age = k8s_openapi::jiff::Timestamp::now().duration_since(renewed.0);
            if age > k8s_openapi::jiff::SignedDuration::from_secs(3) {
                return Err(format!("{}: {name} renewed {age:?} ago", m.name));
            }
        }
        Ok(())
    }

    /// The StatefulSet of the service in `m`.
    pub async fn statefulset(&self, m: &Member) -> Result<StatefulSet, String> {
        let name = br2k_k8s::names::Names::of(&self.id).base;
        Api::<StatefulSet>::namespaced(m.client.clone(), &self.ns)
            .get(&name)
            .await
            .map_err(|e| format!("{}: statefulset: {e}", m.name))
    }

    /// The placement status the operator of `m` wrote on its resource.
    pub async fn placement_status(&self, m: &Member) -> Result<Value, String> {
        let cr = Api::<Br2kService>::namespaced(m.client.clone(), &self.ns)
            .get("ledger")
            .await
            .map_err(|e| e.to_string())?;
        let s = serde_json::to_value(cr.status).map_err(|e| e.to_string())?;
        Ok(s["placement"].clone())
    }

    /// The URL of a replica of `m` that says it leads.
    pub async fn leader_in(&self, m: &Member) -> Result<String, String> {
        let c = Client::new(m.urls());
        match c.leader().await {
            Some(i) => Ok(m.urls()[i].clone()),
            None => Err(format!("no leader in {}", m.name)),
        }
    }
}
