//! Whole-cluster failover (#19) on two Kubernetes clusters, as users run it.
//!
//! Two kwok control planes (`a`: the full stack's, `b`: a control plane only, both
//! started by `scripts/stack`), one `br2k-operator --cluster <name>` process per
//! cluster (its etcd traffic through proxies of the rig, so the rig can cut it), the
//! example ledger registered with `clusters: [a, b]` and a real image in the stack's
//! registries. A *pod runner* stands in for each cluster's kubelets (kwok runs no
//! containers): for every Ready pod of the ledger's StatefulSet it runs one `ledger
//! serve --cluster <name>` process, and stops it when the pod goes; while its API
//! server does not answer it changes nothing (a kubelet keeps its containers).
//!
//! A trial loses the active cluster (its kube-apiserver SIGKILLed, or the cluster cut
//! off from etcd: its operator's and replicas' etcd proxies refuse every connection)
//! and measures, each read independently from the other cluster's API server, the
//! chain and the replicas: loss → the other cluster's StatefulSet has every replica
//! Ready, loss → the new placement recorded on chain with a newer epoch, loss → a
//! ledger leader in the new cluster. Then it brings the lost cluster back and
//! measures how long it takes to stand down (its StatefulSet scaled to 0, its
//! replicas not leading). A client settles all along with idempotency keys; at the
//! end every acknowledged settlement must be on chain exactly once and no other.

mod load;
mod member;
mod observe;
mod rig;
mod trial;

use std::path::PathBuf;
use std::time::Duration;

pub use rig::Rig;
pub use trial::{Scenario, TrialResult};

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The full stack (etcd, anvil, registries, cluster `a`): its `BR2K_STACK_DIR`.
    pub stack_a: PathBuf,
    /// The second cluster (`scripts/stack up` with `BR2K_STACK_ONLY_KUBE=1`).
    pub stack_b: PathBuf,
    /// The `ledger` binary.
    pub ledger_bin: PathBuf,
    /// The `br2k-operator` binary.
    pub operator_bin: PathBuf,
    /// Logs and state of the run.
    pub work_dir: PathBuf,
    /// Trials, each scenario in turn.
    pub trials: usize,
    /// The scenarios.
    pub scenarios: Vec<Scenario>,
    /// The placement lease TTL the operators use.
    pub lease: Duration,
}

/// Everything a run measured.
#[derive(Debug, Clone)]
pub struct Summary {
    /// One result per trial.
    pub trials: Vec<TrialResult>,
    /// Settlements acknowledged to the client.
    pub acknowledged: usize,
    /// Acknowledged settlements missing on chain.
    pub lost: usize,
    /// Settlement keys on chain more than once.
    pub duplicated: usize,
    /// Settlement keys on chain that nobody was answered for (after retrying every
    /// unknown outcome with its key).
    pub unexpected: usize,
    /// Problems found by the checks.
    pub problems: Vec<String>,
}

impl Summary {
    /// Whether every trial and check passed.
    pub fn passed(&self) -> bool {
        self.problems.is_empty()
            && self.lost == 0
            && self.duplicated == 0
            && self.unexpected == 0
            && self.trials.iter().all(|t| t.problems.is_empty())
    }
}

/// Sets the rig up, runs the trials, checks the settlements and tears down.
pub async fn run(opts: &Options) -> Result<Summary, String> {
    let mut rig = Rig::start(opts).await?;
    let result = rig.run_trials(opts).await;
    let summary = match result {
        Ok(trials) => rig.finish(trials).await,
        Err(e) => Err(format!("{e}\n{}", rig.logs(30))),
    };
    rig.shutdown().await;
    summary
}

/// The median and the largest of `values` (`None` when empty).
pub fn p50_max(values: &[Duration]) -> Option<(Duration, Duration)> {
    let mut v = values.to_vec();
    v.sort();
    Some((*v.get(v.len().checked_sub(1)? / 2)?, *v.last()?))
}
