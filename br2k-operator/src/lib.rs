//! The br2k operator: a `Br2kService` custom resource and a kube-runtime controller
//! that runs the core supervisor for each resource, with finalizers, per-object
//! backoff, Kubernetes Events on every recovery, Prometheus metrics and leader
//! election through a Lease.

pub mod backends;
pub mod controller;
pub mod crd;
pub mod failover;
pub mod image;
pub mod lease;
pub mod manifests;
pub mod metrics;

use std::sync::Arc;

use tokio::sync::watch;

/// Runs the controller whenever this replica holds the lease, until `stop` turns
/// true. A replica that loses the lease stops its controller (finishing the reconcile
/// in flight) and waits to lead again; a stopping replica releases the lease so a
/// standby takes over at once.
pub async fn run_with_leader_election(
    ctx: Arc<controller::Context>,
    client: kube::Client,
    lease: lease::LeaseConfig,
    mut stop: watch::Receiver<bool>,
) {
    let (mut leader, stop_lease, task) = lease::spawn(client, lease);
    loop {
        tokio::select! {
            r = leader.wait_for(|l| *l) => if r.is_err() { break },
            _ = stop.wait_for(|s| *s) => break,
        }
        ctx.metrics().leader(true);
        tracing::info!("leading: starting the controller");
        let (mut l2, mut s2) = (leader.clone(), stop.clone());
        let lost = async move {
            tokio::select! {
                _ = l2.wait_for(|l| !*l) => {},
                _ = s2.wait_for(|s| *s) => {},
            }
        };
        controller::run(ctx.clone(), lost).await;
        ctx.metrics().leader(false);
        tracing::info!("not leading: controller stopped");
        if *stop.borrow() {
            break;
        }
    }
    let _ = stop_lease.send(true);
    let _ = task.await;
}
