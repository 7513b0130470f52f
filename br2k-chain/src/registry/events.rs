//! The registry's events: fetching the spec bytes, location endpoints and names they
//! carry (verified by [`super::verify`]), decoding them as changes, the audit trail,
//! and the change stream (polling with reorg detection).

use std::collections::{HashMap, HashSet, VecDeque};

use alloy::primitives::{Address, B256, Bytes, keccak256};
use alloy::rpc::types::{Filter, Log};
use alloy::sol_types::{SolEvent, SolEventInterface};
use br2k_core::{
    ChangeKind, ChangeStream, Checkpoint, Digest, Error, Location, Placement, RegistryChange,
    Result, ServiceId, ServiceSpec, ServiceState,
};
use futures::StreamExt;

use super::verify::{LocationWant, SpecWant};
use super::{
    AuditEntry, ChainRegistry, IDS_PER_LOG_QUERY, account_of, cluster_name, insert_capped,
    service_key,
};
use crate::bindings::ServiceRegistry as C;
use crate::error::ChainError;

/// A log filter for the events `signatures` of the services keyed in `wants` (topic 1),
/// over the blocks from the lowest to the highest `wants` names.
fn events_of(signatures: Vec<B256>, wants: impl IntoIterator<Item = (B256, u64)>) -> Filter {
    let mut ids = HashSet::new();
    let (mut from, mut to) = (u64::MAX, 0);
    for (key, block) in wants {
        ids.insert(key);
        from = from.min(block);
        to = to.max(block);
    }
    Filter::new()
        .event_signature(signatures)
        .topic1(ids.into_iter().collect::<Vec<_>>())
        .from_block(from.min(to))
        .to_block(to)
}

impl ChainRegistry {
    /// Fetches (from the log, or the cache) and verifies the wanted specs.
    pub(super) async fn specs(
        &self,
        wants: &[SpecWant],
    ) -> Result<HashMap<(B256, u64), Result<ServiceSpec, Error>>, ChainError> {
        let mut out = HashMap::new();
        let mut missing: Vec<&SpecWant> = Vec::new();
        {
            let cache = self.inner.specs.lock();
            let mut seen = HashSet::new();
            for w in wants {
                if !seen.insert((w.key, w.version)) {
                    continue;
                }
                match cache.get(&w.hash) {
                    Some(spec) => {
                        out.insert((w.key, w.version), w.consistent(spec.clone()));
                    }
                    None => missing.push(w),
                }
            }
        }
        for chunk in missing.chunks(IDS_PER_LOG_QUERY) {
            let filter = events_of(
                vec![C::Registered::SIGNATURE_HASH, C::Published::SIGNATURE_HASH],
                chunk.iter().map(|w| (w.key, w.block)),
            );
            let logs = self.logs("spec events", filter).await?;
            let mut found: HashMap<(B256, u64), Bytes> = HashMap::new();
            for log in &logs {
                let topics = log.topics().iter().copied();
                let data = &log.data().data;
                match log.topic0() {
                    Some(t) if *t == C::Registered::SIGNATURE_HASH => {
                        if let Ok(e) = C::Registered::decode_raw_log(topics, data) {
                            found.insert((e.id, 1), e.spec);
                        }
                    }
                    Some(t) if *t == C::Published::SIGNATURE_HASH => {
                        if let Ok(e) = C::Published::decode_raw_log(topics, data) {
                            found.insert((e.id, e.version), e.spec);
                        }
                    }
                    _ => {}
                }
            }
            for w in chunk {
                let result = match found.get(&(w.key, w.version)) {
                    Some(bytes) => w.verify_bytes(bytes).and_then(|spec| {
                        insert_capped(&self.inner.specs, w.hash, spec.clone());
                        w.consistent(spec)
                    }),
                    None => Err(missing_event(format!(
                        "spec event of {} v{} in block {}",
                        w.name, w.version, w.block
                    ))),
                };
                out.insert((w.key, w.version), result);
            }
        }
        Ok(out)
    }

