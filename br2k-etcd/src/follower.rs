//! Following the log: a watch on the namespace's `log/` keys whose events carry the
//! committed chunks, with reads to catch up and resynchronize.

use std::collections::BTreeMap;

use br2k_core::log::{Entry, EntryStream};
use br2k_core::{Error, Result};
use bytes::Bytes;
use etcd_client::EventType;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::EtcdLog;
use crate::encoding::{decode_chunk, parse_index};
use crate::error::EtcdError;
use crate::read::compacted;

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

/// [`br2k_core::log::ReplicatedLog::watch`]: streams entries from `from` on.
pub(crate) async fn watch(log: &EtcdLog, from: u64) -> Result<EntryStream> {
    let from = from.max(1);
    let first = log.get_index(&log.inner.keys.first).await?;
    if from < first {
        return Err(compacted(from, first));
    }
    let (tx, rx) = mpsc::channel(1024);
    let me = log.clone();
    tokio::spawn(async move {
        if let Err(e) = me.follow(from, &tx).await {
            let _ = tx.send(Err(e)).await;
        }
    });
    Ok(ReceiverStream::new(rx).boxed())
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
            let log_prefix = format!("{}log/", self.inner.keys.namespace_prefix);
            let mut stream = self.watch_prefix("watch", log_prefix, rev + 1).await?;
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
}
