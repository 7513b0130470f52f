//! The ledger's deterministic state machine: accounts with balances, transfers,
//! deposits and settlements.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use br2k_core::replica::StateMachine;
use br2k_core::{Error, Result, ValidationError};
use serde::{Deserialize, Serialize};

/// Longest account name.
pub const MAX_ACCOUNT_LEN: usize = 64;

/// A state-changing request, as logged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    /// Credits `amount` to `account`, creating it if needed.
    Deposit {
        /// Account name.
        account: String,
        /// Amount credited (positive).
        amount: u64,
    },
    /// Moves `amount` from `from` (which must exist and cover it) to `to`.
    Transfer {
        /// Debited account.
        from: String,
        /// Credited account (created if needed).
        to: String,
        /// Amount moved (positive).
        amount: u64,
    },
    /// Settles `amount` of `account` on chain (a `once` command: applied with the
    /// logged result of the settlement transaction).
    Settle {
        /// The client's idempotency key, also the on-chain settlement key.
        key: String,
        /// Settled account.
        account: String,
        /// Amount settled (positive).
        amount: u64,
    },
}

/// Why a well-formed command was refused by the state (deterministically, on every
/// replica).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rejection {
    /// The account does not exist.
    UnknownAccount,
    /// The balance does not cover the amount.
    Overdraft,
    /// The credited balance would overflow.
    Overflow,
    /// A settlement's logged on-chain receipt is missing or malformed.
    InvalidReceipt,
}

/// The result of a settlement transaction, as logged by the leader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettlementReceipt {
    /// Transaction hash (`0x` and 64 hex digits).
    pub tx: String,
    /// Block it was mined in.
    pub block: u64,
}

/// A settlement applied to the ledger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettlementRecord {
    /// Settled account.
    pub account: String,
    /// Amount requested.
    pub amount: u64,
    /// Amount debited: less than `amount` only if transfers drained the account
    /// between the balance check and the settlement's commit.
    pub debited: u64,
    /// The on-chain transaction.
    pub receipt: SettlementReceipt,
}

/// What applying a command returns to the client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Output {
    /// Applied; the balances of the accounts involved afterwards.
    Applied {
        /// Account name to balance.
        balances: BTreeMap<String, u64>,
    },
    /// A settlement was applied.
    Settled {
        /// Settlement key.
        key: String,
        /// The settlement.
        settlement: SettlementRecord,
        /// The account's balance afterwards.
        balance: u64,
    },
    /// Refused by the state; nothing changed.
    Rejected {
        /// Why.
        reason: Rejection,
        /// Human-readable detail.
        message: String,
    },
}

/// The ledger: balances by account and settlements by key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    /// Balance of each account.
    pub accounts: BTreeMap<String, u64>,
    /// Settlements by idempotency key.
    pub settlements: BTreeMap<String, SettlementRecord>,
    /// Commands applied by this process (not replicated, not in snapshots).
    #[serde(skip)]
    applies: ApplyCounter,
}

/// Counts applies in this process; shared by clones, equal to any other counter.
#[derive(Debug, Clone, Default)]
struct ApplyCounter(Arc<AtomicU64>);

impl PartialEq for ApplyCounter {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for ApplyCounter {}

/// Checks an account name: 1-64 characters out of `A-Z a-z 0-9 _ - .`.
pub fn check_account(name: &str) -> Result<(), ValidationError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_ACCOUNT_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(ValidationError::malformed(
            "account",
            format!("must be 1-{MAX_ACCOUNT_LEN} characters of A-Z a-z 0-9 _ - ."),
        ))
    }
}

fn check_amount(amount: u64) -> Result<(), ValidationError> {
    if amount == 0 {
        return Err(ValidationError::malformed("amount", "must be positive"));
    }
    Ok(())
}

fn rejected(reason: Rejection, message: impl Into<String>) -> Output {
    Output::Rejected {
        reason,
        message: message.into(),
    }
}

impl Ledger {
    /// Balance of `account`, if it exists.
    pub fn balance(&self, account: &str) -> Option<u64> {
        self.accounts.get(account).copied()
    }

