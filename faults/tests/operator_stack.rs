//! What the operator workload's faults need from the stack's Kubernetes emulation.
//!
//! Needs a stack (`source $BR2K_STACK_DIR/env` after `scripts/stack up`).
//! `cargo test -p br2k-faults --test operator_stack -- --ignored`

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

/// Longest wait for a pod condition.
const TIMEOUT: Duration = Duration::from_secs(30);

fn ready(p: &Pod) -> Option<String> {
    p.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| c.status.clone())
}

async fn wait_ready(pods: &Api<Pod>, name: &str, want: &str) -> Result<(), String> {
    let t0 = Instant::now();
    loop {
        let p = pods.get(name).await.map_err(|e| e.to_string())?;
        let r = ready(&p);
        if r.as_deref() == Some(want) {
            return Ok(());
        }
        if t0.elapsed() > TIMEOUT {
            return Err(format!(
                "pod {name}: Ready {r:?} after {TIMEOUT:?} (phase {:?})",
                p.status.as_ref().and_then(|s| s.phase.clone())
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// After an API-server restart the node lifecycle controller marks the pods of the
/// nodes that missed their heartbeats NotReady (Ready=False, containers still
/// ready); a kubelet reports them Ready again once its node is back. kwok's default
/// stages only make Pending pods Ready, so such pods stayed NotReady for good and
/// every service of the cluster looked degraded after `apiserver-restart`
/// (stack/kwok/stages.yaml's pod-ready-again stage).
#[tokio::test]
#[ignore = "needs stack"]
async fn a_running_pod_marked_not_ready_becomes_ready_again() {
    br2k_k8s::install_crypto_provider();
    let client = Client::try_default()
        .await
        .expect("kube client (KUBECONFIG)");
    let ns = format!(
        "br2k-faults-ready-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis()
            % 1_000_000_000
    );
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": ns, "labels": {"br2k.io/test": "true"}}}),
            )
            .expect("namespace"),
        )
        .await
        .expect("create namespace");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "image": "example.invalid/p:1"}]}
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    let first = wait_ready(&pods, "p", "True").await;
    // What the node lifecycle controller does to the pods of a NotReady node.
    let marked = pods
        .patch_status(
            "p",
            &PatchParams::default(),
            &Patch::Strategic(json!({"status": {"conditions": [
                {"type": "Ready", "status": "False", "reason": "NodeNotReady"}
            ]}})),
        )
        .await
        .map(drop)
        .map_err(|e| e.to_string());
    let not_ready = pods
        .get("p")
        .await
        .map(|p| ready(&p))
        .map_err(|e| e.to_string());
    let again = wait_ready(&pods, "p", "True").await;
    let _ = namespaces.delete(&ns, &DeleteParams::background()).await;
    first.expect("the pod becomes Ready");
    marked.expect("mark the pod NotReady");
    assert_eq!(
        not_ready.as_ref().map(Option::as_deref),
        Ok(Some("False")),
        "the mark took"
    );
    again.expect("the pod is Ready again");
}
