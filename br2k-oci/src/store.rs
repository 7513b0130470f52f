//! [`OciImageStore`]: one registry, every read verified, streaming copies.

use std::sync::Arc;

use async_trait::async_trait;
use br2k_core::artifact::{Descriptor, OCI_MANIFEST};
use br2k_core::{CopyReport, Digest, Error, Image, ImageRef, ImageStore, Repository, Result};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt, stream};
use sha2::{Digest as _, Sha256};

use crate::config::{BlobProgress, OciConfig};
use crate::error::is_digest_io;
use crate::index::{ImageIndex, ManifestDoc, parse_manifest_doc};

mod copy;
use crate::transport::{RegistryTransport, RequestCounts};

/// An [`ImageStore`] backed by one OCI (Distribution) registry.
///
/// Every manifest and blob read is checked against its digest and size; a mismatch is
/// [`Error::Tampered`]. Indexes are resolved to the configured platform on
/// [`ImageStore::resolve`] and [`ImageStore::pull`]; [`OciImageStore::copy_image`]
/// copies indexes with all their children, streaming blobs between registries.
#[derive(Debug, Clone)]
pub struct OciImageStore {
    cfg: Arc<OciConfig>,
    http: RegistryTransport,
}

/// A manifest fetched and verified, with its parsed form.
#[derive(Debug, Clone)]
pub struct FetchedDoc {
    /// The digest of `bytes`.
    pub digest: Digest,
    /// The bytes exactly as served.
    pub bytes: Bytes,
    /// The parsed document.
    pub doc: ManifestDoc,
}

impl FetchedDoc {
    fn media_type(&self) -> &str {
        match &self.doc {
            ManifestDoc::Image(m) => m.media_type.as_deref().unwrap_or(OCI_MANIFEST),
            ManifestDoc::Index(i) => i
                .media_type
                .as_deref()
                .unwrap_or(br2k_core::artifact::OCI_INDEX),
        }
    }
}

impl OciImageStore {
    /// A store with the given settings.
    pub fn new(cfg: OciConfig) -> Result<Self> {
        let http = RegistryTransport::new(&cfg)?;
        Ok(Self {
            cfg: Arc::new(cfg),
            http,
        })
    }

    /// A store for a plain-HTTP registry (loopback test registries), anonymous.
    pub fn insecure(registry: &str) -> Result<Self> {
        Self::new(OciConfig::new(registry)?.with_insecure(true))
    }

    /// The settings.
    pub fn config(&self) -> &OciConfig {
        &self.cfg
    }

    /// Requests sent so far by this store (and its clones) to its registry, by HTTP
    /// method, counted per operation issued: a blob `HEAD`, a blob `GET`, a mount
    /// (`POST`), an upload (one `POST` and one `PUT`: oci-client's monolithic push), a
    /// manifest `PUT`, `GET`, `HEAD` or `DELETE`, `GET /v2/` (ping, and once after a
    /// `401` to learn a token realm), each again when retried after a `401`.
    /// Requests to a token server are not counted, nor the `GET /v2/` and token
    /// requests oci-client would make on its own should a handed-over token expire
    /// in its cache first (br2k hands over a fresh one before each call).
    pub fn request_counts(&self) -> RequestCounts {
        self.http.counts()
    }

    /// Fetches a manifest or index by tag or digest. When `reference` is a digest, the
    /// bytes must hash to it ([`Error::Tampered`] otherwise).
    pub async fn fetch_manifest(&self, repo: &Repository, reference: &str) -> Result<FetchedDoc> {
        let expected = if reference.starts_with("sha256:") {
            Some(Digest::parse(reference)?)
        } else {
            ImageRef::new(&self.cfg.registry, repo.clone(), Some(reference), None)?;
            None
        };
        let fetched = self.http.get_manifest(repo, reference).await?;
        let digest = Digest::of(&fetched.bytes);
        if let Some(e) = expected
            && e != digest
        {
            return Err(Error::tampered(format!("manifest {repo}@{e}"), e, digest));
        }
        let doc = parse_manifest_doc(&fetched.bytes, fetched.content_type.as_deref())?;
        Ok(FetchedDoc {
            digest,
            bytes: fetched.bytes,
            doc,
        })
    }