    /// Fetches (from the log, or the cache) the wanted location endpoints.
    pub(super) async fn locations(
        &self,
        wants: &[LocationWant],
    ) -> Result<HashMap<B256, Result<String, Error>>, ChainError> {
        let mut out = HashMap::new();
        let mut missing = Vec::new();
        {
            let cache = self.inner.endpoints.lock();
            for w in wants {
                match cache.get(&w.hash) {
                    Some(e) => {
                        out.insert(w.key, Ok(e.clone()));
                    }
                    None => missing.push(w),
                }
            }
        }
        for chunk in missing.chunks(IDS_PER_LOG_QUERY) {
            let filter = events_of(
                vec![C::Relocated::SIGNATURE_HASH],
                chunk.iter().map(|w| (w.key, w.block)),
            );
            let logs = self.logs("location events", filter).await?;
            let mut found: HashMap<(B256, u64, B256), String> = HashMap::new();
            for log in &logs {
                if let Ok(e) =
                    C::Relocated::decode_raw_log(log.topics().iter().copied(), &log.data().data)
                {
                    let h = keccak256(e.endpoint.as_bytes());
                    found.insert((e.id, log.block_number.unwrap_or_default(), h), e.endpoint);
                }
            }
            for w in chunk {
                let result = match found.remove(&(w.key, w.block, w.hash)) {
                    Some(endpoint) => {
                        insert_capped(&self.inner.endpoints, w.hash, endpoint.clone());
                        Ok(endpoint)
                    }
                    None => Err(missing_event(format!(
                        "location event of {} in block {}",
                        w.name, w.block
                    ))),
                };
                out.insert(w.key, result);
            }
        }
        Ok(out)
    }

    /// Service names of `keys`, from the cache or the `Registered` events.
    pub(super) async fn names(
        &self,
        keys: &[B256],
    ) -> Result<HashMap<B256, ServiceId>, ChainError> {
        let mut out = HashMap::new();
        let mut missing = Vec::new();
        {
            let cache = self.inner.names.lock();
            for k in keys {
                match cache.get(k) {
                    Some(n) => {
                        out.insert(*k, n.clone());
                    }
                    None => missing.push(*k),
                }
            }
        }
        missing.sort();
        missing.dedup();
        for chunk in missing.chunks(IDS_PER_LOG_QUERY) {
            let filter = Filter::new()
                .event_signature(C::Registered::SIGNATURE_HASH)
                .topic1(chunk.to_vec())
                .from_block(self.inner.deploy_block);
            for log in self.logs("registered events", filter).await? {
                if let Ok(e) =
                    C::Registered::decode_raw_log(log.topics().iter().copied(), &log.data().data)
                    && let Ok(name) = ServiceId::new(&e.name)
                    && service_key(&name) == e.id
                {
                    insert_capped(&self.inner.names, e.id, name.clone());
                    out.insert(e.id, name);
                }
            }
        }
        Ok(out)
    }

    /// Decodes one registry event: the service key, its name (registrations only)
    /// and the change.
    fn decode_change(log: &Log) -> Option<(B256, Option<String>, ChangeKind)> {
        Self::decode_attributed(log).map(|(key, name, kind, _)| (key, name, kind))
    }

