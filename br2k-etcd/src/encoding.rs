//! Key names of a log's namespace and the encoding of entry chunks (values etcd
//! holds, decoded without trusting them: another client may have written anything).

use std::fmt;

use bytes::Bytes;

use crate::error::EtcdError;

/// Key names of one namespace.
#[derive(Debug)]
pub(crate) struct Keys {
    /// The election's name (`NS/election`).
    pub(crate) election: String,
    /// Prefix of the candidates' election keys.
    pub(crate) election_prefix: String,
    /// The first retained index.
    pub(crate) first: String,
    /// The last committed index.
    pub(crate) last: String,
    /// Prefix of the entry chunks.
    pub(crate) entry_prefix: String,
    /// Prefix of every key of the namespace.
    pub(crate) namespace_prefix: String,
}

impl Keys {
    /// The key names of namespace `ns`.
    pub(crate) fn new(ns: &str) -> Self {
        Self {
            election: format!("{ns}/election"),
            election_prefix: format!("{ns}/election/"),
            first: format!("{ns}/log/first"),
            last: format!("{ns}/log/last"),
            entry_prefix: format!("{ns}/log/e/"),
            namespace_prefix: format!("{ns}/"),
        }
    }

    /// The key of the chunk starting at `index`.
    pub(crate) fn entry(&self, index: u64) -> String {
        format!("{}{}", self.entry_prefix, pad(index))
    }

    /// The end (exclusive) of the entry key range.
    pub(crate) fn entries_end(&self) -> String {
        prefix_end(&self.entry_prefix)
    }

    /// The start index of the chunk under `key`.
    pub(crate) fn entry_index(&self, key: &[u8]) -> std::result::Result<u64, EtcdError> {
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

/// `n` as 20 decimal digits (sorts as a string like the number).
pub(crate) fn pad(n: u64) -> String {
    format!("{n:020}")
}

/// A key (or value under it) that does not decode.
pub(crate) fn corrupt(key: &[u8], reason: impl fmt::Display) -> EtcdError {
    EtcdError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: reason.to_string(),
    }
}

/// Parses an index value (`first`, `last`).
pub(crate) fn parse_index(key: &[u8], value: &[u8]) -> std::result::Result<u64, EtcdError> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| corrupt(key, "not a decimal index"))
}

/// Encodes a chunk: term, count, then length-prefixed entries.
pub(crate) fn encode_chunk(term: u64, entries: &[Bytes]) -> Vec<u8> {
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

/// Decodes a chunk written by [`encode_chunk`] into its term and entries.
pub(crate) fn decode_chunk(
    key: &[u8],
    value: &[u8],
) -> std::result::Result<(u64, Vec<Bytes>), EtcdError> {
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
pub(crate) fn chunks(
    term: u64,
    start: u64,
    entries: &[Bytes],
    budget: usize,
) -> Vec<(u64, Vec<u8>)> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn keys_sort_by_index() {
        let k = Keys::new("ns");
        assert!(k.entry(9) < k.entry(10));
        assert!(k.entry(u64::MAX) < k.entries_end());
        assert_eq!(k.entry_index(k.entry(42).as_bytes()).unwrap(), 42);
        assert!(pad(9) < pad(10));
    }
}
