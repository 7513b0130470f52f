//! The replica runtime under a placement fence (#19): replicas of a cluster that does
//! not hold the service's placement lease never lead, and a leader whose cluster loses
//! the lease steps down, so a once-effect runs once across a whole-cluster failover.

use std::sync::Arc;
use std::time::Duration;

use br2k_core::conformance::sample_spec;
use br2k_core::failover::PlacementFence;
use br2k_core::log::{InMemoryLog, ReplicatedLog};
use br2k_core::memory::{InMemoryImageStore, InMemoryRegistry};
use br2k_core::replica::testkit::{CounterCommand, Counters, CountingEffect};
use br2k_core::replica::{Replica, ReplicaConfig, ReplicaRole};
use br2k_core::{Account, Registry, Role, ServiceId};

async fn replica(
    log: &InMemoryLog,
    placement: &InMemoryLog,
    registry: &InMemoryRegistry,
    effect: &CountingEffect,
    id: &ServiceId,
    cluster: &str,
    n: u32,
) -> Replica<Counters> {
    let mut cfg = ReplicaConfig::new(id.clone(), format!("http://{cluster}-r{n}:8080")).unwrap();
    cfg.snapshot_every = 0;
    cfg.request_timeout = Duration::from_secs(5);
    cfg.placement = Some(PlacementFence {
        log: Arc::new(placement.connect()),
        cluster: cluster.into(),
    });
    Replica::start(
        cfg,
        Counters::default(),
        Arc::new(log.connect()),
        Arc::new(registry.clone()),
        Arc::new(InMemoryImageStore::new("mem.local")),
        Some(Arc::new(effect.clone())),
    )
    .await
    .unwrap()
}

async fn leader_in<'a>(rs: &'a [Replica<Counters>], what: &str) -> &'a Replica<Counters> {
    for _ in 0..500 {
        if let Some(r) = rs.iter().find(|r| r.role() == ReplicaRole::Leader) {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no leader among {what}");
}

#[tokio::test]
async fn only_the_placed_cluster_leads_and_a_failover_runs_each_effect_once() {
    let owner = InMemoryRegistry::new("owner");
    let id = ServiceId::new("ledger").unwrap();
    owner
        .register(&id, &sample_spec("mem.local"))
        .await
        .unwrap();
    owner
        .grant(&id, &Account("replica".into()), Role::Replica)
        .await
        .unwrap();
    let registry = owner.as_account("replica");
    let (log, placement, effect) = (
        InMemoryLog::new(),
        InMemoryLog::new(),
        CountingEffect::default(),
    );
    let op_a = placement.connect();
    let lease_a = op_a.campaign("a").await.unwrap();
    let mut a = Vec::new();
    let mut b = Vec::new();
    for n in 0..2 {
        a.push(replica(&log, &placement, &registry, &effect, &id, "a", n).await);
        b.push(replica(&log, &placement, &registry, &effect, &id, "b", n).await);
    }
    let leader = leader_in(&a, "cluster a").await;
    let settle = CounterCommand::Settle {
        counter: "x".into(),
    };
    leader
        .replicate(
            None,
            CounterCommand::Add {
                counter: "x".into(),
                amount: 5,
            },
        )
        .await
        .unwrap();
    let first = leader.once("settle-1", settle.clone()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        b.iter().all(|r| r.role() != ReplicaRole::Leader),
        "a replica of the standby cluster leads"
    );

    // Cluster a loses the lease (its operator resigned or its session expired), b
    // wins it: a's leader steps down, one of b's leads, and nothing runs twice.
    op_a.resign(&lease_a).await.unwrap();
    let op_b = placement.connect();
    op_b.campaign("b").await.unwrap();
    let leader = leader_in(&b, "cluster b").await;
    assert!(a.iter().all(|r| r.role() != ReplicaRole::Leader));
    assert_eq!(
        leader.once("settle-1", settle.clone()).await.unwrap(),
        first
    );
    leader.once("settle-2", settle).await.unwrap();
    assert_eq!(effect.runs("settle-1"), 1);
    assert_eq!(effect.runs("settle-2"), 1);
    assert!(effect.duplicates().is_empty());
    // a's replicas keep following: they apply what b's leader did.
    let last = leader.applied_index();
    for r in a.iter().chain(&b) {
        r.wait_applied(last).await;
        assert_eq!(r.read_local(|s| s.settlements["x"].len()), 2);
    }
}
