//! Chain registry bench: resolve N active records through the batched path
//! (`ChainRegistry::active_many`: one `getRecords` view call per 200 ids, one
//! `eth_getLogs` per 500 unverified specs) versus one `active` call per record, side by
//! side on one anvil; plus the latency of `publish` to 1 confirmation with automine.
//!
//! Usage: `BR2K_ANVIL_BIN=... cargo run -p br2k-benches --bin chain_registry [--release]
//! -- [N,N,...] [runs]` (default `1000,10000` and 3 runs). Spawns its own anvil.

use std::time::{Duration, Instant};

use alloy::node_bindings::Anvil;
use alloy::providers::{Provider, ProviderBuilder};
use br2k_chain::{ChainConfig, ChainRegistry};
use br2k_core::{Digest, ImageRef, Registry, ServiceId, ServiceSpec};

/// Accounts registering services concurrently during setup (the writes of one
/// handle are serialized, one nonce sequence, so parallelism needs accounts).
const WRITERS: usize = 100;
/// Publishes timed for the latency median.
const PUBLISHES: u64 = 50;

fn spec(i: u64) -> ServiceSpec {
    let image = ImageRef::parse(&format!(
        "registry.bench.local/bench/app:1.0@{}",
        Digest::of(format!("image {i}").as_bytes())
    ))
    .expect("image");
    let mut s = ServiceSpec::new(image, (i % 5) as u32 + 1).expect("spec");
    s.args = vec!["--listen".into(), "0.0.0.0:8080".into()];
    s.env.insert("LOG_LEVEL".into(), "info".into());
    s.validate().expect("valid");
    s
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let sizes: Vec<usize> = args
        .next()
        .unwrap_or_else(|| "1000,10000".into())
        .split(',')
        .map(|s| s.parse().expect("N"))
        .collect();
    let runs: usize = args.next().map(|s| s.parse().expect("runs")).unwrap_or(3);
    let bin = std::env::var("BR2K_ANVIL_BIN").expect("BR2K_ANVIL_BIN names the anvil binary");
    let anvil = Anvil::at(bin)
        .arg("--host")
        .arg("127.0.0.1")
        .arg("--accounts")
        .arg(WRITERS.to_string())
        .try_spawn()
        .expect("spawn anvil");
    let cfg = |i: usize| {
        ChainConfig::new(vec![anvil.endpoint_url()])
            .with_private_key(hex::encode(anvil.keys()[i].to_bytes()))
    };
    let owner = ChainRegistry::deploy(cfg(0)).await.expect("deploy");
    let writers: Vec<ChainRegistry> = {
        let mut v = Vec::new();
        for i in 0..WRITERS {
            v.push(owner.with_signer(cfg(i)).await.expect("writer"));
        }
        v
    };

    // Publish latency (to 1 confirmation, automine), including the read-back.
    let pid = ServiceId::new("publish-latency").expect("id");
    owner.register(&pid, &spec(0)).await.expect("register");
    let mut lat = Vec::new();
    for i in 1..=PUBLISHES {
        let t = Instant::now();
        owner.publish(&pid, &spec(i)).await.expect("publish");
        lat.push(t.elapsed());
    }
    println!(
        "publish to 1 confirmation (anvil automine, incl. read-back): median {:?} over {PUBLISHES}",
        median(lat)
    );

    let max = *sizes.iter().max().expect("a size");
    let ids: Vec<ServiceId> = (0..max)
        .map(|i| ServiceId::new(format!("svc-{i}")).expect("id"))
        .collect();
    // Setup only: with automine every registration is its own block and anvil's cost
    // per block grows with the state, so 10,000 blocks take quadratic time. Mine a
    // block every second instead, with one registration in flight per writer, so
    // each block holds ~100 of them.
    let rpc = ProviderBuilder::new().connect_http(anvil.endpoint_url());
    rpc.raw_request::<_, serde_json::Value>("evm_setAutomine".into(), (false,))
        .await
        .expect("evm_setAutomine");
    rpc.raw_request::<_, serde_json::Value>("evm_setIntervalMining".into(), (1,))
        .await
        .expect("evm_setIntervalMining");
    let t = Instant::now();
    let tasks: Vec<_> = writers
        .into_iter()
        .enumerate()
        .map(|(w, writer)| {
            let mine: Vec<(usize, ServiceId)> = ids
                .iter()
                .enumerate()
                .filter(|(i, _)| i % WRITERS == w)
                .map(|(i, id)| (i, id.clone()))
                .collect();
            tokio::spawn(async move {
                for (i, id) in mine {
                    writer
                        .register(&id, &spec(i as u64))
                        .await
                        .expect("register");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("writer task");
    }
    rpc.raw_request::<_, serde_json::Value>("evm_setIntervalMining".into(), (0,))
        .await
        .expect("evm_setIntervalMining");
    rpc.raw_request::<_, serde_json::Value>("evm_setAutomine".into(), (true,))
        .await
        .expect("evm_setAutomine");
    println!("registered {max} services in {:?}", t.elapsed());

    println!("\n| N | path | median time | round trips | per record |");
    println!("|---|---|---|---|---|");
    for &n in &sizes {
        let ids = &ids[..n];
        let mut batched = Vec::new();
        let mut singles = Vec::new();
        let mut rt_batched = 0;
        let mut rt_single = 0;
        for _ in 0..runs {
            // Fresh handles: no verified spec cached, so spec bytes come from the log.
            let reader = owner.with_signer(cfg(9)).await.expect("reader");
            let before = reader.rpc_requests();
            let t = Instant::now();
            let recs = reader.active_many(ids).await;
            batched.push(t.elapsed());
            rt_batched = reader.rpc_requests() - before;
            assert!(recs.iter().all(|r| r.is_ok()), "batched reads verify");

            let reader = owner.with_signer(cfg(9)).await.expect("reader");
            let before = reader.rpc_requests();
            let t = Instant::now();
            for id in ids {
                reader.active(id).await.expect("single read");
            }
            singles.push(t.elapsed());
            rt_single = reader.rpc_requests() - before;
        }
        let (b, s) = (median(batched), median(singles));
        println!(
            "| {n} | batched (active_many) | {b:?} | {rt_batched} | {:?} |",
            b / n as u32
        );
        println!(
            "| {n} | one call per record | {s:?} | {rt_single} | {:?} |",
            s / n as u32
        );
    }
}