    /// Resolves `tag` to the digest it names, without picking a platform (an index
    /// digest for multi-platform images).
    pub async fn resolve_raw(&self, repo: &Repository, tag: &str) -> Result<Digest> {
        Ok(self.fetch_manifest(repo, tag).await?.digest)
    }

    fn pick<'a>(
        &self,
        idx: &'a ImageIndex,
        digest: &Digest,
    ) -> Result<&'a crate::index::IndexEntry> {
        idx.select(&self.cfg.platform).ok_or_else(|| {
            Error::not_found(format!(
                "platform {} in index {digest} on {}",
                self.cfg.platform, self.cfg.registry
            ))
        })
    }

    /// Fetches the image manifest for `digest`, following an index to the configured
    /// platform. Returns the image manifest document.
    async fn fetch_image_manifest(&self, repo: &Repository, digest: &Digest) -> Result<FetchedDoc> {
        let top = self.fetch_manifest(repo, &digest.to_string()).await?;
        match &top.doc {
            ManifestDoc::Image(_) => Ok(top),
            ManifestDoc::Index(idx) => {
                let entry = self.pick(idx, digest)?;
                let child = self.fetch_manifest(repo, &entry.digest.to_string()).await?;
                if child.bytes.len() as u64 != entry.size {
                    return Err(Error::tampered(
                        format!("manifest {repo}@{} size", entry.digest),
                        entry.size,
                        child.bytes.len(),
                    ));
                }
                match child.doc {
                    ManifestDoc::Image(_) => Ok(child),
                    ManifestDoc::Index(_) => Err(Error::not_supported("nested image indexes")),
                }
            }
        }
    }

    /// Pushes an index whose child manifests are already in `repo`.
    pub async fn push_index(
        &self,
        repo: &Repository,
        index_bytes: Bytes,
        tag: Option<&str>,
    ) -> Result<Digest> {
        let idx = ImageIndex::parse(&index_bytes)?;
        for m in &idx.manifests {
            if self
                .http
                .head_manifest(repo, &m.digest.to_string())
                .await?
                .is_none()
            {
                return Err(Error::not_found(format!(
                    "child manifest {repo}@{}",
                    m.digest
                )));
            }
        }
        let digest = Digest::of(&index_bytes);
        let mt = idx
            .media_type
            .as_deref()
            .unwrap_or(br2k_core::artifact::OCI_INDEX);
        self.http
            .put_manifest(repo, &digest.to_string(), mt, index_bytes.clone())
            .await?;
        if let Some(t) = tag {
            ImageRef::new(&self.cfg.registry, repo.clone(), Some(t), None)?;
            self.http.put_manifest(repo, t, mt, index_bytes).await?;
        }
        Ok(digest)
    }

    /// The config and layer descriptors of image or index `digest` (all children of
    /// an index), each once, manifests verified.
    pub async fn blob_descriptors(
        &self,
        repo: &Repository,
        digest: &Digest,
    ) -> Result<Vec<Descriptor>> {
        let top = self.fetch_manifest(repo, &digest.to_string()).await?;
        let manifests = match top.doc {
            ManifestDoc::Image(m) => vec![m],
            ManifestDoc::Index(idx) => {
                let mut v = Vec::new();
                for e in &idx.manifests {
                    match self.fetch_manifest(repo, &e.digest.to_string()).await?.doc {
                        ManifestDoc::Image(m) => v.push(m),
                        ManifestDoc::Index(_) => {
                            return Err(Error::not_supported("nested image indexes"));
                        }
                    }
                }
                v
            }
        };
        let mut descs: Vec<Descriptor> = Vec::new();
        for d in manifests
            .into_iter()
            .flat_map(|m| std::iter::once(m.config).chain(m.layers))
        {
            if !descs.iter().any(|x| x.digest == d.digest) {
                descs.push(d);
            }
        }
        Ok(descs)
    }

    /// Streams blob `d` through a hasher and checks its digest and size.
    pub async fn verify_blob(&self, repo: &Repository, d: &Descriptor) -> Result<()> {
        let mut body = self.http.get_blob(repo, &d.digest, d.size).await?;
        let mut hasher = Sha256::new();
        let mut n = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                // oci-client's own digest check at the end: br2k's below says more.
                Err(e) if is_digest_io(&e) => break,
                Err(e) => return Err(self.http.conn(e).into()),
            };
            n += chunk.len() as u64;
            if n > d.size {
                break;
            }
            hasher.update(&chunk);
        }
        let actual = Digest::from_bytes(hasher.finalize().into());
        let what = format!("blob {repo}@{} on {}", d.digest, self.cfg.registry);
        if n != d.size {
            return Err(Error::tampered(format!("{what} size"), d.size, n));
        }
        if actual != d.digest {
            return Err(Error::tampered(what, d.digest, actual));
        }
        Ok(())
    }

    /// Verifies the stored image or index `digest` (every child, config and layer),
    /// streaming blobs through a hasher instead of holding them in memory.
    pub async fn verify_streaming(&self, repo: &Repository, digest: &Digest) -> Result<()> {
        let descs = self.blob_descriptors(repo, digest).await?;
        stream::iter(descs)
            .map(|d| async move { self.verify_blob(repo, &d).await })
            .buffer_unordered(self.cfg.concurrency)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// Deletes manifest `digest` (and the tags naming it) from `repo` (registries with
    /// deletion enabled). Absent manifests are not an error.
    pub async fn delete_manifest(&self, repo: &Repository, digest: &Digest) -> Result<()> {
        Ok(self.http.delete_manifest(repo, digest).await?)
    }

    /// Deletes the link of blob `digest` in `repo` (registries with deletion enabled).
    pub async fn delete_blob(&self, repo: &Repository, digest: &Digest) -> Result<()> {
        Ok(self.http.delete_blob(repo, digest).await?)
    }

    /// Puts manifest bytes by digest (and tag), checking they parse.
    pub(crate) async fn put_manifest_bytes(
        &self,
        repo: &Repository,
        bytes: Bytes,
        tag: Option<&str>,
    ) -> Result<Digest> {
        let doc = parse_manifest_doc(&bytes, None)?;
        let fd = FetchedDoc {
            digest: Digest::of(&bytes),
            bytes,
            doc,
        };
        let mt = fd.media_type().to_owned();
        self.http
            .put_manifest(repo, &fd.digest.to_string(), &mt, fd.bytes.clone())
            .await?;
        if let Some(t) = tag {
            ImageRef::new(&self.cfg.registry, repo.clone(), Some(t), None)?;
            self.http.put_manifest(repo, t, &mt, fd.bytes).await?;
        }
        Ok(fd.digest)
    }
}

