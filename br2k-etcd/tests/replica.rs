//! The core `Replica` runtime on `EtcdLog` (the stack's 3-member etcd), in-process
//! replicas each with its own etcd client and lease: leader crash under load,
//! follower stop and rejoin, joining from a checkpoint, bad input, and the
//! linearizability of client histories under leader crashes over 200 runs.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use br2k_core::conformance::sample_spec;
use br2k_core::log::{Leadership, ReplicatedLog};
use br2k_core::memory::{InMemoryImageStore, InMemoryRegistry};
use br2k_core::replica::testkit::{
    CounterCommand, CounterOp, CounterOutput, Counters, CountingEffect, Retry,
    check_counter_history, client_history,
};
use br2k_core::replica::{Replica, ReplicaConfig, ReplicaError, ReplicaRole};
use br2k_core::{Account, Error, ImageStore, Registry, Repository, Role, ServiceId};
use br2k_etcd::EtcdLog;

struct Cluster {
    ns: String,
    registry: InMemoryRegistry,
    store: InMemoryImageStore,
    effect: CountingEffect,
    id: ServiceId,
    every: u64,
    timeout: Duration,
    ttl: Duration,
}

impl Cluster {
    async fn new(test: &str, every: u64) -> Self {
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
        Self {
            ns: common::namespace(test),
            registry: owner.as_account("replica"),
            store: InMemoryImageStore::new("mem.local"),
            effect: CountingEffect::default(),
            id,
            every,
            timeout: Duration::from_secs(10),
            ttl: Duration::from_secs(2),
        }
    }

    async fn replica(&self, n: u32) -> br2k_core::Result<(Replica<Counters>, EtcdLog)> {
        let mut cfg = ReplicaConfig::new(self.id.clone(), format!("http://r{n}:8080"))?;
        cfg.snapshot_every = self.every;
        cfg.max_command_bytes = 1024;
        cfg.request_timeout = self.timeout;
        let mut lc = common::config(&self.ns);
        lc.lease_ttl = self.ttl;
        let log = EtcdLog::connect_with(lc).await?;
        let r = Replica::start(
            cfg,
            Counters::default(),
            Arc::new(log.clone()),
            Arc::new(self.registry.clone()),
            Arc::new(self.store.clone()),
            Some(Arc::new(self.effect.clone())),
        )
        .await?;
        Ok((r, log))
    }

    async fn purge(&self) {
        let log = common::client(&self.ns).await;
        log.purge().await.unwrap();
        log.close().await.unwrap();
    }
}

fn add(c: &str, n: i64) -> CounterCommand {
    CounterCommand::Add {
        counter: c.into(),
        amount: n,
    }
}

