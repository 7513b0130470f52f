//! The registry transport of [`crate::OciImageStore`].
//!
//! Blob `HEAD`s, blob downloads (`GET`, streamed), blob uploads (`POST` + one streamed
//! `PUT`, oci-client's monolithic push), cross-repository mounts and manifest `PUT`s go
//! through [`oci_client::Client`]. A minimal reqwest path remains for what oci-client
//! cannot do or does differently from what br2k needs:
//!
//! - `DELETE` of manifests and blobs (oci-client has no delete);
//! - manifest `GET`, read with the [`MAX_MANIFEST_BYTES`] bound enforced while reading
//!   (oci-client's `pull_manifest_raw` reads a whole body of any size);
//! - manifest `HEAD`: oci-client's `fetch_manifest_digest` stores the credentials it is
//!   given for the registry, after which oci-client sends an extra `GET /v2/` before
//!   every request to an open registry, and it answers a `404` `HEAD` with a second
//!   `GET`; br2k's re-mirror of an unchanged image must cost only `HEAD`s;
//! - `GET /v2/` ([`crate::OciImageStore`]'s `ping`, and learning a token realm after a
//!   `401`): oci-client has no public call for it.
//!
//! Both paths share one [`TokenAuth`] (br2k's challenge parser, per-scope token cache
//! and expiry): before each oci-client call, the token for that call's scopes is put
//! into oci-client's token cache (`Client::tokens`) for the (repository, operation)
//! the call looks up, so oci-client never fetches tokens itself while br2k's are
//! valid. Basic credentials are handed to oci-client the same way (a cached
//! `Basic` entry per repository and operation), a static bearer token as the stored
//! `RegistryAuth::Bearer`; with anonymous access to a registry that has not asked for
//! tokens nothing is stored, so oci-client sends no `Authorization` and no extra
//! `GET /v2/`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use br2k_core::artifact::{MAX_MANIFEST_BYTES, OCI_INDEX, OCI_MANIFEST};
use br2k_core::{Digest, Repository};
use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use oci_client::client::{BlobResponse, ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::token_cache::{RegistryToken, RegistryTokenType};
use oci_client::{Reference, RegistryOperation};
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE};
use reqwest::{Method, Response, StatusCode};

use crate::auth::{BearerChallenge, TokenAuth};
use crate::config::{Auth, OciConfig, Secret};
use crate::error::{Class, OciError, classify, is_digest_io};
use crate::index::{DOCKER_MANIFEST, DOCKER_MANIFEST_LIST};

/// Requests sent to one registry, by HTTP method, counted by
/// [`crate::OciImageStore`] per operation it issues (see
/// [`crate::OciImageStore::request_counts`]).
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

/// A blob download: the body as it arrives (oci-client's stream, which also checks
/// the digest at its end; br2k checks size and digest itself as well).
pub(crate) type BlobStream = Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>;

/// The access a request needs, as token scopes (what Distribution checks).
#[derive(Clone, Copy)]
pub(crate) enum Need<'a> {
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

    /// The repository and operation oci-client looks its token up by.
    /// A mount shares the target's push entry: its token (push on the target, pull
    /// on the source) also allows plain pushes, and a concurrent push replacing it
    /// first costs the mount one `401` and a retry.
    fn oci_key(self) -> Option<(RegistryOperation, String)> {
        match self {
            Need::Pull(r) => Some((RegistryOperation::Pull, r.to_string())),
            Need::Push(r) | Need::Mount(r, _) => Some((RegistryOperation::Push, r.to_string())),
            Need::Base | Need::Delete(_) => None,
        }
    }
}

#[derive(Clone)]
pub(crate) struct Http {
    /// Blobs, uploads, mounts, manifest PUTs.
    oci: oci_client::Client,
    /// The minimal path: `GET /v2/`, manifest GET/HEAD, DELETE, token requests.
    client: reqwest::Client,
    origin: String,
    registry: String,
    /// The configured `Authorization` (basic, or a static bearer token), raw path.
    auth: Option<HeaderValue>,
    /// The configured credentials in oci-client's terms (`None`: anonymous).
    oci_auth: Option<OciAuth>,
    /// Bearer tokens from the registry's token server, once it asks for them;
    /// `None` with a static bearer token.
    tokens: Option<Arc<TokenAuth>>,
    /// Whether `oci_auth` (or, once tokens are in use, anonymous) is stored in `oci`.
    stored: Arc<tokio::sync::OnceCell<()>>,
    counts: Arc<Counters>,
}