#[async_trait]
impl ImageStore for OciImageStore {
    fn registry(&self) -> &str {
        &self.cfg.registry
    }

    async fn ping(&self) -> Result<()> {
        Ok(self.http.ping().await?)
    }

    async fn resolve(&self, repository: &Repository, tag: &str) -> Result<Digest> {
        let doc = self.fetch_manifest(repository, tag).await?;
        match &doc.doc {
            ManifestDoc::Image(_) => Ok(doc.digest),
            ManifestDoc::Index(idx) => Ok(self.pick(idx, &doc.digest)?.digest),
        }
    }

    async fn has(&self, repository: &Repository, digest: &Digest) -> Result<bool> {
        Ok(self
            .http
            .head_manifest(repository, &digest.to_string())
            .await?
            .is_some())
    }

    async fn pull(&self, repository: &Repository, digest: &Digest) -> Result<Image> {
        let doc = self.fetch_image_manifest(repository, digest).await?;
        let ManifestDoc::Image(m) = &doc.doc else {
            unreachable!("fetch_image_manifest returns image manifests")
        };
        let descs: Vec<(usize, Descriptor)> = std::iter::once(m.config.clone())
            .chain(m.layers.iter().cloned())
            .enumerate()
            .collect();
        let mut blobs: Vec<(usize, Bytes)> = stream::iter(descs)
            .map(|(i, d)| async move {
                let what = if i == 0 {
                    format!(
                        "config blob {repository}@{} on {}",
                        d.digest, self.cfg.registry
                    )
                } else {
                    format!(
                        "layer {} {repository}@{} on {}",
                        i - 1,
                        d.digest,
                        self.cfg.registry
                    )
                };
                let b = self
                    .http
                    .get_blob_verified(repository, &d.digest, d.size, &what)
                    .await?;
                Ok::<_, Error>((i, b))
            })
            .buffer_unordered(self.cfg.concurrency)
            .try_collect()
            .await?;
        blobs.sort_by_key(|(i, _)| *i);
        let mut it = blobs.into_iter().map(|(_, b)| b);
        let config = it.next().expect("config fetched");
        Image::from_parts(doc.bytes.clone(), Some(&doc.digest), config, it.collect())
    }

