//! Registry bearer tokens (the Docker Registry token specification): the token client
//! of the registry transport, on top of the challenge parser.
//!
//! A registry that delegates authentication to a token server answers an
//! unauthenticated request with `401` and a `Bearer` challenge (see
//! [`parse_challenges`]). The client then asks the realm for a token
//! (`GET realm?service=...&scope=...`, with basic credentials when it has them) and
//! repeats the request with `Authorization: Bearer <token>`.
//!
//! Public here: the challenge parser ([`parse_challenges`], [`BearerChallenge`]),
//! re-exported so that it can be fuzzed. Crate-private: the per-scope token cache
//! (`TokenAuth`) used by the registry transport (which hands its tokens to
//! `oci_client`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::time::{Duration, Instant};

use reqwest::header::{AUTHORIZATION, HeaderValue};
use serde::Deserialize;

pub use crate::challenge::{BearerChallenge, Challenge, ChallengeError, parse_challenges};
use crate::error::OciError;
use crate::http::{ReadError, header_secret, read_limited};

/// Normalized scopes: `type:name:actions` merged per resource with sorted actions;
/// other strings kept as they are. Sorted and deduplicated.
pub(crate) fn normalize_scopes<'a>(scopes: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let mut resources: BTreeMap<(&str, &str), BTreeSet<&str>> = BTreeMap::new();
    let mut other = BTreeSet::new();
    for s in scopes {
        match (s.find(':'), s.rfind(':')) {
            (Some(a), Some(b)) if a < b => {
                let set = resources.entry((&s[..a], &s[a + 1..b])).or_default();
                set.extend(s[b + 1..].split(',').filter(|x| !x.is_empty()));
            }
            _ => {
                other.insert(s.to_owned());
            }
        }
    }
    let mut out: Vec<String> = resources
        .into_iter()
        .map(|((t, n), acts)| format!("{t}:{n}:{}", acts.into_iter().collect::<Vec<_>>().join(",")))
        .collect();
    out.extend(other);
    out.sort();
    out.dedup();
    out
}

/// The JSON answer of a token server.
#[derive(Deserialize)]
struct TokenAnswer {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<i64>,
}

/// Lifetime assumed when the answer has no (or no positive) `expires_in`.
pub(crate) const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);

/// A token and its lifetime, from the token server's JSON answer: `token`, else
/// `access_token`; `expires_in` seconds, 60 when absent.
pub(crate) fn parse_token_answer(body: &[u8]) -> Result<(String, Duration), String> {
    let a: TokenAnswer =
        serde_json::from_slice(body).map_err(|e| format!("token answer is not JSON: {e}"))?;
    let token = a
        .token
        .filter(|t| !t.is_empty())
        .or(a.access_token.filter(|t| !t.is_empty()))
        .ok_or("token answer has neither token nor access_token")?;
    let life = match a.expires_in {
        Some(s) if s > 0 => Duration::from_secs((s as u64).min(366 * 24 * 3600)),
        _ => DEFAULT_TOKEN_LIFETIME,
    };
    Ok((token, life))
}

struct Cached {
    header: HeaderValue,
    fetched: Instant,
    life: Duration,
}

impl Cached {
    /// Usable while less than its lifetime minus a margin (a tenth, at most 10 s)
    /// has passed, so that a token does not run out while a request is on its way.
    fn usable(&self, now: Instant) -> bool {
        let margin = (self.life / 10).min(Duration::from_secs(10));
        now.duration_since(self.fetched) + margin < self.life
    }
}

#[derive(Clone)]
struct Endpoint {
    realm: reqwest::Url,
    service: Option<String>,
}

/// Tokens of one registry, cached per (normalized) scope.
pub(crate) struct TokenAuth {
    client: reqwest::Client,
    registry: String,
    insecure: bool,
    /// User name and the ready `Basic` header for the token server.
    basic: Option<(String, HeaderValue)>,
    endpoint: parking_lot::RwLock<Option<Endpoint>>,
    cache: parking_lot::Mutex<HashMap<String, Cached>>,
    fetching: tokio::sync::Mutex<()>,
}

impl fmt::Debug for TokenAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ep = self.endpoint.read().clone();
        let cached = self.cache.lock().len();
        f.debug_struct("TokenAuth")
            .field("realm", &ep.as_ref().map(|e| e.realm.as_str().to_owned()))
            .field("service", &ep.and_then(|e| e.service))
            .field("username", &self.basic.as_ref().map(|(u, _)| u.as_str()))
            .field("credentials", &self.basic.as_ref().map(|_| "<redacted>"))
            .field("cached_tokens", &cached)
            .finish()
    }
}

