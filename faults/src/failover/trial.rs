//! One trial: lose the active cluster, measure the takeover, bring it back, measure
//! the stand-down.

use std::time::{Duration, Instant};

use super::Options;
use super::rig::{POLL, Rig, until};
use crate::operator::infra::KilledApiserver;
use crate::proxy::Mode;

/// How the active cluster is lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// Its kube-apiserver is SIGKILLed (restarted from its command line to return).
    ApiserverKill,
    /// It is cut off from the etcd cluster holding the leases and the log: its
    /// operator's and replicas' etcd proxies refuse every connection (its own API
    /// server stays up).
    Partition,
    /// The brake: the standby's operator runs with `--failover-max-lost-share 0.4`
    /// (one lost cluster of two is more than that), the active cluster's API server
    /// is killed; no failover may happen while it is lost, and the standby's status
    /// must say why.
    Brake,
}

impl Scenario {
    /// Its name in tables and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::ApiserverKill => "apiserver-kill",
            Scenario::Partition => "partition",
            Scenario::Brake => "brake",
        }
    }

    /// Parses [`Scenario::name`].
    pub fn parse(s: &str) -> Option<Self> {
        [
            Scenario::ApiserverKill,
            Scenario::Partition,
            Scenario::Brake,
        ]
        .into_iter()
        .find(|x| x.name() == s)
    }
}

/// What one trial measured.
#[derive(Debug, Clone)]
pub struct TrialResult {
    /// The scenario.
    pub scenario: Scenario,
    /// The lost cluster.
    pub from: String,
    /// The cluster that took over.
    pub to: String,
    /// Epochs before and after.
    pub epochs: (u64, u64),
    /// Loss → no replica of `from` leads (the lost cluster fenced: no side effect
    /// can run there any more).
    pub from_fenced: Option<Duration>,
    /// Loss → every replica Ready in `to` (its API server).
    pub to_ready: Option<Duration>,
    /// Loss → the new placement on chain.
    pub to_recorded: Option<Duration>,
    /// Loss → a ledger leader in `to`.
    pub to_serving: Option<Duration>,
    /// The heal (API server started again, or etcd reachable again) → `from`'s API
    /// server answers.
    pub returned: Option<Duration>,
    /// `from`'s API server answers again → its StatefulSet scaled to 0 by its
    /// operator (read there) and none of its replicas leading.
    pub standdown: Option<Duration>,
    /// `from`'s API server answers again → its pods gone and their processes stopped
    /// (its own controllers at work again).
    pub pods_gone: Option<Duration>,
    /// The longest round of the takeover's observations (sync of the pod runners and
    /// the four reads): each takeover figure is late by at most this.
    pub resolution: Duration,
    /// (The brake) loss → the standby's status says the failover is braked.
    pub braked: Option<Duration>,
    /// The timeline `to`'s operator wrote in its status (`lastFailover`).
    pub timeline: serde_json::Value,
    /// What went wrong.
    pub problems: Vec<String>,
}

/// Longest wait for a takeover or a stand-down before the trial fails.
const WITHIN: Duration = Duration::from_secs(90);

impl Rig {
    /// Runs `opts.trials` trials, each scenario in turn.
    pub async fn run_trials(&mut self, opts: &Options) -> Result<Vec<TrialResult>, String> {
        let mut out = Vec::new();
        for i in 0..opts.trials {
            let scenario = opts.scenarios[i % opts.scenarios.len()];
            let r = self.trial(scenario).await?;
            eprintln!(
                "[failover] trial {i} {} {}→{} epoch {}→{}: fenced {:?}, ready {:?}, recorded {:?}, serving {:?}, returned {:?}, stand-down {:?}, braked {:?}{}",
                scenario.name(),
                r.from,
                r.to,
                r.epochs.0,
                r.epochs.1,
                r.from_fenced,
                r.to_ready,
                r.to_recorded,
                r.to_serving,
                r.returned,
                r.standdown,
                r.braked,
                if r.problems.is_empty() {
                    String::new()
                } else {
                    format!(" PROBLEMS: {}", r.problems.join("; "))
                }
            );
            let failed = !r.problems.is_empty();
            out.push(r);
            if failed {
                break;
            }
        }
        Ok(out)
    }

