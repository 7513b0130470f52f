//! `WWW-Authenticate` challenges and registry bearer tokens (the Docker Registry
//! token specification).
//!
//! A registry that delegates authentication to a token server answers an
//! unauthenticated request with `401` and
//! `WWW-Authenticate: Bearer realm="https://auth.example/token",service="registry.example",scope="repository:app:pull"`.
//! The client then asks the realm for a token (`GET realm?service=...&scope=...`, with
//! basic credentials when it has them) and repeats the request with
//! `Authorization: Bearer <token>`.
//!
//! This module holds the challenge parser ([`parse_challenges`],
//! [`BearerChallenge`]), public so that it can be fuzzed, and the crate-private token
//! cache used by the registry transport (which hands its tokens to `oci_client`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::time::{Duration, Instant};

use reqwest::header::{AUTHORIZATION, HeaderValue};
use serde::Deserialize;

use crate::error::OciError;

/// One challenge of a `WWW-Authenticate` header (RFC 9110, section 11.6.1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Challenge {
    /// The auth scheme as sent (compare it case-insensitively).
    pub scheme: String,
    /// The `token68` form (`Negotiate abc==`), when used instead of parameters.
    pub token68: Option<String>,
    /// The parameters in order: names lower-cased, values unquoted.
    pub params: Vec<(String, String)>,
}

/// Why a `WWW-Authenticate` header or its Bearer challenge was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChallengeError {
    /// The header holds no challenge at all.
    #[error("empty WWW-Authenticate header")]
    Empty,
    /// A syntax error.
    #[error("malformed WWW-Authenticate header: expected {expected} at byte {at}")]
    Expected {
        /// What the grammar allows at that point.
        expected: &'static str,
        /// Byte offset in the header value.
        at: usize,
    },
    /// A quoted string without its closing quote.
    #[error("malformed WWW-Authenticate header: unterminated quoted string at byte {at}")]
    UnterminatedQuote {
        /// Byte offset of the opening quote.
        at: usize,
    },
    /// The challenge is not a `Bearer` challenge.
    #[error("not a Bearer challenge: {scheme:?}")]
    NotBearer {
        /// The scheme found.
        scheme: String,
    },
    /// A Bearer challenge without a `realm`.
    #[error("Bearer challenge without realm")]
    MissingRealm,
    /// A parameter that may appear once appears several times.
    #[error("Bearer challenge repeats parameter {0:?}")]
    Duplicate(String),
    /// The realm is not an absolute `http`/`https` URL with a host.
    #[error("Bearer realm {realm:?} is not an http(s) URL")]
    BadRealm {
        /// The realm as sent.
        realm: String,
    },
}

/// Parses a `WWW-Authenticate` header value into its challenges.
///
/// Accepts several challenges in one value (`Basic realm="x", Bearer realm="y"`),
/// quoted values with commas, spaces and `\`-escapes, token values, `token68`
/// credentials, empty list elements and any unknown parameter.
pub fn parse_challenges(header: &str) -> Result<Vec<Challenge>, ChallengeError> {
    let mut p = Parser {
        s: header.as_bytes(),
        i: 0,
    };
    let mut out = Vec::new();
    loop {
        p.skip_list_separators();
        if p.eof() {
            break;
        }
        let scheme = p.token().ok_or(ChallengeError::Expected {
            expected: "an auth scheme",
            at: p.i,
        })?;
        let mut ch = Challenge {
            scheme,
            token68: None,
            params: Vec::new(),
        };
        let spaced = p.skip_sp();
        if spaced && !p.eof() && p.peek() != Some(b',') {
            if let Some(t) = p.token68() {
                ch.token68 = Some(t);
            } else {
                p.params(&mut ch.params)?;
            }
        }
        p.skip_ows();
        match p.peek() {
            None | Some(b',') => {}
            Some(_) => {
                return Err(ChallengeError::Expected {
                    expected: "',' or the end",
                    at: p.i,
                });
            }
        }
        out.push(ch);
    }
    if out.is_empty() {
        return Err(ChallengeError::Empty);
    }
    Ok(out)
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_token68_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~+/".contains(&b)
}

