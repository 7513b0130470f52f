//! Appending under the leadership's fence (a transaction comparing the leader key's
//! create revision and `last`), and compaction.

use std::ops::RangeInclusive;

use br2k_core::log::{Leadership, MAX_ENTRY_BYTES, check_entries};
use br2k_core::{Error, Result, ValidationError};
use bytes::Bytes;
use etcd_client::{
    Compare, CompareOp, DeleteOptions, PutOptions, Txn, TxnOp, TxnOpResponse, TxnResponse,
};

use crate::EtcdLog;
use crate::election::Held;
use crate::encoding::{chunks, pad};
use crate::read::{bounds_ops, get_at, index_at};

/// How often an append retries after finding `last` moved under it.
const APPEND_ATTEMPTS: usize = 5;

impl EtcdLog {
    /// The `last` index known to leadership `term`, if cached.
    fn cached_last(&self, term: u64) -> Option<u64> {
        self.inner
            .cache
            .lock()
            .filter(|(t, _)| *t == term)
            .map(|(_, l)| l)
    }

    /// Sets (or forgets) the cached `(term, last index)`.
    fn set_cache(&self, v: Option<(u64, u64)>) {
        *self.inner.cache.lock() = v;
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
            self.inner.held.lock().remove(&term);
            Err(Error::conflict(format!(
                "fencing token {term} is stale: the leadership ended"
            )))
        }
    }

    /// Puts `puts` if leadership `term` still holds and `last` is unchanged: `Ok(false)`
    /// when only `last` moved, [`Error::Conflict`] when the leadership ended.
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

/// [`br2k_core::log::ReplicatedLog::append`]: stages large appends past `last`, then
/// commits with the final chunk and the new `last`.
pub(crate) async fn append(
    log: &EtcdLog,
    leadership: &Leadership,
    entries: Vec<Bytes>,
) -> Result<RangeInclusive<u64>> {
    check_entries(&entries, MAX_ENTRY_BYTES)?;
    let term = leadership.term;
    let held = log.held(term)?;
    let k = &log.inner.keys;
    let n = entries.len() as u64;
    'attempt: for _ in 0..APPEND_ATTEMPTS {
        let last = match log.cached_last(term) {
            Some(l) => l,
            None => log.prepare(term, &held).await?,
        };
        let mut parts = chunks(term, last + 1, &entries, log.inner.cfg.max_txn_bytes);
        let (final_start, final_value) = parts.pop().expect("at least one chunk");
        // Large appends: stage the leading chunks past `last` (invisible to readers).
        for (start, value) in parts {
            let put = vec![TxnOp::put(k.entry(start), value, None)];
            if !log.put_txn(term, &held, last, put).await? {
                continue 'attempt;
            }
        }
        let commit = vec![
            TxnOp::put(k.entry(final_start), final_value, None::<PutOptions>),
            TxnOp::put(k.last.clone(), pad(last + n), None),
        ];
        if log.put_txn(term, &held, last, commit).await? {
            log.set_cache(Some((term, last + n)));
            return Ok(last + 1..=last + n);
        }
    }
    Err(Error::unavailable("etcd log: last index keeps moving"))
}

/// [`br2k_core::log::ReplicatedLog::compact`]: deletes the chunks wholly at or below
/// `up_to` and moves `first` past it.
pub(crate) async fn compact(log: &EtcdLog, up_to: u64) -> Result<()> {
    let k = &log.inner.keys;
    let txn = Txn::new().and_then(bounds_ops(k, up_to.saturating_add(2), true));
    let resp = log.txn("compact (read)", txn).await?;
    let ops = resp.op_responses();
    let first = index_at(&ops, 0, &k.first)?;
    let last = index_at(&ops, 1, &k.last)?;
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
        match get_at(&ops, 2)?.kvs().first() {
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
    log.txn("compact", txn).await?;
    Ok(())
}
