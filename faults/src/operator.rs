//! The operator workload: the `br2k-operator` binary (its own process) supervising two
//! services on the stack's API server, the faults it injects, and the check that both
//! services are back to their on-chain record.
//!
//! Set-up ([`OperatorWorkload::start`], on the stack named by the environment of
//! `source $BR2K_STACK_DIR/env`): a fresh `ServiceRegistry` contract on the stack's
//! anvil (anvil's account 3, so that its nonces do not race the ledger workload's
//! settlements on account 0), two registry processes of its own (the primary, behind a
//! TCP proxy that can answer 503, and the mirror, whose storage is a 16 MiB tmpfs),
//! two services (each its own image, pushed to both registries and registered pinned
//! by digest), a namespace, and the operator, which reaches the API server through a
//! TCP proxy of its own (its kubeconfig names the proxy's port, so iptables can cut
//! that port alone).
//!
//! One run: [`OperatorWorkload::inject`] starts the fault AND disturbs one service
//! while the fault is in effect (the disturbance is chosen from the seed: StatefulSet
//! deleted, a pod deleted, the image patched by another field manager, or the
//! replicas scaled), so the operator has something to repair during the fault; the
//! runner lets it last, then calls [`OperatorWorkload::heal`] and
//! [`OperatorWorkload::check`]. What inject did is in
//! [`OperatorWorkload::last_injection`].

mod check;
pub mod infra;
mod inject;
mod setup;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use alloy::transports::http::reqwest;
use br2k_chain::{ChainConfig, ChainRegistry};
use br2k_core::{Digest, ImageRef, Registry, Repository, ServiceId};
use br2k_k8s::Names;
use br2k_operator::crd::{Br2kService, Br2kServiceSpec};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use infra::{
    ControlPlaneSupervisor, IptablesDrop, KilledApiserver, Kubectl, OperatorProc, RegistryProc,
    StackEnv, TcpProxy, Tmpfs, blobs_of, build_image, clock_ticks, cpu_ticks, create_namespaces,
    host_port, http_client, install_and_connect, live_sts, poll, push_everywhere, register,
    service_spec, tear_down, template_image, trust_anchors, unique,
};

/// Anvil's dev account 3 (the workload's chain account: deploys, registers, owns).
const ANVIL_KEY3: &str = "0x7c852118294e51e653712a81e05800f419141751be58f605c371e15141b007a6";
/// Longest wait for the first deployment.
const SETUP_TIMEOUT: Duration = Duration::from_secs(120);
/// The window after convergence in which the operator must stay quiet.
const QUIET_WINDOW: Duration = Duration::from_secs(5);
/// Most reconciles allowed in [`QUIET_WINDOW`] (two services, resync 2 s, so about
/// five are expected).
const MAX_QUIET_RECONCILES: u64 = 20;
/// Most CPU (% of one core) allowed in [`QUIET_WINDOW`].
const MAX_QUIET_CPU_PCT: f64 = 50.0;
/// The image another field manager puts in place of the recorded one.
const FOREIGN_IMAGE: &str = "example.invalid/br2k-faults/intruder:1";
/// The field manager of the disturbances.
const INTRUDER: &str = "br2k-faults-intruder";
/// Size of the mirror's tmpfs.
const MIRROR_TMPFS: &str = "16m";

/// What [`OperatorWorkload::check`] found.
#[derive(Debug, Clone, Default)]
pub struct OperatorCheck {
    /// Time from the heal to both services matching their record.
    pub converged_after: Duration,
    /// What did not match (empty when converged).
    pub problems: Vec<String>,
    /// Whether the operator was busy in a loop: more than 20 reconciles or 50% of a
    /// core in the quiet window after convergence, or more than 50% of a core
    /// while the fault lasted (from the injection to the heal, when the same
    /// operator process ran throughout).
    pub hot_loop: bool,
    /// CPU (% of one core) of the operator while the fault lasted, if measured.
    pub fault_cpu_pct: Option<f64>,
    /// Reconciles and CPU (% of one core) of the operator over the quiet window
    /// after convergence (not measured when it did not converge).
    pub quiet_reconciles: Option<u64>,
    /// See [`OperatorCheck::quiet_reconciles`].
    pub quiet_cpu_pct: Option<f64>,
    /// What happened besides (control-plane components restarted since the last
    /// check).
    pub notes: Vec<String>,
    /// What was still wrong at the last look before convergence (what took
    /// longest; empty when it matched at the first look).
    pub last_wrong: Vec<String>,
}

