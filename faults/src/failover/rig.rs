//! The rig: two clusters with an operator each, the ledger's contracts and image,
//! the pod runners, and the settling client.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use alloy::primitives::Address;
use br2k_chain::{ChainConfig, ChainRegistry};
use br2k_core::{ImageRef, Registry, Role, ServiceId, ServiceSpec};
use br2k_operator::crd::{Br2kService, Br2kServiceSpec};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::{Api, ListParams, PostParams};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use super::Options;
use crate::ledger::{Client, Reply, Serve, Stack, serve_command, settlement_txs, setup_service};
use crate::operator::infra::{ControlPlaneSupervisor, free_port, unique};
use crate::proxy::{Mode, Proxy};

/// Anvil dev accounts 5 (the ledger's owner, see `crate::ledger`), 1 and 2 (the
/// operators of clusters `a` and `b`).
const OWNER_KEY: &str = "8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba";
const OPERATOR_KEYS: [&str; 2] = [
    "59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
    "5de4111afa1a4b94908f83103eb1f1706367c2e68ca870fc3fb9a804cdab365a",
];
/// Replicas of the ledger in the active cluster.
pub(super) const REPLICAS: usize = 3;
/// How often the pod runners and the trial's observers look.
pub(super) const POLL: Duration = Duration::from_millis(100);

/// The settling client's task and its stop flag; the task returns the settlements
/// whose outcome it did not learn.
type Load = (Arc<AtomicBool>, JoinHandle<Vec<(String, Reply)>>);

/// One `ledger serve --cluster` process standing for one Ready pod.
struct PodProc {
    child: Child,
}

impl Drop for PodProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One cluster: its API client, its operator process, the etcd proxies the rig can
/// cut, and the ledger processes of its Ready pods.
pub struct Member {
    /// The br2k cluster name (`a`, `b`).
    pub name: String,
    /// Its stack (`KUBECONFIG`, `KWOK_WORKDIR`, `BR2K_KWOK_CLUSTER`).
    pub stack: Stack,
    /// A client of its API server.
    pub client: kube::Client,
    operator: Option<Child>,
    operator_args: Vec<String>,
    operator_key: &'static str,
    /// The operator's etcd proxies.
    pub operator_etcd: Vec<Proxy>,
    /// Each replica ordinal's etcd proxies.
    pub replica_etcd: Vec<Vec<Proxy>>,
    /// Each replica ordinal's port.
    pub ports: Vec<u16>,
    pods: BTreeMap<usize, PodProc>,
    spawned: usize,
    dir: PathBuf,
    bin: PathBuf,
    /// Restarts the scheduler and controller manager when they exit (they do when
    /// their API server was gone longer than their leader-election lease), as a
    /// kubelet or systemd would.
    _control_plane: ControlPlaneSupervisor,
}

impl Member {
    /// The replicas' URLs.
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect()
    }

    /// Sets every etcd proxy of this cluster (operator and replicas) to `mode`.
    pub fn etcd_mode(&self, mode: Mode) {
        for p in self
            .operator_etcd
            .iter()
            .chain(self.replica_etcd.iter().flatten())
        {
            p.set(mode);
        }
    }

    /// The ledger processes running for this cluster's pods.
    pub fn running(&self) -> usize {
        self.pods.len()
    }
}

/// The whole rig.
pub struct Rig {
    /// Cluster `a` then `b`.
    pub members: Vec<Member>,
    /// The service.
    pub id: ServiceId,
    /// The service's workload namespace (same in both clusters).
    pub ns: String,
    /// A read-only view of the registry contract.
    pub chain: ChainRegistry,
    rpc: String,
    registry_address: String,
    settlement: Address,
    first_block: u64,
    ledger_bin: PathBuf,
    oci: String,
    dir: PathBuf,
    run: String,
    load: Option<Load>,
    acked: Arc<Mutex<Vec<String>>>,
}

async fn kube_client(kubeconfig: &str) -> Result<kube::Client, String> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).map_err(|e| e.to_string())?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    kube::Client::try_from(cfg).map_err(|e| e.to_string())
}

