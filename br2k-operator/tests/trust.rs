//! Trust anchors come from the operator, not from the resource: the operator binary
//! as its own process against the stack's anvil, registries and API server; every
//! check reads the API server independently of the operator.
//!
//! Run: `source .stack/env && cargo test -p br2k-operator --test trust -- --ignored`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use br2k_chain::{ChainConfig, ChainRegistry};
use br2k_core::{ImageRef, ImageStore, Registry, Repository, ServiceId, ServiceSpec, ServiceState};
use br2k_k8s::Names;
use br2k_oci::{ImageBuilder, OciImageStore};
use br2k_operator::crd::Br2kService;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;

/// Anvil's dev account 5 (this test's publisher and the operator's allowed owner).
const KEY5: &str = "0x8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba";

/// One operator at a time across this file's tests.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn unique() -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{:x}",
        (n as u64 ^ u64::from(std::process::id())) & 0xff_ffff
    )
}

async fn poll<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        match check().await {
            Ok(v) => return v,
            Err(e) if start.elapsed() > timeout => {
                panic!("{what}: not reached in {timeout:?}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} not set: source .stack/env"))
}

/// What every test shares: the chain, the operator's contract, the image.
struct Fixture {
    client: Client,
    rpc: String,
    registries: Vec<String>,
    chain: ChainRegistry,
    image: ImageRef,
    run: String,
    namespaces: Vec<String>,
}