    /// Commands applied by this process since it started (entries restored from a
    /// snapshot are not counted): tells a join from a checkpoint from a full replay.
    pub fn applied_here(&self) -> u64 {
        self.applies.0.load(Ordering::Relaxed)
    }

    /// Sum of all balances.
    pub fn total(&self) -> u128 {
        self.accounts.values().map(|&b| u128::from(b)).sum()
    }

    fn applied<'a>(&self, names: impl IntoIterator<Item = &'a str>) -> Output {
        Output::Applied {
            balances: names
                .into_iter()
                .map(|n| (n.to_owned(), self.balance(n).unwrap_or(0)))
                .collect(),
        }
    }
}

impl StateMachine for Ledger {
    type Command = Command;
    type Output = Output;

    fn validate(&self, command: &Command) -> Result<(), ValidationError> {
        match command {
            Command::Deposit { account, amount } => {
                check_account(account)?;
                check_amount(*amount)
            }
            Command::Transfer { from, to, amount } => {
                check_account(from)?;
                check_account(to)?;
                check_amount(*amount)?;
                if from == to {
                    return Err(ValidationError::malformed(
                        "transfer",
                        "from and to are the same account",
                    ));
                }
                Ok(())
            }
            Command::Settle {
                key,
                account,
                amount,
            } => {
                if key.is_empty() || key.len() > 128 || key.chars().any(char::is_control) {
                    return Err(ValidationError::malformed(
                        "settlement key",
                        "must be 1-128 bytes without control characters",
                    ));
                }
                check_account(account)?;
                check_amount(*amount)
            }
        }
    }

    fn apply(&mut self, command: &Command, effect: Option<&[u8]>) -> Output {
        self.applies.0.fetch_add(1, Ordering::Relaxed);
        match command {
            Command::Deposit { account, amount } => {
                let balance = self.accounts.get(account).copied().unwrap_or(0);
                let Some(new) = balance.checked_add(*amount) else {
                    return rejected(Rejection::Overflow, format!("{account} would overflow"));
                };
                self.accounts.insert(account.clone(), new);
                self.applied([account.as_str()])
            }
            Command::Transfer { from, to, amount } => {
                let Some(&have) = self.accounts.get(from) else {
                    return rejected(Rejection::UnknownAccount, format!("no account {from}"));
                };
                if have < *amount {
                    return rejected(
                        Rejection::Overdraft,
                        format!("{from} has {have}, cannot move {amount}"),
                    );
                }
                let credit = self.accounts.get(to).copied().unwrap_or(0);
                let Some(credited) = credit.checked_add(*amount) else {
                    return rejected(Rejection::Overflow, format!("{to} would overflow"));
                };
                self.accounts.insert(from.clone(), have - amount);
                self.accounts.insert(to.clone(), credited);
                self.applied([from.as_str(), to.as_str()])
            }
            Command::Settle {
                key,
                account,
                amount,
            } => {
                let receipt = match effect.map(serde_json::from_slice::<SettlementReceipt>) {
                    Some(Ok(r)) => r,
                    // Every replica sees the same logged bytes, so this is deterministic.
                    Some(Err(_)) | None => {
                        return rejected(
                            Rejection::InvalidReceipt,
                            "settlement without a valid on-chain receipt",
                        );
                    }
                };
                if let Some(done) = self.settlements.get(key) {
                    return Output::Settled {
                        key: key.clone(),
                        settlement: done.clone(),
                        balance: self.balance(&done.account).unwrap_or(0),
                    };
                }
                let balance = self.accounts.get(account).copied().unwrap_or(0);
                let debited = balance.min(*amount);
                if self.accounts.contains_key(account) {
                    self.accounts.insert(account.clone(), balance - debited);
                }
                let record = SettlementRecord {
                    account: account.clone(),
                    amount: *amount,
                    debited,
                    receipt,
                };
                self.settlements.insert(key.clone(), record.clone());
                Output::Settled {
                    key: key.clone(),
                    settlement: record,
                    balance: balance - debited,
                }
            }
        }
    }

