//! The replicated-log conformance suite against the in-memory log.

use std::sync::Arc;

use br2k_core::conformance::log::{LogPair, run_all};
use br2k_core::log::{InMemoryLog, ReplicatedLog};
use futures::FutureExt;

#[tokio::test]
async fn in_memory_log_conforms() {
    run_all(&|| {
        async {
            let a = InMemoryLog::new();
            let b = a.connect();
            (
                Arc::new(a) as Arc<dyn ReplicatedLog>,
                Arc::new(b) as Arc<dyn ReplicatedLog>,
            ) as LogPair
        }
        .boxed()
    })
    .await;
}

#[tokio::test]
async fn faulty_log_without_faults_conforms() {
    use br2k_core::fault::{FaultHandle, Faulty};
    run_all(&|| {
        async {
            let site = FaultHandle::new();
            let a = InMemoryLog::new();
            let b = a.connect();
            (
                Arc::new(Faulty::with_handle(a, site.clone())) as Arc<dyn ReplicatedLog>,
                Arc::new(Faulty::with_handle(b, site)) as Arc<dyn ReplicatedLog>,
            ) as LogPair
        }
        .boxed()
    })
    .await;
}