/// Registers `id` with `env` on `chain` and starts it (retried: account 5 may be
/// busy with another write of this process).
async fn register(chain: &ChainRegistry, id: &ServiceId, image: &ImageRef, env: &[(&str, &str)]) {
    let mut spec = ServiceSpec::new(image.clone(), 1).expect("spec");
    spec.env = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect::<BTreeMap<_, _>>();
    let mut last = String::new();
    for _ in 0..3 {
        if chain.active(id).await.is_err()
            && let Err(e) = chain.register(id, &spec).await
        {
            last = e.to_string();
            tokio::time::sleep(Duration::from_millis(300)).await;
            continue;
        }
        match chain.set_state(id, ServiceState::Running).await {
            Ok(_) => return,
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    panic!("register {id}: {last}");
}

impl Fixture {
    async fn new() -> Self {
        br2k_k8s::install_crypto_provider();
        let client = Client::try_default().await.expect("KUBECONFIG");
        let rpc = env("BR2K_RPC_URLS")
            .split(',')
            .next()
            .unwrap()
            .trim()
            .to_owned();
        let registries: Vec<String> = env("BR2K_OCI_REGISTRIES")
            .split(',')
            .map(|s| s.trim().to_owned())
            .collect();
        let run = unique();
        let image = ImageBuilder::new()
            .file("/opt/trust/run.txt", run.clone().into_bytes(), 0o644)
            .and_then(|b| {
                b.file(
                    "/usr/local/bin/app",
                    b"#!/bin/sh\nexec sleep infinity\n".to_vec(),
                    0o755,
                )
            })
            .map(|b| b.entrypoint(["/usr/local/bin/app"]))
            .and_then(|b| b.build())
            .expect("image");
        let repo = Repository::new(format!("br2k-trust/app-{run}")).unwrap();
        for r in &registries {
            let store = OciImageStore::insecure(r).expect("store");
            store.push(&repo, &image, Some("1.0")).await.expect("push");
        }
        let image = ImageRef::new(&registries[0], repo, Some("1.0"), Some(image.digest)).unwrap();
        let chain = ChainRegistry::deploy(
            ChainConfig::new(vec![rpc.parse().unwrap()]).with_private_key(KEY5),
        )
        .await
        .expect("deploy the operator's registry contract");
        for (name, text) in [
            ("crd.yaml", include_str!("../../deploy/crd.yaml")),
            ("rbac.yaml", include_str!("../../deploy/rbac.yaml")),
        ] {
            br2k_operator::manifests::apply(&client, text, "br2k-trust-test")
                .await
                .unwrap_or_else(|e| panic!("apply {name}: {e}"));
        }
        let probe: Api<Br2kService> = Api::all(client.clone());
        poll(Duration::from_secs(30), "CRD served", || async {
            probe
                .list(&ListParams::default().limit(1))
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        })
        .await;
        Self {
            client,
            rpc,
            registries,
            chain,
            image,
            run,
            namespaces: Vec::new(),
        }
    }

    async fn namespace(&mut self, suffix: &str) -> String {
        let name = format!("br2k-trust-{}-{suffix}", self.run);
        let obj: Namespace = serde_json::from_value(
            json!({"metadata": {"name": name, "labels": {"br2k.io/test": "true"}}}),
        )
        .unwrap();
        Api::<Namespace>::all(self.client.clone())
            .create(&PostParams::default(), &obj)
            .await
            .expect("namespace");
        self.namespaces.push(name.clone());
        name
    }

    /// A resource written as raw JSON (possibly with fields of the old schema).
    async fn create_raw(&self, ns: &str, name: &str, spec: serde_json::Value) {
        let ar = ApiResource::erase::<Br2kService>(&());
        let obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "br2k.io/v1alpha1",
            "kind": "Br2kService",
            "metadata": {"name": name, "namespace": ns},
            "spec": spec,
        }))
        .unwrap();
        Api::<DynamicObject>::namespaced_with(self.client.clone(), ns, &ar)
            .create(&PostParams::default(), &obj)
            .await
            .expect("create Br2kService");
    }

    /// The operator binary with this fixture's anchors plus `extra`.
    async fn operator(&self, tag: &str, extra: &[&str]) -> Operator {
        no_other_operator(&self.client).await;
        let log = std::env::temp_dir().join(format!("br2k-trust-{}-{tag}.log", self.run));
        let out = std::fs::File::create(&log).expect("log");
        let err = out.try_clone().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let identity = format!("trust-{}-{tag}", self.run);
        let mut args: Vec<String> = [
            "--metrics-addr",
            &format!("127.0.0.1:{port}"),
            "--lease-namespace",
            "br2k-system",
            "--lease-name",
            &identity,
            "--identity",
            &identity,
            "--lease-seconds",
            "4",
            "--resync-seconds",
            "2",
            "--insecure-loopback-registries",
            "--chain-id",
            &self.chain.chain_id().to_string(),
            "--rpc-url",
            &self.rpc,
            "--registry-contract",
            &self.chain.address().to_string(),
            "--allowed-owner",
            &self.chain.account().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for r in &self.registries {
            args.extend(["--oci-registry".to_owned(), r.clone()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Command::new(env!("CARGO_BIN_EXE_br2k-operator"))
            .args(&args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("spawn the operator");
        let op = Operator {
            child: Some(child),
            log,
        };
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), "br2k-system");
        poll(Duration::from_secs(30), "the operator leads", || async {
            let holder = leases
                .get_opt(&identity)
                .await
                .map_err(|e| e.to_string())?
                .and_then(|l| l.spec?.holder_identity);
            if holder.as_deref() == Some(identity.as_str()) {
                Ok(())
            } else {
                Err(format!("{holder:?}\n{}", op.tail()))
            }
        })
        .await;
        op
    }

    async fn sts(&self, ns: &str, id: &ServiceId) -> Option<StatefulSet> {
        Api::<StatefulSet>::namespaced(self.client.clone(), ns)
            .get_opt(&Names::of(id).base)
            .await
            .expect("read StatefulSet")
    }

    /// The value of `key` in the environment ConfigMap the operator applied for `id`.
    async fn env_value(&self, ns: &str, id: &ServiceId, key: &str) -> Result<String, String> {
        let cm = Api::<ConfigMap>::namespaced(self.client.clone(), ns)
            .get_opt(&Names::of(id).config)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("no ConfigMap yet")?;
        if self.sts(ns, id).await.is_none() {
            return Err("no StatefulSet yet".into());
        }
        cm.data
            .unwrap_or_default()
            .get(key)
            .cloned()
            .ok_or_else(|| format!("no {key} in the ConfigMap"))
    }

    async fn condition(&self, ns: &str, name: &str, type_: &str) -> Option<(String, String)> {
        let o = Api::<Br2kService>::namespaced(self.client.clone(), ns)
            .get(name)
            .await
            .ok()?;
        o.status?
            .conditions
            .into_iter()
            .find(|c| c.type_ == type_)
            .map(|c| (c.status, c.reason))
    }

    /// Deletes `name` in `ns` and waits until it is gone (its finalizer done).
    async fn delete(&self, ns: &str, name: &str) {
        let api = Api::<Br2kService>::namespaced(self.client.clone(), ns);
        let _ = api.delete(name, &DeleteParams::default()).await;
        poll(Duration::from_secs(60), "resource removed", || async {
            match api.get_opt(name).await.map_err(|e| e.to_string())? {
                None => Ok(()),
                Some(o) => Err(format!("finalizers {:?}", o.finalizers())),
            }
        })
        .await;
    }

    async fn cleanup(&self) {
        for ns in &self.namespaces {
            let _ = Api::<Namespace>::all(self.client.clone())
                .delete(ns, &DeleteParams::background())
                .await;
        }
    }
}

/// Waits until no other operator holds a fresh lease in `br2k-system` (an operator
/// serving every namespace would act on this test's resources too).
async fn no_other_operator(client: &Client) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "br2k-system");
    poll(Duration::from_secs(120), "no other operator", || async {
        let now = k8s_openapi::jiff::Timestamp::now().as_millisecond();
        let active: Vec<String> = leases
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?
            .items
            .into_iter()
            .filter_map(|l| {
                let spec = l.spec?;
                spec.holder_identity.filter(|h| !h.is_empty())?;
                let renewed = spec.renew_time?.0.as_millisecond();
                let ttl = i64::from(spec.lease_duration_seconds.unwrap_or(15)) * 1000;
                (now - renewed <= ttl + 2000).then(|| l.metadata.name.unwrap_or_default())
            })
            .collect();
        if active.is_empty() {
            Ok(())
        } else {
            Err(active.join(", "))
        }
    })
    .await;
}

