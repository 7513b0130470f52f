//! The operator's own OCI image, built from its release binary with br2k-oci's
//! builder (no Docker): one layer holding `/usr/local/bin/br2k-operator`, which is the
//! entrypoint. `br2k-operator push-image` (see `scripts/operator-image`) builds it
//! from its own executable and pushes it to every given registry.

use std::path::Path;

use br2k_core::{Digest, ImageStore, Repository, Result};
use br2k_oci::{ImageBuilder, OciImageStore};

/// Where the binary lives in the image.
pub const BINARY_PATH: &str = "usr/local/bin/br2k-operator";

/// The repository the image is pushed to.
pub const REPOSITORY: &str = "br2k/operator";

/// Builds the image from the operator binary at `binary` (statically or dynamically
/// linked; a dynamic one needs a base with its libraries at run time).
pub fn build(binary: &Path) -> Result<br2k_core::Image> {
    ImageBuilder::new()
        .file_from_disk(BINARY_PATH, binary, 0o755)?
        .entrypoint([format!("/{BINARY_PATH}")])
        .label("org.opencontainers.image.title", "br2k-operator")
        .label(
            "org.opencontainers.image.version",
            env!("CARGO_PKG_VERSION"),
        )
        .build()
}

/// Builds the image from `binary` and pushes it, tagged `tag`, to each registry
/// (plain HTTP when `insecure`); returns its digest. The pushes are verified: each
/// registry's copy is read back and checked against the digest.
pub async fn push(
    binary: &Path,
    registries: &[String],
    tag: &str,
    insecure: bool,
) -> Result<Digest> {
    let image = build(binary)?;
    let repository = Repository::new(REPOSITORY)?;
    for host in registries {
        let cfg = br2k_oci::OciConfig::new(host.clone())?.with_insecure(insecure);
        let store = OciImageStore::new(cfg)?;
        store.push(&repository, &image, Some(tag)).await?;
        store.verify(&repository, &image.digest).await?;
    }
    Ok(image.digest)
}
