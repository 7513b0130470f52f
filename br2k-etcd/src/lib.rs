//! Replicated log on etcd for br2k: [`EtcdLog`] implements
//! [`br2k_core::log::ReplicatedLog`] with etcd-client.
//!
//! Layout under the namespace `NS` (every key starts with `NS/`):
//! - `NS/election/<lease>`: election keys (etcd's election API, one per candidate's
//!   lease); the leader is the oldest one, and its create revision is the fencing token.
//! - `NS/log/first`, `NS/log/last`: first retained and last committed index (20-digit
//!   decimals, so they compare as strings).
//! - `NS/log/e/<index>`: a chunk of consecutive entries starting at `<index>` (one
//!   append is usually one chunk). Entries past `last` are uncommitted and never read.
//!
//! Every append is one transaction that compares the leader key's create revision with
//! the leadership's term and `last` with the expected value, so a deposed leader's
//! append writes nothing and is refused with [`br2k_core::Error::Conflict`].

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::ops::RangeInclusive;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use br2k_core::log::{
    Entry, EntryStream, LeaderInfo, LeaderStream, Leadership, MAX_ENTRY_BYTES, ReplicatedLog,
    check_entries,
};
use br2k_core::{Error, Result, ValidationError};
use bytes::Bytes;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, KvClient,
    LeaderKey, PutOptions, ResignOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse,
    TxnResponse, WatchOptions,
};
use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

mod error;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;

use error::EtcdError;

/// Largest gRPC message this client decodes (reads return up to [`READ_CHUNKS`] chunks).
const MAX_DECODE_BYTES: usize = 64 * 1024 * 1024;
/// Chunks fetched by one read transaction.
const READ_CHUNKS: i64 = 32;
/// How often an append retries after finding `last` moved under it.
const APPEND_ATTEMPTS: usize = 5;

/// Settings of an [`EtcdLog`].
#[derive(Debug, Clone)]
pub struct EtcdLogConfig {
    /// etcd client endpoints (`http://127.0.0.1:2379`, ...).
    pub endpoints: Vec<String>,
    /// Namespace of this log: every key lives under `namespace/`.
    pub namespace: String,
    /// TTL of this client's lease (session): a crashed leader loses its leadership
    /// after at most this long (the election timeout). etcd rounds it up to whole
    /// seconds and to its own minimum.
    pub lease_ttl: Duration,
    /// Deadline of every unary etcd call (campaigns wait without one).
    pub request_timeout: Duration,
    /// Deadline for establishing a connection.
    pub connect_timeout: Duration,
    /// Largest value bytes put by one transaction: larger appends are staged in
    /// several transactions and committed by the last one. Keep it under etcd's
    /// `--max-request-bytes` (1.5 MiB by default).
    pub max_txn_bytes: usize,
}

impl EtcdLogConfig {
    /// Defaults: 5 s lease TTL, 5 s request timeout, 3 s connect timeout, 1 MB
    /// transactions.
    pub fn new(
        endpoints: impl IntoIterator<Item = impl Into<String>>,
        namespace: impl Into<String>,
    ) -> Self {
        Self {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            namespace: namespace.into(),
            lease_ttl: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(3),
            max_txn_bytes: 1_000_000,
        }
    }

    /// Endpoints from `BR2K_ETCD_ENDPOINTS` (comma-separated), other settings default.
    pub fn from_env(namespace: impl Into<String>) -> Result<Self> {
        let raw = std::env::var("BR2K_ETCD_ENDPOINTS").map_err(|_| {
            ValidationError::malformed("BR2K_ETCD_ENDPOINTS", "is not set or not unicode")
        })?;
        Ok(Self::new(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect::<Vec<_>>(),
            namespace,
        ))
    }

    fn validate(&self) -> Result<()> {
        let bad = |what: &str, reason: &str| Err(ValidationError::malformed(what, reason).into());
        if self.endpoints.is_empty() {
            return bad("etcd endpoints", "none given");
        }
        let ns = &self.namespace;
        if ns.is_empty()
            || ns.len() > 200
            || ns.ends_with('/')
            || ns.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return bad(
                "etcd log namespace",
                "must be 1-200 bytes without whitespace or control characters, not ending in '/'",
            );
        }
        if self.lease_ttl < Duration::from_secs(1) {
            return bad("lease TTL", "must be at least 1 s");
        }
        if self.request_timeout.is_zero() || self.connect_timeout.is_zero() {
            return bad("etcd timeouts", "must be positive");
        }
        if self.max_txn_bytes < 64 * 1024 {
            return bad("max_txn_bytes", "must be at least 64 KiB");
        }
        Ok(())
    }
}

/// Key names of one namespace.
#[derive(Debug)]
struct Keys {
    election: String,
    election_prefix: String,
    first: String,
    last: String,
    entry_prefix: String,
    namespace_prefix: String,
}

impl Keys {
    fn new(ns: &str) -> Self {
        Self {
            election: format!("{ns}/election"),
            election_prefix: format!("{ns}/election/"),
            first: format!("{ns}/log/first"),
            last: format!("{ns}/log/last"),
            entry_prefix: format!("{ns}/log/e/"),
            namespace_prefix: format!("{ns}/"),
        }
    }

    fn entry(&self, index: u64) -> String {
        format!("{}{}", self.entry_prefix, pad(index))
    }

