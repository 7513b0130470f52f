//! The history of one run and its checks: every acknowledged command applied exactly
//! once, in an order that respects real time, each answer equal to the model's.
//!
//! The ledger's answers carry the balances after the command. Every replicated command
//! of the workload credits one shared account (the *hub*: deposits into it, transfers
//! from a client's own account into it), so the hub balance in an answer is a strictly
//! increasing witness of the command's position in the log: sorting the answers by it
//! gives the log order, each step must raise it by exactly the command's amount (a
//! larger step is a command applied that nobody was answered for, or one applied
//! twice), and replaying the model in that order must give every answer. Settlements
//! debit one *treasury* account the same way (strictly decreasing). Real-time order:
//! a command answered before another was sent must come first in the log.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::Value;

/// A client command of the workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// `POST /deposit`.
    Deposit {
        /// Credited account.
        account: String,
        /// Amount.
        amount: u64,
    },
    /// `POST /transfer`.
    Transfer {
        /// Debited account.
        from: String,
        /// Credited account.
        to: String,
        /// Amount.
        amount: u64,
    },
    /// `POST /settle`.
    Settle {
        /// Settled account.
        account: String,
        /// Amount.
        amount: u64,
    },
}

impl Kind {
    /// The request path.
    pub fn path(&self) -> &'static str {
        match self {
            Kind::Deposit { .. } => "/deposit",
            Kind::Transfer { .. } => "/transfer",
            Kind::Settle { .. } => "/settle",
        }
    }

    /// The request body.
    pub fn body(&self) -> String {
        match self {
            Kind::Deposit { account, amount } | Kind::Settle { account, amount } => {
                serde_json::json!({"account": account, "amount": amount}).to_string()
            }
            Kind::Transfer { from, to, amount } => {
                serde_json::json!({"from": from, "to": to, "amount": amount}).to_string()
            }
        }
    }

    fn amount(&self) -> u64 {
        match self {
            Kind::Deposit { amount, .. }
            | Kind::Transfer { amount, .. }
            | Kind::Settle { amount, .. } => *amount,
        }
    }
}

/// What a client learnt of a command.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Acknowledged (HTTP 200) with this answer.
    Ok(Value),
    /// Refused with a final error status (nothing applied).
    Failed(u16, Value),
    /// No final answer (timeout, connection lost): maybe applied.
    Unknown,
}

/// One command of the history.
#[derive(Debug, Clone)]
pub struct Op {
    /// Its idempotency key.
    pub key: String,
    /// The command.
    pub kind: Kind,
    /// When it was first sent (since the run started).
    pub invoke: Duration,
    /// When its final answer came (since the run started).
    pub complete: Option<Duration>,
    /// What the client learnt.
    pub outcome: Outcome,
}

/// The accounts the workload uses.
#[derive(Debug, Clone)]
pub struct Accounts {
    /// Credited by every replicated command.
    pub hub: String,
    /// Debited by every settlement.
    pub treasury: String,
}

/// What the checks found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Verdict {
    /// Acknowledged commands.
    pub acknowledged: usize,
    /// Acknowledged commands whose effect is missing.
    pub lost: usize,
    /// Commands applied more than once (or applied although nobody was answered).
    pub duplicated: usize,
    /// Every violation, readable.
    pub problems: Vec<String>,
}

impl Verdict {
    /// Whether every check passed.
    pub fn ok(&self) -> bool {
        self.problems.is_empty() && self.lost == 0 && self.duplicated == 0
    }
}

fn balance_in(answer: &Value, account: &str) -> Option<u64> {
    answer["balances"][account].as_u64()
}

/// Applies `kind` to `state`; false if the model refuses it (unknown account,
/// overdraft).
fn apply(state: &mut BTreeMap<String, u64>, kind: &Kind) -> bool {
    match kind {
        Kind::Deposit { account, amount } => {
            *state.entry(account.clone()).or_insert(0) += amount;
            true
        }
        Kind::Transfer { from, to, amount } => {
            match state.get_mut(from) {
                Some(b) if *b >= *amount => *b -= amount,
                _ => return false,
            }
            *state.entry(to.clone()).or_insert(0) += amount;
            true
        }
        Kind::Settle { account, amount } => match state.get_mut(account) {
            Some(b) if *b >= *amount => {
                *b -= amount;
                true
            }
            _ => false,
        },
    }
}

