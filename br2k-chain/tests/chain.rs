//! `ChainRegistry` against real anvil nodes spawned per test from `BR2K_ANVIL_BIN`:
//! the core conformance suite, access control, failover, stale reads, tampering and
//! connection checks.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use alloy::node_bindings::{Anvil, AnvilInstance};
use alloy::primitives::{Address, B256};
use alloy::providers::ProviderBuilder;
use alloy::signers::local::PrivateKeySigner;
use alloy::transports::http::reqwest::Url;
use br2k_chain::bindings::ServiceRegistry;
use br2k_chain::{ChainConfig, ChainRegistry, service_key};
use br2k_core::conformance::{expect_kind, sample_spec};
use br2k_core::{Account, ChangeKind, Digest, Registry, Role, ServiceId, ServiceState};
use futures::StreamExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

fn anvil() -> AnvilInstance {
    let bin = std::env::var("BR2K_ANVIL_BIN")
        .expect("BR2K_ANVIL_BIN must name the anvil binary (source .stack/env)");
    Anvil::at(bin)
        .arg("--host")
        .arg("127.0.0.1")
        .try_spawn()
        .expect("spawn anvil")
}

fn key(anvil: &AnvilInstance, i: usize) -> String {
    hex::encode(anvil.keys()[i].to_bytes())
}

fn config(urls: Vec<Url>, anvil: &AnvilInstance, i: usize) -> ChainConfig {
    ChainConfig::new(urls).with_private_key(key(anvil, i))
}

fn url(anvil: &AnvilInstance) -> Url {
    anvil.endpoint_url()
}

fn fresh(name: &str) -> ServiceId {
    ServiceId::new(format!("{name}-{:08x}", rand::random::<u32>())).expect("id")
}

async fn deploy(anvil: &AnvilInstance) -> ChainRegistry {
    ChainRegistry::deploy(config(vec![url(anvil)], anvil, 0))
        .await
        .expect("deploy")
}

async fn handle(anvil: &AnvilInstance, registry: &ChainRegistry, i: usize) -> ChainRegistry {
    ChainRegistry::connect(config(vec![url(anvil)], anvil, i).with_registry(registry.address()))
        .await
        .expect("connect")
}

