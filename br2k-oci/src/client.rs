//! A small Distribution (OCI registry HTTP API v2) client on reqwest, counting requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use br2k_core::artifact::{MAX_MANIFEST_BYTES, OCI_INDEX, OCI_MANIFEST};
use br2k_core::{Digest, Repository};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use reqwest::header::{
    ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue, LOCATION, WWW_AUTHENTICATE,
};
use reqwest::{Method, Response, StatusCode};

use crate::auth::{BearerChallenge, TokenAuth};
use crate::config::{Auth, OciConfig};
use crate::error::OciError;
use crate::index::{DOCKER_MANIFEST, DOCKER_MANIFEST_LIST};

/// HTTP requests sent to one registry, by method.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RequestCounts {
    /// GET requests.
    pub get: u64,
    /// HEAD requests.
    pub head: u64,
    /// PUT requests.
    pub put: u64,
    /// POST requests.
    pub post: u64,
    /// PATCH requests.
    pub patch: u64,
    /// DELETE requests.
    pub delete: u64,
}

impl RequestCounts {
    /// All requests.
    pub fn total(&self) -> u64 {
        self.get + self.head + self.put + self.post + self.patch + self.delete
    }

    /// Requests other than HEAD.
    pub fn non_head(&self) -> u64 {
        self.total() - self.head
    }

    /// Per-method difference `self - earlier`.
    pub fn since(&self, earlier: &RequestCounts) -> RequestCounts {
        RequestCounts {
            get: self.get - earlier.get,
            head: self.head - earlier.head,
            put: self.put - earlier.put,
            post: self.post - earlier.post,
            patch: self.patch - earlier.patch,
            delete: self.delete - earlier.delete,
        }
    }
}

#[derive(Debug, Default)]
struct Counters([AtomicU64; 6]);

impl Counters {
    fn bump(&self, m: &Method) {
        let i = match *m {
            Method::GET => 0,
            Method::HEAD => 1,
            Method::PUT => 2,
            Method::POST => 3,
            Method::PATCH => 4,
            _ => 5,
        };
        self.0[i].fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> RequestCounts {
        let g = |i: usize| self.0[i].load(Ordering::Relaxed);
        RequestCounts {
            get: g(0),
            head: g(1),
            put: g(2),
            post: g(3),
            patch: g(4),
            delete: g(5),
        }
    }
}

const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

/// A manifest as fetched: bytes and the served content type.
pub(crate) struct FetchedManifest {
    pub bytes: Bytes,
    pub content_type: Option<String>,
}

/// The access a request needs, as token scopes (what Distribution checks).
#[derive(Clone, Copy)]
enum Need<'a> {
    /// `/v2/` itself: any valid token.
    Base,
    /// GET, HEAD.
    Pull(&'a Repository),
    /// POST, PUT, PATCH.
    Push(&'a Repository),
    /// A cross-repository mount: push on the target, pull on the source.
    Mount(&'a Repository, &'a Repository),
    /// DELETE.
    Delete(&'a Repository),
}

impl Need<'_> {
    fn scopes(self) -> Vec<String> {
        let s = |r: &Repository, a: &str| format!("repository:{r}:{a}");
        match self {
            Need::Base => vec![],
            Need::Pull(r) => vec![s(r, "pull")],
            Need::Push(r) => vec![s(r, "pull,push")],
            Need::Mount(r, from) => vec![s(r, "pull,push"), s(from, "pull")],
            Need::Delete(r) => vec![s(r, "delete")],
        }
    }
}

#[derive(Clone)]
pub(crate) struct Http {
    client: reqwest::Client,
    origin: String,
    registry: String,
    /// The configured `Authorization` (basic, or a static bearer token).
    auth: Option<HeaderValue>,
    /// Bearer tokens from the registry's token server, once it asks for them;
    /// `None` with a static bearer token.
    tokens: Option<Arc<TokenAuth>>,
    counts: Arc<Counters>,
}

impl std::fmt::Debug for Http {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Http")
            .field("origin", &self.origin)
            .field("auth", &self.auth.as_ref().map(|_| "<redacted>"))
            .field("tokens", &self.tokens)
            .finish()
    }
}

impl Http {
    pub(crate) fn new(cfg: &OciConfig) -> Result<Self, OciError> {
        let client = reqwest::Client::builder()
            .connect_timeout(cfg.connect_timeout)
            .read_timeout(cfg.read_timeout)
            .pool_max_idle_per_host(32)
            .build()
            .map_err(|e| OciError::Connect {
                registry: cfg.registry.clone(),
                source: e,
            })?;
        let scheme = if cfg.insecure { "http" } else { "https" };
        let (auth, basic) = match &cfg.auth {
            Auth::Anonymous => (None, None),
            Auth::Basic { username, password } => {
                use base64::Engine as _;
                let raw = format!("{username}:{}", password.expose());
                let enc = base64::engine::general_purpose::STANDARD.encode(raw);
                let h = header_secret(&format!("Basic {enc}"))?;
                (Some(h.clone()), Some((username.clone(), h)))
            }
            Auth::Bearer(token) => (
                Some(header_secret(&format!("Bearer {}", token.expose()))?),
                None,
            ),
        };
        let tokens = match &cfg.auth {
            Auth::Bearer(_) => None,
            _ => Some(Arc::new(TokenAuth::new(
                client.clone(),
                cfg.registry.clone(),
                cfg.insecure,
                basic,
            ))),
        };
        Ok(Self {
            client,
            origin: format!("{scheme}://{}", cfg.registry),
            registry: cfg.registry.clone(),
            auth,
            tokens,
            counts: Arc::new(Counters::default()),
        })
    }

