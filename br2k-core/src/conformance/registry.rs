//! Conformance of [`Registry`] implementations.
//!
//! Every behaviour takes handles on the same registry acting as different accounts:
//! `owner` registers the services, `stranger` holds no role unless a behaviour grants
//! one, and `replica` is granted [`Role::Replica`] by the behaviours that need it.
//! Each behaviour uses only the service ids it is given, so it can run next to other
//! traffic on a shared backend.

use std::time::Duration;

use futures::StreamExt;

use super::{DEFAULT_TIMEOUT, expect_kind, sample_spec};
use crate::digest::Digest;
use crate::id::ServiceId;
use crate::image::ImageRef;
use crate::record::{ChangeKind, Checkpoint, Location, Role, ServiceRecord, ServiceState};
use crate::registry::Registry;
use crate::spec::{MAX_REPLICAS, ServiceSpec};

/// Registry host used in the specs of this suite.
const REG: &str = "registry.conformance.local";

fn spec_v1() -> ServiceSpec {
    sample_spec(REG)
}

fn spec_v2() -> ServiceSpec {
    let mut s = sample_spec(REG);
    s.replicas = 5;
    s.image = s.image.with_digest(Digest::of(b"conformance image v2"));
    s.env.insert("FEATURE".into(), "v2".into());
    s
}

fn spec_v3() -> ServiceSpec {
    let mut s = sample_spec(REG);
    s.replicas = 4;
    s.image = s.image.with_digest(Digest::of(b"conformance image v3"));
    s
}

fn checkpoint(state_version: u64, log_index: u64, term: u64) -> Checkpoint {
    Checkpoint {
        snapshot: Digest::of(format!("snapshot {state_version}").as_bytes()),
        log_index,
        term,
        state_version,
    }
}

/// Fields that must be equal between two reads of the same record (`as_of` may move).
fn same_record(a: &ServiceRecord, b: &ServiceRecord, ctx: &str) {
    let strip = |r: &ServiceRecord| ServiceRecord {
        as_of: None,
        ..r.clone()
    };
    assert_eq!(strip(a), strip(b), "{ctx}: records differ");
}

/// Register: version 1, state Ready, caller owner; readable by `active`, `version`,
/// `history` and listed by `services`.
pub async fn register_and_read(owner: &dyn Registry, id: &ServiceId) {
    let spec = spec_v1();
    let rec = owner.register(id, &spec).await.expect("register");
    assert_eq!(rec.id, *id);
    assert_eq!((rec.version, rec.latest_version), (1, 1));
    assert_eq!(rec.spec, spec);
    assert_eq!(rec.spec_hash, spec.spec_hash());
    assert_eq!(rec.replicas, spec.replicas);
    assert_eq!(rec.state, ServiceState::Ready);
    assert_eq!(rec.owner, owner.account());
    assert_eq!(rec.checkpoint, None);
    assert_eq!(rec.location, None);
    assert!(!rec.stale);
    assert_eq!(rec.desired_replicas(), 0, "nothing runs while Ready");
    rec.verify().expect("recorded hash matches");

    let active = owner.active(id).await.expect("active");
    same_record(&active, &rec, "active after register");
    if let (Some(a), Some(r)) = (active.as_of, rec.as_of) {
        assert!(a >= r, "as_of went backwards");
    }
    let v1 = owner.version(id, 1).await.expect("version 1");
    assert_eq!(v1.version, 1);
    assert_eq!(v1.spec, spec);
    assert_eq!(v1.spec_hash, spec.spec_hash());
    assert_eq!(v1.publisher, owner.account());
    let history = owner.history(id).await.expect("history");
    assert_eq!(history, vec![v1]);
    assert!(
        owner.services().await.expect("services").contains(id),
        "services lists {id}"
    );
}

/// A second register of the same id is AlreadyExists, whoever asks, and changes
/// nothing.
pub async fn register_duplicate_is_already_exists(
    owner: &dyn Registry,
    stranger: &dyn Registry,
    id: &ServiceId,
) {
    let rec = owner.register(id, &spec_v1()).await.expect("register");
    expect_kind(
        owner.register(id, &spec_v2()).await,
        crate::ErrorKind::AlreadyExists,
        "owner registers twice",
    );
    expect_kind(
        stranger.register(id, &spec_v2()).await,
        crate::ErrorKind::AlreadyExists,
        "stranger claims a registered id",
    );
    same_record(
        &owner.active(id).await.expect("active"),
        &rec,
        "after duplicate registers",
    );
}

