//! Kubernetes replicator and drift detection for br2k.
//!
//! [`KubeReplicator`] implements [`br2k_core::Replicator`] with kube and k8s-openapi:
//! every service record becomes a StatefulSet (stable identities, image pinned by
//! digest, replicas spread across nodes, probes, resources, environment from a
//! ConfigMap and Secrets), a headless and a client Service, a PodDisruptionBudget
//! keeping a quorum, and a ConfigMap that owns all of them. Everything is written with
//! server-side apply under the one field manager `br2k`.
//!
//! [`br2k_core::Replicator::observe`] never trusts br2k's own annotations: it rebuilds
//! the template from the live pod template and ConfigMap, and replica health from pod
//! and node status, so the core supervisor can tell each drift class apart (object
//! missing, replicas changed, image changed, template tampered, pods unhealthy).
//!
//! Image digests: the digest a replica runs is taken from the container status
//! `imageID` when the runtime reports one with a digest; otherwise (e.g. on kwok's
//! simulated nodes, which run no container runtime) from the digest the pod's own spec
//! pins its image to.

pub mod build;
mod error;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod names;
pub mod ownership;
pub mod parse;
mod replicator;
pub mod watch;

pub use build::Placement;
pub use names::Names;
pub use replicator::{KubeReplicator, KubeReplicatorBuilder, NAMESPACE_ENV};

/// Installs the aws-lc-rs rustls crypto provider as the process default, if none is
/// installed yet. Needed when several TLS users (kube, reqwest, alloy) link rustls
/// with different providers; harmless otherwise.
pub fn install_crypto_provider() {
    // Err means a provider is installed already: fine.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