/// Polls `f` every [`POLL`] until it is `Ok`, at most `within`.
pub(super) async fn until<T>(
    within: Duration,
    what: &str,
    mut f: impl AsyncFnMut() -> Result<T, String>,
) -> Result<T, String> {
    let start = Instant::now();
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if start.elapsed() > within => {
                return Err(format!("{what}: not within {within:?}: {e}"));
            }
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

impl Rig {
    /// Deploys the contracts, publishes the ledger for clusters `a` and `b`, starts
    /// both operators and waits until one cluster runs the service with a leader.
    pub async fn start(opts: &Options) -> Result<Self, String> {
        let run = unique();
        let dir = opts.work_dir.join(format!("failover-{run}"));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let stack_a = Stack::open(&opts.stack_a)?;
        let stack_b = Stack::open(&opts.stack_b)?;
        let rpc = stack_a.rpc()?;
        let registries: Vec<String> = stack_a
            .var("BR2K_OCI_REGISTRIES")?
            .split(',')
            .map(str::to_owned)
            .collect();
        let etcd = stack_a.etcd()?;
        let service = format!("fo-{run}");
        let id = ServiceId::new(&service).map_err(|e| e.to_string())?;
        let url: reqwest::Url = rpc.parse().map_err(|e| format!("{rpc}: {e}"))?;
        let first_block = {
            use alloy::providers::{Provider, ProviderBuilder};
            ProviderBuilder::new()
                .connect_http(url.clone())
                .get_block_number()
                .await
                .map_err(|e| format!("anvil: {e}"))?
        };
        let (registry_address, settlement) = setup_service(&opts.ledger_bin, &rpc, &service)?;
        let contract: Address = registry_address
            .parse()
            .map_err(|e| format!("registry address: {e}"))?;
        let base = ChainConfig::new(vec![url])
            .with_registry(contract)
            .with_chain_id(31337);
        let owner = ChainRegistry::connect(base.clone().with_private_key(OWNER_KEY))
            .await
            .map_err(|e| format!("owner: {e}"))?;
        // The image every cluster runs (kwok starts no container: 1 MiB of this run's
        // bytes stand for the ledger), pushed to both registries and pinned by digest.
        let image = image(&run, &registries).await?;
        let mut spec = ServiceSpec::new(image, REPLICAS as u32).map_err(|e| e.to_string())?;
        spec.clusters = vec!["a".into(), "b".into()];
        owner
            .publish(&id, &spec)
            .await
            .map_err(|e| format!("publish: {e}"))?;
        owner
            .resume(&id)
            .await
            .map_err(|e| format!("resume: {e}"))?;
        let mut operators = Vec::new();
        for key in OPERATOR_KEYS {
            let acct = ChainRegistry::connect(base.clone().with_private_key(key))
                .await
                .map_err(|e| e.to_string())?
                .account();
            owner
                .grant(&id, &acct, Role::Operator)
                .await
                .map_err(|e| format!("grant: {e}"))?;
            operators.push(acct);
        }
        let ns = format!("fo-{run}");
        let mut members = Vec::new();
        for (i, (name, stack)) in [("a", stack_a), ("b", stack_b)].into_iter().enumerate() {
            let client = kube_client(stack.var("KUBECONFIG")?).await?;
            let control_plane = ControlPlaneSupervisor::start_in(
                stack.var("KWOK_WORKDIR")?,
                stack.var("BR2K_KWOK_CLUSTER")?,
            )?;
            prepare_cluster(&client, &ns, &id).await?;
            let mut operator_etcd = Vec::new();
            for m in &etcd {
                operator_etcd.push(Proxy::start(*m).await?);
            }
            let mut replica_etcd = Vec::new();
            let mut ports = Vec::new();
            for _ in 0..REPLICAS {
                let mut v = Vec::new();
                for m in &etcd {
                    v.push(Proxy::start(*m).await?);
                }
                replica_etcd.push(v);
                ports.push(free_port()?);
            }
            let failover_etcd: Vec<String> = operator_etcd
                .iter()
                .map(|p| format!("http://{}", p.addr))
                .collect();
            let mut operator_args: Vec<String> = vec![
                "--cluster".into(),
                name.into(),
                "--failover-etcd".into(),
                failover_etcd.join(","),
                "--failover-lease-seconds".into(),
                opts.lease.as_secs().to_string(),
                "--chain-id".into(),
                "31337".into(),
                "--rpc-url".into(),
                rpc.clone(),
                "--registry-contract".into(),
                registry_address.clone(),
                "--allowed-owner".into(),
                owner.account().to_string(),
                "--insecure-loopback-registries".into(),
                "--watch-namespace".into(),
                ns.clone(),
                "--lease-name".into(),
                format!("fo-{run}-{name}"),
                "--identity".into(),
                format!("fo-{name}"),
                "--lease-seconds".into(),
                "4".into(),
                "--resync-seconds".into(),
                "2".into(),
            ];
            for r in &registries {
                operator_args.extend(["--oci-registry".into(), r.clone()]);
            }
            let mut m = Member {
                name: name.into(),
                stack,
                client,
                operator: None,
                operator_args,
                operator_key: OPERATOR_KEYS[i],
                operator_etcd,
                replica_etcd,
                ports,
                pods: BTreeMap::new(),
                spawned: 0,
                dir: dir.clone(),
                bin: opts.operator_bin.clone(),
                _control_plane: control_plane,
            };
            m.start_operator(&[])?;
            members.push(m);
        }
        let chain = ChainRegistry::connect(base)
            .await
            .map_err(|e| e.to_string())?;
        let mut rig = Self {
            members,
            id,
            ns,
            chain,
            rpc,
            registry_address,
            settlement,
            first_block,
            ledger_bin: opts.ledger_bin.clone(),
            oci: registries[0].clone(),
            dir,
            run,
            load: None,
            acked: Arc::default(),
        };
        let active = until(Duration::from_secs(120), "first placement", async || {
            rig.sync_pods().await;
            let placed = rig.placed().await?;
            let m = rig.member(&placed.0);
            rig.ready_replicas(m).await?;
            rig.leader_in(m).await?;
            Ok(placed)
        })
        .await?;
        eprintln!(
            "[failover] service {} placed in cluster {} at epoch {}; work dir {}",
            rig.id,
            active.0,
            active.1,
            rig.dir.display()
        );
        rig.deposit().await?;
        rig.start_load();
        Ok(rig)
    }

    /// The member named `name`.
    pub fn member(&self, name: &str) -> &Member {
        self.members
            .iter()
            .find(|m| m.name == name)
            .expect("a known cluster")
    }

    /// The placement recorded on chain: (cluster, epoch).
    pub async fn placed(&self) -> Result<(String, u64), String> {
        let r = self
            .chain
            .active(&self.id)
            .await
            .map_err(|e| e.to_string())?;
        let p = r.placement.ok_or("no placement on chain yet")?;
        Ok((p.cluster, p.epoch))
    }

    /// Whether every replica is Ready in `m`, read from its API server: the
    /// StatefulSet asks for all of them and its controller saw that spec, and as
    /// many pods of the service are Ready and not being deleted (a StatefulSet's
    /// status alone may be stale while its controller restarts).
    pub async fn ready_replicas(&self, m: &Member) -> Result<(), String> {
        let s = self.statefulset(m).await?;
        let spec = s.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0);
        let observed = s.status.as_ref().and_then(|s| s.observed_generation);
        if spec != REPLICAS as i32 || observed < s.metadata.generation {
            return Err(format!("{}: spec {spec}, observed {observed:?}", m.name));
        }
        let ready = self.ready_pods(m).await?.len();
        if ready == REPLICAS {
            Ok(())
        } else {
            Err(format!("{}: {ready}/{REPLICAS} pods ready", m.name))
        }
    }

    /// The ordinals of the service's pods in `m` that are Ready and not being
    /// deleted.
    async fn ready_pods(&self, m: &Member) -> Result<Vec<usize>, String> {
        let base = br2k_k8s::names::Names::of(&self.id).base;
        let pods = Api::<Pod>::namespaced(m.client.clone(), &self.ns)
            .list(&ListParams::default().labels(&format!(
                "{}={}",
                br2k_k8s::names::LABEL_SERVICE_ID,
                self.id
            )))
            .await
            .map_err(|e| format!("{}: pods: {e}", m.name))?;
        let mut ready = Vec::new();
        for p in &pods.items {
            let name = p.metadata.name.clone().unwrap_or_default();
            let ordinal = name
                .strip_prefix(&format!("{base}-"))
                .and_then(|o| o.parse::<usize>().ok());
            let is_ready = p
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
            if let Some(o) = ordinal
                && o < REPLICAS
                && is_ready
                && p.metadata.deletion_timestamp.is_none()
            {
                ready.push(o);
            }
        }
        Ok(ready)
    }

    /// Whether the control plane of `m` works again after its API server returned:
    /// the controller manager and the scheduler renewed their leases in the last 3 s
    /// (after an API-server restart they may wait out their old lease, 15 s, before
    /// they act again, as on any cluster).
    pub async fn control_plane_ready(&self, m: &Member) -> Result<(), String> {
        use k8s_openapi::api::coordination::v1::Lease;
        let leases: Api<Lease> = Api::namespaced(m.client.clone(), "kube-system");
        for name in ["kube-controller-manager", "kube-scheduler"] {
            let l = leases.get(name).await.map_err(|e| format!("{name}: {e}"))?;
            let renewed = l
                .spec
                .and_then(|s| s.renew_time)
                .ok_or_else(|| format!("{name}: never renewed"))?;
            let age = k8s_openapi::jiff::Timestamp::now().duration_since(renewed.0);
            if age > k8s_openapi::jiff::SignedDuration::from_secs(3) {
                return Err(format!("{}: {name} renewed {age:?} ago", m.name));
            }
        }
        Ok(())
    }

    /// The StatefulSet of the service in `m`.
    pub async fn statefulset(&self, m: &Member) -> Result<StatefulSet, String> {
        let name = br2k_k8s::names::Names::of(&self.id).base;
        Api::<StatefulSet>::namespaced(m.client.clone(), &self.ns)
            .get(&name)
            .await
            .map_err(|e| format!("{}: statefulset: {e}", m.name))
    }

    /// The placement status the operator of `m` wrote on its resource.
    pub async fn placement_status(&self, m: &Member) -> Result<Value, String> {
        let cr = Api::<Br2kService>::namespaced(m.client.clone(), &self.ns)
            .get("ledger")
            .await
            .map_err(|e| e.to_string())?;
        let s = serde_json::to_value(cr.status).map_err(|e| e.to_string())?;
        Ok(s["placement"].clone())
    }

    /// The URL of a replica of `m` that says it leads.
    pub async fn leader_in(&self, m: &Member) -> Result<String, String> {
        let c = Client::new(m.urls());
        match c.leader().await {
            Some(i) => Ok(m.urls()[i].clone()),
            None => Err(format!("no leader in {}", m.name)),
        }
    }

    /// The pod runners: one ledger process per Ready pod of each cluster, stopped
    /// when its pod goes; nothing changes while a cluster's API server is down.
    pub async fn sync_pods(&mut self) {
        for i in 0..self.members.len() {
            let Ok(ready) = self.ready_pods(&self.members[i]).await else {
                continue;
            };
            self.members[i].pods.retain(|o, _| ready.contains(o));
            for o in ready {
                if self.members[i].pods.contains_key(&o) {
                    continue;
                }
                match self.spawn_replica(i, o) {
                    Ok(p) => {
                        self.members[i].pods.insert(o, p);
                    }
                    Err(e) => eprintln!("[failover] start replica {o}: {e}"),
                }
            }
        }
    }

    fn spawn_replica(&mut self, member: usize, ordinal: usize) -> Result<PodProc, String> {
        let m = &mut self.members[member];
        m.spawned += 1;
        let log = self
            .dir
            .join(format!("replica-{}-{ordinal}-{}.log", m.name, m.spawned));
        let etcd: Vec<String> = m.replica_etcd[ordinal]
            .iter()
            .map(|p| format!("http://{}", p.addr))
            .collect();
        let mut cmd = serve_command(
            &self.ledger_bin,
            &Serve {
                rpc: &self.rpc,
                registry_address: &self.registry_address,
                slot: ordinal,
                etcd: &etcd,
                oci: &self.oci,
                settlement: self.settlement,
                service: self.id.as_str(),
                namespace: &format!("fo-{}", self.run),
                port: m.ports[ordinal],
            },
            &log,
        )?;
        cmd.env("LEDGER_CLUSTER", &m.name);
        let child = cmd.spawn().map_err(|e| format!("spawn ledger: {e}"))?;
        Ok(PodProc { child })
    }

    /// Puts a balance on the account the client settles from.
    async fn deposit(&self) -> Result<(), String> {
        let c = self.client();
        let body = json!({"account": "treasury", "amount": 1_000_000_000u64}).to_string();
        match c
            .call(
                "/deposit",
                Some(&format!("fo-{}-fund", self.run)),
                Some(&body),
                Duration::from_secs(30),
            )
            .await
        {
            Reply::Final(200, _) => Ok(()),
            other => Err(format!("deposit: {other:?}")),
        }
    }

    /// A client of every replica of both clusters.
    pub fn client(&self) -> Client {
        Client::new(self.members.iter().flat_map(Member::urls).collect())
    }

    /// Settles 1 unit under a new key every 200 ms until stopped.
    fn start_load(&mut self) {
        let stop = Arc::new(AtomicBool::new(false));
        let (c, run, acked, s) = (
            self.client(),
            self.run.clone(),
            self.acked.clone(),
            stop.clone(),
        );
        let task = tokio::spawn(async move {
            let mut unknown = Vec::new();
            let body = json!({"account": "treasury", "amount": 1}).to_string();
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                n += 1;
                let key = format!("fo-{run}-s-{n}");
                let r = c
                    .call("/settle", Some(&key), Some(&body), Duration::from_secs(15))
                    .await;
                match &r {
                    Reply::Final(200, _) => acked.lock().await.push(key),
                    _ => unknown.push((key, r)),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            unknown
        });
        self.load = Some((stop, task));
    }

    /// Stops the load, resolves every unknown outcome with its key, and checks that
    /// every acknowledged settlement is on chain exactly once and no other.
    pub async fn finish(
        &mut self,
        trials: Vec<super::TrialResult>,
    ) -> Result<super::Summary, String> {
        let mut problems = Vec::new();
        let unknown = match self.load.take() {
            Some((stop, task)) => {
                stop.store(true, Ordering::Relaxed);
                task.await.map_err(|e| e.to_string())?
            }
            None => Vec::new(),
        };
        let c = self.client();
        let body = json!({"account": "treasury", "amount": 1}).to_string();
        for (key, first) in unknown {
            self.sync_pods().await;
            match c
                .call("/settle", Some(&key), Some(&body), Duration::from_secs(60))
                .await
            {
                Reply::Final(200, _) => self.acked.lock().await.push(key),
                other => problems.push(format!(
                    "settlement {key}: {first:?}, then still {other:?} after a retry with its key"
                )),
            }
        }
        let acked = self.acked.lock().await.clone();
        let on_chain = settlement_txs(&self.rpc, self.settlement, self.first_block).await?;
        let keys: BTreeMap<_, _> = acked
            .iter()
            .map(|k| (br2k_ledger::settle::settlement_key(k), k.clone()))
            .collect();
        let lost = keys.keys().filter(|k| !on_chain.contains_key(*k)).count();
        let duplicated = on_chain.values().filter(|n| **n > 1).count();
        let unexpected = on_chain.keys().filter(|k| !keys.contains_key(*k)).count();
        Ok(super::Summary {
            trials,
            acknowledged: acked.len(),
            lost,
            duplicated,
            unexpected,
            problems,
        })
    }

    /// The tails of the operators' and replicas' logs.
    pub fn logs(&self, n: usize) -> String {
        let mut out = String::new();
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(n)..];
            out.push_str(&format!("--- {}\n{}\n", f.display(), tail.join("\n")));
        }
        out
    }

    /// Stops the load, the replicas and the operators; removes the resources.
    pub async fn shutdown(&mut self) {
        if let Some((stop, task)) = self.load.take() {
            stop.store(true, Ordering::Relaxed);
            task.abort();
        }
        for m in &mut self.members {
            m.etcd_mode(Mode::Pass);
            m.pods.clear();
            if let Some(mut c) = m.operator.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            let _ = Api::<Namespace>::all(m.client.clone())
                .delete(&self.ns, &Default::default())
                .await;
        }
    }
}

