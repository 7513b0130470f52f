//! A fleet of services on the in-memory backends under a running supervisor, for the
//! supervisor benches.

use std::sync::Arc;
use std::time::{Duration, Instant};

use br2k_core::artifact::{Blob, Image, OCI_CONFIG, OCI_LAYER_TAR};
use br2k_core::memory::{InMemoryImageStore, InMemoryRegistry, InMemoryReplicator};
use br2k_core::supervisor::Supervisor;
use br2k_core::{
    Error, ImageRef, ImageStore, Outcome, Registry, Replicator, Repository, Result, ServiceId,
    ServiceSpec,
};
use tokio::sync::oneshot;

/// Registry host of the primary image store.
pub const PRIMARY: &str = "primary.bench.local";
/// Registry host of the mirror.
pub const MIRROR: &str = "mirror.bench.local";

/// `n` services of 3 replicas each, all on one image held by a primary and a mirror,
/// supervised by a running [`Supervisor`].
#[derive(Debug)]
pub struct Fleet {
    /// The registry (owner handle).
    pub registry: InMemoryRegistry,
    /// The replicator (failure injection).
    pub replicator: InMemoryReplicator,
    /// The primary image store.
    pub primary: InMemoryImageStore,
    /// The mirror.
    pub mirror: InMemoryImageStore,
    /// The supervisor, running.
    pub supervisor: Arc<Supervisor>,
    /// Service ids.
    pub ids: Vec<ServiceId>,
    /// Time from starting the supervisor until every service was deployed.
    pub deploy_time: Duration,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn image() -> Image {
    let config = Blob::new(OCI_CONFIG, r#"{"architecture":"amd64","os":"linux"}"#);
    let layer = Blob::new(OCI_LAYER_TAR, vec![1u8; 4096]);
    Image::build(config, vec![layer], None)
}

impl Fleet {
    /// Registers and starts `n` services, starts the supervisor (resync every
    /// `resync`) and waits until all are deployed (at most `timeout`).
    pub async fn start(n: usize, resync: Duration, timeout: Duration) -> Result<Fleet> {
        let registry = InMemoryRegistry::new("operator");
        let replicator = InMemoryReplicator::new();
        let primary = InMemoryImageStore::new(PRIMARY);
        let mirror = InMemoryImageStore::new(MIRROR);
        let repo = Repository::new("bench/app")?;
        let image = image();
        primary.push(&repo, &image, Some("1.0")).await?;
        mirror.push(&repo, &image, Some("1.0")).await?;
        let spec = ServiceSpec::new(
            ImageRef::new(PRIMARY, repo, Some("1.0"), Some(image.digest))?,
            3,
        )?;
        let mut ids = Vec::with_capacity(n);
        for i in 0..n {
            let id = ServiceId::new(format!("svc-{i:05}"))?;
            registry.register(&id, &spec).await?;
            registry.resume(&id).await?;
            ids.push(id);
        }
        let supervisor = Arc::new(
            Supervisor::builder()
                .registry(Arc::new(registry.clone()))
                .replicator(Arc::new(replicator.clone()))
                .image_store(Arc::new(primary.clone()))
                .image_store(Arc::new(mirror.clone()))
                .resync(resync)
                .backoff(Duration::from_millis(50), Duration::from_secs(5))
                .concurrency(8)
                .build()?,
        );
        let (tx, rx) = oneshot::channel();
        let started = Instant::now();
        tokio::spawn(Arc::clone(&supervisor).run(async {
            let _ = rx.await;
        }));
        let mut fleet = Fleet {
            registry,
            replicator,
            primary,
            mirror,
            supervisor,
            ids,
            deploy_time: Duration::ZERO,
            stop: Some(tx),
        };
        fleet.wait_all_live(timeout).await?;
        fleet.deploy_time = started.elapsed();
        Ok(fleet)
    }

    /// Waits until every service has its workload with 3 healthy replicas of the
    /// recorded image and the supervisor's queue is empty.
    pub async fn wait_all_live(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if self.replicator.managed().await?.len() == self.ids.len()
                && self.supervisor.pending() == 0
                && self.all_healthy().await?
            {
                return Ok(());
            }
            if start.elapsed() > timeout {
                return Err(Error::unavailable(format!(
                    "fleet of {} not converged after {timeout:?}",
                    self.ids.len()
                )));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    async fn all_healthy(&self) -> Result<bool> {
        for id in &self.ids {
            let Some(live) = self.replicator.observe(id).await? else {
                return Ok(false);
            };
            if live.desired_replicas != 3 || live.ready_replicas != 3 {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Deletes the workload of `id` and waits for the supervisor's recovery event;
    /// returns the time from the deletion to the event.
    pub async fn break_and_recover(&self, id: &ServiceId, timeout: Duration) -> Result<Duration> {
        let mut events = self.supervisor.subscribe();
        let start = Instant::now();
        self.replicator.delete_workload(id)?;
        tokio::time::timeout(timeout, async {
            loop {
                match events.recv().await {
                    Ok(e) if &e.id == id && e.report.outcome == Outcome::Recovered => {
                        return Ok(start.elapsed());
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(e) => return Err(Error::unavailable(e)),
                }
            }
        })
        .await
        .map_err(|_| Error::unavailable(format!("{id} not recovered after {timeout:?}")))?
    }
}

/// Peak resident set size of this process in KiB (`VmHWM` of /proc/self/status).
pub fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The median of `values` (sorted in place); zero when empty.
pub fn median(values: &mut [Duration]) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    values.sort_unstable();
    values[values.len() / 2]
}
