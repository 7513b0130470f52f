//! Execution replication on etcd: 3 in-process replicas (each its own `EtcdLog`
//! client and lease) on the stack's 3-member etcd (`BR2K_ETCD_ENDPOINTS`).
//!
//! Per run, in a fresh namespace:
//! 1. raw etcd txn throughput and p50/p99 latency (etcd-client; a compare + put per
//!    txn) at 1, 8, 64, 256 concurrent clients, `--secs` seconds each;
//! 2. replicated commands/s and p50/p99 latency at the same concurrency (commands
//!    sent to the leader's `Replica::replicate`, batched by the runtime);
//! 3. state versions: ~100 MB of state (100 x 1 MB `Fill`), a checkpoint at index
//!    10,000 taken while 16 clients keep writing (time to snapshot, max request
//!    latency during the snapshot vs. outside it), then ~10,000 more entries, and a
//!    4th replica joining from the checkpoint (time to restore and replay).
//!
//! `cargo run --release -p br2k-benches --bin replica_etcd [-- --runs 3 --secs 3]`
//! prints each run and the medians. Snapshots are OCI artifacts in the stack's primary
//! registry (`--memory-snapshots`: an in-memory image store instead).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use br2k_benches::measure::arg;
use br2k_core::ImageStore;
use br2k_core::log::ReplicatedLog;
use br2k_core::memory::{InMemoryImageStore, InMemoryRegistry};
use br2k_core::replica::testkit::{CounterCommand, Counters};
use br2k_core::replica::{Replica, ReplicaConfig, ReplicaRole};
use br2k_core::{
    Account, Digest, ImageRef, Registry, Repository, Result, Role, ServiceId, ServiceSpec,
};
use br2k_etcd::{EtcdLog, EtcdLogConfig};
use etcd_client::{Compare, CompareOp, Txn, TxnOp};

const LEVELS: [usize; 4] = [1, 8, 64, 256];
const SNAPSHOT_EVERY: u64 = 10_000;
const FILLS: u32 = 100;
const FILL_BYTES: u32 = 1_000_000;

fn endpoints() -> Vec<String> {
    std::env::var("BR2K_ETCD_ENDPOINTS")
        .expect("BR2K_ETCD_ENDPOINTS (source .stack/env)")
        .split(',')
        .map(|s| s.trim().to_owned())
        .collect()
}

/// Throughput and latency of one load level.
#[derive(Debug, Clone, Copy, Default)]
struct Level {
    ops_per_s: f64,
    p50: Duration,
    p99: Duration,
}

fn level(mut lat: Vec<Duration>, elapsed: Duration) -> Level {
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Level {
        ops_per_s: lat.len() as f64 / elapsed.as_secs_f64(),
        p50: pct(0.50),
        p99: pct(0.99),
    }
}

/// Runs `clients` loops of `op` for `secs` and returns the level.
async fn load<F, Fut>(clients: usize, secs: Duration, op: F) -> Level
where
    F: Fn(usize, u64) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (stop, op) = (stop.clone(), op.clone());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    if op(c, i).await {
                        lat.push(t.elapsed());
                    }
                    i += 1;
                }
                lat
            })
        })
        .collect();
    tokio::time::sleep(secs).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("load task"));
    }
    level(all, start.elapsed())
}

async fn raw_level(ns: &str, clients: usize, secs: Duration) -> Level {
    let client = etcd_client::Client::connect(endpoints(), None)
        .await
        .expect("connect");
    let ns = ns.to_owned();
    load(clients, secs, move |c, i| {
        let mut kv = client.kv_client();
        let key = format!("{ns}/raw/{c}");
        async move {
            let txn = Txn::new()
                .when([Compare::version(key.clone(), CompareOp::Greater, -1)])
                .and_then([TxnOp::put(key, format!("value-{i:0>40}"), None)]);
            kv.txn(txn).await.is_ok()
        }
    })
    .await
}

/// Where snapshots go: the stack's primary OCI registry (`BR2K_OCI_REGISTRIES`), or
/// an in-memory store with `--memory-snapshots`.
fn snapshot_store() -> Result<Arc<dyn ImageStore>> {
    if std::env::args().any(|a| a == "--memory-snapshots") {
        return Ok(Arc::new(InMemoryImageStore::new("mem.local")));
    }
    let registries = std::env::var("BR2K_OCI_REGISTRIES")
        .expect("BR2K_OCI_REGISTRIES (source .stack/env) or --memory-snapshots");
    let primary = registries.split(',').next().unwrap_or_default().trim();
    Ok(Arc::new(br2k_oci::OciImageStore::insecure(primary)?))
}

