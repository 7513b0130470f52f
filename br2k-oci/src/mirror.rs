//! [`MirroredImageStore`]: a primary registry and mirrors, with failover and repair.

use async_trait::async_trait;
use br2k_core::{CopyReport, Digest, Error, Image, ImageStore, Repository, Result};
use futures::future::join_all;
use parking_lot::Mutex;

use crate::store::OciImageStore;

/// Why a registry was passed over during a pull.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The registry host.
    pub registry: String,
    /// The error kind (`unavailable`, `not_found`, `tampered`...).
    pub kind: br2k_core::ErrorKind,
    /// The error message.
    pub reason: String,
}

/// Which registry served a pull and why earlier ones were skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullReport {
    /// The registry whose bytes were returned.
    pub served_by: String,
    /// Registries tried first, in order, with the reason they were skipped.
    pub skipped: Vec<Skipped>,
}

/// What `repair` found and did for one registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RepairStatus {
    /// The image was complete and correct.
    Healthy,
    /// The image was missing or wrong and has been re-copied; it verifies now.
    Repaired {
        /// What was wrong before (error kind and message).
        was: String,
        /// What the copy transferred.
        copy: CopyReport,
    },
    /// The image is still missing or wrong after the repair attempt.
    Failed {
        /// What was wrong before.
        was: String,
        /// Why the repair did not fix it.
        reason: String,
    },
}

/// The outcome of [`MirroredImageStore::repair`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepairReport {
    /// The image digest.
    pub digest: Digest,
    /// The registry whose verified copy was used as the source.
    pub source: String,
    /// Per registry, in configuration order.
    pub registries: Vec<(String, RepairStatus)>,
}

impl RepairReport {
    /// Whether every registry holds a verified copy now.
    pub fn all_healthy(&self) -> bool {
        self.registries
            .iter()
            .all(|(_, s)| !matches!(s, RepairStatus::Failed { .. }))
    }
}

/// A primary registry and N mirrors behind one [`ImageStore`].
///
/// Reads go to the first registry that serves the digest with correct bytes
/// (failing over on unavailable, missing or tampered content); writes go to all
/// registries and succeed when at least `quorum` of them succeed.
#[derive(Debug)]
pub struct MirroredImageStore {
    stores: Vec<OciImageStore>,
    quorum: usize,
    last_pull: Mutex<Option<PullReport>>,
}

fn failover(e: &Error) -> bool {
    matches!(
        e,
        Error::Unavailable { .. } | Error::NotFound { .. } | Error::Tampered { .. }
    ) || e.is_retryable()
}

impl MirroredImageStore {
    /// A primary and its mirrors; the quorum defaults to all registries.
    pub fn new(primary: OciImageStore, mirrors: Vec<OciImageStore>) -> Self {
        let mut stores = vec![primary];
        stores.extend(mirrors);
        let quorum = stores.len();
        Self {
            stores,
            quorum,
            last_pull: Mutex::new(None),
        }
    }

    /// Sets how many registries must accept a write (clamped to 1..=registries).
    pub fn with_quorum(mut self, quorum: usize) -> Self {
        self.quorum = quorum.clamp(1, self.stores.len());
        self
    }

    /// The registries, primary first.
    pub fn stores(&self) -> &[OciImageStore] {
        &self.stores
    }

    /// The report of the last successful [`ImageStore::pull`].
    pub fn last_pull(&self) -> Option<PullReport> {
        self.last_pull.lock().clone()
    }

