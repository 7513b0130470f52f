//! Conformance of [`Registry`] implementations.
//!
//! Every behaviour takes handles on the same registry acting as different accounts:
//! `owner` registers the services, `stranger` holds no role unless a behaviour grants
//! one, and `replica` is granted [`Role::Replica`](crate::record::Role::Replica) by the behaviours that need it.
//! Each behaviour uses only the service ids it is given, so it can run next to other
//! traffic on a shared backend.
//!
//! The behaviours of a service's lifecycle (register, publish, scale, state
//! transitions, rollback) are in `lifecycle`; those of the other accounts (replica
//! checkpoints and location, roles and permissions, unknown ids, the change stream)
//! in `access`.

use super::sample_spec;
use crate::digest::Digest;
use crate::id::ServiceId;
use crate::record::{Checkpoint, ServiceRecord};
use crate::registry::Registry;
use crate::spec::ServiceSpec;

mod access;
mod lifecycle;
mod placement;

pub use access::{
    changes_stream, checkpoints, location, roles_and_permissions, unknown_ids_not_found,
};
pub use lifecycle::{
    publish_versions_and_idempotence, register_and_read, register_duplicate_is_already_exists,
    register_invalid_spec_is_rejected, rollback_semantics, set_replicas_behaviour,
    state_transitions,
};
pub use placement::placement;

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

/// Runs every behaviour. `owner`, `stranger` and `replica` are handles on the same
/// registry acting as three different accounts; `replica` must not hold any role yet
/// (the suite grants [`Role::Replica`](crate::record::Role::Replica) itself). `fresh_id(name)` returns an id never
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
    placement(owner, stranger, &fresh_id("placement")).await;
}
