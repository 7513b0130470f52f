//! Registry bearer-token authentication against a real `docker-registry` configured
//! with `auth: token:`, and a token server of the test's own that checks basic
//! credentials and issues ES256 JWTs with an `x5c` header (a self-signed certificate
//! made by the `openssl` CLI, which the registry trusts through `rootcertbundle`).

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use br2k_core::ImageStore;
use br2k_core::conformance::sample_image;
use br2k_oci::{Auth, OciImageStore, Secret};
use common::{Registry, fresh_repo};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};

const SERVICE: &str = "br2k-test-registry";
const ISSUER: &str = "br2k-test-token-issuer";
const USER: &str = "tester";

/// What the token server handed out (`Debug` leaves the token out).
#[derive(Clone)]
struct Issued {
    token: String,
    /// The authenticated user, or "" for anonymous.
    subject: String,
    /// The `scope` parameters of the request.
    scopes: Vec<String>,
    /// Whether the token was issued already expired.
    stale: bool,
    /// Whether the token was issued with a bad signature (but a valid `exp`).
    forged: bool,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("subject", &self.subject)
            .field("scopes", &self.scopes)
            .field("stale", &self.stale)
            .field("forged", &self.forged)
            .finish_non_exhaustive()
    }
}

struct Issuer {
    key: EcdsaKeyPair,
    cert_b64: String,
    rng: SystemRandom,
    password: String,
    /// Lifetime of the next tokens (`exp` and `expires_in`), seconds.
    lifetime: AtomicU64,
    /// Omit `expires_in` from the answer (the client must assume 60 s).
    omit_expires_in: AtomicBool,
    /// This many next tokens are issued with an `exp` long past (beyond the
    /// registry's 60 s leeway) while the answer claims the usual lifetime.
    stale_next: AtomicUsize,
    /// This many next tokens are issued with a signature the registry rejects, and
    /// nothing else amiss (a client cannot tell them from good ones).
    forged_next: AtomicUsize,
    /// Answer with `access_token` instead of `token`.
    access_token_field: AtomicBool,
    issued: Mutex<Vec<Issued>>,
    refused: AtomicUsize,
}

struct TokenServer {
    issuer: Arc<Issuer>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A P-256 key and its self-signed certificate (PEM at `dir/cert.pem`).
fn make_key(dir: &Path) -> (EcdsaKeyPair, String) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "key.pem",
            "-out",
            "cert.pem",
            "-days",
            "2",
            "-subj",
            "/CN=br2k-test-token-issuer",
        ],
    );
    openssl(
        dir,
        &[
            "pkcs8", "-topk8", "-nocrypt", "-in", "key.pem", "-outform", "DER", "-out", "key.der",
        ],
    );
    openssl(
        dir,
        &[
            "x509", "-in", "cert.pem", "-outform", "DER", "-out", "cert.der",
        ],
    );
    let pkcs8 = std::fs::read(dir.join("key.der")).unwrap();
    let key = EcdsaKeyPair::from_pkcs8(
        &ECDSA_P256_SHA256_FIXED_SIGNING,
        &pkcs8,
        &SystemRandom::new(),
    )
    .expect("P-256 PKCS#8 key");
    let cert = STANDARD.encode(std::fs::read(dir.join("cert.der")).unwrap());
    (key, cert)
}

impl Issuer {
    /// A compact JWS (ES256, `x5c` header) with Distribution's claims.
    fn jwt(&self, subject: &str, access: &serde_json::Value, exp: i64) -> String {
        let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [self.cert_b64]});
        let t = now();
        let claims = serde_json::json!({
            "iss": ISSUER,
            "sub": subject,
            "aud": SERVICE,
            "exp": exp,
            "nbf": exp.min(t) - 1,
            "iat": exp.min(t) - 1,
            "jti": format!("{:016x}", rand::random::<u64>()),
            "access": access,
        });
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self.key.sign(&self.rng, input.as_bytes()).expect("sign");
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }
}

fn deny(issuer: &Issuer, status: StatusCode, message: &str) -> Response {
    issuer.refused.fetch_add(1, Ordering::SeqCst);
    let body = serde_json::json!({"errors": [{"code": "UNAUTHORIZED", "message": message}]});
    (status, axum::Json(body)).into_response()
}

