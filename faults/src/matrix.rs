//! The runner: one run = the ledger under a client load, the run's faults injected for a
//! few seconds, healed, the load resumed until an acknowledged command, then every
//! check. A world (contracts, etcd namespace, 3 replicas) lives for several runs and is
//! replaced after a failed run.

mod inject;
mod run;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use alloy::primitives::B256;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::history::{self, Accounts, Kind, Op, Outcome, Verdict};
use crate::ledger::{Client, LEASE_TTL_SECS, Reply, SnapshotRegistry, Stack, World};
use crate::nemesis::Plan;
use crate::netfault::{Direction, Firewall};
use crate::operator::OperatorWorkload;
use crate::procs::{self, StackProc};
use crate::proxy::Mode;

/// Transfer clients (each from its own account into the hub).
const CLIENTS: usize = 3;
const INITIAL: u64 = 1_000_000_000;
/// How long the faults last (past the replicas' 2 s lease: a stopped or cut off
/// leader is replaced).
const HOLD: Duration = Duration::from_secs(3);
/// A client gives up on one command after this (its outcome is then unknown until the
/// retry after the heal).
const OP_DEADLINE: Duration = Duration::from_secs(12);
/// CPU share over the quiet window above which a process counts as spinning.
const HOT_CPU: f64 = 0.5;

/// Options of the runner.
#[derive(Debug, Clone)]
pub struct Options {
    /// The private stack's directory.
    pub stack_dir: PathBuf,
    /// The `ledger` binary.
    pub ledger_bin: PathBuf,
    /// The `br2k-operator` binary (None: no operator workload).
    pub operator_bin: Option<PathBuf>,
    /// Where logs and the registry's tmpfs go.
    pub work_dir: PathBuf,
    /// Runs per world before a fresh one.
    pub world_runs: usize,
}

/// What one run measured and found.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    /// Run number.
    pub run: usize,
    /// Its seed (`--runs 1 --seed <seed>` repeats it).
    pub seed: u64,
    /// `a` or `a+b`.
    pub faults: String,
    /// What the faults hit.
    pub targets: Vec<String>,
    /// Acknowledged commands.
    pub acknowledged: usize,
    /// Outcomes unknown at first (resolved by a retry after the heal).
    pub resolved_unknown: usize,
    /// Lost commands.
    pub lost: usize,
    /// Commands done twice.
    pub duplicated: usize,
    /// Heal to the first acknowledged command, ms.
    pub recovery_ack_ms: Option<u64>,
    /// Heal to all replicas equal (and the operator's services back), ms.
    pub recovery_converged_ms: Option<u64>,
    /// Every problem.
    pub problems: Vec<String>,
}

impl RunResult {
    /// Whether every check passed.
    pub fn ok(&self) -> bool {
        self.problems.is_empty() && self.lost == 0 && self.duplicated == 0
    }
}

/// The stack's processes the nemesis restarts.
struct StackProcs {
    etcd: Vec<StackProc>,
    anvil: StackProc,
    anvil_has_state: bool,
}

/// The runner's state.
pub struct Matrix {
    opts: Options,
    stack: Stack,
    procs: StackProcs,
    firewall: Firewall,
    operator: Option<OperatorWorkload>,
    world: Option<WorldState>,
    worlds: usize,
}

struct WorldState {
    world: World,
    /// Its snapshot registry (a fresh tmpfs per world: snapshots grow with the
    /// idempotency keys they remember).
    registry: SnapshotRegistry,
    /// The state after the last run (checked).
    model: BTreeMap<String, u64>,
    /// Every settlement acknowledged in this world.
    settled: BTreeMap<B256, String>,
    runs: usize,
    name: String,
}

fn accounts() -> Accounts {
    Accounts {
        hub: "hub".into(),
        treasury: "treasury".into(),
    }
}

impl Matrix {
    /// Opens the stack, starts the snapshot registry and, if asked, the operator
    /// workload.
    pub async fn start(opts: Options) -> Result<Self, String> {
        let stack = Stack::open(&opts.stack_dir)?;
        std::fs::create_dir_all(&opts.work_dir).map_err(|e| e.to_string())?;
        let etcd = (0..3)
            .map(|i| StackProc::open(&stack.dir, &format!("etcd-{i}")))
            .collect::<Result<Vec<_>, _>>()?;
        let anvil = StackProc::open(&stack.dir, "anvil")?;
        let anvil_has_state = procs_has_arg(&anvil, "--state");
        let firewall = Firewall::new()?;
        let operator = match &opts.operator_bin {
            Some(bin) => Some(
                OperatorWorkload::start(bin.clone(), &opts.work_dir.join("operator"))
                    .await
                    .map_err(|e| format!("operator workload: {e}"))?,
            ),
            None => None,
        };
        Ok(Self {
            opts,
            stack,
            procs: StackProcs {
                etcd,
                anvil,
                anvil_has_state,
            },
            firewall,
            operator,
            world: None,
            worlds: 0,
        })
    }

    /// The iptables chain (for the report).
    pub fn chain(&self) -> &str {
        self.firewall.chain()
    }

    async fn new_world(&mut self) -> Result<(), String> {
        self.worlds += 1;
        // The runner's PID and a random tag: a PID a later runner reuses must not find
        // this world's etcd namespace or service.
        let name = format!(
            "f{}-{:04x}-w{}",
            std::process::id(),
            rand::random::<u16>(),
            self.worlds
        );
        let dir = self.opts.work_dir.join(&name);
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let registry = SnapshotRegistry::start(self.stack.var("BR2K_REGISTRY_BIN")?, &dir).await?;
        let world =
            World::start(&self.stack, &self.opts.ledger_bin, &registry, &dir, &name).await?;
        let c = world.client();
        if c.wait_leader(Duration::from_secs(90)).await.is_none() {
            return Err(format!("no leader in the new world\n{}", world.logs(20)));
        }
        let mut model = BTreeMap::new();
        let mut init: Vec<(String, u64)> =
            (0..CLIENTS).map(|i| (format!("c{i}"), INITIAL)).collect();
        init.push(("hub".into(), 1));
        init.push(("treasury".into(), INITIAL));
        for (acct, amount) in init {
            let body = serde_json::json!({"account": acct, "amount": amount}).to_string();
            let key = format!("{name}-init-{acct}");
            match c
                .call("/deposit", Some(&key), Some(&body), Duration::from_secs(60))
                .await
            {
                Reply::Final(200, _) => {
                    model.insert(acct, amount);
                }
                other => {
                    return Err(format!(
                        "initial deposit {acct}: {other:?}\n{}",
                        world.logs(20)
                    ));
                }
            }
        }
        self.world = Some(WorldState {
            world,
            registry,
            model,
            settled: BTreeMap::new(),
            runs: 0,
            name,
        });
        Ok(())
    }

    /// Stops everything this runner started (the stack stays up).
    pub async fn shutdown(mut self) {
        let _ = self.heal_all().await;
        self.world = None;
        if let Some(op) = self.operator.take() {
            op.shutdown().await;
        }
    }

    /// The election timeout the replicas run with.
    pub fn lease_ttl() -> Duration {
        Duration::from_secs(LEASE_TTL_SECS)
    }
}

fn procs_has_arg(p: &StackProc, arg: &str) -> bool {
    std::fs::read(format!("/proc/{}/cmdline", p.pid()))
        .map(|c| c.split(|b| *b == 0).any(|a| a == arg.as_bytes()))
        .unwrap_or(false)
}
