//! The ledger's HTTP API on 3 in-process replicas over the in-memory log, registry
//! and image store (no stack needed): replication, redirects, idempotency, once
//! settlements and typed errors for bad input.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use br2k_core::conformance::sample_spec;
use br2k_core::log::InMemoryLog;
use br2k_core::memory::{InMemoryImageStore, InMemoryRegistry};
use br2k_core::replica::{Effect, Replica, ReplicaConfig, ReplicaRole};
use br2k_core::{Account, Registry, Role, ServiceId};
use br2k_ledger::state::SettlementReceipt;
use br2k_ledger::{App, Command, Ledger, router};
use serde_json::{Value, json};

/// A settlement double that counts how often each key was really sent.
#[derive(Debug, Default, Clone)]
struct FakeChain {
    runs: Arc<Mutex<HashMap<String, u32>>>,
}

#[async_trait]
impl Effect<Command> for FakeChain {
    async fn lookup(&self, key: &str, _: &Command) -> br2k_core::Result<Option<Vec<u8>>> {
        Ok(self
            .runs
            .lock()
            .unwrap()
            .contains_key(key)
            .then(|| receipt(key)))
    }

    async fn run(&self, key: &str, _: &Command) -> br2k_core::Result<Vec<u8>> {
        *self.runs.lock().unwrap().entry(key.into()).or_default() += 1;
        Ok(receipt(key))
    }
}

fn receipt(key: &str) -> Vec<u8> {
    serde_json::to_vec(&SettlementReceipt {
        tx: format!("0x{:064x}", key.len()),
        block: 1,
    })
    .unwrap()
}

struct Node {
    replica: Arc<Replica<Ledger>>,
    url: String,
    server: tokio::task::JoinHandle<()>,
}

async fn cluster(n: usize, chain: &FakeChain) -> Vec<Node> {
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
    let log = InMemoryLog::new();
    let store = InMemoryImageStore::new("mem.local");
    let mut nodes = Vec::new();
    for _ in 0..n {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let mut cfg = ReplicaConfig::new(id.clone(), url.clone()).unwrap();
        cfg.snapshot_every = 20;
        cfg.max_command_bytes = 1024;
        let replica = Replica::start(
            cfg,
            Ledger::default(),
            Arc::new(log.connect()),
            Arc::new(registry.clone()),
            Arc::new(store.clone()),
            Some(Arc::new(chain.clone())),
        )
        .await
        .unwrap();
        let replica = Arc::new(replica);
        let app = router(
            App {
                replica: replica.clone(),
            },
            1024,
        );
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        nodes.push(Node {
            replica,
            url,
            server,
        });
    }
    nodes
}

