//! Entry points of the fuzz targets (`fuzz/`, cargo feature `fuzzing`): the replica's
//! decoders of untrusted bytes, driven exactly as the replica drives them.
//!
//! - [`snapshot`]: a snapshot artifact's bytes, restored by the function a starting
//!   replica uses (`snapshot::decode`, after the artifact's digest matched the
//!   checkpoint: whoever can record a checkpoint chooses these bytes).
//! - [`entries`]: log entries, applied by the replica's own pure `Applied::apply`
//!   (every replica applies whatever the log holds, whoever appended it).
//!
//! Both use [`FuzzMachine`], a state machine that keeps what it is given, so that the
//! replica's bookkeeping (dedupe keys, pending intents, effect results) is what is
//! exercised, not a particular application.

use bytes::Bytes;
use serde_json::Value;

use super::{Applied, StateMachine, snapshot};
use crate::error::{Error, Result, ValidationError};
use crate::log::Entry;

/// A state machine keeping the commands it applied (and the effects they carried).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FuzzMachine {
    /// Applied commands with their effect results, in order.
    pub applied: Vec<(Value, Option<Vec<u8>>)>,
}

impl StateMachine for FuzzMachine {
    type Command = Value;
    type Output = Value;

    fn apply(&mut self, command: &Value, effect: Option<&[u8]>) -> Value {
        self.applied
            .push((command.clone(), effect.map(<[u8]>::to_vec)));
        Value::from(self.applied.len())
    }

    fn snapshot(&self) -> Result<Vec<u8>> {
        let items: Vec<(&Value, Option<String>)> = self
            .applied
            .iter()
            .map(|(c, e)| (c, e.as_deref().map(hex::encode)))
            .collect();
        serde_json::to_vec(&items).map_err(|e| Error::backend("fuzz", e, false))
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<()> {
        let items: Vec<(Value, Option<String>)> = serde_json::from_slice(bytes)
            .map_err(|e| ValidationError::malformed("fuzz snapshot", e))?;
        let mut applied = Vec::with_capacity(items.len());
        for (c, e) in items {
            let e = match e {
                Some(h) => Some(
                    hex::decode(h).map_err(|e| ValidationError::malformed("fuzz snapshot", e))?,
                ),
                None => None,
            };
            applied.push((c, e));
        }
        self.applied = applied;
        Ok(())
    }
}

fn fresh() -> Applied<FuzzMachine> {
    Applied::new(FuzzMachine::default())
}

/// The replicated part of `a` in comparable form. Commands are compared by shape
/// only: JSON numbers need not round-trip bit for bit (serde_json's default float
/// parsing), and that is the application's business, not the replica's.
fn state(a: &Applied<FuzzMachine>) -> impl PartialEq + std::fmt::Debug {
    (
        a.sm.applied
            .iter()
            .map(|(_, e)| e.clone())
            .collect::<Vec<_>>(),
        a.index,
        a.term,
        a.skipped,
        a.dedupe_order.clone(),
        a.dedupe_order
            .iter()
            .map(|k| a.dedupe.get(k).cloned())
            .collect::<Vec<_>>(),
        a.pending.keys().cloned().collect::<Vec<_>>(),
    )
}

/// Restores a snapshot from `data` as a starting replica does; a snapshot that
/// restores must encode again to one that restores to the same state.
pub fn snapshot(data: &[u8]) {
    let mut a = fresh();
    if snapshot::decode(&mut a, data).is_err() {
        return;
    }
    roundtrip(&a);
}

/// Encodes `a`, decodes the bytes into a fresh state, and checks they agree.
fn roundtrip(a: &Applied<FuzzMachine>) {
    let bytes = snapshot::encode(a).expect("a decoded state encodes");
    let mut b = fresh();
    snapshot::decode(&mut b, &bytes).expect("an encoded state decodes");
    assert_eq!(state(a), state(&b), "snapshot round trip");
}

/// The separator of entries in an [`entries`] input (never part of valid JSON text).
pub const ENTRY_SEPARATOR: u8 = 0xff;

/// Applies each part of `data` (split at [`ENTRY_SEPARATOR`]) as the next log entry,
/// with the replica's `Applied::apply`; then the state reached must survive a snapshot
/// round trip.
pub fn entries(data: &[u8]) {
    let mut a = fresh();
    for (i, part) in data.split(|b| *b == ENTRY_SEPARATOR).enumerate() {
        let entry = Entry {
            index: i as u64 + 1,
            term: 1,
            data: Bytes::copy_from_slice(part),
        };
        a.apply(&entry, DEDUPE_CAPACITY);
    }
    assert_eq!(
        a.dedupe.len(),
        a.dedupe_order.len(),
        "dedupe keys and their order agree"
    );
    assert!(
        a.dedupe.len() <= DEDUPE_CAPACITY,
        "dedupe capacity respected"
    );
    roundtrip(&a);
}

/// Idempotency keys remembered while fuzzing (small, so that forgetting is exercised).
const DEDUPE_CAPACITY: usize = 16;

/// The `replica` target: `data[0]` even feeds the rest to [`snapshot`], odd to
/// [`entries`].
pub fn target(data: &[u8]) {
    if let Some((&which, rest)) = data.split_first() {
        if which & 1 == 0 {
            snapshot(rest);
        } else {
            entries(rest);
        }
    }
}

/// Real inputs of [`target`]: log entries as the replica writes them (a barrier,
/// commands with and without an idempotency key, an intent, its result, an aborted
/// intent) and the snapshot of the state they lead to.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let ops = [
        r#"{"op":"noop","id":"1-0"}"#,
        r#"{"op":"cmd","id":"1-1","key":"client-a","cmd":{"Add":{"counter":"c","amount":5}}}"#,
        r#"{"op":"cmd","id":"1-2","key":null,"cmd":{"Add":{"counter":"c","amount":-1}}}"#,
        r#"{"op":"cmd","id":"1-3","key":"client-a","cmd":{"Add":{"counter":"c","amount":5}}}"#,
        r#"{"op":"intent","id":"1-4","key":"settle-1","cmd":{"Settle":{"counter":"c"}}}"#,
        r#"{"op":"done","id":"1-5","key":"settle-1","effect":"c0ffee"}"#,
        r#"{"op":"intent","id":"1-6","key":"settle-2","cmd":{"Settle":{"counter":"c"}}}"#,
        r#"{"op":"aborted","id":"1-7","key":"settle-2","reason":"reverted"}"#,
        r#"{"op":"intent","id":"1-8","key":"settle-3","cmd":{"Settle":{"counter":"d"}}}"#,
    ];
    let mut log = vec![1u8];
    for (i, op) in ops.iter().enumerate() {
        if i > 0 {
            log.push(ENTRY_SEPARATOR);
        }
        log.extend_from_slice(op.as_bytes());
    }
    let mut a = fresh();
    for (i, op) in ops.iter().enumerate() {
        a.apply(
            &Entry {
                index: i as u64 + 1,
                term: 1,
                data: Bytes::copy_from_slice(op.as_bytes()),
            },
            DEDUPE_CAPACITY,
        );
    }
    let mut snap = vec![0u8];
    snap.extend(snapshot::encode(&a).expect("encodes"));
    vec![("entries", log), ("snapshot", snap)]
}
