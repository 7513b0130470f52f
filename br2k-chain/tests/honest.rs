//! Honest chain reads against real anvil nodes (each test spawns its own, so reverts
//! disturb no one): the chain id is checked on every endpoint, records are read at a
//! configured depth and accepted only with a quorum of agreeing endpoints (a lying
//! endpoint is a JSON-RPC proxy in front of anvil), the change stream rewinds over a
//! reorg, and a write reorged out of its block is never reported confirmed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use alloy::node_bindings::{Anvil, AnvilInstance};
use alloy::providers::{Provider, ProviderBuilder};
use alloy::sol_types::SolCall;
use alloy::transports::http::reqwest::{self, Url};
use br2k_chain::bindings::ServiceRegistry::getRecordsCall;
use br2k_chain::{ChainConfig, ChainRegistry, ReadDepth};
use br2k_core::conformance::sample_spec;
use br2k_core::{ChangeKind, Registry, ServiceId};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

fn spawn(chain_id: Option<u64>) -> AnvilInstance {
    let bin = std::env::var("BR2K_ANVIL_BIN")
        .expect("BR2K_ANVIL_BIN must name the anvil binary (source .stack/env)");
    let mut a = Anvil::at(bin).arg("--host").arg("127.0.0.1");
    if let Some(id) = chain_id {
        a = a.chain_id(id);
    }
    a.try_spawn().expect("spawn anvil")
}

fn key(node: &AnvilInstance, i: usize) -> String {
    hex::encode(node.keys()[i].to_bytes())
}

fn fresh(name: &str) -> ServiceId {
    ServiceId::new(format!("{name}-{:08x}", rand::random::<u32>())).expect("id")
}

async fn deploy(node: &AnvilInstance) -> ChainRegistry {
    ChainRegistry::deploy(
        ChainConfig::new(vec![node.endpoint_url()]).with_private_key(key(node, 0)),
    )
    .await
    .expect("deploy")
}

async fn raw(node: &AnvilInstance, method: &'static str, params: Value) -> Value {
    let p = ProviderBuilder::new().connect_http(node.endpoint_url());
    p.raw_request(method.into(), params)
        .await
        .unwrap_or_else(|e| panic!("{method}: {e}"))
}

async fn head(node: &AnvilInstance) -> u64 {
    let p = ProviderBuilder::new().connect_http(node.endpoint_url());
    p.get_block_number().await.expect("block number")
}

/// Rewrites the node's answer to a request.
type Rewrite = Arc<dyn Fn(&Value, Value) -> Value + Send + Sync>;

/// A minimal HTTP/1.1 JSON-RPC proxy (keep-alive, Content-Length bodies) that drops
/// every connection while `down` is set.
async fn proxy(target: Url, rewrite: Rewrite, down: Arc<AtomicBool>) -> Url {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let http = reqwest::Client::new();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            if down.load(Ordering::Relaxed) {
                continue;
            }
            let (http, target, rewrite) = (http.clone(), target.clone(), rewrite.clone());
            let down = down.clone();
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
                    if down.load(Ordering::Relaxed) {
                        return;
                    }
                    let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                    let Ok(resp) = http.post(target.clone()).json(&req).send().await else {
                        return;
                    };
                    let Ok(v) = resp.json::<Value>().await else {
                        return;
                    };
                    let out = serde_json::to_vec(&rewrite(&req, v)).unwrap();
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

fn honest() -> Rewrite {
    Arc::new(|_, v| v)
}

/// A proxy that answers every `getRecords` call with `lie` applied to the records.
fn lying(lie: fn(&mut <getRecordsCall as SolCall>::Return)) -> Rewrite {
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
        v["result"] = json!(format!(
            "0x{}",
            alloy::hex::encode(getRecordsCall::abi_encode_returns(&ret))
        ));
        v
    })
}

/// Claims the service does not exist (would remove its workload).
fn says_not_found(ret: &mut <getRecordsCall as SolCall>::Return) {
    for r in &mut ret.records {
        r.exists = false;
    }
}

/// Claims another replica count.
fn says_nine_replicas(ret: &mut <getRecordsCall as SolCall>::Return) {
    for r in &mut ret.records {
        r.replicas = 9;
    }
}

