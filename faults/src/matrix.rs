//! The runner: one run = the ledger under a client load, the run's faults injected for a
//! few seconds, healed, the load resumed until an acknowledged command, then every
//! check. A world (contracts, etcd namespace, 3 replicas) lives for several runs and is
//! replaced after a failed run.

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

    /// Runs one plan.
    pub async fn run(&mut self, run: usize, plan: &Plan) -> RunResult {
        let mut res = RunResult {
            run,
            seed: plan.seed,
            faults: plan.label(),
            targets: Vec::new(),
            acknowledged: 0,
            resolved_unknown: 0,
            lost: 0,
            duplicated: 0,
            recovery_ack_ms: None,
            recovery_converged_ms: None,
            problems: Vec::new(),
        };
        if let Err(e) = self.run_inner(run, plan, &mut res).await {
            res.problems.push(e);
        }
        // Whatever happened, nothing stays broken.
        if let Err(e) = self.heal_all().await {
            res.problems.push(format!("heal: {e}"));
        }
        let reset = !res.ok()
            || self
                .world
                .as_ref()
                .is_some_and(|w| w.runs >= self.opts.world_runs);
        if reset && let Some(w) = self.world.take() {
            if !res.ok() {
                res.problems
                    .push(format!("world {} logs:\n{}", w.name, w.world.logs(12)));
            }
            drop(w);
        }
        res
    }

    async fn run_inner(
        &mut self,
        run: usize,
        plan: &Plan,
        res: &mut RunResult,
    ) -> Result<(), String> {
        if self.world.is_none() {
            self.new_world().await?;
        }
        let (client, prefix) = {
            let w = self.world.as_ref().expect("world");
            (w.world.client(), format!("{}-r{run}", w.name))
        };
        let start = Instant::now();
        let history: Arc<Mutex<Vec<Op>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for i in 0..=CLIENTS + 1 {
            let (client, history, stop, prefix) = (
                client.clone(),
                history.clone(),
                stop.clone(),
                prefix.clone(),
            );
            tasks.push(tokio::spawn(async move {
                let mut j = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let amount = 1 + (j % 7);
                    let (kind, key) = if i < CLIENTS {
                        (
                            Kind::Transfer {
                                from: format!("c{i}"),
                                to: "hub".into(),
                                amount,
                            },
                            format!("{prefix}-t{i}-{j}"),
                        )
                    } else if i == CLIENTS {
                        (
                            Kind::Deposit {
                                account: "hub".into(),
                                amount,
                            },
                            format!("{prefix}-d-{j}"),
                        )
                    } else {
                        (
                            Kind::Settle {
                                account: "treasury".into(),
                                amount,
                            },
                            format!("{prefix}-s-{j}"),
                        )
                    };
                    let invoke = start.elapsed();
                    let reply = client
                        .call(kind.path(), Some(&key), Some(&kind.body()), OP_DEADLINE)
                        .await;
                    let complete = start.elapsed();
                    let (outcome, complete) = match reply {
                        Reply::Final(200, v) => (Outcome::Ok(v), Some(complete)),
                        Reply::Final(s, v) => (Outcome::Failed(s, v), Some(complete)),
                        Reply::NoAnswer(_) => (Outcome::Unknown, None),
                    };
                    history.lock().expect("lock").push(Op {
                        key,
                        kind,
                        invoke,
                        complete,
                        outcome,
                    });
                    j += 1;
                }
            }));
        }
        // Warm up, then the faults.
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let mut rng = StdRng::seed_from_u64(plan.pick);
        let mut inject_err = None;
        for f in &plan.faults {
            match self.inject(f, &mut rng, &client).await {
                Ok(t) => res.targets.push(t),
                Err(e) => {
                    inject_err = Some(format!("inject {f}: {e}"));
                    break;
                }
            }
        }
        if inject_err.is_none() {
            // BR2K_FAULTS_HOLD_MS: a longer (or shorter) fault, to chase a finding.
            let hold = std::env::var("BR2K_FAULTS_HOLD_MS")
                .ok()
                .and_then(|v| v.parse().ok())
                .map_or(HOLD, Duration::from_millis);
            tokio::time::sleep(hold).await;
        }
        let healed = start.elapsed();
        let heal_result = self.heal_all().await;
        // Load until the first acknowledged command after the heal (at most 90 s).
        let first_ack = loop {
            let found = history
                .lock()
                .expect("lock")
                .iter()
                .filter(|o| matches!(o.outcome, Outcome::Ok(_)))
                .filter_map(|o| o.complete)
                .filter(|c| *c >= healed)
                .min();
            if let Some(t) = found {
                break Some(t);
            }
            if start.elapsed() > healed + Duration::from_secs(90) {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        res.recovery_ack_ms = first_ack.map(|t| (t - healed).as_millis() as u64);
        tokio::time::sleep(Duration::from_millis(800)).await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            let _ = t.await;
        }
        if let Some(e) = inject_err {
            return Err(e);
        }
        heal_result?;
        if first_ack.is_none() {
            res.problems
                .push("no command acknowledged within 90 s of the heal".into());
        }
        // Unknown outcomes: retried with the same key until answered.
        let mut ops = std::mem::take(&mut *history.lock().expect("lock"));
        for op in ops.iter_mut() {
            if op.outcome != Outcome::Unknown {
                continue;
            }
            res.resolved_unknown += 1;
            let reply = client
                .call(
                    op.kind.path(),
                    Some(&op.key),
                    Some(&op.kind.body()),
                    Duration::from_secs(60),
                )
                .await;
            op.complete = Some(start.elapsed());
            op.outcome = match reply {
                Reply::Final(200, v) => Outcome::Ok(v),
                Reply::Final(s, v) => Outcome::Failed(s, v),
                Reply::NoAnswer(last) => {
                    res.problems
                        .push(format!("{}: no answer to the retry; last: {last}", op.key));
                    Outcome::Unknown
                }
            };
        }
        // Replicas equal, after catching up with the leader.
        let fin = self.converge(&client, res).await?;
        let operator_converged = match self.operator.as_mut() {
            Some(op) => match op.check(Duration::from_secs(120)).await {
                Ok(c) => {
                    res.problems
                        .extend(c.problems.iter().map(|p| format!("operator: {p}")));
                    if c.hot_loop {
                        res.problems
                            .push("operator: busy in a loop while idle".into());
                    }
                    Some(c.converged_after)
                }
                Err(e) => {
                    res.problems.push(format!("operator check: {e}"));
                    None
                }
            },
            None => None,
        };
        let converged = start.elapsed().saturating_sub(healed);
        res.recovery_converged_ms = Some(
            converged
                .max(operator_converged.unwrap_or_default())
                .as_millis() as u64,
        );

        let w = self.world.as_mut().expect("world");
        let mut v: Verdict = history::check(&w.model, &ops, &fin, &accounts());
        for op in &ops {
            if let (Kind::Settle { .. }, Outcome::Ok(_)) = (&op.kind, &op.outcome) {
                w.settled
                    .insert(br2k_ledger::settle::settlement_key(&op.key), op.key.clone());
            }
        }
        let txs = w.world.settlement_txs().await?;
        let count = w.world.settled_count().await?;
        history::check_chain(&w.settled, &txs, count, &mut v);
        res.acknowledged = v.acknowledged;
        res.lost = v.lost;
        res.duplicated = v.duplicated;
        res.problems.extend(v.problems);
        w.model = fin;
        w.runs += 1;
        // No replica spinning while nothing happens.
        let pids: Vec<(usize, u32)> = w
            .world
            .replicas
            .iter()
            .filter_map(|r| r.pid().map(|p| (r.slot, p)))
            .collect();
        let before: Vec<Option<Duration>> = pids.iter().map(|(_, p)| procs::cpu_time(*p)).collect();
        let window = Instant::now();
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let secs = window.elapsed().as_secs_f64();
        for ((slot, pid), b) in pids.iter().zip(before) {
            if let (Some(b), Some(a)) = (b, procs::cpu_time(*pid)) {
                let share = (a.saturating_sub(b)).as_secs_f64() / secs;
                if share > HOT_CPU {
                    res.problems.push(format!(
                        "replica {slot} used {:.0}% of a core while idle",
                        share * 100.0
                    ));
                }
            }
        }
        Ok(())
    }

    /// Waits until every replica applied what the leader did; their local states must
    /// be equal. Returns that state.
    async fn converge(
        &mut self,
        client: &Client,
        res: &mut RunResult,
    ) -> Result<BTreeMap<String, u64>, String> {
        let w = self.world.as_mut().expect("world");
        for r in w.world.replicas.iter_mut() {
            if let Some(st) = r.exited() {
                res.problems.push(format!(
                    "replica {} exited by itself ({st}):\n{}",
                    r.slot,
                    r.tail(15)
                ));
            }
        }
        let start = Instant::now();
        let leader = client
            .wait_leader(Duration::from_secs(60))
            .await
            .ok_or_else(|| "no leader after the heal".to_owned())?;
        // A linearizable read makes the leader apply everything committed.
        let _ = client
            .call("/accounts", None, None, Duration::from_secs(30))
            .await;
        let target = client
            .status(&client.urls[leader])
            .await
            .and_then(|s| s["applied_index"].as_u64())
            .ok_or("leader status")?;
        let mut states = Vec::new();
        for u in &client.urls {
            loop {
                let applied = client
                    .status(u)
                    .await
                    .and_then(|s| s["applied_index"].as_u64());
                if applied >= Some(target) {
                    break;
                }
                if start.elapsed() > Duration::from_secs(90) {
                    return Err(format!(
                        "{u} does not catch up (applied {applied:?} < {target})\n{}",
                        w.world.logs(15)
                    ));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            states.push(
                client
                    .local_accounts(u)
                    .await
                    .ok_or_else(|| format!("{u}: no local accounts"))?,
            );
        }
        for (i, s) in states.iter().enumerate().skip(1) {
            if *s != states[0] {
                res.problems.push(format!(
                    "replica {i} differs from replica 0: {s:?} vs {:?}",
                    states[0]
                ));
            }
        }
        Ok(states.swap_remove(0))
    }

    /// Starts fault `class`; returns what it hit.
    async fn inject(
        &mut self,
        class: &str,
        rng: &mut StdRng,
        client: &Client,
    ) -> Result<String, String> {
        if OperatorWorkload::FAULTS.contains(&class) {
            let op = self
                .operator
                .as_mut()
                .ok_or("operator fault without the operator workload")?;
            op.inject(class, rng.random()).await?;
            return Ok(format!("operator:{class}"));
        }
        let leader = client.wait_leader(Duration::from_secs(10)).await;
        let ws = self.world.as_mut().expect("world");
        let (w, registry) = (&mut ws.world, &ws.registry);
        let pick_replica = |rng: &mut StdRng, want_leader: bool| -> usize {
            match leader {
                Some(l) if want_leader => l,
                Some(l) => (l + 1 + rng.random_range(0..2)) % 3,
                None => rng.random_range(0..3),
            }
        };
        match class {
            "leader-kill" | "follower-kill" => {
                let s = pick_replica(rng, class == "leader-kill");
                w.replicas[s].kill();
                Ok(format!("replica {s}"))
            }
            "leader-stop" | "follower-stop" => {
                let s = pick_replica(rng, class == "leader-stop");
                w.replicas[s].pause()?;
                Ok(format!("replica {s}"))
            }
            "etcd-kill" => {
                let m = rng.random_range(0..3);
                self.procs.etcd[m].kill("KILL")?;
                Ok(format!("etcd-{m}"))
            }
            "anvil-stop" => {
                self.procs.anvil.pause()?;
                Ok("anvil".into())
            }
            "anvil-restart" => {
                if !self.procs.anvil_has_state {
                    return Err(
                        "anvil runs without --state (BR2K_ANVIL_STATE=1 scripts/stack up)".into(),
                    );
                }
                // anvil writes its state every second and not reliably at exit (the
                // long run lost a block mined just before the signal: a settlement
                // confirmed in it vanished, a reorg deeper than any confirmation
                // count). So mining stops first, a state write passes, then SIGINT.
                // Transactions sent meanwhile wait in the mempool and are dropped with
                // it, as a node's mempool is on restart.
                let rpc = self.stack.rpc()?;
                reqwest::Client::new()
                    .post(&rpc)
                    .json(&serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "evm_setAutomine", "params": [false]}))
                    .send()
                    .await
                    .map_err(|e| format!("evm_setAutomine: {e}"))?;
                tokio::time::sleep(Duration::from_millis(2500)).await;
                self.procs.anvil.kill("INT")?;
                Ok("anvil".into())
            }
            "snapshot-registry-down" => {
                registry.proxy.set(Mode::Refuse);
                Ok("registry".into())
            }
            "snapshot-registry-5xx" => {
                registry.proxy.set(Mode::Http503);
                Ok("registry".into())
            }
            "snapshot-registry-disk-full" => {
                let n = registry.fill_disk()?;
                Ok(format!("registry tmpfs (+{} KiB)", n / 1024))
            }
            "partition-both" | "partition-to-etcd" | "partition-from-etcd" => {
                let at_leader = rng.random_bool(0.5);
                let s = pick_replica(rng, at_leader);
                let dir = match class {
                    "partition-both" => Direction::Both,
                    "partition-to-etcd" => Direction::ToServer,
                    _ => Direction::ToClient,
                };
                for p in w.etcd_ports(s) {
                    self.firewall.drop_port(p, dir)?;
                }
                Ok(format!(
                    "replica {s}{}",
                    if Some(s) == leader { " (leader)" } else { "" }
                ))
            }
            "clock-skew" => {
                let s = rng.random_range(0..3);
                let offset = if rng.random_bool(0.5) { "+30s" } else { "-30s" };
                w.restart(s, Some(offset))?;
                Ok(format!(
                    "replica {s}{} {offset}",
                    if Some(s) == leader { " (leader)" } else { "" }
                ))
            }
            other => Err(format!("unknown fault class {other}")),
        }
    }

    /// Ends every fault: network rules, registry, anvil, etcd, replicas, operator.
    pub async fn heal_all(&mut self) -> Result<(), String> {
        let mut errs = Vec::new();
        if let Err(e) = self.firewall.heal() {
            errs.push(e);
        }
        if let Err(e) = self.procs.anvil.heal() {
            errs.push(e);
        }
        for m in self.procs.etcd.iter_mut() {
            if let Err(e) = m.heal() {
                errs.push(e);
            }
        }
        if let Some(w) = self.world.as_mut() {
            w.registry.proxy.set(Mode::Pass);
            w.registry.free_disk();
            for s in 0..3 {
                let r = &mut w.world.replicas[s];
                if let Some(st) = r.exited() {
                    errs.push(format!(
                        "replica {s} had exited by itself ({st}):\n{}",
                        r.tail(8)
                    ));
                }
                if let Err(e) = r.resume() {
                    errs.push(e);
                }
                if (!r.running() || r.skew.is_some())
                    && let Err(e) = w.world.restart(s, None)
                {
                    errs.push(e);
                }
            }
        }
        if let Some(op) = self.operator.as_mut()
            && let Err(e) = op.heal().await
        {
            errs.push(format!("operator: {e}"));
        }
        // Give a restarted anvil a moment before the load hits it.
        let rpc = self.stack.rpc()?;
        let addr = rpc.trim_start_matches("http://").to_owned();
        let start = Instant::now();
        while std::net::TcpStream::connect(&addr).is_err() {
            if start.elapsed() > Duration::from_secs(30) {
                errs.push("anvil does not come back".into());
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Mining on again (anvil-restart turns it off before the restart).
        if let Err(e) = reqwest::Client::new()
            .post(&rpc)
            .json(&serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "evm_setAutomine", "params": [true]}))
            .send()
            .await
        {
            errs.push(format!("evm_setAutomine: {e}"));
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(errs.join("; "))
        }
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