/// The operator process, SIGTERMed (it releases its lease) and reaped on drop.
struct Operator {
    child: Option<Child>,
    log: PathBuf,
}

impl Operator {
    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(c.id().to_string())
                .status();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(10) {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A resource carrying the old `registryContract`/`rpcEndpoints`/`ociRegistries`
/// fields, pointing at another contract with another record for the same id: the
/// API server prunes them and the operator deploys the record of its own contract.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs stack"]
async fn old_anchor_fields_in_a_resource_do_not_choose_the_contract() {
    let _serial = SERIAL.lock().await;
    let mut f = Fixture::new().await;
    let ns = f.namespace("old").await;
    let id = ServiceId::new(format!("trust-{}", f.run)).unwrap();
    register(&f.chain, &id, &f.image, &[("MARK", "operator")]).await;
    // The attacker's contract: the same id, another record.
    let other = ChainRegistry::deploy(
        ChainConfig::new(vec![f.rpc.parse().unwrap()]).with_private_key(KEY5),
    )
    .await
    .expect("deploy a second contract");
    register(&other, &id, &f.image, &[("MARK", "attacker")]).await;
    assert_ne!(other.address(), f.chain.address());
    f.create_raw(
        &ns,
        "svc",
        json!({
            "serviceId": id.as_str(),
            "registryContract": other.address().to_string(),
            "rpcEndpoints": [f.rpc],
            "ociRegistries": f.registries,
        }),
    )
    .await;
    // The stored resource holds none of the old fields.
    let ar = ApiResource::erase::<Br2kService>(&());
    let stored = Api::<DynamicObject>::namespaced_with(f.client.clone(), &ns, &ar)
        .get("svc")
        .await
        .expect("read back");
    for field in ["registryContract", "rpcEndpoints", "ociRegistries"] {
        assert!(
            stored.data["spec"].get(field).is_none(),
            "{field} kept: {:?}",
            stored.data
        );
    }
    let op = f.operator("old", &["--watch-namespace", &ns]).await;
    let mark = poll(Duration::from_secs(90), "deployed", || async {
        f.env_value(&ns, &id, "MARK")
            .await
            .map_err(|e| format!("{e}\n{}", op.tail()))
    })
    .await;
    assert_eq!(mark, "operator", "the resource chose the contract");
    f.delete(&ns, "svc").await;
    drop(op);
    f.cleanup().await;
}

/// A resource naming a workload namespace other than its own: refused with
/// `Valid=False/NamespaceNotAllowed` and nothing applied in either namespace; once
/// the operator's configuration allows that namespace, it deploys there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs stack"]
async fn a_target_namespace_needs_the_operators_permission() {
    let _serial = SERIAL.lock().await;
    let mut f = Fixture::new().await;
    let home = f.namespace("home").await;
    let target = f.namespace("target").await;
    let id = ServiceId::new(format!("trust-{}", f.run)).unwrap();
    register(&f.chain, &id, &f.image, &[("MARK", "operator")]).await;
    f.create_raw(
        &home,
        "svc",
        json!({"serviceId": id.as_str(), "namespace": target}),
    )
    .await;
    let mut op = f.operator("ns1", &["--watch-namespace", &home]).await;
    poll(Duration::from_secs(60), "refused", || async {
        match f.condition(&home, "svc", "Valid").await {
            Some((s, r)) if s == "False" && r == "NamespaceNotAllowed" => Ok(()),
            other => Err(format!("{other:?}\n{}", op.tail())),
        }
    })
    .await;
    for ns in [&home, &target] {
        assert!(f.sts(ns, &id).await.is_none(), "a StatefulSet in {ns}");
        let cms = Api::<ConfigMap>::namespaced(f.client.clone(), ns)
            .get_opt(&Names::of(&id).config)
            .await
            .unwrap();
        assert!(cms.is_none(), "a ConfigMap in {ns}");
    }
    op.stop();
    let op = f
        .operator(
            "ns2",
            &[
                "--watch-namespace",
                &home,
                "--allow-target-namespace",
                &target,
            ],
        )
        .await;
    let mark = poll(
        Duration::from_secs(90),
        "deployed in the target",
        || async {
            f.env_value(&target, &id, "MARK")
                .await
                .map_err(|e| format!("{e}\n{}", op.tail()))
        },
    )
    .await;
    assert_eq!(mark, "operator");
    assert!(f.sts(&home, &id).await.is_none());
    f.delete(&home, "svc").await;
    drop(op);
    f.cleanup().await;
}

/// With `--watch-namespace a`, a resource in namespace b is not touched: no
/// finalizer, no status, no workload, while the one in a deploys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs stack"]
async fn watch_namespace_limits_what_the_operator_touches() {
    let _serial = SERIAL.lock().await;
    let mut f = Fixture::new().await;
    let a = f.namespace("a").await;
    let b = f.namespace("b").await;
    let id_a = ServiceId::new(format!("trust-{}-a", f.run)).unwrap();
    let id_b = ServiceId::new(format!("trust-{}-b", f.run)).unwrap();
    register(&f.chain, &id_a, &f.image, &[("MARK", "a")]).await;
    register(&f.chain, &id_b, &f.image, &[("MARK", "b")]).await;
    // b's resource exists before a's and before the operator starts.
    f.create_raw(&b, "svc", json!({"serviceId": id_b.as_str()}))
        .await;
    f.create_raw(&a, "svc", json!({"serviceId": id_a.as_str()}))
        .await;
    let op = f.operator("watch", &["--watch-namespace", &a]).await;
    poll(Duration::from_secs(90), "a deployed and Ready", || async {
        match f.condition(&a, "svc", "Ready").await {
            Some((s, _)) if s == "True" => Ok(()),
            other => Err(format!("{other:?}\n{}", op.tail())),
        }
    })
    .await;
    let untouched = Api::<Br2kService>::namespaced(f.client.clone(), &b)
        .get("svc")
        .await
        .expect("b's resource");
    assert!(
        untouched.finalizers().is_empty(),
        "{:?}",
        untouched.finalizers()
    );
    assert!(untouched.status.is_none(), "{:?}", untouched.status);
    assert!(f.sts(&b, &id_b).await.is_none());
    f.delete(&a, "svc").await;
    drop(op);
    f.cleanup().await;
}