#[tokio::test]
#[ignore = "needs stack"]
async fn endpoints_of_another_chain_are_refused_without_a_configured_chain_id() {
    let a = spawn(None);
    let b = spawn(Some(999));
    let owner = deploy(&a).await;
    // Also a registry at the same address on the other chain (same key, nonce 0).
    let other = deploy(&b).await;
    assert_eq!(owner.address(), other.address());
    let e = ChainRegistry::connect(
        ChainConfig::new(vec![a.endpoint_url(), b.endpoint_url()]).with_registry(owner.address()),
    )
    .await
    .expect_err("endpoints of two chains");
    assert_eq!(e.kind(), br2k_core::ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains("chain id"), "{e}");

    // An endpoint down at connect is checked before its first use: when it comes up
    // serving the other chain, its records are never read.
    let down = Arc::new(AtomicBool::new(true));
    let late = proxy(b.endpoint_url(), honest(), down.clone()).await;
    let a_down = Arc::new(AtomicBool::new(false));
    let via_a = proxy(a.endpoint_url(), honest(), a_down.clone()).await;
    let reader =
        ChainRegistry::connect(ChainConfig::new(vec![via_a, late]).with_registry(owner.address()))
            .await
            .expect("connect: the chain id learnt from the endpoint that answers");
    assert_eq!(reader.chain_id(), 31337);
    let id = fresh("chain");
    other
        .register(&id, &sample_spec("r.local"))
        .await
        .expect("registered on the other chain only");
    down.store(false, Ordering::Relaxed);
    a_down.store(true, Ordering::Relaxed);
    let e = reader
        .active(&id)
        .await
        .expect_err("the other chain's record is not read");
    assert_eq!(e.kind(), br2k_core::ErrorKind::Unavailable, "{e}");
    assert!(e.to_string().contains("chain id"), "{e}");
}

#[tokio::test]
#[ignore = "needs stack"]
async fn records_are_read_at_the_configured_depth() {
    let node = spawn(None);
    let owner = deploy(&node).await;
    let id = fresh("depth");
    owner
        .register(&id, &sample_spec("r.local"))
        .await
        .expect("register");
    raw(&node, "anvil_mine", json!(["0x3"])).await;
    let reader = ChainRegistry::connect(
        ChainConfig::new(vec![node.endpoint_url()])
            .with_registry(owner.address())
            .with_read_depth(ReadDepth::Behind(2)),
    )
    .await
    .expect("connect");
    let before = sample_spec("r.local").replicas;
    owner.set_replicas(&id, before + 1).await.expect("scale");
    let at = head(&node).await;
    let rec = reader.active(&id).await.expect("read");
    assert_eq!(rec.as_of, Some(at - 2), "read two blocks below the head");
    assert_eq!(rec.replicas, before, "the change is not 2 blocks deep yet");
    raw(&node, "anvil_mine", json!(["0x2"])).await;
    let rec = reader.active(&id).await.expect("read");
    assert_eq!(rec.replicas, before + 1, "now it is");
    assert_eq!(
        "latest-2".parse::<ReadDepth>().unwrap(),
        ReadDepth::Behind(2)
    );
    assert_eq!(
        "finalized".parse::<ReadDepth>().unwrap(),
        ReadDepth::Finalized
    );
    assert!("soon".parse::<ReadDepth>().is_err());
}

#[tokio::test]
#[ignore = "needs stack"]
async fn a_quorum_of_endpoints_must_agree_on_the_block_and_the_record() {
    let node = spawn(None);
    let owner = deploy(&node).await;
    let id = fresh("quorum");
    let spec = sample_spec("r.local");
    owner.register(&id, &spec).await.expect("register");
    let up = || Arc::new(AtomicBool::new(false));
    let liar = proxy(node.endpoint_url(), lying(says_not_found), up()).await;
    let liar2 = proxy(node.endpoint_url(), lying(says_nine_replicas), up()).await;
    let good = proxy(node.endpoint_url(), honest(), up()).await;
    let good2 = proxy(node.endpoint_url(), honest(), up()).await;

    // One liar of three, first in line: with a quorum of 2 the honest answer wins.
    let reader = ChainRegistry::connect(
        ChainConfig::new(vec![liar.clone(), good.clone(), good2])
            .with_registry(owner.address())
            .with_quorum(2),
    )
    .await
    .expect("connect");
    let rec = reader.active(&id).await.expect("the honest record");
    assert_eq!(rec.replicas, spec.replicas);

    // Two liars telling different lies: no quorum, a typed error and no record.
    let reader = ChainRegistry::connect(
        ChainConfig::new(vec![liar, liar2, good])
            .with_registry(owner.address())
            .with_quorum(2),
    )
    .await
    .expect("connect");
    let e = reader.active(&id).await.expect_err("no quorum");
    assert_eq!(e.kind(), br2k_core::ErrorKind::Unavailable, "{e}");
    assert!(e.to_string().contains("no quorum"), "{e}");
}