    pub(crate) fn counts(&self) -> RequestCounts {
        self.counts.snapshot()
    }

    fn url(&self, path: &str) -> String {
        format!("{}/v2/{path}", self.origin)
    }

    fn request(&self, method: Method, url: &str) -> reqwest::RequestBuilder {
        self.client.request(method, url)
    }

    /// The `Authorization` for a request needing `scopes`: a bearer token once the
    /// registry has asked for tokens, else the configured credentials.
    async fn authorization(&self, scopes: &[String]) -> Result<Option<HeaderValue>, OciError> {
        match &self.tokens {
            Some(t) if t.active() => Ok(Some(t.token(scopes).await?)),
            _ => Ok(self.auth.clone()),
        }
    }

    async fn send_once(
        &self,
        method: &Method,
        mut rb: reqwest::RequestBuilder,
        auth: Option<&HeaderValue>,
    ) -> Result<Response, OciError> {
        if let Some(a) = auth {
            rb = rb.header(AUTHORIZATION, a.clone());
        }
        self.counts.bump(method);
        rb.send().await.map_err(|e| self.conn(e))
    }

    /// Sends a request with the access it needs. A `401` with a Bearer challenge gets
    /// a token from the challenge's realm and the request is sent once more (when its
    /// body can be replayed; a streamed body cannot, but it follows a request of the
    /// same scope, whose token is then cached).
    async fn send(
        &self,
        method: Method,
        need: Need<'_>,
        rb: reqwest::RequestBuilder,
    ) -> Result<Response, OciError> {
        let scopes = need.scopes();
        let auth = self.authorization(&scopes).await?;
        let replay = self.tokens.as_ref().and_then(|_| rb.try_clone());
        let resp = self.send_once(&method, rb, auth.as_ref()).await?;
        let Some(tokens) = &self.tokens else {
            return Ok(resp);
        };
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let values = resp.headers().get_all(WWW_AUTHENTICATE);
        let challenge = BearerChallenge::find(values.iter().filter_map(|v| v.to_str().ok()))
            .map_err(|source| OciError::Challenge {
                registry: self.registry.clone(),
                source,
            })?;
        let Some(challenge) = challenge else {
            return Ok(resp);
        };
        tokens.learn(&challenge)?;
        let Some(replay) = replay else {
            return Ok(resp);
        };
        let token = tokens.refresh(&scopes, &challenge, auth.as_ref()).await?;
        self.send_once(&method, replay, Some(&token)).await
    }

    pub(crate) fn conn(&self, source: reqwest::Error) -> OciError {
        OciError::Connect {
            registry: self.registry.clone(),
            source,
        }
    }

