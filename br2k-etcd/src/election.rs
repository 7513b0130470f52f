//! The election: campaigning with this client's lease, resigning, and observing the
//! leader (the oldest election key; its create revision is the term and fencing token).

use br2k_core::log::{LeaderInfo, LeaderStream, Leadership};
use br2k_core::{Error, Result, ValidationError};
use etcd_client::{
    Compare, CompareOp, GetOptions, LeaderKey, ResignOptions, SortOrder, SortTarget, Txn, TxnOp,
};
use futures::StreamExt;
use std::sync::atomic::Ordering;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::EtcdLog;
use crate::encoding::corrupt;
use crate::error::EtcdError;
use crate::session::timed;

/// A leadership this client won: its election key and lease.
#[derive(Debug, Clone)]
pub(crate) struct Held {
    /// The election key.
    pub(crate) key: Vec<u8>,
    /// The lease it was won with.
    pub(crate) lease: i64,
}

impl EtcdLog {
    /// The leadership `term` of this client, or [`Error::Conflict`].
    pub(crate) fn held(&self, term: u64) -> Result<Held> {
        self.inner.held.lock().get(&term).cloned().ok_or_else(|| {
            Error::conflict(format!(
                "fencing token {term} is not a current leadership of this client"
            ))
        })
    }

    /// The current leader and the revision it was read at.
    pub(crate) async fn leader_at(&self) -> Result<(Option<LeaderInfo>, i64)> {
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
}

/// [`br2k_core::log::ReplicatedLog::campaign`]: waits until `candidate` leads; a lease
/// that expired meanwhile is renewed and the campaign retried.
pub(crate) async fn campaign(log: &EtcdLog, candidate: &str) -> Result<Leadership> {
    if candidate.is_empty() || candidate.len() > 256 {
        return Err(ValidationError::malformed("candidate", "must be 1-256 bytes").into());
    }
    let s = &log.inner.session;
    for _ in 0..3 {
        if s.halted.load(Ordering::Acquire) {
            return Err(Error::unavailable("etcd log: session halted"));
        }
        let lease = s.lease();
        let mut el = s.client.election_client();
        match el
            .campaign(log.inner.keys.election.clone(), candidate, lease)
            .await
        {
            Ok(resp) => {
                let lk = resp
                    .leader()
                    .ok_or_else(|| corrupt(b"campaign", "response without leader key"))?;
                let term = lk.rev() as u64;
                let key = lk.key().to_vec();
                log.inner.held.lock().insert(
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
                if s.lease_lost(lease, &e).await {
                    s.renew(lease).await?;
                    continue;
                }
                return Err(e.into());
            }
        }
    }
    Err(Error::unavailable("etcd log: lease keeps expiring"))
}

/// [`br2k_core::log::ReplicatedLog::resign`]: deletes the election key of `leadership`.
pub(crate) async fn resign(log: &EtcdLog, leadership: &Leadership) -> Result<()> {
    let Some(held) = log.inner.held.lock().remove(&leadership.term) else {
        return Ok(());
    };
    {
        let mut c = log.inner.cache.lock();
        if c.is_some_and(|(t, _)| t == leadership.term) {
            *c = None;
        }
    }
    let s = &log.inner.session;
    let lk = LeaderKey::new()
        .with_name(log.inner.keys.election.clone())
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
        log.txn("resign", txn).await?;
    }
    Ok(())
}

/// [`br2k_core::log::ReplicatedLog::observe`]: the leader now, then each change.
pub(crate) async fn observe(log: &EtcdLog) -> Result<LeaderStream> {
    let (now, rev) = log.leader_at().await?;
    let p = log.inner.keys.election_prefix.clone();
    let mut stream = log.watch_prefix("observe", p, rev + 1).await?;
    let (tx, rx) = mpsc::channel(16);
    let me = log.clone();
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