    fn snapshot(&self) -> Result<Vec<u8>> {
        serde_json::to_vec(self).map_err(|e| Error::backend("ledger", e, false))
    }

    fn restore(&mut self, bytes: &[u8]) -> Result<()> {
        let state: Ledger = serde_json::from_slice(bytes)
            .map_err(|e| ValidationError::malformed("ledger snapshot", e))?;
        for name in state.accounts.keys() {
            check_account(name)?;
        }
        let applies = self.applies.clone();
        *self = state;
        self.applies = applies;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dep(a: &str, n: u64) -> Command {
        Command::Deposit {
            account: a.into(),
            amount: n,
        }
    }

    fn tr(f: &str, t: &str, n: u64) -> Command {
        Command::Transfer {
            from: f.into(),
            to: t.into(),
            amount: n,
        }
    }

    #[test]
    fn transfers_deposits_and_rejections() {
        let mut l = Ledger::default();
        assert!(matches!(
            l.apply(&dep("a", 10), None),
            Output::Applied { .. }
        ));
        match l.apply(&tr("a", "b", 4), None) {
            Output::Applied { balances } => {
                assert_eq!(balances["a"], 6);
                assert_eq!(balances["b"], 4);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            l.apply(&tr("a", "b", 7), None),
            Output::Rejected {
                reason: Rejection::Overdraft,
                ..
            }
        ));
        assert!(matches!(
            l.apply(&tr("nobody", "b", 1), None),
            Output::Rejected {
                reason: Rejection::UnknownAccount,
                ..
            }
        ));
        l.apply(&dep("c", u64::MAX), None);
        assert!(matches!(
            l.apply(&tr("a", "c", 1), None),
            Output::Rejected {
                reason: Rejection::Overflow,
                ..
            }
        ));
        assert_eq!(l.balance("a"), Some(6));
        assert_eq!(l.balance("b"), Some(4));
    }

    #[test]
    fn validation_refuses_malformed_commands() {
        let l = Ledger::default();
        for bad in [
            dep("", 1),
            dep("a b", 1),
            dep(&"x".repeat(65), 1),
            dep("a", 0),
            tr("a", "a", 1),
            Command::Settle {
                key: String::new(),
                account: "a".into(),
                amount: 1,
            },
        ] {
            assert!(l.validate(&bad).is_err(), "{bad:?}");
        }
        assert!(l.validate(&tr("a", "b", 1)).is_ok());
    }

    #[test]
    fn settlement_applies_the_logged_receipt_once() {
        let mut l = Ledger::default();
        l.apply(&dep("t", 100), None);
        let cmd = Command::Settle {
            key: "k".into(),
            account: "t".into(),
            amount: 30,
        };
        let receipt = serde_json::to_vec(&SettlementReceipt {
            tx: format!("0x{}", "ab".repeat(32)),
            block: 7,
        })
        .unwrap();
        let first = l.apply(&cmd, Some(&receipt));
        assert!(
            matches!(first, Output::Settled { balance: 70, .. }),
            "{first:?}"
        );
        let again = l.apply(&cmd, Some(&receipt));
        assert!(matches!(again, Output::Settled { balance: 70, .. }));
        assert_eq!(l.balance("t"), Some(70));
        assert!(matches!(
            l.apply(&cmd, Some(b"garbage")),
            Output::Rejected { .. }
        ));
    }

    #[test]
    fn snapshot_round_trip_and_bad_snapshot() {
        let mut l = Ledger::default();
        l.apply(&dep("a", 5), None);
        let bytes = l.snapshot().unwrap();
        let mut r = Ledger::default();
        r.restore(&bytes).unwrap();
        assert_eq!(r, l);
        assert!(r.restore(b"{nope").is_err());
        assert!(
            r.restore(br#"{"accounts":{"bad name":1},"settlements":{}}"#)
                .is_err()
        );
        assert_eq!(r, l, "unchanged after a refused restore");
    }
}
