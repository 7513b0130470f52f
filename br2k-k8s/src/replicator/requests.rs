//! The API server requests of [`KubeReplicator`](super::KubeReplicator): get, apply
//! (server-side, under the field manager `br2k`), delete and the take-over of fields
//! other writers set. Each failure becomes a [`KubeError`] naming what br2k was doing.

use std::fmt;

use br2k_core::ServiceId;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Resource;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{KubeError, is_conflict, is_not_found};
use crate::names::MANAGER;
use crate::ownership;
use crate::parse::meta_owned_by;

pub(super) fn apply_params() -> PatchParams {
    PatchParams::apply(MANAGER).force()
}

pub(super) async fn get_opt<K>(api: &Api<K>, name: &str, what: &str) -> Result<Option<K>, KubeError>
where
    K: Resource + Clone + DeserializeOwned + fmt::Debug,
{
    api.get_opt(name)
        .await
        .map_err(|e| KubeError::client(format!("get {what} {name}"), e))
}

pub(super) async fn apply_obj<K>(
    api: &Api<K>,
    name: &str,
    obj: &K,
    what: &str,
) -> Result<K, KubeError>
where
    K: Resource + Clone + DeserializeOwned + Serialize + fmt::Debug,
{
    api.patch(name, &apply_params(), &Patch::Apply(obj))
        .await
        .map_err(|e| KubeError::client(format!("apply {what} {name}"), e))
}

pub(super) async fn delete_opt<K>(
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

/// Deletes object `name` when `meta` (its metadata as read, `None`: absent) shows it is
/// br2k's for service `id`: an object of that name another writer or service holds
/// stays.
pub(super) async fn delete_if_ours<K>(
    api: &Api<K>,
    name: &str,
    meta: Option<ObjectMeta>,
    id: &ServiceId,
    params: &DeleteParams,
    what: &str,
) -> Result<(), KubeError>
where
    K: Resource + Clone + DeserializeOwned + fmt::Debug,
{
    match meta {
        Some(m) if meta_owned_by(&m, id) => delete_opt(api, name, params, what).await,
        _ => Ok(()),
    }
}

/// The metadata of object `name`, if it exists.
pub(super) async fn meta_of<K>(
    api: &Api<K>,
    name: &str,
    what: &str,
) -> Result<Option<ObjectMeta>, KubeError>
where
    K: Resource + Clone + DeserializeOwned + fmt::Debug,
{
    Ok(get_opt(api, name, what).await?.map(|o| o.meta().clone()))
}

/// When `check` is set: reads object `name` and, if other writers set fields on it,
/// makes br2k their owner ([`ownership::take_over`]), conditional on the version
/// read (read again and retried when the object changed meanwhile, e.g. its status).
pub(super) async fn release_foreign<K>(
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
