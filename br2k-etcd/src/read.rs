//! Consistent reads of committed entries (one transaction reads `first`, `last` and
//! the chunks from an index on).

use br2k_core::log::Entry;
use br2k_core::{Error, Result};
use etcd_client::{GetOptions, GetResponse, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse};

use crate::EtcdLog;
use crate::encoding::{Keys, corrupt, decode_chunk, parse_index};

/// Chunks fetched by one read transaction.
pub(crate) const READ_CHUNKS: i64 = 32;

/// What one consistent read returned.
pub(crate) struct ReadOut {
    /// The first retained index.
    pub(crate) first: u64,
    /// The last committed index.
    pub(crate) last: u64,
    /// Committed entries from the index asked for.
    pub(crate) entries: Vec<Entry>,
    /// The revision of the read.
    pub(crate) revision: i64,
}

impl EtcdLog {
    /// One consistent read of up to [`READ_CHUNKS`] chunks from `from` (no check
    /// against `first`: the caller decides).
    pub(crate) async fn read_chunks(&self, from: u64) -> Result<ReadOut> {
        let k = &self.inner.keys;
        let mut ops = bounds_ops(k, from + 1, false);
        ops.push(TxnOp::get(
            k.entry(from + 1),
            Some(
                GetOptions::new()
                    .with_range(k.entries_end())
                    .with_sort(SortTarget::Key, SortOrder::Ascend)
                    .with_limit(READ_CHUNKS),
            ),
        ));
        let resp = self.txn("read", Txn::new().and_then(ops)).await?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let ops = resp.op_responses();
        let first = index_at(&ops, 0, &k.first)?;
        let last = index_at(&ops, 1, &k.last)?;
        let mut entries = Vec::new();
        let mut next = from;
        let chunks = get_at(&ops, 2)?
            .kvs()
            .iter()
            .chain(get_at(&ops, 3)?.kvs().iter());
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
}

/// The head of every read transaction: gets of `first`, `last` and the last chunk
/// starting before index `end` (its key only when `keys_only`).
pub(crate) fn bounds_ops(k: &Keys, end: u64, keys_only: bool) -> Vec<TxnOp> {
    let mut chunk = GetOptions::new()
        .with_range(k.entry(end))
        .with_sort(SortTarget::Key, SortOrder::Descend)
        .with_limit(1);
    if keys_only {
        chunk = chunk.with_keys_only();
    }
    vec![
        TxnOp::get(k.first.clone(), None),
        TxnOp::get(k.last.clone(), None),
        TxnOp::get(k.entry_prefix.clone(), Some(chunk)),
    ]
}

/// The answer to the `i`th operation of a read transaction, a get.
pub(crate) fn get_at(ops: &[TxnOpResponse], i: usize) -> Result<&GetResponse> {
    match ops.get(i) {
        Some(TxnOpResponse::Get(g)) => Ok(g),
        _ => Err(corrupt(b"txn", "unexpected transaction response").into()),
    }
}

/// The index (`first` or `last`) the `i`th get of a read transaction found under `key`.
pub(crate) fn index_at(ops: &[TxnOpResponse], i: usize, key: &str) -> Result<u64> {
    match get_at(ops, i)?.kvs().first() {
        Some(kv) => Ok(parse_index(kv.key(), kv.value())?),
        None => Err(corrupt(key.as_bytes(), "missing (namespace purged?)").into()),
    }
}

/// [`br2k_core::log::ReplicatedLog::read`]: up to `max` committed entries from `from`.
pub(crate) async fn read(log: &EtcdLog, from: u64, max: usize) -> Result<Vec<Entry>> {
    let from = from.max(1);
    let mut out: Vec<Entry> = Vec::new();
    let mut next = from;
    while out.len() < max {
        let r = log.read_chunks(next).await?;
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

/// The error of a read from `from` below the first retained index `first`.
pub(crate) fn compacted(from: u64, first: u64) -> Error {
    Error::not_found(format!(
        "log entries from {from}: compacted, first index is {first}"
    ))
}
