//! Entry points of the fuzz target `k8s_live` (`fuzz/`, cargo feature `fuzzing`): the
//! JSON of live objects as the API server answers it (anyone with write access to the
//! namespace shapes it), deserialized into the k8s-openapi types the kube client
//! uses and read by [`crate::parse`].

use std::collections::BTreeSet;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod};

use crate::parse;

/// The separator of the StatefulSet and its ConfigMap in a [`live_object`] input.
pub const SEPARATOR: u8 = 0xff;

/// `data[0]` picks the kind: a StatefulSet (and, after [`SEPARATOR`], the ConfigMap
/// its environment refers to), a Pod, a Node, or quantities and an image id.
pub fn live_object(data: &[u8]) {
    let Some((&which, json)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => {
            let (sts, cm) = match json.iter().position(|b| *b == SEPARATOR) {
                Some(i) => (&json[..i], Some(&json[i + 1..])),
                None => (json, None),
            };
            let Ok(sts) = serde_json::from_slice::<StatefulSet>(sts) else {
                return;
            };
            let cm = cm.and_then(|c| serde_json::from_slice::<ConfigMap>(c).ok());
            let _ = parse::sts_replicas(&sts);
            let _ = parse::template_of(&sts, cm.as_ref());
            if let Some(name) = &sts.metadata.name {
                let _ = parse::ordinal(name, &format!("{name}-0"));
            }
        }
        1 => {
            let Ok(pod) = serde_json::from_slice::<Pod>(json) else {
                return;
            };
            let failed: BTreeSet<String> = pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .into_iter()
                .collect();
            let _ = parse::replica_of(&pod, &BTreeSet::new());
            let r = parse::replica_of(&pod, &failed);
            assert!(!(r.ready && r.failed), "a failed replica is never ready");
            if let Some(spec) = &pod.spec {
                let _ = parse::template_of_pod(spec, None);
            }
        }
        2 => {
            if let Ok(node) = serde_json::from_slice::<Node>(json) {
                let _ = parse::node_failed(&node);
            }
        }
        _ => {
            let text = String::from_utf8_lossy(json);
            let _ = parse::parse_cpu_millis(&text);
            let _ = parse::parse_memory_mib(&text);
            let _ = parse::digest_in_image_id(&text);
        }
    }
}

/// Real inputs of [`live_object`]: a StatefulSet as br2k applies it with its
/// ConfigMap, a running and a crash-looping Pod, a NotReady Node, quantities.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let digest = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    let container = serde_json::json!({
        "name": crate::names::CONTAINER,
        "image": format!("registry.example/ledger@{digest}"),
        "args": ["--port", "8080"],
        "env": [
            {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "ledger-env", "key": "MODE"}}},
            {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "ledger-keys", "key": "key"}}}
        ],
        "ports": [{"name": "http", "containerPort": 8080}],
        "resources": {"requests": {"cpu": "250m", "memory": "64Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
        "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 5},
        "livenessProbe": {"tcpSocket": {"port": 8080}, "failureThreshold": 3}
    });
    let sts = serde_json::json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": "ledger", "namespace": "default"},
        "spec": {
            "replicas": 3, "serviceName": "ledger",
            "selector": {"matchLabels": {"app": "ledger"}},
            "template": {"metadata": {"labels": {"app": "ledger"}}, "spec": {"containers": [container]}}
        }
    });
    let cm = serde_json::json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "ledger-env"}, "data": {"MODE": "prod"}
    });
    let pod = |state: serde_json::Value| {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "ledger-0"},
            "spec": {"nodeName": "node-1", "containers": [container]},
            "status": {
                "phase": "Running",
                "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [{
                    "name": crate::names::CONTAINER, "image": "ledger", "ready": true,
                    "restartCount": 0, "imageID": format!("docker-pullable://ledger@{digest}"),
                    "state": state
                }]
            }
        })
    };
    let node = serde_json::json!({
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1"},
        "spec": {"taints": [{"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"}]},
        "status": {"conditions": [{"type": "Ready", "status": "Unknown"}]}
    });
    let with = |tag: u8, v: &serde_json::Value| {
        let mut out = vec![tag];
        out.extend(serde_json::to_vec(v).expect("json"));
        out
    };
    let mut sts_cm = with(0, &sts);
    sts_cm.push(SEPARATOR);
    sts_cm.extend(serde_json::to_vec(&cm).expect("json"));
    vec![
        ("statefulset", sts_cm),
        ("pod", with(1, &pod(serde_json::json!({"running": {}})))),
        (
            "pod_crashloop",
            with(
                1,
                &pod(serde_json::json!({"waiting": {"reason": "CrashLoopBackOff"}})),
            ),
        ),
        ("node", with(2, &node)),
        ("quantity", b"\x031.5Gi".to_vec()),
    ]
}
