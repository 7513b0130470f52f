//! Conformance behaviours of a service's lifecycle: register, publish, scale, state
//! transitions and rollback, all by the owner.

use super::super::expect_kind;
use super::{REG, same_record, spec_v1, spec_v2, spec_v3};
use crate::id::ServiceId;
use crate::image::ImageRef;
use crate::record::ServiceState;
use crate::registry::Registry;
use crate::spec::MAX_REPLICAS;

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
