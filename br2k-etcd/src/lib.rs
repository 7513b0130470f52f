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
//!
//! Modules: `config` (settings), `encoding` (key names, entry chunks), `session` (the
//! lease and its keep-alive), `election` (campaign, resign, observe), `append` (fenced
//! appends, compaction), `read` (consistent reads), `follower` (watching the log),
//! `error` (the one mapping of etcd failures to [`br2k_core::Error`]).

use std::collections::HashMap;
use std::fmt;
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use br2k_core::Result;
use br2k_core::log::{Entry, EntryStream, LeaderInfo, LeaderStream, Leadership, ReplicatedLog};
use bytes::Bytes;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, KvClient, Txn, TxnOp, TxnResponse,
    WatchOptions, WatchStream,
};
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::task::JoinHandle;

mod append;
mod config;
mod election;
mod encoding;
mod error;
mod follower;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod read;
mod session;

pub use config::EtcdLogConfig;
use election::Held;
use encoding::{Keys, corrupt, pad, parse_index};
use error::EtcdError;
use session::{Session, timed};

/// Largest gRPC message this client decodes (reads return up to [`read::READ_CHUNKS`]
/// chunks).
const MAX_DECODE_BYTES: usize = 64 * 1024 * 1024;

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
        if let Some(t) = self.keeper.get_mut().take() {
            t.abort();
        }
    }
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

impl EtcdLog {
    /// Connects to `endpoints` with default settings (see [`EtcdLogConfig::new`]).
    pub async fn connect(endpoints: &[String], namespace: &str) -> Result<EtcdLog> {
        Self::connect_with(EtcdLogConfig::new(endpoints, namespace)).await
    }

    /// Connects, grants this client's lease, starts its keep-alive and creates the
    /// log's bookkeeping keys if the log is new. Unreachable endpoints are
    /// [`br2k_core::Error::Unavailable`].
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
        *log.inner.keeper.lock() = Some(tokio::spawn(session.keep_alive_loop()));
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
        let old = s.revoke().await?;
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
        if let Some(t) = self.inner.keeper.lock().take() {
            t.abort();
        }
    }

    /// Resigns by revoking the lease and stops the keep-alive: a clean shutdown.
    pub async fn close(&self) -> Result<()> {
        self.halt_keep_alive();
        self.inner.session.revoke().await?;
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

    /// Watches every key under `prefix` from revision `from` on (the deadline covers
    /// creating the watch).
    async fn watch_prefix(
        &self,
        op: &'static str,
        prefix: String,
        from: i64,
    ) -> Result<WatchStream> {
        let mut wc = self.inner.session.client.watch_client();
        let options = WatchOptions::new().with_prefix().with_start_revision(from);
        Ok(timed(self.inner.cfg.request_timeout, op, async {
            wc.watch(prefix, Some(options)).await
        })
        .await?)
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
            None => Err(corrupt(key.as_bytes(), "missing (namespace purged?)").into()),
        }
    }
}

#[async_trait]
impl ReplicatedLog for EtcdLog {
    async fn campaign(&self, candidate: &str) -> Result<Leadership> {
        election::campaign(self, candidate).await
    }

    async fn resign(&self, leadership: &Leadership) -> Result<()> {
        election::resign(self, leadership).await
    }

    async fn leader(&self) -> Result<Option<LeaderInfo>> {
        Ok(self.leader_at().await?.0)
    }

    async fn observe(&self) -> Result<LeaderStream> {
        election::observe(self).await
    }

    async fn append(
        &self,
        leadership: &Leadership,
        entries: Vec<Bytes>,
    ) -> Result<RangeInclusive<u64>> {
        append::append(self, leadership, entries).await
    }

    async fn read(&self, from: u64, max: usize) -> Result<Vec<Entry>> {
        read::read(self, from, max).await
    }

    async fn watch(&self, from: u64) -> Result<EntryStream> {
        follower::watch(self, from).await
    }

    async fn compact(&self, up_to: u64) -> Result<()> {
        append::compact(self, up_to).await
    }

    async fn first_index(&self) -> Result<u64> {
        self.get_index(&self.inner.keys.first).await
    }

    async fn last_index(&self) -> Result<u64> {
        self.get_index(&self.inner.keys.last).await
    }
}
