//! Process-level tests of the `ledger` binary against real components: each test
//! spawns its own anvil (registry and `Settlement` contracts), uses the stack's etcd
//! (a unique log namespace and service id per test) and primary OCI registry (a
//! throwaway registry for the tampering test), and runs replicas as child processes.
//! Needs `source .stack/env` (falls back to reading `.stack/env` of the workspace).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use alloy::node_bindings::{Anvil, AnvilInstance};
use alloy::primitives::Address;
use alloy::providers::{Provider, ProviderBuilder};
use alloy::sol_types::SolCall;
use br2k_chain::{ChainConfig, ChainRegistry};
use br2k_core::{Checkpoint, Registry, ServiceId};
use br2k_ledger::settle::{Settlement, settlement_key};
use serde_json::{Value, json};

/// Election timeout of the test replicas (etcd lease TTL).
const LEASE_TTL_SECS: u64 = 3;
/// Anvil accounts: 0 owns the registry, 1..=REPLICA_SLOTS are replicas, the next one
/// settles.
const REPLICA_SLOTS: usize = 5;
const SETTLER: usize = REPLICA_SLOTS + 1;

fn stack_env(name: &str) -> String {
    if let Ok(v) = std::env::var(name) {
        return v;
    }
    let file = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.stack/env");
    let text = std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("{name} unset and {} unreadable: {e}", file.display()));
    text.lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('\'').to_owned())
        .unwrap_or_else(|| panic!("{name} is not in {}", file.display()))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}-{:08x}", std::process::id(), rand_u32())
}

fn rand_u32() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    (t.as_nanos() as u32) ^ (std::process::id().rotate_left(16))
}

/// One test's world: an anvil, the contracts, a service id, an etcd namespace.
struct World {
    anvil: AnvilInstance,
    dir: tempfile::TempDir,
    service: String,
    namespace: String,
    registry_address: String,
    settlement: Address,
    oci_registry: String,
    snapshot_every: u64,
}

fn key(anvil: &AnvilInstance, i: usize) -> String {
    hex::encode(anvil.keys()[i].to_bytes())
}

impl World {
    fn new(name: &str, snapshot_every: u64, oci_registry: Option<String>) -> Self {
        let anvil = Anvil::at(stack_env("BR2K_ANVIL_BIN"))
            .arg("--host")
            .arg("127.0.0.1")
            .arg("--accounts")
            .arg("10")
            .try_spawn()
            .expect("spawn anvil");
        let service = unique(name);
        let accounts: Vec<String> = (1..=REPLICA_SLOTS)
            .map(|i| format!("{:#x}", anvil.addresses()[i]))
            .collect();
        let out = Command::new(env!("CARGO_BIN_EXE_ledger"))
            .args(["setup", "--service", &service, "--replica-accounts"])
            .arg(accounts.join(","))
            .arg("--settler")
            .arg(format!("{:#x}", anvil.addresses()[SETTLER]))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("BR2K_RPC_URLS", anvil.endpoint())
            .env("BR2K_PRIVATE_KEY", key(&anvil, 0))
            .env("RUST_LOG", "warn")
            .output()
            .expect("run ledger setup");
        assert!(
            out.status.success(),
            "setup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let vars: HashMap<String, String> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Self {
            dir: tempfile::tempdir().unwrap(),
            namespace: unique("ledger-test"),
            registry_address: vars["BR2K_REGISTRY_ADDRESS"].clone(),
            settlement: vars["LEDGER_SETTLEMENT_ADDRESS"].parse().unwrap(),
            oci_registry: oci_registry.unwrap_or_else(|| {
                stack_env("BR2K_OCI_REGISTRIES")
                    .split(',')
                    .next()
                    .unwrap()
                    .to_owned()
            }),
            service,
            anvil,
            snapshot_every,
        }
    }

    /// Starts replica `slot` (1..=REPLICA_SLOTS) on a free port.
    fn spawn(&self, slot: usize) -> Replica {
        self.spawn_on(slot, free_port())
    }

