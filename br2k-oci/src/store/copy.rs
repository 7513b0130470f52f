//! Streamed copies of [`OciImageStore`]: images and indexes between registries (or
//! repositories), blobs hashed and checked on their way from the source download into
//! the target upload.

use std::sync::Arc;

use br2k_core::artifact::Descriptor;
use br2k_core::{CopyReport, Digest, Error, Repository, Result};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{Stream, StreamExt, TryStreamExt, stream};
use parking_lot::Mutex;
use sha2::{Digest as _, Sha256};

use super::OciImageStore;
use crate::config::BlobProgress;
use crate::error::{OciError, is_digest_io};
use crate::index::ManifestDoc;
use crate::transport::Need;

impl OciImageStore {
    /// Copies image or index `digest` from `repo` here to the same repository in
    /// `target`, streaming blobs (see [`OciImageStore::copy_image_to`]).
    pub async fn copy_image(
        &self,
        repo: &Repository,
        digest: &Digest,
        target: &OciImageStore,
    ) -> Result<CopyReport> {
        self.copy_image_to(repo, digest, target, repo).await
    }

    /// Copies image or index `digest` from `repo` to `target_repo` in `target`.
    ///
    /// Blobs stream from the source GET into the target upload and are hashed on the
    /// way (a mismatch aborts the upload and is [`Error::Tampered`]); up to
    /// `concurrency` blobs move at once; blobs the target has (HEAD) are skipped;
    /// within one registry blobs are mounted across repositories. Manifests are written
    /// last, so an interrupted copy leaves no dangling manifest and re-running it
    /// transfers only what is missing. An unchanged image costs one manifest GET here
    /// and only HEAD requests on the target.
    pub async fn copy_image_to(
        &self,
        repo: &Repository,
        digest: &Digest,
        target: &OciImageStore,
        target_repo: &Repository,
    ) -> Result<CopyReport> {
        self.copy_manifest(repo, digest, None, target, target_repo)
            .await
    }

