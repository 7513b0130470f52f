//! The set-up both harnesses do on the stack: its environment, the service image in
//! the registries, its record on the chain, the CRD, RBAC and namespaces, and the
//! tear-down of a run's resources and operator.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use alloy::transports::http::reqwest;
use br2k_chain::ChainRegistry;
use br2k_core::{
    Digest, Image, ImageRef, ImageStore, Port, Registry, Repository, ServiceId, ServiceSpec,
    ServiceState,
};
use br2k_oci::{ImageBuilder, OciImageStore};
use br2k_operator::crd::Br2kService;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use super::{OperatorProc, env, noise, poll};

/// What the stack's env file (`source $BR2K_STACK_DIR/env`) names.
pub struct StackEnv {
    /// `BR2K_REGISTRY_BIN`: the Distribution registry binary.
    pub registry_bin: String,
    /// `BR2K_KUBECTL_BIN`.
    pub kubectl: String,
    /// `KUBECONFIG`.
    pub kubeconfig: String,
    /// The first of `BR2K_RPC_URLS`.
    pub rpc: reqwest::Url,
}

impl StackEnv {
    /// Reads it, and checks that `operator_bin` is a file.
    pub fn read(operator_bin: &Path) -> Result<Self, String> {
        let e = Self {
            registry_bin: env("BR2K_REGISTRY_BIN")?,
            kubectl: env("BR2K_KUBECTL_BIN")?,
            kubeconfig: env("KUBECONFIG")?,
            rpc: {
                let rpc = env("BR2K_RPC_URLS")?;
                let first = rpc.split(',').next().unwrap_or_default().trim();
                reqwest::Url::parse(first).map_err(|e| format!("BR2K_RPC_URLS {rpc}: {e}"))?
            },
        };
        if !operator_bin.is_file() {
            return Err(format!(
                "operator binary {} not found",
                operator_bin.display()
            ));
        }
        Ok(e)
    }
}

/// A service image: one 48 KiB incompressible payload file
/// (`/opt/NAME/payload.bin`) and an entrypoint (`/usr/local/bin/NAME`).
pub fn build_image(seed: u64, name: &str) -> Result<Image, String> {
    let entrypoint = format!("/usr/local/bin/{name}");
    ImageBuilder::new()
        .file(
            &format!("/opt/{name}/payload.bin"),
            noise(seed, 48 * 1024),
            0o644,
        )
        .and_then(|b| {
            b.file(
                &entrypoint,
                b"#!/bin/sh\nexec sleep infinity\n".to_vec(),
                0o755,
            )
        })
        .map(|b| b.entrypoint([entrypoint.as_str()]))
        .and_then(|b| b.build())
        .map_err(|e| format!("build the image: {e}"))
}

/// Pushes `image` as `repo:1.0` to each registry of `addrs` and checks the digest
/// each one stored.
pub async fn push_everywhere(
    addrs: &[&str],
    repo: &Repository,
    image: &Image,
) -> Result<(), String> {
    for addr in addrs {
        let store = OciImageStore::insecure(addr).map_err(|e| e.to_string())?;
        let d = store
            .push(repo, image, Some("1.0"))
            .await
            .map_err(|e| format!("push to {addr}: {e}"))?;
        if d != image.digest {
            return Err(format!("{addr} stored {d}, built {}", image.digest));
        }
    }
    Ok(())
}

/// The config and layer digests of `image`, as its manifest lists them.
pub fn blobs_of(image: &Image) -> Vec<Digest> {
    let mut blobs = vec![image.config.digest];
    blobs.extend(image.layers.iter().map(|l| l.digest));
    blobs
}

/// The spec of a harness's service: `image`, `replicas`, port `http` 8080 and `env`,
/// validated.
pub fn service_spec(
    image: ImageRef,
    replicas: u32,
    env: &[(&str, &str)],
) -> Result<ServiceSpec, String> {
    let mut spec = ServiceSpec::new(image, replicas).map_err(|e| e.to_string())?;
    spec.ports = vec![Port {
        name: "http".into(),
        port: 8080,
    }];
    spec.env = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect::<BTreeMap<_, _>>();
    spec.validate().map_err(|e| e.to_string())?;
    Ok(spec)
}

/// The operator's trust anchors: the chain and registry contract of `chain`, reached
/// at `rpc`, the `registries` it may pull from, and `chain`'s account as the one
/// allowed owner.
pub fn trust_anchors(chain: &ChainRegistry, rpc: &str, registries: &[&str]) -> Vec<String> {
    let mut a = vec![
        "--chain-id".into(),
        chain.chain_id().to_string(),
        "--rpc-url".into(),
        rpc.to_owned(),
        "--registry-contract".into(),
        chain.address().to_string(),
    ];
    for r in registries {
        a.extend(["--oci-registry".into(), (*r).to_owned()]);
    }
    a.extend(["--allowed-owner".into(), chain.account().to_string()]);
    a
}

