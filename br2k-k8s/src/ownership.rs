//! Fields set by other writers, from an object's `managedFields` (pure functions).
//!
//! Server-side apply removes a field only when the applying manager owned it and
//! no longer applies it: fields added by another field manager (`kubectl patch`,
//! `kubectl edit`, another controller) survive every apply. br2k treats them as drift:
//! [`foreign_fields`] lists them, and [`take_over`] moves their ownership to br2k's
//! own apply entry, so that br2k's next apply, which does not contain them, removes
//! them (the approach Flux uses for the same problem).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry, ObjectMeta};
use serde_json::{Map, Value};

use crate::names::MANAGER;

/// Field managers that are br2k itself: the apply manager and the one that freezes a
/// StatefulSet's partition after a roll.
pub const OWN_MANAGERS: &[&str] = &[MANAGER, "br2k-freeze"];

/// Control-plane managers whose writes to a main resource are not drift.
const SYSTEM_MANAGERS: &[&str] = &["kube-controller-manager", "kube-scheduler", "kubelet"];

/// Whether `entry` records fields set by someone other than br2k on the object itself
/// (writes through a subresource such as `status` or `scale` are not: the status is
/// not br2k's, and a changed replica count is compared separately).
pub fn is_foreign(entry: &ManagedFieldsEntry) -> bool {
    let manager = entry.manager.as_deref().unwrap_or_default();
    entry.subresource.as_deref().unwrap_or_default().is_empty()
        && !OWN_MANAGERS.contains(&manager)
        && !SYSTEM_MANAGERS.contains(&manager)
        && entry
            .fields_v1
            .as_ref()
            .is_some_and(|f| !leaves(&f.0).is_empty())
}

/// The fields of `meta`'s object set by other writers, each as `kind/name: path (by
/// manager)`, e.g. `statefulset/app: spec.template.metadata.labels.x (by
/// kubectl-patch)`.
pub fn foreign_fields(kind: &str, meta: &ObjectMeta) -> Vec<String> {
    let name = meta.name.as_deref().unwrap_or_default();
    let mut out = Vec::new();
    for entry in meta
        .managed_fields
        .iter()
        .flatten()
        .filter(|e| is_foreign(e))
    {
        let manager = entry.manager.as_deref().unwrap_or("unknown");
        if let Some(f) = &entry.fields_v1 {
            for path in leaves(&f.0) {
                out.push(format!("{kind}/{name}: {path} (by {manager})"));
            }
        }
    }
    out
}

/// The managed fields to write so that br2k owns every field other writers set:
/// their entries are merged into br2k's apply entry and dropped. `None` when there is
/// nothing foreign or br2k has no apply entry to merge into.
pub fn take_over(meta: &ObjectMeta) -> Option<Vec<ManagedFieldsEntry>> {
    let entries = meta.managed_fields.as_ref()?;
    if !entries.iter().any(is_foreign) {
        return None;
    }
    let ours = entries.iter().position(|e| {
        e.manager.as_deref() == Some(MANAGER)
            && e.operation.as_deref() == Some("Apply")
            && e.subresource.as_deref().unwrap_or_default().is_empty()
    })?;
    let mut merged = entries[ours]
        .fields_v1
        .as_ref()
        .map_or_else(|| Value::Object(Map::new()), |f| f.0.clone());
    for e in entries.iter().filter(|e| is_foreign(e)) {
        if let Some(f) = &e.fields_v1 {
            merge(&mut merged, &f.0);
        }
    }
    let mut out = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        if i == ours {
            let mut e = e.clone();
            e.fields_v1 = Some(FieldsV1(merged.clone()));
            out.push(e);
        } else if !is_foreign(e) {
            out.push(e.clone());
        }
    }
    Some(out)
}

/// Deep union of two `fieldsV1` trees.
fn merge(into: &mut Value, from: &Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                match a.get_mut(k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        a.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (slot, from) => *slot = from.clone(),
    }
}