/// Checks that no command later in `order` was answered before an earlier one was sent.
fn check_real_time(order: &[&Op], what: &str, v: &mut Verdict) {
    let mut suffix_min: Vec<Duration> = vec![Duration::MAX; order.len() + 1];
    for i in (0..order.len()).rev() {
        suffix_min[i] = suffix_min[i + 1].min(order[i].complete.unwrap_or(Duration::MAX));
    }
    for (i, op) in order.iter().enumerate() {
        if suffix_min[i + 1] < op.invoke {
            let later = order[i + 1..]
                .iter()
                .find(|o| o.complete.unwrap_or(Duration::MAX) < op.invoke)
                .map_or("?", |o| o.key.as_str());
            v.problems.push(format!(
                "{what}: {later} was answered before {} was sent but comes after it in the log",
                op.key
            ));
        }
    }
}

/// Checks the history `ops` of a run that started from `initial` and ended (quiesced,
/// every unknown outcome resolved by a retry with its key) in `fin`.
pub fn check(
    initial: &BTreeMap<String, u64>,
    ops: &[Op],
    fin: &BTreeMap<String, u64>,
    acc: &Accounts,
) -> Verdict {
    let mut v = Verdict::default();
    let mut replicated: Vec<(&Op, u64)> = Vec::new();
    let mut settles: Vec<(&Op, u64)> = Vec::new();
    let mut keys = BTreeSet::new();
    for op in ops {
        if !keys.insert(op.key.as_str()) {
            v.problems
                .push(format!("{}: key used twice by the workload", op.key));
        }
        match &op.outcome {
            Outcome::Unknown => v
                .problems
                .push(format!("{}: outcome still unknown after the heal", op.key)),
            Outcome::Failed(s, body) => v
                .problems
                .push(format!("{}: refused with {s} {body}", op.key)),
            Outcome::Ok(a) => {
                v.acknowledged += 1;
                match &op.kind {
                    Kind::Settle { .. } => match a["balance"].as_u64() {
                        Some(b) => settles.push((op, b)),
                        None => v.problems.push(format!(
                            "{}: settlement answer without balance: {a}",
                            op.key
                        )),
                    },
                    _ => match balance_in(a, &acc.hub) {
                        Some(b) => replicated.push((op, b)),
                        None => v
                            .problems
                            .push(format!("{}: answer without the hub balance: {a}", op.key)),
                    },
                }
            }
        }
    }

    let mut model = initial.clone();
    // Replicated commands, in log order (hub balance ascending).
    replicated.sort_by_key(|(_, b)| *b);
    let mut applied: Vec<&Kind> = Vec::new();
    for (op, hub_after) in &replicated {
        let before = model.get(&acc.hub).copied().unwrap_or(0);
        let amount = op.kind.amount();
        if *hub_after < before + amount {
            // The same position twice, or behind what was already applied: an
            // acknowledged command whose effect is not in the log where it says.
            v.lost += 1;
            v.problems.push(format!(
                "{}: answered hub {hub_after}, but {before} + {amount} were applied before it",
                op.key
            ));
            continue;
        }
        let gap = *hub_after - before - amount;
        if gap > 0 {
            v.duplicated += 1;
            // Most likely an earlier command of that amount applied again: replayed
            // as such, so its other account does not count it a second time.
            let again = applied.iter().rev().find(|k| k.amount() == gap).copied();
            let what = if again.is_some() {
                "a command applied twice"
            } else {
                "a command nobody was answered for"
            };
            v.problems.push(format!(
                "{}: {gap} credited to the hub before it that no answer accounts for ({what}?)",
                op.key
            ));
            match again {
                Some(k) => {
                    apply(&mut model, k);
                }
                None => *model.entry(acc.hub.clone()).or_insert(0) += gap,
            }
        }
        if !apply(&mut model, &op.kind) {
            v.problems.push(format!(
                "{}: acknowledged, but the model refuses it",
                op.key
            ));
            continue;
        }
        applied.push(&op.kind);
        let Outcome::Ok(answer) = &op.outcome else {
            continue;
        };
        if let Some(bal) = answer["balances"].as_object() {
            for (name, b) in bal {
                let want = model.get(name).copied().unwrap_or(0);
                if b.as_u64() != Some(want) {
                    v.problems.push(format!(
                        "{}: answered {name} = {b}, the model replayed in log order has {want}",
                        op.key
                    ));
                }
            }
        }
    }
    let order: Vec<&Op> = replicated.iter().map(|(o, _)| *o).collect();
    check_real_time(&order, "replicated commands", &mut v);

    // Settlements, in log order (treasury balance descending).
    settles.sort_by_key(|(_, b)| std::cmp::Reverse(*b));
    for (op, after) in &settles {
        let before = model.get(&acc.treasury).copied().unwrap_or(0);
        let amount = op.kind.amount();
        let Outcome::Ok(answer) = &op.outcome else {
            continue;
        };
        if answer["key"].as_str() != Some(op.key.as_str()) {
            v.problems.push(format!(
                "{}: settlement answer for another key: {answer}",
                op.key
            ));
        }
        if answer["settlement"]["debited"].as_u64() != Some(amount) {
            v.problems.push(format!(
                "{}: debited {} instead of {amount}",
                op.key, answer["settlement"]["debited"]
            ));
        }
        if *after + amount > before {
            v.lost += 1;
            v.problems.push(format!(
                "{}: answered treasury {after}, but {before} - {amount} is what it should be",
                op.key
            ));
            continue;
        }
        let gap = before - amount - *after;
        if gap > 0 {
            v.duplicated += 1;
            v.problems.push(format!(
                "{}: {gap} debited from the treasury before it that no answer accounts for",
                op.key
            ));
            *model.entry(acc.treasury.clone()).or_insert(0) -= gap;
        }
        apply(&mut model, &op.kind);
    }
    let order: Vec<&Op> = settles.iter().map(|(o, _)| *o).collect();
    check_real_time(&order, "settlements", &mut v);

    // The final state: the model of everything acknowledged, nothing else.
    let names: BTreeSet<&String> = model.keys().chain(fin.keys()).collect();
    for name in names {
        let (want, got) = (
            model.get(name).copied().unwrap_or(0),
            fin.get(name).copied().unwrap_or(0),
        );
        if want == got {
            continue;
        }
        v.problems.push(format!(
            "final {name} = {got}, the model of the acknowledged commands has {want}"
        ));
        // The hub is only credited, every other account only debited: more credit
        // or more debit than acknowledged is a command applied again, less is a loss.
        let extra = if *name == acc.hub {
            got > want
        } else {
            got < want
        };
        if extra {
            v.duplicated += 1;
        } else {
            v.lost += 1;
        }
    }
    v
}

