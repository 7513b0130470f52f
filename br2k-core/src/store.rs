//! The image store trait: content-addressed, verified image storage.

use std::fmt::Debug;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::artifact::Image;
use crate::digest::Digest;
use crate::error::Result;
use crate::image::Repository;

/// What a copy transferred.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyReport {
    /// Blobs sent.
    pub blobs_copied: u64,
    /// Blobs the target already had.
    pub blobs_skipped: u64,
    /// Bytes sent.
    pub bytes_copied: u64,
    /// Whether the manifest was written (false when the target already had it).
    pub manifest_written: bool,
}

/// Content-addressed storage of images in one registry.
///
/// Every read is verified: bytes that do not match their digest are
/// [`crate::Error::Tampered`], never returned. An unreachable registry is
/// [`crate::Error::Unavailable`].
#[async_trait]
pub trait ImageStore: Send + Sync + Debug {
    /// The registry host this store talks to (as used in image references).
    fn registry(&self) -> &str;

    /// Checks that the registry answers.
    async fn ping(&self) -> Result<()>;

    /// Resolves `tag` to the manifest digest it points to now.
    async fn resolve(&self, repository: &Repository, tag: &str) -> Result<Digest>;

    /// Whether the manifest `digest` exists in `repository` (no content check).
    async fn has(&self, repository: &Repository, digest: &Digest) -> Result<bool>;

    /// Pulls manifest, config and layers, verifying every digest.
    /// [`crate::Error::NotFound`] when the manifest is absent.
    async fn pull(&self, repository: &Repository, digest: &Digest) -> Result<Image>;

    /// Pushes `image` (blobs first, then the manifest), optionally tagging it.
    /// Idempotent: existing blobs are skipped. Returns the manifest digest.
    async fn push(
        &self,
        repository: &Repository,
        image: &Image,
        tag: Option<&str>,
    ) -> Result<Digest>;

    /// Verifies that the stored image `digest` is complete and correct.
    async fn verify(&self, repository: &Repository, digest: &Digest) -> Result<()> {
        self.pull(repository, digest).await.map(drop)
    }

    /// This store as [`std::any::Any`], so that an implementation's
    /// [`ImageStore::copy_to`] can recognise a target of its own kind and stream
    /// between them instead of holding the image in memory. `None` by default.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }

    /// Copies image `digest` to `target`, skipping content the target has.
    /// Idempotent: a second copy transfers nothing. The default pulls the whole image
    /// into memory and pushes it; backends override it to stream.
    async fn copy_to(
        &self,
        repository: &Repository,
        digest: &Digest,
        target: &dyn ImageStore,
    ) -> Result<CopyReport> {
        copy_by_pull(self, repository, digest, target).await
    }
}

/// The generic copy: unless `target` already holds a copy that verifies, pulls the
/// whole image from `source` (verified) into memory and pushes it to `target`.
pub async fn copy_by_pull<S: ImageStore + ?Sized>(
    source: &S,
    repository: &Repository,
    digest: &Digest,
    target: &dyn ImageStore,
) -> Result<CopyReport> {
    if target.has(repository, digest).await? && target.verify(repository, digest).await.is_ok() {
        return Ok(CopyReport::default());
    }
    let image = source.pull(repository, digest).await?;
    target.push(repository, &image, None).await?;
    Ok(CopyReport {
        blobs_copied: 1 + image.layers.len() as u64,
        blobs_skipped: 0,
        bytes_copied: image.size() + image.manifest_bytes.len() as u64,
        manifest_written: true,
    })
}