    fn spawn_on(&self, slot: usize, port: u16) -> Replica {
        let log = self.dir.path().join(format!("replica-{slot}-{port}.log"));
        let url = format!("http://127.0.0.1:{port}");
        let child = Command::new(env!("CARGO_BIN_EXE_ledger"))
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "info")
            .env("BR2K_RPC_URLS", self.anvil.endpoint())
            .env("BR2K_REGISTRY_ADDRESS", &self.registry_address)
            .env("BR2K_PRIVATE_KEY", key(&self.anvil, slot))
            .env("BR2K_ETCD_ENDPOINTS", stack_env("BR2K_ETCD_ENDPOINTS"))
            .env("LEDGER_OCI_REGISTRY", &self.oci_registry)
            .env("LEDGER_SETTLER_KEY", key(&self.anvil, SETTLER))
            .env(
                "LEDGER_SETTLEMENT_ADDRESS",
                format!("{:#x}", self.settlement),
            )
            .env("LEDGER_SERVICE", &self.service)
            .env("LEDGER_NAMESPACE", &self.namespace)
            .env("LEDGER_LISTEN", format!("127.0.0.1:{port}"))
            .env("LEDGER_SNAPSHOT_EVERY", self.snapshot_every.to_string())
            .env("LEDGER_LEASE_TTL_SECS", LEASE_TTL_SECS.to_string())
            .env("LEDGER_REQUEST_TIMEOUT_MS", "5000")
            .env("LEDGER_MAX_BODY", "4096")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn ledger");
        Replica {
            slot,
            url,
            log,
            child: Some(child),
        }
    }

    async fn chain_registry(&self) -> ChainRegistry {
        let urls = ChainConfig::parse_urls(&self.anvil.endpoint()).unwrap();
        ChainRegistry::connect(
            ChainConfig::new(urls)
                .with_private_key(key(&self.anvil, 0))
                .with_registry(self.registry_address.parse().unwrap()),
        )
        .await
        .unwrap()
    }

    /// Settlement transactions on chain, by settlement key (reverted ones included).
    async fn settlement_txs(&self) -> HashMap<alloy::primitives::B256, u32> {
        let p = ProviderBuilder::new().connect_http(self.anvil.endpoint_url());
        let head = p.get_block_number().await.unwrap();
        let mut seen = HashMap::new();
        for n in 0..=head {
            let block = p
                .get_block_by_number(n.into())
                .full()
                .await
                .unwrap()
                .expect("block");
            for tx in block.transactions.txns() {
                use alloy::consensus::Transaction as _;
                if tx.to() != Some(self.settlement) {
                    continue;
                }
                let call = Settlement::settleCall::abi_decode(tx.input()).expect("a settle call");
                *seen.entry(call.key).or_insert(0) += 1;
            }
        }
        seen
    }

    async fn settled_count(&self) -> u64 {
        let p = ProviderBuilder::new().connect_http(self.anvil.endpoint_url());
        let c = Settlement::new(self.settlement, &p);
        c.count().call().await.unwrap().saturating_to()
    }
}

/// A `ledger` child process.
struct Replica {
    slot: usize,
    url: String,
    log: PathBuf,
    child: Option<Child>,
}

impl Replica {
    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit by itself.
    fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < within {
            if let Some(s) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
        }
        self.kill();
    }
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(15))
        .build()
        .unwrap()
}

async fn status(c: &reqwest::Client, url: &str) -> Option<Value> {
    let r = c.get(format!("{url}/status")).send().await.ok()?;
    r.json().await.ok()
}