    /// The end (exclusive) of the entry key range.
    fn entries_end(&self) -> String {
        prefix_end(&self.entry_prefix)
    }

    fn entry_index(&self, key: &[u8]) -> std::result::Result<u64, EtcdError> {
        std::str::from_utf8(key)
            .ok()
            .and_then(|k| k.strip_prefix(&self.entry_prefix))
            .and_then(|i| i.parse().ok())
            .ok_or_else(|| corrupt(key, "not an entry key"))
    }
}

/// The first key after every key starting with `prefix` (which ends in '/').
fn prefix_end(prefix: &str) -> String {
    let mut end = prefix.to_owned();
    end.pop();
    end.push('0');
    end
}

fn pad(n: u64) -> String {
    format!("{n:020}")
}

fn corrupt(key: &[u8], reason: impl fmt::Display) -> EtcdError {
    EtcdError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: reason.to_string(),
    }
}

fn parse_index(key: &[u8], value: &[u8]) -> std::result::Result<u64, EtcdError> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| corrupt(key, "not a decimal index"))
}

/// Encodes a chunk: term, count, then length-prefixed entries.
fn encode_chunk(term: u64, entries: &[Bytes]) -> Vec<u8> {
    let size = 12 + entries.iter().map(|e| 4 + e.len()).sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&term.to_be_bytes());
    out.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    for e in entries {
        out.extend_from_slice(&(e.len() as u32).to_be_bytes());
        out.extend_from_slice(e);
    }
    out
}

/// Sends the held chunks' entries from `next` up to `last` in order. `Some(false)`
/// when an entry in that range is not held (the caller reads it instead), `None`
/// when the receiver is gone.
async fn emit_held(
    held: &mut BTreeMap<u64, (u64, Vec<Bytes>)>,
    next: &mut u64,
    last: u64,
    tx: &mpsc::Sender<Result<Entry>>,
) -> Option<bool> {
    while *next <= last {
        let Some((&start, _)) = held.range(..=*next).next_back() else {
            return Some(false);
        };
        let (term, data) = held.remove(&start).expect("held chunk");
        if start + data.len() as u64 <= *next {
            continue; // Wholly before `next`: already delivered.
        }
        for (i, d) in data.into_iter().enumerate() {
            let index = start + i as u64;
            if index < *next || index > last {
                continue;
            }
            let entry = Entry {
                index,
                term,
                data: d,
            };
            if tx.send(Ok(entry)).await.is_err() {
                return None;
            }
            *next = index + 1;
        }
    }
    // Chunks wholly at or below `last` are delivered; later ones stay held.
    held.retain(|&start, _| start > last);
    Some(true)
}

fn decode_chunk(key: &[u8], value: &[u8]) -> std::result::Result<(u64, Vec<Bytes>), EtcdError> {
    let bad = |r: &str| corrupt(key, format!("malformed chunk: {r}"));
    let buf = Bytes::copy_from_slice(value);
    if buf.len() < 12 {
        return Err(bad("short header"));
    }
    let term = u64::from_be_bytes(buf[0..8].try_into().map_err(|_| bad("term"))?);
    let count = u32::from_be_bytes(buf[8..12].try_into().map_err(|_| bad("count"))?) as usize;
    let mut at = 12;
    let mut entries = Vec::with_capacity(count.min(4096));
    for _ in 0..count {
        let len_end = at + 4;
        if len_end > buf.len() {
            return Err(bad("truncated length"));
        }
        let len = u32::from_be_bytes(buf[at..len_end].try_into().map_err(|_| bad("length"))?);
        let end = len_end + len as usize;
        if end > buf.len() {
            return Err(bad("truncated entry"));
        }
        entries.push(buf.slice(len_end..end));
        at = end;
    }
    if at != buf.len() || entries.is_empty() {
        return Err(bad("trailing bytes or no entries"));
    }
    Ok((term, entries))
}

/// Splits `entries` into chunks of at most `budget` encoded bytes (a chunk holds at
/// least one entry), returning each chunk's first index and value.
fn chunks(term: u64, start: u64, entries: &[Bytes], budget: usize) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut from = 0;
    let mut size = 12;
    for (i, e) in entries.iter().enumerate() {
        let add = 4 + e.len();
        if i > from && size + add > budget {
            out.push((start + from as u64, encode_chunk(term, &entries[from..i])));
            from = i;
            size = 12;
        }
        size += add;
    }
    out.push((start + from as u64, encode_chunk(term, &entries[from..])));
    out
}

/// This client's lease and its keep-alive.
struct Session {
    client: Client,
    lease: watch::Sender<i64>,
    ttl_secs: i64,
    request_timeout: Duration,
    halted: AtomicBool,
    renewing: tokio::sync::Mutex<()>,
}

impl Session {
    fn lease(&self) -> i64 {
        *self.lease.borrow()
    }

    async fn grant(&self) -> std::result::Result<i64, EtcdError> {
        let mut lc = self.client.lease_client();
        let resp = timed(self.request_timeout, "lease grant", async {
            lc.grant(self.ttl_secs, None).await
        })
        .await?;
        Ok(resp.id())
    }

