//! Small building blocks for testing and benchmarking replicated services (test
//! support, feature `conformance`): a [`Counters`] state machine, a
//! [`CountingEffect`], and a linearizability checker of client-visible counter
//! histories ([`check_counter_history`]) with the client that records them
//! ([`counter_op`], [`client_history`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::{Effect, Replica, StateMachine};
use crate::error::{Error, Result, ValidationError};

/// A command of [`Counters`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CounterCommand {
    /// Adds `amount` to `counter` (negative amounts may not take it below zero).
    Add {
        /// Counter name (1-64 bytes).
        counter: String,
        /// Amount to add.
        amount: i64,
    },
    /// Records a settlement of `counter` whose effect result is logged.
    Settle {
        /// Counter name.
        counter: String,
    },
    /// Pads the state with `bytes` bytes under `counter` (for snapshot size tests).
    Fill {
        /// Counter name.
        counter: String,
        /// Bytes of padding.
        bytes: u32,
    },
}

/// Output of [`Counters`]: the counter's value after the command, or why it was
/// refused (deterministically, on every replica).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CounterOutput {
    /// The new value.
    Value(i64),
    /// A settlement: the value and the logged effect result (hex).
    Settled {
        /// Value at settlement.
        value: i64,
        /// Effect result, hex encoded.
        effect: String,
    },
    /// Refused (e.g. would go below zero).
    Refused(String),
}

/// Named counters: a deterministic state machine for tests and benchmarks. Clones
/// share the padding buffers (`Arc`), so snapshots clone cheaply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Current values.
    pub values: BTreeMap<String, i64>,
    /// Settlements per counter.
    pub settlements: BTreeMap<String, Vec<String>>,
    /// Padding per counter.
    pub padding: BTreeMap<String, Arc<Vec<u8>>>,
}

#[derive(Serialize, Deserialize)]
struct CountersSnapshot {
    values: BTreeMap<String, i64>,
    settlements: BTreeMap<String, Vec<String>>,
    padding: BTreeMap<String, usize>,
}

impl StateMachine for Counters {
    type Command = CounterCommand;
    type Output = CounterOutput;

    fn validate(&self, command: &CounterCommand) -> Result<(), ValidationError> {
        let name = match command {
            CounterCommand::Add { counter, .. }
            | CounterCommand::Settle { counter }
            | CounterCommand::Fill { counter, .. } => counter,
        };
        if name.is_empty() || name.len() > 64 {
            return Err(ValidationError::malformed(
                "counter name",
                "must be 1-64 bytes",
            ));
        }
        Ok(())
    }

    fn apply(&mut self, command: &CounterCommand, effect: Option<&[u8]>) -> CounterOutput {
        match command {
            CounterCommand::Add { counter, amount } => {
                let v = self.values.entry(counter.clone()).or_default();
                match v.checked_add(*amount) {
                    Some(n) if n >= 0 => {
                        *v = n;
                        CounterOutput::Value(n)
                    }
                    _ => CounterOutput::Refused(format!("{counter} would become negative")),
                }
            }
            CounterCommand::Settle { counter } => {
                let effect = hex::encode(effect.unwrap_or_default());
                let value = self.values.get(counter).copied().unwrap_or_default();
                self.settlements
                    .entry(counter.clone())
                    .or_default()
                    .push(effect.clone());
                CounterOutput::Settled { value, effect }
            }
            CounterCommand::Fill { counter, bytes } => {
                let len = *bytes as usize;
                let fill = (self.values.len() as u8).wrapping_add(len as u8);
                self.padding
                    .insert(counter.clone(), Arc::new(vec![fill; len]));
                CounterOutput::Value(len as i64)
            }
        }
    }

