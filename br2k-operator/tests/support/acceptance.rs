//! Acceptance harness of the br2k operator, shared by `tests/acceptance.rs` (each
//! failure class once) and the `operator_acceptance` bench (each class N times).
//!
//! The harness runs everything the operator touches as separate, killable pieces:
//! two Distribution registries of its own (primary and mirror, own storage), a TCP
//! proxy of its own in front of the stack's anvil, a fresh `ServiceRegistry`
//! contract, a fresh namespace, and the operator binary as its own process. Failures
//! are injected as a user or an adversary would (`kubectl`, registry HTTP, bytes on
//! disk, killed processes), and every end state is read independently from the API
//! server or the registry bytes, except where a class is about the reported state.
//! The processes, proxies and set-up it shares with the fault matrix's operator
//! workload (`faults/src/operator`) are in `pieces/`, one copy for both.
//!
//! Needs the stack's environment (`source .stack/env`): `KUBECONFIG`,
//! `BR2K_RPC_URLS`, `BR2K_REGISTRY_BIN`, `BR2K_KUBECTL_BIN`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use alloy::transports::http::reqwest;
use br2k_chain::{ChainConfig, ChainRegistry};
use br2k_core::{Digest, ImageRef, Registry, Repository, ServiceId, ServiceSpec};
use br2k_k8s::Names;
use br2k_operator::crd::{Br2kService, Br2kServiceSpec};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Service};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

#[path = "pieces/mod.rs"]
mod pieces;

use pieces::{
    Kubectl, OperatorProc, RegistryProc, StackEnv, TcpProxy, blobs_of, build_image, clock_ticks,
    cpu_ticks, create_namespaces, host_port, http_client, install_and_connect, live_sts, metric,
    push_everywhere, register, service_spec, strip_ansi, tear_down, template_image, trust_anchors,
    unique,
};

/// Replicas of every service the harness registers.
const REPLICAS: i32 = 3;
/// Longest wait for an end state after an injection.
const RECOVERY_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for the first deployment.
const SETUP_TIMEOUT: Duration = Duration::from_secs(120);
/// How often end states are polled.
const POLL: Duration = Duration::from_millis(25);
/// The window after a recovery in which the reconcile counter must stay quiet.
const QUIET_WINDOW: Duration = Duration::from_secs(5);
/// Most reconciles allowed in [`QUIET_WINDOW`] while healthy.
const MAX_QUIET_RECONCILES: u64 = 20;
/// The window of the CPU measurement during a lasting failure.
const CPU_WINDOW: Duration = Duration::from_secs(10);
/// Anvil's dev account 0.
const ANVIL_KEY0: &str = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";
/// Accept header of manifest requests.
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";
/// The image `kubectl set image` puts in place of the recorded one.
const FOREIGN_IMAGE: &str = "example.invalid/br2k-acceptance/injected:1";

// ------------------------------------------------------------------ classes

/// One failure class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    /// `kubectl delete statefulset`.
    StatefulSetDeleted,
    /// `kubectl set image` to another image.
    ImageChanged,
    /// `kubectl scale --replicas=5`.
    Scaled,
    /// `kubectl delete pod NAME-1`.
    PodDeleted,
    /// An env var added to the pod template (json patch).
    EnvAdded,
    /// A label and an annotation added to the pod template (merge patch).
    TemplateLabelAnnotation,
    /// An emptyDir volume added to the pod template.
    VolumeAdded,
    /// The client Service's selector changed.
    ServiceSelectorChanged,
    /// A key added to the ConfigMap and an existing one changed.
    ConfigmapEdited,
    /// The manifest deleted from the primary registry (HTTP DELETE).
    ManifestDeletedOnPrimary,
    /// The primary registry process killed.
    PrimaryStopped,
    /// The layer's bytes overwritten on the primary's disk.
    BlobCorruptedOnPrimary,
    /// The chain RPC (the harness's proxy) killed, then the StatefulSet deleted.
    ChainRpcStopped,
    /// The StatefulSet deleted and the operator SIGKILLed at once, then restarted.
    OperatorKilledMidRecovery,
    /// A service whose spec has no ports deploys.
    NoPortsDeploys,
    /// A service whose StatefulSet the cluster refuses (a ValidatingAdmissionPolicy):
    /// reported as `Valid=False` without a loop, deployed once the policy is gone.
    RefusedByCluster,
    /// A service registered by an account the operator is not configured to trust
    /// (`--allowed-owner`): reported `Valid=False` (`OwnerNotAllowed`), nothing
    /// created, no loop.
    OwnerNotAllowed,
}

impl Class {
    /// Every class, in the order the harness runs them (the blob corruption last of
    /// the registry classes; it restores the bytes afterwards in any case).
    pub const ALL: [Class; 17] = [
        Class::StatefulSetDeleted,
        Class::ImageChanged,
        Class::Scaled,
        Class::PodDeleted,
        Class::EnvAdded,
        Class::TemplateLabelAnnotation,
        Class::VolumeAdded,
        Class::ServiceSelectorChanged,
        Class::ConfigmapEdited,
        Class::ManifestDeletedOnPrimary,
        Class::PrimaryStopped,
        Class::BlobCorruptedOnPrimary,
        Class::ChainRpcStopped,
        Class::OperatorKilledMidRecovery,
        Class::NoPortsDeploys,
        Class::RefusedByCluster,
        Class::OwnerNotAllowed,
    ];

    /// The class's name (snake case).
    pub fn name(self) -> &'static str {
        match self {
            Class::StatefulSetDeleted => "statefulset_deleted",
            Class::ImageChanged => "image_changed",
            Class::Scaled => "scaled",
            Class::PodDeleted => "pod_deleted",
            Class::EnvAdded => "env_added",
            Class::TemplateLabelAnnotation => "template_label_annotation",
            Class::VolumeAdded => "volume_added",
            Class::ServiceSelectorChanged => "service_selector_changed",
            Class::ConfigmapEdited => "configmap_edited",
            Class::ManifestDeletedOnPrimary => "manifest_deleted_on_primary",
            Class::PrimaryStopped => "primary_stopped",
            Class::BlobCorruptedOnPrimary => "blob_corrupted_on_primary",
            Class::ChainRpcStopped => "chain_rpc_stopped",
            Class::OperatorKilledMidRecovery => "operator_killed_mid_recovery",
            Class::NoPortsDeploys => "no_ports_deploys",
            Class::RefusedByCluster => "refused_by_cluster",
            Class::OwnerNotAllowed => "owner_not_allowed",
        }
    }

    /// The class named `name`.
    pub fn parse(name: &str) -> Option<Class> {
        Class::ALL.into_iter().find(|c| c.name() == name)
    }

    /// Whether the failure lasts after the recovery (the operator's CPU is measured
    /// while it does).
    pub fn lasting(self) -> bool {
        matches!(
            self,
            Class::PrimaryStopped
                | Class::BlobCorruptedOnPrimary
                | Class::ChainRpcStopped
                | Class::RefusedByCluster
                | Class::OwnerNotAllowed
        )
    }
}

/// What one run of one class showed.
#[derive(Debug, Clone)]
pub struct ClassResult {
    /// The class.
    pub class: Class,
    /// The end state was observed within the timeout.
    pub recovered: bool,
    /// Injection (its command returned) to end state observed, in milliseconds.
    pub ms: Option<u64>,
    /// Reconciles the operator counted from the injection to the end state.
    pub reconciles: Option<u64>,
    /// Operator CPU in % of one core over a window during a lasting failure.
    pub cpu_pct: Option<f64>,
    /// Reconciles counted in that CPU window.
    pub window_reconciles: Option<u64>,
    /// How the class ended where it has several acceptable ends (the blob
    /// corruption: `repaired` or `unrepairable`).
    pub outcome: Option<String>,
    /// The resource was `Healthy` again after the class (and its restore).
    pub healthy_after: bool,
    /// Reconciles counted in the quiet window after the class.
    pub quiet_reconciles: Option<u64>,
    /// The quiet window stayed under the loop threshold.
    pub no_loop: bool,
    /// Further failed checks of the class (restores, cleanups, reported state).
    pub problems: Vec<String>,
    /// What was observed along the way.
    pub note: String,
}