/// Registers `id` with `spec` and starts it. Each write is tried up to 3 times: the
/// anvil account may be used by another test at the same moment (a `nonce too low`
/// answer; the handle asks the chain for the nonce again).
pub async fn register(
    chain: &ChainRegistry,
    id: &ServiceId,
    spec: &ServiceSpec,
) -> Result<(), String> {
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

/// A client of the stack's API server (`KUBECONFIG`), after applying
/// `deploy/crd.yaml` and `deploy/rbac.yaml` as field manager `manager` and waiting
/// until the CRD is served.
pub async fn install_and_connect(manager: &str) -> Result<Client, String> {
    br2k_k8s::install_crypto_provider();
    let client = Client::try_default()
        .await
        .map_err(|e| format!("kube client (KUBECONFIG): {e}"))?;
    for (name, text) in [
        ("crd.yaml", include_str!("../../../../deploy/crd.yaml")),
        ("rbac.yaml", include_str!("../../../../deploy/rbac.yaml")),
    ] {
        br2k_operator::manifests::apply(&client, text, manager)
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
    Ok(client)
}

/// Creates namespace `br2k-system` (the operators' leases) and the run's `ns`
/// (labelled a test's), each unless it exists.
pub async fn create_namespaces(client: &Client, ns: &str) -> Result<(), String> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for (name, labels) in [
        ("br2k-system", json!({})),
        (ns, json!({"br2k.io/test": "true"})),
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
    Ok(())
}

/// `HOST:PORT` of `url` (the port its scheme implies if it names none); `what`
/// names the URL in the error.
pub fn host_port(url: &reqwest::Url, what: &str) -> Result<String, String> {
    Ok(format!(
        "{}:{}",
        url.host_str()
            .ok_or_else(|| format!("{what} without host"))?,
        url.port_or_known_default()
            .ok_or_else(|| format!("{what} without port"))?
    ))
}

/// The client of a harness's HTTP reads (no proxy, 5 s, no pooled connections: a
/// restarted peer is never reached on a stale connection).
pub fn http_client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(0)
        .build()
        .map_err(|e| e.to_string())
}

/// The StatefulSet `name` in `ns`, or an error naming its absence.
pub async fn live_sts(client: &Client, ns: &str, name: &str) -> Result<StatefulSet, String> {
    Api::<StatefulSet>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("no StatefulSet {name}"))
}

/// kubectl (binary `bin`) on the stack's API server (`kubeconfig`), in namespace `ns`.
pub struct Kubectl {
    /// The kubectl binary.
    pub bin: String,
    /// The kubeconfig it uses.
    pub kubeconfig: String,
    /// The namespace of its commands.
    pub ns: String,
}

impl Kubectl {
    /// `kubectl --kubeconfig KUBECONFIG -n NS ARGS...`: its stdout, or its stderr in
    /// the error.
    pub async fn run(&self, args: &[&str]) -> Result<String, String> {
        let out = tokio::process::Command::new(&self.bin)
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

    /// `kubectl patch KIND NAME --type=TYPE -p PATCH EXTRA...`.
    pub async fn patch(
        &self,
        kind: &str,
        name: &str,
        patch_type: &str,
        patch: &serde_json::Value,
        extra: &[&str],
    ) -> Result<String, String> {
        let patch_type = format!("--type={patch_type}");
        let patch = patch.to_string();
        let mut args = vec!["patch", kind, name, &patch_type, "-p", &patch];
        args.extend_from_slice(extra);
        self.run(&args).await
    }
}

/// Removes a run's resources in `ns` (while `operator` runs, so its finalizer
/// removes the workloads; up to 30 s), then terminates the operator and deletes the
/// namespace and the operator's lease. Errors are ignored: this is a tear-down.
pub async fn tear_down(client: &Client, ns: &str, operator: &mut OperatorProc) {
    let crs: Api<Br2kService> = Api::namespaced(client.clone(), ns);
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
    operator.terminate().await;
    let _ = Api::<Namespace>::all(client.clone())
        .delete(ns, &DeleteParams::background())
        .await;
    let _ = Api::<Lease>::namespaced(client.clone(), "br2k-system")
        .delete(&operator.lease, &DeleteParams::default())
        .await;
}
