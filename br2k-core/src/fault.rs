//! Fault injection around any implementation of [`Registry`], [`Replicator`],
//! [`ImageStore`] or [`ReplicatedLog`].
//!
//! Wrap a backend with [`Faulty::new`], keep its [`FaultHandle`] (from
//! [`Faulty::handle`]; clones control the same faults), and break it while the code
//! under test runs:
//!
//! ```
//! # use br2k_core::fault::Faulty;
//! # use br2k_core::memory::InMemoryImageStore;
//! # use br2k_core::ImageStore;
//! # tokio_test_block(async {
//! let store = Faulty::new(InMemoryImageStore::new("mirror.local"));
//! let faults = store.handle();
//! faults.set_down(true);
//! assert!(store.ping().await.unwrap_err().is_retryable());
//! faults.set_down(false);
//! store.ping().await.unwrap();
//! # });
//! # fn tokio_test_block(f: impl std::future::Future<Output = ()>) {
//! #     tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
//! # }
//! ```
//!
//! Every async trait call counts as one call; it first waits the configured latency,
//! then fails with [`Error::Unavailable`] while the backend is down or while failures
//! remain from [`FaultHandle::fail_next`], and otherwise goes to the wrapped backend.
//! Synchronous accessors (`account`, `registry`) are passed through. A change stream
//! (or a log's `watch`/`observe` stream) obtained while the backend was up keeps
//! delivering. Provided trait methods
//! (`pause`, `verify`, `copy_to`...) use their default implementation, so they go
//! through the wrapped required methods and see the same faults.

use std::ops::RangeInclusive;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;

use crate::artifact::Image;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::id::ServiceId;
use crate::image::Repository;
use crate::log::{Entry, EntryStream, LeaderInfo, LeaderStream, Leadership, ReplicatedLog};
use crate::observed::ObservedState;
use crate::record::{
    Account, Checkpoint, Location, Placement, Role, ServiceRecord, ServiceState, VersionInfo,
};
use crate::registry::{ChangeStream, Registry};
use crate::replicator::Replicator;
use crate::spec::ServiceSpec;
use crate::store::ImageStore;

/// Controls the faults of one or more [`Faulty`] wrappers. Clones share the faults.
#[derive(Debug, Clone, Default)]
pub struct FaultHandle {
    state: Arc<FaultState>,
}

#[derive(Debug, Default)]
struct FaultState {
    fail_next: AtomicU64,
    latency_micros: AtomicU64,
    down: AtomicBool,
    tampered: AtomicBool,
    calls: AtomicU64,
}

impl FaultHandle {
    /// A handle with no fault active.
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes the next `n` calls fail with [`Error::Unavailable`] (replacing any
    /// remaining count; 0 cancels).
    pub fn fail_next(&self, n: u64) {
        self.state.fail_next.store(n, Ordering::SeqCst);
    }

    /// Delays every call by `latency` (zero removes the delay).
    pub fn set_latency(&self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.state.latency_micros.store(micros, Ordering::SeqCst);
    }

    /// Takes the backend down (every call is [`Error::Unavailable`]) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }

    /// Whether the backend is down.
    pub fn is_down(&self) -> bool {
        self.state.down.load(Ordering::SeqCst)
    }

    /// Makes image pulls serve wrong bytes (one byte of a layer flipped), which the
    /// verifying client reports as [`Error::Tampered`]. Only affects [`ImageStore`].
    pub fn set_tampered(&self, tampered: bool) {
        self.state.tampered.store(tampered, Ordering::SeqCst);
    }

    /// Number of calls made through the wrappers sharing this handle, failed or not.
    pub fn calls(&self) -> u64 {
        self.state.calls.load(Ordering::SeqCst)
    }

    /// Clears every fault (not the call count).
    pub fn clear(&self) {
        self.fail_next(0);
        self.set_latency(Duration::ZERO);
        self.set_down(false);
        self.set_tampered(false);
    }

    fn tampered(&self) -> bool {
        self.state.tampered.load(Ordering::SeqCst)
    }

    /// Counts a call, waits the latency and decides whether it fails.
    async fn enter(&self, operation: &str) -> Result<()> {
        self.state.calls.fetch_add(1, Ordering::SeqCst);
        let micros = self.state.latency_micros.load(Ordering::SeqCst);
        if micros > 0 {
            tokio::time::sleep(Duration::from_micros(micros)).await;
        }
        if self.is_down() {
            return Err(Error::unavailable(format!(
                "{operation}: backend down (injected)"
            )));
        }
        let failed = self
            .state
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if failed {
            return Err(Error::unavailable(format!("{operation}: injected failure")));
        }
        Ok(())
    }
}

/// A backend wrapped with injectable faults; see the [module docs](self).
#[derive(Debug, Clone)]
pub struct Faulty<T> {
    inner: T,
    faults: FaultHandle,
}

impl<T> Faulty<T> {
    /// Wraps `inner` with a new handle and no fault active; get the handle with
    /// [`Faulty::handle`].
    pub fn new(inner: T) -> Self {
        Self::with_handle(inner, FaultHandle::new())
    }