/// Invalid specs (unpinned image, secret in env, too many replicas) are InvalidInput
/// and register nothing.
pub async fn register_invalid_spec_is_rejected(owner: &dyn Registry, id: &ServiceId) {
    let mut unpinned = spec_v1();
    unpinned.image = ImageRef::parse(&format!("{REG}/br2k/sample:1.0")).expect("ref");
    let mut secret_name = spec_v1();
    secret_name
        .env
        .insert("DB_PASSWORD".into(), "hunter2".into());
    let mut secret_value = spec_v1();
    secret_value
        .env
        .insert("UPSTREAM".into(), "https://user:pw@rpc.example".into());
    let mut too_many = spec_v1();
    too_many.replicas = MAX_REPLICAS + 1;
    for (spec, what) in [
        (unpinned, "unpinned image"),
        (secret_name, "secret env name"),
        (secret_value, "secret env value"),
        (too_many, "too many replicas"),
    ] {
        expect_kind(
            owner.register(id, &spec).await,
            crate::ErrorKind::InvalidInput,
            what,
        );
    }
    expect_kind(
        owner.active(id).await,
        crate::ErrorKind::NotFound,
        "after rejected registers",
    );
}

/// Publish makes a new active version with its replica count; publishing the active
/// spec again is a no-op; invalid specs are rejected without change.
pub async fn publish_versions_and_idempotence(owner: &dyn Registry, id: &ServiceId) {
    owner.register(id, &spec_v1()).await.expect("register");
    let v2 = spec_v2();
    let rec = owner.publish(id, &v2).await.expect("publish v2");
    assert_eq!((rec.version, rec.latest_version), (2, 2));
    assert_eq!(rec.spec, v2);
    assert_eq!(rec.spec_hash, v2.spec_hash());
    assert_eq!(rec.replicas, v2.replicas);
    assert_eq!(rec.state, ServiceState::Ready, "publish keeps the state");

    let again = owner.publish(id, &v2).await.expect("publish v2 again");
    assert_eq!(
        (again.version, again.latest_version),
        (2, 2),
        "publishing the active spec is idempotent"
    );

    let history = owner.history(id).await.expect("history");
    let versions: Vec<u64> = history.iter().map(|v| v.version).collect();
    assert_eq!(versions, [1, 2]);
    assert_eq!(history[0].spec, spec_v1());
    assert_eq!(history[1].spec, v2);
    assert_eq!(owner.version(id, 2).await.expect("version 2").spec, v2);
    expect_kind(
        owner.version(id, 3).await,
        crate::ErrorKind::NotFound,
        "version 3",
    );
    expect_kind(
        owner.version(id, 0).await,
        crate::ErrorKind::NotFound,
        "version 0",
    );

    let mut bad = v2.clone();
    bad.env.insert("API_TOKEN".into(), "x".into());
    expect_kind(
        owner.publish(id, &bad).await,
        crate::ErrorKind::InvalidInput,
        "publish invalid",
    );
    let active = owner.active(id).await.expect("active");
    assert_eq!((active.version, active.latest_version), (2, 2));
}

/// set_replicas sets the desired count without a new version; idempotent; bounds are
/// InvalidInput.
pub async fn set_replicas_behaviour(owner: &dyn Registry, id: &ServiceId) {
    owner.register(id, &spec_v1()).await.expect("register");
    let rec = owner.set_replicas(id, 7).await.expect("set_replicas");
    assert_eq!(rec.replicas, 7);
    assert_eq!(rec.version, 1, "scaling publishes no version");
    assert_eq!(
        rec.spec.replicas,
        spec_v1().replicas,
        "the spec is unchanged"
    );
    let again = owner.set_replicas(id, 7).await.expect("set_replicas again");
    assert_eq!(again.replicas, 7);
    expect_kind(
        owner.set_replicas(id, MAX_REPLICAS + 1).await,
        crate::ErrorKind::InvalidInput,
        "too many replicas",
    );
    assert_eq!(owner.active(id).await.expect("active").replicas, 7);
    let zero = owner.set_replicas(id, 0).await.expect("scale to zero");
    assert_eq!(zero.replicas, 0);
}

