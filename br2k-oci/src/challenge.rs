//! `WWW-Authenticate` challenges (RFC 9110, section 11.6.1) and the `Bearer` challenge
//! of a token-authenticating registry (the Docker Registry token specification).
//!
//! A registry that delegates authentication to a token server answers an
//! unauthenticated request with `401` and
//! `WWW-Authenticate: Bearer realm="https://auth.example/token",service="registry.example",scope="repository:app:pull"`.
//! This module only parses such values ([`parse_challenges`], [`BearerChallenge`]); it
//! depends on no other module of the crate. The token client on top is
//! [`crate::auth`], which also re-exports these items publicly (so that they can be
//! fuzzed).

use std::fmt;

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
}