    /// Wraps `inner` controlled by an existing `handle` (several wrappers may share
    /// one, e.g. to take a whole site down at once).
    pub fn with_handle(inner: T, handle: FaultHandle) -> Self {
        Self {
            inner,
            faults: handle,
        }
    }

    /// The handle controlling this wrapper's faults.
    pub fn handle(&self) -> FaultHandle {
        self.faults.clone()
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &T {
        &self.inner
    }
}

#[async_trait]
impl<T: Registry> Registry for Faulty<T> {
    fn account(&self) -> Account {
        self.inner.account()
    }

    async fn register(&self, id: &ServiceId, spec: &ServiceSpec) -> Result<ServiceRecord> {
        self.faults.enter("register").await?;
        self.inner.register(id, spec).await
    }

    async fn publish(&self, id: &ServiceId, spec: &ServiceSpec) -> Result<ServiceRecord> {
        self.faults.enter("publish").await?;
        self.inner.publish(id, spec).await
    }

    async fn active(&self, id: &ServiceId) -> Result<ServiceRecord> {
        self.faults.enter("active").await?;
        self.inner.active(id).await
    }

    async fn version(&self, id: &ServiceId, version: u64) -> Result<VersionInfo> {
        self.faults.enter("version").await?;
        self.inner.version(id, version).await
    }

    async fn history(&self, id: &ServiceId) -> Result<Vec<VersionInfo>> {
        self.faults.enter("history").await?;
        self.inner.history(id).await
    }

    async fn services(&self) -> Result<Vec<ServiceId>> {
        self.faults.enter("services").await?;
        self.inner.services().await
    }

    async fn set_replicas(&self, id: &ServiceId, replicas: u32) -> Result<ServiceRecord> {
        self.faults.enter("set_replicas").await?;
        self.inner.set_replicas(id, replicas).await
    }

    async fn set_state(&self, id: &ServiceId, state: ServiceState) -> Result<ServiceRecord> {
        self.faults.enter("set_state").await?;
        self.inner.set_state(id, state).await
    }

    async fn rollback(&self, id: &ServiceId, version: u64) -> Result<ServiceRecord> {
        self.faults.enter("rollback").await?;
        self.inner.rollback(id, version).await
    }

    async fn record_checkpoint(&self, id: &ServiceId, checkpoint: &Checkpoint) -> Result<()> {
        self.faults.enter("record_checkpoint").await?;
        self.inner.record_checkpoint(id, checkpoint).await
    }

    async fn set_location(&self, id: &ServiceId, location: &Location) -> Result<()> {
        self.faults.enter("set_location").await?;
        self.inner.set_location(id, location).await
    }

    async fn set_placement(&self, id: &ServiceId, placement: &Placement) -> Result<()> {
        self.faults.enter("set_placement").await?;
        self.inner.set_placement(id, placement).await
    }

    async fn grant(&self, id: &ServiceId, account: &Account, role: Role) -> Result<()> {
        self.faults.enter("grant").await?;
        self.inner.grant(id, account, role).await
    }

    async fn revoke(&self, id: &ServiceId, account: &Account, role: Role) -> Result<()> {
        self.faults.enter("revoke").await?;
        self.inner.revoke(id, account, role).await
    }

    async fn transfer_ownership(&self, id: &ServiceId, new_owner: &Account) -> Result<()> {
        self.faults.enter("transfer_ownership").await?;
        self.inner.transfer_ownership(id, new_owner).await
    }

    async fn accept_ownership(&self, id: &ServiceId) -> Result<()> {
        self.faults.enter("accept_ownership").await?;
        self.inner.accept_ownership(id).await
    }

    async fn cancel_ownership_transfer(&self, id: &ServiceId) -> Result<()> {
        self.faults.enter("cancel_ownership_transfer").await?;
        self.inner.cancel_ownership_transfer(id).await
    }

    async fn pending_owner(&self, id: &ServiceId) -> Result<Option<Account>> {
        self.faults.enter("pending_owner").await?;
        self.inner.pending_owner(id).await
    }

    async fn changes(&self) -> Result<ChangeStream> {
        self.faults.enter("changes").await?;
        self.inner.changes().await
    }
}

#[async_trait]
impl<T: Replicator> Replicator for Faulty<T> {
    async fn apply(&self, record: &ServiceRecord) -> Result<()> {
        self.faults.enter("apply").await?;
        self.inner.apply(record).await
    }

