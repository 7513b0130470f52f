//! [`InMemoryRegistry`]: the service registry held in process memory.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use futures::StreamExt;
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use crate::error::{Error, Result, ValidationError};
use crate::id::ServiceId;
use crate::record::{
    Account, ChangeKind, Checkpoint, Location, Placement, RegistryChange, Role, ServiceRecord,
    ServiceState, VersionInfo,
};
use crate::registry::{ChangeStream, Registry};
use crate::spec::{MAX_REPLICAS, ServiceSpec};

/// Changes buffered per subscriber before a slow one sees a lag error.
const CHANGE_BUFFER: usize = 8192;

/// The service registry in memory, acting as one account.
///
/// Handles made with [`InMemoryRegistry::as_account`] share the same state and act as
/// other accounts, as signers of one chain would. `as_of` and change positions are a
/// sequence number increased by every write that changes something.
#[derive(Debug, Clone)]
pub struct InMemoryRegistry {
    account: Account,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    changes: broadcast::Sender<RegistryChange>,
}

#[derive(Debug, Default)]
struct State {
    seq: u64,
    services: BTreeMap<ServiceId, Entry>,
}

#[derive(Debug)]
struct Entry {
    versions: Vec<VersionInfo>,
    active: u64,
    replicas: u32,
    state: ServiceState,
    owner: Account,
    /// Proposed by the owner, the owner once it accepts.
    pending_owner: Option<Account>,
    roles: BTreeSet<(Account, RoleKey)>,
    checkpoint: Option<Checkpoint>,
    location: Option<Location>,
    placement: Option<Placement>,
}

/// `Role` is not `Ord`; this key orders it inside the role set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum RoleKey {
    Operator,
    Replica,
}

impl From<Role> for RoleKey {
    fn from(role: Role) -> Self {
        match role {
            Role::Operator => RoleKey::Operator,
            Role::Replica => RoleKey::Replica,
        }
    }
}

impl Entry {
    fn active_version(&self) -> &VersionInfo {
        &self.versions[(self.active - 1) as usize]
    }

    fn has_role(&self, account: &Account, role: Role) -> bool {
        self.roles.contains(&(account.clone(), role.into()))
    }

    fn can_operate(&self, account: &Account) -> bool {
        self.owner == *account || self.has_role(account, Role::Operator)
    }

    fn record(&self, id: &ServiceId, seq: u64) -> ServiceRecord {
        let v = self.active_version();
        ServiceRecord {
            id: id.clone(),
            version: self.active,
            latest_version: self.versions.len() as u64,
            spec: v.spec.clone(),
            spec_hash: v.spec_hash,
            replicas: self.replicas,
            state: self.state,
            owner: self.owner.clone(),
            checkpoint: self.checkpoint.clone(),
            location: self.location.clone(),
            placement: self.placement.clone(),
            as_of: Some(seq),
            stale: false,
        }
    }
}

fn now_secs() -> Option<u64> {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()
        .map(|d| d.as_secs())
}

fn check_replicas(spec: &ServiceSpec, replicas: u32) -> Result<()> {
    if replicas > MAX_REPLICAS {
        return Err(
            ValidationError::spec("replicas", format!("must be at most {MAX_REPLICAS}")).into(),
        );
    }
    if let Some(a) = &spec.autoscaling
        && !(a.min_replicas..=a.max_replicas).contains(&replicas)
    {
        return Err(
            ValidationError::spec("replicas", "must lie within the autoscaling bounds").into(),
        );
    }
    Ok(())
}

fn check_account(account: &Account) -> Result<()> {
    if account.0.is_empty() || account.0.len() > 256 {
        return Err(ValidationError::malformed("account", "must be 1-256 bytes").into());
    }
    Ok(())
}