impl Member {
    /// Starts the operator again (SIGKILL first) with `extra` options.
    pub fn restart_operator(&mut self, extra: &[&str]) -> Result<(), String> {
        if let Some(mut c) = self.operator.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.start_operator(extra)
    }

    fn start_operator(&mut self, extra: &[&str]) -> Result<(), String> {
        let (dir, bin) = (&self.dir, &self.bin);
        let log = dir.join(format!("operator-{}.log", self.name));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let metrics = format!("127.0.0.1:{}", free_port()?);
        let child = Command::new(bin)
            .args(&self.operator_args)
            .args(extra)
            .args(["--metrics-addr", &metrics])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("KUBECONFIG", self.stack.var("KUBECONFIG")?)
            .env("BR2K_PRIVATE_KEY", self.operator_key)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", bin.display()))?;
        self.operator = Some(child);
        Ok(())
    }
}

/// Builds this run's image (1 MiB payload, entrypoint `/ledger serve`) and pushes it
/// to every registry; returns its digest-pinned reference in the first.
async fn image(run: &str, registries: &[String]) -> Result<ImageRef, String> {
    let payload: Vec<u8> = (0..1024 * 1024u32)
        .map(|i| {
            (i.wrapping_mul(2_654_435_761) >> 24) as u8 ^ run.as_bytes()[i as usize % run.len()]
        })
        .collect();
    let built = br2k_oci::ImageBuilder::new()
        .file("ledger", payload, 0o755)
        .and_then(|b| b.entrypoint(["/ledger", "serve"]).build())
        .map_err(|e| format!("build the image: {e}"))?;
    let repo = br2k_core::Repository::new(format!("br2k-failover/ledger-{run}"))
        .map_err(|e| e.to_string())?;
    for host in registries {
        let store = br2k_oci::OciImageStore::insecure(host).map_err(|e| e.to_string())?;
        use br2k_core::ImageStore;
        store
            .push(&repo, &built, Some("1.0"))
            .await
            .map_err(|e| format!("push to {host}: {e}"))?;
    }
    ImageRef::new(&registries[0], repo, Some("1.0"), Some(built.digest)).map_err(|e| e.to_string())
}

