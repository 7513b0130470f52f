//! The `ServiceRegistry` contract's own defences, on a private anvil spawned per test
//! from `BR2K_ANVIL_BIN`: two-step ownership transfer, bounded checkpoint and term
//! increments with the owner's reset, placement epochs that only grow by bounded
//! steps and cluster names checked on chain, and events naming the account behind
//! each change.

use alloy::node_bindings::{Anvil, AnvilInstance};
use alloy::primitives::B256;
use alloy::providers::{Provider, ProviderBuilder};
use alloy::transports::http::reqwest::Url;
use br2k_chain::bindings::ServiceRegistry;
use br2k_chain::bindings::ServiceRegistry::ServiceRegistryErrors as Refusal;
use br2k_chain::{
    ChainConfig, ChainRegistry, MAX_LOG_INDEX_STEP, MAX_TERM_STEP, account_of, cluster_word,
    service_key,
};
use br2k_core::conformance::{expect_kind, sample_spec};
use br2k_core::{
    Account, ChangeKind, Checkpoint, Digest, Error, Location, Placement, Registry, Role, ServiceId,
    ServiceState, ValidationError,
};

fn anvil() -> AnvilInstance {
    let bin = std::env::var("BR2K_ANVIL_BIN")
        .expect("BR2K_ANVIL_BIN must name the anvil binary (source .stack/env)");
    Anvil::at(bin)
        .arg("--host")
        .arg("127.0.0.1")
        .try_spawn()
        .expect("spawn anvil")
}

fn url(anvil: &AnvilInstance) -> Url {
    anvil.endpoint_url()
}

fn config(anvil: &AnvilInstance, i: usize) -> ChainConfig {
    ChainConfig::new(vec![url(anvil)]).with_private_key(hex::encode(anvil.keys()[i].to_bytes()))
}

fn fresh(name: &str) -> ServiceId {
    ServiceId::new(format!("{name}-{:08x}", rand::random::<u32>())).expect("id")
}

/// Deploys a registry as anvil account 0 and returns handles acting as accounts
/// `0..n`.
async fn accounts(node: &AnvilInstance, n: usize) -> Vec<ChainRegistry> {
    let owner = ChainRegistry::deploy(config(node, 0))
        .await
        .expect("deploy");
    let mut out = vec![owner.clone()];
    for i in 1..n {
        out.push(
            ChainRegistry::connect(config(node, i).with_registry(owner.address()))
                .await
                .expect("connect"),
        );
    }
    out
}

fn checkpoint(state_version: u64, log_index: u64, term: u64) -> Checkpoint {
    Checkpoint {
        snapshot: Digest::of(format!("snapshot {state_version}").as_bytes()),
        log_index,
        term,
        state_version,
    }
}

/// Asserts `r` is the registry's refusal of a jump of `counter`.
fn refused_jump<T: std::fmt::Debug>(r: br2k_core::Result<T>, counter: &str, ctx: &str) {
    match r {
        Err(Error::InvalidInput(ValidationError::Malformed { what, reason })) => {
            assert_eq!(what, counter, "{ctx}: {reason}");
            assert!(
                reason.contains("more than the registry's bound"),
                "{ctx}: {reason}"
            );
        }
        other => panic!("{ctx}: expected the registry to refuse a {counter} jump, got {other:?}"),
    }
}