impl InMemoryRegistry {
    /// An empty registry; the handle acts as `account`.
    pub fn new(account: &str) -> Self {
        let (changes, _) = broadcast::channel(CHANGE_BUFFER);
        Self {
            account: Account(account.to_owned()),
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                changes,
            }),
        }
    }

    /// Another handle on the same registry, acting as `account`.
    pub fn as_account(&self, account: &str) -> InMemoryRegistry {
        Self {
            account: Account(account.to_owned()),
            shared: Arc::clone(&self.shared),
        }
    }

    /// Emits one change; must be called with the state lock held so that the order of
    /// the stream is the order of the sequence numbers.
    fn emit(&self, state: &mut State, id: &ServiceId, kind: ChangeKind) {
        state.seq += 1;
        // No subscriber is not an error.
        let _ = self.shared.changes.send(RegistryChange {
            id: id.clone(),
            kind,
            at: Some(state.seq),
        });
    }

    /// Runs `f` on the entry of `id` after checking that this account may operate it.
    fn operate<T>(
        &self,
        id: &ServiceId,
        f: impl FnOnce(&mut Entry) -> Result<(T, Option<ChangeKind>)>,
    ) -> Result<T> {
        self.write(id, |entry, account| {
            if !entry.can_operate(account) {
                return Err(Error::permission_denied(format!(
                    "{account} is neither owner nor operator of {id}"
                )));
            }
            f(entry)
        })
    }

    /// Runs `f` on the entry of `id` after checking that this account holds `Replica`.
    fn as_replica(
        &self,
        id: &ServiceId,
        f: impl FnOnce(&mut Entry) -> Result<((), Option<ChangeKind>)>,
    ) -> Result<()> {
        self.write(id, |entry, account| {
            if !entry.has_role(account, Role::Replica) {
                return Err(Error::permission_denied(format!(
                    "{account} holds no replica role on {id}"
                )));
            }
            f(entry)
        })
    }

    /// Runs `f` on the entry of `id` after checking that this account owns it.
    fn as_owner(
        &self,
        id: &ServiceId,
        f: impl FnOnce(&mut Entry) -> Result<((), Option<ChangeKind>)>,
    ) -> Result<()> {
        self.write(id, |entry, account| {
            if entry.owner != *account {
                return Err(Error::permission_denied(format!(
                    "{account} does not own {id}"
                )));
            }
            f(entry)
        })
    }

    fn write<T>(
        &self,
        id: &ServiceId,
        f: impl FnOnce(&mut Entry, &Account) -> Result<(T, Option<ChangeKind>)>,
    ) -> Result<T> {
        let mut state = self.shared.state.lock();
        let entry = state
            .services
            .get_mut(id)
            .ok_or_else(|| Error::not_found(format!("service {id}")))?;
        let (out, change) = f(entry, &self.account)?;
        if let Some(kind) = change {
            self.emit(&mut state, id, kind);
        }
        Ok(out)
    }

    fn read<T>(&self, id: &ServiceId, f: impl FnOnce(&Entry, u64) -> Result<T>) -> Result<T> {
        let state = self.shared.state.lock();
        let entry = state
            .services
            .get(id)
            .ok_or_else(|| Error::not_found(format!("service {id}")))?;
        f(entry, state.seq)
    }

    /// The record of `id` as of now (after a write).
    fn current(&self, id: &ServiceId) -> Result<ServiceRecord> {
        self.read(id, |e, seq| Ok(e.record(id, seq)))
    }
}

#[async_trait]
impl Registry for InMemoryRegistry {
    fn account(&self) -> Account {
        self.account.clone()
    }

    async fn register(&self, id: &ServiceId, spec: &ServiceSpec) -> Result<ServiceRecord> {
        spec.validate()?;
        let mut state = self.shared.state.lock();
        if state.services.contains_key(id) {
            return Err(Error::already_exists(format!("service {id}")));
        }
        let entry = Entry {
            versions: vec![VersionInfo {
                version: 1,
                spec: spec.clone(),
                spec_hash: spec.spec_hash(),
                publisher: self.account.clone(),
                published_at: now_secs(),
            }],
            active: 1,
            replicas: spec.replicas,
            state: ServiceState::Ready,
            owner: self.account.clone(),
            pending_owner: None,
            roles: BTreeSet::new(),
            checkpoint: None,
            location: None,
            placement: None,
        };
        state.services.insert(id.clone(), entry);
        self.emit(&mut state, id, ChangeKind::Registered);
        Ok(state.services[id].record(id, state.seq))
    }