    async fn fail(&self, what: String, resp: Response) -> OciError {
        let status = resp.status().as_u16();
        let body = read_limited(resp, 4096).await.unwrap_or_default();
        OciError::Status {
            registry: self.registry.clone(),
            what,
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    pub(crate) async fn ping(&self) -> Result<(), OciError> {
        let url = self.url("");
        let resp = self
            .send(Method::GET, Need::Base, self.request(Method::GET, &url))
            .await?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(self.fail("GET /v2/".into(), resp).await)
        }
    }

    /// HEAD a manifest by tag or digest: `Some(digest header)` when present.
    pub(crate) async fn head_manifest(
        &self,
        repo: &Repository,
        reference: &str,
    ) -> Result<Option<Option<Digest>>, OciError> {
        let url = self.url(&format!("{repo}/manifests/{reference}"));
        let rb = self
            .request(Method::HEAD, &url)
            .header(ACCEPT, MANIFEST_ACCEPT);
        let resp = self.send(Method::HEAD, Need::Pull(repo), rb).await?;
        match resp.status() {
            s if s.is_success() => Ok(Some(digest_header(&resp))),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(self
                .fail(format!("HEAD manifest {repo}:{reference}"), resp)
                .await),
        }
    }

    pub(crate) async fn get_manifest(
        &self,
        repo: &Repository,
        reference: &str,
    ) -> Result<FetchedManifest, OciError> {
        let url = self.url(&format!("{repo}/manifests/{reference}"));
        let rb = self
            .request(Method::GET, &url)
            .header(ACCEPT, MANIFEST_ACCEPT);
        let resp = self.send(Method::GET, Need::Pull(repo), rb).await?;
        if !resp.status().is_success() {
            return Err(self
                .fail(format!("GET manifest {repo}:{reference}"), resp)
                .await);
        }
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if let Some(len) = resp.content_length()
            && len > MAX_MANIFEST_BYTES as u64
        {
            return Err(OciError::TooLarge {
                what: format!("manifest {repo}:{reference}"),
                limit: MAX_MANIFEST_BYTES as u64,
            });
        }
        let bytes = read_limited(resp, MAX_MANIFEST_BYTES)
            .await
            .map_err(|e| match e {
                ReadError::TooLarge => OciError::TooLarge {
                    what: format!("manifest {repo}:{reference}"),
                    limit: MAX_MANIFEST_BYTES as u64,
                },
                ReadError::Http(e) => self.conn(e),
            })?;
        Ok(FetchedManifest {
            bytes,
            content_type,
        })
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
        let mt = match media_type {
            OCI_MANIFEST | OCI_INDEX | DOCKER_MANIFEST | DOCKER_MANIFEST_LIST => media_type,
            other => {
                return Err(br2k_core::ValidationError::malformed(
                    "manifest",
                    format!("unsupported media type {other:?}"),
                )
                .into());
            }
        };
        let url = self.url(&format!("{repo}/manifests/{reference}"));
        let rb = self
            .request(Method::PUT, &url)
            .header(CONTENT_TYPE, mt)
            .body(bytes);
        let resp = self.send(Method::PUT, Need::Push(repo), rb).await?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(self
                .fail(format!("PUT manifest {repo}:{reference}"), resp)
                .await)
        }
    }

    pub(crate) async fn head_blob(
        &self,
        repo: &Repository,
        digest: &Digest,
    ) -> Result<bool, OciError> {
        let url = self.url(&format!("{repo}/blobs/{digest}"));
        let resp = self
            .send(
                Method::HEAD,
                Need::Pull(repo),
                self.request(Method::HEAD, &url),
            )
            .await?;
        match resp.status() {
            s if s.is_success() => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(self.fail(format!("HEAD blob {repo}@{digest}"), resp).await),
        }
    }

    /// Starts a blob download; the caller reads the body.
    pub(crate) async fn get_blob(
        &self,
        repo: &Repository,
        digest: &Digest,
    ) -> Result<Response, OciError> {
        let url = self.url(&format!("{repo}/blobs/{digest}"));
        let resp = self
            .send(
                Method::GET,
                Need::Pull(repo),
                self.request(Method::GET, &url),
            )
            .await?;
        if resp.status().is_success() {
            Ok(resp)
        } else {
            Err(self.fail(format!("GET blob {repo}@{digest}"), resp).await)
        }
    }

    /// Downloads a blob completely, checking its size and digest.
    pub(crate) async fn get_blob_verified(
        &self,
        repo: &Repository,
        digest: &Digest,
        size: u64,
        what: &str,
    ) -> Result<Bytes, OciError> {
        let resp = self.get_blob(repo, digest).await?;
        let mut buf = BytesMut::with_capacity(size.min(64 << 20) as usize);
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| self.conn(e))?;
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

    fn absolute(&self, location: &str) -> String {
        if location.starts_with("http://") || location.starts_with("https://") {
            location.to_owned()
        } else {
            format!("{}{location}", self.origin)
        }
    }

