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

pub mod infra;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use alloy::transports::http::reqwest;
use br2k_chain::{ChainConfig, ChainRegistry};
use br2k_core::{
    Digest, Image, ImageRef, ImageStore, Port, Registry, Repository, ServiceId, ServiceSpec,
    ServiceState,
};
use br2k_k8s::Names;
use br2k_oci::{ImageBuilder, OciImageStore};
use br2k_operator::crd::{Br2kService, Br2kServiceSpec};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use infra::{
    ControlPlaneSupervisor, IptablesDrop, KilledApiserver, OperatorProc, RegistryProc, TcpProxy,
    Tmpfs, clock_ticks, cpu_ticks, env, metric, noise, poll, unique,
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
    kubectl: String,
    kubeconfig: String,
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

    /// Sets up two services and starts the operator; returns once both are healthy.
    /// Everything lives under `work_dir/operator-<unique>` (registry storage, logs).
    pub async fn start(operator_bin: PathBuf, work_dir: &Path) -> Result<Self, String> {
        let registry_bin = env("BR2K_REGISTRY_BIN")?;
        let kubectl = env("BR2K_KUBECTL_BIN")?;
        let kubeconfig = env("KUBECONFIG")?;
        let rpc = env("BR2K_RPC_URLS")?
            .split(',')
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned();
        if !operator_bin.is_file() {
            return Err(format!(
                "operator binary {} not found",
                operator_bin.display()
            ));
        }
        let control_plane = ControlPlaneSupervisor::start()?;
        let (cleaned, stale_runs) = infra::clean_stale(work_dir);
        for line in cleaned {
            eprintln!("[faults/operator] left by an earlier run: {line}");
        }
        let run = unique();
        let dir = work_dir.join(format!("operator-{run}"));
        fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let dir = dir.canonicalize().map_err(|e| e.to_string())?;

        // Registries: the primary behind a proxy, the mirror on a tmpfs.
        let primary = RegistryProc::spawn(&registry_bin, &dir.join("registry-primary")).await?;
        let primary_proxy = TcpProxy::start(&primary.addr).await?;
        let mirror_fs = Tmpfs::mount(&dir.join("registry-mirror/data"), MIRROR_TMPFS)?;
        let mirror = RegistryProc::spawn(&registry_bin, &dir.join("registry-mirror")).await?;

        // The operator's own way to the API server.
        let (kube_target, operator_kubeconfig) = {
            let text = fs::read_to_string(&kubeconfig).map_err(|e| format!("{kubeconfig}: {e}"))?;
            let server = text
                .lines()
                .find_map(|l| l.trim().strip_prefix("server:"))
                .map(|s| s.trim().trim_matches('\'').trim_matches('"').to_owned())
                .ok_or_else(|| format!("{kubeconfig}: no server"))?;
            let url = reqwest::Url::parse(&server).map_err(|e| format!("server {server}: {e}"))?;
            let target = format!(
                "{}:{}",
                url.host_str().ok_or("server without host")?,
                url.port_or_known_default().ok_or("server without port")?
            );
            (target, (text, server))
        };
        let api_proxy = TcpProxy::start(&kube_target).await?;
        let op_kubeconfig = dir.join("operator.kubeconfig");
        fs::write(
            &op_kubeconfig,
            operator_kubeconfig.0.replace(
                &operator_kubeconfig.1,
                &format!("https://127.0.0.1:{}", api_proxy.port),
            ),
        )
        .map_err(|e| format!("{}: {e}", op_kubeconfig.display()))?;

        // The chain.
        let url = reqwest::Url::parse(&rpc).map_err(|e| format!("BR2K_RPC_URLS {rpc}: {e}"))?;
        let chain =
            ChainRegistry::deploy(ChainConfig::new(vec![url.clone()]).with_private_key(ANVIL_KEY3))
                .await
                .map_err(|e| format!("deploy the registry contract: {e}"))?;

        // Two services.
        let seed = u64::from_str_radix(&run, 16).unwrap_or(7);
        let mut services = Vec::new();
        for (i, (tag, replicas)) in [("a", 3u32), ("b", 2u32)].into_iter().enumerate() {
            let repo = Repository::new(format!("br2k-faults/app-{run}-{tag}"))
                .map_err(|e| e.to_string())?;
            let image = build_image(mix(seed, i as u64 + 10))?;
            for addr in [&primary.addr, &mirror.addr] {
                let store = OciImageStore::insecure(addr).map_err(|e| e.to_string())?;
                let d = store
                    .push(&repo, &image, Some("1.0"))
                    .await
                    .map_err(|e| format!("push to {addr}: {e}"))?;
                if d != image.digest {
                    return Err(format!("{addr} stored {d}, built {}", image.digest));
                }
            }
            let mut blobs = vec![image.config.digest];
            blobs.extend(image.layers.iter().map(|l| l.digest));
            let image_ref = ImageRef::new(
                primary_proxy.addr(),
                repo.clone(),
                Some("1.0"),
                Some(image.digest),
            )
            .map_err(|e| e.to_string())?;
            let id = ServiceId::new(format!("fo-{run}-{tag}")).map_err(|e| e.to_string())?;
            let mut spec = ServiceSpec::new(image_ref, replicas).map_err(|e| e.to_string())?;
            spec.ports = vec![Port {
                name: "http".into(),
                port: 8080,
            }];
            spec.env = BTreeMap::from([("MODE".to_owned(), "faults".to_owned())]);
            spec.validate().map_err(|e| e.to_string())?;
            register(&chain, &id, &spec).await?;
            services.push(Svc {
                tag: tag.to_owned(),
                names: Names::of(&id),
                id,
                cr: format!("svc-{tag}"),
                repo,
                digest: image.digest,
                blobs,
            });
        }

        // Kubernetes.
        br2k_k8s::install_crypto_provider();
        let client = Client::try_default()
            .await
            .map_err(|e| format!("kube client (KUBECONFIG): {e}"))?;
        for (name, text) in [
            ("crd.yaml", include_str!("../../deploy/crd.yaml")),
            ("rbac.yaml", include_str!("../../deploy/rbac.yaml")),
        ] {
            br2k_operator::manifests::apply(&client, text, "br2k-faults")
                .await
                .map_err(|e| format!("apply deploy/{name}: {e}"))?;
        }
        let probe: Api<Br2kService> = Api::all(client.clone());
        poll(Duration::from_secs(30), "CRD served", async || {
            probe
                .list(&ListParams::default().limit(1))
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        })
        .await?;
        remove_stale_namespaces(&client, &stale_runs).await;
        let ns = format!("br2k-faults-op-{run}");
        let namespaces: Api<Namespace> = Api::all(client.clone());
        for (name, labels) in [
            ("br2k-system", json!({})),
            (ns.as_str(), json!({"br2k.io/test": "true"})),
        ] {
            let obj: Namespace =
                serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}}))
                    .map_err(|e| e.to_string())?;
            match namespaces.create(&PostParams::default(), &obj).await {
                Ok(_) => {}
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(e) => return Err(format!("create namespace {name}: {e}")),
            }
        }

        let operator = OperatorProc::new(
            operator_bin,
            dir.join("operator.log"),
            op_kubeconfig,
            &run,
            vec![
                "--chain-id".into(),
                chain.chain_id().to_string(),
                "--rpc-url".into(),
                url.to_string(),
                "--registry-contract".into(),
                chain.address().to_string(),
                "--oci-registry".into(),
                primary_proxy.addr(),
                "--oci-registry".into(),
                mirror.addr.clone(),
                "--allowed-owner".into(),
                chain.account().to_string(),
                // Only its own resources: not those of another workload, nor the
                // ones a killed run left.
                "--watch-namespace".into(),
                ns.clone(),
            ],
        );
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(5))
            .pool_max_idle_per_host(0)
            .build()
            .map_err(|e| e.to_string())?;
        let mut w = Self {
            dir,
            kubectl,
            kubeconfig,
            client,
            http,
            chain,
            ns,
            services,
            primary,
            primary_proxy,
            mirror,
            mirror_fs,
            api_proxy,
            operator,
            control_plane,
            clk_tck: clock_ticks(),
            active: Vec::new(),
            healed_at: None,
            fault_cpu_start: None,
            fault_cpu_pct: None,
            injections: Vec::new(),
        };
        if let Err(e) = w.deploy().await {
            let tail = w.log_tail(40);
            w.shutdown().await;
            return Err(format!("{e}\n--- operator log (tail) ---\n{tail}"));
        }
        Ok(w)
    }

    /// Starts the operator, creates both resources and waits until both converged.
    async fn deploy(&mut self) -> Result<(), String> {
        self.start_operator().await?;
        for s in &self.services {
            let spec = Br2kServiceSpec {
                namespace: Some(self.ns.clone()),
                ..Br2kServiceSpec::for_service(s.id.as_str())
            };
            self.crs()
                .create(&PostParams::default(), &Br2kService::new(&s.cr, spec))
                .await
                .map_err(|e| format!("create Br2kService {}: {e}", s.cr))?;
        }
        let t0 = Instant::now();
        poll(
            SETUP_TIMEOUT,
            "first deployment of both services",
            async || {
                let p = self.problems().await;
                if p.is_empty() {
                    Ok(())
                } else {
                    Err(p.join("; "))
                }
            },
        )
        .await?;
        eprintln!(
            "[faults/operator] services {} and {} deployed and Healthy in {} ms (namespace {}, primary {} via {}, mirror {}, API server via {}, work dir {})",
            self.services[0].id,
            self.services[1].id,
            t0.elapsed().as_millis(),
            self.ns,
            self.primary.addr,
            self.primary_proxy.addr(),
            self.mirror.addr,
            self.api_proxy.addr(),
            self.dir.display(),
        );
        Ok(())
    }

    /// Starts the operator process and waits until it leads.
    async fn start_operator(&mut self) -> Result<(), String> {
        self.operator.start()?;
        poll(Duration::from_secs(30), "operator leads", async || {
            let text = self.metrics().await?;
            match metric(&text, "br2k_leader") {
                Some(1.0) => Ok(()),
                other => Err(format!("br2k_leader {other:?}")),
            }
        })
        .await
    }

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
        let text = fs::read_to_string(&self.operator.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    // -------------------------------------------------------------- faults

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

    async fn inject_one(&mut self, fault: &str, seed: u64) -> Result<(), String> {
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
    async fn disturb(&self, svc: usize, d: Disturbance) -> Result<(), String> {
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

    // -------------------------------------------------------------- check

    /// Waits at most `within` until both services match their record, then measures
    /// the operator over a quiet window.
    pub async fn check(&mut self, within: Duration) -> Result<OperatorCheck, String> {
        if !self.active.is_empty() {
            return Err("a fault is still in effect (heal first)".into());
        }
        let t0 = self.healed_at.unwrap_or_else(Instant::now);
        let deadline = Instant::now() + within;
        let mut out = OperatorCheck {
            fault_cpu_pct: self.fault_cpu_pct.take(),
            ..OperatorCheck::default()
        };
        out.hot_loop = out.fault_cpu_pct.is_some_and(|c| c > MAX_QUIET_CPU_PCT);
        let res = self.converge(t0, deadline, &mut out).await;
        out.notes = self.control_plane.take_restarts();
        res.map(|()| out)
    }

    /// The loop of [`OperatorWorkload::check`].
    async fn converge(
        &mut self,
        t0: Instant,
        deadline: Instant,
        out: &mut OperatorCheck,
    ) -> Result<(), String> {
        loop {
            if let Some(st) = self.operator.exited() {
                out.problems = vec![format!("the operator exited: {st}")];
                out.converged_after = t0.elapsed();
                return Ok(());
            }
            let p = self.problems().await;
            if p.is_empty() {
                out.converged_after = t0.elapsed();
                break;
            }
            out.last_wrong = p.clone();
            if Instant::now() >= deadline {
                out.converged_after = t0.elapsed();
                out.problems = p;
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        match self.quiet_window().await {
            Ok((pct, n)) => {
                out.quiet_cpu_pct = Some(pct);
                out.quiet_reconciles = Some(n);
                out.hot_loop |= n > MAX_QUIET_RECONCILES || pct > MAX_QUIET_CPU_PCT;
            }
            Err(e) => out.problems.push(format!("quiet window: {e}")),
        }
        Ok(())
    }

    /// CPU of the operator in % of one core, and the reconciles it counted, over
    /// [`QUIET_WINDOW`].
    async fn quiet_window(&self) -> Result<(f64, u64), String> {
        let pid = self.operator.pid().ok_or("operator not running")?;
        let r0 = self.reconciles().await?;
        let c0 = cpu_ticks(pid)?;
        let t0 = Instant::now();
        tokio::time::sleep(QUIET_WINDOW).await;
        let c1 = cpu_ticks(pid)?;
        let wall = t0.elapsed().as_secs_f64();
        let r1 = self.reconciles().await?;
        let pct = c1.saturating_sub(c0) as f64 / self.clk_tck / wall * 100.0;
        Ok((pct, r1.saturating_sub(r0)))
    }

    /// What differs from the records now, for both services (empty: converged).
    async fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for s in &self.services {
            if let Err(e) = self.service_matches(s).await {
                out.push(format!("{}: {e}", s.tag));
            }
        }
        out
    }

    /// Service `s` matches its record, read independently: the record from the
    /// chain, the StatefulSet and the resource from the API server, the image from
    /// both registries' storage on disk.
    async fn service_matches(&self, s: &Svc) -> Result<(), String> {
        let record = self
            .chain
            .active(&s.id)
            .await
            .map_err(|e| format!("record: {e}"))?;
        let want = &record.spec.image;
        let digest = *want.digest().ok_or("record image without digest")?;
        if digest != s.digest {
            return Err(format!("record pins {digest}, pushed {}", s.digest));
        }
        let sts = self.live_sts(&s.names.base).await?;
        let image = template_image(&sts).ok_or("StatefulSet without an image")?;
        let live = ImageRef::parse(&image).map_err(|e| format!("image {image}: {e}"))?;
        let registry_ok = live.registry() == want.registry() || live.registry() == self.mirror.addr;
        if !registry_ok || live.repository() != want.repository() || live.digest() != Some(&digest)
        {
            return Err(format!("image {image}, record {want}"));
        }
        let replicas = i32::try_from(record.replicas).map_err(|e| e.to_string())?;
        let spec_replicas = sts.spec.as_ref().and_then(|s| s.replicas);
        let st = sts.status.clone().unwrap_or_default();
        if spec_replicas != Some(replicas)
            || st.ready_replicas.unwrap_or(0) != replicas
            || st.replicas != replicas
            || st.observed_generation != sts.metadata.generation
        {
            return Err(format!(
                "StatefulSet spec.replicas {spec_replicas:?} status replicas {} ready {:?} observedGeneration {:?}/{:?}, record {replicas}",
                st.replicas, st.ready_replicas, st.observed_generation, sts.metadata.generation,
            ));
        }
        // The pods themselves: as many as recorded, none terminating, each running the
        // recorded digest. (br2k freezes rollouts, `partition: replicas`, so a template
        // change that keeps the digest, e.g. the mirror instead of the primary, leaves
        // the pods on the older revision: revisions may differ, digests may not.)
        let selector = sts
            .spec
            .as_ref()
            .and_then(|s| s.selector.match_labels.as_ref())
            .map(|l| {
                l.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .filter(|l| !l.is_empty())
            .ok_or("StatefulSet without a label selector")?;
        let pods = Api::<Pod>::namespaced(self.client.clone(), &self.ns)
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|e| format!("list pods: {e}"))?
            .items;
        let wrong: Vec<String> = pods
            .iter()
            .filter_map(|p| {
                let img = p.spec.as_ref()?.containers.first()?.image.clone()?;
                let ok = p.metadata.deletion_timestamp.is_none()
                    && ImageRef::parse(&img)
                        .ok()
                        .is_some_and(|i| i.digest() == Some(&digest));
                (!ok).then(|| format!("{} ({img})", p.name_any()))
            })
            .collect();
        if pods.len() != replicas as usize || !wrong.is_empty() {
            return Err(format!(
                "{} pod(s), record {replicas}; not on the recorded digest or terminating: {wrong:?}",
                pods.len()
            ));
        }
        let cr = self
            .crs()
            .get(&s.cr)
            .await
            .map_err(|e| format!("resource {}: {e}", s.cr))?;
        let status = cr.status.clone().unwrap_or_default();
        let ready = status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        if status.phase.as_deref() != Some("Healthy")
            || !ready
            || status.observed_version != Some(record.version)
            || status.observed_generation != cr.metadata.generation
        {
            return Err(format!(
                "resource phase {:?} Ready {ready} observedVersion {:?} (record {}) observedGeneration {:?}/{:?}",
                status.phase,
                status.observed_version,
                record.version,
                status.observed_generation,
                cr.metadata.generation
            ));
        }
        for (name, reg) in [("primary", &self.primary), ("mirror", &self.mirror)] {
            stored_image(reg, s).map_err(|e| format!("{name}: {e}"))?;
        }
        Ok(())
    }

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
        let crs = self.crs();
        if let Ok(list) = crs.list(&ListParams::default()).await {
            for o in list.items {
                let _ = crs.delete(&o.name_any(), &DeleteParams::default()).await;
            }
        }
        let _ = poll(Duration::from_secs(30), "resources removed", async || {
            let n = crs
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?
                .items
                .len();
            if n == 0 {
                Ok(())
            } else {
                Err(format!("{n} left"))
            }
        })
        .await;
        self.operator.terminate().await;
        let _ = Api::<Namespace>::all(self.client.clone())
            .delete(&self.ns, &DeleteParams::background())
            .await;
        let _ = Api::<Lease>::namespaced(self.client.clone(), "br2k-system")
            .delete(&self.operator.lease, &DeleteParams::default())
            .await;
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
        Api::<StatefulSet>::namespaced(self.client.clone(), &self.ns)
            .get_opt(name)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("no StatefulSet {name}"))
    }

    /// The operator's metrics text.
    async fn metrics(&self) -> Result<String, String> {
        let url = format!("http://{}/metrics", self.operator.metrics_addr);
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("GET {url}: {}", resp.status()));
        }
        resp.text().await.map_err(|e| e.to_string())
    }

    /// `br2k_reconciles_total` of the running operator.
    async fn reconciles(&self) -> Result<u64, String> {
        let text = self.metrics().await?;
        metric(&text, "br2k_reconciles_total")
            .map(|v| v as u64)
            .ok_or_else(|| "no br2k_reconciles_total".to_owned())
    }

    /// `kubectl patch statefulset NAME --type=TYPE -p PATCH --field-manager=INTRUDER`.
    async fn kubectl_patch(
        &self,
        name: &str,
        patch_type: &str,
        patch: &serde_json::Value,
    ) -> Result<String, String> {
        let patch_type = format!("--type={patch_type}");
        let patch = patch.to_string();
        let manager = format!("--field-manager={INTRUDER}");
        self.kubectl(&[
            "patch",
            "statefulset",
            name,
            &patch_type,
            "-p",
            &patch,
            &manager,
        ])
        .await
    }

    /// `kubectl --kubeconfig K -n NS ARGS...` (straight to the API server).
    async fn kubectl(&self, args: &[&str]) -> Result<String, String> {
        let out = tokio::process::Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("-n")
            .arg(&self.ns)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .map_err(|e| format!("run kubectl: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
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

/// Deletes the namespaces (and leases) of earlier runs `runs` that are still there
/// (their process was killed before its shutdown): their resources' finalizers are
/// dropped first, since no operator serves them any more.
async fn remove_stale_namespaces(client: &Client, runs: &[String]) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for run in runs {
        let ns = format!("br2k-faults-op-{run}");
        if !matches!(namespaces.get_opt(&ns).await, Ok(Some(_))) {
            continue;
        }
        let crs: Api<Br2kService> = Api::namespaced(client.clone(), &ns);
        if let Ok(list) = crs.list(&ListParams::default()).await {
            for o in list.items {
                let _ = crs
                    .patch(
                        &o.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
                    )
                    .await;
            }
        }
        let _ = namespaces.delete(&ns, &DeleteParams::background()).await;
        let _ = Api::<Lease>::namespaced(client.clone(), "br2k-system")
            .delete(&format!("br2k-faults-{run}"), &DeleteParams::default())
            .await;
        eprintln!("[faults/operator] left by an earlier run: deleted namespace {ns}");
    }
}

/// Registers `id` with `spec` and starts it, each write tried up to 3 times.
async fn register(chain: &ChainRegistry, id: &ServiceId, spec: &ServiceSpec) -> Result<(), String> {
    let mut registered = false;
    let mut last = String::new();
    for _ in 0..3 {
        if !registered {
            match chain.register(id, spec).await {
                Ok(_) => registered = true,
                Err(e) => {
                    last = format!("register {id}: {e}");
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    continue;
                }
            }
        }
        match chain.set_state(id, ServiceState::Running).await {
            Ok(_) => return Ok(()),
            Err(e) => {
                last = format!("start {id}: {e}");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    }
    Err(last)
}

/// The image of the first container of the pod template.
fn template_image(s: &StatefulSet) -> Option<String> {
    s.spec
        .as_ref()?
        .template
        .spec
        .as_ref()?
        .containers
        .first()?
        .image
        .clone()
}

/// Checks `reg`'s storage on disk: the repository links the manifest and every
/// blob of `s`, and each data file hashes to its digest.
fn stored_image(reg: &RegistryProc, s: &Svc) -> Result<(), String> {
    let repo = reg.repo_dir(s.repo.as_str());
    let hashed = |d: &Digest| -> Result<(), String> {
        let path = reg.blob_data(&d.hex());
        let bytes = fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if Digest::of(&bytes) == *d {
            Ok(())
        } else {
            Err(format!(
                "{} ({} bytes) hashes to {}",
                path.display(),
                bytes.len(),
                Digest::of(&bytes)
            ))
        }
    };
    let link = |path: PathBuf, d: &Digest| -> Result<(), String> {
        let text = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if text.trim() == d.to_string() {
            Ok(())
        } else {
            Err(format!("{} holds {text:?}", path.display()))
        }
    };
    link(
        repo.join("_manifests/revisions/sha256")
            .join(s.digest.hex())
            .join("link"),
        &s.digest,
    )?;
    hashed(&s.digest)?;
    for b in &s.blobs {
        link(repo.join("_layers/sha256").join(b.hex()).join("link"), b)?;
        hashed(b)?;
    }
    Ok(())
}

/// A service image: one 48 KiB incompressible payload file and an entrypoint.
fn build_image(seed: u64) -> Result<Image, String> {
    ImageBuilder::new()
        .file("/opt/faults/payload.bin", noise(seed, 48 * 1024), 0o644)
        .and_then(|b| {
            b.file(
                "/usr/local/bin/faults-app",
                b"#!/bin/sh\nexec sleep infinity\n".to_vec(),
                0o755,
            )
        })
        .map(|b| b.entrypoint(["/usr/local/bin/faults-app"]))
        .and_then(|b| b.build())
        .map_err(|e| format!("build the image: {e}"))
}

#[cfg(test)]
mod tests {
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
        assert_eq!(metric(text, "br2k_reconciles_total"), Some(17.0));
        assert_eq!(metric(text, "br2k_leader"), Some(1.0));
        assert_eq!(metric(text, "br2k_missing"), None);
    }
}