    async fn push(
        &self,
        repository: &Repository,
        image: &Image,
        tag: Option<&str>,
    ) -> Result<Digest> {
        if let Some(t) = tag {
            ImageRef::new(&self.cfg.registry, repository.clone(), Some(t), None)?;
        }
        image.verify()?;
        let mut blobs: Vec<br2k_core::Blob> = vec![image.config.clone()];
        for l in &image.layers {
            if !blobs.iter().any(|b| b.digest == l.digest) {
                blobs.push(l.clone());
            }
        }
        stream::iter(blobs)
            .map(|b: br2k_core::Blob| async move {
                let (digest, size) = (b.digest, b.data.len() as u64);
                if self.http.head_blob(repository, &b.digest).await? {
                    self.cfg.report(BlobProgress::Skipped { digest, size });
                } else {
                    self.cfg.report(BlobProgress::Started { digest, size });
                    self.http
                        .upload_bytes(repository, &b.digest, b.data)
                        .await?;
                    self.cfg.report(BlobProgress::Done { digest, size });
                }
                Ok::<_, Error>(())
            })
            .buffer_unordered(self.cfg.concurrency)
            .try_collect::<Vec<()>>()
            .await?;
        let mt = image.manifest.media_type.as_deref().unwrap_or(OCI_MANIFEST);
        self.http
            .put_manifest(
                repository,
                &image.digest.to_string(),
                mt,
                image.manifest_bytes.clone(),
            )
            .await?;
        if let Some(t) = tag {
            self.http
                .put_manifest(repository, t, mt, image.manifest_bytes.clone())
                .await?;
        }
        Ok(image.digest)
    }

    async fn verify(&self, repository: &Repository, digest: &Digest) -> Result<()> {
        self.verify_streaming(repository, digest).await
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }

    /// Between two OCI stores: the streamed copy ([`OciImageStore::copy_image`]),
    /// whose memory does not grow with the image. To another kind of store: the
    /// default (pull, then push).
    async fn copy_to(
        &self,
        repository: &Repository,
        digest: &Digest,
        target: &dyn ImageStore,
    ) -> Result<CopyReport> {
        match target
            .as_any()
            .and_then(|t| t.downcast_ref::<OciImageStore>())
        {
            Some(oci) => self.copy_image(repository, digest, oci).await,
            None => br2k_core::store::copy_by_pull(self, repository, digest, target).await,
        }
    }
}