struct Cluster {
    ns: String,
    registry: InMemoryRegistry,
    store: Arc<dyn ImageStore>,
    id: ServiceId,
}

impl Cluster {
    async fn new(ns: String) -> Result<Self> {
        let owner = InMemoryRegistry::new("owner");
        let id = ServiceId::new("bench")?;
        let image = ImageRef::new(
            "mem.local",
            Repository::new("br2k/bench")?,
            Some("1.0"),
            Some(Digest::of(b"bench")),
        )?;
        owner.register(&id, &ServiceSpec::new(image, 3)?).await?;
        owner
            .grant(&id, &Account("replica".into()), Role::Replica)
            .await?;
        Ok(Self {
            ns,
            registry: owner.as_account("replica"),
            store: snapshot_store()?,
            id,
        })
    }

    async fn replica(&self, n: u32, every: u64) -> Result<Replica<Counters>> {
        let mut cfg = ReplicaConfig::new(self.id.clone(), format!("http://r{n}:8080"))?;
        cfg.snapshot_every = every;
        cfg.request_timeout = Duration::from_secs(30);
        let log = EtcdLog::connect_with(EtcdLogConfig::new(endpoints(), &self.ns)).await?;
        Replica::start(
            cfg,
            Counters::default(),
            Arc::new(log),
            Arc::new(self.registry.clone()),
            self.store.clone(),
            None,
        )
        .await
    }
}

