//! The generic recoverer: decision logic and the supervision loop.
//!
//! - [`diagnose`] and [`plan`]: pure functions from a record, the live state and the
//!   image health in each registry to findings and recovery actions.
//! - [`Supervisor`]: the [`crate::Recoverer`] over a [`crate::Registry`], a
//!   [`crate::Replicator`] and one or more [`crate::ImageStore`]s, with an
//!   event-driven loop ([`Supervisor::run`]).
//!
//! ```
//! # use std::sync::Arc;
//! # use std::time::Duration;
//! # use br2k_core::memory::{InMemoryImageStore, InMemoryRegistry, InMemoryReplicator};
//! # use br2k_core::supervisor::Supervisor;
//! let supervisor = Supervisor::builder()
//!     .registry(Arc::new(InMemoryRegistry::new("operator")))
//!     .replicator(Arc::new(InMemoryReplicator::new()))
//!     .image_store(Arc::new(InMemoryImageStore::new("primary.local")))
//!     .image_store(Arc::new(InMemoryImageStore::new("mirror.local")))
//!     .resync(Duration::from_secs(10))
//!     .backoff(Duration::from_millis(200), Duration::from_secs(30))
//!     .build()
//!     .unwrap();
//! assert_eq!(supervisor.registries(), ["primary.local", "mirror.local"]);
//! ```

mod builder;
mod decide;
mod engine;
mod gather;
mod queue;
mod run;

pub use builder::SupervisorBuilder;
pub use decide::{ImageHealth, ImageStatus, converged, diagnose, is_workload_finding, plan};
pub use engine::{Supervisor, SupervisorEvent, SupervisorMetrics};
