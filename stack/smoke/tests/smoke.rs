//! Smoke tests proving every component of the local stack is real.
//!
//! They read the variables that `scripts/stack up` writes to `$BR2K_STACK_DIR/env`
//! (`KUBECONFIG`, `BR2K_RPC_URLS`, `BR2K_OCI_REGISTRIES`, `BR2K_ETCD_ENDPOINTS`) and are
//! `#[ignore]`d so that a plain `cargo test` needs no stack. The Kubernetes tests use only
//! the standard API, so they also run against a kind cluster (`KUBECONFIG=...`); the node
//! test expects `BR2K_EXPECTED_READY_NODES` (default 3) Ready nodes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use alloy::network::TransactionBuilder;
use alloy::primitives::{U256, address};
use alloy::providers::{Provider, ProviderBuilder};
use alloy::rpc::types::TransactionRequest;
use alloy::signers::local::PrivateKeySigner;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod};
use kube::Client;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use sha2::{Digest, Sha256};

/// Anvil's well-known first development key (account 0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266).
const ANVIL_KEY_0: &str = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run `scripts/stack up` and `. \"$BR2K_STACK_DIR/env\"` (default .stack/env) first")
    })
}

fn env_list(name: &str) -> Vec<String> {
    let list: Vec<String> = env(name)
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    assert!(!list.is_empty(), "{name} is empty");
    list
}

async fn kube_client() -> Client {
    // Fail with a clear message rather than falling back to another kubeconfig.
    let _ = env("KUBECONFIG");
    Client::try_default()
        .await
        .expect("kube client from KUBECONFIG")
}

fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .subsec_nanos();
    format!("{prefix}-{}-{nanos:x}", std::process::id())
}

/// A uniquely named namespace per test; `delete` removes it at the end of a passing test
/// (a failing test leaves it for inspection).
struct TestNamespace {
    client: Client,
    name: String,
}

impl TestNamespace {
    async fn create(client: &Client, prefix: &str) -> Self {
        let name = unique(prefix);
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": { "name": name, "labels": { "br2k.dev/smoke": "true" } }
        }))
        .expect("namespace json");
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("create namespace");
        Self {
            client: client.clone(),
            name,
        }
    }

    async fn delete(self) {
        Api::<Namespace>::all(self.client)
            .delete(&self.name, &DeleteParams::background())
            .await
            .expect("delete namespace");
    }
}

async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool, String>>,
{
    let start = Instant::now();
    let mut last = String::new();
    loop {
        match check().await {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => last = e,
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what} (last error: {last})"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn is_ready(conditions: Option<&Vec<k8s_openapi::api::core::v1::PodCondition>>) -> bool {
    conditions
        .map(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        .unwrap_or(false)
}

fn deployment(name: &str, replicas: i32) -> Deployment {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": { "name": name },
        "spec": {
            "replicas": replicas,
            "selector": { "matchLabels": { "app": name } },
            "template": {
                "metadata": { "labels": { "app": name } },
                "spec": {
                    "containers": [{ "name": "pause", "image": "registry.k8s.io/pause:3.10" }],
                    "terminationGracePeriodSeconds": 0
                }
            }
        }
    }))
    .expect("deployment json")
}

async fn ready_pods(pods: &Api<Pod>, app: &str) -> Result<Vec<Pod>, String> {
    let list = pods
        .list(&ListParams::default().labels(&format!("app={app}")))
        .await
        .map_err(|e| e.to_string())?;
    Ok(list
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| is_ready(p.status.as_ref().and_then(|s| s.conditions.as_ref())))
        .collect())
}

async fn wait_deployment_ready(deploys: &Api<Deployment>, name: &str, replicas: i32) {
    wait_until(
        &format!("deployment {name} {replicas}/{replicas} ready"),
        Duration::from_secs(120),
        || async {
            let d = deploys.get(name).await.map_err(|e| e.to_string())?;
            let s = d.status.unwrap_or_default();
            Ok(s.ready_replicas == Some(replicas)
                && s.updated_replicas == Some(replicas)
                && s.available_replicas == Some(replicas))
        },
    )
    .await;
}