    async fn trial(&mut self, scenario: Scenario) -> Result<TrialResult, String> {
        if scenario == Scenario::Brake {
            return self.brake_trial().await;
        }
        let (from, epoch_before) = self.placed().await?;
        let to = self
            .members
            .iter()
            .find(|m| m.name != from)
            .map(|m| m.name.clone())
            .ok_or("one cluster only")?;
        let fi = self
            .members
            .iter()
            .position(|m| m.name == from)
            .expect("from");
        let mut problems = Vec::new();
        // The loss.
        let mut killed = None;
        let t0 = Instant::now();
        match scenario {
            Scenario::ApiserverKill | Scenario::Brake => {
                let st = &self.members[fi].stack;
                killed = Some(
                    KilledApiserver::kill_in(st.var("KWOK_WORKDIR")?, st.var("BR2K_KWOK_CLUSTER")?)
                        .await?,
                );
            }
            Scenario::Partition => self.members[fi].etcd_mode(Mode::Refuse),
        }
        let (mut ready, mut recorded, mut serving, mut epoch_after) = (None, None, None, 0);
        let mut fenced = None;
        let mut resolution = Duration::ZERO;
        while t0.elapsed() < WITHIN
            && (ready.is_none() || recorded.is_none() || serving.is_none() || fenced.is_none())
        {
            let before = t0.elapsed();
            self.sync_pods().await;
            // The four observations at once; each counts from when it was answered.
            let (f, m) = (self.member(&from), self.member(&to));
            let (old_leader, to_ready, placed, new_leader) = tokio::join!(
                self.leader_in(f),
                self.ready_replicas(m),
                self.placed(),
                self.leader_in(m)
            );
            let now = t0.elapsed();
            resolution = resolution.max(now - before);
            if fenced.is_none() && old_leader.is_err() {
                fenced = Some(now);
            }
            if ready.is_none() && to_ready.is_ok() {
                ready = Some(now);
            }
            if recorded.is_none()
                && let Ok((c, e)) = placed
                && c == to
                && e > epoch_before
            {
                recorded = Some(now);
                epoch_after = e;
            }
            if serving.is_none() && new_leader.is_ok() {
                serving = Some(now);
            }
            tokio::time::sleep(POLL).await;
        }
        if ready.is_none() || recorded.is_none() || serving.is_none() || fenced.is_none() {
            problems.push(format!(
                "no takeover by {to} within {WITHIN:?}: ready {ready:?}, recorded {recorded:?}, serving {serving:?}, {from} fenced {fenced:?}"
            ));
        }
        let timeline = self
            .placement_status(self.member(&to))
            .await
            .map(|p| p["lastFailover"].clone())
            .unwrap_or_default();
        // The return.
        let t1 = Instant::now();
        match &mut killed {
            Some(k) => {
                k.restart()?;
                self.members[fi].control_plane.restart_all();
            }
            None => self.members[fi].etcd_mode(Mode::Pass),
        }
        let mut returned = None;
        while returned.is_none() && t1.elapsed() < WITHIN {
            if self.statefulset(self.member(&from)).await.is_ok() {
                returned = Some(t1.elapsed());
            } else {
                tokio::time::sleep(POLL).await;
            }
        }
        let t2 = Instant::now();
        let (mut standdown, mut pods_gone) = (None, None);
        while t2.elapsed() < WITHIN && (standdown.is_none() || pods_gone.is_none()) {
            self.sync_pods().await;
            let m = self.member(&from);
            if standdown.is_none()
                && self
                    .statefulset(m)
                    .await
                    .is_ok_and(|s| s.spec.and_then(|s| s.replicas) == Some(0))
                && self.leader_in(m).await.is_err()
            {
                standdown = Some(t2.elapsed());
            }
            if pods_gone.is_none()
                && self.ready_pods(m).await.is_ok_and(|p| p.is_empty())
                && m.running() == 0
            {
                pods_gone = Some(t2.elapsed());
            }
            tokio::time::sleep(POLL).await;
        }
        if standdown.is_none() {
            problems.push(format!("{from} did not stand down within {WITHIN:?}"));
        }
        // The lost cluster's operator must say who runs the service.
        let from_view = until(
            Duration::from_secs(30),
            "the old cluster's status",
            async || {
                let p = self.placement_status(self.member(&from)).await?;
                if p["decision"] == "standby" && p["activeCluster"] == to.as_str() {
                    Ok(p)
                } else {
                    Err(format!("{p}"))
                }
            },
        )
        .await;
        if let Err(e) = from_view {
            problems.push(e);
        }
        // Settle before the next trial: both clusters steady, the returned one's
        // control plane at work again (it is the next trial's standby).
        let steady = until(Duration::from_secs(60), "steady", async || {
            self.sync_pods().await;
            self.ready_replicas(self.member(&to)).await?;
            self.control_plane_ready(self.member(&from)).await?;
            self.leader_in(self.member(&to)).await.map(drop)
        })
        .await;
        if let Err(e) = steady {
            problems.push(e);
        }
        Ok(TrialResult {
            scenario,
            from,
            to,
            epochs: (epoch_before, epoch_after),
            from_fenced: fenced,
            resolution,
            to_ready: ready,
            to_recorded: recorded,
            to_serving: serving,
            returned,
            standdown,
            pods_gone,
            braked: None,
            timeline,
            problems,
        })
    }

