//! The operator workload's faults: injecting them (with a disturbance) and healing.

use super::*;

impl OperatorWorkload {
    /// Starts fault `fault` (one of [`Self::FAULTS`]); returns once it is in effect.
    ///
    /// The first fault of a run (none in effect) also disturbs one service while it
    /// is in effect (the service and the [`Disturbance`] are chosen from `seed`), so
    /// the operator has something to repair during the fault: after the fault for
    /// `apiserver-restart` (kubectl needs the API server: disturbed just before the
    /// kill), `operator-kill-mid-recovery` (disturbed, then killed once a reconcile
    /// started) and `registry-disk-full` (the service's repository is removed from
    /// the full mirror). A second fault of the same run (a pair) does not disturb
    /// again. A fault already in effect, or one whose injection fails, is an error;
    /// on an error every fault in effect is healed before returning.
    pub async fn inject(&mut self, fault: &str, seed: u64) -> Result<(), String> {
        if !Self::FAULTS.contains(&fault) {
            return Err(format!("unknown fault {fault}"));
        }
        if self.injections.iter().any(|i| i.fault == fault) && !self.active.is_empty() {
            return Err(format!("{fault} is in effect already"));
        }
        if self.active.is_empty() {
            self.injections.clear();
        }
        let res = self.inject_one(fault, seed).await;
        if res.is_err() {
            let _ = self.heal().await;
        }
        // The window of the CPU measurement: from the run's last injection.
        self.fault_cpu_start = self
            .operator
            .pid()
            .and_then(|pid| cpu_ticks(pid).ok().map(|t| (pid, t, Instant::now())));
        res
    }

    pub(super) async fn inject_one(&mut self, fault: &str, seed: u64) -> Result<(), String> {
        self.healed_at = None;
        let first = self.active.is_empty();
        let svc = (mix(seed, 1) % self.services.len() as u64) as usize;
        let disturbance = Disturbance::ALL[(mix(seed, 2) % 4) as usize];
        let mut note = String::new();
        // Disturbs when this is the run's first fault.
        let disturb = async |me: &Self| -> Result<(), String> {
            if first {
                me.disturb(svc, disturbance).await
            } else {
                Ok(())
            }
        };
        match fault {
            "operator-kill" => {
                self.operator.kill();
                self.active.push(Active::OperatorKilled);
                disturb(self).await?;
            }
            "operator-stop" => {
                self.operator.pause()?;
                self.active.push(Active::OperatorStopped);
                disturb(self).await?;
            }
            "operator-kill-mid-recovery" => {
                let before = self.reconciles().await.unwrap_or(0);
                disturb(self).await?;
                // The operator counts a reconcile when it starts one: kill it as soon
                // as one started after the disturbance.
                let started = poll(Duration::from_secs(10), "a reconcile starts", async || {
                    let n = self.reconciles().await?;
                    if n > before {
                        Ok(n)
                    } else {
                        Err(format!("{n} reconciles"))
                    }
                })
                .await;
                self.operator.kill();
                self.active.push(Active::OperatorKilled);
                note = match started {
                    Ok(n) => format!("killed with reconcile {} started", n - before),
                    Err(e) => format!("killed without a reconcile seen: {e}"),
                };
            }
            "apiserver-restart" => {
                // Disturb first: the repair is under way when the API server goes.
                disturb(self).await?;
                let killed = KilledApiserver::kill().await?;
                self.active.push(Active::Apiserver(killed));
            }
            "apiserver-partition-both" | "apiserver-partition-oneway" => {
                let both = fault.ends_with("both");
                let tag = format!("br2k-faults-{}", self.ns);
                let guard = IptablesDrop::install(
                    self.api_proxy.port,
                    both,
                    &tag,
                    &self.dir.join(format!("iptables-{fault}.rules")),
                )?;
                self.active.push(Active::Partition(guard));
                disturb(self).await?;
            }
            "registry-stop" => {
                self.primary_proxy.stop().await;
                self.primary.stop();
                self.active.push(Active::RegistryStopped);
                disturb(self).await?;
            }
            "registry-5xx" => {
                self.primary_proxy.set_failing(true).await;
                self.active.push(Active::Registry5xx);
                disturb(self).await?;
            }
            "registry-disk-full" => {
                // The service's repository leaves the mirror, which is full: the
                // operator must copy the image there and cannot until the heal.
                let repo_dir = self.mirror.repo_dir(self.services[svc].repo.as_str());
                if repo_dir.exists() {
                    fs::remove_dir_all(&repo_dir)
                        .map_err(|e| format!("{}: {e}", repo_dir.display()))?;
                }
                self.active.push(Active::DiskFull);
                let n = self.mirror_fs.fill("filler")?;
                note = format!(
                    "mirror full ({n} bytes of filler), repository of {} removed",
                    self.services[svc].tag
                );
                disturb(self).await?;
            }
            _ => unreachable!("checked against FAULTS"),
        }
        self.injections.push(Injection {
            fault: fault.to_owned(),
            seed,
            service: self.services[svc].tag.clone(),
            disturbance: first.then_some(disturbance),
            note,
        });
        Ok(())
    }