/// Waits until one of `urls` reports itself leader; returns its index.
async fn wait_leader(c: &reqwest::Client, urls: &[String], within: Duration) -> usize {
    let start = Instant::now();
    loop {
        for (i, u) in urls.iter().enumerate() {
            if let Some(s) = status(c, u).await
                && s["role"] == "leader"
            {
                return i;
            }
        }
        assert!(start.elapsed() < within, "no leader among {urls:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The replica that last gave a final answer, per cluster (keyed by its first URL). A
/// request starts there: starting at a paused follower would cost the whole client
/// timeout per request (a stopped process still accepts connections).
static LAST_ANSWERED: Mutex<BTreeMap<String, String>> = Mutex::new(BTreeMap::new());

/// Sends a request to the cluster, following redirects to the leader and retrying on
/// elections and dead replicas (same idempotency key) until a final answer or the
/// deadline. Returns the status and JSON body of the final answer.
async fn call(
    c: &reqwest::Client,
    urls: &[String],
    path: &str,
    key: Option<&str>,
    body: Option<&str>,
    deadline: Duration,
) -> Option<(u16, Value)> {
    let start = Instant::now();
    let last = LAST_ANSWERED.lock().unwrap().get(&urls[0]).cloned();
    let mut next = last
        .and_then(|l| urls.iter().position(|u| *u == l))
        .unwrap_or(0);
    let mut target = urls[next].clone();
    while start.elapsed() < deadline {
        let mut req = match body {
            Some(b) => c.post(format!("{target}{path}")).body(b.to_owned()),
            None => c.get(format!("{target}{path}")),
        };
        req = req.header("content-type", "application/json");
        if let Some(k) = key {
            req = req.header("idempotency-key", k);
        }
        match req.send().await {
            Ok(r) if r.status().as_u16() == 307 => {
                let loc = r.headers()["location"].to_str().unwrap().to_owned();
                target = loc.strip_suffix(path).unwrap_or(&loc).to_owned();
                continue;
            }
            Ok(r) if r.status().as_u16() == 503 => {}
            Ok(r) => {
                let s = r.status().as_u16();
                let v = r.json().await.unwrap_or(Value::Null);
                // A request stranded on a deposed leader is retried (same key).
                if s != 409 || v["error"] != "conflict" {
                    if urls.contains(&target) {
                        let mut last = LAST_ANSWERED.lock().unwrap();
                        last.insert(urls[0].clone(), target);
                    }
                    return Some((s, v));
                }
            }
            Err(_) => {}
        }
        next = (next + 1) % urls.len();
        target = urls[next].clone();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Waits until every replica in `urls` applied at least what the leader did, then
/// returns their local account tables.
async fn converged(c: &reqwest::Client, urls: &[String]) -> Vec<Value> {
    let start = Instant::now();
    let leader = wait_leader(c, urls, Duration::from_secs(60)).await;
    let target = status(c, &urls[leader]).await.unwrap()["applied_index"]
        .as_u64()
        .unwrap();
    let mut out = Vec::new();
    for u in urls {
        loop {
            let s = status(c, u).await;
            if s.as_ref().and_then(|s| s["applied_index"].as_u64()) >= Some(target) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(90),
                "{u} does not catch up: {s:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let local: Value = c
            .get(format!("{u}/accounts?local=true"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        out.push(local);
    }
    out
}

fn dump_logs(replicas: &[&Replica]) -> String {
    replicas
        .iter()
        .map(|r| {
            let t = r.log_text();
            let tail: Vec<&str> = t.lines().rev().take(15).collect();
            format!(
                "--- replica {} ({})\n{}",
                r.slot,
                r.url,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

async fn must(
    c: &reqwest::Client,
    urls: &[String],
    path: &str,
    key: Option<&str>,
    body: Value,
) -> Value {
    let (s, v) = call(
        c,
        urls,
        path,
        key,
        Some(&body.to_string()),
        Duration::from_secs(60),
    )
    .await
    .unwrap_or_else(|| panic!("{path} {body}: no answer"));
    assert_eq!(s, 200, "{path} {body}: {v}");
    v
}

/// Deposits `amount` into `account` (no idempotency key); panics unless it succeeds.
async fn deposit(c: &reqwest::Client, urls: &[String], account: &str, amount: u64) {
    let body = json!({"account": account, "amount": amount});
    must(c, urls, "/deposit", None, body).await;
}

/// `n` transfers of `amount` from `from` to `to`, one after the other, with the
/// idempotency keys `{prefix}-0`, `{prefix}-1`, ...; panics unless each succeeds.
async fn transfers(
    c: &reqwest::Client,
    urls: &[String],
    prefix: &str,
    n: u64,
    (from, to): (&str, &str),
    amount: u64,
) {
    for i in 0..n {
        let body = json!({"from": from, "to": to, "amount": amount});
        must(c, urls, "/transfer", Some(&format!("{prefix}-{i}")), body).await;
    }
}

/// Waits (at most 60 s) until the chain records a checkpoint of state version
/// `min_version` or newer for `id`, and returns it.
async fn wait_checkpoint(registry: &ChainRegistry, id: &ServiceId, min_version: u64) -> Checkpoint {
    let start = Instant::now();
    loop {
        let rec = registry.active(id).await.unwrap();
        if let Some(cp) = rec.checkpoint.filter(|cp| cp.state_version >= min_version) {
            return cp;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no checkpoint of version {min_version} or newer"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Kill the leader under load: a new leader serves, no acknowledged transfer is
/// lost, no settlement is sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs stack"]
async fn leader_killed_under_load_loses_nothing_and_settles_once() {
    let w = World::new("ledger-kill", 25, None);
    let mut rs: Vec<Replica> = (1..=3).map(|s| w.spawn(s)).collect();
    let urls: Vec<String> = rs.iter().map(|r| r.url.clone()).collect();
    let c = http();
    wait_leader(&c, &urls, Duration::from_secs(60)).await;
    const ACCOUNTS: usize = 4;
    const INITIAL: u64 = 1_000_000;
    for a in 0..ACCOUNTS {
        must(
            &c,
            &urls,
            "/deposit",
            Some(&format!("init-{a}")),
            json!({"account": format!("a{a}"), "amount": INITIAL}),
        )
        .await;
    }
    must(
        &c,
        &urls,
        "/deposit",
        Some("init-t"),
        json!({"account": "treasury", "amount": 1000}),
    )
    .await;

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<(usize, usize, u64)>>> = Arc::default();
    let unknown = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut clients = Vec::new();
    for cl in 0..ACCOUNTS {
        let (urls, stop, acked, unknown, c) = (
            urls.clone(),
            stop.clone(),
            acked.clone(),
            unknown.clone(),
            c.clone(),
        );
        clients.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (from, to, amount) = (cl, (cl + 1) % ACCOUNTS, 1 + (i % 7));
                let body =
                    json!({"from": format!("a{from}"), "to": format!("a{to}"), "amount": amount})
                        .to_string();
                let key = format!("t-{cl}-{i}");
                match call(
                    &c,
                    &urls,
                    "/transfer",
                    Some(&key),
                    Some(&body),
                    Duration::from_secs(90),
                )
                .await
                {
                    Some((200, _)) => acked.lock().unwrap().push((from, to, amount)),
                    Some((s, v)) => panic!("transfer {key}: {s} {v}"),
                    None => {
                        unknown.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                i += 1;
            }
        }));
    }
    let settled: Arc<Mutex<Vec<String>>> = Arc::default();
    let settler = {
        let (urls, stop, settled, c) = (urls.clone(), stop.clone(), settled.clone(), c.clone());
        tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = format!("s-{i}");
                let body = json!({"account": "treasury", "amount": 1}).to_string();
                match call(
                    &c,
                    &urls,
                    "/settle",
                    Some(&key),
                    Some(&body),
                    Duration::from_secs(90),
                )
                .await
                {
                    Some((200, v)) => {
                        assert_eq!(v["key"], key.as_str(), "{v}");
                        settled.lock().unwrap().push(key);
                    }
                    other => panic!("settle {key}: {other:?}"),
                }
                i += 1;
            }
        })
    };
    // Let the load run, then kill the leader process (SIGKILL: nothing resigned).
    tokio::time::sleep(Duration::from_secs(4)).await;
    let before = acked.lock().unwrap().len();
    let leader = wait_leader(&c, &urls, Duration::from_secs(30)).await;
    let killed_at = Instant::now();
    rs[leader].kill();
    let survivors: Vec<String> = urls
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != leader)
        .map(|(_, u)| u.clone())
        .collect();
    let new_leader = wait_leader(&c, &survivors, Duration::from_secs(60)).await;
    let elected = killed_at.elapsed();
    // The new leader serves writes.
    must(
        &c,
        &survivors,
        "/deposit",
        Some("after-kill"),
        json!({"account": "a0", "amount": 1}),
    )
    .await;
    let serving = killed_at.elapsed();
    eprintln!(
        "leader killed: new leader {} elected after {elected:?}, serving writes after {serving:?} (lease TTL {LEASE_TTL_SECS} s); {before} transfers acknowledged before the kill",
        survivors[new_leader]
    );
    assert!(
        serving < Duration::from_secs(LEASE_TTL_SECS + 45),
        "no new leader served in time\n{}",
        dump_logs(&rs.iter().collect::<Vec<_>>())
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for h in clients {
        h.await.unwrap();
    }
    settler.await.unwrap();
    assert_eq!(
        unknown.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "transfers without an answer"
    );

    // No acknowledged transfer lost: balances equal initial + acknowledged moves.
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() > before, "load continued after the failover");
    let mut expected: BTreeMap<String, i64> = (0..ACCOUNTS)
        .map(|a| (format!("a{a}"), INITIAL as i64))
        .collect();
    *expected.get_mut("a0").unwrap() += 1;
    for (from, to, amount) in &acked {
        *expected.get_mut(&format!("a{from}")).unwrap() -= *amount as i64;
        *expected.get_mut(&format!("a{to}")).unwrap() += *amount as i64;
    }
    let settled = settled.lock().unwrap().clone();
    let mut expected = json!(expected);
    expected["treasury"] = json!(1000 - settled.len() as i64);
    let (s, all) = call(
        &c,
        &survivors,
        "/accounts",
        None,
        None,
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    assert_eq!(s, 200);
    assert_eq!(all, expected, "{} acknowledged transfers", acked.len());
    for local in converged(&c, &survivors).await {
        assert_eq!(local, expected);
    }

    // No settlement executed twice: one transaction per key on chain, all recorded.
    let txs = w.settlement_txs().await;
    let keys: HashSet<_> = settled.iter().map(|k| settlement_key(k)).collect();
    assert!(!settled.is_empty());
    for (k, n) in &txs {
        assert_eq!(*n, 1, "settlement {k} sent {n} times");
        assert!(
            keys.contains(k),
            "settlement {k} on chain but not acknowledged"
        );
    }
    assert_eq!(
        txs.len(),
        settled.len(),
        "every acknowledged settlement is on chain once"
    );
    assert_eq!(w.settled_count().await, settled.len() as u64);
    eprintln!(
        "{} transfers and {} settlements acknowledged",
        acked.len(),
        settled.len()
    );
}

/// A stopped follower (SIGSTOP) catches up after SIGCONT; a killed follower restarts
/// and catches up; bad input gets typed 4xx answers and the replicas stay equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs stack"]
async fn follower_rejoins_and_bad_input_is_refused() {
    let w = World::new("ledger-follower", 15, None);
    let mut rs: Vec<Replica> = (1..=3).map(|s| w.spawn(s)).collect();
    let urls: Vec<String> = rs.iter().map(|r| r.url.clone()).collect();
    let c = http();
    let leader = wait_leader(&c, &urls, Duration::from_secs(60)).await;
    deposit(&c, &urls, "alice", 500).await;

    let f = (leader + 1) % 3;
    rs[f].signal("-STOP");
    transfers(&c, &urls, "p", 20, ("alice", "bob"), 2).await;
    tokio::time::sleep(Duration::from_secs(LEASE_TTL_SECS + 1)).await;
    rs[f].signal("-CONT");
    let expected = json!({"alice": 460, "bob": 40});
    for local in converged(&c, &urls).await {
        assert_eq!(
            local,
            expected,
            "{}",
            dump_logs(&rs.iter().collect::<Vec<_>>())
        );
    }

    // Kill a follower, write on, restart it on the same address: it catches up.
    let leader = wait_leader(&c, &urls, Duration::from_secs(60)).await;
    let f = (leader + 2) % 3;
    let port: u16 = rs[f].url.rsplit(':').next().unwrap().parse().unwrap();
    let slot = rs[f].slot;
    rs[f].kill();
    transfers(&c, &urls, "q", 20, ("bob", "carol"), 1).await;
    rs[f] = w.spawn_on(slot, port);

    // Bad input: typed 4xx, nothing applied.
    let big = format!("{{\"account\":\"{}\",\"amount\":1}}", "x".repeat(8000));
    let cases: Vec<(&str, Option<&str>, String, u16)> = vec![
        ("/transfer", None, "{not json".into(), 400),
        (
            "/transfer",
            None,
            json!({"from": "alice", "to": "bob", "amount": "1"}).to_string(),
            400,
        ),
        (
            "/transfer",
            None,
            json!({"from": "alice", "to": "bob", "amount": 0}).to_string(),
            400,
        ),
        (
            "/transfer",
            None,
            json!({"from": "nobody", "to": "bob", "amount": 1}).to_string(),
            404,
        ),
        (
            "/transfer",
            None,
            json!({"from": "alice", "to": "bob", "amount": 461}).to_string(),
            409,
        ),
        ("/deposit", None, big, 413),
        (
            "/settle",
            None,
            json!({"account": "alice", "amount": 1}).to_string(),
            400,
        ),
        (
            "/settle",
            Some("bad-1"),
            json!({"account": "nobody", "amount": 1}).to_string(),
            404,
        ),
        (
            "/settle",
            Some("bad-2"),
            json!({"account": "alice", "amount": 461}).to_string(),
            409,
        ),
    ];
    for (path, key, body, want) in cases {
        let (s, v) = call(&c, &urls, path, key, Some(&body), Duration::from_secs(60))
            .await
            .unwrap_or_else(|| panic!("{path}: no answer"));
        assert_eq!(s, want, "{path} {}: {v}", &body[..body.len().min(80)]);
        assert!(v["error"].is_string(), "typed error: {v}");
    }
    let expected = json!({"alice": 460, "bob": 20, "carol": 20});
    for local in converged(&c, &urls).await {
        assert_eq!(
            local,
            expected,
            "{}",
            dump_logs(&rs.iter().collect::<Vec<_>>())
        );
    }
    assert_eq!(
        w.settled_count().await,
        0,
        "refused settlements sent nothing"
    );
}

/// A fourth replica joins from the newest checkpoint (snapshot on the primary OCI
/// registry, checkpoint on chain) instead of replaying the whole log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs stack"]
async fn fourth_replica_joins_from_a_checkpoint() {
    let w = World::new("ledger-join", 10, None);
    let rs: Vec<Replica> = (1..=3).map(|s| w.spawn(s)).collect();
    let mut urls: Vec<String> = rs.iter().map(|r| r.url.clone()).collect();
    let c = http();
    wait_leader(&c, &urls, Duration::from_secs(60)).await;
    deposit(&c, &urls, "alice", 1000).await;
    const N: u64 = 60;
    transfers(&c, &urls, "j", N, ("alice", "bob"), 3).await;
    // Two checkpoints recorded, so the log behind the older one is compacted.
    let registry = w.chain_registry().await;
    let id = ServiceId::new(&w.service).unwrap();
    let cp = wait_checkpoint(&registry, &id, 2).await;
    let rec = registry.active(&id).await.unwrap();
    assert!(rec.location.is_some(), "leader location recorded on chain");
    let joined = w.spawn(4);
    urls.push(joined.url.clone());
    let expected = json!({"alice": 1000 - 3 * N, "bob": 3 * N});
    for local in converged(&c, &urls).await {
        assert_eq!(local, expected, "{}", dump_logs(&[&joined]));
    }
    let st = status(&c, &joined.url).await.unwrap();
    let applied_here = st["applied_here"].as_u64().unwrap();
    let text = joined.log_text();
    assert!(text.contains("restored checkpoint"), "{text}");
    // A full replay would apply all N + 1 commands here.
    assert!(
        applied_here < N + 1,
        "joined by replaying {applied_here} commands (checkpoint at {})",
        cp.log_index
    );
    eprintln!(
        "joined from checkpoint v{} at index {}: applied {applied_here} of {} commands locally",
        cp.state_version,
        cp.log_index,
        N + 1
    );
}

/// A docker-registry of our own (the test tampers with its storage).
struct OwnRegistry {
    addr: String,
    root: tempfile::TempDir,
    child: Child,
}

impl OwnRegistry {
    fn spawn() -> Self {
        let root = tempfile::tempdir().unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let config = root.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                root.path().join("data").display()
            ),
        )
        .unwrap();
        let child = Command::new(stack_env("BR2K_REGISTRY_BIN"))
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn docker-registry");
        let start = Instant::now();
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "registry did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { addr, root, child }
    }

    fn blob(&self, hex: &str) -> PathBuf {
        self.root
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for OwnRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A snapshot whose bytes do not match the recorded checkpoint digest is refused: the
/// replica does not start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs stack"]
async fn tampered_snapshot_is_refused() {
    let oci = OwnRegistry::spawn();
    let w = World::new("ledger-tamper", 5, Some(oci.addr.clone()));
    let mut first = w.spawn(1);
    let urls = vec![first.url.clone()];
    let c = http();
    wait_leader(&c, &urls, Duration::from_secs(60)).await;
    deposit(&c, &urls, "alice", 100).await;
    transfers(&c, &urls, "x", 12, ("alice", "bob"), 1).await;
    let registry = w.chain_registry().await;
    let id = ServiceId::new(&w.service).unwrap();
    let cp = wait_checkpoint(&registry, &id, 1).await;
    first.kill();
    // Corrupt the snapshot layer in the registry's storage (same length).
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(oci.blob(cp.snapshot.hex().as_str())).unwrap())
            .unwrap();
    let layer = manifest["layers"][0]["digest"].as_str().unwrap();
    let path = oci.blob(layer.strip_prefix("sha256:").unwrap());
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x55;
    std::fs::write(&path, bytes).unwrap();

    let mut second = w.spawn(2);
    let exit = second
        .wait_exit(Duration::from_secs(60))
        .unwrap_or_else(|| {
            panic!(
                "a replica started from a tampered snapshot:\n{}",
                second.log_text()
            )
        });
    assert!(!exit.success());
    let text = second.log_text();
    assert!(text.contains("tampered"), "{text}");
}

/// The leader sends a settlement and dies before logging its result (anvil mines only
/// on demand here, so the transaction is pending at the kill and mined right after):
/// the new leader finds it on chain by its key (`Effect::lookup`) and never sends a
/// second transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs stack"]
async fn inflight_settlement_is_resolved_by_key_after_leader_kill() {
    use alloy::eips::BlockNumberOrTag;
    let w = World::new("ledger-inflight", 1000, None);
    let mut rs: Vec<Replica> = (1..=3).map(|s| w.spawn(s)).collect();
    let urls: Vec<String> = rs.iter().map(|r| r.url.clone()).collect();
    let c = http();
    wait_leader(&c, &urls, Duration::from_secs(60)).await;
    deposit(&c, &urls, "treasury", 100).await;
    let leader = wait_leader(&c, &urls, Duration::from_secs(60)).await;

    let p = ProviderBuilder::new().connect_http(w.anvil.endpoint_url());
    let _: Value = p
        .raw_request("evm_setAutomine".into(), (false,))
        .await
        .unwrap();
    let settle = {
        let (c, urls) = (c.clone(), urls.clone());
        tokio::spawn(async move {
            let body = json!({"account": "treasury", "amount": 7}).to_string();
            call(
                &c,
                &urls,
                "/settle",
                Some("inflight"),
                Some(&body),
                Duration::from_secs(120),
            )
            .await
        })
    };
    // Wait until the leader's settlement transaction is pending.
    let start = Instant::now();
    let pending = loop {
        let block = p
            .get_block_by_number(BlockNumberOrTag::Pending)
            .full()
            .await
            .unwrap();
        let mut found = None;
        if let Some(b) = block {
            use alloy::consensus::Transaction as _;
            for t in b.transactions.txns() {
                if t.to() == Some(w.settlement) {
                    found = Some(*t.inner.tx_hash());
                }
            }
        }
        if let Some(h) = found {
            break h;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no pending settlement"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    rs[leader].kill();
    let _: Value = p.raw_request("evm_mine".into(), ()).await.unwrap();
    let _: Value = p
        .raw_request("evm_setAutomine".into(), (true,))
        .await
        .unwrap();

    let (s, v) = settle.await.unwrap().expect("the settlement is answered");
    assert_eq!(s, 200, "{v}\n{}", dump_logs(&rs.iter().collect::<Vec<_>>()));
    assert_eq!(
        v["settlement"]["receipt"]["tx"],
        format!("{pending:#x}"),
        "{v}"
    );
    assert_eq!(v["balance"], 93);
    let txs = w.settlement_txs().await;
    assert_eq!(txs.get(&settlement_key("inflight")), Some(&1), "{txs:?}");
    assert_eq!(txs.len(), 1);
    assert_eq!(w.settled_count().await, 1);
    // The new leader looked the settlement up instead of running it.
    let survivors: Vec<String> = urls
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != leader)
        .map(|(_, u)| u.clone())
        .collect();
    let now = wait_leader(&c, &survivors, Duration::from_secs(60)).await;
    let st = status(&c, &survivors[now]).await.unwrap();
    assert_eq!(st["effects_run"], 0, "{st}");
    for local in converged(&c, &survivors).await {
        assert_eq!(local, json!({"treasury": 93}));
    }
}

/// A leader paused (SIGSTOP) past its lease is replaced; once resumed it is fenced:
/// its writes are redirected, never applied, and all replicas stay equal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs stack"]
async fn paused_leader_is_fenced_after_resuming() {
    let w = World::new("ledger-paused", 1000, None);
    let rs: Vec<Replica> = (1..=3).map(|s| w.spawn(s)).collect();
    let urls: Vec<String> = rs.iter().map(|r| r.url.clone()).collect();
    let c = http();
    wait_leader(&c, &urls, Duration::from_secs(60)).await;
    deposit(&c, &urls, "alice", 100).await;
    let old = wait_leader(&c, &urls, Duration::from_secs(60)).await;
    rs[old].signal("-STOP");
    let survivors: Vec<String> = urls
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != old)
        .map(|(_, u)| u.clone())
        .collect();
    wait_leader(&c, &survivors, Duration::from_secs(60)).await;
    transfers(&c, &survivors, "z", 10, ("alice", "bob"), 1).await;
    rs[old].signal("-CONT");
    // Straight to the deposed leader, without following redirects.
    let body = json!({"from": "alice", "to": "bob", "amount": 5}).to_string();
    let r = c
        .post(format!("{}/transfer", urls[old]))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    assert!(
        s == 307 || s == 503,
        "deposed leader answered {s}: {:?}",
        r.text().await
    );
    let expected = json!({"alice": 90, "bob": 10});
    for local in converged(&c, &urls).await {
        assert_eq!(
            local,
            expected,
            "{}",
            dump_logs(&rs.iter().collect::<Vec<_>>())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs stack"]
async fn only_the_settler_settles_and_a_different_settlement_of_a_key_is_a_conflict() {
    use br2k_core::replica::Effect;
    use br2k_ledger::{Command as LedgerCommand, SettleEffect};
    let w = World::new("settler", 0, None);
    let rpc: alloy::transports::http::reqwest::Url = w.anvil.endpoint().parse().unwrap();
    let settle = |account: &str, amount: u64| LedgerCommand::Settle {
        key: "s-1".into(),
        account: account.into(),
        amount,
    };
    // Another account (here the registry's owner) cannot settle.
    let stranger = SettleEffect::new(rpc.clone(), w.settlement, &key(&w.anvil, 0)).unwrap();
    match stranger.run("s-1", &settle("alice", 10)).await {
        Err(e) => assert_eq!(e.kind(), br2k_core::ErrorKind::PermissionDenied, "{e}"),
        Ok(r) => panic!("a stranger settled: {}", String::from_utf8_lossy(&r)),
    }
    let settler = SettleEffect::new(rpc, w.settlement, &key(&w.anvil, SETTLER)).unwrap();
    assert_eq!(
        settler.lookup("s-1", &settle("alice", 10)).await.unwrap(),
        None
    );
    let done = settler
        .run("s-1", &settle("alice", 10))
        .await
        .expect("settle");
    // After a leader change the lookup finds it only for the same account and amount.
    assert_eq!(
        settler.lookup("s-1", &settle("alice", 10)).await.unwrap(),
        Some(done)
    );
    for other in [settle("bob", 10), settle("alice", 11)] {
        match settler.lookup("s-1", &other).await {
            Err(e) => assert_eq!(e.kind(), br2k_core::ErrorKind::Conflict, "{e}"),
            Ok(r) => panic!("{other:?} reported as settled: {r:?}"),
        }
        match settler.run("s-1", &other).await {
            Err(e) => assert_eq!(e.kind(), br2k_core::ErrorKind::Conflict, "{e}"),
            Ok(r) => panic!("{other:?} settled: {}", String::from_utf8_lossy(&r)),
        }
    }
    assert_eq!(settler.count().await.unwrap(), 1);
}
