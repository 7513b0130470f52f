//! Installing the operator's manifests (`deploy/crd.yaml`, `deploy/rbac.yaml`) with
//! server-side apply, as `kubectl apply --server-side` would.

use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use serde::Deserialize;

/// Server-side applies every document of a multi-document YAML text under field
/// manager `manager` (forcing conflicts). Empty documents are skipped.
pub async fn apply(client: &Client, text: &str, manager: &str) -> Result<(), String> {
    for doc in serde_yaml::Deserializer::from_str(text) {
        let v = serde_json::Value::deserialize(doc).map_err(|e| format!("yaml: {e}"))?;
        if v.is_null() {
            continue;
        }
        let obj: DynamicObject =
            serde_json::from_value(v.clone()).map_err(|e| format!("object: {e}"))?;
        let types = obj
            .types
            .clone()
            .ok_or("a document without apiVersion/kind")?;
        let (group, version) = match types.api_version.split_once('/') {
            Some((g, v)) => (g.to_owned(), v.to_owned()),
            None => (String::new(), types.api_version.clone()),
        };
        let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(&group, &version, &types.kind));
        let api: Api<DynamicObject> = match &obj.metadata.namespace {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
            None => Api::all_with(client.clone(), &ar),
        };
        let name = obj
            .metadata
            .name
            .clone()
            .ok_or("a document without a name")?;
        api.patch(
            &name,
            &PatchParams::apply(manager).force(),
            &Patch::Apply(&v),
        )
        .await
        .map_err(|e| format!("apply {} {name}: {e}", types.kind))?;
    }
    Ok(())
}