    /// Applies `d` to service `svc` with kubectl (straight to the API server, with
    /// a field manager of its own).
    pub(super) async fn disturb(&self, svc: usize, d: Disturbance) -> Result<(), String> {
        let s = &self.services[svc];
        let base = s.names.base.as_str();
        match d {
            Disturbance::StatefulSetDeleted => {
                self.kubectl(&["delete", "statefulset", base, "--wait=false"])
                    .await?;
            }
            Disturbance::PodDeleted => {
                let pod = format!("{base}-0");
                self.kubectl(&["delete", "pod", &pod, "--wait=false"])
                    .await?;
            }
            Disturbance::ImagePatched => {
                let sts = self.live_sts(base).await?;
                let container = sts
                    .spec
                    .as_ref()
                    .and_then(|s| s.template.spec.as_ref())
                    .and_then(|s| s.containers.first())
                    .map(|c| c.name.clone())
                    .ok_or("StatefulSet without a container")?;
                let patch = json!({"spec": {"template": {"spec": {"containers": [
                    {"name": container, "image": FOREIGN_IMAGE}
                ]}}}});
                self.kubectl_patch(base, "strategic", &patch).await?;
            }
            Disturbance::Scaled => {
                let patch = json!({"spec": {"replicas": 5}});
                self.kubectl_patch(base, "merge", &patch).await?;
            }
        }
        Ok(())
    }

    /// Ends every fault this workload injected (the last one first); the error
    /// names every heal that failed.
    pub async fn heal(&mut self) -> Result<(), String> {
        self.fault_cpu_pct = self.fault_cpu_start.take().and_then(|(pid, t0, at)| {
            let same = self.operator.pid() == Some(pid);
            let t1 = cpu_ticks(pid).ok().filter(|_| same)?;
            let wall = at.elapsed().as_secs_f64().max(0.001);
            Some(t1.saturating_sub(t0) as f64 / self.clk_tck / wall * 100.0)
        });
        let mut errors = Vec::new();
        while let Some(a) = self.active.pop() {
            let res = match a {
                Active::OperatorKilled => self.operator.start(),
                Active::OperatorStopped => self.operator.resume(),
                Active::Apiserver(mut a) => a.restart().map(drop),
                Active::Partition(mut p) => p.remove(),
                Active::RegistryStopped => {
                    let r = self.primary.start().await;
                    let p = self.primary_proxy.resume().await;
                    r.and(p)
                }
                Active::Registry5xx => {
                    self.primary_proxy.set_failing(false).await;
                    Ok(())
                }
                Active::DiskFull => {
                    let f = self.mirror_fs.dir.join("filler");
                    fs::remove_file(&f).map_err(|e| format!("{}: {e}", f.display()))
                }
            };
            if let Err(e) = res {
                errors.push(e);
            }
        }
        self.healed_at = Some(Instant::now());
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}
