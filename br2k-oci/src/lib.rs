//! Digest-verified, mirrored OCI image store for br2k.
//!
//! - [`OciImageStore`]: one OCI (Distribution) registry behind
//!   [`br2k_core::ImageStore`]; every read is verified against its digest, indexes
//!   resolve to a platform, copies stream blobs between registries in parallel and
//!   skip what the target has, and image layouts (directory or tarball) can be pushed.
//! - [`MirroredImageStore`]: a primary and mirrors with failover reads, quorum writes
//!   and [`MirroredImageStore::repair`].
//! - [`ImageBuilder`]: packs files into a reproducible single-layer image without a
//!   container engine.

pub mod auth;
mod builder;
mod client;
mod config;
mod error;
pub mod index;
mod layout;
mod mirror;
mod store;

pub use builder::ImageBuilder;
pub use client::RequestCounts;
pub use config::{Auth, OciConfig, PlatformSpec, Secret};
pub use index::{ImageIndex, IndexEntry, ManifestDoc, Platform, parse_manifest_doc};
pub use layout::{REF_NAME, write_layout};
pub use mirror::{MirroredImageStore, PullReport, RepairReport, RepairStatus, Skipped};
pub use store::{FetchedDoc, OciImageStore};