impl ClassResult {
    fn new(class: Class) -> Self {
        Self {
            class,
            recovered: false,
            ms: None,
            reconciles: None,
            cpu_pct: None,
            window_reconciles: None,
            outcome: None,
            healthy_after: false,
            quiet_reconciles: None,
            no_loop: false,
            problems: Vec::new(),
            note: String::new(),
        }
    }

    /// Whether every check of the class held.
    pub fn passed(&self) -> bool {
        self.recovered && self.healthy_after && self.no_loop && self.problems.is_empty()
    }

    fn note(&mut self, text: impl AsRef<str>) {
        if !self.note.is_empty() {
            self.note.push_str("; ");
        }
        self.note.push_str(text.as_ref());
    }

    fn problem(&mut self, text: impl Into<String>) {
        self.problems.push(text.into());
    }

    /// One line describing the run.
    pub fn line(&self) -> String {
        let opt = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
        format!(
            "{:<30} {} recovered={} ms={} reconciles={} cpu={} healthy_after={} quiet_reconciles={}{}{}{}",
            self.class.name(),
            if self.passed() { "PASS" } else { "FAIL" },
            self.recovered,
            opt(self.ms),
            opt(self.reconciles),
            self.cpu_pct.map_or("-".to_owned(), |c| format!("{c:.1}%")),
            self.healthy_after,
            opt(self.quiet_reconciles),
            self.outcome
                .as_ref()
                .map_or(String::new(), |o| format!(" outcome={o}")),
            if self.problems.is_empty() {
                String::new()
            } else {
                format!(" problems=[{}]", self.problems.join(" | "))
            },
            if self.note.is_empty() {
                String::new()
            } else {
                format!(" note: {}", self.note)
            },
        )
    }
}

// ------------------------------------------------------------------ helpers

/// Polls `check` every [`POLL`] until it succeeds or `timeout` passes; the error
/// names the last thing observed.
async fn poll<T>(
    timeout: Duration,
    what: &str,
    check: impl AsyncFnMut() -> Result<T, String>,
) -> Result<T, String> {
    pieces::poll_every(POLL, timeout, what, check).await
}

/// A one-line summary of a StatefulSet for error messages.
fn sts_summary(s: &StatefulSet) -> String {
    let st = s.status.as_ref();
    format!(
        "uid={} gen={:?} observedGen={:?} spec.replicas={:?} status.replicas={:?} ready={:?} image={:?}",
        s.metadata.uid.as_deref().unwrap_or("-"),
        s.metadata.generation,
        st.and_then(|s| s.observed_generation),
        s.spec.as_ref().and_then(|s| s.replicas),
        st.map(|s| s.replicas),
        st.and_then(|s| s.ready_replicas),
        template_image(s),
    )
}

/// Ready replicas in the status.
fn ready(s: &StatefulSet) -> i32 {
    s.status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0)
}

/// Whether the status describes the current spec.
fn observed(s: &StatefulSet) -> bool {
    s.status.as_ref().and_then(|s| s.observed_generation) == s.metadata.generation
}

// ------------------------------------------------------------------ the harness

/// Everything one acceptance run owns.
pub struct Harness {
    dir: PathBuf,
    keep_dir: bool,
    kubectl: Kubectl,
    client: Client,
    http: reqwest::Client,
    primary: RegistryProc,
    mirror: RegistryProc,
    proxy: TcpProxy,
    chain: ChainRegistry,
    operator: OperatorProc,
    ns: String,
    id: ServiceId,
    names: Names,
    repo: Repository,
    image: ImageRef,
    digest: Digest,
    layer: Digest,
    blobs: Vec<Digest>,
    cr_name: String,
    no_ports_runs: u32,
    unique: String,
    clk_tck: f64,
    /// A primary blob file to restore from the mirror's copy (after a corruption).
    pending_restore: Option<(PathBuf, PathBuf)>,
}

impl Harness {
    /// Sets everything up and waits until the operator has deployed the service
    /// (StatefulSet with 3 ready replicas, resource `Healthy`). `operator_bin` is
    /// the `br2k-operator` binary.
    pub async fn start(operator_bin: PathBuf) -> Result<Self, String> {
        let stack = StackEnv::read(&operator_bin)?;
        let run = unique();
        let dir = std::env::temp_dir().join(format!("br2k-acceptance-{run}"));
        fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        eprintln!("[acceptance] work dir {}", dir.display());

        // Registries and the image.
        let primary =
            RegistryProc::spawn(&stack.registry_bin, &dir.join("registry-primary"), false).await?;
        let mirror =
            RegistryProc::spawn(&stack.registry_bin, &dir.join("registry-mirror"), false).await?;
        let repo =
            Repository::new(format!("br2k-acceptance/app-{run}")).map_err(|e| e.to_string())?;
        let image = build_image(u64::from_str_radix(&run, 16).unwrap_or(7), "acceptance")?;
        push_everywhere(&[&primary.addr, &mirror.addr], &repo, &image).await?;
        let layer = image
            .layers
            .iter()
            .max_by_key(|l| l.data.len())
            .map(|l| l.digest)
            .ok_or("the image has no layer")?;
        let blobs = blobs_of(&image);
        let image_ref = ImageRef::new(&primary.addr, repo.clone(), Some("1.0"), Some(image.digest))
            .map_err(|e| e.to_string())?;

        // The chain, behind the harness's proxy.
        let url = stack.rpc.clone();
        let proxy = TcpProxy::start(&host_port(&url, "RPC URL")?).await?;
        let chain = ChainRegistry::deploy(ChainConfig::new(vec![url]).with_private_key(ANVIL_KEY0))
            .await
            .map_err(|e| format!("deploy the registry contract: {e}"))?;
        let id = ServiceId::new(format!("acc-{run}")).map_err(|e| e.to_string())?;
        let spec = service_spec(
            image_ref.clone(),
            REPLICAS as u32,
            &[("LOG_LEVEL", "info"), ("MODE", "acceptance")],
        )?;
        register(&chain, &id, &spec).await?;

        // Kubernetes.
        let client = install_and_connect("br2k-acceptance").await?;
        let ns = format!("br2k-acc-{run}");
        create_namespaces(&client, &ns).await?;

        let operator = OperatorProc::new(
            operator_bin,
            dir.join("operator.log"),
            "acceptance",
            &run,
            trust_anchors(&chain, &proxy.url(), &[&primary.addr, &mirror.addr]),
        );
        let http = http_client()?;
        let mut h = Self {
            dir,
            keep_dir: false,
            kubectl: Kubectl {
                bin: stack.kubectl,
                kubeconfig: stack.kubeconfig,
                ns: ns.clone(),
            },
            client,
            http,
            primary,
            mirror,
            proxy,
            chain,
            operator,
            names: Names::of(&id),
            ns,
            id,
            repo,
            image: image_ref,
            digest: image.digest,
            layer,
            blobs,
            cr_name: "main".into(),
            no_ports_runs: 0,
            unique: run,
            clk_tck: clock_ticks(),
            pending_restore: None,
        };
        h.setup_operator_and_resource()
            .await
            .map_err(|e| format!("{e}\n--- operator log (tail) ---\n{}", h.log_tail(60)))?;
        Ok(h)
    }

