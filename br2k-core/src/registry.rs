//! The service registry trait: the source of truth for what must run.

use std::fmt::Debug;

use async_trait::async_trait;
use futures::stream::BoxStream;

use crate::error::Result;
use crate::id::ServiceId;
use crate::record::{
    Account, Checkpoint, Location, Placement, RegistryChange, Role, ServiceRecord, ServiceState,
    VersionInfo,
};
use crate::spec::ServiceSpec;

/// A stream of registry changes, oldest first. Errors are transient unless the
/// stream ends after them.
pub type ChangeStream = BoxStream<'static, Result<RegistryChange>>;

/// The service registry: who may change what, and the record of what must run.
///
/// A handle acts as one [`Account`] (a signer on chain). Writes check that account's
/// role: owner for role changes; owner or [`Role::Operator`] for publish, scale, state
/// and rollback; [`Role::Replica`] for checkpoints and location. A refused write is
/// [`crate::Error::PermissionDenied`]; an unknown service is [`crate::Error::NotFound`];
/// invalid input is [`crate::Error::InvalidInput`] and changes nothing.
#[async_trait]
pub trait Registry: Send + Sync + Debug {
    /// The account this handle acts as.
    fn account(&self) -> Account;

    /// Registers `id` with `spec` as version 1 in state Ready; the caller becomes the
    /// owner. Not idempotent: a second call is [`crate::Error::AlreadyExists`].
    async fn register(&self, id: &ServiceId, spec: &ServiceSpec) -> Result<ServiceRecord>;

    /// Publishes `spec` as a new version and makes it active (its replica count
    /// becomes the desired count). Idempotent: a spec equal to the active one
    /// returns the active record without a new version.
    async fn publish(&self, id: &ServiceId, spec: &ServiceSpec) -> Result<ServiceRecord>;

    /// The active record, verified against its recorded spec hash
    /// ([`crate::Error::Tampered`] otherwise). When the source is unreachable a backend
    /// may return its last verified copy with `stale = true`.
    async fn active(&self, id: &ServiceId) -> Result<ServiceRecord>;

    /// One version (1-based); [`crate::Error::NotFound`] if it does not exist.
    async fn version(&self, id: &ServiceId, version: u64) -> Result<VersionInfo>;

    /// Every version, oldest first.
    async fn history(&self, id: &ServiceId) -> Result<Vec<VersionInfo>>;

    /// Ids of every registered service.
    async fn services(&self) -> Result<Vec<ServiceId>>;

    /// Sets the desired replica count. Idempotent.
    async fn set_replicas(&self, id: &ServiceId, replicas: u32) -> Result<ServiceRecord>;

    /// Moves the lifecycle state (see [`ServiceState::can_become`]). Idempotent for
    /// the current state; a forbidden transition is [`crate::Error::Conflict`].
    async fn set_state(&self, id: &ServiceId, state: ServiceState) -> Result<ServiceRecord>;

    /// Moves the active pointer to an earlier `version` (its replica count becomes the
    /// desired count). Idempotent for the active version; a later version is
    /// [`crate::Error::Conflict`], an unknown one [`crate::Error::NotFound`].
    async fn rollback(&self, id: &ServiceId, version: u64) -> Result<ServiceRecord>;

    /// Records a checkpoint (replica accounts only). Its `state_version` must be the
    /// previous one plus one and its `log_index` not below the previous one
    /// ([`crate::Error::Conflict`] otherwise); re-recording the newest is a no-op.
    async fn record_checkpoint(&self, id: &ServiceId, checkpoint: &Checkpoint) -> Result<()>;

    /// Records the leader location (replica accounts only). A lower term than the
    /// recorded one is [`crate::Error::Conflict`]; the same location is a no-op.
    async fn set_location(&self, id: &ServiceId, location: &Location) -> Result<()>;

    /// Records the active cluster and its epoch (owner or [`Role::Operator`]). An
    /// epoch not above the recorded one (epoch 0 always) is [`crate::Error::Conflict`];
    /// the recorded placement again is a no-op.
    async fn set_placement(&self, id: &ServiceId, placement: &Placement) -> Result<()>;

    /// Grants `role` to `account` (owner only). Idempotent.
    async fn grant(&self, id: &ServiceId, account: &Account, role: Role) -> Result<()>;

    /// Revokes `role` from `account` (owner only). Idempotent.
    async fn revoke(&self, id: &ServiceId, account: &Account, role: Role) -> Result<()>;

    /// Proposes `new_owner` as the next owner (owner only). Nothing else changes until
    /// `new_owner` calls [`Registry::accept_ownership`]: the owner keeps every right
    /// meanwhile. A new proposal replaces the pending one, proposing the owner cancels
    /// it, proposing the pending owner again is a no-op.
    async fn transfer_ownership(&self, id: &ServiceId, new_owner: &Account) -> Result<()>;

    /// Makes this handle's account the owner; [`crate::Error::PermissionDenied`] unless
    /// it is the pending owner proposed by [`Registry::transfer_ownership`].
    async fn accept_ownership(&self, id: &ServiceId) -> Result<()>;

    /// Withdraws the pending ownership proposal (owner only). Idempotent.
    async fn cancel_ownership_transfer(&self, id: &ServiceId) -> Result<()>;

    /// The proposed next owner of `id`, if a transfer is pending.
    async fn pending_owner(&self, id: &ServiceId) -> Result<Option<Account>>;

    /// Changes from now on, each delivered once, in order.
    async fn changes(&self) -> Result<ChangeStream>;

    /// Pauses a Running service (replicas go to zero, the workload stays).
    async fn pause(&self, id: &ServiceId) -> Result<ServiceRecord> {
        self.set_state(id, ServiceState::Paused).await
    }

    /// Starts or resumes a service (Ready, Paused or Stopped → Running).
    async fn resume(&self, id: &ServiceId) -> Result<ServiceRecord> {
        self.set_state(id, ServiceState::Running).await
    }

    /// Stops a service (its workload is removed).
    async fn stop(&self, id: &ServiceId) -> Result<ServiceRecord> {
        self.set_state(id, ServiceState::Stopped).await
    }
}