    /// Replaces `old` by a fresh lease (unless another task already did).
    async fn renew(&self, old: i64) -> std::result::Result<i64, EtcdError> {
        let _guard = self.renewing.lock().await;
        let now = self.lease();
        if now != old {
            return Ok(now);
        }
        let id = self.grant().await?;
        self.lease.send_replace(id);
        tracing::info!(old, new = id, "etcd lease renewed");
        Ok(id)
    }

    /// Keeps the current lease alive every third of its TTL; grants a new one when it
    /// expired (e.g. after a partition longer than the TTL).
    async fn keep_alive_loop(self: Arc<Self>) {
        let interval = Duration::from_millis((self.ttl_secs as u64 * 1000 / 3).max(200));
        loop {
            if self.halted.load(Ordering::Acquire) {
                return;
            }
            let id = self.lease();
            let mut lc = self.client.lease_client();
            match lc.keep_alive(id).await {
                Ok((mut keeper, mut stream)) => loop {
                    tokio::time::sleep(interval).await;
                    if self.halted.load(Ordering::Acquire) {
                        return;
                    }
                    if self.lease() != id || keeper.keep_alive().await.is_err() {
                        break;
                    }
                    match tokio::time::timeout(interval * 2, stream.message()).await {
                        Ok(Ok(Some(resp))) if resp.ttl() > 0 => {}
                        Ok(Ok(Some(_))) => {
                            let _ = self.renew(id).await;
                            break;
                        }
                        _ => break,
                    }
                },
                Err(e) => {
                    let e = EtcdError::client("lease keep-alive", e);
                    if e.is_lease_lost() {
                        if let Err(e) = self.renew(id).await {
                            tracing::debug!(error = %e, "cannot renew the etcd lease");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    } else {
                        tracing::debug!(error = %e, "etcd keep-alive failed; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }
    }
}

async fn timed<T>(
    limit: Duration,
    op: &'static str,
    fut: impl Future<Output = std::result::Result<T, etcd_client::Error>>,
) -> std::result::Result<T, EtcdError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r.map_err(|e| EtcdError::client(op, e)),
        Err(_) => Err(EtcdError::Timeout {
            op,
            ms: limit.as_millis(),
        }),
    }
}

/// A leadership this client won: its election key and lease.
#[derive(Debug, Clone)]
struct Held {
    key: Vec<u8>,
    lease: i64,
}

struct Inner {
    cfg: EtcdLogConfig,
    keys: Keys,
    kv: KvClient,
    session: Arc<Session>,
    held: Mutex<HashMap<u64, Held>>,
    /// `(term, last index)` known to the current leadership of this client.
    cache: Mutex<Option<(u64, u64)>>,
    keeper: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(t) = lock(&self.keeper).take() {
            t.abort();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A [`ReplicatedLog`] on etcd. Clones share one client and one lease (session);
/// each replica process (or in-process test replica) connects its own.
#[derive(Clone)]
pub struct EtcdLog {
    inner: Arc<Inner>,
}

impl fmt::Debug for EtcdLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdLog")
            .field("endpoints", &self.inner.cfg.endpoints)
            .field("namespace", &self.inner.cfg.namespace)
            .field("lease", &self.inner.session.lease())
            .finish()
    }
}

/// What one consistent read returned.
struct ReadOut {
    first: u64,
    last: u64,
    entries: Vec<Entry>,
    revision: i64,
}

impl EtcdLog {
    /// Connects to `endpoints` with default settings (see [`EtcdLogConfig::new`]).
    pub async fn connect(endpoints: &[String], namespace: &str) -> Result<EtcdLog> {
        Self::connect_with(EtcdLogConfig::new(endpoints, namespace)).await
    }

    /// Connects, grants this client's lease, starts its keep-alive and creates the
    /// log's bookkeeping keys if the log is new. Unreachable endpoints are
    /// [`Error::Unavailable`].
    pub async fn connect_with(config: EtcdLogConfig) -> Result<EtcdLog> {
        config.validate()?;
        let opts = ConnectOptions::new()
            .with_connect_timeout(config.connect_timeout)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(3))
            .with_keep_alive_while_idle(true);
        let client = timed(config.connect_timeout, "connect", async {
            Client::connect(&config.endpoints, Some(opts)).await
        })
        .await?;
        let kv = client
            .kv_client()
            .max_decoding_message_size(MAX_DECODE_BYTES);
        let session = Arc::new(Session {
            client,
            lease: watch::Sender::new(0),
            ttl_secs: config.lease_ttl.as_secs_f64().ceil() as i64,
            request_timeout: config.request_timeout,
            halted: AtomicBool::new(false),
            renewing: tokio::sync::Mutex::new(()),
        });
        let id = session.grant().await?;
        session.lease.send_replace(id);
        let keys = Keys::new(&config.namespace);
        let log = EtcdLog {
            inner: Arc::new(Inner {
                cfg: config,
                keys,
                kv,
                session: session.clone(),
                held: Mutex::default(),
                cache: Mutex::default(),
                keeper: Mutex::default(),
            }),
        };
        log.init().await?;
        *lock(&log.inner.keeper) = Some(tokio::spawn(session.keep_alive_loop()));
        Ok(log)
    }

    /// The settings this log was connected with.
    pub fn config(&self) -> &EtcdLogConfig {
        &self.inner.cfg
    }

    /// The id of this client's current lease.
    pub fn lease_id(&self) -> i64 {
        self.inner.session.lease()
    }

    /// Ends this client's session now (revokes its lease), as an expiry would: its
    /// leaderships end at once. Later campaigns use a fresh lease (none after
    /// [`EtcdLog::halt_keep_alive`]: halt, then revoke, is a crash whose lease expiry
    /// is fast-forwarded).
    pub async fn revoke_session(&self) -> Result<()> {
        let s = &self.inner.session;
        let old = s.lease();
        let mut lc = s.client.lease_client();
        timed(s.request_timeout, "lease revoke", async {
            lc.revoke(old).await
        })
        .await?;
        if !s.halted.load(Ordering::Acquire) {
            s.renew(old).await?;
        }
        Ok(())
    }

    /// Stops the keep-alive without revoking, as a crash of this process would: the
    /// lease and every leadership of this client end after the lease TTL, and this
    /// client cannot campaign any more.
    pub fn halt_keep_alive(&self) {
        self.inner.session.halted.store(true, Ordering::Release);
        if let Some(t) = lock(&self.inner.keeper).take() {
            t.abort();
        }
    }

    /// Resigns by revoking the lease and stops the keep-alive: a clean shutdown.
    pub async fn close(&self) -> Result<()> {
        self.halt_keep_alive();
        let s = &self.inner.session;
        let id = s.lease();
        let mut lc = s.client.lease_client();
        timed(s.request_timeout, "lease revoke", async {
            lc.revoke(id).await
        })
        .await?;
        Ok(())
    }

    /// Deletes every key of this log's namespace (entries, bookkeeping, election).
    pub async fn purge(&self) -> Result<()> {
        let mut kv = self.inner.kv.clone();
        let p = self.inner.keys.namespace_prefix.clone();
        timed(self.inner.cfg.request_timeout, "purge", async {
            kv.delete(p, Some(DeleteOptions::new().with_prefix())).await
        })
        .await?;
        Ok(())
    }

    async fn txn(&self, op: &'static str, txn: Txn) -> std::result::Result<TxnResponse, EtcdError> {
        let mut kv = self.inner.kv.clone();
        timed(self.inner.cfg.request_timeout, op, async move {
            kv.txn(txn).await
        })
        .await
    }

    /// Creates `first` = 1 and `last` = 0 if the log is new.
    async fn init(&self) -> Result<()> {
        let k = &self.inner.keys;
        let txn = Txn::new()
            .when([Compare::version(k.last.clone(), CompareOp::Equal, 0)])
            .and_then([
                TxnOp::put(k.first.clone(), pad(1), None),
                TxnOp::put(k.last.clone(), pad(0), None),
            ]);
        self.txn("init log", txn).await?;
        Ok(())
    }

    fn held(&self, term: u64) -> Result<Held> {
        lock(&self.inner.held).get(&term).cloned().ok_or_else(|| {
            Error::conflict(format!(
                "fencing token {term} is not a current leadership of this client"
            ))
        })
    }

    fn cached_last(&self, term: u64) -> Option<u64> {
        lock(&self.inner.cache)
            .filter(|(t, _)| *t == term)
            .map(|(_, l)| l)
    }

    fn set_cache(&self, v: Option<(u64, u64)>) {
        *lock(&self.inner.cache) = v;
    }

    /// Reads `last` and removes uncommitted chunks past it (left by an append whose
    /// outcome was unknown), guarded by the leadership.
    async fn prepare(&self, term: u64, held: &Held) -> Result<u64> {
        let k = &self.inner.keys;
        for _ in 0..APPEND_ATTEMPTS {
            let last = self.get_index(&k.last).await?;
            let txn = Txn::new()
                .when([
                    Compare::create_revision(held.key.clone(), CompareOp::Equal, term as i64),
                    Compare::value(k.last.clone(), CompareOp::Equal, pad(last)),
                ])
                .and_then([TxnOp::delete(
                    k.entry(last + 1),
                    Some(DeleteOptions::new().with_range(k.entries_end())),
                )])
                .or_else([TxnOp::get(held.key.clone(), None)]);
            let resp = self.txn("append (prepare)", txn).await?;
            if resp.succeeded() {
                self.set_cache(Some((term, last)));
                return Ok(last);
            }
            self.check_still_leader(&resp, term)?;
        }
        Err(Error::unavailable("etcd log: last index keeps moving"))
    }

    /// After a failed guarded transaction whose else branch starts with a get of the
    /// leader key: `Conflict` if the leadership is gone, `Ok` if only `last` moved.
    fn check_still_leader(&self, resp: &TxnResponse, term: u64) -> Result<()> {
        let alive = match resp.op_responses().first() {
            Some(TxnOpResponse::Get(g)) => g
                .kvs()
                .first()
                .is_some_and(|kv| kv.create_revision() == term as i64),
            _ => false,
        };
        if alive {
            Ok(())
        } else {
            self.set_cache(None);
            lock(&self.inner.held).remove(&term);
            Err(Error::conflict(format!(
                "fencing token {term} is stale: the leadership ended"
            )))
        }
    }

    async fn get_index(&self, key: &str) -> Result<u64> {
        let mut kv = self.inner.kv.clone();
        let k = key.to_owned();
        let resp = timed(self.inner.cfg.request_timeout, "get index", async move {
            kv.get(k, None).await
        })
        .await?;
        match resp.kvs().first() {
            Some(kv) => Ok(parse_index(kv.key(), kv.value())?),
            None => Err(Error::backend(
                "etcd",
                EtcdError::Corrupt {
                    key: key.to_owned(),
                    reason: "missing (namespace purged?)".into(),
                },
                false,
            )),
        }
    }

    /// One consistent read of up to [`READ_CHUNKS`] chunks from `from` (no check
    /// against `first`: the caller decides).
    async fn read_chunks(&self, from: u64) -> Result<ReadOut> {
        let k = &self.inner.keys;
        let txn = Txn::new().and_then([
            TxnOp::get(k.first.clone(), None),
            TxnOp::get(k.last.clone(), None),
            TxnOp::get(
                k.entry_prefix.clone(),
                Some(
                    GetOptions::new()
                        .with_range(k.entry(from + 1))
                        .with_sort(SortTarget::Key, SortOrder::Descend)
                        .with_limit(1),
                ),
            ),
            TxnOp::get(
                k.entry(from + 1),
                Some(
                    GetOptions::new()
                        .with_range(k.entries_end())
                        .with_sort(SortTarget::Key, SortOrder::Ascend)
                        .with_limit(READ_CHUNKS),
                ),
            ),
        ]);
        let resp = self.txn("read", txn).await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let ops = resp.op_responses();
        let get = |i: usize| match ops.get(i) {
            Some(TxnOpResponse::Get(g)) => Ok(g),
            _ => Err(Error::backend(
                "etcd",
                corrupt(b"txn", "unexpected transaction response"),
                false,
            )),
        };
        let index_of = |i: usize, key: &str| -> Result<u64> {
            match get(i)?.kvs().first() {
                Some(kv) => Ok(parse_index(kv.key(), kv.value())?),
                None => Err(corrupt(key.as_bytes(), "missing (namespace purged?)").into()),
            }
        };
        let first = index_of(0, &k.first)?;
        let last = index_of(1, &k.last)?;
        let mut entries = Vec::new();
        let mut next = from;
        let chunks = get(2)?.kvs().iter().chain(get(3)?.kvs().iter());
        for kv in chunks {
            if next > last {
                break;
            }
            let start = k.entry_index(kv.key())?;
            if start > next {
                return Err(corrupt(kv.key(), format!("gap: expected index {next}")).into());
            }
            let (term, data) = decode_chunk(kv.key(), kv.value())?;
            for (i, d) in data.into_iter().enumerate() {
                let index = start + i as u64;
                if index < next {
                    continue;
                }
                if index > last {
                    break;
                }
                entries.push(Entry {
                    index,
                    term,
                    data: d,
                });
                next = index + 1;
            }
        }
        Ok(ReadOut {
            first,
            last,
            entries,
            revision,
        })
    }

    async fn leader_at(&self) -> Result<(Option<LeaderInfo>, i64)> {
        let mut kv = self.inner.kv.clone();
        let p = self.inner.keys.election_prefix.clone();
        let resp = timed(self.inner.cfg.request_timeout, "leader", async move {
            kv.get(
                p,
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_sort(SortTarget::Create, SortOrder::Ascend)
                        .with_limit(1),
                ),
            )
            .await
        })
        .await?;
        let rev = resp.header().map_or(0, |h| h.revision());
        let info = resp.kvs().first().map(|kv| LeaderInfo {
            candidate: String::from_utf8_lossy(kv.value()).into_owned(),
            term: kv.create_revision() as u64,
        });
        Ok((info, rev))
    }

    async fn put_txn(&self, term: u64, held: &Held, last: u64, puts: Vec<TxnOp>) -> Result<bool> {
        let k = &self.inner.keys;
        let txn = Txn::new()
            .when([
                Compare::create_revision(held.key.clone(), CompareOp::Equal, term as i64),
                Compare::value(k.last.clone(), CompareOp::Equal, pad(last)),
            ])
            .and_then(puts)
            .or_else([TxnOp::get(held.key.clone(), None)]);
        let resp = match self.txn("append", txn).await {
            Ok(r) => r,
            Err(e) => {
                // Outcome unknown: re-read `last` before the next append.
                self.set_cache(None);
                return Err(e.into());
            }
        };
        if resp.succeeded() {
            return Ok(true);
        }
        self.check_still_leader(&resp, term)?;
        self.set_cache(None);
        Ok(false)
    }
}

#[async_trait]
impl ReplicatedLog for EtcdLog {
    async fn campaign(&self, candidate: &str) -> Result<Leadership> {
        if candidate.is_empty() || candidate.len() > 256 {
            return Err(ValidationError::malformed("candidate", "must be 1-256 bytes").into());
        }
        let s = &self.inner.session;
        for _ in 0..3 {
            if s.halted.load(Ordering::Acquire) {
                return Err(Error::unavailable("etcd log: session halted"));
            }
            let lease = s.lease();
            let mut el = s.client.election_client();
            match el
                .campaign(self.inner.keys.election.clone(), candidate, lease)
                .await
            {
                Ok(resp) => {
                    let lk = resp.leader().ok_or_else(|| {
                        Error::backend(
                            "etcd",
                            corrupt(b"campaign", "response without leader key"),
                            false,
                        )
                    })?;
                    let term = lk.rev() as u64;
                    let key = lk.key().to_vec();
                    lock(&self.inner.held).insert(
                        term,
                        Held {
                            key: key.clone(),
                            lease,
                        },
                    );
                    return Ok(Leadership {
                        candidate: candidate.to_owned(),
                        term,
                        key: String::from_utf8_lossy(&key).into_owned(),
                    });
                }
                Err(e) => {
                    let e = EtcdError::client("campaign", e);
                    if e.is_lease_lost() {
                        s.renew(lease).await?;
                        continue;
                    }
                    return Err(e.into());
                }
            }
        }
        Err(Error::unavailable("etcd log: lease keeps expiring"))
    }

    async fn resign(&self, leadership: &Leadership) -> Result<()> {
        let Some(held) = lock(&self.inner.held).remove(&leadership.term) else {
            return Ok(());
        };
        {
            let mut c = lock(&self.inner.cache);
            if c.is_some_and(|(t, _)| t == leadership.term) {
                *c = None;
            }
        }
        let s = &self.inner.session;
        let lk = LeaderKey::new()
            .with_name(self.inner.keys.election.clone())
            .with_key(held.key.clone())
            .with_rev(leadership.term as i64)
            .with_lease(held.lease);
        let mut el = s.client.election_client();
        let done = timed(s.request_timeout, "resign", async {
            el.resign(Some(ResignOptions::new().with_leader(lk))).await
        })
        .await;
        if let Err(e) = done {
            // The election API needs the lease alive; delete the key directly if it
            // is still this leadership's (idempotent otherwise).
            tracing::debug!(error = %e, "election resign failed; deleting the key");
            let txn = Txn::new()
                .when([Compare::create_revision(
                    held.key.clone(),
                    CompareOp::Equal,
                    leadership.term as i64,
                )])
                .and_then([TxnOp::delete(held.key, None)]);
            self.txn("resign", txn).await?;
        }
        Ok(())
    }

    async fn leader(&self) -> Result<Option<LeaderInfo>> {
        Ok(self.leader_at().await?.0)
    }

    async fn observe(&self) -> Result<LeaderStream> {
        let (now, rev) = self.leader_at().await?;
        let mut wc = self.inner.session.client.watch_client();
        let p = self.inner.keys.election_prefix.clone();
        let mut stream = timed(self.inner.cfg.request_timeout, "observe", async {
            wc.watch(
                p,
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(rev + 1),
                ),
            )
            .await
        })
        .await?;
        let (tx, rx) = mpsc::channel(16);
        let me = self.clone();
        tokio::spawn(async move {
            let mut seen = now.clone();
            if tx.send(Ok(now)).await.is_err() {
                return;
            }
            loop {
                let msg = tokio::select! {
                    _ = tx.closed() => return,
                    m = stream.message() => m,
                };
                match msg {
                    Ok(Some(resp)) if !resp.canceled() => {
                        if resp.events().is_empty() {
                            continue;
                        }
                        match me.leader_at().await {
                            Ok((now, _)) if now != seen => {
                                seen = now.clone();
                                if tx.send(Ok(now)).await.is_err() {
                                    return;
                                }
                            }
                            Ok(_) => {}
                            Err(e) => {
                                let _ = tx.send(Err(e)).await;
                                return;
                            }
                        }
                    }
                    Ok(Some(resp)) => {
                        let _ = tx
                            .send(Err(Error::unavailable(format!(
                                "etcd election watch canceled: {}",
                                resp.cancel_reason()
                            ))))
                            .await;
                        return;
                    }
                    Ok(None) => {
                        let _ = tx
                            .send(Err(Error::unavailable("etcd election watch ended")))
                            .await;
                        return;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(EtcdError::client("observe", e).into())).await;
                        return;
                    }
                }
            }
        });
        Ok(ReceiverStream::new(rx).boxed())
    }