    fn snapshot(&self) -> Result<Vec<u8>> {
        let head = CountersSnapshot {
            values: self.values.clone(),
            settlements: self.settlements.clone(),
            padding: self
                .padding
                .iter()
                .map(|(k, v)| (k.clone(), v.len()))
                .collect(),
        };
        let head = serde_json::to_vec(&head).map_err(|e| Error::backend("counters", e, false))?;
        let mut out = (head.len() as u64).to_be_bytes().to_vec();
        out.extend_from_slice(&head);
        for v in self.padding.values() {
            out.extend_from_slice(v);
        }
        Ok(out)
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<()> {
        let bad = |r: &str| Error::from(ValidationError::malformed("counters snapshot", r));
        if bytes.len() < 8 {
            return Err(bad("truncated"));
        }
        let (len, rest) = bytes.split_at(8);
        let len = u64::from_be_bytes(len.try_into().map_err(|_| bad("length"))?) as usize;
        if rest.len() < len {
            return Err(bad("truncated header"));
        }
        let head: CountersSnapshot =
            serde_json::from_slice(&rest[..len]).map_err(|_| bad("header"))?;
        let mut pad = &rest[len..];
        let mut padding = BTreeMap::new();
        for (k, n) in head.padding {
            if pad.len() < n {
                return Err(bad("truncated padding"));
            }
            let (p, r) = pad.split_at(n);
            padding.insert(k, Arc::new(p.to_vec()));
            pad = r;
        }
        *self = Counters {
            values: head.values,
            settlements: head.settlements,
            padding,
        };
        Ok(())
    }
}

/// A test [`Effect`] that counts how often each key really ran, across every replica
/// sharing it (as a chain would).
#[derive(Debug, Clone, Default)]
pub struct CountingEffect {
    runs: Arc<Mutex<HashMap<String, u64>>>,
}

impl CountingEffect {
    /// How often `key` ran.
    pub fn runs(&self, key: &str) -> u64 {
        self.runs.lock().get(key).copied().unwrap_or(0)
    }

    /// Keys that ran more than once.
    pub fn duplicates(&self) -> Vec<String> {
        self.runs
            .lock()
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Total runs.
    pub fn total(&self) -> u64 {
        self.runs.lock().values().sum()
    }
}

#[async_trait]
impl<C: Send + Sync + 'static> Effect<C> for CountingEffect {
    async fn lookup(&self, key: &str, _command: &C) -> Result<Option<Vec<u8>>> {
        Ok(self
            .runs
            .lock()
            .contains_key(key)
            .then(|| format!("tx:{key}").into_bytes()))
    }

    async fn run(&self, key: &str, _command: &C) -> Result<Vec<u8>> {
        *self.runs.lock().entry(key.to_owned()).or_default() += 1;
        Ok(format!("tx:{key}").into_bytes())
    }
}

/// One client operation on one counter, as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CounterOp {
    /// Counter name.
    pub counter: String,
    /// `Some(n)`: add `n`; `None`: read.
    pub add: Option<i64>,
    /// Invocation time (any monotonic unit).
    pub call: u64,
    /// Response time and value seen; `None` when the outcome is unknown (the
    /// operation may or may not have taken effect, at any time after `call`).
    pub ret: Option<(u64, i64)>,
}

/// How [`counter_op`] retries.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// Attempts at most; after the last failed one the outcome is unknown.
    pub attempts: u32,
    /// Pause after a failed attempt (or when there is no replica to ask).
    pub pause: Duration,
}

/// One client operation on `counter` as a client sees it: adds `n` when `add` is
/// `Some(n)`, else reads. Each attempt asks the replica `leader` returns then; a
/// failed attempt is retried with the same idempotency key `key`. Times are
/// microseconds since `start`; an operation that never succeeded has `ret: None`.
pub async fn counter_op(
    leader: impl Fn() -> Option<Arc<Replica<Counters>>>,
    start: Instant,
    counter: &str,
    add: Option<i64>,
    key: &str,
    retry: Retry,
) -> CounterOp {
    let now = || start.elapsed().as_micros() as u64;
    let call = now();
    let mut ret = None;
    for _ in 0..retry.attempts {
        let Some(r) = leader() else {
            tokio::time::sleep(retry.pause).await;
            continue;
        };
        let res = match add {
            Some(amount) => {
                let cmd = CounterCommand::Add {
                    counter: counter.into(),
                    amount,
                };
                r.replicate(Some(key), cmd).await.map(|o| match o {
                    CounterOutput::Value(v) => v,
                    other => panic!("an add answered {other:?}"),
                })
            }
            None => {
                r.query(|s| s.values.get(counter).copied().unwrap_or(0))
                    .await
            }
        };
        match res {
            Ok(v) => {
                ret = Some((now(), v));
                break;
            }
            Err(_) => tokio::time::sleep(retry.pause).await,
        }
    }
    CounterOp {
        counter: counter.into(),
        add,
        call,
        ret,
    }
}