/// `GET /token?service=...&scope=...`: anonymous callers get a token without access
/// (as public token servers do), the right user gets what it asks for, a wrong
/// password gets 401.
async fn token(
    State(issuer): State<Arc<Issuer>>,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Response {
    let param = |k: &'static str| query.iter().filter(move |(n, _)| n == k).map(|(_, v)| v);
    if param("service").next().map(String::as_str) != Some(SERVICE) {
        return deny(&issuer, StatusCode::BAD_REQUEST, "unknown service");
    }
    let scopes: Vec<String> = param("scope").cloned().collect();
    let subject = match headers.get("authorization").and_then(|v| v.to_str().ok()) {
        None => String::new(),
        Some(v) => {
            let expected = STANDARD.encode(format!("{USER}:{}", issuer.password));
            if v.strip_prefix("Basic ") != Some(expected.as_str()) {
                return deny(&issuer, StatusCode::UNAUTHORIZED, "bad credentials");
            }
            if let Some(account) = param("account").next()
                && account != USER
            {
                return deny(&issuer, StatusCode::UNAUTHORIZED, "account mismatch");
            }
            USER.to_owned()
        }
    };
    let access: Vec<serde_json::Value> = if subject.is_empty() {
        vec![]
    } else {
        scopes
            .iter()
            .flat_map(|s| s.split(' '))
            .filter_map(|s| {
                let (kind, rest) = s.split_once(':')?;
                let (name, actions) = rest.rsplit_once(':')?;
                let actions: Vec<&str> = actions
                    .split(',')
                    .filter(|a| matches!(*a, "pull" | "push" | "delete"))
                    .collect();
                (kind == "repository")
                    .then(|| serde_json::json!({"type": kind, "name": name, "actions": actions}))
            })
            .collect()
    };
    let lifetime = issuer.lifetime.load(Ordering::SeqCst) as i64;
    let stale = issuer
        .stale_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    let forged = issuer
        .forged_next
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    let exp = if stale { now() - 600 } else { now() + lifetime };
    let mut jwt = issuer.jwt(&subject, &serde_json::Value::from(access), exp);
    if forged {
        let (signed, _) = jwt.rsplit_once('.').unwrap();
        jwt = format!("{signed}.{}", URL_SAFE_NO_PAD.encode([7u8; 64]));
    }
    issuer.issued.lock().unwrap().push(Issued {
        token: jwt.clone(),
        subject,
        scopes,
        stale,
        forged,
    });
    let field = if issuer.access_token_field.load(Ordering::SeqCst) {
        "access_token"
    } else {
        "token"
    };
    let mut body = serde_json::json!({ field: jwt, "issued_at": "2026-11-30T00:00:00Z" });
    if !issuer.omit_expires_in.load(Ordering::SeqCst) {
        body["expires_in"] = lifetime.into();
    }
    axum::Json(body).into_response()
}

/// A token server and a registry that trusts it.
struct Setup {
    server: TokenServer,
    registry: Registry,
    password: String,
    _keys: tempfile::TempDir,
}

async fn setup() -> Setup {
    let keys = tempfile::tempdir().unwrap();
    let (key, cert_b64) = make_key(keys.path());
    let password = format!("pw-{:016x}", rand::random::<u64>());
    let issuer = Arc::new(Issuer {
        key,
        cert_b64,
        rng: SystemRandom::new(),
        password: password.clone(),
        lifetime: AtomicU64::new(300),
        omit_expires_in: AtomicBool::new(false),
        stale_next: AtomicUsize::new(0),
        forged_next: AtomicUsize::new(0),
        access_token_field: AtomicBool::new(false),
        issued: Mutex::new(vec![]),
        refused: AtomicUsize::new(0),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .route("/token", axum::routing::get(token))
        .with_state(issuer.clone());
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    let registry = Registry::spawn_with_token_auth(
        &format!("http://{addr}/token"),
        SERVICE,
        ISSUER,
        &keys.path().join("cert.pem"),
    );
    Setup {
        server: TokenServer { issuer, task },
        registry,
        password,
        _keys: keys,
    }
}

impl Setup {
    fn store(&self, auth: Auth) -> OciImageStore {
        self.registry.store_with(|c| c.with_auth(auth))
    }

    fn user(&self) -> OciImageStore {
        self.store(Auth::Basic {
            username: USER.into(),
            password: Secret::new(self.password.clone()),
        })
    }

    fn issued(&self) -> Vec<Issued> {
        self.server.issuer.issued.lock().unwrap().clone()
    }
}

#[tokio::test]
#[ignore = "needs stack"]
async fn token_auth_refuses_anonymous_and_wrong_password() {
    let s = setup().await;
    // The right user seeds an image so that refusals are not "not found".
    let repo = fresh_repo("token-deny");
    let img = sample_image(rand::random(), 2, 1000);
    s.user().push(&repo, &img, Some("v1")).await.unwrap();

    // Anonymous: the token server hands out a token without access (like public
    // token servers do); the registry refuses it for pull and push.
    let anonymous = s.store(Auth::Anonymous);
    anonymous.ping().await.unwrap(); // `/v2/` needs any valid token
    let before = s.issued().len();
    let err = anonymous.pull(&repo, &img.digest).await.unwrap_err();
    assert_eq!(err.kind(), br2k_core::ErrorKind::PermissionDenied, "{err}");
    let err = anonymous
        .push(&fresh_repo("token-deny"), &img, None)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), br2k_core::ErrorKind::PermissionDenied, "{err}");
    let anon_tokens: Vec<Issued> = s.issued()[before..].to_vec();
    assert!(!anon_tokens.is_empty());
    assert!(anon_tokens.iter().all(|i| i.subject.is_empty()));
    assert!(
        anon_tokens
            .iter()
            .any(|i| i.scopes.contains(&format!("repository:{repo}:pull"))),
        "{anon_tokens:?}"
    );

    // A wrong password: the token server refuses, so does the store.
    let refused = s.server.issuer.refused.load(Ordering::SeqCst);
    let wrong = s.store(Auth::Basic {
        username: USER.into(),
        password: Secret::new("wrong"),
    });
    assert_eq!(
        wrong.ping().await.unwrap_err().kind(),
        br2k_core::ErrorKind::PermissionDenied
    );
    let err = wrong.pull(&repo, &img.digest).await.unwrap_err();
    assert_eq!(err.kind(), br2k_core::ErrorKind::PermissionDenied, "{err}");
    let err = wrong
        .push(&fresh_repo("token-deny"), &img, None)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), br2k_core::ErrorKind::PermissionDenied, "{err}");
    assert!(s.server.issuer.refused.load(Ordering::SeqCst) >= refused + 3);

    // A static bearer token that is not a valid JWT is refused too.
    let garbage = s.store(Auth::Bearer(Secret::new("not-a-jwt")));
    assert_eq!(
        garbage.pull(&repo, &img.digest).await.unwrap_err().kind(),
        br2k_core::ErrorKind::PermissionDenied
    );
}

