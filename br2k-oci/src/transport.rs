//! The registry transport of [`crate::OciImageStore`]: [`RegistryTransport`].
//!
//! Blob `HEAD`s, blob downloads (`GET`, streamed), blob uploads (`POST` + one streamed
//! `PUT`, oci-client's monolithic push), cross-repository mounts and manifest `PUT`s go
//! through [`oci_client::Client`]. A minimal reqwest path remains for what oci-client
//! cannot do or does differently from what br2k needs:
//!
//! - `DELETE` of manifests and blobs (oci-client has no delete);
//! - manifest `GET`, read with the
//!   [`MAX_MANIFEST_BYTES`](br2k_core::artifact::MAX_MANIFEST_BYTES) bound enforced while reading
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
//!
//! Submodules: `oci_calls` (the calls made through oci-client), `direct` (the minimal
//! reqwest path). The shared part here: credentials, token hand-over and the retry
//! after a `401`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use br2k_core::Repository;
use bytes::Bytes;
use futures::Stream;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::token_cache::{RegistryToken, RegistryTokenType};
use oci_client::{Reference, RegistryOperation};
use reqwest::header::{HeaderValue, WWW_AUTHENTICATE};
use reqwest::{Method, Response, StatusCode};

use crate::auth::TokenAuth;
use crate::challenge::BearerChallenge;
use crate::config::{Auth, OciConfig, Secret};
use crate::error::{Class, OciError, classify};
use crate::http::header_secret;

mod direct;
mod oci_calls;

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

/// One registry: oci-client for blobs, uploads, mounts and manifest `PUT`s, reqwest
/// for the rest, one token client for both.
#[derive(Clone)]
pub(crate) struct RegistryTransport {
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

impl std::fmt::Debug for RegistryTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryTransport")
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

impl RegistryTransport {
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

    pub(crate) fn conn(&self, source: impl std::error::Error + Send + Sync + 'static) -> OciError {
        OciError::Connect {
            registry: self.registry.clone(),
            source: Box::new(source),
        }
    }
}
