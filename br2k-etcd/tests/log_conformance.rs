//! The core replicated-log conformance suite against the stack's 3-member etcd.

mod common;

use std::sync::Arc;

use br2k_core::conformance::log::{LogPair, run_all};
use br2k_core::log::ReplicatedLog;
use futures::FutureExt;

#[tokio::test]
#[ignore = "needs stack"]
async fn etcd_log_conforms() {
    run_all(&|| {
        async {
            let ns = common::namespace("conformance");
            let a = common::client(&ns).await;
            let b = common::client(&ns).await;
            (
                Arc::new(a) as Arc<dyn ReplicatedLog>,
                Arc::new(b) as Arc<dyn ReplicatedLog>,
            ) as LogPair
        }
        .boxed()
    })
    .await;
}
