//! `ChainRegistry` against RPC endpoints that lie or limit: a JSON-RPC proxy in front
//! of a real anvil refuses wide `eth_getLogs` ranges (as hosted providers do) or
//! rewrites `getRecords` answers (a short answer, another service's record, a
//! placement the contract never stores).

use std::sync::Arc;

use alloy::node_bindings::{Anvil, AnvilInstance};
use alloy::sol_types::SolCall;
use alloy::transports::http::reqwest::{self, Url};
use br2k_chain::bindings::ServiceRegistry::{getRecordsCall, getRecordsReturn};
use br2k_chain::{ChainConfig, ChainRegistry};
use br2k_core::conformance::sample_spec;
use br2k_core::{Error, Placement, Registry, ServiceId, ServiceState};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

const KEY0: &str = "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";

fn anvil() -> AnvilInstance {
    let bin = std::env::var("BR2K_ANVIL_BIN")
        .expect("BR2K_ANVIL_BIN must name the anvil binary (source .stack/env)");
    Anvil::at(bin).spawn()
}

/// What the proxy does with one request: `Some(answer)` answers in place of the
/// node; `None` forwards, and then `rewrite` may change the node's answer.
type Intercept = Arc<dyn Fn(&Value) -> Option<Value> + Send + Sync>;
type Rewrite = Arc<dyn Fn(&Value, Value) -> Value + Send + Sync>;

