//! The failover's moving parts: a cluster's heartbeat, a service's placement lease
//! (campaign, record on chain, stand down), the fence replicas check, and the
//! registry view that keeps a service paused where it is not placed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use parking_lot::Mutex;
use tokio::sync::watch;

use super::{
    Decision, FailoverConfig, PlacementStatus, Timeline, decide, heartbeat_namespace, unix_millis,
};
use crate::error::{Error, Result};
use crate::id::ServiceId;
use crate::log::{Leadership, ReplicatedLog};
use crate::record::{
    Account, Checkpoint, Location, Placement, Role, ServiceRecord, ServiceState, VersionInfo,
};
use crate::registry::{ChangeStream, Registry};
use crate::spec::ServiceSpec;

/// Opens a client of the [`ReplicatedLog`] namespace it is given (its own session).
pub type OpenLog =
    Arc<dyn Fn(String) -> BoxFuture<'static, Result<Arc<dyn ReplicatedLog>>> + Send + Sync>;

/// How long a campaign for a free lease may wait before it is given up (another
/// cluster won meanwhile).
const CAMPAIGN_TIMEOUT: Duration = Duration::from_secs(2);

/// Holds this cluster's heartbeat (leadership of its [`heartbeat_namespace`]) while
/// `healthy` is true, and resigns it as soon as it turns false.
#[derive(Debug)]
pub struct ClusterHeartbeat {
    log: Arc<dyn ReplicatedLog>,
    cluster: String,
    healthy: watch::Receiver<bool>,
    poll: Duration,
}

impl ClusterHeartbeat {
    /// A heartbeat of `cfg.cluster` on `log` (a client of its heartbeat namespace).
    pub fn new(
        cfg: &FailoverConfig,
        log: Arc<dyn ReplicatedLog>,
        healthy: watch::Receiver<bool>,
    ) -> Self {
        Self {
            log,
            cluster: cfg.cluster.clone(),
            healthy,
            poll: cfg.poll,
        }
    }

    /// Runs until the health sender is dropped.
    pub async fn run(mut self) {
        let mut held: Option<Leadership> = None;
        loop {
            let healthy = *self.healthy.borrow_and_update();
            if healthy {
                if let Some(l) = &held
                    && !matches!(self.log.leader().await, Ok(Some(i)) if i.term == l.term)
                {
                    held = None;
                }
                if held.is_none() {
                    let campaign = self.log.campaign(&self.cluster);
                    if let Ok(Ok(l)) = tokio::time::timeout(CAMPAIGN_TIMEOUT, campaign).await {
                        held = Some(l);
                    }
                }
            } else if let Some(l) = held.take() {
                let _ = self.log.resign(&l).await;
            }
            tokio::select! {
                _ = tokio::time::sleep(self.poll) => {}
                changed = self.healthy.changed() => if changed.is_err() { break },
            }
        }
        if let Some(l) = held {
            let _ = self.log.resign(&l).await;
        }
    }
}

/// The fence a replica checks before it leads or runs a side effect: its cluster
/// must hold the service's placement lease.
#[derive(Debug, Clone)]
pub struct PlacementFence {
    /// A client of the service's [`super::placement_namespace`].
    pub log: Arc<dyn ReplicatedLog>,
    /// The replica's cluster.
    pub cluster: String,
}

impl PlacementFence {
    /// Whether the replica's cluster holds the lease now (false when unreadable).
    pub async fn holds(&self) -> bool {
        matches!(self.log.leader().await, Ok(Some(l)) if l.candidate == self.cluster)
    }

    /// Whether the lease is known to be free or held by another cluster (false when
    /// unreadable: a leader does not step down for a failed read; its own session
    /// fences it if it is really cut off).
    pub async fn lost(&self) -> bool {
        matches!(self.log.leader().await, Ok(h) if h.as_ref().is_none_or(|l| l.candidate != self.cluster))
    }
}

/// One placed service, seen from one cluster: campaigns for its lease when no
/// cluster holds it (unless braked), records a won lease on chain, resigns it when
/// this cluster's API server stops answering, and publishes a [`PlacementStatus`].
pub struct ServicePlacement {
    cfg: FailoverConfig,
    service: ServiceId,
    lease: Arc<dyn ReplicatedLog>,
    open: OpenLog,
    heartbeats: BTreeMap<String, Arc<dyn ReplicatedLog>>,
    registry: Arc<dyn Registry>,
    healthy: watch::Receiver<bool>,
    status: Arc<watch::Sender<PlacementStatus>>,
}

