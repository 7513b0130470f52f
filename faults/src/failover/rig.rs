//! The rig: two clusters with an operator each, the ledger's contracts and image,
//! the pod runners, and the settling client.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use alloy::primitives::Address;
use br2k_chain::{ChainConfig, ChainRegistry};
use br2k_core::{Registry, Role, ServiceId, ServiceSpec};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::Api;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;

use super::Options;
use super::member::{Member, PodProc, image, kube_client, prepare_cluster};
use crate::ledger::{Reply, Serve, Stack, serve_command, setup_service};
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
    pub(super) rpc: String,
    pub(super) registry_address: String,
    pub(super) settlement: Address,
    pub(super) first_block: u64,
    pub(super) ledger_bin: PathBuf,
    pub(super) oci: String,
    pub(super) dir: PathBuf,
    pub(super) run: String,
    pub(super) load: Option<Load>,
    pub(super) acked: Arc<Mutex<Vec<String>>>,
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
                control_plane,
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
        let mut cmd = serve_command(
            &self.ledger_bin,
            &Serve {
                rpc: &self.rpc,
                registry_address: &self.registry_address,
                slot: ordinal,
                etcd: &m.replica_etcd[ordinal],
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