/// Tries `to` from the current state `from`: same state is an idempotent success,
/// an allowed move succeeds, a forbidden one is Conflict and leaves `from`.
async fn try_transition(
    owner: &dyn Registry,
    id: &ServiceId,
    from: ServiceState,
    to: ServiceState,
) {
    let ctx = format!("{from} -> {to}");
    let result = owner.set_state(id, to).await;
    if from == to || from.can_become(to) {
        let rec = result.unwrap_or_else(|e| panic!("{ctx}: {e}"));
        assert_eq!(rec.state, to, "{ctx}");
        assert_eq!(
            rec.desired_replicas(),
            if to == ServiceState::Running {
                rec.replicas
            } else {
                0
            },
            "{ctx}: desired replicas"
        );
    } else {
        expect_kind(result, crate::ErrorKind::Conflict, &ctx);
        assert_eq!(
            owner.active(id).await.expect("active").state,
            from,
            "{ctx}: state kept"
        );
    }
}

/// Every transition between the four states, allowed ones and Conflict ones, plus the
/// `pause`/`resume`/`stop` helpers. Needs two ids (Ready is only ever the first state).
pub async fn state_transitions(owner: &dyn Registry, id: &ServiceId, other: &ServiceId) {
    use ServiceState::*;
    owner.register(id, &spec_v1()).await.expect("register");
    // At each visited state, try every forbidden move and the idempotent one, then
    // take the planned allowed move. The walk covers every allowed transition.
    let walk = [
        (Ready, Running),
        (Running, Paused),
        (Paused, Running),
        (Running, Stopped),
        (Stopped, Running),
        (Running, Paused),
        (Paused, Stopped),
    ];
    for (from, next) in walk {
        for to in [Ready, Running, Paused, Stopped] {
            if to == from || !from.can_become(to) {
                try_transition(owner, id, from, to).await;
            }
        }
        try_transition(owner, id, from, next).await;
    }
    // Ready -> Stopped on a second service, and the helpers.
    owner.register(other, &spec_v1()).await.expect("register");
    try_transition(owner, other, Ready, Stopped).await;
    assert_eq!(owner.resume(other).await.expect("resume").state, Running);
    assert_eq!(owner.pause(other).await.expect("pause").state, Paused);
    assert_eq!(owner.stop(other).await.expect("stop").state, Stopped);
    expect_kind(
        owner.pause(other).await,
        crate::ErrorKind::Conflict,
        "pause a stopped service",
    );
}

/// Rollback moves the active pointer to an earlier version and its replica count;
/// the active version is a no-op, a later one Conflict, an unknown one NotFound.
pub async fn rollback_semantics(owner: &dyn Registry, id: &ServiceId) {
    owner.register(id, &spec_v1()).await.expect("register");
    owner.publish(id, &spec_v2()).await.expect("publish v2");
    owner.publish(id, &spec_v3()).await.expect("publish v3");
    let same = owner.rollback(id, 3).await.expect("rollback to active");
    assert_eq!((same.version, same.latest_version), (3, 3));

    let rec = owner.rollback(id, 1).await.expect("rollback to 1");
    assert_eq!((rec.version, rec.latest_version), (1, 3));
    assert_eq!(rec.spec, spec_v1());
    assert_eq!(rec.spec_hash, spec_v1().spec_hash());
    assert_eq!(rec.replicas, spec_v1().replicas, "replicas of version 1");
    rec.verify().expect("rolled-back record verifies");
    let again = owner.rollback(id, 1).await.expect("rollback to 1 again");
    assert_eq!(again.version, 1);

    expect_kind(
        owner.rollback(id, 2).await,
        crate::ErrorKind::Conflict,
        "roll forward",
    );
    expect_kind(
        owner.rollback(id, 4).await,
        crate::ErrorKind::NotFound,
        "unknown version",
    );
    expect_kind(
        owner.rollback(id, 0).await,
        crate::ErrorKind::NotFound,
        "version 0",
    );
    assert_eq!(owner.active(id).await.expect("active").version, 1);
    assert_eq!(owner.history(id).await.expect("history").len(), 3);

    // Publishing the active spec stays a no-op; another spec appends a version.
    let rec = owner.publish(id, &spec_v1()).await.expect("publish active");
    assert_eq!((rec.version, rec.latest_version), (1, 3));
    let rec = owner
        .publish(id, &spec_v2())
        .await
        .expect("publish v2 again");
    assert_eq!((rec.version, rec.latest_version), (4, 4));
    assert_eq!(rec.replicas, spec_v2().replicas);
}