    /// Pulls `digest` from the first registry that serves it correctly.
    pub async fn pull_detailed(
        &self,
        repo: &Repository,
        digest: &Digest,
    ) -> Result<(Image, PullReport)> {
        let mut skipped = Vec::new();
        let mut last: Option<Error> = None;
        for s in &self.stores {
            match s.pull(repo, digest).await {
                Ok(img) => {
                    let report = PullReport {
                        served_by: s.registry().to_owned(),
                        skipped,
                    };
                    *self.last_pull.lock() = Some(report.clone());
                    return Ok((img, report));
                }
                Err(e) if failover(&e) => {
                    tracing::warn!(registry = s.registry(), error = %e, "pull failed over");
                    skipped.push(Skipped {
                        registry: s.registry().to_owned(),
                        kind: e.kind(),
                        reason: e.to_string(),
                    });
                    last = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(combine(skipped, last))
    }

    /// Copies `digest` from `source` to every registry (streaming), requiring the quorum.
    pub async fn mirror_from(
        &self,
        source: &OciImageStore,
        repo: &Repository,
        digest: &Digest,
    ) -> Result<Vec<(String, Result<CopyReport>)>> {
        let results = join_all(
            self.stores
                .iter()
                .map(|t| source.copy_image(repo, digest, t)),
        )
        .await;
        self.quorum_of(results)
    }

    /// Copies `digest` from the first registry holding it to all others (streaming).
    pub async fn sync(
        &self,
        repo: &Repository,
        digest: &Digest,
    ) -> Result<Vec<(String, Result<CopyReport>)>> {
        let source = self.find_source(repo, digest).await?;
        self.mirror_from(&self.stores[source], repo, digest).await
    }

    fn quorum_of<T>(&self, results: Vec<Result<T>>) -> Result<Vec<(String, Result<T>)>> {
        let ok = results.iter().filter(|r| r.is_ok()).count();
        let named: Vec<(String, Result<T>)> = self
            .stores
            .iter()
            .map(|s| s.registry().to_owned())
            .zip(results)
            .collect();
        if ok >= self.quorum {
            return Ok(named);
        }
        let detail: Vec<String> = named
            .iter()
            .filter_map(|(r, e)| e.as_ref().err().map(|e| format!("{r}: {e}")))
            .collect();
        let msg = format!(
            "{ok} of {} registries succeeded, quorum {}: {}",
            self.stores.len(),
            self.quorum,
            detail.join("; ")
        );
        let mut errors: Vec<Error> = named.into_iter().filter_map(|(_, r)| r.err()).collect();
        let same_kind = errors.iter().all(|e| e.kind() == errors[0].kind());
        Err(if same_kind && !errors[0].is_retryable() {
            // Every registry refused it for the same reason (bad input, tampered...).
            errors.swap_remove(0)
        } else if errors.iter().all(Error::is_retryable) {
            Error::unavailable(msg)
        } else {
            Error::backend("oci", msg, false)
        })
    }

    /// Index of the first registry holding a verified copy of `digest`.
    async fn find_source(&self, repo: &Repository, digest: &Digest) -> Result<usize> {
        let mut skipped = Vec::new();
        let mut last = None;
        for (i, s) in self.stores.iter().enumerate() {
            match s.verify_streaming(repo, digest).await {
                Ok(()) => return Ok(i),
                Err(e) => {
                    skipped.push(Skipped {
                        registry: s.registry().to_owned(),
                        kind: e.kind(),
                        reason: e.to_string(),
                    });
                    last = Some(e);
                }
            }
        }
        Err(combine(skipped, last))
    }

    /// Verifies `digest` on every registry and re-copies it (streaming, from a
    /// verified copy) to each registry that lacks it or serves wrong bytes. Blobs that
    /// verify wrong are deleted from the damaged repository before the copy.
    pub async fn repair(&self, repo: &Repository, digest: &Digest) -> Result<RepairReport> {
        let checks = join_all(self.stores.iter().map(|s| s.verify_streaming(repo, digest))).await;
        let source = match checks.iter().position(|c| c.is_ok()) {
            Some(i) => i,
            None => {
                let skipped = self
                    .stores
                    .iter()
                    .zip(&checks)
                    .map(|(s, c)| {
                        let e = c.as_ref().expect_err("all failed");
                        Skipped {
                            registry: s.registry().to_owned(),
                            kind: e.kind(),
                            reason: e.to_string(),
                        }
                    })
                    .collect();
                return Err(combine(skipped, None));
            }
        };
        let src = &self.stores[source];
        let mut registries = Vec::new();
        for (s, check) in self.stores.iter().zip(checks) {
            let status = match check {
                Ok(()) => RepairStatus::Healthy,
                Err(e) => {
                    let was = format!("{}: {e}", e.kind());
                    if matches!(e, Error::Tampered { .. }) {
                        self.drop_bad_blobs(src, s, repo, digest).await;
                    }
                    match src.copy_image(repo, digest, s).await {
                        Err(ce) => RepairStatus::Failed {
                            was,
                            reason: ce.to_string(),
                        },
                        Ok(copy) => match s.verify_streaming(repo, digest).await {
                            Ok(()) => RepairStatus::Repaired { was, copy },
                            Err(ve) => RepairStatus::Failed {
                                was,
                                reason: format!("still wrong after re-copy: {ve}"),
                            },
                        },
                    }
                }
            };
            registries.push((s.registry().to_owned(), status));
        }
        Ok(RepairReport {
            digest: *digest,
            source: src.registry().to_owned(),
            registries,
        })
    }

    /// Deletes from `bad` every blob of the image that does not verify there.
    async fn drop_bad_blobs(
        &self,
        good: &OciImageStore,
        bad: &OciImageStore,
        repo: &Repository,
        digest: &Digest,
    ) {
        let Ok(descs) = good.blob_descriptors(repo, digest).await else {
            return;
        };
        for d in descs {
            if bad.verify_blob(repo, &d).await.is_err() {
                tracing::warn!(registry = bad.registry(), blob = %d.digest, "deleting bad blob before repair");
                let _ = bad.delete_blob(repo, &d.digest).await;
            }
        }
    }
}

fn combine(skipped: Vec<Skipped>, last: Option<Error>) -> Error {
    let detail: Vec<String> = skipped
        .iter()
        .map(|s| format!("{}: {}", s.registry, s.reason))
        .collect();
    let msg = format!("no registry served a correct copy: {}", detail.join("; "));
    let kinds: Vec<br2k_core::ErrorKind> = skipped.iter().map(|s| s.kind).collect();
    if kinds
        .iter()
        .all(|k| *k == br2k_core::ErrorKind::Unavailable)
    {
        Error::unavailable(msg)
    } else if kinds.contains(&br2k_core::ErrorKind::Tampered) {
        match last {
            Some(Error::Tampered {
                what,
                expected,
                actual,
            }) => Error::Tampered {
                what,
                expected,
                actual,
            },
            _ => Error::tampered(msg, "verified content", "no correct copy"),
        }
    } else if kinds
        .iter()
        .all(|k| *k == br2k_core::ErrorKind::NotFound || *k == br2k_core::ErrorKind::Unavailable)
    {
        Error::not_found(msg)
    } else {
        last.unwrap_or_else(|| Error::unavailable(msg))
    }
}

#[async_trait]
impl ImageStore for MirroredImageStore {
    fn registry(&self) -> &str {
        self.stores[0].registry()
    }

    async fn ping(&self) -> Result<()> {
        let mut last = None;
        for s in &self.stores {
            match s.ping().await {
                Ok(()) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("at least one store"))
    }

    async fn resolve(&self, repository: &Repository, tag: &str) -> Result<Digest> {
        let mut last = None;
        for s in &self.stores {
            match s.resolve(repository, tag).await {
                Ok(d) => return Ok(d),
                Err(e) if failover(&e) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("at least one store"))
    }

    async fn has(&self, repository: &Repository, digest: &Digest) -> Result<bool> {
        let mut last = None;
        let mut answered = false;
        for s in &self.stores {
            match s.has(repository, digest).await {
                Ok(true) => return Ok(true),
                Ok(false) => answered = true,
                Err(e) => last = Some(e),
            }
        }
        match last {
            Some(e) if !answered => Err(e),
            _ => Ok(false),
        }
    }

    async fn pull(&self, repository: &Repository, digest: &Digest) -> Result<Image> {
        self.pull_detailed(repository, digest).await.map(|(i, _)| i)
    }

    async fn push(
        &self,
        repository: &Repository,
        image: &Image,
        tag: Option<&str>,
    ) -> Result<Digest> {
        image.verify()?;
        let results = join_all(self.stores.iter().map(|s| s.push(repository, image, tag))).await;
        self.quorum_of(results)?;
        Ok(image.digest)
    }

    async fn verify(&self, repository: &Repository, digest: &Digest) -> Result<()> {
        self.find_source(repository, digest).await.map(drop)
    }
}