#[tokio::test]
#[ignore = "needs stack"]
async fn ownership_moves_only_when_the_proposed_owner_accepts() {
    let node = anvil();
    let handles = accounts(&node, 3).await;
    let (owner, heir, stranger) = (&handles[0], &handles[1], &handles[2]);
    let (me, them) = (owner.account(), heir.account());
    let id = fresh("own");
    owner
        .register(&id, &sample_spec("r.local"))
        .await
        .expect("register");

    owner.transfer_ownership(&id, &them).await.expect("propose");
    assert_eq!(
        owner.pending_owner(&id).await.expect("pending"),
        Some(them.clone())
    );
    // A proposal alone moves nothing: the owner keeps every right, the proposed
    // account has none.
    assert_eq!(owner.active(&id).await.expect("active").owner, me);
    expect_kind(
        heir.set_replicas(&id, 1).await,
        br2k_core::ErrorKind::PermissionDenied,
        "proposed owner before accepting",
    );
    expect_kind(
        heir.grant(&id, &them, Role::Operator).await,
        br2k_core::ErrorKind::PermissionDenied,
        "proposed owner grants",
    );
    owner
        .grant(&id, &stranger.account(), Role::Operator)
        .await
        .expect("owner still grants");
    assert_eq!(
        owner
            .set_replicas(&id, 2)
            .await
            .expect("owner still scales")
            .replicas,
        2
    );
    // Nobody but the proposed account accepts, not even the owner or an operator.
    for (who, h) in [("owner", owner), ("operator", stranger)] {
        expect_kind(
            h.accept_ownership(&id).await,
            br2k_core::ErrorKind::PermissionDenied,
            &format!("{who} accepts"),
        );
    }
    expect_kind(
        heir.cancel_ownership_transfer(&id).await,
        br2k_core::ErrorKind::PermissionDenied,
        "proposed owner cancels",
    );

    // A mistyped proposal is withdrawn before it does harm.
    owner.cancel_ownership_transfer(&id).await.expect("cancel");
    assert_eq!(owner.pending_owner(&id).await.expect("pending"), None);
    match heir.accept_ownership(&id).await {
        Err(Error::PermissionDenied { reason }) => {
            assert!(reason.contains("not the pending owner"), "{reason}")
        }
        other => panic!("accept after a cancel: {other:?}"),
    }
    assert_eq!(owner.active(&id).await.expect("active").owner, me);

    // Proposed again and accepted: now the heir owns the service.
    owner.transfer_ownership(&id, &them).await.expect("propose");
    heir.accept_ownership(&id).await.expect("accept");
    let rec = owner.active(&id).await.expect("active");
    assert_eq!(rec.owner, them);
    assert_eq!(owner.pending_owner(&id).await.expect("pending"), None);
    expect_kind(
        owner.set_replicas(&id, 1).await,
        br2k_core::ErrorKind::PermissionDenied,
        "former owner",
    );
    expect_kind(
        owner.cancel_ownership_transfer(&id).await,
        br2k_core::ErrorKind::PermissionDenied,
        "former owner cancels",
    );
    assert_eq!(
        heir.set_replicas(&id, 1).await.expect("new owner").replicas,
        1
    );
    expect_kind(
        heir.accept_ownership(&id).await,
        br2k_core::ErrorKind::PermissionDenied,
        "accepting twice",
    );
    expect_kind(
        stranger.pending_owner(&fresh("unknown")).await,
        br2k_core::ErrorKind::NotFound,
        "pending owner of an unknown service",
    );
}