/// Checks the settlement transactions found on chain (`on_chain`: settlement key to
/// number of transactions) against the acknowledged settlement keys; `count` is the
/// contract's own counter.
pub fn check_chain(
    acknowledged: &BTreeMap<alloy::primitives::B256, String>,
    on_chain: &BTreeMap<alloy::primitives::B256, u32>,
    count: u64,
    v: &mut Verdict,
) {
    for (k, key) in acknowledged {
        match on_chain.get(k) {
            None => {
                v.lost += 1;
                v.problems
                    .push(format!("settlement {key} acknowledged but not on chain"));
            }
            Some(1) => {}
            Some(n) => {
                v.duplicated += 1;
                v.problems
                    .push(format!("settlement {key} sent {n} times on chain"));
            }
        }
    }
    for (k, n) in on_chain {
        if !acknowledged.contains_key(k) {
            v.duplicated += 1;
            v.problems.push(format!(
                "a settlement on chain ({k}, {n} transaction(s)) that no client was answered for"
            ));
        }
    }
    if count != acknowledged.len() as u64 {
        v.problems.push(format!(
            "the contract counts {count} settlements, {} were acknowledged",
            acknowledged.len()
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn acc() -> Accounts {
        Accounts {
            hub: "hub".into(),
            treasury: "treasury".into(),
        }
    }

    fn s(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    fn transfer(key: &str, from: &str, amount: u64, t: (u64, u64), after: (u64, u64)) -> Op {
        Op {
            key: key.into(),
            kind: Kind::Transfer {
                from: from.into(),
                to: "hub".into(),
                amount,
            },
            invoke: s(t.0),
            complete: Some(s(t.1)),
            outcome: Outcome::Ok(
                json!({"status": "applied", "balances": {from: after.0, "hub": after.1}}),
            ),
        }
    }

    fn settle(key: &str, amount: u64, t: (u64, u64), after: u64) -> Op {
        Op {
            key: key.into(),
            kind: Kind::Settle {
                account: "treasury".into(),
                amount,
            },
            invoke: s(t.0),
            complete: Some(s(t.1)),
            outcome: Outcome::Ok(json!({"status": "settled", "key": key, "balance": after,
                "settlement": {"account": "treasury", "amount": amount, "debited": amount,
                "receipt": {"tx": "0x00", "block": 1}}})),
        }
    }

    fn state(pairs: &[(&str, u64)]) -> BTreeMap<String, u64> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect()
    }

    #[test]
    fn a_correct_concurrent_history_passes() {
        let init = state(&[("c0", 100), ("c1", 100), ("hub", 1), ("treasury", 50)]);
        // c1's transfer overlaps c0's first and is ordered between c0's two.
        let ops = vec![
            transfer("a", "c0", 5, (0, 10), (95, 6)),
            transfer("b", "c1", 3, (5, 30), (97, 9)),
            transfer("c", "c0", 2, (20, 40), (93, 11)),
            settle("s1", 4, (0, 50), 46),
            settle("s2", 1, (60, 70), 45),
        ];
        let fin = state(&[("c0", 93), ("c1", 97), ("hub", 11), ("treasury", 45)]);
        let v = check(&init, &ops, &fin, &acc());
        assert!(v.ok(), "{v:?}");
        assert_eq!(v.acknowledged, 5);
    }

    #[test]
    fn a_command_applied_twice_is_a_duplicate() {
        let init = state(&[("c0", 100), ("hub", 1)]);
        // "a" was applied twice (a retry executed again): the next answer shows it.
        let ops = vec![
            transfer("a", "c0", 5, (0, 10), (95, 6)),
            transfer("b", "c0", 2, (20, 30), (88, 13)),
        ];
        let fin = state(&[("c0", 88), ("hub", 13)]);
        let v = check(&init, &ops, &fin, &acc());
        assert_eq!(v.duplicated, 1, "{v:?}");
        assert!(!v.ok());
    }

    #[test]
    fn an_acknowledged_command_missing_from_the_final_state_is_lost() {
        let init = state(&[("c0", 100), ("hub", 1)]);
        let ops = vec![
            transfer("a", "c0", 5, (0, 10), (95, 6)),
            transfer("b", "c0", 2, (20, 30), (93, 8)),
        ];
        // "b" acknowledged, but the replicas ended without it.
        let fin = state(&[("c0", 95), ("hub", 6)]);
        let v = check(&init, &ops, &fin, &acc());
        assert!(v.lost >= 1, "{v:?}");
        assert_eq!(v.duplicated, 0, "{v:?}");
    }

    #[test]
    fn two_answers_at_one_log_position_lose_one() {
        let init = state(&[("c0", 100), ("c1", 100), ("hub", 1)]);
        let ops = vec![
            transfer("a", "c0", 5, (0, 10), (95, 6)),
            transfer("b", "c1", 5, (0, 10), (95, 6)),
        ];
        let fin = state(&[("c0", 95), ("c1", 95), ("hub", 11)]);
        let v = check(&init, &ops, &fin, &acc());
        assert_eq!(v.lost, 1, "{v:?}");
    }

    #[test]
    fn a_stale_order_violates_real_time() {
        let init = state(&[("c0", 100), ("c1", 100), ("hub", 1)]);
        // "b" was answered (t=10) before "a" was sent (t=20), yet "a" is first.
        let ops = vec![
            transfer("a", "c0", 5, (20, 30), (95, 6)),
            transfer("b", "c1", 3, (0, 10), (97, 9)),
        ];
        let fin = state(&[("c0", 95), ("c1", 97), ("hub", 9)]);
        let v = check(&init, &ops, &fin, &acc());
        assert!(
            v.problems.iter().any(|p| p.contains("answered before")),
            "{v:?}"
        );
    }

    #[test]
    fn a_wrong_answer_is_reported_and_unknowns_fail_the_run() {
        let init = state(&[("c0", 100), ("hub", 1)]);
        let mut ops = vec![transfer("a", "c0", 5, (0, 10), (94, 6))];
        ops.push(Op {
            key: "u".into(),
            kind: Kind::Deposit {
                account: "hub".into(),
                amount: 1,
            },
            invoke: s(0),
            complete: None,
            outcome: Outcome::Unknown,
        });
        let fin = state(&[("c0", 95), ("hub", 6)]);
        let v = check(&init, &ops, &fin, &acc());
        assert!(v.problems.iter().any(|p| p.contains("c0 = 94")), "{v:?}");
        assert!(v.problems.iter().any(|p| p.contains("unknown")), "{v:?}");
    }

    #[test]
    fn a_settlement_done_twice_or_unanswered_on_chain_is_a_duplicate() {
        use alloy::primitives::B256;
        let a = B256::repeat_byte(1);
        let b = B256::repeat_byte(2);
        let acked: BTreeMap<B256, String> = [(a, "s1".to_owned())].into();
        let mut v = Verdict::default();
        check_chain(&acked, &[(a, 1)].into(), 1, &mut v);
        assert!(v.ok(), "{v:?}");
        let mut v = Verdict::default();
        check_chain(&acked, &[(a, 2), (b, 1)].into(), 2, &mut v);
        assert_eq!(v.duplicated, 2, "{v:?}");
        let mut v = Verdict::default();
        check_chain(&acked, &BTreeMap::new(), 0, &mut v);
        assert_eq!(v.lost, 1, "{v:?}");
    }

    #[test]
    fn a_settlement_debited_twice_is_a_duplicate() {
        let init = state(&[("treasury", 50)]);
        let ops = vec![settle("s1", 4, (0, 10), 46), settle("s2", 1, (20, 30), 41)];
        let fin = state(&[("treasury", 41)]);
        let v = check(&init, &ops, &fin, &acc());
        assert_eq!(v.duplicated, 1, "{v:?}");
    }
}