    async fn publish(&self, id: &ServiceId, spec: &ServiceSpec) -> Result<ServiceRecord> {
        let publisher = self.account.clone();
        self.operate(id, |e| {
            spec.validate()?;
            let hash = spec.spec_hash();
            if hash == e.active_version().spec_hash {
                return Ok(((), None));
            }
            let version = e.versions.len() as u64 + 1;
            e.versions.push(VersionInfo {
                version,
                spec: spec.clone(),
                spec_hash: hash,
                publisher,
                published_at: now_secs(),
            });
            e.active = version;
            e.replicas = spec.replicas;
            Ok(((), Some(ChangeKind::Published { version })))
        })?;
        self.current(id)
    }

    async fn active(&self, id: &ServiceId) -> Result<ServiceRecord> {
        let record = self.current(id)?;
        record.verify()?;
        Ok(record)
    }

    async fn version(&self, id: &ServiceId, version: u64) -> Result<VersionInfo> {
        self.read(id, |e, _| {
            version
                .checked_sub(1)
                .and_then(|i| e.versions.get(i as usize))
                .cloned()
                .ok_or_else(|| Error::not_found(format!("version {version} of {id}")))
        })
    }

    async fn history(&self, id: &ServiceId) -> Result<Vec<VersionInfo>> {
        self.read(id, |e, _| Ok(e.versions.clone()))
    }

    async fn services(&self) -> Result<Vec<ServiceId>> {
        Ok(self.shared.state.lock().services.keys().cloned().collect())
    }

    async fn set_replicas(&self, id: &ServiceId, replicas: u32) -> Result<ServiceRecord> {
        self.operate(id, |e| {
            check_replicas(&e.active_version().spec, replicas)?;
            if e.replicas == replicas {
                return Ok(((), None));
            }
            e.replicas = replicas;
            Ok(((), Some(ChangeKind::Scaled { replicas })))
        })?;
        self.current(id)
    }

    async fn set_state(&self, id: &ServiceId, to: ServiceState) -> Result<ServiceRecord> {
        self.operate(id, |e| {
            if e.state == to {
                return Ok(((), None));
            }
            if !e.state.can_become(to) {
                return Err(Error::conflict(format!(
                    "{id} cannot go from {} to {to}",
                    e.state
                )));
            }
            e.state = to;
            Ok(((), Some(ChangeKind::StateChanged { state: to })))
        })?;
        self.current(id)
    }

    async fn rollback(&self, id: &ServiceId, version: u64) -> Result<ServiceRecord> {
        self.operate(id, |e| {
            if version == 0 || version > e.versions.len() as u64 {
                return Err(Error::not_found(format!("version {version} of {id}")));
            }
            if version == e.active {
                return Ok(((), None));
            }
            if version > e.active {
                return Err(Error::conflict(format!(
                    "version {version} of {id} is later than the active version {}",
                    e.active
                )));
            }
            e.active = version;
            e.replicas = e.active_version().spec.replicas;
            Ok(((), Some(ChangeKind::RolledBack { version })))
        })?;
        self.current(id)
    }

    async fn record_checkpoint(&self, id: &ServiceId, checkpoint: &Checkpoint) -> Result<()> {
        self.as_replica(id, |e| {
            let (prev_version, prev_index) = match &e.checkpoint {
                Some(prev) if prev == checkpoint => return Ok(((), None)),
                Some(prev) => (prev.state_version, prev.log_index),
                None => (0, 0),
            };
            if checkpoint.state_version != prev_version + 1 {
                return Err(Error::conflict(format!(
                    "checkpoint state version {} of {id} must be {}",
                    checkpoint.state_version,
                    prev_version + 1
                )));
            }
            if checkpoint.log_index < prev_index {
                return Err(Error::conflict(format!(
                    "checkpoint log index {} of {id} is below the recorded {prev_index}",
                    checkpoint.log_index
                )));
            }
            e.checkpoint = Some(checkpoint.clone());
            Ok((
                (),
                Some(ChangeKind::Checkpointed {
                    checkpoint: checkpoint.clone(),
                }),
            ))
        })
    }

