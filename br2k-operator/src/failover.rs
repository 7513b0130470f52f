//! Whole-cluster failover in the operator (see [`br2k_core::failover`]): this
//! cluster's heartbeat while its API server answers, one placement lease per
//! service on the etcd cluster of the replicated log, the decisions the supervisors
//! follow ([`br2k_core::failover::PlacedRegistry`]), and what the status shows.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use br2k_core::failover::{
    ClusterHeartbeat, Decision, Decisions, FailoverConfig, OpenLog, PlacementStatus,
    ServicePlacement, heartbeat_namespace, note_progress, placement_namespace,
};
use br2k_core::{Registry, Result, ServiceId};
use br2k_etcd::{EtcdLog, EtcdLogConfig};
use futures::StreamExt;
use parking_lot::Mutex;
use tokio::sync::{broadcast, watch};

use crate::crd::{FailoverTimeline, PlacementView};

/// How often this cluster's API server is probed.
const PROBE_EVERY: Duration = Duration::from_millis(500);
/// Failed probes in a row after which the API server counts as lost.
const PROBE_FAILURES: u32 = 2;

/// Settings of the operator's failover.
#[derive(Debug, Clone)]
pub struct FailoverSettings {
    /// This cluster, brake share, rank delay, poll period.
    pub config: FailoverConfig,
    /// etcd endpoints holding the leases (the replicated log's cluster).
    pub etcd: Vec<String>,
    /// TTL of the leases: how long a lost cluster blocks a takeover.
    pub lease_ttl: Duration,
}

/// The operator's failover: owns the heartbeat, the per-service placements and
/// their decisions; wakes every resource when a decision changes.
pub struct Failover {
    settings: FailoverSettings,
    open: OpenLog,
    recorder: Arc<dyn Registry>,
    healthy: watch::Receiver<bool>,
    decisions: Decisions,
    services: Mutex<HashMap<ServiceId, Arc<watch::Sender<PlacementStatus>>>>,
    wake: broadcast::Sender<()>,
}

impl std::fmt::Debug for Failover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Failover")
            .field("cluster", &self.settings.config.cluster)
            .finish_non_exhaustive()
    }
}

impl Failover {
    /// Starts probing `client`'s API server and holding this cluster's heartbeat;
    /// `recorder` records won placements (an account with the operator role).
    pub async fn start(
        settings: FailoverSettings,
        client: kube::Client,
        recorder: Arc<dyn Registry>,
    ) -> Result<Arc<Self>> {
        let (etcd, ttl) = (settings.etcd.clone(), settings.lease_ttl);
        let open: OpenLog = Arc::new(move |namespace: String| {
            let mut cfg = EtcdLogConfig::new(etcd.clone(), namespace);
            cfg.lease_ttl = ttl;
            cfg.request_timeout = ttl.min(Duration::from_secs(2));
            Box::pin(async move {
                let log = EtcdLog::connect_with(cfg).await?;
                Ok(Arc::new(log) as Arc<dyn br2k_core::ReplicatedLog>)
            })
        });
        let (health_tx, healthy) = watch::channel(false);
        tokio::spawn(probe(client, health_tx));
        let heartbeat = open(heartbeat_namespace(&settings.config.cluster)).await?;
        tokio::spawn(ClusterHeartbeat::new(&settings.config, heartbeat, healthy.clone()).run());
        Ok(Arc::new(Self {
            settings,
            open,
            recorder,
            healthy,
            decisions: Decisions::default(),
            services: Mutex::default(),
            wake: broadcast::channel(16).0,
        }))
    }

    /// This cluster's name.
    pub fn cluster(&self) -> &str {
        &self.settings.config.cluster
    }

    /// The decisions the supervisors' registry view follows.
    pub fn decisions(&self) -> Decisions {
        self.decisions.clone()
    }

    /// A signal for every change of a decision (the controller reconciles all then).
    pub fn wakes(&self) -> impl futures::Stream<Item = ()> + Send + 'static {
        tokio_stream::wrappers::BroadcastStream::new(self.wake.subscribe()).map(|_| ())
    }

    /// Starts the placement of `id` unless it runs; idempotent.
    pub async fn ensure(self: &Arc<Self>, id: &ServiceId) -> Result<()> {
        if self.services.lock().contains_key(id) {
            return Ok(());
        }
        let lease = (self.open)(placement_namespace(id)).await?;
        let placement = ServicePlacement::new(
            self.settings.config.clone(),
            id.clone(),
            lease,
            self.open.clone(),
            self.recorder.clone(),
            self.healthy.clone(),
        );
        let mut rx = placement.status();
        {
            let mut services = self.services.lock();
            if services.contains_key(id) {
                return Ok(());
            }
            services.insert(id.clone(), placement.status_sender());
        }
        tokio::spawn(placement.run());
        let (me, id) = (Arc::downgrade(self), id.clone());
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let Some(me) = me.upgrade() else { return };
                let decision = rx.borrow_and_update().decision.clone();
                let before = me.decisions.lock().insert(id.clone(), decision.clone());
                if before.as_ref().map(Decision::runs_here) != Some(decision.runs_here()) {
                    tracing::info!(service = %id, ?decision, "placement decision changed");
                    let _ = me.wake.send(());
                }
            }
        });
        Ok(())
    }

    /// Notes that the workload of `id` was applied here and whether it is Ready.
    pub fn progress(&self, id: &ServiceId, ready: bool) {
        if let Some(s) = self.services.lock().get(id) {
            note_progress(s, ready);
        }
    }

    /// What the status of a resource for `id` shows about its placement.
    pub fn view(&self, id: &ServiceId) -> Option<PlacementView> {
        let s = self.services.lock().get(id)?.borrow().clone();
        if s.decision == Decision::NotListed && s.active_cluster.is_none() {
            return None;
        }
        let t = &s.timeline;
        let last_failover = t.lease_acquired.map(|_| FailoverTimeline {
            detected: t.detected.map(rfc3339),
            lease_acquired: t.lease_acquired.map(rfc3339),
            recorded: t.recorded.map(rfc3339),
            deployed: t.deployed.map(rfc3339),
            ready: t.ready.map(rfc3339),
        });
        Some(PlacementView {
            cluster: self.cluster().to_owned(),
            decision: s.decision.kind().to_owned(),
            active_cluster: s.active_cluster,
            epoch: s.epoch,
            message: s.message,
            last_failover,
        })
    }
}

/// Unix milliseconds as RFC 3339 with milliseconds.
fn rfc3339(ms: u64) -> String {
    k8s_openapi::jiff::Timestamp::from_millisecond(ms as i64)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// Probes the API server: healthy until [`PROBE_FAILURES`] probes in a row fail.
async fn probe(client: kube::Client, healthy: watch::Sender<bool>) {
    let mut failures = 0u32;
    loop {
        let ok = matches!(
            tokio::time::timeout(PROBE_EVERY * 2, client.apiserver_version()).await,
            Ok(Ok(_))
        );
        failures = if ok { 0 } else { failures + 1 };
        let now = failures < PROBE_FAILURES;
        if *healthy.borrow() != now {
            tracing::warn!(healthy = now, "this cluster's API server");
            healthy.send_replace(now);
        }
        if healthy.is_closed() {
            return;
        }
        tokio::time::sleep(PROBE_EVERY).await;
    }
}
