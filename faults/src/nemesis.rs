//! The fault classes of the ledger side and of the stack, and how a seed picks a run's
//! faults.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The fault classes this crate injects itself (the operator workload adds its own,
/// `OperatorWorkload::FAULTS`).
pub const CLASSES: &[&str] = &[
    "leader-kill",
    "leader-stop",
    "follower-kill",
    "follower-stop",
    "etcd-kill",
    "etcd-answers-lost",
    "anvil-stop",
    "anvil-restart",
    "snapshot-registry-down",
    "snapshot-registry-5xx",
    "snapshot-registry-disk-full",
    "partition-both",
    "partition-to-etcd",
    "partition-from-etcd",
    "clock-skew",
];

/// What one class does (RELIABILITY.md has the same list).
pub fn describe(class: &str) -> &'static str {
    match class {
        "leader-kill" => "SIGKILL of the ledger leader; healed by starting it again (same port)",
        "leader-stop" => "SIGSTOP of the ledger leader past its lease; healed by SIGCONT",
        "follower-kill" => "SIGKILL of a ledger follower; healed by starting it again",
        "follower-stop" => "SIGSTOP of a ledger follower; healed by SIGCONT",
        "etcd-kill" => {
            "SIGKILL of one etcd member under load; healed by starting it with its command line"
        }
        "anvil-stop" => "SIGSTOP of anvil (the chain stalls); healed by SIGCONT",
        "anvil-restart" => {
            "anvil stopped (SIGTERM, state written to its --state file); healed by starting it again on it"
        }
        "snapshot-registry-down" => {
            "the snapshot registry's proxy closes every connection (a stopped server's port)"
        }
        "snapshot-registry-5xx" => "the snapshot registry's proxy answers every request 503",
        "snapshot-registry-disk-full" => "the snapshot registry's tmpfs filled up (ENOSPC on push)",
        "partition-both" => "a replica cut from every etcd member, both directions (iptables)",
        "partition-to-etcd" => "a replica's packets to etcd dropped (one-way, iptables --dport)",
        "partition-from-etcd" => "etcd's packets to a replica dropped (one-way, iptables --sport)",
        "etcd-answers-lost" => {
            "from the ledger leader's next logged settlement intent on, etcd's answers to it are lost (its requests still reach etcd); healed by cutting those connections"
        }
        "clock-skew" => {
            "a replica restarted under libfaketime, its clocks 30 s ahead or behind; healed by a restart without"
        }
        _ => "operator workload fault",
    }
}

/// The faults of one run and the random choices they make, all from its seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The run's seed.
    pub seed: u64,
    /// One class, or two different ones (a pair).
    pub faults: Vec<String>,
    /// The generator the faults draw their targets from.
    pub pick: u64,
}

impl Plan {
    /// The plan of seed `seed`: a pair with probability `pairs_pct`%, else the class
    /// `seed % classes.len()` (consecutive seeds go through the classes in turn).
    pub fn of(seed: u64, classes: &[String], pairs_pct: u32) -> Self {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = classes.len();
        let faults = if n >= 2 && rng.random_range(0..100) < pairs_pct {
            let a = rng.random_range(0..n);
            let mut b = rng.random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            vec![classes[a].clone(), classes[b].clone()]
        } else {
            vec![classes[(seed % n as u64) as usize].clone()]
        };
        Self {
            seed,
            faults,
            pick: rng.random(),
        }
    }

    /// The run's label: `a` or `a+b`.
    pub fn label(&self) -> String {
        self.faults.join("+")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_gives_the_same_plan_and_singles_cycle_through_the_classes() {
        let classes: Vec<String> = CLASSES.iter().map(|c| (*c).to_owned()).collect();
        assert_eq!(Plan::of(42, &classes, 30), Plan::of(42, &classes, 30));
        let singles: Vec<Plan> = (0..classes.len() as u64)
            .map(|s| Plan::of(s, &classes, 0))
            .collect();
        for (s, p) in singles.iter().enumerate() {
            assert_eq!(p.faults, vec![classes[s].clone()]);
        }
        let pairs: Vec<Plan> = (0..50).map(|s| Plan::of(s, &classes, 100)).collect();
        for p in &pairs {
            assert_eq!(p.faults.len(), 2);
            assert_ne!(p.faults[0], p.faults[1], "{p:?}");
        }
    }
}