/// Client `client`'s part of run `run` of a linearizability test: `ops` operations,
/// one after the other, each an add or a read of counter `x` or `y` (a mix fixed by
/// `run` and `client`), run by [`counter_op`] with the idempotency keys
/// `c{client}-{i}`.
pub async fn client_history(
    leader: impl Fn() -> Option<Arc<Replica<Counters>>>,
    start: Instant,
    (run, client): (u64, u64),
    ops: u64,
    retry: Retry,
) -> Vec<CounterOp> {
    let mut history = Vec::new();
    for i in 0..ops {
        let counter = if (client + i + run) % 2 == 0 {
            "x"
        } else {
            "y"
        };
        let add = ((i + client) % 3 != 0).then_some(((run + i * 7 + client) % 5 + 1) as i64);
        let key = format!("c{client}-{i}");
        history.push(counter_op(&leader, start, counter, add, &key, retry).await);
    }
    history
}

/// Checks that a history of adds (returning the new value) and reads on counters
/// starting at 0 is linearizable, counter by counter (linearizability is local).
/// Returns the first counter whose history is not, with a reason.
pub fn check_counter_history(ops: &[CounterOp]) -> std::result::Result<(), String> {
    let mut by_counter: BTreeMap<&str, Vec<&CounterOp>> = BTreeMap::new();
    for op in ops {
        by_counter.entry(&op.counter).or_default().push(op);
    }
    for (counter, ops) in by_counter {
        // Reads with unknown outcome constrain nothing.
        let ops: Vec<&CounterOp> = ops
            .into_iter()
            .filter(|o| o.add.is_some() || o.ret.is_some())
            .collect();
        if ops.len() > 128 {
            return Err(format!("{counter}: more than 128 operations to check"));
        }
        let mut memo = HashSet::new();
        if !search(&ops, 0, 0, &mut memo) {
            return Err(format!(
                "{counter}: history of {} operations is not linearizable",
                ops.len()
            ));
        }
    }
    Ok(())
}

fn search(ops: &[&CounterOp], done: u128, value: i64, memo: &mut HashSet<(u128, i64)>) -> bool {
    let open = |i: usize| done & (1u128 << i) == 0;
    // Finished when every operation with a known response is linearized.
    if (0..ops.len()).all(|i| !open(i) || ops[i].ret.is_none()) {
        return true;
    }
    if !memo.insert((done, value)) {
        return false;
    }
    let horizon = (0..ops.len())
        .filter(|&i| open(i))
        .filter_map(|i| ops[i].ret.map(|(t, _)| t))
        .min()
        .unwrap_or(u64::MAX);
    for i in (0..ops.len()).filter(|&i| open(i)) {
        let op = ops[i];
        if op.call > horizon {
            continue;
        }
        let next = value + op.add.unwrap_or(0);
        if let Some((_, seen)) = op.ret
            && seen != next
        {
            continue;
        }
        if search(ops, done | (1u128 << i), next, memo) {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(add: Option<i64>, call: u64, ret: Option<(u64, i64)>) -> CounterOp {
        CounterOp {
            counter: "c".into(),
            add,
            call,
            ret,
        }
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let h = [
            op(Some(1), 0, Some((1, 1))),
            op(None, 2, Some((3, 1))),
            op(Some(2), 4, Some((5, 3))),
        ];
        assert_eq!(check_counter_history(&h), Ok(()));
    }

    #[test]
    fn concurrent_adds_may_order_either_way() {
        let h = [op(Some(1), 0, Some((10, 3))), op(Some(2), 1, Some((9, 2)))];
        assert_eq!(check_counter_history(&h), Ok(()));
    }

    #[test]
    fn stale_read_is_rejected() {
        let h = [op(Some(1), 0, Some((1, 1))), op(None, 2, Some((3, 0)))];
        assert!(check_counter_history(&h).is_err());
    }

    #[test]
    fn lost_acknowledged_add_is_rejected() {
        let h = [op(Some(1), 0, Some((1, 1))), op(Some(1), 2, Some((3, 1)))];
        assert!(check_counter_history(&h).is_err());
    }

    #[test]
    fn unknown_add_may_or_may_not_apply() {
        let took = [op(Some(5), 0, None), op(None, 2, Some((3, 5)))];
        let lost = [op(Some(5), 0, None), op(None, 2, Some((3, 0)))];
        let wrong = [op(Some(5), 0, None), op(None, 2, Some((3, 4)))];
        assert_eq!(check_counter_history(&took), Ok(()));
        assert_eq!(check_counter_history(&lost), Ok(()));
        assert!(check_counter_history(&wrong).is_err());
    }
}