/// Checkpoints: replica accounts only, state versions increase by one from 1, log
/// indexes never decrease, re-recording the newest is a no-op.
pub async fn checkpoints(owner: &dyn Registry, replica: &dyn Registry, id: &ServiceId) {
    owner.register(id, &spec_v1()).await.expect("register");
    expect_kind(
        replica.record_checkpoint(id, &checkpoint(1, 10, 1)).await,
        crate::ErrorKind::PermissionDenied,
        "checkpoint before the grant",
    );
    owner
        .grant(id, &replica.account(), Role::Replica)
        .await
        .expect("grant replica");
    expect_kind(
        owner.record_checkpoint(id, &checkpoint(1, 10, 1)).await,
        crate::ErrorKind::PermissionDenied,
        "owner without the replica role",
    );
    expect_kind(
        replica.record_checkpoint(id, &checkpoint(2, 10, 1)).await,
        crate::ErrorKind::Conflict,
        "first state version must be 1",
    );
    let cp1 = checkpoint(1, 10, 1);
    replica.record_checkpoint(id, &cp1).await.expect("cp1");
    assert_eq!(
        owner.active(id).await.expect("active").checkpoint,
        Some(cp1.clone())
    );
    replica
        .record_checkpoint(id, &cp1)
        .await
        .expect("cp1 again is a no-op");
    expect_kind(
        replica.record_checkpoint(id, &checkpoint(3, 30, 1)).await,
        crate::ErrorKind::Conflict,
        "skipped state version",
    );
    expect_kind(
        replica.record_checkpoint(id, &checkpoint(2, 5, 1)).await,
        crate::ErrorKind::Conflict,
        "log index went backwards",
    );
    expect_kind(
        replica.record_checkpoint(id, &checkpoint(1, 11, 1)).await,
        crate::ErrorKind::Conflict,
        "old state version with other content",
    );
    let cp2 = checkpoint(2, 20, 2);
    replica.record_checkpoint(id, &cp2).await.expect("cp2");
    let cp3 = checkpoint(3, 20, 2);
    replica
        .record_checkpoint(id, &cp3)
        .await
        .expect("cp3 at the same log index");
    assert_eq!(
        owner.active(id).await.expect("active").checkpoint,
        Some(cp3)
    );
    owner
        .revoke(id, &replica.account(), Role::Replica)
        .await
        .expect("revoke");
    expect_kind(
        replica.record_checkpoint(id, &checkpoint(4, 40, 2)).await,
        crate::ErrorKind::PermissionDenied,
        "checkpoint after revoke",
    );
}

/// Location: replica accounts only; same location a no-op; a lower term Conflict;
/// endpoints with credentials InvalidInput.
pub async fn location(owner: &dyn Registry, replica: &dyn Registry, id: &ServiceId) {
    owner.register(id, &spec_v1()).await.expect("register");
    let l2 = Location::new("http://10.0.0.7:8080", 2).expect("location");
    expect_kind(
        replica.set_location(id, &l2).await,
        crate::ErrorKind::PermissionDenied,
        "location before the grant",
    );
    owner
        .grant(id, &replica.account(), Role::Replica)
        .await
        .expect("grant replica");
    expect_kind(
        owner.set_location(id, &l2).await,
        crate::ErrorKind::PermissionDenied,
        "owner without the replica role",
    );
    replica.set_location(id, &l2).await.expect("set location");
    assert_eq!(
        owner.active(id).await.expect("active").location,
        Some(l2.clone())
    );
    replica.set_location(id, &l2).await.expect("same location");
    let l1 = Location::new("http://10.0.0.8:8080", 1).expect("location");
    expect_kind(
        replica.set_location(id, &l1).await,
        crate::ErrorKind::Conflict,
        "lower term",
    );
    let bad = Location {
        endpoint: "http://user:secret@10.0.0.9:8080".into(),
        term: 5,
    };
    expect_kind(
        replica.set_location(id, &bad).await,
        crate::ErrorKind::InvalidInput,
        "endpoint with credentials",
    );
    let l3 = Location::new("http://10.0.0.9:8080", 3).expect("location");
    replica.set_location(id, &l3).await.expect("new leader");
    assert_eq!(owner.active(id).await.expect("active").location, Some(l3));
}