async fn leader(rs: &[Arc<Replica<Counters>>]) -> Arc<Replica<Counters>> {
    loop {
        if let Some(r) = rs.iter().find(|r| r.role() == ReplicaRole::Leader) {
            return r.clone();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn add(counter: String) -> CounterCommand {
    CounterCommand::Add { counter, amount: 1 }
}

async fn replicated_levels(ns: &str, secs: Duration) -> Result<Vec<Level>> {
    let c = Cluster::new(format!("{ns}/replicated")).await?;
    let mut rs = Vec::new();
    for n in 0..3 {
        rs.push(Arc::new(c.replica(n, 0).await?));
    }
    let lead = leader(&rs).await;
    let mut out = Vec::new();
    for clients in LEVELS {
        let lead = lead.clone();
        out.push(
            load(clients, secs, move |c, _| {
                let lead = lead.clone();
                async move { lead.replicate(None, add(format!("c{c}"))).await.is_ok() }
            })
            .await,
        );
    }
    Ok(out)
}

/// Figures of the state-version scenario.
#[derive(Debug, Clone, Copy, Default)]
struct Versions {
    state_bytes: u64,
    snapshot: Duration,
    max_during: Duration,
    max_outside: Duration,
    p99_writes: Duration,
    replay: u64,
    join: Duration,
}

async fn versions(ns: &str) -> Result<Versions> {
    let c = Cluster::new(format!("{ns}/versions")).await?;
    let mut rs = Vec::new();
    for n in 0..3 {
        rs.push(Arc::new(c.replica(n, SNAPSHOT_EVERY).await?));
    }
    let lead = leader(&rs).await;
    for i in 0..FILLS {
        lead.replicate(
            None,
            CounterCommand::Fill {
                counter: format!("pad-{i:03}"),
                bytes: FILL_BYTES,
            },
        )
        .await?;
    }
    let state_bytes = lead.read_local(|s| s.padding.values().map(|p| p.len() as u64).sum());
    // 16 writers until the log holds 2 x SNAPSHOT_EVERY - 1 entries: the checkpoint at
    // SNAPSHOT_EVERY is taken while they write.
    let target = 2 * SNAPSHOT_EVERY - 1;
    let samples = Arc::new(std::sync::Mutex::new(Vec::<(Instant, Duration)>::new()));
    let writers: Vec<_> = (0..16)
        .map(|w| {
            let (lead, samples) = (lead.clone(), samples.clone());
            tokio::spawn(async move {
                while lead.applied_index() < target - 64 {
                    let t = Instant::now();
                    if lead.replicate(None, add(format!("w{w}"))).await.is_ok() {
                        samples.lock().expect("samples").push((t, t.elapsed()));
                    }
                }
            })
        })
        .collect();
    // Time to snapshot: from applying index SNAPSHOT_EVERY to the recorded checkpoint.
    let applied_at = loop {
        if lead.applied_index() >= SNAPSHOT_EVERY {
            break Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let recorded_at = loop {
        if lead.stats().checkpoints.load(Ordering::Relaxed) >= 1 {
            break Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    for w in writers {
        w.await.expect("writer");
    }
    let samples = samples.lock().expect("samples").clone();
    let during = |(t, d): &(Instant, Duration)| *t <= recorded_at && *t + *d >= applied_at;
    let max_during = samples.iter().filter(|s| during(s)).map(|s| s.1).max();
    let max_outside = samples.iter().filter(|s| !during(s)).map(|s| s.1).max();
    let p99 = level(
        samples.iter().map(|s| s.1).collect(),
        Duration::from_secs(1),
    )
    .p99;
    let cp = c
        .registry
        .active(&c.id)
        .await?
        .checkpoint
        .expect("a checkpoint");
    let log = EtcdLog::connect_with(EtcdLogConfig::new(endpoints(), &c.ns)).await?;
    let last = log.last_index().await?;
    let t = Instant::now();
    let joined = c.replica(3, SNAPSHOT_EVERY).await?;
    let join = t.elapsed();
    assert!(joined.applied_index() >= last);
    assert_eq!(
        joined.read_local(|s| s.values.clone()),
        lead.read_local(|s| s.values.clone())
    );
    log.purge().await?;
    Ok(Versions {
        state_bytes,
        snapshot: recorded_at - applied_at,
        max_during: max_during.unwrap_or_default(),
        max_outside: max_outside.unwrap_or_default(),
        p99_writes: p99,
        replay: last - cp.log_index,
        join,
    })
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn median_f(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn median_d(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<()> {
    let runs = arg("--runs", 3usize);
    let secs = Duration::from_secs(arg("--secs", 3u64));
    let mut raws: Vec<Vec<Level>> = Vec::new();
    let mut reps: Vec<Vec<Level>> = Vec::new();
    let mut vers: Vec<Versions> = Vec::new();
    for run in 0..runs {
        let ns = format!("br2k-bench/replica-etcd-{:016x}", rand::random::<u64>());
        let mut raw = Vec::new();
        for clients in LEVELS {
            raw.push(raw_level(&ns, clients, secs).await);
        }
        let rep = replicated_levels(&ns, secs).await?;
        println!(
            "run {}: clients | raw txn/s p50 p99 | replicated cmd/s p50 p99",
            run + 1
        );
        for (i, clients) in LEVELS.iter().enumerate() {
            let (a, b) = (raw[i], rep[i]);
            println!(
                "  {clients:>4} | {:>8.0} {} {} | {:>8.0} {} {}",
                a.ops_per_s,
                ms(a.p50),
                ms(a.p99),
                b.ops_per_s,
                ms(b.p50),
                ms(b.p99)
            );
        }
        let v = versions(&ns).await?;
        println!("  versions: {v:?}");
        let client = etcd_client::Client::connect(endpoints(), None).await;
        if let Ok(mut client) = client {
            let _ = client
                .delete(
                    format!("{ns}/"),
                    Some(etcd_client::DeleteOptions::new().with_prefix()),
                )
                .await;
        }
        raws.push(raw);
        reps.push(rep);
        vers.push(v);
    }
    println!("\nmedians over {runs} runs ({secs:?} per level)");
    println!(
        "| clients | raw etcd txn/s | raw p50 | raw p99 | replicated cmd/s | p50 | p99 | replicated / raw |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for (i, clients) in LEVELS.iter().enumerate() {
        let raw = median_f(raws.iter().map(|r| r[i].ops_per_s).collect());
        let rep = median_f(reps.iter().map(|r| r[i].ops_per_s).collect());
        println!(
            "| {clients} | {raw:.0} | {} | {} | {rep:.0} | {} | {} | {:.0} % |",
            ms(median_d(raws.iter().map(|r| r[i].p50).collect())),
            ms(median_d(raws.iter().map(|r| r[i].p99).collect())),
            ms(median_d(reps.iter().map(|r| r[i].p50).collect())),
            ms(median_d(reps.iter().map(|r| r[i].p99).collect())),
            100.0 * rep / raw
        );
    }
    let md = |f: fn(&Versions) -> Duration| median_d(vers.iter().map(f).collect());
    println!(
        "\nstate {} MB, entries replayed by the joining replica {}",
        vers[0].state_bytes / 1_000_000,
        vers[0].replay
    );
    println!(
        "| time to snapshot | join (restore + replay) | max latency during snapshot | max latency outside | p99 of those writes |"
    );
    println!("|---:|---:|---:|---:|---:|");
    println!(
        "| {} | {} | {} | {} | {} |",
        ms(md(|v| v.snapshot)),
        ms(md(|v| v.join)),
        ms(md(|v| v.max_during)),
        ms(md(|v| v.max_outside)),
        ms(md(|v| v.p99_writes)),
    );
    Ok(())
}
