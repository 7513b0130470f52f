//! [`InMemoryImageStore`]: a content-addressed image registry in process memory.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;

use crate::artifact::{Image, Manifest};
use crate::digest::Digest;
use crate::error::{Error, Result, ValidationError, truncate};
use crate::image::{Repository, valid_tag};
use crate::store::ImageStore;

/// An image registry in memory: manifests and blobs stored by digest per repository,
/// plus tags. Pulls verify every digest, so corrupted content is
/// [`Error::Tampered`], never returned.
///
/// Clones share the same content. Test controls: [`InMemoryImageStore::corrupt_blob`],
/// [`InMemoryImageStore::remove_image`] and [`InMemoryImageStore::request_count`].
#[derive(Debug, Clone)]
pub struct InMemoryImageStore {
    registry: String,
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    repos: Mutex<BTreeMap<Repository, Repo>>,
    requests: AtomicU64,
}

#[derive(Debug, Default)]
struct Repo {
    manifests: HashMap<Digest, Bytes>,
    blobs: HashMap<Digest, Bytes>,
    tags: BTreeMap<String, Digest>,
}

fn check_tag(tag: &str) -> Result<()> {
    if valid_tag(tag) {
        Ok(())
    } else {
        Err(ValidationError::ImageRef {
            value: truncate(tag),
            reason: "tag must match [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}",
        }
        .into())
    }
}

fn flip(bytes: &Bytes) -> Bytes {
    let mut v = bytes.to_vec();
    match v.first_mut() {
        Some(b) => *b ^= 0xff,
        None => v.push(0),
    }
    Bytes::from(v)
}

impl InMemoryImageStore {
    /// An empty store answering as registry host `registry` (e.g. `"mem.local"`).
    pub fn new(registry: &str) -> Self {
        Self {
            registry: registry.to_owned(),
            shared: Arc::default(),
        }
    }

    /// How many trait calls this store (and its clones) answered.
    pub fn request_count(&self) -> u64 {
        self.shared.requests.load(Ordering::Relaxed)
    }

    fn request(&self) -> MutexGuard<'_, BTreeMap<Repository, Repo>> {
        self.shared.requests.fetch_add(1, Ordering::Relaxed);
        self.shared.repos.lock()
    }

    /// Flips the first byte of everything stored under `digest` (manifest, config or
    /// layer, in every repository), so it no longer matches its digest.
    /// [`Error::NotFound`] when nothing is stored under it.
    pub fn corrupt_blob(&self, digest: &Digest) -> Result<()> {
        let mut repos = self.shared.repos.lock();
        let mut found = false;
        for repo in repos.values_mut() {
            for map in [&mut repo.manifests, &mut repo.blobs] {
                if let Some(bytes) = map.get_mut(digest) {
                    *bytes = flip(bytes);
                    found = true;
                }
            }
        }
        if found {
            Ok(())
        } else {
            Err(Error::not_found(format!("content {digest}")))
        }
    }

    /// Forgets the manifest `digest` in `repository` (and tags pointing to it); its
    /// blobs stay. [`Error::NotFound`] when it is not stored.
    pub fn remove_image(&self, repository: &Repository, digest: &Digest) -> Result<()> {
        let mut repos = self.shared.repos.lock();
        let repo = repos
            .get_mut(repository)
            .filter(|r| r.manifests.contains_key(digest))
            .ok_or_else(|| Error::not_found(format!("manifest {repository}@{digest}")))?;
        repo.manifests.remove(digest);
        repo.tags.retain(|_, d| d != digest);
        Ok(())
    }
}

#[async_trait]
impl ImageStore for InMemoryImageStore {
    fn registry(&self) -> &str {
        &self.registry
    }

    async fn ping(&self) -> Result<()> {
        drop(self.request());
        Ok(())
    }

    async fn resolve(&self, repository: &Repository, tag: &str) -> Result<Digest> {
        let repos = self.request();
        check_tag(tag)?;
        repos
            .get(repository)
            .and_then(|r| r.tags.get(tag))
            .copied()
            .ok_or_else(|| Error::not_found(format!("tag {repository}:{tag}")))
    }

    async fn has(&self, repository: &Repository, digest: &Digest) -> Result<bool> {
        Ok(self
            .request()
            .get(repository)
            .is_some_and(|r| r.manifests.contains_key(digest)))
    }

    async fn pull(&self, repository: &Repository, digest: &Digest) -> Result<Image> {
        let (manifest_bytes, config, layers) = {
            let repos = self.request();
            let repo = repos.get(repository);
            let manifest_bytes = repo
                .and_then(|r| r.manifests.get(digest))
                .cloned()
                .ok_or_else(|| Error::not_found(format!("manifest {repository}@{digest}")))?;
            // Verify before parsing: corrupted bytes are tampering, not bad input.
            digest.verify("manifest", &manifest_bytes)?;
            let manifest = Manifest::parse(&manifest_bytes)?;
            let blob = |d: &Digest| {
                repo.and_then(|r| r.blobs.get(d))
                    .cloned()
                    .ok_or_else(|| Error::not_found(format!("blob {repository}@{d}")))
            };
            let config = blob(&manifest.config.digest)?;
            let layers = manifest
                .layers
                .iter()
                .map(|l| blob(&l.digest))
                .collect::<Result<Vec<_>>>()?;
            (manifest_bytes, config, layers)
        };
        Image::from_parts(manifest_bytes, Some(digest), config, layers)
    }

    async fn push(
        &self,
        repository: &Repository,
        image: &Image,
        tag: Option<&str>,
    ) -> Result<Digest> {
        let mut repos = self.request();
        if let Some(t) = tag {
            check_tag(t)?;
        }
        // The fields are public: never store content that does not match its digests.
        image.verify()?;
        let repo = repos.entry(repository.clone()).or_default();
        // Content is verified, so overwriting also repairs corrupted copies.
        for blob in std::iter::once(&image.config).chain(&image.layers) {
            repo.blobs.insert(blob.digest, blob.data.clone());
        }
        repo.manifests
            .insert(image.digest, image.manifest_bytes.clone());
        if let Some(t) = tag {
            repo.tags.insert(t.to_owned(), image.digest);
        }
        Ok(image.digest)
    }
}