impl Parser<'_> {
    fn eof(&self) -> bool {
        self.i >= self.s.len()
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn skip_ows(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.i += 1;
        }
    }

    fn skip_sp(&mut self) -> bool {
        let start = self.i;
        self.skip_ows();
        self.i > start
    }

    fn skip_list_separators(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b',')) {
            self.i += 1;
        }
    }

    fn token(&mut self) -> Option<String> {
        let start = self.i;
        while self.peek().is_some_and(is_tchar) {
            self.i += 1;
        }
        (self.i > start).then(|| ascii(&self.s[start..self.i]))
    }

    /// `token68` followed by the end of this challenge, or nothing (position kept).
    fn token68(&mut self) -> Option<String> {
        let start = self.i;
        while self.peek().is_some_and(is_token68_char) {
            self.i += 1;
        }
        if self.i == start {
            return None;
        }
        while self.peek() == Some(b'=') {
            self.i += 1;
        }
        let end = self.i;
        self.skip_ows();
        if matches!(self.peek(), None | Some(b',')) {
            Some(ascii(&self.s[start..end]))
        } else {
            self.i = start;
            None
        }
    }

    /// Whether `token BWS "="` starts here (position kept).
    fn at_param(&mut self) -> bool {
        let start = self.i;
        let yes = self.token().is_some() && {
            self.skip_ows();
            self.peek() == Some(b'=')
        };
        self.i = start;
        yes
    }

    fn params(&mut self, out: &mut Vec<(String, String)>) -> Result<(), ChallengeError> {
        loop {
            let name = self.token().ok_or(ChallengeError::Expected {
                expected: "a parameter name",
                at: self.i,
            })?;
            self.skip_ows();
            if self.peek() != Some(b'=') {
                return Err(ChallengeError::Expected {
                    expected: "'='",
                    at: self.i,
                });
            }
            self.i += 1;
            self.skip_ows();
            let value = if self.peek() == Some(b'"') {
                self.quoted()?
            } else {
                self.token().ok_or(ChallengeError::Expected {
                    expected: "a token or quoted string",
                    at: self.i,
                })?
            };
            out.push((name.to_ascii_lowercase(), value));
            // Another parameter of this challenge follows after a comma; anything
            // else after a comma starts the next challenge.
            let save = self.i;
            self.skip_ows();
            if self.peek() != Some(b',') {
                self.i = save;
                return Ok(());
            }
            self.skip_list_separators();
            if !self.at_param() {
                self.i = save;
                return Ok(());
            }
        }
    }

    fn quoted(&mut self) -> Result<String, ChallengeError> {
        let open = self.i;
        self.i += 1;
        let mut buf = Vec::new();
        loop {
            match self.peek() {
                None => return Err(ChallengeError::UnterminatedQuote { at: open }),
                Some(b'"') => {
                    self.i += 1;
                    break;
                }
                Some(b'\\') => {
                    self.i += 1;
                    match self.peek() {
                        Some(b) if b == b'\t' || b >= 0x20 && b != 0x7f => {
                            buf.push(b);
                            self.i += 1;
                        }
                        None => return Err(ChallengeError::UnterminatedQuote { at: open }),
                        Some(_) => {
                            return Err(ChallengeError::Expected {
                                expected: "an escaped visible character",
                                at: self.i,
                            });
                        }
                    }
                }
                Some(b) if b == b'\t' || b >= 0x20 && b != 0x7f => {
                    buf.push(b);
                    self.i += 1;
                }
                Some(_) => {
                    return Err(ChallengeError::Expected {
                        expected: "a visible character in the quoted string",
                        at: self.i,
                    });
                }
            }
        }
        // The input is a &str and only whole ASCII bytes were removed (quotes and
        // backslashes), so the rest is still UTF-8.
        Ok(String::from_utf8(buf).expect("UTF-8 in, UTF-8 out"))
    }
}

fn ascii(b: &[u8]) -> String {
    b.iter().map(|&c| c as char).collect()
}

impl fmt::Display for Challenge {
    /// The canonical form: every parameter value quoted.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.scheme)?;
        if let Some(t) = &self.token68 {
            return write!(f, " {t}");
        }
        for (i, (k, v)) in self.params.iter().enumerate() {
            f.write_str(if i == 0 { " " } else { ", " })?;
            write!(f, "{k}=\"")?;
            for c in v.chars() {
                if c == '"' || c == '\\' {
                    f.write_str("\\")?;
                }
                write!(f, "{c}")?;
            }
            f.write_str("\"")?;
        }
        Ok(())
    }
}

/// A `Bearer` challenge of a token-authenticating registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BearerChallenge {
    /// The token endpoint: an absolute http(s) URL, normalized.
    pub realm: String,
    /// The `service` to name in the token request.
    pub service: Option<String>,
    /// The scopes asked for (the space-separated `scope` values, all of them).
    pub scopes: Vec<String>,
    /// The `error` code (`invalid_token`, `insufficient_scope`), if any.
    pub error: Option<String>,
}

