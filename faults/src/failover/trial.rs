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
}

impl Scenario {
    /// Its name in tables and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::ApiserverKill => "apiserver-kill",
            Scenario::Partition => "partition",
        }
    }

    /// Parses [`Scenario::name`].
    pub fn parse(s: &str) -> Option<Self> {
        [Scenario::ApiserverKill, Scenario::Partition]
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
    /// Loss → every replica Ready in `to` (its API server).
    pub to_ready: Option<Duration>,
    /// Loss → the new placement on chain.
    pub to_recorded: Option<Duration>,
    /// Loss → a ledger leader in `to`.
    pub to_serving: Option<Duration>,
    /// Return of `from` → its StatefulSet scaled to 0 and none of its replicas
    /// leading (its API server).
    pub standdown: Option<Duration>,
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
                "[failover] trial {i} {} {}→{} epoch {}→{}: ready {:?}, recorded {:?}, serving {:?}, stand-down {:?}{}",
                scenario.name(),
                r.from,
                r.to,
                r.epochs.0,
                r.epochs.1,
                r.to_ready,
                r.to_recorded,
                r.to_serving,
                r.standdown,
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
            Scenario::ApiserverKill => {
                let st = &self.members[fi].stack;
                killed = Some(
                    KilledApiserver::kill_in(st.var("KWOK_WORKDIR")?, st.var("BR2K_KWOK_CLUSTER")?)
                        .await?,
                );
            }
            Scenario::Partition => self.members[fi].etcd_mode(Mode::Refuse),
        }
        let (mut ready, mut recorded, mut serving, mut epoch_after) = (None, None, None, 0);
        while t0.elapsed() < WITHIN && (ready.is_none() || recorded.is_none() || serving.is_none())
        {
            self.sync_pods().await;
            let m = self.member(&to);
            if ready.is_none() && self.ready_replicas(m).await.is_ok() {
                ready = Some(t0.elapsed());
            }
            if recorded.is_none()
                && let Ok((c, e)) = self.placed().await
                && c == to
                && e > epoch_before
            {
                recorded = Some(t0.elapsed());
                epoch_after = e;
            }
            if serving.is_none() && self.leader_in(m).await.is_ok() {
                serving = Some(t0.elapsed());
            }
            tokio::time::sleep(POLL).await;
        }
        if ready.is_none() || recorded.is_none() || serving.is_none() {
            problems.push(format!(
                "no takeover by {to} within {WITHIN:?}: ready {ready:?}, recorded {recorded:?}, serving {serving:?}"
            ));
        }
        let timeline = self
            .placement_status(self.member(&to))
            .await
            .map(|p| p["lastFailover"].clone())
            .unwrap_or_default();
        // The return.
        let t1 = Instant::now();
        match (&mut killed, scenario) {
            (Some(k), _) => {
                k.restart()?;
            }
            (None, _) => self.members[fi].etcd_mode(Mode::Pass),
        }
        let mut standdown = None;
        while t1.elapsed() < WITHIN {
            self.sync_pods().await;
            let m = self.member(&from);
            let scaled = self
                .statefulset(m)
                .await
                .is_ok_and(|s| s.spec.and_then(|s| s.replicas) == Some(0));
            if scaled && m.running() == 0 && self.leader_in(m).await.is_err() {
                standdown = Some(t1.elapsed());
                break;
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
        // Settle before the next trial: both clusters steady.
        let _ = until(Duration::from_secs(30), "steady", async || {
            self.sync_pods().await;
            self.ready_replicas(self.member(&to)).await?;
            self.leader_in(self.member(&to)).await.map(drop)
        })
        .await;
        Ok(TrialResult {
            scenario,
            from,
            to,
            epochs: (epoch_before, epoch_after),
            to_ready: ready,
            to_recorded: recorded,
            to_serving: serving,
            standdown,
            timeline,
            problems,
        })
    }
}
