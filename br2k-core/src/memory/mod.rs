//! In-memory implementations of every trait, always compiled: host applications and
//! tests run br2k with them, and break them on purpose through their test controls.
//!
//! - [`InMemoryRegistry`]: the service registry, with accounts and roles.
//! - [`InMemoryReplicator`]: workloads whose replicas are ready at once.
//! - [`InMemoryImageStore`]: a verified, content-addressed image registry.

mod image_store;
mod registry;
mod replicator;

pub use image_store::InMemoryImageStore;
pub use registry::InMemoryRegistry;
pub use replicator::InMemoryReplicator;