    fn copy_manifest<'a>(
        &'a self,
        repo: &'a Repository,
        digest: &'a Digest,
        expected_size: Option<u64>,
        target: &'a OciImageStore,
        target_repo: &'a Repository,
    ) -> BoxFuture<'a, Result<CopyReport>> {
        Box::pin(async move {
            let d_str = digest.to_string();
            let doc = self.fetch_manifest(repo, &d_str).await?;
            if let Some(s) = expected_size
                && s != doc.bytes.len() as u64
            {
                return Err(Error::tampered(
                    format!("manifest {repo}@{digest} size"),
                    s,
                    doc.bytes.len(),
                ));
            }
            // Whether the target has the manifest matters only at the end: ask while
            // the blobs move.
            let present = target.http.head_manifest(target_repo, &d_str);
            let blobs = async {
                let mut report = CopyReport::default();
                match &doc.doc {
                    ManifestDoc::Index(idx) => {
                        for e in &idx.manifests {
                            let r = self
                                .copy_manifest(repo, &e.digest, Some(e.size), target, target_repo)
                                .await?;
                            add(&mut report, &r);
                        }
                    }
                    ManifestDoc::Image(m) => {
                        let mut descs = vec![m.config.clone()];
                        for l in &m.layers {
                            if !descs.iter().any(|d| d.digest == l.digest) {
                                descs.push(l.clone());
                            }
                        }
                        let outcomes: Vec<BlobOutcome> = stream::iter(descs)
                            .map(|d| self.copy_blob(repo, d, target, target_repo))
                            .buffer_unordered(self.cfg.concurrency.min(target.cfg.concurrency))
                            .try_collect()
                            .await?;
                        for o in outcomes {
                            match o {
                                BlobOutcome::Skipped => report.blobs_skipped += 1,
                                BlobOutcome::Mounted => report.blobs_copied += 1,
                                BlobOutcome::Copied(n) => {
                                    report.blobs_copied += 1;
                                    report.bytes_copied += n;
                                }
                            }
                        }
                    }
                }
                Ok::<_, Error>(report)
            };
            let (present, report) = futures::future::join(present, blobs).await;
            let mut report = report?;
            if present?.is_none() {
                target
                    .http
                    .put_manifest(target_repo, &d_str, doc.media_type(), doc.bytes.clone())
                    .await?;
                report.manifest_written = true;
                report.bytes_copied += doc.bytes.len() as u64;
            }
            Ok(report)
        })
    }

    async fn copy_blob(
        &self,
        repo: &Repository,
        d: Descriptor,
        target: &OciImageStore,
        target_repo: &Repository,
    ) -> Result<BlobOutcome> {
        let (digest, size) = (d.digest, d.size);
        if target.http.head_blob(target_repo, &d.digest).await? {
            target.cfg.report(BlobProgress::Skipped { digest, size });
            return Ok(BlobOutcome::Skipped);
        }
        let same_registry = self.cfg.registry == target.cfg.registry && repo != target_repo;
        if same_registry && target.http.mount(target_repo, &d.digest, repo).await? {
            target.cfg.report(BlobProgress::Skipped { digest, size });
            return Ok(BlobOutcome::Mounted);
        }
        let what = format!("blob {repo}@{} from {}", d.digest, self.cfg.registry);
        let mut retried = false;
        target.cfg.report(BlobProgress::Started { digest, size });
        loop {
            let src = self.http.get_blob(repo, &d.digest, d.size).await?;
            let progress = target.cfg.progress.clone();
            let src = src.inspect(move |chunk| {
                if let (Some(p), Ok(b)) = (&progress, chunk) {
                    (p.0)(BlobProgress::Bytes {
                        digest,
                        bytes: b.len() as u64,
                    });
                }
            });
            let (body, verdict) = verified_body(src, d.digest, d.size, what.clone());
            let res = target
                .http
                .upload_stream(target_repo, &d.digest, d.size, body)
                .await;
            if let Some(e) = verdict.lock().take() {
                return Err(e.into());
            }
            match res {
                Ok(()) => {
                    target.cfg.report(BlobProgress::Done { digest, size });
                    return Ok(BlobOutcome::Copied(d.size));
                }
                // A refused token: a new one, and the blob once more from the source.
                Err(e)
                    if !retried && target.http.retry_after(&e, Need::Push(target_repo)).await? =>
                {
                    retried = true;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Uploads a blob from a byte stream, hashing it on the way; used by layouts.
    pub(crate) async fn upload_stream<S, E>(
        &self,
        repo: &Repository,
        d: &Descriptor,
        src: S,
        what: String,
    ) -> Result<bool>
    where
        S: Stream<Item = std::result::Result<Bytes, E>> + Send + 'static,
        E: std::error::Error + Send + Sync + 'static,
    {
        if self.http.head_blob(repo, &d.digest).await? {
            return Ok(false);
        }
        let (body, verdict) = verified_body(src, d.digest, d.size, what);
        let res = self.http.upload_stream(repo, &d.digest, d.size, body).await;
        if let Some(e) = verdict.lock().take() {
            return Err(e.into());
        }
        res?;
        Ok(true)
    }
}

enum BlobOutcome {
    Skipped,
    Mounted,
    Copied(u64),
}

fn add(r: &mut CopyReport, o: &CopyReport) {
    r.blobs_copied += o.blobs_copied;
    r.blobs_skipped += o.blobs_skipped;
    r.bytes_copied += o.bytes_copied;
    r.manifest_written |= o.manifest_written;
}

type Verdict = Arc<Mutex<Option<OciError>>>;

/// Wraps a byte stream into an upload body that hashes and counts on the way; on a
/// size or digest mismatch the body fails (aborting the upload) and the verdict holds
/// the `Tampered` error. The source's own digest error (oci-client's verifying
/// download stream) counts as its end: the checks here then report the mismatch.
fn verified_body<S, E>(
    src: S,
    digest: Digest,
    size: u64,
    what: String,
) -> (
    impl Stream<Item = std::result::Result<Bytes, std::io::Error>> + Send + 'static,
    Verdict,
)
where
    S: Stream<Item = std::result::Result<Bytes, E>> + Send + 'static,
    E: std::error::Error + Send + Sync + 'static,
{
    let verdict: Verdict = Arc::new(Mutex::new(None));
    let v2 = verdict.clone();
    struct St<S> {
        src: std::pin::Pin<Box<S>>,
        hasher: Sha256,
        n: u64,
        done: bool,
    }
    let st = St {
        src: Box::pin(src),
        hasher: Sha256::new(),
        n: 0,
        done: false,
    };
    let body = stream::unfold(st, move |mut st| {
        let verdict = v2.clone();
        let what = what.clone();
        async move {
            if st.done {
                return None;
            }
            let fail = |st: St<S>, e: OciError| {
                *verdict.lock() = Some(e);
                Some((
                    Err(std::io::Error::other("blob verification failed")),
                    St { done: true, ..st },
                ))
            };
            let next = match st.src.next().await {
                Some(Err(e)) if source_digest_error(&e) => None,
                other => other,
            };
            match next {
                Some(Ok(chunk)) => {
                    st.n += chunk.len() as u64;
                    if st.n > size {
                        let e = size_mismatch(&what, size, format!("at least {}", st.n));
                        return fail(st, e);
                    }
                    st.hasher.update(&chunk);
                    if st.n == size {
                        // Decide before the last bytes go out: the receiver stops
                        // reading at Content-Length and would never see a late error.
                        if let Some(e) = digest_mismatch(&st.hasher, digest, what) {
                            return fail(st, e);
                        }
                        st.done = true;
                    }
                    Some((Ok(chunk), st))
                }
                Some(Err(e)) => {
                    st.done = true;
                    Some((Err(std::io::Error::other(e)), st))
                }
                None => {
                    if st.n != size {
                        let e = size_mismatch(&what, size, st.n.to_string());
                        return fail(st, e);
                    }
                    if let Some(e) = digest_mismatch(&st.hasher, digest, what) {
                        return fail(st, e);
                    }
                    None
                }
            }
        }
    });
    (body, verdict)
}

/// `Tampered`: `what` has `actual` bytes where `size` were announced.
fn size_mismatch(what: &str, size: u64, actual: String) -> OciError {
    OciError::Tampered {
        what: format!("{what} size"),
        expected: size.to_string(),
        actual,
    }
}

/// `Tampered` when the bytes `hasher` has seen are not `digest`.
fn digest_mismatch(hasher: &Sha256, digest: Digest, what: String) -> Option<OciError> {
    let actual = Digest::from_bytes(hasher.clone().finalize().into());
    (actual != digest).then(|| OciError::Tampered {
        what,
        expected: digest.to_string(),
        actual: actual.to_string(),
    })
}

/// Whether a source stream error is oci-client's digest verification failure.
fn source_digest_error<E: std::error::Error + 'static>(e: &E) -> bool {
    (e as &dyn std::error::Error)
        .downcast_ref::<std::io::Error>()
        .is_some_and(is_digest_io)
}