/// Captured `tracing` output.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
#[ignore = "needs stack"]
async fn token_auth_push_pull_copy_with_credentials() {
    let s = setup().await;
    let logs = Captured::default();
    let sink = logs.clone();
    // Global (the only test here that installs one): a thread-local subscriber can
    // miss events whose interest another test thread cached first.
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .init();

    let store = s.user();
    store.ping().await.unwrap();
    let repo = fresh_repo("token");
    let img = sample_image(rand::random(), 3, 20_000);
    store.push(&repo, &img, Some("v1")).await.unwrap();
    assert_eq!(store.resolve(&repo, "v1").await.unwrap(), img.digest);

    // Tokens are cached per scope: once the push and pull tokens are known, a pull
    // costs exactly the requests it costs on an open registry (no 401 round trips).
    assert_eq!(store.pull(&repo, &img.digest).await.unwrap(), img);
    let tokens = s.issued().len();
    let before = store.request_counts();
    assert_eq!(store.pull(&repo, &img.digest).await.unwrap(), img);
    let delta = store.request_counts().since(&before);
    assert_eq!(s.issued().len(), tokens, "no new token for a cached scope");
    let open = Registry::spawn();
    let open_store = open.store();
    open_store.push(&repo, &img, Some("v1")).await.unwrap();
    let before_open = open_store.request_counts();
    open_store.pull(&repo, &img.digest).await.unwrap();
    assert_eq!(delta, open_store.request_counts().since(&before_open));

    // Every token went to the user and asked for the scopes Distribution checks.
    let issued = s.issued();
    assert!(issued.iter().all(|i| i.subject == USER && !i.stale));
    let scopes: Vec<&String> = issued.iter().flat_map(|i| &i.scopes).collect();
    for want in [
        format!("repository:{repo}:pull,push"),
        format!("repository:{repo}:pull"),
    ] {
        assert!(scopes.contains(&&want), "{want} not in {scopes:?}");
    }
    // One token per scope, although blobs move 6 at a time: parallel requests wait
    // for the one fetch. Also when the first requests go out before the registry has
    // asked for tokens (a new store, no ping): they all get a 401 and share one token.
    let no_duplicates = |issued: &[Issued]| {
        let mut seen: Vec<&Vec<String>> = issued.iter().map(|i| &i.scopes).collect();
        seen.sort();
        let n = seen.len();
        seen.dedup();
        assert_eq!(seen.len(), n, "a scope fetched twice: {issued:?}");
    };
    no_duplicates(&issued);
    let cold = s.user();
    let before = s.issued().len();
    let wide = sample_image(rand::random(), 8, 5_000);
    let repo_cold = fresh_repo("token-cold");
    cold.push(&repo_cold, &wide, Some("v1")).await.unwrap();
    assert_eq!(cold.pull(&repo_cold, &wide.digest).await.unwrap(), wide);
    no_duplicates(&s.issued()[before..]);

    // Copy within the token registry (cross-repository mount: push on the target,
    // pull on the source), from it to an open registry and back (streamed uploads).
    let repo2 = fresh_repo("token-copy");
    let report = store
        .copy_image_to(&repo, &img.digest, &store, &repo2)
        .await
        .unwrap();
    assert!(report.manifest_written);
    assert_eq!(store.pull(&repo2, &img.digest).await.unwrap(), img);
    let mount = s.issued().iter().any(|i| {
        i.scopes.contains(&format!("repository:{repo2}:pull,push"))
            && i.scopes.contains(&format!("repository:{repo}:pull"))
    });
    assert!(mount, "a token for the mount scopes");

    let other = fresh_repo("token-copy");
    let img2 = sample_image(rand::random(), 2, 50_000);
    open_store.push(&other, &img2, Some("v2")).await.unwrap();
    let report = open_store
        .copy_image(&other, &img2.digest, &store)
        .await
        .unwrap();
    assert!(
        report.blobs_copied >= 2 && report.manifest_written,
        "{report:?}"
    );
    assert_eq!(store.pull(&other, &img2.digest).await.unwrap(), img2);
    let back = fresh_repo("token-copy");
    store
        .copy_image_to(&other, &img2.digest, &open_store, &back)
        .await
        .unwrap();
    assert_eq!(open_store.pull(&back, &img2.digest).await.unwrap(), img2);

    // `access_token` instead of `token`, and no `expires_in`: still accepted.
    s.server
        .issuer
        .access_token_field
        .store(true, Ordering::SeqCst);
    s.server
        .issuer
        .omit_expires_in
        .store(true, Ordering::SeqCst);
    let fresh = s.user();
    let repo3 = fresh_repo("token-access");
    let img3 = sample_image(rand::random(), 1, 1000);
    fresh.push(&repo3, &img3, None).await.unwrap();
    assert_eq!(fresh.pull(&repo3, &img3.digest).await.unwrap(), img3);
    s.server
        .issuer
        .access_token_field
        .store(false, Ordering::SeqCst);

    // Deleting needs the `delete` action.
    store.delete_manifest(&repo2, &img.digest).await.unwrap();
    assert_eq!(
        store.pull(&repo2, &img.digest).await.unwrap_err().kind(),
        br2k_core::ErrorKind::NotFound
    );
    assert!(
        s.issued()
            .iter()
            .any(|i| i.scopes.contains(&format!("repository:{repo2}:delete")))
    );

    // A static bearer token (one issued for pulling `repo`) still works as before.
    let pull_token = s
        .issued()
        .into_iter()
        .rev()
        .find(|i| i.scopes == [format!("repository:{repo}:pull")])
        .expect("a pull token")
        .token;
    let fixed = s.store(Auth::Bearer(Secret::new(pull_token)));
    assert_eq!(fixed.pull(&repo, &img.digest).await.unwrap(), img);
    assert_eq!(
        fixed.push(&repo3, &img2, None).await.unwrap_err().kind(),
        br2k_core::ErrorKind::PermissionDenied
    );

    // Neither the password, nor the basic header, nor any token shows in Debug or in
    // the TRACE logs.
    let basic = STANDARD.encode(format!("{USER}:{}", s.password));
    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("fetched a registry token"), "logs captured");
    for st in [&store, &fresh, &fixed] {
        let debug = format!("{st:?}");
        assert!(debug.contains("redacted"), "{debug}");
        for text in [&debug, &logs] {
            assert!(!text.contains(&s.password));
            assert!(!text.contains(&basic));
            for i in s.issued() {
                // The signature part alone is enough to use nothing of it.
                let sig = i.token.rsplit('.').next().unwrap();
                assert!(!text.contains(sig), "a token leaked");
            }
        }
    }
}