impl BearerChallenge {
    /// Reads a parsed challenge; unknown parameters are ignored.
    pub fn from_challenge(c: &Challenge) -> Result<Self, ChallengeError> {
        if !c.scheme.eq_ignore_ascii_case("bearer") {
            return Err(ChallengeError::NotBearer {
                scheme: c.scheme.clone(),
            });
        }
        let mut realm = None;
        let mut service = None;
        let mut error = None;
        let mut scopes = Vec::new();
        for (k, v) in &c.params {
            let once = |slot: &mut Option<String>| {
                if slot.replace(v.clone()).is_some() {
                    Err(ChallengeError::Duplicate(k.clone()))
                } else {
                    Ok(())
                }
            };
            match k.as_str() {
                "realm" => once(&mut realm)?,
                "service" => once(&mut service)?,
                "error" => once(&mut error)?,
                "scope" => scopes.extend(v.split_ascii_whitespace().map(str::to_owned)),
                _ => {}
            }
        }
        let realm = realm.ok_or(ChallengeError::MissingRealm)?;
        // Kept in the normalized form that was checked (URL parsing is lenient:
        // `https:host/t` is `https://host/t`).
        let realm = match reqwest::Url::parse(&realm) {
            Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => u.into(),
            _ => return Err(ChallengeError::BadRealm { realm }),
        };
        Ok(Self {
            realm,
            service,
            scopes,
            error,
        })
    }

    /// The first Bearer challenge in the given `WWW-Authenticate` header values;
    /// `Ok(None)` when there is none. A malformed value is an error.
    pub fn find<'a>(
        values: impl IntoIterator<Item = &'a str>,
    ) -> Result<Option<Self>, ChallengeError> {
        for v in values {
            for c in parse_challenges(v)? {
                if c.scheme.eq_ignore_ascii_case("bearer") {
                    return Self::from_challenge(&c).map(Some);
                }
            }
        }
        Ok(None)
    }
}

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
    endpoint: std::sync::RwLock<Option<Endpoint>>,
    cache: std::sync::Mutex<HashMap<String, Cached>>,
    fetching: tokio::sync::Mutex<()>,
}