#[tokio::test]
#[ignore = "needs stack"]
async fn kube_lists_ready_nodes() {
    let expected: usize = std::env::var("BR2K_EXPECTED_READY_NODES")
        .ok()
        .map(|v| v.parse().expect("BR2K_EXPECTED_READY_NODES is a number"))
        .unwrap_or(3);
    let client = kube_client().await;
    let nodes = Api::<Node>::all(client);
    wait_until(
        &format!("{expected} Ready nodes"),
        Duration::from_secs(60),
        || async {
            let list = nodes
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?;
            let ready = list
                .items
                .iter()
                .filter(|n| {
                    n.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .map(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
                        .unwrap_or(false)
                })
                .count();
            Ok(ready >= expected)
        },
    )
    .await;
}

#[tokio::test]
#[ignore = "needs stack"]
async fn kube_deployment_ready_and_pod_replaced() {
    let client = kube_client().await;
    let ns = TestNamespace::create(&client, "br2k-smoke-deploy").await;
    let deploys = Api::<Deployment>::namespaced(client.clone(), &ns.name);
    let pods = Api::<Pod>::namespaced(client.clone(), &ns.name);
    let name = "smoke";
    deploys
        .create(&PostParams::default(), &deployment(name, 3))
        .await
        .expect("create deployment");
    wait_deployment_ready(&deploys, name, 3).await;

    let before = ready_pods(&pods, name).await.expect("list pods");
    assert_eq!(before.len(), 3, "3 ready pods before deletion");
    let victim = before[0].metadata.name.clone().expect("pod name");
    let victim_uid = before[0].metadata.uid.clone().expect("pod uid");
    pods.delete(&victim, &DeleteParams::default())
        .await
        .expect("delete pod");

    wait_until(
        "a replacement pod and 3/3 ready again",
        Duration::from_secs(120),
        || async {
            let now = ready_pods(&pods, name).await?;
            let replaced = now
                .iter()
                .all(|p| p.metadata.uid.as_deref() != Some(&victim_uid));
            Ok(now.len() == 3 && replaced)
        },
    )
    .await;
    wait_deployment_ready(&deploys, name, 3).await;
    ns.delete().await;
}

#[tokio::test]
#[ignore = "needs stack"]
async fn kube_server_side_apply_and_watch() {
    let client = kube_client().await;
    let ns = TestNamespace::create(&client, "br2k-smoke-ssa").await;
    let cms = Api::<ConfigMap>::namespaced(client.clone(), &ns.name);
    let name = "smoke-config";

    let rv = cms
        .list(&ListParams::default())
        .await
        .expect("list configmaps")
        .metadata
        .resource_version
        .expect("list resourceVersion");
    let wp = WatchParams::default()
        .fields(&format!("metadata.name={name}"))
        .timeout(60);
    let mut stream = cms.watch(&wp, &rv).await.expect("watch").boxed();

    let apply = |value: &str| {
        let mut data = BTreeMap::new();
        data.insert("key".to_string(), value.to_string());
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": { "name": name },
            "data": data,
        })
    };
    let pp = PatchParams::apply("br2k-smoke").force();
    let first = cms
        .patch(name, &pp, &Patch::Apply(apply("one")))
        .await
        .expect("server-side apply (create)");
    let managers: Vec<String> = first
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter_map(|m| m.manager)
        .collect();
    assert!(
        managers.iter().any(|m| m == "br2k-smoke"),
        "field manager recorded, got {managers:?}"
    );
    let second = cms
        .patch(name, &pp, &Patch::Apply(apply("two")))
        .await
        .expect("server-side apply (update)");
    assert_eq!(
        second
            .data
            .unwrap_or_default()
            .get("key")
            .map(String::as_str),
        Some("two")
    );

    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen != ["one", "two"] {
        let ev = tokio::time::timeout_at(deadline, stream.next())
            .await
            .unwrap_or_else(|_| panic!("watch events timed out; seen {seen:?}"))
            .expect("watch stream ended")
            .expect("watch event");
        match ev {
            WatchEvent::Added(cm) | WatchEvent::Modified(cm) => {
                let v = cm
                    .data
                    .unwrap_or_default()
                    .get("key")
                    .cloned()
                    .unwrap_or_default();
                if seen.last() != Some(&v) {
                    seen.push(v);
                }
            }
            WatchEvent::Bookmark(_) => {}
            other => panic!("unexpected watch event {other:?}"),
        }
    }
    ns.delete().await;
}

