//! Conformance behaviours of the other accounts: replica checkpoints and location,
//! roles and permissions, unknown ids, and the change stream.

use std::time::Duration;

use futures::StreamExt;

use super::super::{DEFAULT_TIMEOUT, expect_kind};
use super::{checkpoint, same_record, spec_v1, spec_v2};
use crate::id::ServiceId;
use crate::record::{ChangeKind, Location, Role, ServiceState};
use crate::registry::Registry;

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
