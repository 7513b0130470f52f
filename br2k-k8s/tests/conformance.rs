//! The core `Replicator` conformance suite against the real control plane.

mod common;

#[tokio::test]
#[ignore = "needs stack"]
async fn kube_replicator_conforms() {
    let ns = common::TestNs::new("conf").await;
    let r = ns.replicator();
    let run = common::unique();
    br2k_core::conformance::replicator::run_all(&r, |name| {
        br2k_core::ServiceId::new(format!("{name}-{run}")).expect("valid id")
    })
    .await;
    ns.cleanup().await;
}
