//! Leadership: campaigning, serving as leader (barrier, location publication,
//! resolving inherited intents, noticing a lost leadership), batching appends, and
//! observing who leads.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::mpsc;

use super::apply::Op;
use super::{Claim, Effect, Pending, ReplicaError, ReplicaRole, Shared, StateMachine};
use crate::error::{Error, Result};
use crate::log::Leadership;
use crate::record::Location;

/// First wait before an unresolved effect is tried again.
pub(super) const RESOLVE_RETRY_FIRST: Duration = Duration::from_millis(200);
/// Longest wait between attempts to resolve an effect.
const RESOLVE_RETRY_MAX: Duration = Duration::from_secs(5);
/// How often the leader looks for logged intents that no task resolves.
const RESOLVE_SWEEP: Duration = Duration::from_secs(1);
/// How often a replica with a placement fence checks that its cluster holds it.
const PLACEMENT_POLL: Duration = Duration::from_millis(200);

impl<S: StateMachine> Shared<S> {
    pub(super) async fn batch_loop(self: Arc<Self>, mut rx: mpsc::Receiver<Pending>) {
        let max = self.cfg.max_batch.max(1);
        while let Some(first) = rx.recv().await {
            let mut batch = vec![first];
            while batch.len() < max {
                match rx.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            let lead = self.leadership.lock().clone();
            let result = match lead {
                Some(l) => {
                    let data = batch.iter().map(|p| p.data.clone()).collect();
                    self.log.append(&l, data).await.map(drop)
                }
                None => Err(Error::conflict("not the leader")),
            };
            match &result {
                Ok(()) => {
                    self.stats.appends.fetch_add(1, Ordering::Relaxed);
                    self.stats
                        .appended_entries
                        .fetch_add(batch.len() as u64, Ordering::Relaxed);
                }
                Err(Error::Conflict { .. }) => self.lost.notify_one(),
                Err(e) => tracing::warn!(error = %e, "append failed"),
            }
            for p in batch {
                let r = match &result {
                    Ok(()) => Ok(()),
                    Err(Error::Conflict { reason }) => Err(Error::conflict(reason)),
                    Err(e) => Err(Error::unavailable(format!("append failed: {e}"))),
                };
                let _ = p.ack.send(r);
            }
        }
    }

    /// Keeps the observed leader up to date (push based).
    pub(super) async fn observe_loop(self: Arc<Self>) {
        loop {
            match self.log.observe().await {
                Ok(mut stream) => {
                    while let Some(item) = stream.next().await {
                        match item {
                            Ok(info) => {
                                self.leader.send_replace(info);
                            }
                            Err(_) => break,
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "observe failed"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub(super) async fn leadership_loop(self: Arc<Self>) {
        loop {
            // A replica of a cluster that does not hold the service's placement never
            // campaigns.
            if let Some(fence) = &self.cfg.placement
                && !fence.holds().await
            {
                tokio::time::sleep(PLACEMENT_POLL).await;
                continue;
            }
            let lead = match self.log.campaign(&self.cfg.endpoint).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::debug!(error = %e, "campaign failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            *self.leadership.lock() = Some(lead.clone());
            if let Err(e) = self.clone().lead(&lead).await {
                tracing::warn!(error = %e, "leadership ended");
            }
            *self.leadership.lock() = None;
            self.role.send_replace(ReplicaRole::Follower);
            let _ = self.log.resign(&lead).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Serves as leader until the leadership is lost.
    async fn lead(self: Arc<Self>, lead: &Leadership) -> Result<()> {
        // Barrier: everything committed by earlier leaders is applied before serving.
        let id = self.next_id();
        let rx = self.wait_for(&id);
        let data = serde_json::to_vec(&Op::<S::Command>::Noop { id: id.clone() })
            .map_err(|e| Error::backend("replica", e, false))?;
        let range = self.log.append(lead, vec![Bytes::from(data)]).await?;
        match tokio::time::timeout(self.cfg.request_timeout, rx).await {
            Ok(Ok(_)) => {}
            _ => {
                self.waiters.lock().remove(&id);
                return Err(Error::unavailable(format!(
                    "barrier {} not applied in time",
                    range.end()
                )));
            }
        }
        self.role.send_replace(ReplicaRole::Leader);
        // Published once per leadership change, never per request.
        match Location::new(self.cfg.endpoint.clone(), lead.term) {
            Ok(loc) => match self.registry.set_location(&self.cfg.service, &loc).await {
                Ok(()) => {
                    self.stats
                        .locations_published
                        .fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => tracing::warn!(error = %e, "cannot publish the leader location"),
            },
            Err(e) => tracing::warn!(error = %e, "invalid endpoint"),
        }
        let mut leader_rx = self.leader.subscribe();
        let mut placement_check = tokio::time::interval(PLACEMENT_POLL);
        // Its first tick is at once: intents left by an earlier leader.
        let mut sweep = tokio::time::interval(RESOLVE_SWEEP);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = sweep.tick(), if self.effect.is_some() => self.resolve_unclaimed(),
                _ = placement_check.tick(), if self.cfg.placement.is_some() => {
                    if let Some(fence) = &self.cfg.placement
                        && fence.lost().await
                    {
                        return Err(Error::conflict(format!(
                            "cluster {} no longer holds the placement of the service",
                            fence.cluster
                        )));
                    }
                }
                _ = self.lost.notified() => {
                    if !self.still_leader(lead).await {
                        return Err(Error::conflict("fencing token is stale"));
                    }
                }
                changed = leader_rx.changed() => {
                    if changed.is_err() {
                        return Err(Error::unavailable("observer stopped"));
                    }
                    let now = leader_rx.borrow_and_update().clone();
                    if now.as_ref().is_none_or(|l| l.term != lead.term)
                        && !self.still_leader(lead).await
                    {
                        return Err(Error::conflict("another leader was elected"));
                    }
                }
            }
        }
    }

    async fn still_leader(&self, lead: &Leadership) -> bool {
        matches!(self.log.leader().await, Ok(Some(l)) if l.term == lead.term)
    }

    /// Resolves every logged intent that no task of this replica resolves: intents
    /// left by an earlier leader, and intents whose append answer was lost (logged,
    /// but their caller got an error and never ran the effect). Each is looked up by
    /// its key first, never rerun blindly.
    fn resolve_unclaimed(self: &Arc<Self>) {
        let Some(effect) = self.effect.clone() else {
            return;
        };
        let pending: Vec<(String, S::Command)> = self
            .applied
            .lock()
            .pending
            .iter()
            .map(|(k, c)| (k.clone(), c.clone()))
            .collect();
        for (key, cmd) in pending {
            if let Some(claim) = self.claim(&key) {
                self.clone()
                    .keep_resolving(claim, effect.clone(), cmd, Duration::ZERO);
            }
        }
    }

    /// Keeps resolving the logged intent of `claim` in the background (looking it up
    /// first: its effect may have run) while this replica leads and the intent is
    /// pending; a new leader resolves it otherwise. The first attempt is after
    /// `first`, later ones back off exponentially (from 200 ms, doubling to 5 s): a
    /// lasting outage of the chain is waited out, not hammered.
    pub(super) fn keep_resolving(
        self: Arc<Self>,
        claim: Claim<S>,
        effect: Arc<dyn Effect<S::Command>>,
        cmd: S::Command,
        first: Duration,
    ) {
        tokio::spawn(async move {
            let key = claim.key.clone();
            let mut wait = first;
            let mut delay = RESOLVE_RETRY_FIRST;
            loop {
                tokio::time::sleep(wait).await;
                wait = delay;
                delay = (delay * 2).min(RESOLVE_RETRY_MAX);
                if self.leading().is_err() || !self.applied.lock().pending.contains_key(&key) {
                    return;
                }
                match self
                    .clone()
                    .resolve(effect.clone(), key.clone(), cmd.clone(), true)
                    .await
                {
                    Ok(()) => return,
                    // Also "not the leader": the leadership check reads etcd and fails
                    // while a member is down, though this replica still leads (the
                    // loop ends when it really stops leading).
                    Err(e) => {
                        tracing::warn!(key, error = %e, retry_in = ?wait, "cannot resolve an effect yet")
                    }
                }
            }
        });
    }

    /// Resolves the effect of an intent: looks its key up first when the intent may
    /// have run under an earlier leader, runs it otherwise, and logs the result.
    pub(super) async fn resolve(
        self: Arc<Self>,
        effect: Arc<dyn Effect<S::Command>>,
        key: String,
        cmd: S::Command,
        inherited: bool,
    ) -> Result<(), ReplicaError> {
        let found = if inherited {
            effect.lookup(&key, &cmd).await?
        } else {
            None
        };
        let result = match found {
            Some(r) => Ok(r),
            None => {
                let lead = self.leadership.lock().clone();
                let mut current = match &lead {
                    Some(l) => self.still_leader(l).await,
                    None => false,
                };
                if let Some(fence) = &self.cfg.placement {
                    current = current && fence.holds().await;
                }
                if !current {
                    return Err(self.not_leader());
                }
                self.stats.effects_run.fetch_add(1, Ordering::Relaxed);
                effect.run(&key, &cmd).await
            }
        };
        let id = self.next_id();
        let op = match result {
            Ok(r) => Op::Done {
                id: id.clone(),
                key,
                effect: hex::encode(r),
            },
            Err(e) => Op::Aborted {
                id: id.clone(),
                key,
                reason: e.to_string(),
            },
        };
        match self.submit(&id, &op).await {
            Ok(_) => Ok(()),
            // The Aborted entry reports the failure through the waiters.
            Err(ReplicaError::Failed(Error::Conflict { .. })) => Ok(()),
            Err(e) => Err(e),
        }
    }
}