    /// Decodes one registry event: the service key, its name (registrations only),
    /// the change and the account that made it (the event's `msg.sender` field).
    fn decode_attributed(log: &Log) -> Option<(B256, Option<String>, ChangeKind, Address)> {
        use C::ServiceRegistryEvents as Ev;
        let ev = Ev::decode_raw_log(log.topics(), &log.data().data).ok()?;
        Some(match ev {
            Ev::Registered(e) => (e.id, Some(e.name), ChangeKind::Registered, e.owner),
            Ev::Published(e) => (
                e.id,
                None,
                ChangeKind::Published { version: e.version },
                e.publisher,
            ),
            Ev::Scaled(e) => (
                e.id,
                None,
                ChangeKind::Scaled {
                    replicas: e.replicas,
                },
                e.by,
            ),
            Ev::StateChanged(e) => (
                e.id,
                None,
                ChangeKind::StateChanged {
                    state: ServiceState::from_code(e.state).ok()?,
                },
                e.by,
            ),
            Ev::RolledBack(e) => (
                e.id,
                None,
                ChangeKind::RolledBack { version: e.version },
                e.by,
            ),
            Ev::Checkpointed(e) => (
                e.id,
                None,
                ChangeKind::Checkpointed {
                    checkpoint: Checkpoint {
                        snapshot: Digest::from_bytes(e.snapshot.0),
                        log_index: e.logIndex,
                        term: e.term,
                        state_version: e.stateVersion,
                    },
                },
                e.by,
            ),
            Ev::Relocated(e) => (
                e.id,
                None,
                ChangeKind::Relocated {
                    location: Location {
                        endpoint: e.endpoint,
                        term: e.term,
                    },
                },
                e.by,
            ),
            Ev::Placed(e) => (
                e.id,
                None,
                ChangeKind::Placed {
                    placement: Placement::new(cluster_name(&e.cluster).ok()?, e.epoch).ok()?,
                },
                e.by,
            ),
            Ev::RoleGranted(e) => (e.id, None, ChangeKind::RolesChanged, e.by),
            Ev::RoleRevoked(e) => (e.id, None, ChangeKind::RolesChanged, e.by),
            Ev::OwnershipTransferStarted(e) => (e.id, None, ChangeKind::RolesChanged, e.owner),
            Ev::OwnershipTransferCanceled(e) => (e.id, None, ChangeKind::RolesChanged, e.owner),
            // Only the accepting account can make this change.
            Ev::OwnershipTransferred(e) => (e.id, None, ChangeKind::RolesChanged, e.newOwner),
        })
    }

    /// Every change of `id` since its registration, oldest first, each with the
    /// account that made it and its transaction, read from the registry's events
    /// (paged by `log_block_range` blocks). Role and ownership events are
    /// [`ChangeKind::RolesChanged`]; an owner's reset is a `Checkpointed` or
    /// `Relocated` change by the owner.
    pub async fn audit(&self, id: &ServiceId) -> Result<Vec<AuditEntry>> {
        let key = service_key(id);
        let mut logs = self
            .logs(
                "service events",
                Filter::new()
                    .topic1(key)
                    .from_block(self.inner.deploy_block),
            )
            .await?;
        logs.sort_by_key(|l| (l.block_number, l.log_index));
        let out: Vec<AuditEntry> = logs
            .iter()
            .filter_map(|l| {
                let (k, _, kind, by) = Self::decode_attributed(l)?;
                (k == key).then(|| AuditEntry {
                    change: RegistryChange {
                        id: id.clone(),
                        kind,
                        at: l.block_number,
                    },
                    by: account_of(by),
                    tx: l.transaction_hash,
                })
            })
            .collect();
        if out.is_empty() {
            return Err(Error::not_found(format!("service {id}")));
        }
        Ok(out)
    }

    /// Changes in blocks `from..=to`, in log order.
    async fn changes_between(&self, from: u64, to: u64) -> Result<Vec<RegistryChange>, ChainError> {
        let mut logs = self
            .logs(
                "registry events",
                Filter::new().from_block(from).to_block(to),
            )
            .await?;
        logs.sort_by_key(|l| (l.block_number, l.log_index));
        let decoded: Vec<(u64, B256, Option<String>, ChangeKind)> = logs
            .iter()
            .filter_map(|l| {
                let (id, name, kind) = Self::decode_change(l)?;
                Some((l.block_number.unwrap_or_default(), id, name, kind))
            })
            .collect();
        for (_, id, name, _) in &decoded {
            if let Some(name) = name
                && let Ok(sid) = ServiceId::new(name)
            {
                insert_capped(&self.inner.names, *id, sid);
            }
        }
        let keys: Vec<B256> = decoded.iter().map(|d| d.1).collect();
        let names = self.names(&keys).await?;
        Ok(decoded
            .into_iter()
            .filter_map(|(block, key, _, kind)| {
                Some(RegistryChange {
                    id: names.get(&key)?.clone(),
                    kind,
                    at: Some(block),
                })
            })
            .collect())
    }

