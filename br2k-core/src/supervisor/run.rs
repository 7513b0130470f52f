//! The supervision loop: change streams, periodic resync, work queue, backoff.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use rand::Rng;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::engine::{Supervisor, SupervisorEvent};
use crate::diagnosis::Outcome;
use crate::error::Result;
use crate::id::ServiceId;
use crate::record::{ChangeKind, RegistryChange};

/// A change stream the supervisor follows.
#[derive(Debug, Clone, Copy)]
enum Source {
    /// [`crate::Registry::changes`].
    Registry,
    /// [`crate::Replicator::changes`].
    Replicator,
}

impl Source {
    fn name(self) -> &'static str {
        match self {
            Source::Registry => "registry",
            Source::Replicator => "replicator",
        }
    }
}

/// One item of a change stream.
enum Change {
    /// A registry change (or the stream's error).
    Registry(Result<RegistryChange>),
    /// A workload that changed.
    Workload(ServiceId),
}

/// Sleeps `d`, or less when `stop` fires; returns whether to stop.
async fn sleep_or_stop(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    let stopped = tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = stop.wait_for(|s| *s) => true,
    };
    stopped || *stop.borrow()
}

/// A jittered wait in `[d/2, d]`.
fn jittered(d: Duration) -> Duration {
    let half = d / 2;
    half + Duration::from_nanos(
        rand::rng().random_range(0..=u64::try_from(half.as_nanos()).unwrap_or(u64::MAX)),
    )
}

impl Supervisor {
    /// Supervises every service until `shutdown` completes.
    ///
    /// - Reacts to [`crate::Registry::changes`] and [`crate::Replicator::changes`];
    ///   a stream that fails or ends is reopened with backoff, followed by a resync.
    /// - Resyncs every service of [`crate::Registry::services`] (the last good list
    ///   when the registry is down) and [`crate::Replicator::managed`] periodically.
    /// - Queues services with deduplication; at most the configured number of
    ///   reconciles run at once, never two for one service.
    /// - Retries a failed recovery after a per-service exponential backoff with
    ///   jitter; events and resyncs do not bypass a pending retry, registry changes
    ///   (a new desired state) do.
    /// - Publishes a [`SupervisorEvent`] per recovery ([`Supervisor::subscribe`]).
    pub async fn run(self: Arc<Self>, shutdown: impl Future<Output = ()>) {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        for _ in 0..self.config.concurrency {
            tasks.spawn(Arc::clone(&self).worker(stop_rx.clone()));
        }
        tasks.spawn(Arc::clone(&self).watch(Source::Registry, stop_rx.clone()));
        tasks.spawn(Arc::clone(&self).watch(Source::Replicator, stop_rx.clone()));
        tasks.spawn(Arc::clone(&self).resync_loop(stop_rx.clone()));
        shutdown.await;
        let _ = stop_tx.send(true);
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }

    /// Queues `id` unless it waits for a scheduled retry.
    fn enqueue(&self, id: ServiceId) {
        if !self.backoffs.waiting(&id) {
            self.queue.push(id);
        }
    }

    /// Queues every known service.
    async fn resync_all(&self) {
        let mut ids: BTreeSet<ServiceId> = BTreeSet::new();
        match self.registry.services().await {
            Ok(list) => {
                ids.extend(list.iter().cloned());
                *self.services.lock() = list;
            }
            Err(e) => {
                tracing::debug!(error = %e, "registry services unavailable; using the last list");
                ids.extend(self.services.lock().iter().cloned());
            }
        }
        // Services read before (their last verified record is cached).
        ids.extend(self.cached_ids());
        match self.replicator.managed().await {
            Ok(list) => ids.extend(list),
            Err(e) => tracing::debug!(error = %e, "replicator managed list unavailable"),
        }
        for id in ids {
            self.enqueue(id);
        }
    }

    async fn resync_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            self.resync_all().await;
            if sleep_or_stop(self.config.resync, &mut stop).await {
                return;
            }
        }
    }

    async fn worker(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        loop {
            let id = tokio::select! {
                id = self.queue.pop() => id,
                _ = stop.wait_for(|s| *s) => return,
            };
            let result = self.reconcile_timed(&id).await;
            let retry = match result {
                Ok((report, detected_at)) => {
                    let failed = matches!(report.outcome, Outcome::Partial | Outcome::Failed);
                    if !report.diagnosis.is_healthy() {
                        self.emit(SupervisorEvent {
                            id: id.clone(),
                            report,
                            detected_at,
                        });
                    }
                    failed
                }
                Err(e) => {
                    tracing::warn!(%id, error = %e, "reconcile failed");
                    true
                }
            };
            if retry {
                let wait = self.backoffs.failed(&id);
                let me = Arc::clone(&self);
                let retry_id = id.clone();
                let mut stop = stop.clone();
                tokio::spawn(async move {
                    if !sleep_or_stop(wait, &mut stop).await {
                        me.queue.push(retry_id);
                    }
                });
            } else {
                self.backoffs.reset(&id);
            }
            self.queue.done(&id);
        }
    }

    /// Follows one change stream until `stop`: a stream that fails to open or ends is
    /// reopened after a jittered exponential backoff, and every reopening is followed by
    /// a resync (changes may have been missed while disconnected).
    async fn watch(self: Arc<Self>, source: Source, mut stop: watch::Receiver<bool>) {
        let mut delay = self.config.backoff_min;
        let mut first = true;
        loop {
            match self.open(source).await {
                Ok(mut stream) => {
                    delay = self.config.backoff_min;
                    if !first {
                        self.resync_all().await;
                    }
                    first = false;
                    loop {
                        let item = tokio::select! {
                            item = stream.next() => item,
                            _ = stop.wait_for(|s| *s) => return,
                        };
                        match item {
                            Some(change) => self.on_change(change).await,
                            None => break,
                        }
                    }
                    tracing::warn!("{} change stream ended; reconnecting", source.name());
                }
                Err(e) => tracing::warn!(
                    error = %e,
                    "cannot open the {} change stream",
                    source.name()
                ),
            }
            if sleep_or_stop(jittered(delay), &mut stop).await {
                return;
            }
            delay = (delay * 2).min(self.config.backoff_max);
        }
    }

    /// Opens the change stream of `source`.
    async fn open(&self, source: Source) -> Result<BoxStream<'static, Change>> {
        Ok(match source {
            Source::Registry => self.registry.changes().await?.map(Change::Registry).boxed(),
            Source::Replicator => self
                .replicator
                .changes()
                .await?
                .map(Change::Workload)
                .boxed(),
        })
    }

    /// Reacts to one item of a change stream.
    async fn on_change(&self, change: Change) {
        match change {
            Change::Registry(Ok(change)) => {
                self.change_events.fetch_add(1, Ordering::Relaxed);
                if matches!(change.kind, ChangeKind::Registered) {
                    let mut services = self.services.lock();
                    if !services.contains(&change.id) {
                        services.push(change.id.clone());
                    }
                }
                // A new desired state: retry now, not after the backoff.
                self.backoffs.reset(&change.id);
                self.queue.push(change.id);
            }
            Change::Registry(Err(e)) => {
                tracing::warn!(error = %e, "registry change stream error; resyncing");
                self.resync_all().await;
            }
            Change::Workload(id) => {
                self.change_events.fetch_add(1, Ordering::Relaxed);
                self.enqueue(id);
            }
        }
    }
}