#[tokio::test]
#[ignore = "needs stack"]
async fn the_change_stream_rewinds_over_a_reorg() {
    let node = spawn(None);
    let owner = deploy(&node).await;
    // The replacement is written by another account (the owner's handle caches its
    // nonce, which the revert takes back).
    let other = owner
        .with_signer(ChainConfig::new(vec![node.endpoint_url()]).with_private_key(key(&node, 1)))
        .await
        .expect("second account");
    let reader = ChainRegistry::connect(
        ChainConfig::new(vec![node.endpoint_url()]).with_registry(owner.address()),
    )
    .await
    .expect("reader");
    let mut stream = reader.changes().await.expect("stream");
    let snapshot = raw(&node, "evm_snapshot", json!([])).await;
    let (gone, replaced, marker) = (fresh("gone"), fresh("replaced"), fresh("marker"));
    owner
        .register(&gone, &sample_spec("r.local"))
        .await
        .expect("register");
    let first = stream.next().await.expect("item").expect("change");
    assert_eq!(
        (first.id.clone(), first.kind.clone()),
        (gone.clone(), ChangeKind::Registered)
    );

    assert_eq!(
        raw(&node, "evm_revert", json!([snapshot])).await,
        json!(true)
    );
    other
        .register(&replaced, &sample_spec("r.local"))
        .await
        .expect("replacement in the same block");
    other
        .register(&marker, &sample_spec("r.local"))
        .await
        .expect("marker");
    let (mut reorg_reported, mut seen) = (false, Vec::new());
    while !seen.contains(&marker) {
        match stream.next().await.expect("item") {
            Ok(c) => seen.push(c.id),
            Err(e) => {
                assert_eq!(e.kind(), br2k_core::ErrorKind::Conflict, "{e}");
                assert!(e.to_string().contains("reorganization"), "{e}");
                reorg_reported = true;
            }
        }
    }
    assert!(
        reorg_reported,
        "the reorg is reported (the consumer re-reads)"
    );
    assert!(
        seen.contains(&replaced),
        "the replacing change is seen: {seen:?}"
    );
    assert!(
        !seen.contains(&gone),
        "the reorged-out change is not replayed: {seen:?}"
    );
}

#[tokio::test]
#[ignore = "needs stack"]
async fn a_write_reorged_out_before_its_confirmations_is_waited_for_again() {
    let node = spawn(None);
    let owner = deploy(&node).await;
    let writer = owner
        .with_signer(
            ChainConfig::new(vec![node.endpoint_url()])
                .with_private_key(key(&node, 1))
                .with_confirmations(3),
        )
        .await
        .expect("writer");
    let snapshot = raw(&node, "evm_snapshot", json!([])).await;
    let start = head(&node).await;
    let id = fresh("reorged");
    let write = tokio::spawn({
        let (writer, id) = (writer.clone(), id.clone());
        async move { writer.register(&id, &sample_spec("r.local")).await }
    });
    // Mined (auto-mine), then waiting for two more blocks: revert it away.
    while head(&node).await == start {
        tokio::task::yield_now().await;
    }
    assert_eq!(
        raw(&node, "evm_revert", json!([snapshot])).await,
        json!(true)
    );
    while !write.is_finished() {
        raw(&node, "anvil_mine", json!(["0x1"])).await;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let rec = write
        .await
        .expect("join")
        .expect("the write is confirmed on the canonical chain");
    assert_eq!(rec.id, id);
    owner
        .active(&id)
        .await
        .expect("registered on the canonical chain");
}

/// Found by the fault matrix (#17): a replica starting while blocks were mined failed
/// with "getRecords: answered for block N+1 when asked at block N" (anvil ran the call
/// in the next block's environment). An answer for another block is still never used,
/// but the read is tried again at a fresh pin instead of failing at once.
#[tokio::test]
#[ignore = "needs stack"]
async fn a_record_answered_for_another_block_once_is_read_again() {
    let node = spawn(None);
    let owner = deploy(&node).await;
    let id = fresh("next-block");
    let spec = sample_spec("r.local");
    owner.register(&id, &spec).await.expect("register");
    // The first getRecords answer claims the next block; later ones are honest.
    let lies = Arc::new(std::sync::atomic::AtomicU32::new(1));
    let rewrite: Rewrite = {
        let lies = lies.clone();
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
            if lies
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_err()
            {
                return v;
            }
            ret.blockNumber += 1;
            v["result"] = json!(format!(
                "0x{}",
                alloy::hex::encode(getRecordsCall::abi_encode_returns(&ret))
            ));
            v
        })
    };
    let url = proxy(
        node.endpoint_url(),
        rewrite,
        Arc::new(AtomicBool::new(false)),
    )
    .await;
    let reader = ChainRegistry::connect(ChainConfig::new(vec![url]).with_registry(owner.address()))
        .await
        .expect("connect");
    let rec = reader.active(&id).await.expect("read again at a fresh pin");
    assert_eq!(rec.replicas, spec.replicas);
    assert_eq!(lies.load(Ordering::SeqCst), 0, "the lie was told");
}