#[tokio::test]
#[ignore = "needs stack"]
async fn token_auth_refreshes_expired_tokens() {
    let s = setup().await;
    let store = s.user();
    let repo = fresh_repo("token-exp");
    let img = sample_image(rand::random(), 2, 1000);
    store.push(&repo, &img, Some("v1")).await.unwrap();

    // Short-lived tokens: used while valid, fetched again once `expires_in` ran out
    // (the registry itself would still take the old one: it allows 60 s of skew).
    s.server.issuer.lifetime.store(3, Ordering::SeqCst);
    let pull_scope = vec![format!("repository:{repo}:pull")];
    let pull_tokens = || {
        s.issued()
            .into_iter()
            .filter(|i| i.scopes == pull_scope)
            .count()
    };
    let reader = s.user(); // an empty token cache
    let n = pull_tokens();
    assert_eq!(reader.pull(&repo, &img.digest).await.unwrap(), img);
    assert_eq!(pull_tokens(), n + 1);
    assert_eq!(reader.pull(&repo, &img.digest).await.unwrap(), img);
    assert_eq!(pull_tokens(), n + 1, "cached while valid");
    tokio::time::sleep(Duration::from_millis(3_100)).await;
    assert_eq!(reader.pull(&repo, &img.digest).await.unwrap(), img);
    assert_eq!(pull_tokens(), n + 2, "fetched again after expires_in");

    // A token the registry rejects as expired although the answer promised 300 s:
    // the 401 `invalid_token` makes the store fetch a new one and retry once.
    s.server.issuer.lifetime.store(300, Ordering::SeqCst);
    s.server.issuer.stale_next.store(1, Ordering::SeqCst);
    let repo2 = fresh_repo("token-exp");
    let before = s.issued().len();
    store.push(&repo2, &img, Some("v1")).await.unwrap();
    assert_eq!(store.pull(&repo2, &img.digest).await.unwrap(), img);
    let new: Vec<Issued> = s.issued()[before..].to_vec();
    assert_eq!(new.iter().filter(|i| i.stale).count(), 1, "{new:?}");
    assert!(new.len() >= 2, "the stale token was replaced: {new:?}");
    assert_eq!(s.server.issuer.stale_next.load(Ordering::SeqCst), 0);

    // A token refused although its `exp` is fine (a bad signature): oci-client would
    // keep sending it from its cache; br2k's retry after the 401 fetches another one,
    // once for all the parallel blob HEADs that were refused, and hands it over.
    s.server.issuer.forged_next.store(1, Ordering::SeqCst);
    let repo3 = fresh_repo("token-forged");
    let before = s.issued().len();
    store.push(&repo3, &img, None).await.unwrap();
    let new: Vec<Issued> = s.issued()[before..].to_vec();
    assert_eq!(new.iter().filter(|i| i.forged).count(), 1, "{new:?}");
    let pull3 = vec![format!("repository:{repo3}:pull")];
    assert!(new[0].forged && new[0].scopes == pull3, "{new:?}");
    assert_eq!(
        new.iter().filter(|i| i.scopes == pull3).count(),
        2,
        "the forged token replaced once: {new:?}"
    );
    assert_eq!(store.pull(&repo3, &img.digest).await.unwrap(), img);
}
