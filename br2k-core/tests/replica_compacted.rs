//! A replica the log was compacted past, whose registry does not (yet) show a newer
//! checkpoint than the one it has (a record read older than the compaction), waits
//! with a growing delay instead of asking the log and the registry again at once.

use std::sync::Arc;
use std::time::Duration;

use br2k_core::conformance::{eventually, sample_spec};
use br2k_core::fault::Faulty;
use br2k_core::log::{InMemoryLog, ReplicatedLog};
use br2k_core::memory::{InMemoryImageStore, InMemoryRegistry};
use br2k_core::replica::testkit::{CounterCommand, Counters};
use br2k_core::replica::{Replica, ReplicaConfig, ReplicaRole};
use br2k_core::{Account, ChangeKind, Registry, Role, ServiceId};
use futures::StreamExt;

/// A new registry holding `id`, as its owner and as a replica account.
async fn registered(id: &ServiceId) -> (InMemoryRegistry, InMemoryRegistry) {
    let owner = InMemoryRegistry::new("owner");
    let replica = owner.as_account("replica");
    owner.register(id, &sample_spec("mem.local")).await.unwrap();
    owner
        .grant(id, &Account("replica".into()), Role::Replica)
        .await
        .unwrap();
    (owner, replica)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_compacted_past_without_a_newer_checkpoint_backs_off() {
    // A spinning replica can starve this test's own timers: fail instead of hanging.
    std::thread::spawn(|| {
        std::thread::sleep(Duration::from_secs(60));
        eprintln!("the test did not finish in 60 s: the joining replica spins");
        std::process::exit(1);
    });
    let id = ServiceId::new("ledger").unwrap();
    let (owner, registry) = registered(&id).await;
    let (log, store) = (InMemoryLog::new(), InMemoryImageStore::new("mem.local"));
    let mut changes = owner.changes().await.unwrap();
    let mut cfg = ReplicaConfig::new(id.clone(), "http://r0:8080").unwrap();
    cfg.snapshot_every = 10;
    let leader = Replica::start(
        cfg,
        Counters::default(),
        Arc::new(log.connect()),
        Arc::new(registry.clone()),
        Arc::new(store.clone()),
        None,
    )
    .await
    .unwrap();
    eventually(Duration::from_secs(10), "leader", || async {
        (leader.role() == ReplicaRole::Leader)
            .then_some(())
            .ok_or_else(|| "not yet".to_owned())
    })
    .await;
    for i in 0..45 {
        let add = CounterCommand::Add {
            counter: "a".into(),
            amount: i,
        };
        leader.replicate(None, add).await.unwrap();
    }
    // The first checkpoint, and a log compacted past it by the later ones.
    let first = loop {
        match changes.next().await.unwrap().unwrap().kind {
            ChangeKind::Checkpointed { checkpoint } => break checkpoint,
            _ => continue,
        }
    };
    eventually(
        Duration::from_secs(10),
        "compacted past the first",
        || async {
            match log.first_index().await.unwrap() {
                i if i > first.log_index + 1 => Ok(()),
                i => Err(format!(
                    "first index {i}, first checkpoint {}",
                    first.log_index
                )),
            }
        },
    )
    .await;

    // A registry that shows only the first checkpoint (a stale read of the record).
    let (_, stale) = registered(&id).await;
    stale.record_checkpoint(&id, &first).await.unwrap();
    let joining_log = Faulty::new(log.connect());
    let calls = joining_log.handle();
    let mut cfg = ReplicaConfig::new(id.clone(), "http://r1:8080").unwrap();
    cfg.campaign = false;
    // It restores the first checkpoint, cannot go on from there and keeps joining
    // (`start` returns once caught up, which cannot happen here).
    let joining = tokio::spawn(Replica::start(
        cfg,
        Counters::default(),
        Arc::new(joining_log),
        Arc::new(stale),
        Arc::new(store.clone()),
        None,
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = calls.calls();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = calls.calls() - before;
    // 200 ms doubling: a few attempts in 2 s, each one watch. Asking again at once
    // made thousands.
    assert!(during < 20, "{during} log calls in 2 s: the replica spins");
    assert!(!joining.is_finished(), "nothing newer to catch up from");
    joining.abort();
    leader.shutdown().await;
}
