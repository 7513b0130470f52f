//! Leader election with a `coordination.k8s.io/v1` Lease, so that two operator
//! replicas never act at once.
//!
//! The holder renews the lease every `duration / 3`; every write is a replace guarded
//! by the lease's `resourceVersion`, so of two racing candidates exactly one wins. A
//! candidate takes over only when the lease record has not changed for a whole
//! `duration` *as measured by its own monotonic clock* (no clock-skew assumptions,
//! as in client-go). A holder that cannot renew within `duration * 2/3` steps down
//! before anyone else may take over.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::watch;

/// Leader election settings.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// Lease name.
    pub name: String,
    /// Lease namespace.
    pub namespace: String,
    /// This replica's identity (e.g. the pod name).
    pub identity: String,
    /// How long a lease is valid without renewal.
    pub duration: Duration,
}

/// Tries to acquire and renew one Lease.
#[derive(Debug)]
pub struct LeaderElector {
    api: Api<Lease>,
    cfg: LeaseConfig,
    /// The last lease record seen (holder, renew time) and when it was first seen.
    observed: Option<(String, Instant)>,
    /// When this replica last renewed successfully.
    renewed: Option<Instant>,
}

fn record_key(l: &Lease) -> String {
    let s = l.spec.as_ref();
    format!(
        "{:?}/{:?}/{:?}",
        s.and_then(|s| s.holder_identity.clone()),
        s.and_then(|s| s.renew_time.as_ref().map(|t| t.0.to_string())),
        l.metadata.resource_version
    )
}

impl LeaderElector {
    /// An elector for `cfg`.
    pub fn new(client: Client, cfg: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
            observed: None,
            renewed: None,
        }
    }

    fn spec(&self, previous: Option<&LeaseSpec>) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        let ours = previous.and_then(|p| p.holder_identity.as_deref()) == Some(&self.cfg.identity);
        LeaseSpec {
            holder_identity: Some(self.cfg.identity.clone()),
            lease_duration_seconds: Some(self.cfg.duration.as_secs().max(1) as i32),
            acquire_time: if ours {
                previous.and_then(|p| p.acquire_time.clone())
            } else {
                Some(now.clone())
            },
            renew_time: Some(now),
            lease_transitions: Some(
                previous.and_then(|p| p.lease_transitions).unwrap_or(0) + i32::from(!ours),
            ),
            ..LeaseSpec::default()
        }
    }

    /// One acquire-or-renew attempt. `Ok(true)`: this replica holds the lease now.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let now = Instant::now();
        let current = self.api.get_opt(&self.cfg.name).await?;
        let Some(lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.cfg.name.clone()),
                    namespace: Some(self.cfg.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(self.spec(None)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => {
                    self.renewed = Some(now);
                    Ok(true)
                }
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let key = record_key(&lease);
        let first_seen = match &self.observed {
            Some((k, at)) if *k == key => *at,
            _ => {
                self.observed = Some((key, now));
                now
            }
        };
        let spec = lease.spec.as_ref();
        let holder = spec.and_then(|s| s.holder_identity.as_deref());
        let ours = holder == Some(self.cfg.identity.as_str());
        let free = holder.is_none_or(str::is_empty);
        let expired = now.duration_since(first_seen) >= self.cfg.duration;
        if !(ours || free || expired) {
            return Ok(false);
        }
        let mut next = lease.clone();
        next.spec = Some(self.spec(spec));
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &next)
            .await
        {
            Ok(l) => {
                self.observed = Some((record_key(&l), now));
                self.renewed = Some(now);
                Ok(true)
            }
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Gives the lease up (when held), so another replica can take over at once.
    pub async fn release(&mut self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.cfg.name).await? else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(&self.cfg.identity) {
            return Ok(());
        }
        spec.holder_identity = None;
        self.renewed = None;
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Runs the election until `stop` turns true, publishing leadership on `leader`.
    /// Leadership is dropped (false) as soon as a renewal fails for longer than
    /// `duration * 2/3`, before any other replica may consider the lease expired.
    pub async fn run(mut self, leader: watch::Sender<bool>, mut stop: watch::Receiver<bool>) {
        let period = self.cfg.duration / 3;
        let step_down_after = self.cfg.duration * 2 / 3;
        loop {
            let held = match self.try_acquire_or_renew().await {
                Ok(held) => held,
                Err(e) => {
                    tracing::warn!(error = %e, "lease renewal failed");
                    self.renewed
                        .is_some_and(|at| at.elapsed() < step_down_after)
                        && *leader.borrow()
                }
            };
            leader.send_if_modified(|v| {
                let changed = *v != held;
                *v = held;
                changed
            });
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        let _ = leader.send(false);
        if let Err(e) = self.release().await {
            tracing::warn!(error = %e, "lease release failed");
        }
    }
}

/// Starts an elector; returns the leadership watch and a stop handle.
pub fn spawn(
    client: Client,
    cfg: LeaseConfig,
) -> (
    watch::Receiver<bool>,
    watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    let (leader_tx, leader_rx) = watch::channel(false);
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(LeaderElector::new(client, cfg).run(leader_tx, stop_rx));
    (leader_rx, stop_tx, task)
}