#[tokio::test]
#[ignore = "needs stack"]
async fn checkpoint_and_term_jumps_are_bounded_and_the_owner_resets_them() {
    let node = anvil();
    let handles = accounts(&node, 3).await;
    let (owner, replica, rogue) = (&handles[0], &handles[1], &handles[2]);
    let id = fresh("bound");
    owner
        .register(&id, &sample_spec("r.local"))
        .await
        .expect("register");
    for h in [replica, rogue] {
        owner
            .grant(&id, &h.account(), Role::Replica)
            .await
            .expect("grant replica");
    }

    // The contract enforces the bounds this crate names.
    let raw = ServiceRegistry::new(
        owner.address(),
        ProviderBuilder::new().connect_http(url(&node)),
    );
    assert_eq!(
        raw.MAX_LOG_INDEX_STEP().call().await.expect("view"),
        MAX_LOG_INDEX_STEP
    );
    assert_eq!(
        raw.MAX_TERM_STEP().call().await.expect("view"),
        MAX_TERM_STEP
    );

    // A first checkpoint or location cannot start at the top of the range.
    refused_jump(
        rogue
            .record_checkpoint(&id, &checkpoint(1, u64::MAX, 1))
            .await,
        "checkpoint log index",
        "first checkpoint at 2^64-1",
    );
    refused_jump(
        rogue
            .record_checkpoint(&id, &checkpoint(1, 1, u64::MAX))
            .await,
        "checkpoint term",
        "first checkpoint term 2^64-1",
    );
    let top = Location::new("http://10.0.0.66:8080", u64::MAX).expect("location");
    refused_jump(
        rogue.set_location(&id, &top).await,
        "location term",
        "first location term 2^64-1",
    );

    // Honest progress, then each counter grows by its bound and no more.
    replica
        .record_checkpoint(&id, &checkpoint(1, 100, 7))
        .await
        .expect("checkpoint");
    refused_jump(
        rogue
            .record_checkpoint(&id, &checkpoint(2, 100 + MAX_LOG_INDEX_STEP + 1, 7))
            .await,
        "checkpoint log index",
        "log index jump",
    );
    refused_jump(
        rogue
            .record_checkpoint(&id, &checkpoint(2, 101, 7 + MAX_TERM_STEP + 1))
            .await,
        "checkpoint term",
        "term jump",
    );
    let loc = Location::new("http://10.0.0.7:8080", 7).expect("location");
    replica.set_location(&id, &loc).await.expect("location");
    let far = Location::new("http://10.0.0.66:8080", 7 + MAX_TERM_STEP + 1).expect("location");
    refused_jump(
        rogue.set_location(&id, &far).await,
        "location term",
        "location term jump",
    );
    let rec = owner.active(&id).await.expect("active");
    assert_eq!(rec.checkpoint, Some(checkpoint(1, 100, 7)));
    assert_eq!(rec.location, Some(loc.clone()));

    // A compromised replica account still moves each counter by up to its bound,
    // which locks the honest replicas out...
    let pushed = checkpoint(2, 100 + MAX_LOG_INDEX_STEP, 7 + MAX_TERM_STEP);
    rogue
        .record_checkpoint(&id, &pushed)
        .await
        .expect("a jump of exactly the bound");
    let high = Location::new("http://10.0.0.66:8080", 7 + MAX_TERM_STEP).expect("location");
    rogue.set_location(&id, &high).await.expect("bounded term");
    expect_kind(
        replica.record_checkpoint(&id, &checkpoint(3, 200, 8)).await,
        br2k_core::ErrorKind::Conflict,
        "honest checkpoint below the pushed one",
    );
    let honest = Location::new("http://10.0.0.8:8080", 8).expect("location");
    expect_kind(
        replica.set_location(&id, &honest).await,
        br2k_core::ErrorKind::Conflict,
        "honest term below the pushed one",
    );

    // ...until the owner, and only the owner, resets them.
    let good = Digest::of(b"snapshot 1");
    expect_kind(
        rogue.reset_checkpoint(&id, &good, 100, 7).await,
        br2k_core::ErrorKind::PermissionDenied,
        "replica resets the checkpoint",
    );
    expect_kind(
        rogue.reset_location(&id, &loc).await,
        br2k_core::ErrorKind::PermissionDenied,
        "replica resets the location",
    );
    let rec = owner
        .reset_checkpoint(&id, &good, 100, 7)
        .await
        .expect("owner resets the checkpoint");
    // The state version still grows, so readers never see the checkpoint go back.
    assert_eq!(
        rec.checkpoint,
        Some(Checkpoint {
            snapshot: good,
            log_index: 100,
            term: 7,
            state_version: 3,
        })
    );
    let rec = owner
        .reset_location(&id, &loc)
        .await
        .expect("owner resets the location");
    assert_eq!(rec.location, Some(loc));
    replica
        .record_checkpoint(&id, &checkpoint(4, 200, 8))
        .await
        .expect("honest checkpoint after the reset");
    replica
        .set_location(&id, &honest)
        .await
        .expect("honest location after the reset");
    let rec = rogue.active(&id).await.expect("active");
    assert_eq!(rec.checkpoint, Some(checkpoint(4, 200, 8)));
    assert_eq!(rec.location, Some(honest));
}