impl std::fmt::Debug for ServicePlacement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServicePlacement")
            .field("cluster", &self.cfg.cluster)
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl ServicePlacement {
    /// The placement of `service` on `lease` (a client of its placement namespace);
    /// `open` opens the other clusters' heartbeat namespaces; `registry` records a
    /// won placement (an account with [`Role::Operator`] on the service).
    pub fn new(
        cfg: FailoverConfig,
        service: ServiceId,
        lease: Arc<dyn ReplicatedLog>,
        open: OpenLog,
        registry: Arc<dyn Registry>,
        healthy: watch::Receiver<bool>,
    ) -> Self {
        let status = Arc::new(watch::Sender::new(PlacementStatus {
            decision: Decision::Unhealthy,
            active_cluster: None,
            epoch: None,
            timeline: Timeline::default(),
            message: Some("starting".into()),
        }));
        Self {
            cfg,
            service,
            lease,
            open,
            heartbeats: BTreeMap::new(),
            registry,
            healthy,
            status,
        }
    }

    /// The published status (changes on every new decision).
    pub fn status(&self) -> watch::Receiver<PlacementStatus> {
        self.status.subscribe()
    }

    /// The sender of the status, for [`note_progress`].
    pub fn status_sender(&self) -> Arc<watch::Sender<PlacementStatus>> {
        self.status.clone()
    }

    /// The clusters listed by the service's record.
    async fn listed(&self) -> Result<Vec<String>> {
        Ok(self.registry.active(&self.service).await?.spec.clusters)
    }

    /// The listed clusters other than this one whose heartbeat is held.
    async fn alive(&mut self, listed: &[String]) -> BTreeSet<String> {
        let mut alive = BTreeSet::new();
        for c in listed.iter().filter(|c| **c != self.cfg.cluster) {
            if !self.heartbeats.contains_key(c) {
                match (self.open)(heartbeat_namespace(c)).await {
                    Ok(log) => {
                        self.heartbeats.insert(c.clone(), log);
                    }
                    Err(_) => continue,
                }
            }
            if matches!(self.heartbeats[c].leader().await, Ok(Some(_))) {
                alive.insert(c.clone());
            }
        }
        alive
    }

    fn publish(&self, decision: Decision, message: Option<String>, f: impl FnOnce(&mut Timeline)) {
        self.status.send_modify(|s| {
            match &decision {
                Decision::Active { epoch } => {
                    s.active_cluster = Some(self.cfg.cluster.clone());
                    s.epoch = Some(*epoch);
                }
                Decision::Standby { active, epoch } => {
                    s.active_cluster = Some(active.clone());
                    s.epoch = Some(*epoch);
                }
                _ => {}
            }
            s.decision = decision;
            s.message = message;
            f(&mut s.timeline);
        });
    }

    /// Records the won placement on chain until it is recorded or a newer epoch is.
    async fn record(&self, epoch: u64) -> Result<()> {
        let placement = Placement::new(self.cfg.cluster.clone(), epoch)?;
        let mut delay = Duration::from_millis(200);
        loop {
            match self.registry.set_placement(&self.service, &placement).await {
                Ok(()) => return Ok(()),
                Err(e @ (Error::Conflict { .. } | Error::PermissionDenied { .. })) => {
                    return Err(e);
                }
                Err(e) => {
                    tracing::warn!(service = %self.service, error = %e, retry_in = ?delay, "cannot record the placement yet");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Runs until the health sender is dropped; resigns a held lease then.
    pub async fn run(mut self) {
        let mut held: Option<Leadership> = None;
        let mut listed: Vec<String> = Vec::new();
        let mut listed_at: Option<tokio::time::Instant> = None;
        let mut last_held_ok = tokio::time::Instant::now();
        loop {
            if self.healthy.has_changed().is_err() {
                break;
            }
            let healthy = *self.healthy.borrow_and_update();
            if listed_at.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                match self.listed().await {
                    Ok(l) => {
                        listed = l;
                        listed_at = Some(tokio::time::Instant::now());
                    }
                    Err(e) if listed_at.is_none() => {
                        self.publish(Decision::Unhealthy, Some(format!("record: {e}")), |_| {});
                        tokio::time::sleep(self.cfg.poll * 4).await;
                        continue;
                    }
                    Err(_) => {}
                }
            }
            if !listed.contains(&self.cfg.cluster) {
                if let Some(l) = held.take() {
                    let _ = self.lease.resign(&l).await;
                }
                self.publish(Decision::NotListed, None, |_| {});
                tokio::time::sleep(self.cfg.poll * 4).await;
                continue;
            }
            let holder = match self.lease.leader().await {
                Ok(h) => {
                    last_held_ok = tokio::time::Instant::now();
                    h
                }
                Err(e) => {
                    // Cut off from the lease: a held lease expires on its own within
                    // its TTL; run nothing once it may have.
                    let message = format!("placement lease unreachable: {e}");
                    if held.is_some() && last_held_ok.elapsed() < self.cfg.poll * 4 {
                        tokio::time::sleep(self.cfg.poll).await;
                        continue;
                    }
                    held = None;
                    self.publish(Decision::Unhealthy, Some(message), |_| {});
                    tokio::time::sleep(self.cfg.poll).await;
                    continue;
                }
            };
            if let Some(l) = &held
                && holder.as_ref().is_none_or(|h| h.term != l.term)
            {
                tracing::warn!(service = %self.service, "placement lease lost");
                held = None;
            }
            let alive = self.alive(&listed).await;
            let decision = decide(&self.cfg, &listed, holder.as_ref(), &alive, healthy);
            match decision {
                Decision::Campaign { delay } => {
                    let detected = unix_millis();
                    self.publish(decision.clone(), None, |t| {
                        *t = Timeline {
                            detected: Some(detected),
                            ..Timeline::default()
                        }
                    });
                    // At least one poll: a lost cluster resigns its placement lease and
                    // its heartbeat in two tasks, so right after the lease the lost
                    // cluster may still look alive. Decided again after the wait: a
                    // brake that applies now wins over the campaign.
                    tokio::time::sleep(delay.max(self.cfg.poll)).await;
                    let holder = match self.lease.leader().await {
                        Ok(None) => None,
                        _ => continue,
                    };
                    let alive = self.alive(&listed).await;
                    let healthy = *self.healthy.borrow();
                    if !matches!(
                        decide(&self.cfg, &listed, holder.as_ref(), &alive, healthy),
                        Decision::Campaign { .. }
                    ) {
                        continue;
                    }
                    let won = tokio::time::timeout(
                        CAMPAIGN_TIMEOUT,
                        self.lease.campaign(&self.cfg.cluster),
                    )
                    .await;
                    let Ok(Ok(l)) = won else { continue };
                    tracing::info!(service = %self.service, epoch = l.term, "placement lease won");
                    let epoch = l.term;
                    held = Some(l);
                    self.publish(Decision::Active { epoch }, None, |t| {
                        t.lease_acquired = Some(unix_millis())
                    });
                    match self.record(epoch).await {
                        Ok(()) => self.publish(Decision::Active { epoch }, None, |t| {
                            t.recorded = Some(unix_millis())
                        }),
                        Err(e) => {
                            tracing::warn!(service = %self.service, error = %e, "placement not recorded; standing down");
                            if let Some(l) = held.take() {
                                let _ = self.lease.resign(&l).await;
                            }
                            self.publish(Decision::Unhealthy, Some(format!("record: {e}")), |_| {});
                        }
                    }
                    continue;
                }
                Decision::Unhealthy | Decision::NotListed | Decision::Braked { .. } => {
                    if let Some(l) = held.take() {
                        let _ = self.lease.resign(&l).await;
                    }
                    let message = match &decision {
                        Decision::Braked { lost, listed } => Some(format!(
                            "failover braked: {} of {listed} clusters look lost ({}); a partition of this observer is more likely than a mass failure",
                            lost.len(),
                            lost.join(", ")
                        )),
                        Decision::Unhealthy => {
                            Some("this cluster's API server does not answer".into())
                        }
                        _ => None,
                    };
                    self.publish(decision, message, |_| {});
                }
                // Active without `held`: a predecessor of this cluster's operator holds
                // it, ours until its session ends; then this operator campaigns first.
                _ => self.publish(decision, None, |_| {}),
            }
            tokio::time::sleep(self.cfg.poll).await;
        }
        if let Some(l) = held {
            let _ = self.lease.resign(&l).await;
        }
    }
}

/// Notes that the workload of a placed service was applied in this cluster (and
/// whether it is `ready`), on the status of its current failover.
pub fn note_progress(status: &watch::Sender<PlacementStatus>, ready: bool) {
    status.send_if_modified(|s| {
        if !s.decision.runs_here() {
            return false;
        }
        let mut changed = false;
        if s.timeline.deployed.is_none() {
            s.timeline.deployed = Some(unix_millis());
            changed = true;
        }
        if ready && s.timeline.ready.is_none() {
            s.timeline.ready = Some(unix_millis());
            changed = true;
        }
        changed
    });
}

/// The decisions of this cluster about its placed services, shared with
/// [`PlacedRegistry`].
pub type Decisions = Arc<Mutex<HashMap<ServiceId, Decision>>>;

/// A [`Registry`] view for one cluster's supervisors: the record of a placed service
/// says Paused (replicas 0, the workload kept: a warm standby) unless this cluster
/// holds its placement, and Stopped where the service does not list this cluster.
/// Every other call goes to the inner registry.
#[derive(Debug, Clone)]
pub struct PlacedRegistry {
    inner: Arc<dyn Registry>,
    decisions: Decisions,
}

impl PlacedRegistry {
    /// A view of `inner` following `decisions`.
    pub fn new(inner: Arc<dyn Registry>, decisions: Decisions) -> Self {
        Self { inner, decisions }
    }

    /// `record` as this cluster must run it.
    pub fn placed(&self, mut record: ServiceRecord) -> ServiceRecord {
        if record.spec.clusters.is_empty() {
            return record;
        }
        let decision = self.decisions.lock().get(&record.id).cloned();
        match decision {
            Some(d) if d.runs_here() => {}
            Some(Decision::NotListed) => record.state = ServiceState::Stopped,
            _ if record.state == ServiceState::Running => record.state = ServiceState::Paused,
            _ => {}
        }
        record
    }
}

#[async_trait]
impl Registry for PlacedRegistry {
    fn account(&self) -> Account {
        self.inner.account()
    }
    async fn register(&self, id: &ServiceId, spec: &ServiceSpec) -> Result<ServiceRecord> {
        self.inner.register(id, spec).await
    }
    async fn publish(&self, id: &ServiceId, spec: &ServiceSpec) -> Result<ServiceRecord> {
        self.inner.publish(id, spec).await
    }
    async fn active(&self, id: &ServiceId) -> Result<ServiceRecord> {
        Ok(self.placed(self.inner.active(id).await?))
    }
    async fn version(&self, id: &ServiceId, version: u64) -> Result<VersionInfo> {
        self.inner.version(id, version).await
    }
    async fn history(&self, id: &ServiceId) -> Result<Vec<VersionInfo>> {
        self.inner.history(id).await
    }
    async fn services(&self) -> Result<Vec<ServiceId>> {
        self.inner.services().await
    }
    async fn set_replicas(&self, id: &ServiceId, replicas: u32) -> Result<ServiceRecord> {
        self.inner.set_replicas(id, replicas).await
    }
    async fn set_state(&self, id: &ServiceId, state: ServiceState) -> Result<ServiceRecord> {
        self.inner.set_state(id, state).await
    }
    async fn rollback(&self, id: &ServiceId, version: u64) -> Result<ServiceRecord> {
        self.inner.rollback(id, version).await
    }
    async fn record_checkpoint(&self, id: &ServiceId, checkpoint: &Checkpoint) -> Result<()> {
        self.inner.record_checkpoint(id, checkpoint).await
    }
    async fn set_location(&self, id: &ServiceId, location: &Location) -> Result<()> {
        self.inner.set_location(id, location).await
    }
    async fn set_placement(&self, id: &ServiceId, placement: &Placement) -> Result<()> {
        self.inner.set_placement(id, placement).await
    }
    async fn grant(&self, id: &ServiceId, account: &Account, role: Role) -> Result<()> {
        self.inner.grant(id, account, role).await
    }
    async fn revoke(&self, id: &ServiceId, account: &Account, role: Role) -> Result<()> {
        self.inner.revoke(id, account, role).await
    }
    async fn transfer_ownership(&self, id: &ServiceId, new_owner: &Account) -> Result<()> {
        self.inner.transfer_ownership(id, new_owner).await
    }
    async fn accept_ownership(&self, id: &ServiceId) -> Result<()> {
        self.inner.accept_ownership(id).await
    }
    async fn cancel_ownership_transfer(&self, id: &ServiceId) -> Result<()> {
        self.inner.cancel_ownership_transfer(id).await
    }
    async fn pending_owner(&self, id: &ServiceId) -> Result<Option<Account>> {
        self.inner.pending_owner(id).await
    }
    async fn changes(&self) -> Result<ChangeStream> {
        self.inner.changes().await
    }
}