impl fmt::Debug for TokenAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ep = self.endpoint.read().expect("endpoint lock").clone();
        let cached = self.cache.lock().expect("token cache lock").len();
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
            endpoint: std::sync::RwLock::new(None),
            cache: std::sync::Mutex::new(HashMap::new()),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    /// Whether the registry has asked for bearer tokens.
    pub(crate) fn active(&self) -> bool {
        self.endpoint.read().expect("endpoint lock").is_some()
    }

    fn cached(&self, key: &str) -> Option<HeaderValue> {
        let now = Instant::now();
        let cache = self.cache.lock().expect("token cache lock");
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
        *self.endpoint.write().expect("endpoint lock") = Some(Endpoint {
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
        let ep = self
            .endpoint
            .read()
            .expect("endpoint lock")
            .clone()
            .ok_or_else(|| OciError::Auth {
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
        let body = crate::client::read_limited(resp, 1 << 20)
            .await
            .map_err(|e| match e {
                crate::client::ReadError::TooLarge => OciError::TooLarge {
                    what: "token answer".into(),
                    limit: 1 << 20,
                },
                crate::client::ReadError::Http(e) => conn(e),
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
        let header = crate::client::header_secret(&format!("Bearer {token}"))?;
        tracing::debug!(
            registry = %self.registry,
            scope = %key,
            lifetime_s = life.as_secs(),
            "fetched a registry token"
        );
        self.cache.lock().expect("token cache lock").insert(
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

    fn one(h: &str) -> Challenge {
        let mut v = parse_challenges(h).unwrap();
        assert_eq!(v.len(), 1, "{v:?}");
        v.remove(0)
    }

    fn p(k: &str, v: &str) -> (String, String) {
        (k.into(), v.into())
    }

    #[test]
    fn distribution_challenge() {
        let h = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull,push",error="insufficient_scope""#;
        let b = BearerChallenge::find([h]).unwrap().unwrap();
        assert_eq!(b.realm, "https://auth.docker.io/token");
        assert_eq!(b.service.as_deref(), Some("registry.docker.io"));
        assert_eq!(b.scopes, ["repository:library/alpine:pull,push"]);
        assert_eq!(b.error.as_deref(), Some("insufficient_scope"));
    }

    #[test]
    fn several_scopes_unknown_params_tokens_and_spacing() {
        let h = "bEaReR  realm = \"http://127.0.0.1:1/t?x=1,2\" , Service=reg , \
                 scope=\"repository:a:pull  repository:b:pull,push\",foo=bar,scope=\"registry:catalog:*\"";
        let c = one(h);
        assert_eq!(c.scheme, "bEaReR");
        assert_eq!(
            c.params,
            [
                p("realm", "http://127.0.0.1:1/t?x=1,2"),
                p("service", "reg"),
                p("scope", "repository:a:pull  repository:b:pull,push"),
                p("foo", "bar"),
                p("scope", "registry:catalog:*"),
            ]
        );
        let b = BearerChallenge::from_challenge(&c).unwrap();
        assert_eq!(
            b.scopes,
            [
                "repository:a:pull",
                "repository:b:pull,push",
                "registry:catalog:*"
            ]
        );
        assert_eq!(b.service.as_deref(), Some("reg"));
        assert_eq!(b.error, None);
    }

    #[test]
    fn quoted_values_with_commas_escapes_and_utf8() {
        let c = one(r#"Bearer realm="https://a/t",x="a, b=\"c\" \\ d",y="",z="é, ü""#);
        assert_eq!(
            c.params,
            [
                p("realm", "https://a/t"),
                p("x", r#"a, b="c" \ d"#),
                p("y", ""),
                p("z", "é, ü"),
            ]
        );
        // The canonical form parses back to the same.
        assert_eq!(one(&c.to_string()), c);
    }

    #[test]
    fn several_challenges_in_one_value() {
        let v = parse_challenges(
            r#"Basic realm="r, 1", Negotiate abc+/==, Bearer realm="https://a/t",scope="s", Digest"#,
        )
        .unwrap();
        let schemes: Vec<&str> = v.iter().map(|c| c.scheme.as_str()).collect();
        assert_eq!(schemes, ["Basic", "Negotiate", "Bearer", "Digest"]);
        assert_eq!(v[0].params, [p("realm", "r, 1")]);
        assert_eq!(v[1].token68.as_deref(), Some("abc+/=="));
        assert_eq!(v[2].params, [p("realm", "https://a/t"), p("scope", "s")]);
        assert!(v[3].params.is_empty() && v[3].token68.is_none());
        let b = BearerChallenge::find([r#"Basic realm="x""#, v[2].to_string().as_str()])
            .unwrap()
            .unwrap();
        assert_eq!(b.realm, "https://a/t");
        // Only a Basic challenge: no bearer flow.
        assert_eq!(
            BearerChallenge::find([r#"Basic realm="br2k""#]).unwrap(),
            None
        );
        // Empty list elements are allowed.
        assert_eq!(parse_challenges(", ,Basic realm=x,, ").unwrap().len(), 1);
    }

    #[test]
    fn malformed_challenges_are_typed_errors() {
        use ChallengeError::*;
        assert_eq!(parse_challenges(""), Err(Empty));
        assert_eq!(parse_challenges(" , "), Err(Empty));
        assert_eq!(
            parse_challenges(r#"Bearer realm="https://a/t"#),
            Err(UnterminatedQuote { at: 13 })
        );
        assert_eq!(
            parse_challenges(r#"Bearer realm="a\"#),
            Err(UnterminatedQuote { at: 13 })
        );
        assert!(matches!(
            parse_challenges("Bearer a=b, realm=,x=y"),
            Err(Expected { at: 18, .. })
        ));
        assert!(matches!(
            parse_challenges("Bearer realm=\"a\u{1}\""),
            Err(Expected { .. })
        ));
        assert!(matches!(
            parse_challenges(r#"Bearer realm="x" service="y""#),
            Err(Expected { .. })
        ));
        assert!(matches!(
            parse_challenges("=Bearer"),
            Err(Expected { at: 0, .. })
        ));
        assert!(matches!(
            parse_challenges("Bearer a=b c"),
            Err(Expected { .. })
        ));
        let b = |h: &str| BearerChallenge::find([h]);
        assert_eq!(
            b(r#"Bearer realm="https:auth.example/t""#)
                .unwrap()
                .unwrap()
                .realm,
            "https://auth.example/t"
        );
        assert_eq!(b(r#"Bearer service="s""#), Err(MissingRealm));
        assert_eq!(b("Bearer abc=="), Err(MissingRealm));
        assert_eq!(
            b(r#"Bearer realm="https://a/t",realm="https://evil/t""#),
            Err(Duplicate("realm".into()))
        );
        assert_eq!(
            b(r#"Bearer realm="/token""#),
            Err(BadRealm {
                realm: "/token".into()
            })
        );
        assert_eq!(
            b(r#"Bearer realm="file:///etc/passwd""#),
            Err(BadRealm {
                realm: "file:///etc/passwd".into()
            })
        );
        assert_eq!(
            BearerChallenge::from_challenge(&one("Basic realm=x")),
            Err(NotBearer {
                scheme: "Basic".into()
            })
        );
        // A malformed value is an error even when a later one is fine.
        assert!(b("Bearer realm=\"").is_err());
        assert!(
            BearerChallenge::find(["Bearer realm=\"", r#"Bearer realm="https://a/t""#]).is_err()
        );
    }

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
        t.cache.lock().unwrap().insert(
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
