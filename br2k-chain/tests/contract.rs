//! The `ServiceRegistry` contract's own defences, on a private anvil spawned per test
//! from `BR2K_ANVIL_BIN`: two-step ownership transfer, bounded checkpoint and term
//! increments with the owner's reset, and events naming the account behind each
//! change.

use alloy::node_bindings::{Anvil, AnvilInstance};
use alloy::primitives::B256;
use alloy::providers::{Provider, ProviderBuilder};
use alloy::transports::http::reqwest::Url;
use br2k_chain::bindings::ServiceRegistry;
use br2k_chain::{ChainConfig, ChainRegistry, MAX_LOG_INDEX_STEP, MAX_TERM_STEP, account_of};
use br2k_core::conformance::{expect_kind, sample_spec};
use br2k_core::{
    Account, ChangeKind, Checkpoint, Digest, Error, Location, Registry, Role, ServiceId,
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