    async fn observe(&self, id: &ServiceId) -> Result<Option<ObservedState>> {
        self.faults.enter("observe").await?;
        self.inner.observe(id).await
    }

    async fn remove(&self, id: &ServiceId) -> Result<()> {
        self.faults.enter("remove").await?;
        self.inner.remove(id).await
    }

    async fn replace_replicas(&self, id: &ServiceId, replicas: &[String]) -> Result<()> {
        self.faults.enter("replace_replicas").await?;
        self.inner.replace_replicas(id, replicas).await
    }

    async fn managed(&self) -> Result<Vec<ServiceId>> {
        self.faults.enter("managed").await?;
        self.inner.managed().await
    }

    async fn changes(&self) -> Result<BoxStream<'static, ServiceId>> {
        self.faults.enter("changes").await?;
        self.inner.changes().await
    }
}

/// Serves `image` with one byte of a layer (the config when there is no layer)
/// flipped, through the same verification a client does; returns its error.
fn serve_tampered(image: Image) -> Error {
    let flip = |b: &Bytes| {
        let mut v = b.to_vec();
        match v.last_mut() {
            Some(x) => *x ^= 0x01,
            None => v.push(0),
        }
        Bytes::from(v)
    };
    let mut config = image.config.data.clone();
    let mut layers: Vec<Bytes> = image.layers.iter().map(|l| l.data.clone()).collect();
    match layers.first_mut() {
        Some(layer) => *layer = flip(layer),
        None => config = flip(&config),
    }
    match Image::from_parts(image.manifest_bytes, Some(&image.digest), config, layers) {
        Err(e) => e,
        // Unreachable with SHA-256, but never return bytes claimed to be wrong.
        Ok(_) => Error::tampered("layer 0", image.digest, "tampered bytes (injected)"),
    }
}

#[async_trait]
impl<T: ImageStore> ImageStore for Faulty<T> {
    fn registry(&self) -> &str {
        self.inner.registry()
    }

    async fn ping(&self) -> Result<()> {
        self.faults.enter("ping").await?;
        self.inner.ping().await
    }

    async fn resolve(&self, repository: &Repository, tag: &str) -> Result<Digest> {
        self.faults.enter("resolve").await?;
        self.inner.resolve(repository, tag).await
    }

    async fn has(&self, repository: &Repository, digest: &Digest) -> Result<bool> {
        self.faults.enter("has").await?;
        self.inner.has(repository, digest).await
    }

    async fn pull(&self, repository: &Repository, digest: &Digest) -> Result<Image> {
        self.faults.enter("pull").await?;
        let image = self.inner.pull(repository, digest).await?;
        if self.faults.tampered() {
            return Err(serve_tampered(image));
        }
        Ok(image)
    }

    async fn push(
        &self,
        repository: &Repository,
        image: &Image,
        tag: Option<&str>,
    ) -> Result<Digest> {
        self.faults.enter("push").await?;
        self.inner.push(repository, image, tag).await
    }
}

#[async_trait]
impl<T: ReplicatedLog> ReplicatedLog for Faulty<T> {
    async fn campaign(&self, candidate: &str) -> Result<Leadership> {
        self.faults.enter("campaign").await?;
        self.inner.campaign(candidate).await
    }

    async fn resign(&self, leadership: &Leadership) -> Result<()> {
        self.faults.enter("resign").await?;
        self.inner.resign(leadership).await
    }

    async fn leader(&self) -> Result<Option<LeaderInfo>> {
        self.faults.enter("leader").await?;
        self.inner.leader().await
    }

    async fn observe(&self) -> Result<LeaderStream> {
        self.faults.enter("observe").await?;
        self.inner.observe().await
    }

    async fn append(
        &self,
        leadership: &Leadership,
        entries: Vec<Bytes>,
    ) -> Result<RangeInclusive<u64>> {
        self.faults.enter("append").await?;
        self.inner.append(leadership, entries).await
    }

    async fn read(&self, from: u64, max: usize) -> Result<Vec<Entry>> {
        self.faults.enter("read").await?;
        self.inner.read(from, max).await
    }

    async fn watch(&self, from: u64) -> Result<EntryStream> {
        self.faults.enter("watch").await?;
        self.inner.watch(from).await
    }

    async fn compact(&self, up_to: u64) -> Result<()> {
        self.faults.enter("compact").await?;
        self.inner.compact(up_to).await
    }

    async fn first_index(&self) -> Result<u64> {
        self.faults.enter("first_index").await?;
        self.inner.first_index().await
    }

    async fn last_index(&self) -> Result<u64> {
        self.faults.enter("last_index").await?;
        self.inner.last_index().await
    }
}
