//! The HTTP API of a ledger replica (axum).
//!
//! - `POST /deposit` `{"account","amount"}` and `POST /transfer` `{"from","to","amount"}`
//!   are replicated commands; an optional `Idempotency-Key` header deduplicates retries.
//! - `POST /settle` `{"account","amount"}` with a required `Idempotency-Key` runs the
//!   on-chain settlement once (`Replica::once`).
//! - `GET /accounts` and `GET /accounts/{name}` are linearizable reads on the leader;
//!   `?local=true` reads this replica's (possibly stale) state instead.
//! - `GET /settlements/{key}`: a settlement applied to the ledger.
//! - `GET /status`: role, applied index, leader, counters (any replica).
//!
//! Followers answer `307 Temporary Redirect` with the leader's URL in `Location` (so a
//! client resends the same method and body), or `503` with `Retry-After` during an
//! election. Errors are JSON `{"error": kind, "message": ...}` with a typed status:
//! malformed input 400, unknown account 404, overdraft or conflict 409, body over
//! the limit 413, overflow 422, unavailable 503.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use br2k_core::replica::{Replica, ReplicaError, ReplicaRole};
use br2k_core::{Error, ValidationError};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::state::{Command, Ledger, Output, Rejection, check_account};

/// Header carrying a client's idempotency key.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Shared state of the HTTP handlers.
#[derive(Debug, Clone)]
pub struct App {
    /// The replica serving requests.
    pub replica: Arc<Replica<Ledger>>,
}

/// An HTTP error answer.
#[derive(Debug)]
pub enum ApiError {
    /// Redirect to the leader (or 503 while none is known).
    NotLeader(Option<String>),
    /// A core error.
    Core(Error),
    /// A refusal of the state machine.
    Rejected(Rejection, String),
    /// The body is over the limit.
    TooLarge,
}

impl From<ReplicaError> for ApiError {
    fn from(e: ReplicaError) -> Self {
        match e {
            ReplicaError::NotLeader { leader } => ApiError::NotLeader(leader.map(|l| l.endpoint)),
            ReplicaError::Failed(e) => ApiError::Core(e),
            other => ApiError::Core(other.into()),
        }
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        ApiError::Core(e)
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        ApiError::Core(e.into())
    }
}

fn status_of(e: &Error) -> StatusCode {
    match e {
        Error::InvalidInput(_) => StatusCode::BAD_REQUEST,
        Error::NotFound { .. } => StatusCode::NOT_FOUND,
        Error::AlreadyExists { .. } | Error::Conflict { .. } => StatusCode::CONFLICT,
        Error::PermissionDenied { .. } => StatusCode::FORBIDDEN,
        Error::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        Error::NotSupported { .. } => StatusCode::NOT_IMPLEMENTED,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Responds with an error; `uri` completes the redirect target.
fn error_response(err: ApiError, uri: &Uri) -> Response {
    match err {
        ApiError::NotLeader(Some(leader)) => {
            let target = format!(
                "{}{}",
                leader.trim_end_matches('/'),
                uri.path_and_query().map_or("/", |p| p.as_str())
            );
            let mut r = (
                StatusCode::TEMPORARY_REDIRECT,
                Json(json!({"error": "not_leader", "leader": leader})),
            )
                .into_response();
            if let Ok(v) = HeaderValue::from_str(&target) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            r
        }
        ApiError::NotLeader(None) => {
            let mut r = (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"error": "no_leader", "message": "election in progress"})),
            )
                .into_response();
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
        ApiError::Core(e) => (
            status_of(&e),
            Json(json!({"error": e.kind(), "message": e.to_string()})),
        )
            .into_response(),
        ApiError::Rejected(reason, message) => {
            let status = match reason {
                Rejection::UnknownAccount => StatusCode::NOT_FOUND,
                Rejection::Overdraft => StatusCode::CONFLICT,
                Rejection::Overflow => StatusCode::UNPROCESSABLE_ENTITY,
                Rejection::InvalidReceipt => StatusCode::BAD_GATEWAY,
            };
            (status, Json(json!({"error": reason, "message": message}))).into_response()
        }
        ApiError::TooLarge => (
            StatusCode::PAYLOAD_TOO_LARGE,
            Json(json!({"error": "invalid_input", "message": "request body is over the limit"})),
        )
            .into_response(),
    }
}

/// A handler's result, rendered with the request URI (for redirects).
struct Answer(Uri, Result<Response, ApiError>);

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        match self.1 {
            Ok(r) => r,
            Err(e) => error_response(e, &self.0),
        }
    }
}

fn output_response(out: Output) -> Result<Response, ApiError> {
    match out {
        Output::Rejected { reason, message } => Err(ApiError::Rejected(reason, message)),
        ok => Ok((StatusCode::OK, Json(ok)).into_response()),
    }
}