    fn location(&self, resp: &Response) -> Result<String, OciError> {
        resp.headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(|l| self.absolute(l))
            .ok_or_else(|| OciError::Protocol {
                registry: self.registry.clone(),
                reason: "upload response without Location".into(),
            })
    }

    /// Starts an upload session, or mounts `digest` from `from` (same registry) when
    /// given: `Ok(None)` when the mount succeeded, else the upload URL.
    pub(crate) async fn start_upload(
        &self,
        repo: &Repository,
        mount: Option<(&Digest, &Repository)>,
    ) -> Result<Option<String>, OciError> {
        let url = self.url(&format!("{repo}/blobs/uploads/"));
        let mut rb = self.request(Method::POST, &url).header(CONTENT_LENGTH, 0);
        if let Some((d, from)) = mount {
            rb = rb.query(&[("mount", d.to_string()), ("from", from.to_string())]);
        }
        let need = match mount {
            Some((_, from)) => Need::Mount(repo, from),
            None => Need::Push(repo),
        };
        let resp = self.send(Method::POST, need, rb).await?;
        match resp.status() {
            StatusCode::CREATED if mount.is_some() => Ok(None),
            StatusCode::ACCEPTED => Ok(Some(self.location(&resp)?)),
            _ => Err(self.fail(format!("POST upload {repo}"), resp).await),
        }
    }

    /// Finishes an upload session with the whole body in one PUT.
    pub(crate) async fn finish_upload(
        &self,
        repo: &Repository,
        location: &str,
        digest: &Digest,
        size: u64,
        body: reqwest::Body,
    ) -> Result<(), OciError> {
        let rb = self
            .request(Method::PUT, location)
            .query(&[("digest", digest.to_string())])
            .header(CONTENT_TYPE, "application/octet-stream")
            .header(CONTENT_LENGTH, size)
            .body(body);
        let resp = self.send(Method::PUT, Need::Push(repo), rb).await?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(self.fail(format!("PUT blob {digest}"), resp).await)
        }
    }

    /// Uploads a blob held in memory (POST + PUT).
    pub(crate) async fn upload_bytes(
        &self,
        repo: &Repository,
        digest: &Digest,
        data: Bytes,
    ) -> Result<(), OciError> {
        let loc = self
            .start_upload(repo, None)
            .await?
            .expect("no mount requested");
        let size = data.len() as u64;
        self.finish_upload(repo, &loc, digest, size, reqwest::Body::from(data))
            .await
    }

    pub(crate) async fn delete_manifest(
        &self,
        repo: &Repository,
        digest: &Digest,
    ) -> Result<(), OciError> {
        self.delete(repo, "manifests", digest).await
    }

    pub(crate) async fn delete_blob(
        &self,
        repo: &Repository,
        digest: &Digest,
    ) -> Result<(), OciError> {
        self.delete(repo, "blobs", digest).await
    }

    /// DELETE `<repo>/<kind>/<digest>`; already absent counts as deleted.
    async fn delete(&self, repo: &Repository, kind: &str, digest: &Digest) -> Result<(), OciError> {
        let url = self.url(&format!("{repo}/{kind}/{digest}"));
        let resp = self
            .send(
                Method::DELETE,
                Need::Delete(repo),
                self.request(Method::DELETE, &url),
            )
            .await?;
        if resp.status().is_success() || resp.status() == StatusCode::NOT_FOUND {
            Ok(())
        } else {
            let what = kind.trim_end_matches('s');
            Err(self
                .fail(format!("DELETE {what} {repo}@{digest}"), resp)
                .await)
        }
    }
}

pub(crate) fn header_secret(value: &str) -> Result<HeaderValue, OciError> {
    let mut v = HeaderValue::from_str(value).map_err(|_| {
        br2k_core::ValidationError::malformed(
            "credentials",
            "contain characters not allowed in a header",
        )
    })?;
    v.set_sensitive(true);
    Ok(v)
}

fn digest_header(resp: &Response) -> Option<Digest> {
    resp.headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| Digest::parse(s).ok())
}

pub(crate) enum ReadError {
    TooLarge,
    Http(reqwest::Error),
}

pub(crate) async fn read_limited(resp: Response, limit: usize) -> Result<Bytes, ReadError> {
    let mut buf = BytesMut::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(ReadError::Http)?;
        if buf.len() + chunk.len() > limit {
            return Err(ReadError::TooLarge);
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}