impl OperatorCheck {
    /// Converged, and no hot loop.
    pub fn passed(&self) -> bool {
        self.problems.is_empty() && !self.hot_loop
    }
}

/// The disturbances one run applies to a service while its fault is in effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disturbance {
    /// `kubectl delete statefulset`.
    StatefulSetDeleted,
    /// `kubectl delete pod NAME-0`.
    PodDeleted,
    /// The container image patched by another field manager.
    ImagePatched,
    /// `spec.replicas` patched by another field manager.
    Scaled,
}

impl Disturbance {
    /// All of them, in the order a seed picks from.
    pub const ALL: [Disturbance; 4] = [
        Disturbance::StatefulSetDeleted,
        Disturbance::PodDeleted,
        Disturbance::ImagePatched,
        Disturbance::Scaled,
    ];

    /// Kebab-case name.
    pub fn name(self) -> &'static str {
        match self {
            Disturbance::StatefulSetDeleted => "statefulset-deleted",
            Disturbance::PodDeleted => "pod-deleted",
            Disturbance::ImagePatched => "image-patched",
            Disturbance::Scaled => "scaled",
        }
    }
}

/// What the last [`OperatorWorkload::inject`] did.
#[derive(Debug, Clone)]
pub struct Injection {
    /// The fault.
    pub fault: String,
    /// The seed.
    pub seed: u64,
    /// The service chosen (`a` or `b`): disturbed, or whose repository left the
    /// mirror.
    pub service: String,
    /// How it was disturbed (the run's first fault only).
    pub disturbance: Option<Disturbance>,
    /// Free text (e.g. how many reconciles the operator had started when killed).
    pub note: String,
}

/// One supervised service.
struct Svc {
    /// `a` or `b`.
    tag: String,
    id: ServiceId,
    names: Names,
    /// The resource's name.
    cr: String,
    repo: Repository,
    digest: Digest,
    /// Config and layer digests, as the manifest lists them.
    blobs: Vec<Digest>,
}

/// A fault in effect.
enum Active {
    OperatorKilled,
    OperatorStopped,
    Apiserver(KilledApiserver),
    Partition(IptablesDrop),
    RegistryStopped,
    Registry5xx,
    DiskFull,
}

/// The operator and its two services.
pub struct OperatorWorkload {
    dir: PathBuf,
    kubectl: Kubectl,
    client: Client,
    http: reqwest::Client,
    chain: ChainRegistry,
    ns: String,
    services: Vec<Svc>,
    primary: RegistryProc,
    /// In front of the primary: the address the records and the operator use.
    primary_proxy: TcpProxy,
    mirror: RegistryProc,
    mirror_fs: Tmpfs,
    /// The operator's way to the API server.
    api_proxy: TcpProxy,
    operator: OperatorProc,
    /// Keeps the kwok control plane running (see [`ControlPlaneSupervisor`]).
    control_plane: ControlPlaneSupervisor,
    clk_tck: f64,
    /// The faults in effect, in the order injected.
    active: Vec<Active>,
    healed_at: Option<Instant>,
    /// The operator's pid, CPU ticks and the time when the last injection returned.
    fault_cpu_start: Option<(u32, u64, Instant)>,
    /// CPU (% of one core) of the operator from the injection to the heal.
    fault_cpu_pct: Option<f64>,
    /// The injections of the current (or last) run.
    injections: Vec<Injection>,
}