fn parse<T: for<'de> Deserialize<'de>>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge
        } else {
            ApiError::Core(ValidationError::malformed("request body", r.body_text()).into())
        }
    })?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::Core(ValidationError::malformed("request body", e).into()))
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    match headers.get(IDEMPOTENCY_KEY) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.to_owned()))
            .map_err(|_| ValidationError::malformed("idempotency key", "not visible ASCII").into()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DepositBody {
    account: String,
    amount: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TransferBody {
    from: String,
    to: String,
    amount: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SettleBody {
    account: String,
    amount: u64,
}

#[derive(Deserialize, Default)]
struct ReadQuery {
    #[serde(default)]
    local: bool,
}

/// What `GET /status` returns.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    /// This replica's endpoint.
    pub endpoint: String,
    /// Its role.
    pub role: ReplicaRole,
    /// The leader as last observed.
    pub leader: Option<String>,
    /// Index of the last applied log entry.
    pub applied_index: u64,
    /// Commands applied by this process (not counting those restored from a snapshot).
    pub applied_here: u64,
    /// Checkpoints recorded by this process.
    pub checkpoints: u64,
    /// Settlement transactions sent by this process.
    pub effects_run: u64,
    /// Sum of all balances on this replica.
    pub total: u128,
    /// Number of accounts on this replica.
    pub accounts: usize,
}

impl From<DepositBody> for Command {
    fn from(b: DepositBody) -> Self {
        Command::Deposit {
            account: b.account,
            amount: b.amount,
        }
    }
}

impl From<TransferBody> for Command {
    fn from(b: TransferBody) -> Self {
        Command::Transfer {
            from: b.from,
            to: b.to,
            amount: b.amount,
        }
    }
}

/// Parses a `B` body into its command and replicates it (with the request's
/// idempotency key, if any): the `/deposit` and `/transfer` handlers.
async fn replicate<B>(
    State(app): State<App>,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Answer
where
    B: for<'de> Deserialize<'de>,
    Command: From<B>,
{
    let r = async {
        let key = idempotency_key(&headers)?;
        let cmd = Command::from(parse::<B>(body)?);
        output_response(app.replica.replicate(key.as_deref(), cmd).await?)
    }
    .await;
    Answer(uri, r)
}

async fn settle(
    State(app): State<App>,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Answer {
    let r = async {
        let key = idempotency_key(&headers)?.ok_or_else(|| {
            ValidationError::malformed("idempotency key", "settle needs an Idempotency-Key")
        })?;
        let b: SettleBody = parse(body)?;
        check_account(&b.account)?;
        // A retry of an applied settlement returns its first result, whatever the
        // balance is now.
        let done = app
            .replica
            .query(|s| s.settlements.get(&key).cloned())
            .await?;
        if done.is_none() {
            let balance = app.replica.query(|s| s.balance(&b.account)).await?;
            match balance {
                None => {
                    return Err(ApiError::Rejected(
                        Rejection::UnknownAccount,
                        format!("no account {}", b.account),
                    ));
                }
                Some(have) if have < b.amount => {
                    return Err(ApiError::Rejected(
                        Rejection::Overdraft,
                        format!("{} has {have}, cannot settle {}", b.account, b.amount),
                    ));
                }
                Some(_) => {}
            }
        }
        let cmd = Command::Settle {
            key: key.clone(),
            account: b.account,
            amount: b.amount,
        };
        output_response(app.replica.once(&key, cmd).await?)
    }
    .await;
    Answer(uri, r)
}

async fn read<R>(
    app: &App,
    local: bool,
    f: impl FnOnce(&Ledger) -> R + Send,
) -> Result<R, ApiError> {
    if local {
        Ok(app.replica.read_local(f))
    } else {
        Ok(app.replica.query(f).await?)
    }
}

async fn accounts(State(app): State<App>, uri: Uri, Query(q): Query<ReadQuery>) -> Answer {
    let local = q.local;
    let r = read(&app, local, |s| s.accounts.clone())
        .await
        .map(|a: BTreeMap<String, u64>| Json(a).into_response());
    Answer(uri, r)
}

async fn account(
    State(app): State<App>,
    uri: Uri,
    Path(name): Path<String>,
    Query(q): Query<ReadQuery>,
) -> Answer {
    let local = q.local;
    let r = async {
        check_account(&name)?;
        match read(&app, local, |s| s.balance(&name)).await? {
            Some(b) => Ok(Json(json!({"account": name, "balance": b})).into_response()),
            None => Err(ApiError::Rejected(
                Rejection::UnknownAccount,
                format!("no account {name}"),
            )),
        }
    }
    .await;
    Answer(uri, r)
}

async fn settlement(
    State(app): State<App>,
    uri: Uri,
    Path(key): Path<String>,
    Query(q): Query<ReadQuery>,
) -> Answer {
    let local = q.local;
    let r = async {
        match read(&app, local, |s| s.settlements.get(&key).cloned()).await? {
            Some(s) => Ok(Json(json!({"key": key, "settlement": s})).into_response()),
            None => Err(ApiError::Core(Error::not_found(format!(
                "settlement {key}"
            )))),
        }
    }
    .await;
    Answer(uri, r)
}

/// The status of a replica.
pub fn status_of_replica(replica: &Replica<Ledger>) -> Status {
    let (total, n, applied_here) =
        replica.read_local(|s| (s.total(), s.accounts.len(), s.applied_here()));
    let stats = replica.stats();
    Status {
        endpoint: replica.endpoint().to_owned(),
        role: replica.role(),
        leader: replica.leader().map(|l| l.candidate),
        applied_index: replica.applied_index(),
        applied_here,
        checkpoints: stats.checkpoints.load(Ordering::Relaxed),
        effects_run: stats.effects_run.load(Ordering::Relaxed),
        total,
        accounts: n,
    }
}

async fn status(State(app): State<App>) -> Json<Status> {
    Json(status_of_replica(&app.replica))
}

/// The routes of a replica; bodies over `max_body` bytes are refused with 413.
pub fn router(app: App, max_body: usize) -> Router {
    Router::new()
        .route("/deposit", post(replicate::<DepositBody>))
        .route("/transfer", post(replicate::<TransferBody>))
        .route("/settle", post(settle))
        .route("/accounts", get(accounts))
        .route("/accounts/{name}", get(account))
        .route("/settlements/{key}", get(settlement))
        .route("/status", get(status))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(app)
}
