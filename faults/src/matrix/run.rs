//! One run of the matrix: the load, the faults, the heal, the checks.

use super::*;

impl Matrix {
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

    pub(super) async fn run_inner(
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
    pub(super) async fn converge(
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
        client
            .wait_leader(Duration::from_secs(60))
            .await
            .ok_or_else(|| "no leader after the heal".to_owned())?;
        // A linearizable read makes the leader apply everything committed.
        let _ = client
            .call("/accounts", None, None, Duration::from_secs(30))
            .await;
        // The states are compared at one index that every replica applied: the same
        // applied index everywhere, before and after the reads. Not the index of the
        // replica that says it leads: a deposed leader says so until it hears from
        // etcd again (up to its keep-alive timeout after the heal), and its index is
        // behind (a check against it compared replicas at different indexes).
        let mut states = loop {
            let before = self.applied_indexes(client).await;
            if let Some(Some(i)) = before.first()
                && before.iter().all(|b| b == &Some(*i))
            {
                let mut states = Vec::new();
                for u in &client.urls {
                    states.push(client.local_accounts(u).await);
                }
                if self.applied_indexes(client).await == before
                    && let Some(states) = states.into_iter().collect::<Option<Vec<_>>>()
                {
                    break states;
                }
            }
            if start.elapsed() > Duration::from_secs(90) {
                let w = self.world.as_ref().expect("world");
                return Err(format!(
                    "the replicas do not reach one applied index (last: {before:?})\n{}",
                    w.world.logs(15)
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        for (i, s) in states.iter().enumerate().skip(1) {
            if *s != states[0] {
                res.problems.push(format!(
                    "replica {i} differs from replica 0 at the same applied index: {s:?} vs {:?}",
                    states[0]
                ));
            }
        }
        Ok(states.swap_remove(0))
    }

    /// Each replica's applied index (`None` where its status does not answer).
    async fn applied_indexes(&self, client: &Client) -> Vec<Option<u64>> {
        let mut v = Vec::new();
        for u in &client.urls {
            v.push(
                client
                    .status(u)
                    .await
                    .and_then(|s| s["applied_index"].as_u64()),
            );
        }
        v
    }
}