    /// The brake: no takeover while the active cluster is lost, and a status that
    /// says why; then the lost cluster returns and the service runs again.
    async fn brake_trial(&mut self) -> Result<TrialResult, String> {
        let (from, epoch_before) = self.placed().await?;
        let ti = self
            .members
            .iter()
            .position(|m| m.name != from)
            .ok_or("one cluster")?;
        let fi = 1 - ti;
        let to = self.members[ti].name.clone();
        let mut problems = Vec::new();
        self.members[ti].restart_operator(&["--failover-max-lost-share", "0.4"])?;
        until(
            Duration::from_secs(60),
            "the standby's operator back",
            async || {
                let p = self.placement_status(self.member(&to)).await?;
                if p["decision"] == "standby" {
                    Ok(())
                } else {
                    Err(format!("{p}"))
                }
            },
        )
        .await?;
        let st = &self.members[fi].stack;
        let mut killed =
            KilledApiserver::kill_in(st.var("KWOK_WORKDIR")?, st.var("BR2K_KWOK_CLUSTER")?).await?;
        // Three lease periods: time enough for a takeover that must not come.
        let t0 = Instant::now();
        let mut braked = None;
        while t0.elapsed() < Duration::from_secs(15) {
            self.sync_pods().await;
            if let Ok((c, e)) = self.placed().await
                && (c != from || e != epoch_before)
            {
                problems.push(format!("braked failover happened: placement {c} epoch {e}"));
                break;
            }
            if let Ok(s) = self.statefulset(self.member(&to)).await
                && s.spec.and_then(|s| s.replicas).unwrap_or(0) != 0
            {
                problems.push(format!("braked failover scaled {to} up"));
                break;
            }
            if braked.is_none()
                && let Ok(p) = self.placement_status(self.member(&to)).await
                && p["decision"] == "braked"
                && p["message"].as_str().is_some_and(|m| m.contains("braked"))
            {
                braked = Some(t0.elapsed());
            }
            tokio::time::sleep(POLL).await;
        }
        if braked.is_none() {
            problems.push(format!("{to}'s status never said the failover is braked"));
        }
        killed.restart()?;
        self.members[fi].control_plane.restart_all();
        self.members[ti].restart_operator(&[])?;
        let back = until(
            Duration::from_secs(90),
            "service back after the brake",
            async || {
                self.sync_pods().await;
                let (c, _) = self.placed().await?;
                let m = self.member(&c);
                self.ready_replicas(m).await?;
                self.leader_in(m).await.map(drop)
            },
        )
        .await;
        if let Err(e) = back {
            problems.push(e);
        }
        let epoch_after = self.placed().await.map(|p| p.1).unwrap_or(0);
        Ok(TrialResult {
            scenario: Scenario::Brake,
            from,
            to,
            epochs: (epoch_before, epoch_after),
            from_fenced: None,
            resolution: Duration::ZERO,
            to_ready: None,
            to_recorded: None,
            to_serving: None,
            returned: None,
            standdown: None,
            pods_gone: None,
            braked,
            timeline: serde_json::Value::Null,
            problems,
        })
    }
}