/// A stranger is refused every write; grants, revokes and transfers change who may
/// do what.
pub async fn roles_and_permissions(owner: &dyn Registry, stranger: &dyn Registry, id: &ServiceId) {
    let rec = owner.register(id, &spec_v1()).await.expect("register");
    let me = owner.account();
    let them = stranger.account();
    let denied = crate::ErrorKind::PermissionDenied;
    expect_kind(
        stranger.publish(id, &spec_v2()).await,
        denied,
        "stranger publish",
    );
    expect_kind(stranger.set_replicas(id, 9).await, denied, "stranger scale");
    expect_kind(
        stranger.set_state(id, ServiceState::Running).await,
        denied,
        "stranger start",
    );
    expect_kind(stranger.rollback(id, 1).await, denied, "stranger rollback");
    expect_kind(
        stranger.record_checkpoint(id, &checkpoint(1, 1, 1)).await,
        denied,
        "stranger checkpoint",
    );
    let loc = Location::new("http://10.0.0.7:8080", 1).expect("location");
    expect_kind(
        stranger.set_location(id, &loc).await,
        denied,
        "stranger location",
    );
    expect_kind(
        stranger.grant(id, &them, Role::Operator).await,
        denied,
        "stranger grants itself",
    );
    expect_kind(
        stranger.revoke(id, &me, Role::Operator).await,
        denied,
        "stranger revoke",
    );
    expect_kind(
        stranger.transfer_ownership(id, &them).await,
        denied,
        "stranger takes ownership",
    );
    same_record(
        &owner.active(id).await.expect("active"),
        &rec,
        "after refused writes",
    );

    // An operator may operate but not manage roles, nor act as a replica.
    owner.grant(id, &them, Role::Operator).await.expect("grant");
    owner
        .grant(id, &them, Role::Operator)
        .await
        .expect("grant is idempotent");
    assert_eq!(
        stranger
            .set_replicas(id, 6)
            .await
            .expect("operator scales")
            .replicas,
        6
    );
    assert_eq!(
        stranger
            .publish(id, &spec_v2())
            .await
            .expect("operator publishes")
            .version,
        2
    );
    assert_eq!(
        stranger.resume(id).await.expect("operator starts").state,
        ServiceState::Running
    );
    assert_eq!(
        stranger
            .rollback(id, 1)
            .await
            .expect("operator rolls back")
            .version,
        1
    );
    expect_kind(
        stranger.grant(id, &them, Role::Replica).await,
        denied,
        "operator grants",
    );
    expect_kind(
        stranger.transfer_ownership(id, &them).await,
        denied,
        "operator takes ownership",
    );
    expect_kind(
        stranger.record_checkpoint(id, &checkpoint(1, 1, 1)).await,
        denied,
        "operator checkpoint",
    );
    owner
        .revoke(id, &them, Role::Operator)
        .await
        .expect("revoke");
    owner
        .revoke(id, &them, Role::Operator)
        .await
        .expect("revoke is idempotent");
    expect_kind(
        stranger.set_replicas(id, 2).await,
        denied,
        "revoked operator",
    );

    // Ownership moves in two steps: the owner proposes, the proposed account accepts.
    expect_kind(
        stranger.accept_ownership(id).await,
        denied,
        "accept without a proposal",
    );
    assert_eq!(owner.pending_owner(id).await.expect("pending"), None);
    owner.transfer_ownership(id, &them).await.expect("propose");
    owner
        .transfer_ownership(id, &them)
        .await
        .expect("proposing again is idempotent");
    assert_eq!(
        owner.pending_owner(id).await.expect("pending"),
        Some(them.clone())
    );
    // Until it accepts, the owner keeps every right and the proposed account has none.
    assert_eq!(owner.active(id).await.expect("active").owner, me);
    assert_eq!(
        owner
            .set_replicas(id, 3)
            .await
            .expect("owner still scales")
            .replicas,
        3
    );
    owner
        .grant(id, &them, Role::Replica)
        .await
        .expect("owner still grants");
    owner
        .revoke(id, &them, Role::Replica)
        .await
        .expect("owner still revokes");
    expect_kind(
        stranger.set_replicas(id, 2).await,
        denied,
        "proposed owner scales before accepting",
    );
    expect_kind(
        stranger.cancel_ownership_transfer(id).await,
        denied,
        "proposed owner cancels",
    );
    expect_kind(
        owner.accept_ownership(id).await,
        denied,
        "owner accepts for the proposed account",
    );
    // The owner cancels; the proposed account can then no longer accept.
    owner.cancel_ownership_transfer(id).await.expect("cancel");
    owner
        .cancel_ownership_transfer(id)
        .await
        .expect("cancel is idempotent");
    assert_eq!(owner.pending_owner(id).await.expect("pending"), None);
    expect_kind(
        stranger.accept_ownership(id).await,
        denied,
        "accept after a cancel",
    );
    // Proposing the owner cancels too.
    owner.transfer_ownership(id, &them).await.expect("propose");
    owner
        .transfer_ownership(id, &me)
        .await
        .expect("propose the owner");
    assert_eq!(owner.pending_owner(id).await.expect("pending"), None);
    expect_kind(
        stranger.accept_ownership(id).await,
        denied,
        "accept after proposing the owner",
    );
    // Ownership moves, and back.
    owner.transfer_ownership(id, &them).await.expect("transfer");
    stranger.accept_ownership(id).await.expect("accept");
    assert_eq!(owner.active(id).await.expect("active").owner, them);
    assert_eq!(owner.pending_owner(id).await.expect("pending"), None);
    expect_kind(stranger.accept_ownership(id).await, denied, "accept twice");
    expect_kind(
        owner.set_replicas(id, 2).await,
        denied,
        "former owner scales",
    );
    expect_kind(
        owner.grant(id, &me, Role::Operator).await,
        denied,
        "former owner grants",
    );
    assert_eq!(
        stranger
            .set_replicas(id, 2)
            .await
            .expect("new owner")
            .replicas,
        2
    );
    stranger
        .transfer_ownership(id, &me)
        .await
        .expect("transfer back");
    assert_eq!(owner.active(id).await.expect("active").owner, them);
    owner.accept_ownership(id).await.expect("accept back");
    assert_eq!(owner.active(id).await.expect("active").owner, me);
}