    async fn append(
        &self,
        leadership: &Leadership,
        entries: Vec<Bytes>,
    ) -> Result<RangeInclusive<u64>> {
        check_entries(&entries, MAX_ENTRY_BYTES)?;
        let term = leadership.term;
        let held = self.held(term)?;
        let k = &self.inner.keys;
        let n = entries.len() as u64;
        'attempt: for _ in 0..APPEND_ATTEMPTS {
            let last = match self.cached_last(term) {
                Some(l) => l,
                None => self.prepare(term, &held).await?,
            };
            let mut parts = chunks(term, last + 1, &entries, self.inner.cfg.max_txn_bytes);
            let (final_start, final_value) = parts.pop().expect("at least one chunk");
            // Large appends: stage the leading chunks past `last` (invisible to readers).
            for (start, value) in parts {
                let put = vec![TxnOp::put(k.entry(start), value, None)];
                if !self.put_txn(term, &held, last, put).await? {
                    continue 'attempt;
                }
            }
            let commit = vec![
                TxnOp::put(k.entry(final_start), final_value, None::<PutOptions>),
                TxnOp::put(k.last.clone(), pad(last + n), None),
            ];
            if self.put_txn(term, &held, last, commit).await? {
                self.set_cache(Some((term, last + n)));
                return Ok(last + 1..=last + n);
            }
        }
        Err(Error::unavailable("etcd log: last index keeps moving"))
    }

    async fn read(&self, from: u64, max: usize) -> Result<Vec<Entry>> {
        let from = from.max(1);
        let mut out: Vec<Entry> = Vec::new();
        let mut next = from;
        while out.len() < max {
            let r = self.read_chunks(next).await?;
            if from < r.first {
                return Err(compacted(from, r.first));
            }
            if r.entries.is_empty() {
                break;
            }
            next = r.entries.last().map_or(next, |e| e.index + 1);
            out.extend(r.entries.into_iter().take(max - out.len()));
            if next > r.last {
                break;
            }
        }
        Ok(out)
    }

    async fn watch(&self, from: u64) -> Result<EntryStream> {
        let from = from.max(1);
        let first = self.get_index(&self.inner.keys.first).await?;
        if from < first {
            return Err(compacted(from, first));
        }
        let (tx, rx) = mpsc::channel(1024);
        let me = self.clone();
        tokio::spawn(async move {
            if let Err(e) = me.follow(from, &tx).await {
                let _ = tx.send(Err(e)).await;
            }
        });
        Ok(ReceiverStream::new(rx).boxed())
    }

    async fn compact(&self, up_to: u64) -> Result<()> {
        let k = &self.inner.keys;
        let txn = Txn::new().and_then([
            TxnOp::get(k.first.clone(), None),
            TxnOp::get(k.last.clone(), None),
            TxnOp::get(
                k.entry_prefix.clone(),
                Some(
                    GetOptions::new()
                        .with_range(k.entry(up_to.saturating_add(2)))
                        .with_sort(SortTarget::Key, SortOrder::Descend)
                        .with_limit(1)
                        .with_keys_only(),
                ),
            ),
        ]);
        let resp = self.txn("compact (read)", txn).await?;
        let ops = resp.op_responses();
        let kv_at = |i: usize| match ops.get(i) {
            Some(TxnOpResponse::Get(g)) => g.kvs().first().cloned(),
            _ => None,
        };
        let index_at = |i: usize, name: &str| -> Result<u64> {
            let kv = kv_at(i).ok_or_else(|| corrupt(name.as_bytes(), "missing"))?;
            Ok(parse_index(kv.key(), kv.value())?)
        };
        let first = index_at(0, &k.first)?;
        let last = index_at(1, &k.last)?;
        if up_to > last {
            return Err(ValidationError::malformed(
                "compaction index",
                format!("{up_to} is past the last index {last}"),
            )
            .into());
        }
        if up_to < first {
            return Ok(());
        }
        // Chunks wholly at or below `up_to` go; one straddling it stays.
        let cut = if up_to == last {
            up_to + 1
        } else {
            match kv_at(2) {
                Some(kv) => k.entry_index(kv.key())?,
                None => up_to + 1,
            }
        };
        let txn = Txn::new()
            .when([Compare::value(
                k.first.clone(),
                CompareOp::Less,
                pad(up_to + 1),
            )])
            .and_then([
                TxnOp::delete(
                    k.entry_prefix.clone(),
                    Some(DeleteOptions::new().with_range(k.entry(cut))),
                ),
                TxnOp::put(k.first.clone(), pad(up_to + 1), None),
            ]);
        self.txn("compact", txn).await?;
        Ok(())
    }

    async fn first_index(&self) -> Result<u64> {
        self.get_index(&self.inner.keys.first).await
    }

    async fn last_index(&self) -> Result<u64> {
        self.get_index(&self.inner.keys.last).await
    }
}