/// splitmix64: the seeded choices of a run.
fn mix(seed: u64, salt: u64) -> u64 {
    let mut z = seed.wrapping_add(salt.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl OperatorWorkload {
    /// The fault classes this workload injects itself.
    pub const FAULTS: &'static [&'static str] = &[
        "operator-kill",
        "operator-stop",
        "operator-kill-mid-recovery",
        "apiserver-restart",
        "apiserver-partition-both",
        "apiserver-partition-oneway",
        "registry-stop",
        "registry-5xx",
        "registry-disk-full",
    ];

    /// The work directory (registry storage, the operator's log).
    pub fn work_dir(&self) -> &Path {
        &self.dir
    }

    /// What the last [`OperatorWorkload::inject`] did.
    pub fn last_injection(&self) -> Option<&Injection> {
        self.injections.last()
    }

    /// What the injections of the current (or last) run did.
    pub fn injections(&self) -> &[Injection] {
        &self.injections
    }

    /// The last `lines` lines of the operator's log.
    pub fn log_tail(&self, lines: usize) -> String {
        self.operator.log_tail(lines)
    }

    // -------------------------------------------------------------- faults

    // -------------------------------------------------------------- shutdown

    /// Heals what is in effect, removes the resources (while the operator runs, so its
    /// finalizer removes the workloads), stops every process, unmounts the mirror's
    /// tmpfs and deletes the namespace, the lease and the work directory (kept when
    /// `BR2K_FAULTS_KEEP` is set).
    pub async fn shutdown(mut self) {
        if let Err(e) = self.heal().await {
            eprintln!("[faults/operator] heal at shutdown: {e}");
        }
        if self.operator.exited().is_some() {
            let _ = self.start_operator().await;
        }
        tear_down(&self.client, &self.ns, &mut self.operator).await;
        self.api_proxy.stop().await;
        self.primary_proxy.stop().await;
        self.primary.stop();
        self.mirror.stop();
        self.mirror_fs.unmount();
        if std::env::var_os("BR2K_FAULTS_KEEP").is_some() {
            eprintln!("[faults/operator] kept {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }

    // -------------------------------------------------------------- reads

    fn crs(&self) -> Api<Br2kService> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// The StatefulSet `name`, or an error naming its absence.
    async fn live_sts(&self, name: &str) -> Result<StatefulSet, String> {
        live_sts(&self.client, &self.ns, name).await
    }

    /// `br2k_reconciles_total` of the running operator.
    async fn reconciles(&self) -> Result<u64, String> {
        self.operator.reconciles(&self.http).await
    }

    /// `kubectl patch statefulset NAME --type=TYPE -p PATCH --field-manager=INTRUDER`.
    async fn kubectl_patch(
        &self,
        name: &str,
        patch_type: &str,
        patch: &serde_json::Value,
    ) -> Result<String, String> {
        let manager = format!("--field-manager={INTRUDER}");
        self.kubectl
            .patch("statefulset", name, patch_type, patch, &[&manager])
            .await
    }

    /// `kubectl --kubeconfig K -n NS ARGS...` (straight to the API server).
    async fn kubectl(&self, args: &[&str]) -> Result<String, String> {
        self.kubectl.run(args).await
    }
}

impl Drop for OperatorWorkload {
    fn drop(&mut self) {
        // Undo a fault still in effect (rules, a stopped operator, the API server:
        // each guard does its own part when dropped), then stop the processes and
        // unmount (the fields' own drops, in this order).
        for a in self.active.drain(..) {
            if let Active::DiskFull = a {
                let _ = fs::remove_file(self.mirror_fs.dir.join("filler"));
            }
        }
        let _ = self.operator.resume();
        self.operator.kill();
        self.primary.stop();
        self.mirror.stop();
        self.mirror_fs.unmount();
    }
}

#[cfg(test)]
mod tests {
    use super::infra::metric;
    use super::*;

    #[test]
    fn seeded_choices_are_reproducible_and_cover_every_disturbance() {
        let picks: Vec<usize> = (0..64).map(|s| (mix(s, 2) % 4) as usize).collect();
        let again: Vec<usize> = (0..64).map(|s| (mix(s, 2) % 4) as usize).collect();
        assert_eq!(picks, again);
        for i in 0..4 {
            assert!(picks.contains(&i), "disturbance {i} never picked");
        }
    }

    #[test]
    fn metric_reads_unlabelled_lines() {
        let text =
            "# TYPE br2k_reconciles_total counter\nbr2k_reconciles_total 17\nbr2k_leader 1\n";
        assert_eq!(metric(text, "br2k_reconciles_total", None), Some(17.0));
        assert_eq!(metric(text, "br2k_leader", None), Some(1.0));
        assert_eq!(metric(text, "br2k_missing", None), None);
    }
}