    /// [`br2k_core::Registry::changes`]: changes from the next block on.
    pub(super) async fn change_stream(&self) -> Result<ChangeStream> {
        let head = self.head().await?;
        let hash = self
            .inner
            .rpc
            .canonical_hash(head, self.inner.quorum)
            .await?
            .ok_or_else(|| ChainError::Unavailable(format!("block {head} not found")))?;
        let cursor = Cursor {
            registry: self.clone(),
            next_block: head + 1,
            scanned: VecDeque::from([Scanned {
                from: head,
                to: head,
                hash,
            }]),
            buffer: VecDeque::new(),
            idle: false,
        };
        let poll = self.inner.poll;
        Ok(futures::stream::unfold(cursor, move |mut c| async move {
            loop {
                if let Some(change) = c.buffer.pop_front() {
                    return Some((Ok(change), c));
                }
                if c.idle {
                    tokio::time::sleep(poll).await;
                }
                if let Err(e) = c.poll().await {
                    c.idle = true;
                    return Some((Err(Error::from(e)), c));
                }
            }
        })
        .boxed())
    }
}

/// An event the record points at that the log does not hold.
fn missing_event(what: String) -> Error {
    ChainError::MissingLog(what).into()
}

/// Scanned ranges whose end hashes a change stream keeps to detect reorgs.
const CURSOR_HASHES: usize = 256;

/// One range of blocks a change stream scanned, and the hash of its last block.
#[derive(Debug, Clone, Copy)]
struct Scanned {
    from: u64,
    to: u64,
    hash: B256,
}

/// State of one change stream: the next block to scan, the scanned ranges (with the
/// hash of each one's last block) and changes not yet delivered.
struct Cursor {
    registry: ChainRegistry,
    next_block: u64,
    scanned: VecDeque<Scanned>,
    buffer: VecDeque<RegistryChange>,
    idle: bool,
}

impl Cursor {
    async fn hash_of(&self, number: u64) -> Result<Option<B256>, ChainError> {
        let inner = &self.registry.inner;
        inner.rpc.canonical_hash(number, inner.quorum).await
    }

    /// Whether the last scanned block is still canonical; if not, rewinds to the
    /// first block after the newest scanned range that still is (the common
    /// ancestor), drops undelivered changes and reports the reorg as an error (the
    /// consumer re-reads its records; the stream then re-reads the new blocks).
    async fn check_reorg(&mut self) -> Result<(), ChainError> {
        let Some(last) = self.scanned.back().copied() else {
            return Ok(());
        };
        if self.hash_of(last.to).await? == Some(last.hash) {
            return Ok(());
        }
        let mut rewind = last.from;
        while let Some(s) = self.scanned.back().copied() {
            if self.hash_of(s.to).await? == Some(s.hash) {
                break;
            }
            rewind = s.from;
            self.scanned.pop_back();
        }
        self.next_block = rewind;
        self.buffer.clear();
        self.idle = false;
        tracing::warn!(
            reorged = last.to,
            rewound_to = rewind,
            "registry change stream: chain reorganization; re-reading"
        );
        Err(ChainError::Core(Error::conflict(format!(
            "chain reorganization: block {} ({}) is no longer canonical; changes are re-read from block {rewind}",
            last.to, last.hash
        ))))
    }

    /// Scans new blocks once (after checking the scanned ones for a reorg).
    async fn poll(&mut self) -> Result<(), ChainError> {
        self.check_reorg().await?;
        let head = self.registry.head().await?;
        if head < self.next_block {
            self.idle = true;
            return Ok(());
        }
        let to = head.min(self.next_block + self.registry.inner.log_block_range - 1);
        let Some(hash) = self.hash_of(to).await? else {
            self.idle = true;
            return Ok(());
        };
        let changes = self.registry.changes_between(self.next_block, to).await?;
        // The logs are of the block hashed before only if it is still canonical.
        if self.hash_of(to).await? != Some(hash) {
            self.idle = false;
            return Ok(());
        }
        // Advance only after the whole range was read: each change is delivered once.
        if self.scanned.len() >= CURSOR_HASHES {
            self.scanned.pop_front();
        }
        self.scanned.push_back(Scanned {
            from: self.next_block,
            to,
            hash,
        });
        self.next_block = to + 1;
        self.idle = to == head;
        self.buffer.extend(changes);
        Ok(())
    }
}