fn compacted(from: u64, first: u64) -> Error {
    Error::not_found(format!(
        "log entries from {from}: compacted, first index is {first}"
    ))
}

impl EtcdLog {
    /// Streams entries from `next` on: reads what is committed, then watches `last`
    /// from the read's revision and reads again on each change. Returns on error or
    /// when the receiver is gone.
    async fn follow(&self, mut next: u64, tx: &mpsc::Sender<Result<Entry>>) -> Result<()> {
        // Catch up; returns the revision the reads reached.
        let catch_up = async |next: &mut u64| -> Result<Option<i64>> {
            loop {
                let r = self.read_chunks(*next).await?;
                if *next < r.first {
                    return Err(compacted(*next, r.first));
                }
                let done =
                    r.entries.is_empty() || r.entries.last().is_some_and(|e| e.index >= r.last);
                for e in r.entries {
                    *next = e.index + 1;
                    if tx.send(Ok(e)).await.is_err() {
                        return Ok(None);
                    }
                }
                if done {
                    return Ok(Some(r.revision));
                }
            }
        };
        loop {
            let Some(rev) = catch_up(&mut next).await? else {
                return Ok(());
            };
            // Watch the whole log (`first`, `last` and the entry chunks): the events
            // carry the committed chunks, so following costs no read per append. A
            // chunk is held until `last` covers it (large appends stage chunks past
            // `last`); anything the events do not explain falls back to a read.
            let mut wc = self.inner.session.client.watch_client();
            let log_prefix = format!("{}log/", self.inner.keys.namespace_prefix);
            let mut stream = timed(self.inner.cfg.request_timeout, "watch", async {
                wc.watch(
                    log_prefix,
                    Some(
                        WatchOptions::new()
                            .with_prefix()
                            .with_start_revision(rev + 1),
                    ),
                )
                .await
            })
            .await?;
            let mut held: BTreeMap<u64, (u64, Vec<Bytes>)> = BTreeMap::new();
            loop {
                let msg = tokio::select! {
                    _ = tx.closed() => return Ok(()),
                    m = stream.message() => m,
                };
                match msg {
                    Ok(Some(resp)) if resp.canceled() => {
                        // E.g. the revision was compacted by etcd: resynchronize.
                        tracing::debug!(reason = resp.cancel_reason(), "etcd watch canceled");
                        break;
                    }
                    Ok(Some(resp)) => {
                        let mut resync = false;
                        for ev in resp.events() {
                            let Some(kv) = ev.kv() else { continue };
                            let key = kv.key();
                            if key.starts_with(self.inner.keys.entry_prefix.as_bytes()) {
                                let start = self.inner.keys.entry_index(key)?;
                                if ev.event_type() == EventType::Put {
                                    held.insert(start, decode_chunk(key, kv.value())?);
                                } else {
                                    held.remove(&start);
                                }
                            } else if key == self.inner.keys.last.as_bytes()
                                && ev.event_type() == EventType::Put
                            {
                                let last = parse_index(key, kv.value())?;
                                match emit_held(&mut held, &mut next, last, tx).await {
                                    Some(true) => {}
                                    Some(false) => resync = true,
                                    None => return Ok(()),
                                }
                            }
                        }
                        if resync {
                            held.clear();
                            if catch_up(&mut next).await?.is_none() {
                                return Ok(());
                            }
                        }
                    }
                    Ok(None) => return Err(Error::unavailable("etcd watch ended")),
                    Err(e) => return Err(EtcdError::client("watch", e).into()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn held_chunks_are_emitted_in_order_up_to_last() {
        let b = |s: &'static str| Bytes::from_static(s.as_bytes());
        let (tx, mut rx) = mpsc::channel(16);
        let mut held = BTreeMap::new();
        held.insert(1, (7, vec![b("a"), b("b")]));
        held.insert(3, (7, vec![b("c")]));
        held.insert(4, (7, vec![b("staged")])); // past `last`: stays held
        let mut next = 2; // entry 1 was delivered by a read
        assert_eq!(emit_held(&mut held, &mut next, 3, &tx).await, Some(true));
        let got: Vec<(u64, Bytes)> = (0..2)
            .map(|_| rx.try_recv().unwrap().unwrap())
            .map(|e| (e.index, e.data))
            .collect();
        assert_eq!(got, vec![(2, b("b")), (3, b("c"))]);
        assert!(rx.try_recv().is_err());
        assert_eq!(next, 4);
        assert_eq!(held.keys().copied().collect::<Vec<_>>(), vec![4]);
        // A committed entry that no event carried: the caller must read.
        let mut next = 5;
        assert_eq!(emit_held(&mut held, &mut next, 5, &tx).await, Some(false));
        drop(rx);
        let mut held = BTreeMap::from([(5, (7, vec![b("x")]))]);
        assert_eq!(emit_held(&mut held, &mut next, 5, &tx).await, None);
    }

    #[test]
    fn chunks_round_trip_and_respect_the_budget() {
        let entries: Vec<Bytes> = (0..100)
            .map(|i| Bytes::from(vec![i as u8; 1000 + i]))
            .collect();
        let parts = chunks(7, 11, &entries, 20_000);
        assert!(parts.len() > 1);
        let mut next = 11;
        let mut all = Vec::new();
        for (start, value) in &parts {
            assert_eq!(*start, next);
            assert!(value.len() <= 20_000);
            let (term, data) = decode_chunk(b"k", value).unwrap();
            assert_eq!(term, 7);
            next += data.len() as u64;
            all.extend(data);
        }
        assert_eq!(all, entries);
        let big = vec![Bytes::from(vec![1u8; 50_000])];
        assert_eq!(chunks(1, 1, &big, 20_000).len(), 1, "one entry always fits");
    }

    #[test]
    fn malformed_chunks_are_refused() {
        let good = encode_chunk(3, &[Bytes::from_static(b"abc")]);
        for bad in [&good[..5], &good[..good.len() - 1], &[0u8; 12][..]] {
            assert!(decode_chunk(b"k", bad).is_err());
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(decode_chunk(b"k", &trailing).is_err());
    }

    #[test]
    fn keys_sort_by_index_and_config_is_validated() {
        let k = Keys::new("ns");
        assert!(k.entry(9) < k.entry(10));
        assert!(k.entry(u64::MAX) < k.entries_end());
        assert_eq!(k.entry_index(k.entry(42).as_bytes()).unwrap(), 42);
        assert!(pad(9) < pad(10));
        let ok = EtcdLogConfig::new(["http://127.0.0.1:2379"], "ns");
        assert!(ok.validate().is_ok());
        for ns in ["", "a b", "a/"] {
            let c = EtcdLogConfig::new(["http://127.0.0.1:2379"], ns);
            assert!(
                matches!(c.validate(), Err(Error::InvalidInput(_))),
                "{ns:?}"
            );
        }
        let none = EtcdLogConfig::new(Vec::<String>::new(), "ns");
        assert!(matches!(none.validate(), Err(Error::InvalidInput(_))));
    }
}
