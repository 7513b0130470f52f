//! What the operator workload's faults need from the stack's Kubernetes emulation.
//!
//! Needs a stack (`source $BR2K_STACK_DIR/env` after `scripts/stack up`).
//! `cargo test -p br2k-faults --test operator_stack -- --ignored`

use std::path::PathBuf;
use std::time::{Duration, Instant};

use br2k_faults::operator::infra::ControlPlaneSupervisor;

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

/// A client of the stack's API server (`KUBECONFIG`).
async fn client() -> Client {
    br2k_k8s::install_crypto_provider();
    Client::try_default()
        .await
        .expect("kube client (KUBECONFIG)")
}

/// A fresh namespace `br2k-faults-<what>-<n>` (labelled as a test's).
async fn namespace(client: &Client, what: &str) -> (Api<Namespace>, String) {
    let ns = format!(
        "br2k-faults-{what}-{}",
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
    (namespaces, ns)
}

/// Creates pod `p` (one container, an image nobody pulls: kwok runs nothing) in `ns`;
/// the pods of `ns`.
async fn pod_p(client: &Client, ns: &str) -> Api<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "image": "example.invalid/p:1"}]}
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");
    pods
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
    let client = client().await;
    let (namespaces, ns) = namespace(&client, "ready").await;
    let pods = pod_p(&client, &ns).await;
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

/// The kube-scheduler exits on purpose when it finds its cache corrupted, which an
/// API-server restart can cause ("Pod updated on a different node than previously
/// added to"); kwokctl's binary runtime restarts nothing, so after
/// `apiserver-restart` no pod was scheduled any more and the next runs never
/// converged. The workload's `ControlPlaneSupervisor` restarts an exited component
/// as a real control plane's kubelet or systemd does: here the scheduler is killed
/// and a new pod must still be scheduled and become Ready.
#[tokio::test]
#[ignore = "needs a private stack (kills its kube-scheduler)"]
async fn an_exited_scheduler_is_restarted_and_pods_are_scheduled_again() {
    let client = client().await;
    let pid_file = PathBuf::from(std::env::var("KWOK_WORKDIR").expect("KWOK_WORKDIR"))
        .join("clusters")
        .join(std::env::var("BR2K_KWOK_CLUSTER").expect("BR2K_KWOK_CLUSTER"))
        .join("pids/kube-scheduler.pid");
    let supervisor = ControlPlaneSupervisor::start().expect("supervisor");
    let pid = std::fs::read_to_string(&pid_file)
        .expect("scheduler pid file")
        .trim()
        .to_owned();
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pid])
        .status()
        .expect("kill");
    assert!(killed.success(), "kill -KILL {pid}");
    let (namespaces, ns) = namespace(&client, "sched").await;
    let pods = pod_p(&client, &ns).await;
    let scheduled = wait_ready(&pods, "p", "True").await;
    let restarts = supervisor.take_restarts();
    drop(supervisor);
    let _ = namespaces.delete(&ns, &DeleteParams::background()).await;
    let recorded = std::fs::read_to_string(&pid_file).expect("scheduler pid file");
    scheduled.expect("the pod is scheduled and Ready after the scheduler was killed");
    assert!(
        restarts
            .iter()
            .any(|r| r.starts_with("kube-scheduler exited")),
        "{restarts:?}"
    );
    // The new pid is recorded as kwokctl writes and parses it (digits only: with a
    // trailing newline `kwokctl delete cluster` ignored it and `scripts/stack down`
    // left the restarted process running).
    assert!(
        !recorded.is_empty() && recorded.bytes().all(|b| b.is_ascii_digit()) && recorded != pid,
        "pid file holds {recorded:?}"
    );
}