async fn leader(nodes: &[Node]) -> &Node {
    for _ in 0..500 {
        if let Some(n) = nodes
            .iter()
            .find(|n| n.replica.role() == ReplicaRole::Leader)
        {
            return n;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no leader");
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

async fn post(
    c: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> (u16, Value, Option<String>) {
    let mut req = c
        .post(url)
        .header("content-type", "application/json")
        .body(body);
    if let Some(k) = key {
        req = req.header("idempotency-key", k);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let location = resp
        .headers()
        .get("location")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = resp.json().await.unwrap_or(Value::Null);
    (status, body, location)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_api_over_three_replicas() {
    let chain = FakeChain::default();
    let nodes = cluster(3, &chain).await;
    let lead = leader(&nodes).await;
    let c = client();
    let u = |p: &str| format!("{}{p}", lead.url);

    let (s, b, _) = post(
        &c,
        &u("/deposit"),
        None,
        json!({"account":"alice","amount":100}).to_string(),
    )
    .await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["balances"]["alice"], 100);
    let t = json!({"from":"alice","to":"bob","amount":30}).to_string();
    let (s, b, _) = post(&c, &u("/transfer"), Some("t1"), t.clone()).await;
    assert_eq!((s, b["balances"]["bob"].as_u64()), (200, Some(30)), "{b}");
    // A retry with the same key is not applied twice.
    let (s, b2, _) = post(&c, &u("/transfer"), Some("t1"), t).await;
    assert_eq!((s, &b2), (200, &b));

    // Bad input: typed 4xx, nothing applied.
    let cases: Vec<(&str, Option<&str>, String, u16)> = vec![
        ("/transfer", None, "{not json".into(), 400),
        (
            "/transfer",
            None,
            json!({"from":"alice","to":"bob"}).to_string(),
            400,
        ),
        (
            "/transfer",
            None,
            json!({"from":"alice","to":"bob","amount":-1}).to_string(),
            400,
        ),
        (
            "/transfer",
            None,
            json!({"from":"alice","to":"bob","amount":1,"x":1}).to_string(),
            400,
        ),
        (
            "/transfer",
            None,
            json!({"from":"alice","to":"alice","amount":1}).to_string(),
            400,
        ),
        (
            "/transfer",
            None,
            json!({"from":"a b","to":"bob","amount":1}).to_string(),
            400,
        ),
        (
            "/transfer",
            None,
            json!({"from":"nobody","to":"bob","amount":1}).to_string(),
            404,
        ),
        (
            "/transfer",
            None,
            json!({"from":"alice","to":"bob","amount":71}).to_string(),
            409,
        ),
        (
            "/deposit",
            None,
            json!({"account":"alice","amount":u64::MAX}).to_string(),
            422,
        ),
        (
            "/deposit",
            None,
            format!("{{\"account\":\"{}\",\"amount\":1}}", "x".repeat(4000)),
            413,
        ),
        (
            "/settle",
            None,
            json!({"account":"alice","amount":1}).to_string(),
            400,
        ),
        (
            "/settle",
            Some("s-x"),
            json!({"account":"nobody","amount":1}).to_string(),
            404,
        ),
        (
            "/settle",
            Some("s-y"),
            json!({"account":"alice","amount":1000}).to_string(),
            409,
        ),
    ];
    for (path, key, body, want) in cases {
        let (s, b, _) = post(&c, &u(path), key, body.clone()).await;
        assert_eq!(s, want, "{path} {body}: {b}");
        assert!(b["error"].is_string(), "typed error body: {b}");
    }

    // Settlement: once per key, even when retried.
    let settle = json!({"account":"alice","amount":20}).to_string();
    let (s, b, _) = post(&c, &u("/settle"), Some("s1"), settle.clone()).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["balance"], 50);
    let (s, again, _) = post(&c, &u("/settle"), Some("s1"), settle).await;
    assert_eq!((s, &again), (200, &b));
    assert_eq!(chain.runs.lock().unwrap()["s1"], 1);
    assert!(!chain.runs.lock().unwrap().contains_key("s-x"));

    // Followers redirect writes and reads to the leader.
    let follower = nodes.iter().find(|n| n.url != lead.url).unwrap();
    let (s, b, loc) = post(
        &c,
        &format!("{}/transfer", follower.url),
        None,
        json!({"from":"alice","to":"bob","amount":1}).to_string(),
    )
    .await;
    assert_eq!(s, 307, "{b}");
    assert_eq!(loc.as_deref(), Some(u("/transfer").as_str()));
    let r = c
        .get(format!("{}/accounts/alice", follower.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 307);
    let r = c.get(u("/accounts/alice")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["balance"], 50);
    let r = c.get(u("/accounts/nobody")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 404);

    // Every replica converges on the same state.
    let last = lead.replica.applied_index();
    for n in &nodes {
        n.replica.wait_applied(last).await;
        let local: Value = c
            .get(format!("{}/accounts?local=true", n.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(local, json!({"alice": 50, "bob": 30}), "{}", n.url);
        let st: Value = c
            .get(format!("{}/status", n.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(st["total"], 80);
    }
    for n in nodes {
        n.server.abort();
    }
}