/// Every call on an unregistered id is NotFound.
pub async fn unknown_ids_not_found(owner: &dyn Registry, id: &ServiceId) {
    let nf = crate::ErrorKind::NotFound;
    let acct = owner.account();
    expect_kind(owner.active(id).await, nf, "active");
    expect_kind(owner.version(id, 1).await, nf, "version");
    expect_kind(owner.history(id).await, nf, "history");
    expect_kind(owner.publish(id, &spec_v1()).await, nf, "publish");
    expect_kind(owner.set_replicas(id, 1).await, nf, "set_replicas");
    expect_kind(
        owner.set_state(id, ServiceState::Running).await,
        nf,
        "set_state",
    );
    expect_kind(owner.rollback(id, 1).await, nf, "rollback");
    expect_kind(
        owner.record_checkpoint(id, &checkpoint(1, 1, 1)).await,
        nf,
        "record_checkpoint",
    );
    let loc = Location::new("http://10.0.0.7:8080", 1).expect("location");
    expect_kind(owner.set_location(id, &loc).await, nf, "set_location");
    expect_kind(owner.grant(id, &acct, Role::Operator).await, nf, "grant");
    expect_kind(owner.revoke(id, &acct, Role::Operator).await, nf, "revoke");
    expect_kind(owner.transfer_ownership(id, &acct).await, nf, "transfer");
    expect_kind(owner.accept_ownership(id).await, nf, "accept");
    expect_kind(owner.cancel_ownership_transfer(id).await, nf, "cancel");
    expect_kind(owner.pending_owner(id).await, nf, "pending owner");
    assert!(!owner.services().await.expect("services").contains(id));
}