    async fn setup_operator_and_resource(&mut self) -> Result<(), String> {
        self.no_other_operator().await?;
        let others = Api::<Br2kService>::all(self.client.clone())
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?
            .items
            .into_iter()
            .map(|o| format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any()))
            .collect::<Vec<_>>();
        if !others.is_empty() {
            // Every operator acts on every Br2kService of the cluster: these count in
            // this run's reconciles too.
            eprintln!(
                "[acceptance] note: {} other Br2kService resource(s) in the cluster: {}",
                others.len(),
                others.join(", ")
            );
        }
        self.start_operator().await?;
        self.remove_stale_runs().await;
        let spec = self.cr_spec(&self.id);
        self.crs()
            .create(
                &PostParams::default(),
                &Br2kService::new(&self.cr_name, spec),
            )
            .await
            .map_err(|e| format!("create Br2kService: {e}"))?;
        let t0 = Instant::now();
        poll(SETUP_TIMEOUT, "first deployment", async || {
            let s = self.live_sts(&self.names.base).await?;
            if ready(&s) != REPLICAS || template_digest(&s) != Some(self.digest) {
                return Err(sts_summary(&s));
            }
            let (phase, _) = self.cr_status(&self.cr_name).await?;
            if phase != "Healthy" {
                return Err(format!("phase {phase}; {}", sts_summary(&s)));
            }
            Ok(())
        })
        .await?;
        eprintln!(
            "[acceptance] service {} deployed and Healthy in {} ms (namespace {}, primary {}, mirror {}, rpc {})",
            self.id,
            t0.elapsed().as_millis(),
            self.ns,
            self.primary.addr,
            self.mirror.addr,
            self.proxy.url()
        );
        Ok(())
    }

    /// Waits (up to 60 s) until no other operator holds a lease in `br2k-system`:
    /// every operator acts on every `Br2kService` of the cluster, so a concurrent one
    /// (another acceptance run, an operator test) would fight this run's operator and
    /// count in its reconciles.
    async fn no_other_operator(&self) -> Result<(), String> {
        use k8s_openapi::api::coordination::v1::Lease;
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), "br2k-system");
        poll(
            Duration::from_secs(60),
            "no other operator active on the cluster",
            async || {
                let now = k8s_openapi::jiff::Timestamp::now().as_millisecond();
                let active: Vec<String> = leases
                    .list(&ListParams::default())
                    .await
                    .map_err(|e| e.to_string())?
                    .items
                    .into_iter()
                    .filter_map(|l| {
                        let spec = l.spec?;
                        let holder = spec.holder_identity.filter(|h| !h.is_empty())?;
                        let renewed = spec.renew_time?.0.as_millisecond();
                        let ttl = i64::from(spec.lease_duration_seconds.unwrap_or(15)) * 1000;
                        (now - renewed <= ttl + 2000).then(|| {
                            format!(
                                "lease {} held by {holder}, renewed {} ms ago",
                                l.metadata.name.unwrap_or_default(),
                                now - renewed
                            )
                        })
                    })
                    .collect();
                if active.is_empty() {
                    Ok(())
                } else {
                    Err(active.join("; "))
                }
            },
        )
        .await
    }

    /// Deletes what earlier, killed acceptance runs left (their `br2k-acc-*`
    /// namespaces and resources; no other operator runs now, see
    /// [`Harness::no_other_operator`]), while this run's operator removes their
    /// workloads through its finalizer.
    async fn remove_stale_runs(&self) {
        let namespaces: Api<Namespace> = Api::all(self.client.clone());
        let Ok(list) = namespaces
            .list(&ListParams::default().labels("br2k.io/test=true"))
            .await
        else {
            return;
        };
        for ns in list.items {
            let name = ns.name_any();
            if !name.starts_with("br2k-acc-")
                || name == self.ns
                || ns.metadata.deletion_timestamp.is_some()
            {
                continue;
            }
            eprintln!("[acceptance] removing namespace {name} left by an earlier run");
            let crs: Api<Br2kService> = Api::namespaced(self.client.clone(), &name);
            if let Ok(l) = crs.list(&ListParams::default()).await {
                for o in l.items {
                    let _ = crs.delete(&o.name_any(), &DeleteParams::default()).await;
                }
            }
            let _ = namespaces.delete(&name, &DeleteParams::background()).await;
        }
    }

    /// The resource spec of service `id`.
    fn cr_spec(&self, id: &ServiceId) -> Br2kServiceSpec {
        Br2kServiceSpec {
            namespace: Some(self.ns.clone()),
            ..Br2kServiceSpec::for_service(id.as_str())
        }
    }

    /// Starts the operator and waits until it leads.
    async fn start_operator(&mut self) -> Result<(), String> {
        self.operator.start()?;
        poll(Duration::from_secs(30), "operator leads", async || {
            self.operator.leads(&self.http).await
        })
        .await
    }

    /// The work directory (registry storage, logs).
    pub fn work_dir(&self) -> &Path {
        &self.dir
    }

    /// Keeps the work directory after [`Harness::shutdown`] (for its logs).
    pub fn keep_dir(&mut self) {
        self.keep_dir = true;
    }

    /// The last `lines` lines of the operator's log.
    pub fn log_tail(&self, lines: usize) -> String {
        self.operator.log_tail(lines)
    }

    /// Bytes in the operator's log so far.
    fn log_len(&self) -> u64 {
        fs::metadata(&self.operator.log).map_or(0, |m| m.len())
    }

    /// Up to `lines` of the operator's log written after byte `offset` (the last
    /// ones, without colour codes, each cut to 400 characters), and how many.
    fn log_since(&self, offset: u64, lines: usize) -> String {
        let text = fs::read(&self.operator.log).unwrap_or_default();
        let new = String::from_utf8_lossy(text.get(offset as usize..).unwrap_or_default());
        let all: Vec<String> = new
            .lines()
            .map(|l| strip_ansi(l).chars().take(400).collect())
            .collect();
        format!(
            "{} line(s){}{}",
            all.len(),
            if all.is_empty() { "" } else { ", last: " },
            all[all.len().saturating_sub(lines)..].join(" || ")
        )
    }

    /// Removes the resources (while the operator runs, so its finalizer removes the
    /// workload), stops every process and deletes the namespace and lease.
    pub async fn shutdown(mut self) {
        let _ = self.ensure_up().await;
        tear_down(&self.client, &self.ns, &mut self.operator).await;
        self.proxy.stop().await;
        self.primary.stop();
        self.mirror.stop();
        if self.keep_dir {
            eprintln!("[acceptance] kept {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }

    // -------------------------------------------------------------- reads

    fn crs(&self) -> Api<Br2kService> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn stss(&self) -> Api<StatefulSet> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    /// The StatefulSet `name`, or an error naming its absence.
    async fn live_sts(&self, name: &str) -> Result<StatefulSet, String> {
        live_sts(&self.client, &self.ns, name).await
    }

    /// Phase and conditions (`type` -> `status`) of resource `name`.
    async fn cr_status(&self, name: &str) -> Result<(String, BTreeMap<String, String>), String> {
        let o = self.crs().get(name).await.map_err(|e| e.to_string())?;
        let s = o.status.unwrap_or_default();
        Ok((
            s.phase.unwrap_or_default(),
            s.conditions
                .into_iter()
                .map(|c| (c.type_, c.status))
                .collect(),
        ))
    }

    /// Waits until condition `type_` of the main resource has `status`.
    async fn wait_condition(&self, type_: &str, status: &str) -> Result<Duration, String> {
        let t0 = Instant::now();
        poll(
            RECOVERY_TIMEOUT,
            &format!("condition {type_}={status}"),
            async || {
                let (phase, c) = self.cr_status(&self.cr_name).await?;
                match c.get(type_) {
                    Some(s) if s == status => Ok(()),
                    _ => Err(format!("phase {phase}, conditions {c:?}")),
                }
            },
        )
        .await?;
        Ok(t0.elapsed())
    }

    /// Waits for condition `type_`=`status` of the main resource and notes in `r`
    /// how long it took after `event`; a timeout is a problem.
    async fn note_condition(&self, r: &mut ClassResult, type_: &str, status: &str, event: &str) {
        match self.wait_condition(type_, status).await {
            Ok(d) => r.note(format!(
                "{type_} {status} {} ms after {event}",
                d.as_millis()
            )),
            Err(e) => r.problem(format!("after {event}: {e}")),
        }
    }

    /// Waits until resource `name` is `Healthy`.
    async fn wait_healthy(&self, name: &str) -> Result<(), String> {
        poll(RECOVERY_TIMEOUT, &format!("{name} Healthy"), async || {
            let (phase, c) = self.cr_status(name).await?;
            if phase == "Healthy" {
                Ok(())
            } else {
                Err(format!("phase {phase:?}, conditions {c:?}"))
            }
        })
        .await
    }

    /// The operator's metrics text.
    async fn metrics(&self) -> Result<String, String> {
        self.operator.metrics(&self.http).await
    }

    /// `br2k_reconciles_total` of the running operator.
    async fn reconciles(&self) -> Result<u64, String> {
        self.operator.reconciles(&self.http).await
    }

    /// One HTTP request; returns the status and the body.
    async fn http_call(
        &self,
        method: reqwest::Method,
        url: &str,
        manifest: bool,
    ) -> Result<(u16, Vec<u8>), String> {
        let mut req = self.http.request(method.clone(), url);
        if manifest {
            req = req.header("Accept", MANIFEST_ACCEPT);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| format!("{method} {url}: {e}"))?;
        let status = resp.status().as_u16();
        let body = resp
            .bytes()
            .await
            .map_err(|e| format!("{method} {url}: body: {e}"))?;
        Ok((status, body.to_vec()))
    }

    /// Checks with the harness's own hashing that `addr` serves the manifest (HEAD
    /// and GET) and every blob of the recorded image with their digests.
    async fn verify_registry(&self, addr: &str) -> Result<(), String> {
        let base = format!("http://{addr}/v2/{}", self.repo);
        let murl = format!("{base}/manifests/{}", self.digest);
        let (head, _) = self.http_call(reqwest::Method::HEAD, &murl, true).await?;
        if head != 200 {
            return Err(format!("{addr}: HEAD manifest {head}"));
        }
        let (status, body) = self.http_call(reqwest::Method::GET, &murl, true).await?;
        if status != 200 {
            return Err(format!("{addr}: GET manifest {status}"));
        }
        if Digest::of(&body) != self.digest {
            return Err(format!(
                "{addr}: manifest bytes hash to {}",
                Digest::of(&body)
            ));
        }
        let m: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        let mut listed: Vec<String> = vec![m["config"]["digest"].as_str().unwrap_or("").to_owned()];
        listed.extend(
            m["layers"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|l| l["digest"].as_str().unwrap_or("").to_owned()),
        );
        let expected: Vec<String> = self.blobs.iter().map(Digest::to_string).collect();
        if listed != expected {
            return Err(format!("{addr}: manifest lists {listed:?}"));
        }
        for d in &self.blobs {
            let (status, body) = self
                .http_call(reqwest::Method::GET, &format!("{base}/blobs/{d}"), false)
                .await?;
            if status != 200 {
                return Err(format!("{addr}: GET blob {d}: {status}"));
            }
            if Digest::of(&body) != *d {
                return Err(format!(
                    "{addr}: blob {d} ({} bytes) hashes to {}",
                    body.len(),
                    Digest::of(&body)
                ));
            }
        }
        Ok(())
    }

    /// `kubectl patch KIND NAME --type=TYPE -p PATCH` (kubectl's own field manager).
    async fn kubectl_patch(
        &self,
        kind: &str,
        name: &str,
        patch_type: &str,
        patch: &serde_json::Value,
    ) -> Result<String, String> {
        self.kubectl.patch(kind, name, patch_type, patch, &[]).await
    }

    /// Runs `kubectl --kubeconfig K -n NS ARGS...` (kubectl's own field managers).
    async fn kubectl(&self, args: &[&str]) -> Result<String, String> {
        self.kubectl.run(args).await
    }

    /// CPU of the operator in % of one core, and reconciles it counted, over `window`.
    async fn cpu_window(&self, window: Duration) -> Result<(f64, u64), String> {
        let pid = self.operator.pid().ok_or("operator not running")?;
        let r0 = self.reconciles().await?;
        let c0 = cpu_ticks(pid)?;
        let t0 = Instant::now();
        tokio::time::sleep(window).await;
        let c1 = cpu_ticks(pid)?;
        let wall = t0.elapsed().as_secs_f64();
        let r1 = self.reconciles().await?;
        let pct = (c1.saturating_sub(c0)) as f64 / self.clk_tck / wall * 100.0;
        Ok((pct, r1.saturating_sub(r0)))
    }

    /// Records the CPU window of a lasting failure in `r`.
    async fn measure_cpu(&self, r: &mut ClassResult) {
        match self.cpu_window(CPU_WINDOW).await {
            Ok((pct, n)) => {
                r.cpu_pct = Some(pct);
                r.window_reconciles = Some(n);
                r.note(format!(
                    "{:.0} s window during the failure: {pct:.1}% CPU, {n} reconciles",
                    CPU_WINDOW.as_secs_f64()
                ));
            }
            Err(e) => r.problem(format!("CPU window: {e}")),
        }
    }

    // -------------------------------------------------------------- end states

    /// The StatefulSet exists with a uid other than `old_uid`, the status describes
    /// the current spec, 3 replicas are ready and the template pins the recorded digest.
    async fn sts_recreated(&self, old_uid: &str) -> Result<(), String> {
        let s = self.live_sts(&self.names.base).await?;
        let ok = s.metadata.uid.as_deref() != Some(old_uid)
            && observed(&s)
            && ready(&s) == REPLICAS
            && template_digest(&s) == Some(self.digest);
        if ok { Ok(()) } else { Err(sts_summary(&s)) }
    }

    /// The template references the mirror with the recorded digest and 3 replicas
    /// are ready on the current spec.
    async fn sts_on_mirror(&self) -> Result<(), String> {
        let s = self.live_sts(&self.names.base).await?;
        let img = template_image(&s).and_then(|i| ImageRef::parse(&i).ok());
        let ok = img.as_ref().is_some_and(|i| {
            i.registry() == self.mirror.addr
                && i.repository() == &self.repo
                && i.digest() == Some(&self.digest)
        }) && observed(&s)
            && ready(&s) == REPLICAS;
        if ok { Ok(()) } else { Err(sts_summary(&s)) }
    }

    /// Polls `check` until it holds; on success records the time from `t0` and the
    /// reconciles counted since `before` in `r`.
    async fn measure(
        &self,
        r: &mut ClassResult,
        t0: Instant,
        before: Option<u64>,
        what: &str,
        check: impl AsyncFnMut() -> Result<(), String>,
    ) -> Result<(), String> {
        poll(RECOVERY_TIMEOUT, what, check).await?;
        r.ms = Some(t0.elapsed().as_millis() as u64);
        r.recovered = true;
        if let (Some(b), Ok(now)) = (before, self.reconciles().await) {
            r.reconciles = Some(now.saturating_sub(b));
        }
        Ok(())
    }

    // -------------------------------------------------------------- classes

    /// Runs one class: precondition (all components up, resource `Healthy`),
    /// injection, end state, class-specific restore, `Healthy` again, quiet window.
    pub async fn run(&mut self, class: Class) -> ClassResult {
        let mut r = ClassResult::new(class);
        if let Err(e) = self.precondition().await {
            r.problem(format!("precondition: {e}"));
            return r;
        }
        if matches!(class, Class::PrimaryStopped | Class::BlobCorruptedOnPrimary)
            && let Err(e) = self.serve_from_primary(&mut r).await
        {
            // Else the end state (served from the mirror) would hold before the
            // injection and the class would measure nothing.
            r.problem(format!("precondition: {e}"));
            self.settle(&mut r).await;
            return r;
        }
        let res = match class {
            Class::StatefulSetDeleted => self.statefulset_deleted(&mut r).await,
            Class::ImageChanged => self.image_changed(&mut r).await,
            Class::Scaled => self.scaled(&mut r).await,
            Class::PodDeleted => self.pod_deleted(&mut r).await,
            Class::EnvAdded => self.env_added(&mut r).await,
            Class::TemplateLabelAnnotation => self.template_label_annotation(&mut r).await,
            Class::VolumeAdded => self.volume_added(&mut r).await,
            Class::ServiceSelectorChanged => self.service_selector_changed(&mut r).await,
            Class::ConfigmapEdited => self.configmap_edited(&mut r).await,
            Class::ManifestDeletedOnPrimary => self.manifest_deleted(&mut r).await,
            Class::PrimaryStopped => self.primary_stopped(&mut r).await,
            Class::BlobCorruptedOnPrimary => self.blob_corrupted(&mut r).await,
            Class::ChainRpcStopped => self.chain_rpc_stopped(&mut r).await,
            Class::OperatorKilledMidRecovery => self.operator_killed(&mut r).await,
            Class::NoPortsDeploys => self.no_ports(&mut r).await,
            Class::RefusedByCluster => self.refused_by_cluster(&mut r).await,
            Class::OwnerNotAllowed => self.owner_not_allowed(&mut r).await,
        };
        if let Err(e) = res {
            r.note(e);
        }
        self.settle(&mut r).await;
        r
    }

    /// Everything up and the service healthy before an injection.
    async fn precondition(&mut self) -> Result<(), String> {
        self.ensure_up().await?;
        poll(RECOVERY_TIMEOUT, "healthy before injection", async || {
            let s = self.live_sts(&self.names.base).await?;
            if ready(&s) != REPLICAS || template_digest(&s) != Some(self.digest) {
                return Err(sts_summary(&s));
            }
            let (phase, c) = self.cr_status(&self.cr_name).await?;
            if phase != "Healthy" {
                return Err(format!("phase {phase:?}, conditions {c:?}"));
            }
            Ok(())
        })
        .await
    }

    /// Makes the workload serve the recorded image from the primary before a class
    /// that takes the primary away. The operator keeps a workload on the mirror once
    /// it re-pointed it there (it re-points only off a registry that is down or
    /// serves wrong bytes), so after an earlier registry class the harness deletes
    /// the StatefulSet and the operator re-creates it from the record (the primary).
    async fn serve_from_primary(&mut self, r: &mut ClassResult) -> Result<(), String> {
        if self.template_on_primary(Duration::ZERO).await.is_ok() {
            return Ok(());
        }
        let base = self.names.base.clone();
        self.kubectl(&["delete", "statefulset", &base, "--wait=false"])
            .await?;
        let t0 = Instant::now();
        self.template_on_primary(RECOVERY_TIMEOUT).await?;
        self.wait_healthy(&self.cr_name).await?;
        r.note(format!(
            "reset: the workload was on the mirror; StatefulSet deleted, re-created on the primary in {} ms",
            t0.elapsed().as_millis()
        ));
        Ok(())
    }

    /// Waits until the template references the primary, as the record does.
    async fn template_on_primary(&self, timeout: Duration) -> Result<(), String> {
        poll(
            timeout,
            "template references the primary (the recorded image) again",
            async || {
                let s = self.live_sts(&self.names.base).await?;
                let img = template_image(&s).and_then(|i| ImageRef::parse(&i).ok());
                if img.as_ref() == Some(&self.image) && observed(&s) && ready(&s) == REPLICAS {
                    Ok(())
                } else {
                    Err(sts_summary(&s))
                }
            },
        )
        .await
    }

    /// Restarts whatever a failed class left stopped and restores corrupted bytes.
    async fn ensure_up(&mut self) -> Result<(), String> {
        if let Some((src, dst)) = self.pending_restore.take() {
            fs::copy(&src, &dst).map_err(|e| format!("restore {}: {e}", dst.display()))?;
        }
        self.primary.start().await?;
        self.mirror.start().await?;
        self.proxy.resume().await?;
        if !self.operator.alive() {
            self.start_operator().await?;
        }
        Ok(())
    }

    /// After a class: back to `Healthy`, then the reconcile counter must stay quiet.
    async fn settle(&mut self, r: &mut ClassResult) {
        if let Err(e) = self.ensure_up().await {
            r.problem(format!("restore: {e}"));
        }
        match self.wait_healthy(&self.cr_name).await {
            Ok(()) => r.healthy_after = true,
            Err(e) => r.problem(format!("after the class: {e}")),
        }
        let gen0 = self
            .live_sts(&self.names.base)
            .await
            .ok()
            .and_then(|s| s.metadata.generation);
        let log0 = self.log_len();
        let r0 = self.reconciles().await;
        tokio::time::sleep(QUIET_WINDOW).await;
        let r1 = self.reconciles().await;
        let gen1 = self
            .live_sts(&self.names.base)
            .await
            .ok()
            .and_then(|s| s.metadata.generation);
        match (r0, r1) {
            (Ok(a), Ok(b)) => {
                let n = b.saturating_sub(a);
                r.quiet_reconciles = Some(n);
                r.no_loop = n <= MAX_QUIET_RECONCILES;
                if !r.no_loop {
                    r.problem(format!(
                        "loop: {n} reconciles in {:?} after the class; operator log meanwhile: {}",
                        QUIET_WINDOW,
                        self.log_since(log0, 6)
                    ));
                }
            }
            (a, b) => r.problem(format!("quiet window: metrics {a:?} {b:?}")),
        }
        if gen0 != gen1 {
            r.note(format!(
                "StatefulSet generation {gen0:?} -> {gen1:?} during the quiet window"
            ));
        }
    }

    async fn statefulset_deleted(&mut self, r: &mut ClassResult) -> Result<(), String> {
        let base = self.names.base.clone();
        let old = self.live_sts(&base).await?;
        let old_uid = old.metadata.uid.clone().unwrap_or_default();
        let before = self.reconciles().await.ok();
        self.kubectl(&["delete", "statefulset", &base, "--wait=false"])
            .await?;
        let t0 = Instant::now();
        self.measure(r, t0, before, "StatefulSet re-created", async || {
            self.sts_recreated(&old_uid).await
        })
        .await
    }

    async fn image_changed(&mut self, r: &mut ClassResult) -> Result<(), String> {
        let base = self.names.base.clone();
        let old = self.live_sts(&base).await?;
        let gen_before = old.metadata.generation.unwrap_or(0);
        let container = old
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|p| p.containers.first())
            .map(|c| c.name.clone())
            .ok_or("no container in the template")?;
        let before = self.reconciles().await.ok();
        self.kubectl(&[
            "set",
            "image",
            &format!("statefulset/{base}"),
            &format!("{container}={FOREIGN_IMAGE}"),
        ])
        .await?;
        let t0 = Instant::now();
        self.measure(r, t0, before, "recorded image back", async || {
            let s = self.live_sts(&base).await?;
            let ok = s.metadata.generation.unwrap_or(0) > gen_before
                && template_digest(&s) == Some(self.digest);
            if ok { Ok(()) } else { Err(sts_summary(&s)) }
        })
        .await
    }

    async fn scaled(&mut self, r: &mut ClassResult) -> Result<(), String> {
        let base = self.names.base.clone();
        let before = self.reconciles().await.ok();
        self.kubectl(&["scale", "statefulset", &base, "--replicas=5"])
            .await?;
        let t0 = Instant::now();
        self.measure(r, t0, before, "3 replicas again", async || {
            let s = self.live_sts(&base).await?;
            let ok = s.spec.as_ref().and_then(|s| s.replicas) == Some(REPLICAS)
                && observed(&s)
                && ready(&s) == REPLICAS;
            if ok { Ok(()) } else { Err(sts_summary(&s)) }
        })
        .await
    }

    async fn pod_deleted(&mut self, r: &mut ClassResult) -> Result<(), String> {
        let name = format!("{}-1", self.names.base);
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.ns);
        let old_uid = pods
            .get(&name)
            .await
            .map_err(|e| format!("pod {name}: {e}"))?
            .metadata
            .uid
            .unwrap_or_default();
        let before = self.reconciles().await.ok();
        self.kubectl(&["delete", "pod", &name, "--wait=false"])
            .await?;
        let t0 = Instant::now();
        self.measure(r, t0, before, "pod back and Ready", async || {
            let p = pods
                .get_opt(&name)
                .await
                .map_err(|e| e.to_string())?
                .ok_or("no pod")?;
            let is_ready = p
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .into_iter()
                .flatten()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            let uid = p.metadata.uid.as_deref().unwrap_or("");
            if uid != old_uid && p.metadata.deletion_timestamp.is_none() && is_ready {
                Ok(())
            } else {
                Err(format!(
                    "uid {uid} (old {old_uid}), deleting {}, ready {is_ready}",
                    p.metadata.deletion_timestamp.is_some()
                ))
            }
        })
        .await
    }

    async fn env_added(&mut self, r: &mut ClassResult) -> Result<(), String> {
        let base = self.names.base.clone();
        let old = self.live_sts(&base).await?;
        let has_env = old
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|p| p.containers.first())
            .and_then(|c| c.env.as_ref())
            .is_some_and(|e| !e.is_empty());
        if has_manager(&old, "kubectl-patch") {
            r.note("a kubectl-patch entry was in managedFields before the injection");
        }
        let var = json!({"name": "INJECTED", "value": "1"});
        let patch = if has_env {
            json!([{"op": "add", "path": "/spec/template/spec/containers/0/env/-", "value": var}])
        } else {
            json!([{"op": "add", "path": "/spec/template/spec/containers/0/env", "value": [var]}])
        };
        let before = self.reconciles().await.ok();
        self.kubectl_patch("statefulset", &base, "json", &patch)
            .await?;
        let t0 = Instant::now();
        self.measure(r, t0, before, "injected env var gone", async || {
            let s = self.live_sts(&base).await?;
            let injected = s
                .spec
                .as_ref()
                .and_then(|s| s.template.spec.as_ref())
                .into_iter()
                .flat_map(|p| &p.containers)
                .flat_map(|c| c.env.iter().flatten())
                .any(|e| e.name == "INJECTED");
            let manager = has_manager(&s, "kubectl-patch");
            if !injected && !manager {
                Ok(())
            } else {
                Err(format!(
                    "INJECTED present {injected}, kubectl-patch in managedFields {manager}"
                ))
            }
        })
        .await
    }

    async fn template_label_annotation(&mut self, r: &mut ClassResult) -> Result<(), String> {
        let base = self.names.base.clone();
        let patch = json!({"spec": {"template": {"metadata": {
            "labels": {"injected": "1"}, "annotations": {"injected": "1"}}}}});
        let before = self.reconciles().await.ok();
        self.kubectl_patch("statefulset", &base, "merge", &patch)
            .await?;
        let t0 = Instant::now();
        self.measure(
            r,
            t0,
            before,
            "injected label/annotation gone",
            async || {
                let s = self.live_sts(&base).await?;
                let meta = s.spec.as_ref().and_then(|s| s.template.metadata.as_ref());
                let label = meta
                    .and_then(|m| m.labels.as_ref())
                    .is_some_and(|l| l.contains_key("injected"));
                let annotation = meta
                    .and_then(|m| m.annotations.as_ref())
                    .is_some_and(|a| a.contains_key("injected"));
                if !label && !annotation {
                    Ok(())
                } else {
                    Err(format!("label {label}, annotation {annotation}"))
                }
            },
        )
        .await
    }

    async fn volume_added(&mut self, r: &mut ClassResult) -> Result<(), String> {
        let base = self.names.base.clone();
        let old = self.live_sts(&base).await?;
        let has_volumes = old
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|p| p.volumes.as_ref())
            .is_some_and(|v| !v.is_empty());
        let vol = json!({"name": "injected", "emptyDir": {}});
        let patch = if has_volumes {
            json!([{"op": "add", "path": "/spec/template/spec/volumes/-", "value": vol}])
        } else {
            json!([{"op": "add", "path": "/spec/template/spec/volumes", "value": [vol]}])
        };
        let before = self.reconciles().await.ok();
        self.kubectl_patch("statefulset", &base, "json", &patch)
            .await?;
        let t0 = Instant::now();
        self.measure(r, t0, before, "injected volume gone", async || {
            let s = self.live_sts(&base).await?;
            let present = s
                .spec
                .as_ref()
                .and_then(|s| s.template.spec.as_ref())
                .and_then(|p| p.volumes.as_ref())
                .into_iter()
                .flatten()
                .any(|v| v.name == "injected");
            if present {
                Err("volume injected present".into())
            } else {
                Ok(())
            }
        })
        .await
    }

    async fn service_selector_changed(&mut self, r: &mut ClassResult) -> Result<(), String> {
        let name = self.names.base.clone();
        let services: Api<Service> = Api::namespaced(self.client.clone(), &self.ns);
        let selector = |s: &Service| s.spec.as_ref().and_then(|s| s.selector.clone());
        let old = selector(&services.get(&name).await.map_err(|e| e.to_string())?);
        let before = self.reconciles().await.ok();
        self.kubectl_patch(
            "service",
            &name,
            "merge",
            &json!({"spec": {"selector": {"injected": "1"}}}),
        )
        .await?;
        let t0 = Instant::now();
        self.measure(r, t0, before, "selector restored", async || {
            let now = selector(&services.get(&name).await.map_err(|e| e.to_string())?);
            if now == old {
                Ok(())
            } else {
                Err(format!("selector {now:?}, was {old:?}"))
            }
        })
        .await
    }

    async fn configmap_edited(&mut self, r: &mut ClassResult) -> Result<(), String> {
        let name = self.names.config.clone();
        let maps: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.ns);
        let old = maps
            .get(&name)
            .await
            .map_err(|e| e.to_string())?
            .data
            .unwrap_or_default();
        let (key, value) = old
            .iter()
            .next()
            .map(|(k, v)| (k.clone(), v.clone()))
            .ok_or("the ConfigMap has no data")?;
        let patch = json!({"data": {"INJECTED": "1", key: format!("{value}-injected")}});
        let before = self.reconciles().await.ok();
        self.kubectl_patch("configmap", &name, "merge", &patch)
            .await?;
        let t0 = Instant::now();
        self.measure(r, t0, before, "ConfigMap data restored", async || {
            let now = maps
                .get(&name)
                .await
                .map_err(|e| e.to_string())?
                .data
                .unwrap_or_default();
            if now == old {
                Ok(())
            } else {
                Err(format!("data {now:?}, was {old:?}"))
            }
        })
        .await
    }

    async fn manifest_deleted(&mut self, r: &mut ClassResult) -> Result<(), String> {
        let url = format!(
            "http://{}/v2/{}/manifests/{}",
            self.primary.addr, self.repo, self.digest
        );
        let before = self.reconciles().await.ok();
        let (status, body) = self.http_call(reqwest::Method::DELETE, &url, false).await?;
        if status != 202 {
            return Err(format!(
                "DELETE manifest: {status} {}",
                String::from_utf8_lossy(&body)
            ));
        }
        let t0 = Instant::now();
        let primary = self.primary.addr.clone();
        self.measure(
            r,
            t0,
            before,
            "primary serves the image again",
            async || self.verify_registry(&primary).await,
        )
        .await
    }

    async fn primary_stopped(&mut self, r: &mut ClassResult) -> Result<(), String> {
        let before = self.reconciles().await.ok();
        self.primary.stop();
        let t0 = Instant::now();
        let res = self
            .measure(r, t0, before, "template on the mirror", async || {
                self.sts_on_mirror().await
            })
            .await;
        if res.is_ok() {
            self.measure_cpu(r).await;
        }
        self.primary.start().await?;
        self.note_condition(r, "ImageVerified", "True", "the primary restarted")
            .await;
        res
    }

    async fn blob_corrupted(&mut self, r: &mut ClassResult) -> Result<(), String> {
        let target = self.primary.blob_data(&self.layer);
        let good = self.mirror.blob_data(&self.layer);
        let bytes = fs::read(&target).map_err(|e| format!("{}: {e}", target.display()))?;
        let bad: Vec<u8> = bytes.iter().map(|b| b ^ 0xff).collect();
        let before = self.reconciles().await.ok();
        self.pending_restore = Some((good.clone(), target.clone()));
        fs::write(&target, &bad).map_err(|e| format!("{}: {e}", target.display()))?;
        let t0 = Instant::now();
        r.note(format!(
            "overwrote {} bytes of layer {}",
            bad.len(),
            self.layer
        ));
        let primary = self.primary.addr.clone();
        let mirror = self.mirror.addr.clone();
        let label = format!("registry=\"{primary}\"");
        let mut how: Option<&'static str> = None;
        let res = self
            .measure(r, t0, before, "served from the mirror, primary handled", async || {
                self.sts_on_mirror().await?;
                self.verify_registry(&mirror).await?;
                if self.verify_registry(&primary).await.is_ok() {
                    how = Some("repaired");
                    return Ok(());
                }
                let text = self.metrics().await?;
                let flagged = metric(&text, "br2k_registry_unrepairable", Some(&label));
                let (_, c) = self.cr_status(&self.cr_name).await?;
                let verified = c.get("ImageVerified").cloned();
                if flagged == Some(1.0) && verified.as_deref() == Some("False") {
                    how = Some("unrepairable");
                    Ok(())
                } else {
                    Err(format!(
                        "primary still corrupt; br2k_registry_unrepairable{{{label}}} = {flagged:?}, ImageVerified = {verified:?}"
                    ))
                }
            })
            .await;
        r.outcome = how.map(str::to_owned);
        if res.is_ok() {
            self.measure_cpu(r).await;
        }
        // Restore the primary's bytes from the mirror's copy of the same blob.
        if let Some((src, dst)) = self.pending_restore.take() {
            fs::copy(&src, &dst).map_err(|e| format!("restore {}: {e}", dst.display()))?;
        }
        match self.verify_registry(&primary).await {
            Ok(()) => {}
            Err(e) => r.problem(format!("primary after restoring the bytes: {e}")),
        }
        self.note_condition(r, "ImageVerified", "True", "the bytes were restored")
            .await;
        res
    }

    async fn chain_rpc_stopped(&mut self, r: &mut ClassResult) -> Result<(), String> {
        let base = self.names.base.clone();
        self.proxy.stop().await;
        // Reported state only: the recovery below is checked all the same.
        self.note_condition(r, "ChainAvailable", "False", "the RPC stopped")
            .await;
        let old = self.live_sts(&base).await?;
        let old_uid = old.metadata.uid.clone().unwrap_or_default();
        let before = self.reconciles().await.ok();
        self.kubectl(&["delete", "statefulset", &base, "--wait=false"])
            .await?;
        let t0 = Instant::now();
        let res = self
            .measure(
                r,
                t0,
                before,
                "StatefulSet re-created while the RPC is down",
                async || self.sts_recreated(&old_uid).await,
            )
            .await;
        if res.is_ok() {
            self.measure_cpu(r).await;
        }
        self.proxy.resume().await?;
        self.note_condition(r, "ChainAvailable", "True", "the RPC came back")
            .await;
        res
    }

    async fn operator_killed(&mut self, r: &mut ClassResult) -> Result<(), String> {
        let base = self.names.base.clone();
        let old = self.live_sts(&base).await?;
        let old_uid = old.metadata.uid.clone().unwrap_or_default();
        self.kubectl(&["delete", "statefulset", &base, "--wait=false"])
            .await?;
        let deleted = Instant::now();
        self.operator.kill();
        let gap = deleted.elapsed();
        let at_kill = match self.stss().get_opt(&base).await {
            Ok(Some(s)) if s.metadata.uid.as_deref() != Some(old_uid.as_str()) => {
                "already re-created"
            }
            Ok(Some(_)) => "old one still there (being deleted)",
            Ok(None) => "absent",
            Err(_) => "unknown",
        };
        r.note(format!(
            "SIGKILL {} ms after the delete returned; StatefulSet at the kill: {at_kill}",
            gap.as_millis()
        ));
        self.operator.start()?;
        let t0 = Instant::now();
        self.measure(
            r,
            t0,
            Some(0),
            "StatefulSet re-created after the restart",
            async || self.sts_recreated(&old_uid).await,
        )
        .await
    }

    async fn no_ports(&mut self, r: &mut ClassResult) -> Result<(), String> {
        self.no_ports_runs += 1;
        let id = ServiceId::new(format!("acc-{}-np{}", self.unique, self.no_ports_runs))
            .map_err(|e| e.to_string())?;
        let names = Names::of(&id);
        let mut spec =
            ServiceSpec::new(self.image.clone(), REPLICAS as u32).map_err(|e| e.to_string())?;
        spec.env = BTreeMap::from([("MODE".to_owned(), "no-ports".to_owned())]);
        register(&self.chain, &id, &spec).await?;
        let cr_name = format!("noports-{}", self.no_ports_runs);
        let before = self.reconciles().await.ok();
        self.crs()
            .create(
                &PostParams::default(),
                &Br2kService::new(&cr_name, self.cr_spec(&id)),
            )
            .await
            .map_err(|e| format!("create {cr_name}: {e}"))?;
        let t0 = Instant::now();
        let services: Api<Service> = Api::namespaced(self.client.clone(), &self.ns);
        let res = self
            .measure(r, t0, before, "no-ports service deployed", async || {
                let s = self.live_sts(&names.base).await?;
                let ok = s.spec.as_ref().and_then(|s| s.replicas) == Some(REPLICAS)
                    && ready(&s) == REPLICAS;
                if !ok {
                    return Err(sts_summary(&s));
                }
                let h = services
                    .get_opt(&names.headless)
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| format!("no headless Service {}", names.headless))?;
                let headless =
                    h.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some("None");
                if headless {
                    Ok(())
                } else {
                    Err(format!("Service {} is not headless", names.headless))
                }
            })
            .await;
        if let Err(e) = self.wait_healthy(&cr_name).await {
            r.problem(e);
        }
        self.remove_resource(&cr_name, r).await;
        res
    }

    /// A cluster policy refuses the service's StatefulSet: the resource must say
    /// `Valid=False` (reason `RefusedByKubernetes`) with no StatefulSet created and no
    /// loop while the policy stays; once it is deleted the service deploys.
    async fn refused_by_cluster(&mut self, r: &mut ClassResult) -> Result<(), String> {
        self.no_ports_runs += 1;
        let n = self.no_ports_runs;
        let id = ServiceId::new(format!("acc-{}-rf{n}", self.unique)).map_err(|e| e.to_string())?;
        let names = Names::of(&id);
        let policy = format!("br2k-acc-{}-{n}", self.unique);
        let file = self.dir.join(format!("{policy}.yaml"));
        fs::write(&file, deny_policy(&policy, &self.ns, DENIED_ENV))
            .map_err(|e| format!("write {}: {e}", file.display()))?;
        let file = file.display().to_string();
        self.kubectl(&["apply", "-f", &file]).await?;
        let res = self.refused_while_policy(r, &id, n, &names).await;
        // Lift the policy whatever happened: the service then deploys.
        if let Err(e) = self.kubectl(&["delete", "-f", &file, "--wait=true"]).await {
            r.problem(format!("delete the policy: {e}"));
        }
        let cr_name = format!("refused-{n}");
        if res.is_ok() {
            let t0 = Instant::now();
            match poll(
                RECOVERY_TIMEOUT,
                "deployed once the policy is gone",
                async || {
                    let s = self.live_sts(&names.base).await?;
                    if ready(&s) == REPLICAS && observed(&s) {
                        Ok(())
                    } else {
                        Err(sts_summary(&s))
                    }
                },
            )
            .await
            {
                Ok(()) => r.note(format!(
                    "deployed {} ms after the policy was deleted (backoff)",
                    t0.elapsed().as_millis()
                )),
                Err(e) => r.problem(e),
            }
        }
        self.remove_resource(&cr_name, r).await;
        res
    }

    /// With the deny policy in place: registers the service, creates its resource and
    /// measures the time until it is reported refused; then the CPU window.
    async fn refused_while_policy(
        &mut self,
        r: &mut ClassResult,
        id: &ServiceId,
        n: u32,
        names: &Names,
    ) -> Result<(), String> {
        // The API server enforces a new policy once its informer has it: wait until a
        // server-side dry run of such a StatefulSet is refused.
        let probe = self.dir.join(format!("probe-{n}.yaml"));
        fs::write(
            &probe,
            denied_statefulset(&format!("probe-{n}"), DENIED_ENV),
        )
        .map_err(|e| e.to_string())?;
        let probe = probe.display().to_string();
        poll(RECOVERY_TIMEOUT, "policy enforced", async || {
            match self
                .kubectl(&["apply", "--dry-run=server", "-f", &probe])
                .await
            {
                Err(e) if e.contains("BR2K_ACCEPTANCE_DENY") => Ok(()),
                Err(e) => Err(e),
                Ok(out) => Err(format!("not refused yet: {}", out.trim())),
            }
        })
        .await?;
        let mut spec =
            ServiceSpec::new(self.image.clone(), REPLICAS as u32).map_err(|e| e.to_string())?;
        spec.env = BTreeMap::from([(DENIED_ENV.to_owned(), "1".to_owned())]);
        register(&self.chain, id, &spec).await?;
        let cr_name = format!("refused-{n}");
        let before = self.reconciles().await.ok();
        self.crs()
            .create(
                &PostParams::default(),
                &Br2kService::new(&cr_name, self.cr_spec(id)),
            )
            .await
            .map_err(|e| format!("create {cr_name}: {e}"))?;
        let t0 = Instant::now();
        let sts: Api<StatefulSet> = Api::namespaced(self.client.clone(), &self.ns);
        self.measure(r, t0, before, "reported refused", async || {
            let o = self.crs().get(&cr_name).await.map_err(|e| e.to_string())?;
            let st = o.status.unwrap_or_default();
            let valid = st.conditions.iter().find(|c| c.type_ == "Valid");
            let refused = valid.is_some_and(|c| {
                c.status == "False"
                    && c.reason == "RefusedByKubernetes"
                    && c.message.contains("BR2K_ACCEPTANCE_DENY")
            });
            if !refused {
                return Err(format!("phase {:?}, Valid {valid:?}", st.phase));
            }
            // Independently: the API server holds no StatefulSet for it.
            match sts.get_opt(&names.base).await.map_err(|e| e.to_string())? {
                None => Ok(()),
                Some(_) => Err(format!("StatefulSet {} exists", names.base)),
            }
        })
        .await?;
        self.measure_cpu(r).await;
        Ok(())
    }
}