/// A minimal HTTP/1.1 JSON-RPC proxy (keep-alive, Content-Length bodies).
async fn proxy(target: Url, intercept: Intercept, rewrite: Rewrite) -> Url {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let http = reqwest::Client::new();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            let (http, target) = (http.clone(), target.clone());
            let (intercept, rewrite) = (intercept.clone(), rewrite.clone());
            tokio::spawn(async move {
                let (rd, mut wr) = sock.into_split();
                let mut rd = BufReader::new(rd);
                loop {
                    let mut len = 0usize;
                    loop {
                        let mut line = String::new();
                        if rd.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        let l = line.trim_end();
                        if l.is_empty() {
                            break;
                        }
                        if let Some((k, v)) = l.split_once(':')
                            && k.eq_ignore_ascii_case("content-length")
                        {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; len];
                    if rd.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    let answer = match intercept(&req) {
                        Some(a) => a,
                        None => {
                            let resp = http.post(target.clone()).json(&req).send().await;
                            let Ok(resp) = resp else { return };
                            let Ok(v) = resp.json::<Value>().await else {
                                return;
                            };
                            rewrite(&req, v)
                        }
                    };
                    let out = serde_json::to_vec(&answer).unwrap();
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                        out.len()
                    );
                    if wr.write_all(head.as_bytes()).await.is_err()
                        || wr.write_all(&out).await.is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    Url::parse(&format!("http://{addr}")).unwrap()
}

fn hex_u64(v: &Value) -> Option<u64> {
    u64::from_str_radix(v.as_str()?.trim_start_matches("0x"), 16).ok()
}

fn no_rewrite() -> Rewrite {
    Arc::new(|_, v| v)
}

/// Every `getRecords` answer of the node changed by `lie`.
fn records_rewritten(lie: impl Fn(&mut getRecordsReturn) + Send + Sync + 'static) -> Rewrite {
    Arc::new(move |req, mut v| {
        let call = &req["params"][0];
        let input = call["input"]
            .as_str()
            .or(call["data"].as_str())
            .unwrap_or("");
        let Ok(bytes) = alloy::hex::decode(input) else {
            return v;
        };
        if !bytes.starts_with(&getRecordsCall::SELECTOR) {
            return v;
        }
        let Some(out) = v["result"]
            .as_str()
            .and_then(|r| alloy::hex::decode(r).ok())
        else {
            return v;
        };
        let Ok(mut ret) = getRecordsCall::abi_decode_returns(&out) else {
            return v;
        };
        lie(&mut ret);
        let encoded = getRecordsCall::abi_encode_returns(&ret);
        v["result"] = json!(format!("0x{}", alloy::hex::encode(encoded)));
        v
    })
}

async fn mine(node: &AnvilInstance, blocks: u64) {
    use alloy::providers::{Provider, ProviderBuilder};
    let p = ProviderBuilder::new().connect_http(node.endpoint_url());
    let _: Value = p
        .raw_request("anvil_mine".into(), (format!("0x{blocks:x}"),))
        .await
        .expect("anvil_mine");
}

#[tokio::test]
#[ignore = "needs stack"]
async fn log_ranges_wider_than_the_provider_allows_are_paged() {
    const LIMIT: u64 = 10;
    let node = anvil();
    let owner =
        ChainRegistry::deploy(ChainConfig::new(vec![node.endpoint_url()]).with_private_key(KEY0))
            .await
            .expect("deploy");
    let ids: Vec<ServiceId> = (0..3)
        .map(|i| ServiceId::new(format!("paged-{i}")).unwrap())
        .collect();
    for id in &ids {
        owner
            .register(id, &sample_spec("r.local"))
            .await
            .expect("register");
        mine(&node, 2 * LIMIT).await;
    }
    // Like hosted providers: a range of more than LIMIT blocks is refused.
    let refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let seen = refused.clone();
    let intercept: Intercept = Arc::new(move |req| {
        if req["method"] != "eth_getLogs" {
            return None;
        }
        let f = &req["params"][0];
        // No end block (or a tag) means the head: wider than any limit.
        let from = hex_u64(&f["fromBlock"]).unwrap_or(0);
        let to = hex_u64(&f["toBlock"]).unwrap_or(u64::MAX);
        (to.saturating_sub(from) + 1 > LIMIT).then(|| {
            seen.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            json!({"jsonrpc": "2.0", "id": req["id"],
                   "error": {"code": -32005, "message": "block range too large"}})
        })
    });
    let url = proxy(node.endpoint_url(), intercept, no_rewrite()).await;
    let mut config = ChainConfig::new(vec![url]).with_registry(owner.address());
    config.log_block_range = LIMIT;
    let reader = ChainRegistry::connect(config).await.expect("connect");
    let mut listed = reader.services().await.expect("services through the limit");
    listed.sort();
    assert_eq!(listed, ids);
    for id in &ids {
        let rec = reader.active(id).await.expect("active");
        assert_eq!(rec.state, ServiceState::Ready);
        assert_eq!(reader.history(id).await.expect("history").len(), 1);
    }
    assert_eq!(
        refused.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "no request exceeded the provider's range"
    );
}

#[tokio::test]
#[ignore = "needs stack"]
async fn short_or_foreign_record_answers_are_refused_not_trusted() {
    let node = anvil();
    let owner =
        ChainRegistry::deploy(ChainConfig::new(vec![node.endpoint_url()]).with_private_key(KEY0))
            .await
            .expect("deploy");
    let (a, b) = (
        ServiceId::new("lied-a").unwrap(),
        ServiceId::new("lied-b").unwrap(),
    );
    let mut spec_b = sample_spec("r.local");
    spec_b.replicas = 5;
    owner
        .register(&a, &sample_spec("r.local"))
        .await
        .expect("a");
    owner.register(&b, &spec_b).await.expect("b");
    for (mode, what) in [(1u8, "another service's record"), (0u8, "a short answer")] {
        let rewrite = records_rewritten(move |ret| {
            if mode == 0 {
                ret.records.clear();
            } else {
                // The record of service b, answered for service a.
                let key_b = br2k_chain::service_key(&ServiceId::new("lied-b").unwrap());
                for r in &mut ret.records {
                    r.id = key_b;
                }
            }
        });
        let url = proxy(node.endpoint_url(), Arc::new(|_| None), rewrite).await;
        let reader =
            ChainRegistry::connect(ChainConfig::new(vec![url]).with_registry(owner.address()))
                .await
                .expect("connect");
        match reader.active(&a).await {
            Ok(rec) => panic!("{what} was trusted: {rec:?}"),
            Err(e) => assert!(
                e.to_string().contains("getRecords"),
                "{what}: the error names the bad answer: {e}"
            ),
        }
    }
}

#[tokio::test]
#[ignore = "needs stack"]
async fn placements_the_contract_never_stores_are_refused_not_trusted() {
    let node = anvil();
    let owner =
        ChainRegistry::deploy(ChainConfig::new(vec![node.endpoint_url()]).with_private_key(KEY0))
            .await
            .expect("deploy");
    let id = ServiceId::new("lied-placed").unwrap();
    owner
        .register(&id, &sample_spec("r.local"))
        .await
        .expect("register");
    let placed = Placement::new("eu-1", 5).expect("placement");
    owner.set_placement(&id, &placed).await.expect("placement");
    let word = |b: &[u8]| {
        let mut w = [0u8; 32];
        w[..b.len()].copy_from_slice(b);
        alloy::primitives::B256::from(w)
    };
    let lies: Vec<(&str, alloy::primitives::B256, u64)> = vec![
        ("no lie", word(b"eu-1"), 5),
        ("an invalid cluster name", word(b"EU-1"), 5),
        ("a name with a byte after the padding", word(b"eu-1\0x"), 5),
        ("a cluster at epoch 0", word(b"eu-1"), 0),
        ("an epoch without a cluster", word(b""), 5),
    ];
    for (what, cluster, epoch) in lies {
        let rewrite = records_rewritten(move |ret| {
            for r in &mut ret.records {
                r.placement.cluster = cluster;
                r.placement.epoch = epoch;
            }
        });
        let url = proxy(node.endpoint_url(), Arc::new(|_| None), rewrite).await;
        let reader =
            ChainRegistry::connect(ChainConfig::new(vec![url]).with_registry(owner.address()))
                .await
                .expect("connect");
        match (what, reader.active(&id).await) {
            ("no lie", Ok(rec)) => assert_eq!(rec.placement, Some(placed.clone())),
            ("no lie", Err(e)) => panic!("the honest answer was refused: {e}"),
            (_, Ok(rec)) => panic!("{what} was trusted: {rec:?}"),
            (_, Err(e)) => {
                assert!(
                    matches!(
                        e,
                        Error::Backend {
                            backend: "chain",
                            ..
                        }
                    ),
                    "{what}: the typed error of a malformed answer: {e:?}"
                );
                assert!(
                    e.to_string().contains("getRecords"),
                    "{what}: the error names the bad answer: {e}"
                );
            }
        }
    }
}