#[derive(Clone)]
enum OciAuth {
    Basic(String, Secret),
    Bearer(Secret),
}

impl OciAuth {
    fn registry_auth(&self) -> RegistryAuth {
        match self {
            OciAuth::Basic(u, p) => RegistryAuth::Basic(u.clone(), p.expose().to_owned()),
            OciAuth::Bearer(t) => RegistryAuth::Bearer(t.expose().to_owned()),
        }
    }
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

fn oci_setup_error(registry: &str, source: OciDistributionError) -> OciError {
    OciError::Client {
        registry: registry.to_owned(),
        what: "client setup".into(),
        source,
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
                source: Box::new(e),
            })?;
        let oci = oci_client::Client::try_from(ClientConfig {
            protocol: if cfg.insecure {
                ClientProtocol::HttpsExcept(vec![cfg.registry.clone()])
            } else {
                ClientProtocol::Https
            },
            use_monolithic_push: true,
            connect_timeout: Some(cfg.connect_timeout),
            read_timeout: Some(cfg.read_timeout),
            platform_resolver: None,
            ..Default::default()
        })
        .map_err(|e| oci_setup_error(&cfg.registry, e))?;
        let scheme = if cfg.insecure { "http" } else { "https" };
        let (auth, basic, oci_auth) = match &cfg.auth {
            Auth::Anonymous => (None, None, None),
            Auth::Basic { username, password } => {
                use base64::Engine as _;
                let raw = format!("{username}:{}", password.expose());
                let enc = base64::engine::general_purpose::STANDARD.encode(raw);
                let h = header_secret(&format!("Basic {enc}"))?;
                (
                    Some(h.clone()),
                    Some((username.clone(), h)),
                    Some(OciAuth::Basic(username.clone(), password.clone())),
                )
            }
            Auth::Bearer(token) => (
                Some(header_secret(&format!("Bearer {}", token.expose()))?),
                None,
                Some(OciAuth::Bearer(token.clone())),
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
            oci,
            client,
            origin: format!("{scheme}://{}", cfg.registry),
            registry: cfg.registry.clone(),
            auth,
            oci_auth,
            tokens,
            stored: Arc::new(tokio::sync::OnceCell::new()),
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

    fn reference(&self, repo: &Repository, reference: &str) -> Reference {
        if reference.starts_with("sha256:") {
            Reference::with_digest(self.registry.clone(), repo.to_string(), reference.into())
        } else {
            Reference::with_tag(self.registry.clone(), repo.to_string(), reference.into())
        }
    }

    /// The `Authorization` for a request needing `scopes`: a bearer token once the
    /// registry has asked for tokens, else the configured credentials.
    async fn authorization(&self, scopes: &[String]) -> Result<Option<HeaderValue>, OciError> {
        match &self.tokens {
            Some(t) if t.active() => Ok(Some(t.token(scopes).await?)),
            _ => Ok(self.auth.clone()),
        }
    }

    fn tokens_active(&self) -> bool {
        self.tokens.as_ref().is_some_and(|t| t.active())
    }

    /// Stores the credentials oci-client uses for this registry, once. Nothing is
    /// stored for anonymous access until the registry asks for tokens: with
    /// `RegistryAuth::Anonymous` stored, oci-client would send `GET /v2/` before
    /// every request (it never caches "no credentials needed").
    async fn store_auth(&self) {
        let auth = match &self.oci_auth {
            Some(a) => a.registry_auth(),
            None if self.tokens_active() => RegistryAuth::Anonymous,
            None => return,
        };
        self.stored
            .get_or_init(|| async {
                self.oci.store_auth_if_needed(&self.registry, &auth).await;
            })
            .await;
    }

    /// Hands oci-client the credentials for a call needing `need`: the bearer token
    /// of its scopes (registry token auth) or the basic credentials, in oci-client's
    /// token cache under the (repository, operation) the call looks up. Returns the
    /// bearer token used, if any.
    async fn prepare(&self, need: Need<'_>) -> Result<Option<HeaderValue>, OciError> {
        self.store_auth().await;
        let Some((op, repo)) = need.oci_key() else {
            return Ok(None);
        };
        let key = Reference::with_tag(self.registry.clone(), repo, "latest".into());
        if self.tokens_active() {
            let tokens = self.tokens.as_ref().expect("tokens active");
            let header = tokens.token(&need.scopes()).await?;
            self.insert_bearer(&key, op, &header).await;
            return Ok(Some(header));
        }
        if let Some(OciAuth::Basic(u, p)) = &self.oci_auth {
            let t = RegistryTokenType::Basic(u.clone(), p.expose().to_owned());
            self.oci.tokens.insert(&key, op, t).await;
        }
        Ok(None)
    }

    async fn insert_bearer(&self, key: &Reference, op: RegistryOperation, header: &HeaderValue) {
        let token = header
            .to_str()
            .ok()
            .and_then(|h| h.strip_prefix("Bearer "))
            .unwrap_or_default()
            .to_owned();
        let t = RegistryTokenType::Bearer(RegistryToken::Token { token });
        self.oci.tokens.insert(key, op, t).await;
    }

    /// After a `401` from an oci-client call needing `need`: learns the token realm
    /// (`GET /v2/`) when the registry has not asked for tokens before, and fetches a
    /// new token in place of `rejected`. `Ok(false)`: no token can help.
    async fn reauthorize(
        &self,
        need: Need<'_>,
        rejected: Option<&HeaderValue>,
    ) -> Result<bool, OciError> {
        let Some(tokens) = &self.tokens else {
            return Ok(false);
        };
        if !tokens.active() && !self.discover().await? {
            return Ok(false);
        }
        let Some((op, repo)) = need.oci_key() else {
            return Ok(false);
        };
        self.store_auth().await;
        let header = tokens.refresh(&need.scopes(), &[], rejected).await?;
        let key = Reference::with_tag(self.registry.clone(), repo, "latest".into());
        self.insert_bearer(&key, op, &header).await;
        Ok(true)
    }

    /// The Bearer challenge of a `401` answer, if it has one.
    fn challenge(&self, resp: &Response) -> Result<Option<BearerChallenge>, OciError> {
        let values = resp.headers().get_all(WWW_AUTHENTICATE);
        BearerChallenge::find(values.iter().filter_map(|v| v.to_str().ok())).map_err(|source| {
            OciError::Challenge {
                registry: self.registry.clone(),
                source,
            }
        })
    }

    /// `GET /v2/` without credentials: learns the token realm of a Bearer challenge.
    async fn discover(&self) -> Result<bool, OciError> {
        let url = self.url("");
        let resp = self
            .send_once(&Method::GET, self.request(Method::GET, &url), None)
            .await?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(false);
        }
        let challenge = self.challenge(&resp)?;
        match (&self.tokens, challenge) {
            (Some(t), Some(ch)) => {
                t.learn(&ch)?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Whether `e` is a refusal a new token may cure (then fetched and handed to
    /// oci-client): the caller may issue its call once more.
    pub(crate) async fn retry_after(&self, e: &OciError, need: Need<'_>) -> Result<bool, OciError> {
        if !e.is_unauthorized() {
            return Ok(false);
        }
        let rejected = match need.oci_key() {
            Some(_) if self.tokens_active() => {
                let t = self.tokens.as_ref().expect("tokens active");
                Some(t.token(&need.scopes()).await?)
            }
            _ => None,
        };
        self.reauthorize(need, rejected.as_ref()).await
    }

    /// Runs an oci-client call needing `need` (counted by `count`), once more after a
    /// `401` that a new token may cure.
    async fn run<T, F, Fut>(
        &self,
        need: Need<'_>,
        what: impl Fn() -> String,
        count: &[Method],
        call: F,
    ) -> Result<T, OciError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, OciDistributionError>>,
    {
        let used = self.prepare(need).await?;
        let bump = || count.iter().for_each(|m| self.counts.bump(m));
        bump();
        let first = call().await;
        let e = match first {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        if classify(&e) != Class::Status(401) || !self.reauthorize(need, used.as_ref()).await? {
            return Err(self.client_error(what(), e));
        }
        bump();
        call().await.map_err(|e| self.client_error(what(), e))
    }

    fn client_error(&self, what: String, source: OciDistributionError) -> OciError {
        OciError::Client {
            registry: self.registry.clone(),
            what,
            source,
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
        let challenge = self.challenge(&resp)?;
        let Some(challenge) = challenge else {
            return Ok(resp);
        };
        tokens.learn(&challenge)?;
        let Some(replay) = replay else {
            return Ok(resp);
        };
        let token = tokens
            .refresh(&scopes, &challenge.scopes, auth.as_ref())
            .await?;
        self.send_once(&method, replay, Some(&token)).await
    }

    pub(crate) fn conn(&self, source: impl std::error::Error + Send + Sync + 'static) -> OciError {
        OciError::Connect {
            registry: self.registry.clone(),
            source: Box::new(source),
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
    /// retried (a stream cannot be replayed): see [`Http::retry_after`].
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