#[tokio::test]
#[ignore = "needs stack"]
async fn anvil_chain_id_and_transaction() {
    for url in env_list("BR2K_RPC_URLS") {
        let signer: PrivateKeySigner = ANVIL_KEY_0.parse().expect("anvil key");
        let from = signer.address();
        assert_eq!(from, address!("0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"));
        let provider = ProviderBuilder::new()
            .wallet(signer)
            .connect_http(url.parse().expect("rpc url"));
        let chain_id = provider.get_chain_id().await.expect("eth_chainId");
        assert_eq!(chain_id, 31337, "{url} chain id");

        let to = address!("0x70997970C51812dc3A010C7d01b50e0d17dc79C8");
        let balance_before = provider.get_balance(to).await.expect("balance");
        let tx = TransactionRequest::default()
            .with_from(from)
            .with_to(to)
            .with_value(U256::from(12_345u64));
        let receipt = provider
            .send_transaction(tx)
            .await
            .expect("send transaction")
            .get_receipt()
            .await
            .expect("receipt");
        assert!(receipt.status(), "transaction succeeded on {url}");
        assert!(receipt.block_number.is_some(), "transaction mined on {url}");
        let balance_after = provider.get_balance(to).await.expect("balance");
        assert_eq!(balance_after, balance_before + U256::from(12_345u64));
    }
}

#[tokio::test]
#[ignore = "needs stack"]
async fn registries_answer_and_accept_a_blob() {
    let registries = env_list("BR2K_OCI_REGISTRIES");
    assert!(
        registries.len() >= 2,
        "primary and mirror registries expected"
    );
    let http = reqwest::Client::new();
    for reg in registries {
        let base = format!("http://{reg}");
        let v2 = http
            .get(format!("{base}/v2/"))
            .send()
            .await
            .expect("GET /v2/");
        assert_eq!(v2.status(), reqwest::StatusCode::OK, "{reg} /v2/");

        let blob = format!("br2k smoke blob for {reg} {}", unique("b")).into_bytes();
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(&blob)));
        let repo = "br2k-smoke/blob";
        let started = http
            .post(format!("{base}/v2/{repo}/blobs/uploads/"))
            .send()
            .await
            .expect("POST upload");
        assert_eq!(
            started.status(),
            reqwest::StatusCode::ACCEPTED,
            "{reg} upload start"
        );
        let location = started
            .headers()
            .get("location")
            .expect("Location header")
            .to_str()
            .expect("ascii Location")
            .to_string();
        let location = if location.starts_with("http") {
            location
        } else {
            format!("{base}{location}")
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let put = http
            .put(format!("{location}{sep}digest={digest}"))
            .header("content-type", "application/octet-stream")
            .body(blob.clone())
            .send()
            .await
            .expect("PUT blob");
        assert_eq!(
            put.status(),
            reqwest::StatusCode::CREATED,
            "{reg} upload finish"
        );

        let got = http
            .get(format!("{base}/v2/{repo}/blobs/{digest}"))
            .send()
            .await
            .expect("GET blob");
        assert_eq!(got.status(), reqwest::StatusCode::OK, "{reg} blob readable");
        assert_eq!(
            got.bytes().await.expect("blob body").as_ref(),
            blob.as_slice()
        );
    }
}

#[tokio::test]
#[ignore = "needs stack"]
async fn etcd_put_get_on_every_member() {
    let endpoints = env_list("BR2K_ETCD_ENDPOINTS");
    assert_eq!(endpoints.len(), 3, "a 3-member etcd cluster");
    let prefix = unique("br2k-smoke");
    // Write through each member...
    for (i, ep) in endpoints.iter().enumerate() {
        let mut c = etcd_client::Client::connect([ep.as_str()], None)
            .await
            .unwrap_or_else(|e| panic!("connect {ep}: {e}"));
        c.put(format!("{prefix}/{i}"), format!("value-{i}"), None)
            .await
            .unwrap_or_else(|e| panic!("put via {ep}: {e}"));
    }
    // ...and read every key back through each member (linearizable reads).
    for ep in &endpoints {
        let mut c = etcd_client::Client::connect([ep.as_str()], None)
            .await
            .unwrap_or_else(|e| panic!("connect {ep}: {e}"));
        let members = c.member_list().await.expect("member list");
        assert_eq!(members.members().len(), 3, "{ep} sees 3 members");
        for i in 0..endpoints.len() {
            let resp = c
                .get(format!("{prefix}/{i}"), None)
                .await
                .unwrap_or_else(|e| panic!("get via {ep}: {e}"));
            let kv = resp
                .kvs()
                .first()
                .unwrap_or_else(|| panic!("{prefix}/{i} missing on {ep}"));
            assert_eq!(kv.value_str().expect("utf8"), format!("value-{i}"));
        }
    }
    let mut c = etcd_client::Client::connect([endpoints[0].as_str()], None)
        .await
        .expect("connect");
    c.delete(
        prefix.clone(),
        Some(etcd_client::DeleteOptions::new().with_prefix()),
    )
    .await
    .expect("cleanup");
}
