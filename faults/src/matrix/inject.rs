//! The matrix's faults: injecting each class and healing them all.

use super::*;

impl Matrix {
    /// Starts fault `class`; returns what it hit.
    pub(super) async fn inject(
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
                // Stopped by the other fault of a pair (anvil-stop): continued first,
                // or the call below would wait for it forever.
                self.procs.anvil.heal()?;
                let rpc = self.stack.rpc()?;
                rpc_client()?
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
            "etcd-answers-lost" => {
                // From the leader's next logged intent on, its requests (appends,
                // keep-alives) reach etcd and are applied, their answers are lost until
                // the heal cuts the connections: the leader cannot know what it
                // committed (run 124 of the fourth long run, made deterministic).
                let s = pick_replica(rng, true);
                w.set_etcd_mode(s, Mode::MuteAtIntent);
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
            w.world.pass_etcd();
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
        if let Err(e) = rpc_client()?
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
}

/// A client for anvil's JSON-RPC whose calls give up after 10 s.
fn rpc_client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| format!("http client: {e}"))
}
