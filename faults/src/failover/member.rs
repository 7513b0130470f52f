//! One cluster of the rig: its operator process, the etcd proxies the rig can cut,
//! the ledger processes standing for its Ready pods, and its preparation.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use br2k_core::{ImageRef, ServiceId};
use br2k_operator::crd::{Br2kService, Br2kServiceSpec};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;

use super::rig::until;
use crate::ledger::Stack;
use crate::operator::infra::{ControlPlaneSupervisor, free_port};
use crate::proxy::{Mode, Proxy};

/// One `ledger serve --cluster` process standing for one Ready pod.
pub(super) struct PodProc {
    pub(super) child: Child,
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
    pub(super) operator: Option<Child>,
    pub(super) operator_args: Vec<String>,
    pub(super) operator_key: &'static str,
    /// The operator's etcd proxies.
    pub operator_etcd: Vec<Proxy>,
    /// Each replica ordinal's etcd proxies.
    pub replica_etcd: Vec<Vec<Proxy>>,
    /// Each replica ordinal's port.
    pub ports: Vec<u16>,
    pub(super) pods: BTreeMap<usize, PodProc>,
    pub(super) spawned: usize,
    pub(super) dir: PathBuf,
    pub(super) bin: PathBuf,
    /// Restarts the scheduler and controller manager when they exit (they do when
    /// their API server was gone longer than their leader-election lease), as a
    /// kubelet or systemd would.
    pub(super) control_plane: ControlPlaneSupervisor,
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

pub(super) async fn kube_client(kubeconfig: &str) -> Result<kube::Client, String> {
    let kc = kube::config::Kubeconfig::read_from(kubeconfig).map_err(|e| e.to_string())?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    kube::Client::try_from(cfg).map_err(|e| e.to_string())
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

    pub(super) fn start_operator(&mut self, extra: &[&str]) -> Result<(), String> {
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
pub(super) async fn image(run: &str, registries: &[String]) -> Result<ImageRef, String> {
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
pub(super) async fn prepare_cluster(
    client: &kube::Client,
    ns: &str,
    id: &ServiceId,
) -> Result<(), String> {
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