/// The change stream delivers every change of `id` once, in order, and nothing for
/// no-op writes.
pub async fn changes_stream(owner: &dyn Registry, replica: &dyn Registry, id: &ServiceId) {
    let mut stream = owner.changes().await.expect("changes");
    let cp = checkpoint(1, 10, 1);
    let loc = Location::new("http://10.0.0.7:8080", 1).expect("location");
    owner.register(id, &spec_v1()).await.expect("register");
    owner.publish(id, &spec_v2()).await.expect("publish");
    owner.publish(id, &spec_v2()).await.expect("no-op publish");
    owner.set_replicas(id, 8).await.expect("scale");
    owner.set_replicas(id, 8).await.expect("no-op scale");
    owner.resume(id).await.expect("resume");
    owner.resume(id).await.expect("no-op resume");
    owner.pause(id).await.expect("pause");
    owner.rollback(id, 1).await.expect("rollback");
    owner.rollback(id, 1).await.expect("no-op rollback");
    owner
        .grant(id, &replica.account(), Role::Replica)
        .await
        .expect("grant");
    replica
        .record_checkpoint(id, &cp)
        .await
        .expect("checkpoint");
    replica
        .record_checkpoint(id, &cp)
        .await
        .expect("no-op checkpoint");
    replica.set_location(id, &loc).await.expect("location");
    replica
        .set_location(id, &loc)
        .await
        .expect("no-op location");
    let expected = vec![
        ChangeKind::Registered,
        ChangeKind::Published { version: 2 },
        ChangeKind::Scaled { replicas: 8 },
        ChangeKind::StateChanged {
            state: ServiceState::Running,
        },
        ChangeKind::StateChanged {
            state: ServiceState::Paused,
        },
        ChangeKind::RolledBack { version: 1 },
        ChangeKind::RolesChanged,
        ChangeKind::Checkpointed { checkpoint: cp },
        ChangeKind::Relocated { location: loc },
    ];

    let mut seen = Vec::new();
    let mut last_at = None;
    let mut next = async |wait: Duration| loop {
        match tokio::time::timeout(wait, stream.next()).await {
            Err(_) | Ok(None) => return None,
            // Transient stream errors are allowed; the change must still come.
            Ok(Some(Err(_))) => continue,
            Ok(Some(Ok(change))) if change.id == *id => return Some(change),
            Ok(Some(Ok(_))) => continue,
        }
    };
    while seen.len() < expected.len() {
        let change = next(DEFAULT_TIMEOUT)
            .await
            .unwrap_or_else(|| panic!("changes of {id}: got only {seen:?}"));
        if let (Some(prev), Some(at)) = (last_at, change.at) {
            assert!(
                at >= prev,
                "change positions go backwards: {prev} then {at}"
            );
        }
        last_at = change.at.or(last_at);
        seen.push(change.kind);
    }
    assert_eq!(seen, expected, "changes of {id}, in order");
    if let Some(extra) = next(Duration::from_secs(1)).await {
        panic!("changes of {id}: unexpected extra change {extra:?}");
    }
}

/// Runs every behaviour. `owner`, `stranger` and `replica` are handles on the same
/// registry acting as three different accounts; `replica` must not hold any role yet
/// (the suite grants [`Role::Replica`] itself). `fresh_id(name)` returns an id never
/// used before (e.g. `name` plus a random suffix), so the suite can run repeatedly
/// against a persistent backend.
pub async fn run_all(
    owner: &dyn Registry,
    stranger: &dyn Registry,
    replica: &dyn Registry,
    fresh_id: impl Fn(&str) -> ServiceId,
) {
    assert_ne!(owner.account(), stranger.account(), "distinct accounts");
    assert_ne!(owner.account(), replica.account(), "distinct accounts");
    assert_ne!(stranger.account(), replica.account(), "distinct accounts");
    register_and_read(owner, &fresh_id("register")).await;
    register_duplicate_is_already_exists(owner, stranger, &fresh_id("duplicate")).await;
    register_invalid_spec_is_rejected(owner, &fresh_id("invalid")).await;
    publish_versions_and_idempotence(owner, &fresh_id("publish")).await;
    set_replicas_behaviour(owner, &fresh_id("scale")).await;
    state_transitions(owner, &fresh_id("states"), &fresh_id("states-b")).await;
    rollback_semantics(owner, &fresh_id("rollback")).await;
    checkpoints(owner, replica, &fresh_id("checkpoint")).await;
    location(owner, replica, &fresh_id("location")).await;
    roles_and_permissions(owner, stranger, &fresh_id("roles")).await;
    unknown_ids_not_found(owner, &fresh_id("unknown")).await;
    changes_stream(owner, replica, &fresh_id("changes")).await;
}
