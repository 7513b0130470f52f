//! The snapshot format: a header with the replica's bookkeeping, then the state
//! machine's own bytes.
//!
//! `BR2KSNAP1\n`, the header length as 8 big-endian bytes, the header as JSON
//! (applied index and term, remembered idempotency keys in order, pending intents),
//! then the state machine snapshot.

use serde::{Deserialize, Serialize};

use super::{Applied, StateMachine};
use crate::error::{Result, ValidationError};

const MAGIC: &[u8] = b"BR2KSNAP1\n";

#[derive(Serialize, Deserialize)]
#[serde(bound(serialize = "O: Serialize, C: Serialize"))]
#[serde(bound(deserialize = "O: serde::de::DeserializeOwned, C: serde::de::DeserializeOwned"))]
struct Header<O, C> {
    index: u64,
    term: u64,
    skipped: u64,
    dedupe: Vec<(String, O)>,
    pending: Vec<(String, C)>,
}

fn bad(reason: impl std::fmt::Display) -> crate::Error {
    ValidationError::malformed("snapshot", reason).into()
}

pub(super) fn encode<S: StateMachine>(a: &Applied<S>) -> Result<Vec<u8>> {
    let header = Header {
        index: a.index,
        term: a.term,
        skipped: a.skipped,
        dedupe: a
            .dedupe_order
            .iter()
            .filter_map(|k| a.dedupe.get(k).map(|o| (k.clone(), o.clone())))
            .collect(),
        pending: a
            .pending
            .iter()
            .map(|(k, c)| (k.clone(), c.clone()))
            .collect(),
    };
    let header = serde_json::to_vec(&header).map_err(bad)?;
    let state = a.sm.snapshot()?;
    let mut out = Vec::with_capacity(MAGIC.len() + 8 + header.len() + state.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(header.len() as u64).to_be_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(&state);
    Ok(out)
}

/// Restores `a` from `bytes`; on error `a` may be partly changed, so callers decode
/// into a copy.
pub(super) fn decode<S: StateMachine>(a: &mut Applied<S>, bytes: &[u8]) -> Result<()> {
    let rest = bytes.strip_prefix(MAGIC).ok_or_else(|| bad("bad magic"))?;
    if rest.len() < 8 {
        return Err(bad("truncated header length"));
    }
    let (len, rest) = rest.split_at(8);
    let len = u64::from_be_bytes(len.try_into().map_err(bad)?);
    let len = usize::try_from(len).map_err(bad)?;
    if rest.len() < len {
        return Err(bad("truncated header"));
    }
    let (header, state) = rest.split_at(len);
    let header: Header<S::Output, S::Command> = serde_json::from_slice(header).map_err(bad)?;
    a.sm.restore(state)?;
    a.index = header.index;
    a.term = header.term;
    a.skipped = header.skipped;
    a.dedupe.clear();
    a.dedupe_order.clear();
    for (k, o) in header.dedupe {
        a.dedupe_order.push_back(k.clone());
        a.dedupe.insert(k, o);
    }
    a.pending = header.pending.into_iter().collect();
    Ok(())
}