async fn leader_of<T>(rs: &[(Replica<Counters>, T)]) -> &Replica<Counters> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((r, _)) = rs.iter().find(|(r, _)| r.role() == ReplicaRole::Leader) {
            return r;
        }
        assert!(Instant::now() < deadline, "no leader elected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

type Live = Arc<Mutex<Vec<(Arc<Replica<Counters>>, EtcdLog)>>>;

fn current_leader(live: &Live) -> Option<Arc<Replica<Counters>>> {
    let live = live.lock().unwrap();
    live.iter()
        .find(|(r, _)| r.role() == ReplicaRole::Leader)
        .or_else(|| live.first())
        .map(|(r, _)| r.clone())
}

/// How a client of the linearizability test retries an operation.
const RETRY: Retry = Retry {
    attempts: 100,
    pause: Duration::from_millis(10),
};

/// A crash: the replica's tasks stop and its lease is never kept alive again.
fn crash(r: &mut Replica<Counters>, log: &EtcdLog) {
    r.kill();
    log.halt_keep_alive();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs stack"]
async fn leader_crash_under_load_loses_nothing_and_runs_no_effect_twice() {
    let c = Arc::new(Cluster::new("crash-load", 50).await);
    let live: Live = Arc::default();
    for n in 0..3 {
        let (r, l) = c.replica(n).await.unwrap();
        live.lock().unwrap().push((Arc::new(r), l));
    }
    {
        let rs = live.lock().unwrap().clone();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !rs.iter().any(|(r, _)| r.role() == ReplicaRole::Leader) {
            assert!(Instant::now() < deadline, "no leader");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let successes: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
    // Writers: each op retried with its idempotency key until acknowledged.
    let writers: Vec<_> = (0..4u64)
        .map(|cl| {
            let (live, stop, successes) = (live.clone(), stop.clone(), successes.clone());
            tokio::spawn(async move {
                let mut acked = 0i64;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("w{cl}-{acked}");
                    let deadline = Instant::now() + Duration::from_secs(60);
                    loop {
                        let r = current_leader(&live).expect("a replica");
                        match r.replicate(Some(&key), add(&format!("c{cl}"), 1)).await {
                            Ok(CounterOutput::Value(v)) => {
                                assert_eq!(v, acked + 1, "exactly once per key");
                                successes
                                    .lock()
                                    .unwrap()
                                    .push((Instant::now(), r.endpoint().to_owned()));
                                break;
                            }
                            Ok(other) => panic!("unexpected {other:?}"),
                            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                        }
                        assert!(Instant::now() < deadline, "{key} never acknowledged");
                    }
                    acked += 1;
                }
                acked
            })
        })
        .collect();
    // Once-commands (settlements) concurrently, also retried by key.
    let settler = {
        let (live, stop) = (live.clone(), stop.clone());
        tokio::spawn(async move {
            let mut keys = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let key = format!("settle-{}", keys.len());
                let deadline = Instant::now() + Duration::from_secs(60);
                loop {
                    let r = current_leader(&live).expect("a replica");
                    let cmd = CounterCommand::Settle {
                        counter: "c0".into(),
                    };
                    match r.once(&key, cmd).await {
                        Ok(CounterOutput::Settled { .. }) => break,
                        Ok(other) => panic!("unexpected {other:?}"),
                        Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                    assert!(Instant::now() < deadline, "{key} never acknowledged");
                }
                keys.push(key);
            }
            keys
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (victim, victim_log) = {
        let mut l = live.lock().unwrap();
        let i = l
            .iter()
            .position(|(r, _)| r.role() == ReplicaRole::Leader)
            .expect("a leader");
        l.remove(i)
    };
    // The crash: no keep-alive from now on (the lease expires after its TTL); its
    // tasks are stopped as soon as no client call is in flight on it.
    let crashed = Instant::now();
    let victim_endpoint = victim.endpoint().to_owned();
    victim_log.halt_keep_alive();
    let mut victim = victim;
    let mut victim = loop {
        match Arc::try_unwrap(victim) {
            Ok(v) => break v,
            Err(v) => victim = v,
        }
        assert!(
            crashed.elapsed() < Duration::from_secs(60),
            "victim still in use"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    crash(&mut victim, &victim_log);
    // A new leader serves within the election timeout (lease TTL 2 s) plus the time
    // to campaign and pass its barrier; the bound below is only a liveness check.
    let deadline = Instant::now() + Duration::from_secs(60);
    let served_after = loop {
        if let Some((t, _)) = successes
            .lock()
            .unwrap()
            .iter()
            .find(|(t, by)| *t > crashed && *by != victim_endpoint)
        {
            break t.duration_since(crashed);
        }
        assert!(Instant::now() < deadline, "no new leader served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!(
        "first command served by the new leader {served_after:?} after the leader crash (lease TTL 2 s)"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for w in writers {
        acked.push(w.await.unwrap());
    }
    let settled = settler.await.unwrap();
    let rs = live.lock().unwrap().clone();
    let leader = rs
        .iter()
        .find(|(r, _)| r.role() == ReplicaRole::Leader)
        .map(|(r, _)| r.clone())
        .expect("a leader");
    let last = leader.applied_index();
    for (r, _) in &rs {
        r.wait_applied(last).await;
        for (cl, n) in acked.iter().enumerate() {
            let v = r.read_local(|s| s.values.get(&format!("c{cl}")).copied().unwrap_or(0));
            assert_eq!(v, *n, "replica {} counter c{cl}", r.endpoint());
        }
        assert_eq!(
            r.read_local(|s| s.settlements.get("c0").map_or(0, |v| v.len())),
            settled.len()
        );
    }
    assert!(
        c.effect.duplicates().is_empty(),
        "{:?}",
        c.effect.duplicates()
    );
    for k in &settled {
        assert_eq!(c.effect.runs(k), 1, "{k}");
    }
    eprintln!(
        "acknowledged commands {:?}, settlements {}",
        acked,
        settled.len()
    );
    drop(victim);
    c.purge().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs stack"]
async fn a_stopped_follower_rejoins_and_catches_up() {
    let c = Cluster::new("rejoin", 20).await;
    let mut rs = Vec::new();
    for n in 0..3 {
        rs.push(c.replica(n).await.unwrap());
    }
    let leader = leader_of(&rs).await.endpoint().to_owned();
    let li = rs.iter().position(|(r, _)| r.endpoint() == leader).unwrap();
    for i in 0..10 {
        rs[li].0.replicate(None, add("a", i)).await.unwrap();
    }
    let fi = (li + 1) % 3;
    let (mut stopped, stopped_log) = rs.remove(fi);
    let stopped_at = stopped.applied_index();
    crash(&mut stopped, &stopped_log);
    stopped_log.revoke_session().await.unwrap();
    drop(stopped);
    let li = rs.iter().position(|(r, _)| r.endpoint() == leader).unwrap();
    for i in 10..70 {
        rs[li].0.replicate(None, add("a", i)).await.unwrap();
    }
    // The log behind the checkpoints is compacted past where the follower stopped,
    // so it rejoins from a checkpoint and replays the rest.
    let deadline = Instant::now() + Duration::from_secs(30);
    while stopped_log.first_index().await.unwrap() <= stopped_at + 1 {
        assert!(Instant::now() < deadline, "log not compacted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let n = u32::try_from(fi).unwrap();
    let (back, _) = c.replica(n).await.unwrap();
    back.wait_applied(rs[li].0.applied_index()).await;
    assert_eq!(back.read_local(|s| s.values["a"]), (0..70).sum::<i64>());
    assert_eq!(back.role(), ReplicaRole::Follower);
    let out = rs[li].0.replicate(None, add("a", 1)).await.unwrap();
    back.wait_applied(rs[li].0.applied_index()).await;
    assert_eq!(
        CounterOutput::Value(back.read_local(|s| s.values["a"])),
        out
    );
    c.purge().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs stack"]
async fn a_fourth_replica_joins_from_a_checkpoint_and_a_tampered_one_is_refused() {
    let c = Cluster::new("join", 10).await;
    let rs = vec![
        c.replica(0).await.unwrap(),
        c.replica(1).await.unwrap(),
        c.replica(2).await.unwrap(),
    ];
    let leader = leader_of(&rs).await;
    for i in 0..45 {
        leader.replicate(None, add("a", i)).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let cp = loop {
        let cp = c.registry.active(&c.id).await.unwrap().checkpoint;
        if let Some(cp) = cp.filter(|cp| cp.state_version >= 2) {
            break cp;
        }
        assert!(Instant::now() < deadline, "no second checkpoint");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let first = rs[0].1.first_index().await.unwrap();
    assert!(first > 1, "log compacted behind the older checkpoint");
    let (joined, _) = c.replica(3).await.unwrap();
    joined.wait_applied(leader.applied_index()).await;
    assert_eq!(joined.read_local(|s| s.values["a"]), (0..45).sum::<i64>());
    // A snapshot whose bytes do not match its recorded digest is refused.
    let repo = Repository::new("br2k/ledger/snapshots").unwrap();
    let image = c.store.pull(&repo, &cp.snapshot).await.unwrap();
    c.store.corrupt_blob(&image.layers[0].digest).unwrap();
    match c.replica(4).await {
        Err(Error::Tampered { .. }) => {}
        other => panic!("expected Tampered, got {:?}", other.map(|_| ())),
    }
    // The cluster stays consistent and serving.
    let out = leader.replicate(None, add("a", 1)).await.unwrap();
    assert_eq!(out, CounterOutput::Value((0..45).sum::<i64>() + 1));
    for (r, _) in rs.iter().chain(std::iter::once(&(joined, rs[0].1.clone()))) {
        r.wait_applied(leader.applied_index()).await;
        assert_eq!(r.read_local(|s| s.values["a"]), (0..45).sum::<i64>() + 1);
    }
    c.purge().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs stack"]
async fn bad_input_is_rejected_and_replicas_stay_consistent() {
    let c = Cluster::new("bad-input", 0).await;
    let rs = vec![c.replica(0).await.unwrap(), c.replica(1).await.unwrap()];
    let leader = leader_of(&rs).await;
    leader.replicate(Some("k1"), add("a", 5)).await.unwrap();
    let mut huge = b"{\"type\":\"add\",\"counter\":\"a\",\"amount\":1,\"pad\":\"".to_vec();
    huge.extend(vec![b'p'; 2000]);
    huge.extend(b"\"}");
    for bad in [&huge[..], b"{not json", b"{\"type\":\"nope\"}"] {
        assert!(matches!(
            leader.replicate_json(None, bad).await,
            Err(ReplicaError::Failed(Error::InvalidInput(_)))
        ));
    }
    assert!(matches!(
        leader.replicate(None, add("", 1)).await,
        Err(ReplicaError::Failed(Error::InvalidInput(_)))
    ));
    assert!(matches!(
        leader.replicate(Some(""), add("a", 1)).await,
        Err(ReplicaError::Failed(Error::InvalidInput(_)))
    ));
    // A malformed entry in the log (written with the leader's own token) is skipped
    // the same way by every replica.
    let lead_log = &rs
        .iter()
        .find(|(r, _)| r.endpoint() == leader.endpoint())
        .unwrap()
        .1;
    let info = lead_log.leader().await.unwrap().unwrap();
    let lead = Leadership {
        candidate: info.candidate,
        term: info.term,
        key: String::new(),
    };
    lead_log
        .append(&lead, vec![bytes::Bytes::from_static(b"garbage")])
        .await
        .unwrap();
    // An oversized entry is refused by the log itself.
    let big = bytes::Bytes::from(vec![0u8; br2k_core::log::MAX_ENTRY_BYTES + 1]);
    assert!(matches!(
        lead_log.append(&lead, vec![big]).await,
        Err(Error::InvalidInput(_))
    ));
    let out = leader.replicate(None, add("a", 1)).await.unwrap();
    assert_eq!(out, CounterOutput::Value(6));
    for (r, _) in &rs {
        r.wait_applied(leader.applied_index()).await;
        assert_eq!(r.skipped_entries(), 1);
        assert_eq!(r.read_local(|s| s.values["a"]), 6);
    }
    c.purge().await;
}

/// Runs (default 200, `BR2K_LIN_RUNS` to change) of 3 clients against 3 replicas on
/// etcd while the leader crashes (lease revoked: expiry fast-forwarded) and a new
/// replica joins from a checkpoint: every client-visible history is linearizable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs stack"]
async fn histories_under_leader_crashes_are_linearizable() {
    let runs: u64 = std::env::var("BR2K_LIN_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let started = Instant::now();
    let (mut checked, mut unknown, mut total) = (0, 0, 0);
    for run in 0..runs {
        let mut c = Cluster::new("lin", 7).await;
        // A request stranded on the crashed leader gives up quickly and is retried.
        c.timeout = Duration::from_millis(500);
        let c = Arc::new(c);
        let live: Live = Arc::default();
        for n in 0..3 {
            let (r, l) = c.replica(n).await.unwrap();
            live.lock().unwrap().push((Arc::new(r), l));
        }
        let start = Instant::now();
        let clients: Vec<_> = (0..3u64)
            .map(|cl| {
                let live = live.clone();
                tokio::spawn(async move {
                    client_history(|| current_leader(&live), start, (run, cl), 8, RETRY).await
                })
            })
            .collect();
        // Fault: crash the leader mid-run, then add a replica that joins.
        tokio::time::sleep(Duration::from_millis(5 + run % 20)).await;
        let (victim, victim_log) = {
            let mut l = live.lock().unwrap();
            let i = l
                .iter()
                .position(|(r, _)| r.role() == ReplicaRole::Leader)
                .unwrap_or(0);
            l.remove(i)
        };
        victim_log.halt_keep_alive();
        victim_log.revoke_session().await.unwrap();
        drop(victim);
        let (r, l) = c.replica(3 + run as u32).await.unwrap();
        live.lock().unwrap().push((Arc::new(r), l));
        let mut history = Vec::new();
        for h in clients {
            history.extend(h.await.unwrap());
        }
        total += history.len();
        unknown += history.iter().filter(|o| o.ret.is_none()).count();
        check_counter_history(&history).unwrap_or_else(|e| panic!("run {run}: {e}\n{history:#?}"));
        // The same history through an existing checker (stateright's tester).
        check_with_consistency_model(&history)
            .unwrap_or_else(|e| panic!("run {run}: {e}\n{history:#?}"));
        checked += 1;
        for (r, _) in live.lock().unwrap().drain(..) {
            drop(r);
        }
        c.purge().await;
    }
    eprintln!(
        "{checked} runs, {total} operations, {unknown} without an answer, {:?}",
        started.elapsed()
    );
    assert_eq!(checked, runs);
    assert!(
        unknown * 10 < total,
        "too many operations without an answer: {unknown} of {total}"
    );
}

/// A counter as a sequential specification for `consistency_model` (stateright's
/// linearizability tester): adds return the new value, reads the current one.
#[derive(Clone, Debug, Default)]
struct CounterSpec(i64);

impl consistency_model::SequentialSpec for CounterSpec {
    type Op = Option<i64>;
    type Ret = i64;
    fn invoke(&mut self, op: &Option<i64>) -> i64 {
        self.0 += op.unwrap_or(0);
        self.0
    }
}

/// Checks a counter history with `consistency_model::LinearizabilityTester`, counter
/// by counter. Events are fed in time order (invocations before returns at equal
/// times, the permissive choice); operations are spread over "threads" that are
/// sequential in real time, and every operation with an unknown outcome gets a
/// thread of its own (it stays in flight: it may or may not have taken effect).
fn check_with_consistency_model(ops: &[CounterOp]) -> Result<(), String> {
    use consistency_model::{ConsistencyTester, LinearizabilityTester};
    let mut by_counter: BTreeMap<&str, Vec<&CounterOp>> = BTreeMap::new();
    for op in ops {
        by_counter.entry(&op.counter).or_default().push(op);
    }
    for (counter, mut ops) in by_counter {
        ops.sort_by_key(|o| o.call);
        // Threads: each holds operations that do not overlap in time.
        let mut free_at: Vec<u64> = Vec::new();
        let mut events: Vec<(u64, bool, usize, &CounterOp)> = Vec::new();
        for op in ops {
            let thread = match op.ret {
                Some((t, _)) => match free_at.iter().position(|&f| f < op.call) {
                    Some(i) => {
                        free_at[i] = t;
                        i
                    }
                    None => {
                        free_at.push(t);
                        free_at.len() - 1
                    }
                },
                None => {
                    free_at.push(u64::MAX);
                    free_at.len() - 1
                }
            };
            events.push((op.call, false, thread, op));
            if let Some((t, _)) = op.ret {
                events.push((t, true, thread, op));
            }
        }
        events.sort_by_key(|(t, is_return, _, _)| (*t, *is_return));
        let mut tester = LinearizabilityTester::new(CounterSpec::default());
        for (_, is_return, thread, op) in events {
            if is_return {
                let (_, seen) = op.ret.expect("a return");
                tester.on_return(thread, seen)?;
            } else {
                tester.on_invoke(thread, op.add)?;
            }
        }
        if !tester.is_consistent() {
            return Err(format!("{counter}: not linearizable (consistency_model)"));
        }
    }
    Ok(())
}

#[test]
fn consistency_model_cross_check_accepts_and_refuses() {
    let op = |add: Option<i64>, call: u64, ret: Option<(u64, i64)>| CounterOp {
        counter: "c".into(),
        add,
        call,
        ret,
    };
    // Concurrent adds in either order, a later read of the sum, an unknown add.
    let good = vec![
        op(Some(1), 0, Some((10, 2))),
        op(Some(1), 1, Some((5, 1))),
        op(Some(5), 2, None),
        op(None, 11, Some((12, 2))),
    ];
    assert_eq!(check_with_consistency_model(&good), Ok(()));
    // A read after a completed add that misses it (stale read).
    let stale = vec![op(Some(1), 0, Some((1, 1))), op(None, 2, Some((3, 0)))];
    assert!(check_with_consistency_model(&stale).is_err());
    // Both checkers agree.
    assert!(check_counter_history(&good).is_ok());
    assert!(check_counter_history(&stale).is_err());
}
