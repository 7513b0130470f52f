//! br2k core: domain types, traits, in-memory backends, conformance suites and the
//! recovery logic of br2k, with no dependency on any backend library.
//!
//! - [`Registry`]: the service registry, the source of truth for what must run.
//! - [`Replicator`]: runs a record as a replicated workload.
//! - [`ImageStore`]: content-addressed, verified image storage.
//! - [`ReplicatedLog`]: an ordered, fenced log with leader election, under the
//!   replica runtime ([`replica`]).
//! - [`Recoverer`]: diagnoses a service and restores it from the record.

pub mod artifact;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod diagnosis;
pub mod digest;
pub mod error;
pub mod failover;
pub mod fault;
pub mod id;
pub mod image;
pub mod log;
pub mod memory;
pub mod observed;
pub mod record;
pub mod recoverer;
pub mod registry;
pub mod replica;
pub mod replicator;
pub mod spec;
pub mod store;
pub mod supervisor;

pub use artifact::{Blob, Descriptor, Image, Manifest};
pub use diagnosis::{ActionOutcome, Diagnosis, Finding, Outcome, RecoveryAction, RecoveryReport};
pub use digest::Digest;
pub use error::{BoxError, Error, ErrorKind, Result, SharedError, ValidationError};
pub use id::ServiceId;
pub use image::{ImageRef, Repository};
pub use log::ReplicatedLog;
pub use observed::{ObservedReplica, ObservedState, WorkloadTemplate};
pub use record::{
    Account, ChangeKind, Checkpoint, Location, Placement, RegistryChange, Role, ServiceRecord,
    ServiceState, VersionInfo, check_cluster_name,
};
pub use recoverer::Recoverer;
pub use registry::{ChangeStream, Registry};
pub use replicator::Replicator;
pub use spec::{Autoscaling, Port, Probe, ProbeCheck, Probes, Resources, SecretEnv, ServiceSpec};
pub use store::{CopyReport, ImageStore};
