//! [`SupervisorBuilder`]: the settings of a [`Supervisor`] and their checks.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::broadcast;

use super::engine::Supervisor;
use super::queue::{Backoffs, Queue};
use crate::error::{Error, Result, ValidationError};
use crate::record::Account;
use crate::registry::Registry;
use crate::replicator::Replicator;
use crate::store::ImageStore;

/// Events buffered per subscriber by default; a slower subscriber loses the oldest.
const EVENT_BUFFER: usize = 1024;

/// Tuning of a [`Supervisor`].
#[derive(Debug, Clone)]
pub(super) struct Config {
    pub resync: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub concurrency: usize,
    pub verify_ttl: Duration,
    pub event_buffer: usize,
    pub settle_timeout: Duration,
    /// Accounts whose services may be deployed (`None`: any owner).
    pub allowed_owners: Option<Vec<Account>>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            resync: Duration::from_secs(30),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            concurrency: 8,
            verify_ttl: Duration::from_secs(300),
            event_buffer: EVENT_BUFFER,
            settle_timeout: Duration::from_secs(15),
            allowed_owners: None,
        }
    }
}

/// Builds a [`Supervisor`]; see [`Supervisor::builder`].
#[derive(Default)]
pub struct SupervisorBuilder {
    registry: Option<Arc<dyn Registry>>,
    replicator: Option<Arc<dyn Replicator>>,
    stores: Vec<Arc<dyn ImageStore>>,
    config: Config,
}

impl fmt::Debug for SupervisorBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SupervisorBuilder")
            .field("registry", &self.registry)
            .field("replicator", &self.replicator)
            .field("stores", &self.stores)
            .field("config", &self.config)
            .finish()
    }
}

impl SupervisorBuilder {
    /// The service registry to read records from (required; never written to).
    pub fn registry(mut self, registry: Arc<dyn Registry>) -> Self {
        self.registry = Some(registry);
        self
    }

    /// The replicator running the workloads (required).
    pub fn replicator(mut self, replicator: Arc<dyn Replicator>) -> Self {
        self.replicator = Some(replicator);
        self
    }

    /// Adds an image store; call once per registry, primary first. Applies pull from
    /// the first store whose copy of the image verifies.
    pub fn image_store(mut self, store: Arc<dyn ImageStore>) -> Self {
        self.stores.push(store);
        self
    }

    /// Period of the full resync over every known service (default 30 s).
    pub fn resync(mut self, every: Duration) -> Self {
        self.config.resync = every;
        self
    }

    /// Per-service retry delay after a failed recovery: starts at `min`, doubles per
    /// consecutive failure up to `max`, with jitter (default 500 ms to 60 s).
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.config.backoff_min = min;
        self.config.backoff_max = max;
        self
    }

    /// Most reconciles running at once (default 8).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.config.concurrency = n;
        self
    }

    /// Events kept for subscribers of [`Supervisor::subscribe`] (default 1,024); a
    /// slower subscriber loses the oldest. The buffer is allocated when the
    /// supervisor is built, so hosts running many supervisors without subscribers
    /// (one per resource) should keep it small.
    pub fn event_buffer(mut self, events: usize) -> Self {
        self.config.event_buffer = events;
        self
    }

    /// How long a successful verification of an image in a store is trusted before
    /// its bytes are pulled and verified again (default 5 min). Presence (`has`) is
    /// checked on every diagnosis regardless.
    pub fn verify_ttl(mut self, ttl: Duration) -> Self {
        self.config.verify_ttl = ttl;
        self
    }

    /// How long a recovery waits, after its actions, for the live workload to match
    /// the record with every replica ready before it reports [`Outcome::Partial`](crate::diagnosis::Outcome::Partial)
    /// instead of [`Outcome::Recovered`](crate::diagnosis::Outcome::Recovered) (default 15 s).
    pub fn settle_timeout(mut self, timeout: Duration) -> Self {
        self.config.settle_timeout = timeout;
        self
    }

    /// Deploys only services whose on-chain owner is one of `owners` (compared
    /// without regard to case); any other record is refused with
    /// [`Error::PermissionDenied`] and nothing is applied for it. Without this, any
    /// account that registers a service id decides what runs.
    pub fn allowed_owners(mut self, owners: impl IntoIterator<Item = Account>) -> Self {
        self.config.allowed_owners = Some(owners.into_iter().collect());
        self
    }

    /// Builds the supervisor; [`Error::InvalidInput`] when the registry or replicator
    /// is missing, the backoff bounds are inverted or zero, or concurrency or resync
    /// is zero.
    pub fn build(self) -> Result<Supervisor> {
        let bad = |reason: &str| Error::from(ValidationError::malformed("supervisor", reason));
        let registry = self.registry.ok_or_else(|| bad("a registry is required"))?;
        let replicator = self
            .replicator
            .ok_or_else(|| bad("a replicator is required"))?;
        let c = &self.config;
        if c.backoff_min.is_zero() || c.backoff_min > c.backoff_max {
            return Err(bad("backoff needs 0 < min <= max"));
        }
        if c.concurrency == 0 {
            return Err(bad("concurrency must be at least 1"));
        }
        if c.resync.is_zero() {
            return Err(bad("resync period must not be zero"));
        }
        if c.event_buffer == 0 {
            return Err(bad("event buffer must hold at least 1 event"));
        }
        let event_buffer = c.event_buffer;
        Ok(Supervisor {
            registry,
            replicator,
            stores: self.stores,
            backoffs: Backoffs::new(self.config.backoff_min, self.config.backoff_max),
            config: self.config,
            records: Mutex::default(),
            verified: Mutex::default(),
            unrepairable: Mutex::default(),
            services: Mutex::default(),
            queue: Queue::default(),
            events: broadcast::channel(event_buffer).0,
            metrics: Mutex::default(),
            change_events: AtomicU64::new(0),
        })
    }
}