#[tokio::test]
#[ignore = "needs stack"]
async fn every_event_names_the_account_that_made_it() {
    let node = anvil();
    let handles = accounts(&node, 4).await;
    let (owner, operator, replica, heir) = (&handles[0], &handles[1], &handles[2], &handles[3]);
    let id = fresh("audit");
    let spec = sample_spec("r.local");
    owner.register(&id, &spec).await.expect("register");
    owner
        .grant(&id, &operator.account(), Role::Operator)
        .await
        .expect("grant operator");
    owner
        .grant(&id, &replica.account(), Role::Replica)
        .await
        .expect("grant replica");
    let mut v2 = spec.clone();
    v2.replicas = 5;
    operator.publish(&id, &v2).await.expect("publish");
    operator.set_replicas(&id, 4).await.expect("scale");
    operator.resume(&id).await.expect("resume");
    operator.rollback(&id, 1).await.expect("rollback");
    replica
        .record_checkpoint(&id, &checkpoint(1, 10, 1))
        .await
        .expect("checkpoint");
    let loc = Location::new("http://10.0.0.7:8080", 1).expect("location");
    replica.set_location(&id, &loc).await.expect("location");
    owner
        .reset_checkpoint(&id, &Digest::of(b"snapshot 2"), 10, 1)
        .await
        .expect("reset");
    owner
        .revoke(&id, &operator.account(), Role::Operator)
        .await
        .expect("revoke");
    owner
        .transfer_ownership(&id, &operator.account())
        .await
        .expect("propose");
    owner.cancel_ownership_transfer(&id).await.expect("cancel");
    owner
        .transfer_ownership(&id, &heir.account())
        .await
        .expect("propose");
    heir.accept_ownership(&id).await.expect("accept");

    let (o, op, r, h) = (
        owner.account(),
        operator.account(),
        replica.account(),
        heir.account(),
    );
    let audit = heir.audit(&id).await.expect("audit");
    let got: Vec<(ChangeKind, Account)> = audit
        .iter()
        .map(|e| (e.change.kind.clone(), e.by.clone()))
        .collect();
    let want = vec![
        (ChangeKind::Registered, o.clone()),
        (ChangeKind::RolesChanged, o.clone()),
        (ChangeKind::RolesChanged, o.clone()),
        (ChangeKind::Published { version: 2 }, op.clone()),
        (ChangeKind::Scaled { replicas: 4 }, op.clone()),
        (
            ChangeKind::StateChanged {
                state: ServiceState::Running,
            },
            op.clone(),
        ),
        (ChangeKind::RolledBack { version: 1 }, op.clone()),
        (
            ChangeKind::Checkpointed {
                checkpoint: checkpoint(1, 10, 1),
            },
            r.clone(),
        ),
        (ChangeKind::Relocated { location: loc }, r),
        (
            ChangeKind::Checkpointed {
                checkpoint: checkpoint(2, 10, 1),
            },
            o.clone(),
        ),
        (ChangeKind::RolesChanged, o.clone()),
        (ChangeKind::RolesChanged, o.clone()),
        (ChangeKind::RolesChanged, o.clone()),
        (ChangeKind::RolesChanged, o),
        (ChangeKind::RolesChanged, h),
    ];
    assert_eq!(got, want, "who made each change");
    // `by` is the transaction's sender as the node reports it, for every entry.
    let provider = ProviderBuilder::new().connect_http(url(&node));
    for e in &audit {
        let tx = e.tx.expect("transaction hash");
        let sent = provider
            .get_transaction_by_hash(tx)
            .await
            .expect("transaction")
            .expect("known transaction");
        assert_eq!(
            account_of(sent.inner.signer()),
            e.by,
            "{:?} of {tx}",
            e.change.kind
        );
        assert_ne!(tx, B256::ZERO);
    }
    expect_kind(
        owner.audit(&fresh("unknown")).await,
        br2k_core::ErrorKind::NotFound,
        "audit of an unknown service",
    );
}

/// The raw contract, sending as anvil account `i`.
fn raw_as(
    node: &AnvilInstance,
    registry: alloy::primitives::Address,
    i: usize,
) -> ServiceRegistry::ServiceRegistryInstance<impl Provider + Clone> {
    let signer = alloy::signers::local::PrivateKeySigner::from(node.keys()[i].clone());
    ServiceRegistry::new(
        registry,
        ProviderBuilder::new()
            .wallet(signer)
            .connect_http(url(node)),
    )
}