impl TokenAuth {
    pub(crate) fn new(
        client: reqwest::Client,
        registry: String,
        insecure: bool,
        basic: Option<(String, HeaderValue)>,
    ) -> Self {
        Self {
            client,
            registry,
            insecure,
            basic,
            endpoint: parking_lot::RwLock::new(None),
            cache: parking_lot::Mutex::new(HashMap::new()),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    /// Whether the registry has asked for bearer tokens.
    pub(crate) fn active(&self) -> bool {
        self.endpoint.read().is_some()
    }

    fn cached(&self, key: &str) -> Option<HeaderValue> {
        let now = Instant::now();
        let cache = self.cache.lock();
        cache
            .get(key)
            .filter(|c| c.usable(now))
            .map(|c| c.header.clone())
    }

    /// Records the token endpoint of a challenge. A plain-HTTP realm is accepted only
    /// for a registry configured as insecure: credentials never go out unencrypted
    /// by surprise.
    pub(crate) fn learn(&self, ch: &BearerChallenge) -> Result<(), OciError> {
        let realm = reqwest::Url::parse(&ch.realm).map_err(|_| OciError::Challenge {
            registry: self.registry.clone(),
            source: ChallengeError::BadRealm {
                realm: ch.realm.clone(),
            },
        })?;
        if realm.scheme() != "https" && !self.insecure {
            return Err(OciError::Auth {
                registry: self.registry.clone(),
                reason: format!(
                    "token realm {realm} is plain HTTP but the registry is not configured insecure"
                ),
            });
        }
        *self.endpoint.write() = Some(Endpoint {
            realm,
            service: ch.service.clone(),
        });
        Ok(())
    }

    /// A token for `scopes`: cached, or fetched from the known realm.
    pub(crate) async fn token(&self, scopes: &[String]) -> Result<HeaderValue, OciError> {
        let norm = normalize_scopes(scopes.iter().map(String::as_str));
        let key = norm.join(" ");
        if let Some(h) = self.cached(&key) {
            return Ok(h);
        }
        let _guard = self.fetching.lock().await;
        if let Some(h) = self.cached(&key) {
            return Ok(h);
        }
        self.fetch(&key, &norm).await
    }

    /// A new token after `rejected` was refused: for the request's scopes together with
    /// `extra` (those a challenge asks for, when the refusal carried one). When another
    /// task already replaced the rejected token, that one is used.
    pub(crate) async fn refresh(
        &self,
        scopes: &[String],
        extra: &[String],
        rejected: Option<&HeaderValue>,
    ) -> Result<HeaderValue, OciError> {
        let key = normalize_scopes(scopes.iter().map(String::as_str)).join(" ");
        let _guard = self.fetching.lock().await;
        if let Some(h) = self.cached(&key)
            && Some(&h) != rejected
        {
            return Ok(h);
        }
        let all = normalize_scopes(
            scopes
                .iter()
                .map(String::as_str)
                .chain(extra.iter().map(String::as_str)),
        );
        self.fetch(&key, &all).await
    }

    async fn fetch(&self, key: &str, scopes: &[String]) -> Result<HeaderValue, OciError> {
        let ep = self.endpoint.read().clone().ok_or_else(|| OciError::Auth {
            registry: self.registry.clone(),
            reason: "no token realm known".into(),
        })?;
        let realm_host = ep.realm.host_str().unwrap_or_default().to_owned();
        let mut query: Vec<(&str, &str)> = Vec::new();
        if let Some(s) = &ep.service {
            query.push(("service", s));
        }
        for s in scopes {
            query.push(("scope", s));
        }
        let mut rb = self.client.get(ep.realm.clone()).query(&query);
        if let Some((user, header)) = &self.basic {
            rb = rb
                .query(&[("account", user)])
                .header(AUTHORIZATION, header.clone());
        }
        let conn = |source: reqwest::Error| OciError::Connect {
            registry: realm_host.clone(),
            source: Box::new(source),
        };
        let resp = rb.send().await.map_err(conn)?;
        let status = resp.status();
        let body = read_limited(resp, 1 << 20).await.map_err(|e| match e {
            ReadError::TooLarge => OciError::TooLarge {
                what: "token answer".into(),
                limit: 1 << 20,
            },
            ReadError::Http(e) => conn(e),
        })?;
        if !status.is_success() {
            return Err(OciError::Status {
                registry: realm_host,
                what: format!("token for {:?} of {}", key, self.registry),
                status: status.as_u16(),
                body: String::from_utf8_lossy(&body).into_owned(),
            });
        }
        let (token, life) = parse_token_answer(&body).map_err(|reason| OciError::Auth {
            registry: realm_host.clone(),
            reason,
        })?;
        let header = header_secret(&format!("Bearer {token}"))?;
        tracing::debug!(
            registry = %self.registry,
            scope = %key,
            lifetime_s = life.as_secs(),
            "fetched a registry token"
        );
        self.cache.lock().insert(
            key.to_owned(),
            Cached {
                header: header.clone(),
                fetched: Instant::now(),
                life,
            },
        );
        Ok(header)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_normalize_per_resource() {
        assert_eq!(
            normalize_scopes([
                "repository:b:push,pull",
                "repository:a:pull",
                "repository:b:pull",
                "registry:catalog:*",
                "odd",
                "repository:a:delete",
            ]),
            [
                "odd",
                "registry:catalog:*",
                "repository:a:delete,pull",
                "repository:b:pull,push",
            ]
        );
        assert!(normalize_scopes([]).is_empty());
    }

    #[test]
    fn token_answers() {
        let (t, l) = parse_token_answer(br#"{"token":"abc","expires_in":300}"#).unwrap();
        assert_eq!((t.as_str(), l), ("abc", Duration::from_secs(300)));
        let (t, l) = parse_token_answer(br#"{"access_token":"xyz"}"#).unwrap();
        assert_eq!((t.as_str(), l), ("xyz", DEFAULT_TOKEN_LIFETIME));
        let (t, _) = parse_token_answer(
            br#"{"token":"","access_token":"xyz","issued_at":"2026-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!(t, "xyz");
        let (_, l) = parse_token_answer(br#"{"token":"a","expires_in":0}"#).unwrap();
        assert_eq!(l, DEFAULT_TOKEN_LIFETIME);
        assert!(parse_token_answer(br#"{"expires_in":5}"#).is_err());
        assert!(parse_token_answer(b"<html>").is_err());
    }

    #[test]
    fn cached_tokens_expire_with_a_margin() {
        let now = Instant::now();
        let c = Cached {
            header: HeaderValue::from_static("Bearer x"),
            fetched: now,
            life: Duration::from_secs(60),
        };
        assert!(c.usable(now));
        assert!(c.usable(now + Duration::from_secs(53)));
        assert!(!c.usable(now + Duration::from_secs(54)));
        let long = Cached {
            header: c.header.clone(),
            fetched: now,
            life: Duration::from_secs(600),
        };
        assert!(long.usable(now + Duration::from_secs(589)));
        assert!(!long.usable(now + Duration::from_secs(590)));
        let short = Cached {
            life: Duration::from_secs(2),
            ..c
        };
        assert!(short.usable(now + Duration::from_millis(1700)));
        assert!(!short.usable(now + Duration::from_millis(1800)));
    }

    #[test]
    fn plain_http_realm_only_for_insecure_registries() {
        let ch = BearerChallenge::find([r#"Bearer realm="http://auth.example/token",service="s""#])
            .unwrap()
            .unwrap();
        let secure = TokenAuth::new(reqwest::Client::new(), "r".into(), false, None);
        let err = secure.learn(&ch).unwrap_err();
        assert!(matches!(err, OciError::Auth { .. }), "{err}");
        assert!(!secure.active());
        let insecure = TokenAuth::new(reqwest::Client::new(), "r".into(), true, None);
        insecure.learn(&ch).unwrap();
        assert!(insecure.active());
        let https = BearerChallenge::find([r#"Bearer realm="https://auth.example/token""#])
            .unwrap()
            .unwrap();
        secure.learn(&https).unwrap();
        assert!(secure.active());
    }

    #[test]
    fn debug_shows_no_credentials() {
        let basic = HeaderValue::from_static("Basic c2VjcmV0LXVzZXI6aHVudGVyMg==");
        let t = TokenAuth::new(
            reqwest::Client::new(),
            "r".into(),
            true,
            Some(("user".into(), basic)),
        );
        t.cache.lock().insert(
            "k".into(),
            Cached {
                header: HeaderValue::from_static("Bearer tok-secret-123"),
                fetched: Instant::now(),
                life: Duration::from_secs(60),
            },
        );
        let s = format!("{t:?}");
        assert!(!s.contains("tok-secret") && !s.contains("c2VjcmV0"), "{s}");
        assert!(s.contains("cached_tokens: 1"), "{s}");
    }
}