    async fn set_location(&self, id: &ServiceId, location: &Location) -> Result<()> {
        self.as_replica(id, |e| {
            // The fields are public: re-validate what may not have come from `new`.
            Location::new(location.endpoint.clone(), location.term)?;
            if let Some(prev) = &e.location {
                if prev == location {
                    return Ok(((), None));
                }
                if location.term < prev.term {
                    return Err(Error::conflict(format!(
                        "location term {} of {id} is below the recorded {}",
                        location.term, prev.term
                    )));
                }
            }
            e.location = Some(location.clone());
            Ok((
                (),
                Some(ChangeKind::Relocated {
                    location: location.clone(),
                }),
            ))
        })
    }

    async fn set_placement(&self, id: &ServiceId, placement: &Placement) -> Result<()> {
        // The fields are public: re-validate what may not have come from `new`.
        Placement::new(placement.cluster.clone(), placement.epoch)?;
        self.operate(id, |e| {
            if placement.epoch == 0 {
                return Err(Error::conflict(format!(
                    "placement epoch 0 of {id}: epochs start at 1"
                )));
            }
            if let Some(prev) = &e.placement {
                if prev == placement {
                    return Ok(((), None));
                }
                if placement.epoch <= prev.epoch {
                    return Err(Error::conflict(format!(
                        "placement epoch {} of {id} is not above the recorded {}",
                        placement.epoch, prev.epoch
                    )));
                }
            }
            e.placement = Some(placement.clone());
            Ok((
                (),
                Some(ChangeKind::Placed {
                    placement: placement.clone(),
                }),
            ))
        })
        .map(|_| ())
    }

    async fn grant(&self, id: &ServiceId, account: &Account, role: Role) -> Result<()> {
        check_account(account)?;
        self.as_owner(id, |e| {
            let changed = e.roles.insert((account.clone(), role.into()));
            Ok(((), changed.then_some(ChangeKind::RolesChanged)))
        })
    }

    async fn revoke(&self, id: &ServiceId, account: &Account, role: Role) -> Result<()> {
        self.as_owner(id, |e| {
            let changed = e.roles.remove(&(account.clone(), role.into()));
            Ok(((), changed.then_some(ChangeKind::RolesChanged)))
        })
    }

    async fn transfer_ownership(&self, id: &ServiceId, new_owner: &Account) -> Result<()> {
        check_account(new_owner)?;
        self.as_owner(id, |e| {
            if e.owner == *new_owner {
                let cancelled = e.pending_owner.take().is_some();
                return Ok(((), cancelled.then_some(ChangeKind::RolesChanged)));
            }
            if e.pending_owner.as_ref() == Some(new_owner) {
                return Ok(((), None));
            }
            e.pending_owner = Some(new_owner.clone());
            Ok(((), Some(ChangeKind::RolesChanged)))
        })
    }

    async fn accept_ownership(&self, id: &ServiceId) -> Result<()> {
        self.write(id, |e, account| {
            if e.pending_owner.as_ref() != Some(account) {
                return Err(Error::permission_denied(format!(
                    "{account} is not the pending owner of {id}"
                )));
            }
            e.owner = account.clone();
            e.pending_owner = None;
            Ok(((), Some(ChangeKind::RolesChanged)))
        })
    }

    async fn cancel_ownership_transfer(&self, id: &ServiceId) -> Result<()> {
        self.as_owner(id, |e| {
            let cancelled = e.pending_owner.take().is_some();
            Ok(((), cancelled.then_some(ChangeKind::RolesChanged)))
        })
    }

    async fn pending_owner(&self, id: &ServiceId) -> Result<Option<Account>> {
        self.read(id, |e, _| Ok(e.pending_owner.clone()))
    }

    async fn changes(&self) -> Result<ChangeStream> {
        let rx = self.shared.changes.subscribe();
        Ok(BroadcastStream::new(rx)
            .map(|item| {
                item.map_err(|BroadcastStreamRecvError::Lagged(n)| {
                    Error::unavailable(format!("change stream lagged: {n} changes dropped"))
                })
            })
            .boxed())
    }
}