/// The refusal of `setPlacement(id, epoch, cluster)` by anvil account `i`, as a call
/// (a refused transaction would leave the provider's nonce cache ahead of the chain).
async fn refusal(
    node: &AnvilInstance,
    registry: alloy::primitives::Address,
    i: usize,
    id: B256,
    epoch: u64,
    cluster: B256,
) -> Refusal {
    let from = node.addresses()[i];
    match raw_as(node, registry, i)
        .setPlacement(id, epoch, cluster)
        .from(from)
        .call()
        .await
    {
        Ok(_) => panic!("setPlacement({epoch}, {cluster}) by account {i} was accepted"),
        Err(e) => e
            .as_decoded_interface_error::<Refusal>()
            .unwrap_or_else(|| panic!("not a registry refusal: {e}")),
    }
}

/// A cluster word from raw bytes (left-aligned, zero padded), valid or not.
fn word(bytes: &[u8]) -> B256 {
    let mut w = [0u8; 32];
    w[..bytes.len()].copy_from_slice(bytes);
    B256::from(w)
}

#[tokio::test]
#[ignore = "needs stack"]
async fn placement_epochs_only_grow_by_bounded_steps_and_cluster_names_are_checked() {
    let node = anvil();
    let handles = accounts(&node, 3).await;
    let (owner, operator, stranger) = (&handles[0], &handles[1], &handles[2]);
    let id = fresh("placed");
    owner
        .register(&id, &sample_spec("r.local"))
        .await
        .expect("register");
    owner
        .grant(&id, &operator.account(), Role::Operator)
        .await
        .expect("grant operator");
    let key = service_key(&id);
    let reg = owner.address();
    let (eu, us) = (word(b"eu-1"), word(b"us-2"));
    let raw = raw_as(&node, reg, 1);
    assert_eq!(
        raw.COUNTER_PLACEMENT_EPOCH().call().await.expect("view"),
        4,
        "the counter JumpTooLarge names"
    );

    // Raw refusals, each with what it names.
    match refusal(&node, reg, 2, key, 5, eu).await {
        Refusal::NotOperator(e) => {
            assert_eq!((e.id, e.caller), (key, node.addresses()[2]));
        }
        other => panic!("stranger: {other:?}"),
    }
    let mut shifted = [0u8; 32];
    shifted[1..5].copy_from_slice(b"eu-1");
    let mut gap = word(b"eu");
    gap.0[3] = b'x';
    for (cluster, what) in [
        (B256::ZERO, "no cluster"),
        (word(b"EU-1"), "uppercase"),
        (word(b"-eu"), "leading '-'"),
        (word(b"eu-"), "trailing '-'"),
        (word(b"eu_1"), "'_'"),
        (B256::from(shifted), "not left-aligned"),
        (gap, "a byte after the padding"),
    ] {
        assert!(
            matches!(
                refusal(&node, reg, 1, key, 5, cluster).await,
                Refusal::InvalidCluster(_)
            ),
            "{what}"
        );
    }
    // The first epoch is above 0 and at most MAX_TERM_STEP.
    match refusal(&node, reg, 1, key, 0, eu).await {
        Refusal::StaleEpoch(e) => assert_eq!((e.id, e.epoch, e.recorded), (key, 0, 0)),
        other => panic!("epoch 0: {other:?}"),
    }
    match refusal(&node, reg, 1, key, MAX_TERM_STEP + 1, eu).await {
        Refusal::JumpTooLarge(e) => assert_eq!(
            (e.counter, e.value, e.recorded, e.maxStep),
            (4, MAX_TERM_STEP + 1, 0, MAX_TERM_STEP)
        ),
        other => panic!("first epoch above the bound: {other:?}"),
    }

    // The operator places the service: one `Placed` event naming it; again, none.
    let receipt = raw
        .setPlacement(key, 5, eu)
        .send()
        .await
        .expect("send")
        .get_receipt()
        .await
        .expect("mined");
    assert!(receipt.status(), "placement mined");
    let placed: Vec<ServiceRegistry::Placed> = receipt
        .inner
        .logs()
        .iter()
        .filter_map(|l| l.log_decode::<ServiceRegistry::Placed>().ok())
        .map(|l| l.inner.data)
        .collect();
    assert_eq!(placed.len(), 1, "one Placed event");
    assert_eq!(
        (
            placed[0].id,
            placed[0].by,
            placed[0].epoch,
            placed[0].cluster
        ),
        (key, node.addresses()[1], 5, eu)
    );
    let again = raw
        .setPlacement(key, 5, eu)
        .send()
        .await
        .expect("send")
        .get_receipt()
        .await
        .expect("mined");
    assert!(again.status(), "the same placement again is accepted");
    assert!(
        again.inner.logs().is_empty(),
        "the same placement again emits nothing"
    );
    let (_, rec) = raw
        .getRecord(key)
        .call()
        .await
        .map(|r| (r.blockNumber, r.record))
        .expect("record");
    assert_eq!(
        (
            rec.placement.cluster,
            rec.placement.epoch,
            rec.placement.blockNumber
        ),
        (eu, 5, receipt.block_number.expect("block"))
    );

    // Never back, never the same epoch for another cluster, never too far ahead.
    for (epoch, cluster, what) in [(5, us, "same epoch"), (4, eu, "older epoch")] {
        match refusal(&node, reg, 1, key, epoch, cluster).await {
            Refusal::StaleEpoch(e) => {
                assert_eq!((e.epoch, e.recorded), (epoch, 5), "{what}")
            }
            other => panic!("{what}: {other:?}"),
        }
    }
    match refusal(&node, reg, 0, key, 5 + MAX_TERM_STEP + 1, us).await {
        Refusal::JumpTooLarge(e) => {
            assert_eq!((e.counter, e.recorded), (4, 5), "the owner is bound too")
        }
        other => panic!("epoch jump: {other:?}"),
    }

    // Through the backend: the refusals mapped to core errors.
    expect_kind(
        stranger
            .set_placement(&id, &Placement::new("us-2", 6).expect("placement"))
            .await,
        br2k_core::ErrorKind::PermissionDenied,
        "stranger",
    );
    expect_kind(
        operator
            .set_placement(&id, &Placement::new("us-2", 5).expect("placement"))
            .await,
        br2k_core::ErrorKind::Conflict,
        "same epoch, other cluster",
    );
    refused_jump(
        operator
            .set_placement(
                &id,
                &Placement::new("us-2", 5 + MAX_TERM_STEP + 1).expect("placement"),
            )
            .await,
        "placement epoch",
        "epoch jump",
    );
    // An invalid name is refused before anything is sent.
    let provider = ProviderBuilder::new().connect_http(url(&node));
    let before = provider.get_block_number().await.expect("head");
    let bad = Placement {
        cluster: "Not A Cluster".into(),
        epoch: 6,
    };
    expect_kind(
        operator.set_placement(&id, &bad).await,
        br2k_core::ErrorKind::InvalidInput,
        "invalid cluster name",
    );
    assert_eq!(
        provider.get_block_number().await.expect("head"),
        before,
        "nothing was mined"
    );
    // A jump of exactly the bound is accepted, and read back.
    let far = Placement::new("us-2", 5 + MAX_TERM_STEP).expect("placement");
    owner
        .set_placement(&id, &far)
        .await
        .expect("a jump of exactly the bound");
    assert_eq!(
        stranger.active(&id).await.expect("active").placement,
        Some(far.clone())
    );
    assert_eq!(cluster_word("us-2").expect("valid"), us);
    let audit = stranger.audit(&id).await.expect("audit");
    let placements: Vec<(ChangeKind, Account)> = audit
        .iter()
        .filter(|e| matches!(e.change.kind, ChangeKind::Placed { .. }))
        .map(|e| (e.change.kind.clone(), e.by.clone()))
        .collect();
    assert_eq!(
        placements,
        vec![
            (
                ChangeKind::Placed {
                    placement: Placement::new("eu-1", 5).expect("placement"),
                },
                operator.account(),
            ),
            (ChangeKind::Placed { placement: far }, owner.account()),
        ],
        "who placed the service"
    );
}
