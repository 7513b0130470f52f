//! The minimal reqwest path of [`RegistryTransport`]: `GET /v2/`, manifest `GET` and
//! `HEAD`, `DELETE` (see the parent module for why these do not go through
//! oci-client). A `401` with a Bearer challenge gets a token and the request is sent
//! once more.

use br2k_core::Digest;
use br2k_core::Repository;
use br2k_core::artifact::MAX_MANIFEST_BYTES;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use reqwest::{Method, Response, StatusCode};

use super::{FetchedManifest, Need, RegistryTransport};
use crate::error::OciError;
use crate::http::{ReadError, read_limited};

const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

impl RegistryTransport {
    pub(super) async fn send_once(
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

fn digest_header(resp: &Response) -> Option<Digest> {
    resp.headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| Digest::parse(s).ok())
}