impl Harness {
    /// Another chain account registers a service and a resource names it: the
    /// operator (trusting only the harness's account) must deploy nothing.
    async fn owner_not_allowed(&mut self, r: &mut ClassResult) -> Result<(), String> {
        self.no_ports_runs += 1;
        let n = self.no_ports_runs;
        let id = ServiceId::new(format!("acc-{}-ow{n}", self.unique)).map_err(|e| e.to_string())?;
        let names = Names::of(&id);
        let url = reqwest::Url::parse(&self.proxy.url()).map_err(|e| e.to_string())?;
        let stranger = ChainRegistry::connect(
            ChainConfig::new(vec![url])
                .with_private_key(ANVIL_KEY1)
                .with_registry(self.chain.address()),
        )
        .await
        .map_err(|e| format!("connect as account 1: {e}"))?;
        let spec =
            ServiceSpec::new(self.image.clone(), REPLICAS as u32).map_err(|e| e.to_string())?;
        register(&stranger, &id, &spec).await?;
        let cr_name = format!("stranger-{n}");
        let before = self.reconciles().await.ok();
        self.crs()
            .create(
                &PostParams::default(),
                &Br2kService::new(&cr_name, self.cr_spec(&id)),
            )
            .await
            .map_err(|e| format!("create {cr_name}: {e}"))?;
        let t0 = Instant::now();
        let sts: Api<StatefulSet> = Api::namespaced(self.client.clone(), &self.ns);
        let stranger_account = stranger.account().to_string();
        let res = self
            .measure(r, t0, before, "reported not allowed", async || {
                let o = self.crs().get(&cr_name).await.map_err(|e| e.to_string())?;
                let st = o.status.unwrap_or_default();
                let valid = st.conditions.iter().find(|c| c.type_ == "Valid");
                let refused = valid.is_some_and(|c| {
                    c.status == "False"
                        && c.reason == "OwnerNotAllowed"
                        && c.message
                            .to_lowercase()
                            .contains(&stranger_account.to_lowercase())
                });
                if !refused {
                    return Err(format!("phase {:?}, Valid {valid:?}", st.phase));
                }
                // Independently: the API server holds no StatefulSet for it.
                match sts.get_opt(&names.base).await.map_err(|e| e.to_string())? {
                    None => Ok(()),
                    Some(_) => Err(format!("StatefulSet {} exists", names.base)),
                }
            })
            .await;
        if res.is_ok() {
            self.measure_cpu(r).await;
            // Still nothing after the window.
            if sts
                .get_opt(&names.base)
                .await
                .map_err(|e| e.to_string())?
                .is_some()
            {
                r.problem(format!("StatefulSet {} created later", names.base));
            }
        }
        self.remove_resource(&cr_name, r).await;
        res
    }

