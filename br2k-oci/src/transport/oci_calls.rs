//! The calls of [`RegistryTransport`] made through oci-client: blob `HEAD`, blob
//! download (streamed), mount, blob upload (monolithic, streamed) and manifest `PUT`.
//! Each is sent once more after a `401` that a new token may cure.

use br2k_core::artifact::{MAX_MANIFEST_BYTES, OCI_INDEX, OCI_MANIFEST};
use br2k_core::{Digest, Repository};
use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use oci_client::client::BlobResponse;
use oci_client::errors::OciDistributionError;
use reqwest::Method;
use reqwest::header::HeaderValue;

use super::{BlobStream, Need, RegistryTransport};
use crate::error::{OciError, is_digest_io};
use crate::index::{DOCKER_MANIFEST, DOCKER_MANIFEST_LIST};

impl RegistryTransport {
    pub(crate) async fn head_blob(
        &self,
        repo: &Repository,
        digest: &Digest,
    ) -> Result<bool, OciError> {
        let r = self.reference(repo, &digest.to_string());
        let d = digest.to_string();
        self.run(
            Need::Pull(repo),
            || format!("HEAD blob {repo}@{digest}"),
            &[Method::HEAD],
            || self.oci.blob_exists(&r, &d),
        )
        .await
    }

    /// Starts a download of blob `digest` of `size` bytes; the caller reads the body
    /// and checks its size and digest (every caller does, hashing as it reads).
    ///
    /// A non-empty blob is asked for as the range `bytes=0-`: oci-client then leaves
    /// the check to br2k instead of hashing every byte a second time (its verifying
    /// stream runs only on a `200`; a registry that ignores the range answers `200`
    /// and both check). An empty blob is asked for plainly (an empty range is not
    /// satisfiable).
    pub(crate) async fn get_blob(
        &self,
        repo: &Repository,
        digest: &Digest,
        size: u64,
    ) -> Result<BlobStream, OciError> {
        let r = self.reference(repo, &digest.to_string());
        let d = digest.to_string();
        let what = || format!("GET blob {repo}@{digest}");
        let s = if size == 0 {
            self.run(Need::Pull(repo), what, &[Method::GET], || {
                self.oci.pull_blob_stream(&r, d.as_str())
            })
            .await?
        } else {
            match self
                .run(Need::Pull(repo), what, &[Method::GET], || {
                    self.oci.pull_blob_stream_partial(&r, d.as_str(), 0, None)
                })
                .await?
            {
                BlobResponse::Full(s) | BlobResponse::Partial(s) => s,
            }
        };
        Ok(s.stream)
    }

    /// Downloads a blob completely, checking its size and digest.
    pub(crate) async fn get_blob_verified(
        &self,
        repo: &Repository,
        digest: &Digest,
        size: u64,
        what: &str,
    ) -> Result<Bytes, OciError> {
        let mut stream = self.get_blob(repo, digest, size).await?;
        let mut buf = BytesMut::with_capacity(size.min(64 << 20) as usize);
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                // oci-client's own digest check at the end: br2k's below says more.
                Err(e) if is_digest_io(&e) => break,
                Err(e) => return Err(self.conn(e)),
            };
            if (buf.len() + chunk.len()) as u64 > size {
                return Err(OciError::Tampered {
                    what: format!("{what} size"),
                    expected: size.to_string(),
                    actual: format!("more than {size}"),
                });
            }
            buf.extend_from_slice(&chunk);
        }
        let bytes = buf.freeze();
        let actual = Digest::of(&bytes);
        if actual != *digest {
            return Err(OciError::Tampered {
                what: what.to_owned(),
                expected: digest.to_string(),
                actual: actual.to_string(),
            });
        }
        if bytes.len() as u64 != size {
            return Err(OciError::Tampered {
                what: format!("{what} size"),
                expected: size.to_string(),
                actual: bytes.len().to_string(),
            });
        }
        Ok(bytes)
    }

    /// Mounts blob `digest` from `from` into `repo` (same registry): `false` when the
    /// registry declined (it then answers `202` and opens an upload session instead,
    /// which is left unused; the caller uploads).
    pub(crate) async fn mount(
        &self,
        repo: &Repository,
        digest: &Digest,
        from: &Repository,
    ) -> Result<bool, OciError> {
        let r = self.reference(repo, &digest.to_string());
        let src = self.reference(from, &digest.to_string());
        let d = digest.to_string();
        let res = self
            .run(
                Need::Mount(repo, from),
                || format!("mount blob {digest} from {from} into {repo}"),
                &[Method::POST],
                || self.oci.mount_blob(&r, &src, &d),
            )
            .await;
        match res {
            Ok(()) => Ok(true),
            Err(OciError::Client {
                source: OciDistributionError::SpecViolationError(_),
                ..
            }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Uploads a blob of `size` bytes from `body` (POST + one streamed PUT). Not
    /// retried (a stream cannot be replayed): see [`RegistryTransport::retry_after`].
    pub(crate) async fn upload_stream<S>(
        &self,
        repo: &Repository,
        digest: &Digest,
        size: u64,
        body: S,
    ) -> Result<(), OciError>
    where
        S: Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
    {
        self.prepare(Need::Push(repo)).await?;
        self.counts.bump(&Method::POST);
        self.counts.bump(&Method::PUT);
        let r = self.reference(repo, &digest.to_string());
        let body = body.map(|r| r.map_err(OciDistributionError::IoError));
        self.oci
            .push_blob_stream(&r, body, &digest.to_string(), Some(size))
            .await
            .map(|_| ())
            .map_err(|e| self.client_error(format!("upload blob {repo}@{digest}"), e))
    }

    /// Uploads a blob held in memory (POST + PUT).
    pub(crate) async fn upload_bytes(
        &self,
        repo: &Repository,
        digest: &Digest,
        data: Bytes,
    ) -> Result<(), OciError> {
        let r = self.reference(repo, &digest.to_string());
        let d = digest.to_string();
        let size = data.len() as u64;
        self.run(
            Need::Push(repo),
            || format!("upload blob {repo}@{digest}"),
            &[Method::POST, Method::PUT],
            || {
                let body = futures::stream::iter([Ok::<_, OciDistributionError>(data.clone())]);
                self.oci.push_blob_stream(&r, body, &d, Some(size))
            },
        )
        .await
        .map(|_| ())
    }

    pub(crate) async fn put_manifest(
        &self,
        repo: &Repository,
        reference: &str,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<(), OciError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(OciError::TooLarge {
                what: "manifest".into(),
                limit: MAX_MANIFEST_BYTES as u64,
            });
        }
        let mt: &'static str = match media_type {
            OCI_MANIFEST => OCI_MANIFEST,
            OCI_INDEX => OCI_INDEX,
            DOCKER_MANIFEST => DOCKER_MANIFEST,
            DOCKER_MANIFEST_LIST => DOCKER_MANIFEST_LIST,
            other => {
                return Err(br2k_core::ValidationError::malformed(
                    "manifest",
                    format!("unsupported media type {other:?}"),
                )
                .into());
            }
        };
        let r = self.reference(repo, reference);
        self.run(
            Need::Push(repo),
            || format!("PUT manifest {repo}:{reference}"),
            &[Method::PUT],
            || {
                self.oci
                    .push_manifest_raw(&r, bytes.clone(), HeaderValue::from_static(mt))
            },
        )
        .await
        .map(|_| ())
    }
}