/// The CRD, RBAC, namespaces and the `ledger` resource in one cluster.
async fn prepare_cluster(client: &kube::Client, ns: &str, id: &ServiceId) -> Result<(), String> {
    for (name, text) in [
        ("crd.yaml", include_str!("../../../deploy/crd.yaml")),
        ("rbac.yaml", include_str!("../../../deploy/rbac.yaml")),
    ] {
        br2k_operator::manifests::apply(client, text, "br2k-failover")
            .await
            .map_err(|e| format!("apply deploy/{name}: {e}"))?;
    }
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for name in ["br2k-system", ns] {
        let obj: Namespace = serde_json::from_value(json!({"metadata": {"name": name}}))
            .map_err(|e| e.to_string())?;
        match namespaces.create(&PostParams::default(), &obj).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => return Err(format!("create namespace {name}: {e}")),
        }
    }
    let crs: Api<Br2kService> = Api::namespaced(client.clone(), ns);
    until(Duration::from_secs(30), "CRD served", async || {
        crs.list(&ListParams::default().limit(1))
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    })
    .await?;
    crs.create(
        &PostParams::default(),
        &Br2kService::new("ledger", Br2kServiceSpec::for_service(id.as_str())),
    )
    .await
    .map_err(|e| format!("create Br2kService: {e}"))?;
    Ok(())
}