    /// Deletes the extra resource `name` and waits until it is gone (its finalizer
    /// done); a failure is recorded in `r`.
    async fn remove_resource(&self, name: &str, r: &mut ClassResult) {
        let crs = self.crs();
        if let Err(e) = crs.delete(name, &DeleteParams::default()).await {
            r.problem(format!("delete {name}: {e}"));
            return;
        }
        let gone = poll(
            RECOVERY_TIMEOUT,
            &format!("{name} removed"),
            async || match crs.get_opt(name).await.map_err(|e| e.to_string())? {
                None => Ok(()),
                Some(o) => Err(format!(
                    "still there, finalizers {:?}",
                    o.metadata.finalizers
                )),
            },
        )
        .await;
        if let Err(e) = gone {
            r.problem(e);
        }
    }
}

/// anvil's default account 1 (not trusted by the harness's operator).
const ANVIL_KEY1: &str = "0x59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d";

/// The env var the acceptance policy forbids.
const DENIED_ENV: &str = "BR2K_ACCEPTANCE_DENY";

/// A ValidatingAdmissionPolicy (and its binding, for namespace `ns`) that refuses any
/// StatefulSet whose containers set env var `env`.
fn deny_policy(name: &str, ns: &str, env: &str) -> String {
    format!(
        r#"apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata:
  name: {name}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
    - apiGroups: ["apps"]
      apiVersions: ["v1"]
      operations: ["CREATE", "UPDATE"]
      resources: ["statefulsets"]
  validations:
  - expression: "!object.spec.template.spec.containers.exists(c, has(c.env) && c.env.exists(e, e.name == '{env}'))"
    message: "this cluster forbids {env}"
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata:
  name: {name}
spec:
  policyName: {name}
  validationActions: ["Deny"]
  matchResources:
    namespaceSelector:
      matchLabels:
        kubernetes.io/metadata.name: {ns}
"#
    )
}

