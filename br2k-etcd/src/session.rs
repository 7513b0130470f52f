//! This client's session: its lease, the keep-alive that holds it and the renewal
//! after it expired; [`timed`], the deadline of every unary etcd call.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use etcd_client::Client;
use tokio::sync::watch;

use crate::error::EtcdError;

/// This client's lease and its keep-alive.
pub(crate) struct Session {
    /// The etcd client (shared by every clone of the log).
    pub(crate) client: Client,
    /// The current lease id.
    pub(crate) lease: watch::Sender<i64>,
    /// The lease TTL in whole seconds.
    pub(crate) ttl_secs: i64,
    /// Deadline of unary calls.
    pub(crate) request_timeout: Duration,
    /// Set when the keep-alive was halted (a simulated crash): no renewal any more.
    pub(crate) halted: AtomicBool,
    /// Serializes renewals.
    pub(crate) renewing: tokio::sync::Mutex<()>,
}

impl Session {
    /// The current lease id.
    pub(crate) fn lease(&self) -> i64 {
        *self.lease.borrow()
    }

    /// Grants a fresh lease of the session's TTL.
    pub(crate) async fn grant(&self) -> std::result::Result<i64, EtcdError> {
        let mut lc = self.client.lease_client();
        let resp = timed(self.request_timeout, "lease grant", async {
            lc.grant(self.ttl_secs, None).await
        })
        .await?;
        Ok(resp.id())
    }

    /// Revokes the current lease (its keys and leaderships end at once); returns its id.
    pub(crate) async fn revoke(&self) -> std::result::Result<i64, EtcdError> {
        let id = self.lease();
        let mut lc = self.client.lease_client();
        timed(self.request_timeout, "lease revoke", async {
            lc.revoke(id).await
        })
        .await?;
        Ok(id)
    }

    /// Replaces `old` by a fresh lease (unless another task already did).
    pub(crate) async fn renew(&self, old: i64) -> std::result::Result<i64, EtcdError> {
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

    /// Whether `lease` is gone, after `err` failed a call made with it: decided by the
    /// error's variant and code when it says so, otherwise (an answer whose code does
    /// not tell, e.g. the election API's `Unknown`) by asking etcd for the lease's TTL.
    pub(crate) async fn lease_lost(&self, lease: i64, err: &EtcdError) -> bool {
        if err.is_lease_lost() {
            return true;
        }
        if !err.is_answer() {
            return false;
        }
        let mut lc = self.client.lease_client();
        match timed(self.request_timeout, "lease ttl", async {
            lc.time_to_live(lease, None).await
        })
        .await
        {
            Ok(resp) => resp.ttl() <= 0,
            Err(e) => e.is_lease_lost(),
        }
    }

    /// Keeps the current lease alive every third of its TTL; grants a new one when it
    /// expired (e.g. after a partition longer than the TTL).
    pub(crate) async fn keep_alive_loop(self: Arc<Self>) {
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

/// Runs `fut` with the deadline `limit`; its error and the timeout are [`EtcdError`]s
/// of `op`.
pub(crate) async fn timed<T>(
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