/// A loopback TCP proxy to `target` that can be killed (listener and connections).
struct Proxy {
    url: Url,
    tasks: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    async fn start(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let tasks: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let t = Arc::clone(&tasks);
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let conn = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", target)).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                t.lock().unwrap().push(conn);
            }
        });
        Self {
            url: Url::parse(&format!("http://127.0.0.1:{port}")).expect("url"),
            tasks,
            accept,
        }
    }

    fn kill(&self) {
        self.accept.abort();
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

/// A loopback URL nothing listens on.
async fn closed_port() -> Url {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = l.local_addr().expect("addr").port();
    drop(l);
    Url::parse(&format!("http://127.0.0.1:{port}")).expect("url")
}

#[tokio::test]
#[ignore = "needs stack"]
async fn conformance_suite() {
    let node = anvil();
    let owner = deploy(&node).await;
    let stranger = handle(&node, &owner, 1).await;
    let replica = handle(&node, &owner, 2).await;
    br2k_core::conformance::registry::run_all(&owner, &stranger, &replica, fresh).await;
}

#[tokio::test]
#[ignore = "needs stack"]
async fn accounts_squatting_and_ownership() {
    let node = anvil();
    let owner = deploy(&node).await;
    let other = handle(&node, &owner, 1).await;
    let me = owner.account();
    assert_eq!(me.0, format!("{:#x}", node.addresses()[0]).to_lowercase());
    assert!(me.0.starts_with("0x") && me.0.len() == 42);

    // Whoever registers first owns the name; nobody can register it for someone else.
    let id = fresh("squat");
    let rec = other
        .register(&id, &sample_spec("r.local"))
        .await
        .expect("register");
    assert_eq!(rec.owner, other.account());
    expect_kind(
        owner.register(&id, &sample_spec("r.local")).await,
        br2k_core::ErrorKind::AlreadyExists,
        "second registration",
    );
    expect_kind(
        owner.publish(&id, &sample_spec("s.local")).await,
        br2k_core::ErrorKind::PermissionDenied,
        "publish",
    );
    expect_kind(
        owner.grant(&id, &me, Role::Operator).await,
        br2k_core::ErrorKind::PermissionDenied,
        "self grant",
    );
    // Malformed accounts are refused before anything is sent.
    for bad in [
        "",
        "alice",
        "0x1234",
        "0xzz00000000000000000000000000000000000000",
    ] {
        expect_kind(
            other.grant(&id, &Account(bad.into()), Role::Operator).await,
            br2k_core::ErrorKind::InvalidInput,
            bad,
        );
    }
    expect_kind(
        other
            .transfer_ownership(&id, &Account(format!("0x{}", "0".repeat(40))))
            .await,
        br2k_core::ErrorKind::InvalidInput,
        "transfer to the zero address",
    );
    other.transfer_ownership(&id, &me).await.expect("transfer");
    owner.accept_ownership(&id).await.expect("accept");
    assert_eq!(owner.active(&id).await.expect("active").owner, me);
    expect_kind(
        other.set_replicas(&id, 1).await,
        br2k_core::ErrorKind::PermissionDenied,
        "former owner",
    );
    owner
        .publish(&id, &sample_spec("s.local"))
        .await
        .expect("new owner publishes");
}

#[tokio::test]
#[ignore = "needs stack"]
async fn rollback_then_publish_and_history_order() {
    let node = anvil();
    let owner = deploy(&node).await;
    let operator = handle(&node, &owner, 1).await;
    let id = fresh("history");
    let specs: Vec<_> = (0..4)
        .map(|i| {
            let mut s = sample_spec("r.local");
            s.replicas = i + 1;
            s.image = s
                .image
                .with_digest(Digest::of(format!("image {i}").as_bytes()));
            s
        })
        .collect();
    owner.register(&id, &specs[0]).await.expect("register");
    owner
        .grant(&id, &operator.account(), Role::Operator)
        .await
        .expect("grant");
    operator.publish(&id, &specs[1]).await.expect("v2");
    owner.publish(&id, &specs[2]).await.expect("v3");
    let rec = operator.rollback(&id, 2).await.expect("rollback");
    assert_eq!((rec.version, rec.latest_version, rec.replicas), (2, 3, 2));
    let rec = owner
        .publish(&id, &specs[3])
        .await
        .expect("v4 after rollback");
    assert_eq!((rec.version, rec.latest_version, rec.replicas), (4, 4, 4));
    let history = owner.history(&id).await.expect("history");
    assert_eq!(
        history.iter().map(|v| v.version).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    for (v, spec) in history.iter().zip(&specs) {
        assert_eq!(&v.spec, spec);
        assert_eq!(v.spec_hash, spec.spec_hash());
    }
    let publishers: Vec<_> = history.iter().map(|v| v.publisher.clone()).collect();
    assert_eq!(
        publishers,
        [
            owner.account(),
            operator.account(),
            owner.account(),
            owner.account()
        ]
    );
    let times: Vec<u64> = history
        .iter()
        .map(|v| v.published_at.expect("time"))
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "times ordered: {times:?}"
    );
    expect_kind(
        owner.rollback(&id, 5).await,
        br2k_core::ErrorKind::NotFound,
        "unknown version",
    );
    // A fresh handle (empty caches) reads the same, verified from the event log.
    let reader = handle(&node, &owner, 2).await;
    assert_eq!(reader.history(&id).await.expect("history"), history);
    assert_eq!(reader.active(&id).await.expect("active").spec, specs[3]);
}

#[tokio::test]
#[ignore = "needs stack"]
async fn batched_reads_match_single_reads() {
    let node = anvil();
    let owner = deploy(&node).await;
    let mut ids = Vec::new();
    for i in 0..30 {
        let id = fresh(&format!("batch{i}"));
        let mut s = sample_spec("r.local");
        s.replicas = i % 7;
        owner.register(&id, &s).await.expect("register");
        ids.push(id);
    }
    let unknown = fresh("missing");
    ids.push(unknown.clone());
    let reader = handle(&node, &owner, 1).await;
    let before = reader.rpc_requests();
    let batch = reader.active_many(&ids).await;
    let batched_requests = reader.rpc_requests() - before;
    assert!(
        batched_requests <= 3,
        "one view call and one log query: {batched_requests}"
    );
    for (id, r) in ids.iter().zip(&batch) {
        if *id == unknown {
            assert_eq!(
                r.as_ref().err().map(|e| e.kind()),
                Some(br2k_core::ErrorKind::NotFound)
            );
            continue;
        }
        let single = owner.active(id).await.expect("single");
        let batched = r.as_ref().expect("batched");
        assert_eq!(batched.spec, single.spec);
        assert_eq!(batched.replicas, single.replicas);
        assert_eq!(batched.id, *id);
    }
    let services = reader.services().await.expect("services");
    assert_eq!(services.len(), 30);
    assert!(ids[..30].iter().all(|id| services.contains(id)));
}

#[tokio::test]
#[ignore = "needs stack"]
async fn first_endpoint_closed_fails_over() {
    let node = anvil();
    let dead = closed_port().await;
    let owner = ChainRegistry::deploy(config(vec![dead.clone(), url(&node)], &node, 0))
        .await
        .expect("deploy through the second endpoint");
    let id = fresh("failover");
    owner
        .register(&id, &sample_spec("r.local"))
        .await
        .expect("register");
    let rec = owner.active(&id).await.expect("active");
    assert!(!rec.stale);
    assert_eq!(rec.state, ServiceState::Ready);
}

#[tokio::test]
#[ignore = "needs stack"]
async fn endpoint_killed_mid_stream() {
    let node = anvil();
    let proxy = Proxy::start(node.port()).await;
    let owner = ChainRegistry::deploy(config(vec![proxy.url.clone(), url(&node)], &node, 0))
        .await
        .expect("deploy through the proxy");
    let id = fresh("midstream");
    let mut stream = owner.changes().await.expect("changes");
    owner
        .register(&id, &sample_spec("r.local"))
        .await
        .expect("register");
    owner.set_replicas(&id, 4).await.expect("scale");
    let mut seen = Vec::new();
    let next = async |stream: &mut br2k_core::ChangeStream| loop {
        match tokio::time::timeout(Duration::from_secs(30), stream.next()).await {
            Ok(Some(Ok(c))) if c.id == id => return c.kind,
            Ok(Some(_)) => continue,
            other => panic!("stream ended or stalled: {other:?}"),
        }
    };
    seen.push(next(&mut stream).await);
    proxy.kill();
    owner
        .resume(&id)
        .await
        .expect("resume after the proxy died");
    owner
        .set_replicas(&id, 6)
        .await
        .expect("scale after the proxy died");
    for _ in 0..3 {
        seen.push(next(&mut stream).await);
    }
    assert_eq!(
        seen,
        [
            ChangeKind::Registered,
            ChangeKind::Scaled { replicas: 4 },
            ChangeKind::StateChanged {
                state: ServiceState::Running
            },
            ChangeKind::Scaled { replicas: 6 },
        ]
    );
    // Nothing is delivered twice.
    let extra = tokio::time::timeout(Duration::from_millis(800), async {
        loop {
            match stream.next().await {
                Some(Ok(c)) if c.id == id => return c,
                Some(_) => continue,
                None => std::future::pending().await,
            }
        }
    })
    .await;
    assert!(extra.is_err(), "duplicate or extra change: {extra:?}");
}

#[tokio::test]
#[ignore = "needs stack"]
async fn all_endpoints_down_serves_stale_record() {
    let node = anvil();
    let proxy = Proxy::start(node.port()).await;
    let dead = closed_port().await;
    let owner = ChainRegistry::deploy(
        config(vec![proxy.url.clone(), dead], &node, 0)
            .with_request_timeout(Duration::from_secs(2)),
    )
    .await
    .expect("deploy");
    let id = fresh("stale");
    let never_read = fresh("never");
    owner
        .register(&id, &sample_spec("r.local"))
        .await
        .expect("register");
    let fresh_rec = owner.active(&id).await.expect("active");
    assert!(!fresh_rec.stale);
    proxy.kill();
    let stale = owner.active(&id).await.expect("stale read");
    assert!(stale.stale, "flagged stale");
    assert_eq!(
        stale.as_of, fresh_rec.as_of,
        "as of the block it was verified at"
    );
    assert_eq!(stale.spec, fresh_rec.spec);
    expect_kind(
        owner.active(&never_read).await,
        br2k_core::ErrorKind::Unavailable,
        "never read",
    );
    let many = owner.active_many(&[id.clone(), never_read]).await;
    assert!(many[0].as_ref().expect("stale").stale);
    assert_eq!(
        many[1].as_ref().err().map(|e| e.kind()),
        Some(br2k_core::ErrorKind::Unavailable)
    );
    expect_kind(
        owner.set_replicas(&id, 2).await,
        br2k_core::ErrorKind::Unavailable,
        "write while down",
    );
}

#[tokio::test]
#[ignore = "needs stack"]
async fn spec_bytes_not_matching_the_hash_are_tampered() {
    let node = anvil();
    let owner = deploy(&node).await;
    let id = fresh("tamper");
    let v1 = sample_spec("r.local");
    owner.register(&id, &v1).await.expect("register");
    // Publish through the raw contract binding: hash of one spec, bytes of another.
    let claimed = {
        let mut s = sample_spec("claimed.local");
        s.replicas = 2;
        s
    };
    let sent = sample_spec("sent.local");
    let signer: PrivateKeySigner = key(&node, 0).parse().expect("key");
    let owner_address = signer.address();
    let provider = ProviderBuilder::new()
        .wallet(signer)
        .connect_http(url(&node));
    let raw = ServiceRegistry::new(owner.address(), provider);
    // The contract itself checks sha256(spec) against the hash, and a non-zero digest.
    for (hash, digest) in [
        (
            claimed.spec_hash(),
            *claimed.image.digest().expect("digest"),
        ),
        (sent.spec_hash(), Digest::from_bytes([0; 32])),
    ] {
        let refused = raw
            .publish(
                service_key(&id),
                B256::from(*hash.as_bytes()),
                B256::from(*digest.as_bytes()),
                claimed.replicas,
                sent.canonical_bytes().into(),
            )
            // A call, not a transaction: a refused send would leave the provider's
            // nonce cache ahead of the chain and the next transaction pending forever.
            .from(owner_address)
            .call()
            .await;
        let err = match refused {
            Ok(_) => panic!("a version whose bytes do not hash to its hash was accepted"),
            Err(e) => e,
        };
        let decoded = err.as_decoded_interface_error::<ServiceRegistry::ServiceRegistryErrors>();
        assert!(
            matches!(
                decoded,
                Some(ServiceRegistry::ServiceRegistryErrors::InvalidSpec(_))
            ),
            "{err}"
        );
    }
    let reader = handle(&node, &owner, 1).await;
    assert_eq!(reader.active(&id).await.expect("still v1").version, 1);
    assert_eq!(reader.version(&id, 1).await.expect("v1 is intact").spec, v1);
    // Bytes that hash right but carry another replica count than recorded.
    let id2 = fresh("tamper-replicas");
    raw.register(
        id2.to_string(),
        B256::from(*v1.spec_hash().as_bytes()),
        B256::from(*v1.image.digest().expect("digest").as_bytes()),
        v1.replicas + 1,
        v1.canonical_bytes().into(),
    )
    .send()
    .await
    .expect("send")
    .get_receipt()
    .await
    .expect("mined");
    expect_kind(
        reader.active(&id2).await,
        br2k_core::ErrorKind::Tampered,
        "replica count mismatch",
    );
}

#[tokio::test]
#[ignore = "needs stack"]
async fn wrong_chain_id_and_address_without_code() {
    let node = anvil();
    let owner = deploy(&node).await;
    let wrong = ChainRegistry::connect(
        config(vec![url(&node)], &node, 0)
            .with_registry(owner.address())
            .with_chain_id(1),
    )
    .await;
    match wrong {
        Err(e) => {
            assert_eq!(e.kind(), br2k_core::ErrorKind::InvalidInput);
            assert!(e.to_string().contains("chain id"), "{e}");
        }
        Ok(r) => panic!("connected to the wrong chain: {r:?}"),
    }
    let right = ChainRegistry::connect(
        config(vec![url(&node)], &node, 0)
            .with_registry(owner.address())
            .with_chain_id(node.chain_id()),
    )
    .await
    .expect("right chain id");
    assert_eq!(right.chain_id(), node.chain_id());
    let empty = Address::repeat_byte(0x42);
    match ChainRegistry::connect(config(vec![url(&node)], &node, 0).with_registry(empty)).await {
        Err(e) => assert_eq!(e.kind(), br2k_core::ErrorKind::NotFound, "{e}"),
        Ok(r) => panic!("connected to an address without code: {r:?}"),
    }
    // An EOA has no code either.
    let eoa = node.addresses()[3];
    expect_kind(
        ChainRegistry::connect(config(vec![url(&node)], &node, 0).with_registry(eoa)).await,
        br2k_core::ErrorKind::NotFound,
        "externally owned account",
    );
}

#[tokio::test]
#[ignore = "needs stack"]
async fn no_secret_in_state_or_debug_output() {
    let node = anvil();
    let owner = deploy(&node).await;
    let replica = handle(&node, &owner, 1).await;
    let id = fresh("secrets");
    owner
        .register(&id, &sample_spec("r.local"))
        .await
        .expect("register");
    owner
        .publish(&id, &{
            let mut s = sample_spec("r.local");
            s.replicas = 5;
            s
        })
        .await
        .expect("publish");
    owner
        .grant(&id, &replica.account(), Role::Replica)
        .await
        .expect("grant");
    replica
        .set_location(
            &id,
            &br2k_core::Location::new("http://10.0.0.7:8080", 1).expect("loc"),
        )
        .await
        .expect("location");
    owner.resume(&id).await.expect("resume");
    // Debug output of handles and configs never shows a key.
    for i in 0..2 {
        let k = key(&node, i);
        let dbg = format!(
            "{owner:?} {replica:?} {:?}",
            config(vec![url(&node)], &node, i)
        );
        assert!(!dbg.contains(&k), "key in debug output");
        assert!(dbg.contains("redacted"), "{dbg}");
    }
    // Scan the service's storage words: the struct slots at keccak(id . slot 0) and its
    // version array; no word equals or contains a signing key or the endpoint text.
    use alloy::primitives::{U256, keccak256};
    use alloy::providers::Provider;
    let provider = ProviderBuilder::new().connect_http(url(&node));
    let base = U256::from_be_bytes(keccak256([service_key(&id).as_slice(), &[0u8; 32]].concat()).0);
    let mut words = Vec::new();
    for off in 0..10u64 {
        words.push(
            provider
                .get_storage_at(owner.address(), base + U256::from(off))
                .await
                .expect("slot"),
        );
    }
    // `versions` is member slot 6 of the Service struct: its elements are 4 words each.
    let versions_slot = base + U256::from(6);
    let elems = U256::from_be_bytes(keccak256(versions_slot.to_be_bytes::<32>()).0);
    for off in 0..8u64 {
        words.push(
            provider
                .get_storage_at(owner.address(), elems + U256::from(off))
                .await
                .expect("slot"),
        );
    }
    assert_eq!(
        words[6],
        U256::from(2),
        "two versions recorded at the expected slot"
    );
    let keys: Vec<[u8; 32]> = (0..3).map(|i| node.keys()[i].to_bytes().into()).collect();
    for w in &words {
        let bytes = w.to_be_bytes::<32>();
        assert!(!keys.contains(&bytes), "a private key is stored");
        assert!(
            !bytes.windows(8).any(|win| win == b"10.0.0.7"),
            "endpoint text stored"
        );
    }
}

#[tokio::test]
#[ignore = "needs stack"]
async fn concurrent_writes_through_one_handle_share_the_nonce_sequence() {
    let node = anvil();
    let owner = deploy(&node).await;
    let ids: Vec<ServiceId> = (0..12).map(|i| fresh(&format!("nonce{i}"))).collect();
    let results = futures::future::join_all(ids.iter().map(|id| {
        let owner = owner.clone();
        async move { owner.register(id, &sample_spec("r.local")).await }
    }))
    .await;
    for (id, r) in ids.iter().zip(results) {
        assert_eq!(r.expect("register").id, *id);
    }
    // A refused write (estimate_gas reverts) consumes no nonce: the next one still goes.
    expect_kind(
        owner.register(&ids[0], &sample_spec("r.local")).await,
        br2k_core::ErrorKind::AlreadyExists,
        "duplicate",
    );
    owner.resume(&ids[0]).await.expect("write after a refusal");
    assert_eq!(owner.services().await.expect("services").len(), 12);
}

#[tokio::test]
#[ignore = "needs stack"]
async fn waits_for_the_configured_confirmations() {
    let bin = std::env::var("BR2K_ANVIL_BIN").expect("BR2K_ANVIL_BIN");
    // Interval mining: one block per second, so a second confirmation takes ~1 s.
    let node = Anvil::at(bin)
        .arg("--host")
        .arg("127.0.0.1")
        .arg("--block-time")
        .arg("1")
        .try_spawn()
        .expect("spawn anvil");
    let owner = ChainRegistry::deploy(config(vec![url(&node)], &node, 0).with_confirmations(3))
        .await
        .expect("deploy");
    let id = fresh("confirm");
    let rec = owner
        .register(&id, &sample_spec("r.local"))
        .await
        .expect("register");
    let registered_at = {
        use alloy::providers::Provider;
        use alloy::sol_types::SolEvent;
        let provider = ProviderBuilder::new().connect_http(url(&node));
        let filter = alloy::rpc::types::Filter::new()
            .address(owner.address())
            .event_signature(ServiceRegistry::Registered::SIGNATURE_HASH)
            .topic1(service_key(&id))
            .from_block(0);
        let logs = provider.get_logs(&filter).await.expect("logs");
        assert_eq!(logs.len(), 1, "one Registered event");
        logs[0].block_number.expect("mined")
    };
    let head = rec.as_of.expect("as_of");
    assert!(
        head >= registered_at + 2,
        "read at block {head}, registered in block {registered_at}: 3 confirmations"
    );
}

/// Calls a no-parameter anvil method (`evm_snapshot`) or one with a snapshot id
/// (`evm_revert`) on `node`.
async fn anvil_call(node: &AnvilInstance, method: &'static str, arg: Option<String>) -> String {
    use alloy::providers::Provider;
    let provider = ProviderBuilder::new().connect_http(url(node));
    let answer: serde_json::Value = match arg {
        None => provider.raw_request(method.into(), ()).await,
        Some(a) => provider.raw_request(method.into(), (a,)).await,
    }
    .unwrap_or_else(|e| panic!("{method}: {e}"));
    answer.to_string().trim_matches('"').to_owned()
}

#[tokio::test]
#[ignore = "needs stack"]
async fn a_reverted_chain_never_rolls_the_supervisor_back_nor_removes_the_workload() {
    use br2k_core::conformance::sample_image;
    use br2k_core::memory::{InMemoryImageStore, InMemoryReplicator};
    use br2k_core::supervisor::Supervisor;
    use br2k_core::{ImageRef, ImageStore, Replicator, Repository, ServiceSpec};

    let node = anvil();
    let owner = deploy(&node).await;
    let id = fresh("revert");
    let store = InMemoryImageStore::new("primary.local");
    let repo = Repository::new("br2k/app").unwrap();
    let image = sample_image(7, 1, 256);
    store.push(&repo, &image, Some("1")).await.unwrap();
    let reference = ImageRef::new("primary.local", repo, Some("1"), Some(image.digest)).unwrap();
    let v1 = ServiceSpec::new(reference, 2).unwrap();
    let mut v2 = v1.clone();
    v2.env.insert("MODE".into(), "v2".into());

    let before_register = anvil_call(&node, "evm_snapshot", None).await;
    owner.register(&id, &v1).await.expect("register");
    owner
        .set_state(&id, ServiceState::Running)
        .await
        .expect("start");
    let before_v2 = anvil_call(&node, "evm_snapshot", None).await;
    owner.publish(&id, &v2).await.expect("publish v2");

    // The supervisor reads through a handle of its own (no signer needed).
    let reader =
        ChainRegistry::connect(ChainConfig::new(vec![url(&node)]).with_registry(owner.address()))
            .await
            .expect("read-only handle");
    let replicator = InMemoryReplicator::new();
    let sup = Supervisor::builder()
        .registry(Arc::new(reader.clone()))
        .replicator(Arc::new(replicator.clone()))
        .image_store(Arc::new(store))
        .build()
        .unwrap();
    sup.reconcile(&id).await.expect("deploy v2");
    let applied = |r: &InMemoryReplicator| {
        let r = r.clone();
        let id = id.clone();
        async move { r.observe(&id).await.unwrap().map(|o| o.applied_version) }
    };
    assert_eq!(applied(&replicator).await, Some(Some(2)), "v2 deployed");

    // The chain goes back to before v2 (what a reorg or a lagging endpoint shows).
    assert_eq!(
        anvil_call(&node, "evm_revert", Some(before_v2)).await,
        "true"
    );
    let read = reader.active(&id).await.expect("read after the revert");
    assert_eq!(
        (read.version, read.latest_version),
        (1, 1),
        "the chain itself now says v1"
    );
    let report = sup
        .reconcile(&id)
        .await
        .expect("reconcile after the revert");
    assert_eq!(report.diagnosis.record_version, Some(2), "{report:?}");
    assert_eq!(
        applied(&replicator).await,
        Some(Some(2)),
        "not rolled back to v1"
    );

    // Further back: the service is not registered at all. The workload stays.
    assert_eq!(
        anvil_call(&node, "evm_revert", Some(before_register)).await,
        "true"
    );
    expect_kind(
        reader.active(&id).await,
        br2k_core::ErrorKind::NotFound,
        "after the second revert",
    );
    sup.reconcile(&id)
        .await
        .expect("reconcile after the second revert");
    assert_eq!(
        applied(&replicator).await,
        Some(Some(2)),
        "a single NotFound removed nothing"
    );
}

#[tokio::test]
async fn error_texts_never_carry_the_secrets_of_an_rpc_url() {
    let dead = closed_port().await;
    let port = dead.port().expect("port");
    let secret_url = Url::parse(&format!(
        "http://alice:s3cretpw@127.0.0.1:{port}/v3/apikey123?token=tok456"
    ))
    .expect("url");
    let config = ChainConfig::new(vec![secret_url]).with_registry(Address::repeat_byte(7));
    let err = match ChainRegistry::connect(config).await {
        Ok(_) => panic!("connected to a closed port"),
        Err(e) => e,
    };
    let texts = [err.to_string(), format!("{err:?}")];
    for text in &texts {
        for secret in ["alice", "s3cretpw", "apikey123", "tok456"] {
            assert!(!text.contains(secret), "{secret} leaked in {text}");
        }
        assert!(text.contains(&format!("127.0.0.1:{port}")), "{text}");
    }
    assert_eq!(err.kind(), br2k_core::ErrorKind::Unavailable, "{err}");
}

#[tokio::test]
#[ignore = "needs stack"]
async fn only_services_of_allowed_owners_are_deployed() {
    use br2k_core::conformance::sample_image;
    use br2k_core::memory::{InMemoryImageStore, InMemoryReplicator};
    use br2k_core::supervisor::Supervisor;
    use br2k_core::{ImageRef, ImageStore, Replicator, Repository, ServiceSpec};

    let node = anvil();
    let owner = deploy(&node).await;
    let squatter = handle(&node, &owner, 1).await;
    let store = InMemoryImageStore::new("primary.local");
    let repo = Repository::new("br2k/app").unwrap();
    let image = sample_image(9, 1, 128);
    store.push(&repo, &image, Some("1")).await.unwrap();
    let spec = ServiceSpec::new(
        ImageRef::new("primary.local", repo, Some("1"), Some(image.digest)).unwrap(),
        2,
    )
    .unwrap();
    let (ours, theirs) = (fresh("ours"), fresh("theirs"));
    for (who, id) in [(&owner, &ours), (&squatter, &theirs)] {
        who.register(id, &spec).await.expect("register");
        who.set_state(id, ServiceState::Running)
            .await
            .expect("start");
    }
    let replicator = InMemoryReplicator::new();
    let sup = Supervisor::builder()
        .registry(Arc::new(owner.clone()))
        .replicator(Arc::new(replicator.clone()))
        .image_store(Arc::new(store))
        // Checksummed or not, the same account.
        .allowed_owners([Account(owner.account().0.to_lowercase())])
        .build()
        .unwrap();
    sup.reconcile(&ours).await.expect("deploy ours");
    assert!(replicator.observe(&ours).await.unwrap().is_some());
    let refused = sup.reconcile(&theirs).await;
    expect_kind(
        refused,
        br2k_core::ErrorKind::PermissionDenied,
        "a squatter's service",
    );
    assert!(
        replicator.observe(&theirs).await.unwrap().is_none(),
        "nothing deployed for an owner not allowed"
    );
}