/// The leaf paths of a `fieldsV1` tree, readable: `f:spec` → `spec`, `k:{"name":"x"}`
/// → `[name=x]`, `v:"a"` → `[="a"]`; the `.` markers (the item itself) are skipped
/// unless the item has nothing else.
fn leaves(tree: &Value) -> Vec<String> {
    fn walk(v: &Value, prefix: &str, out: &mut Vec<String>) {
        let Value::Object(map) = v else { return };
        let children: Vec<(&String, &Value)> = map.iter().filter(|(k, _)| *k != ".").collect();
        if children.is_empty() {
            if !prefix.is_empty() {
                out.push(prefix.to_owned());
            }
            return;
        }
        for (k, child) in children {
            let part = if let Some(f) = k.strip_prefix("f:") {
                if prefix.is_empty() {
                    f.to_owned()
                } else {
                    format!("{prefix}.{f}")
                }
            } else if let Some(key) = k.strip_prefix("k:") {
                let key = serde_json::from_str::<Map<String, Value>>(key)
                    .map(|m| {
                        m.iter()
                            .map(|(k, v)| match v {
                                Value::String(s) => format!("{k}={s}"),
                                other => format!("{k}={other}"),
                            })
                            .collect::<Vec<_>>()
                            .join(",")
                    })
                    .unwrap_or_else(|_| key.to_owned());
                format!("{prefix}[{key}]")
            } else if let Some(val) = k.strip_prefix("v:") {
                format!("{prefix}[={val}]")
            } else {
                format!("{prefix}.{k}")
            };
            walk(child, &part, out);
        }
    }
    let mut out = Vec::new();
    walk(tree, "", &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry(manager: &str, op: &str, sub: Option<&str>, fields: Value) -> ManagedFieldsEntry {
        ManagedFieldsEntry {
            manager: Some(manager.into()),
            operation: Some(op.into()),
            subresource: sub.map(Into::into),
            api_version: Some("apps/v1".into()),
            fields_type: Some("FieldsV1".into()),
            fields_v1: Some(FieldsV1(fields)),
            time: None,
        }
    }

    fn meta(entries: Vec<ManagedFieldsEntry>) -> ObjectMeta {
        ObjectMeta {
            name: Some("app".into()),
            managed_fields: Some(entries),
            ..ObjectMeta::default()
        }
    }

    fn ours() -> ManagedFieldsEntry {
        entry(
            MANAGER,
            "Apply",
            None,
            json!({"f:spec": {"f:replicas": {}, "f:template": {"f:metadata": {"f:labels": {"f:app": {}}}}}}),
        )
    }

    fn patched_env() -> ManagedFieldsEntry {
        entry(
            "kubectl-patch",
            "Update",
            None,
            json!({"f:spec": {"f:template": {"f:spec": {"f:containers": {
                "k:{\"name\":\"app\"}": {"f:env": {".": {}, "k:{\"name\":\"EXTRA\"}": {".": {}, "f:name": {}, "f:value": {}}}}
            }}}}}),
        )
    }

    #[test]
    fn only_other_writers_of_the_object_itself_are_foreign() {
        let status = entry(
            "kube-controller-manager",
            "Update",
            Some("status"),
            json!({"f:status": {"f:replicas": {}}}),
        );
        let scale = entry(
            "kubectl",
            "Update",
            Some("scale"),
            json!({"f:spec": {"f:replicas": {}}}),
        );
        let freeze = entry(
            "br2k-freeze",
            "Update",
            None,
            json!({"f:spec": {"f:updateStrategy": {}}}),
        );
        let m = meta(vec![ours(), status, scale, freeze]);
        assert!(foreign_fields("statefulset", &m).is_empty());
        assert_eq!(take_over(&m), None);

        let m = meta(vec![ours(), patched_env()]);
        assert_eq!(
            foreign_fields("statefulset", &m),
            [
                "statefulset/app: spec.template.spec.containers[name=app].env[name=EXTRA].name (by kubectl-patch)",
                "statefulset/app: spec.template.spec.containers[name=app].env[name=EXTRA].value (by kubectl-patch)",
            ]
        );
    }

    #[test]
    fn take_over_merges_foreign_fields_into_our_apply_entry() {
        let label = entry(
            "kubectl-edit",
            "Update",
            None,
            json!({"f:spec": {"f:template": {"f:metadata": {"f:labels": {"f:extra": {}}}}}}),
        );
        let status = entry(
            "kube-controller-manager",
            "Update",
            Some("status"),
            json!({"f:status": {}}),
        );
        let m = meta(vec![ours(), patched_env(), label, status.clone()]);
        let out = take_over(&m).expect("foreign fields to take over");
        assert_eq!(out.len(), 2, "foreign entries dropped, others kept");
        assert_eq!(out[1], status);
        let fields = &out[0].fields_v1.as_ref().unwrap().0;
        let labels = &fields["f:spec"]["f:template"]["f:metadata"]["f:labels"];
        assert!(labels.get("f:app").is_some() && labels.get("f:extra").is_some());
        assert!(
            fields["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"app\"}"]["f:env"]
                .get("k:{\"name\":\"EXTRA\"}")
                .is_some()
        );
        assert!(foreign_fields("statefulset", &meta(out)).is_empty());
    }

    #[test]
    fn nothing_to_merge_into_without_our_apply_entry() {
        assert_eq!(take_over(&meta(vec![patched_env()])), None);
    }
}