/// A minimal StatefulSet `name` that sets env var `env` (for a server-side dry run).
fn denied_statefulset(name: &str, env: &str) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: {name}
spec:
  serviceName: {name}
  replicas: 0
  selector:
    matchLabels: {{app: {name}}}
  template:
    metadata:
      labels: {{app: {name}}}
    spec:
      containers:
      - name: c
        image: example.invalid/probe:1
        env:
        - name: {env}
          value: "1"
"#
    )
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.operator.kill();
        self.primary.stop();
        self.mirror.stop();
        if !self.keep_dir && !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// The digest the template's image is pinned to.
fn template_digest(s: &StatefulSet) -> Option<Digest> {
    ImageRef::parse(&template_image(s)?).ok()?.digest().copied()
}

/// Whether a managedFields entry of `manager` is on the object.
fn has_manager(s: &StatefulSet, manager: &str) -> bool {
    s.metadata
        .managed_fields
        .iter()
        .flatten()
        .any(|m| m.manager.as_deref() == Some(manager))
}

/// A table of results: one row per run.
pub fn table(results: &[ClassResult]) -> String {
    let mut out = format!(
        "{:<30} {:<5} {:>9} {:>8} {:>10} {:>7} {:>6}  {}\n",
        "class", "pass", "recovered", "ms", "reconciles", "cpu%", "quiet", "outcome/problems"
    );
    for r in results {
        let opt = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
        out.push_str(&format!(
            "{:<30} {:<5} {:>9} {:>8} {:>10} {:>7} {:>6}  {}{}\n",
            r.class.name(),
            if r.passed() { "yes" } else { "NO" },
            r.recovered,
            opt(r.ms),
            opt(r.reconciles),
            r.cpu_pct.map_or("-".to_owned(), |c| format!("{c:.1}")),
            opt(r.quiet_reconciles),
            r.outcome.clone().unwrap_or_default(),
            if r.problems.is_empty() {
                String::new()
            } else {
                format!(" [{}]", r.problems.join(" | "))
            },
        ));
    }
    out
}
