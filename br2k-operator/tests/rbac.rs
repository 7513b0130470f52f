//! Least privilege in the cluster: `deploy/rbac.yaml` and `deploy/admission-policy.yaml`
//! on the stack's API server (RBAC authorization on). Every write is issued as the
//! operator's ServiceAccount (impersonated, or the operator binary with a token of
//! its own) and every check reads the API server as the admin.
//!
//! Run: `source .stack/env && cargo test -p br2k-operator --test rbac -- --include-ignored`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use br2k_chain::{ChainConfig, ChainRegistry};
use br2k_core::conformance::{sample_record, sample_spec};
use br2k_core::{ImageRef, ImageStore, Registry, Repository, ServiceId, ServiceSpec, ServiceState};
use br2k_k8s::Names;
use br2k_k8s::build::{self, Placement, Rollout};
use br2k_oci::{ImageBuilder, OciImageStore};
use br2k_operator::crd::Br2kService;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::authorization::v1::{SelfSubjectRulesReview, SelfSubjectRulesReviewSpec};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, Toleration};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, Config, ResourceExt};
use serde_json::json;

/// The operator's ServiceAccount as a user name.
const SA: &str = "system:serviceaccount:br2k-system:br2k-operator";

/// Anvil's dev account 6: this file's publisher and the operator's allowed owner.
const KEY6: &str = "0x92db14e403b83dfe3df233f83dfa3a0d7096f21ca9b0d6d6b8d88b2b4ec1564e";

const RBAC: &str = include_str!("../../deploy/rbac.yaml");
const POLICY: &str = include_str!("../../deploy/admission-policy.yaml");

/// One test at a time: each applies the admission policy and removes it at its end.
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

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} not set: source .stack/env"))
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

/// Who refused a write.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    /// RBAC: the account has no such right.
    Rbac,
    /// The admission policy `name` (RBAC allowed the write).
    Policy(&'static str),
}

/// Asserts that `res` is a 403 by `by`; returns the API server's message.
fn refused<T: std::fmt::Debug>(res: Result<T, kube::Error>, by: Refusal, what: &str) -> String {
    let e = match res {
        Ok(v) => panic!("{what}: allowed, but must be refused by {by:?}: {v:?}"),
        Err(kube::Error::Api(e)) => e,
        Err(e) => panic!("{what}: {e}"),
    };
    assert_eq!(e.code, 403, "{what}: {e:?}");
    match by {
        Refusal::Rbac => assert!(
            e.message.contains("cannot") && !e.message.contains("ValidatingAdmissionPolicy"),
            "{what}: not an RBAC refusal: {}",
            e.message
        ),
        Refusal::Policy(name) => assert!(
            e.message
                .contains(&format!("ValidatingAdmissionPolicy '{name}'")),
            "{what}: not refused by policy {name}: {}",
            e.message
        ),
    }
    e.message
}

/// Asserts that `res` succeeded.
fn allowed<T>(res: Result<T, kube::Error>, what: &str) -> T {
    res.unwrap_or_else(|e| panic!("{what}: refused, but the operator needs it: {e}"))
}

fn ssa() -> PatchParams {
    PatchParams::apply("br2k").force()
}

/// The stack with `deploy/` applied, a served namespace (bound like rbac.yaml's
/// `default`) and one the operator does not serve.
struct Cluster {
    admin: Client,
    /// The operator's account (impersonated by the admin).
    op: Client,
    served: String,
    other: String,
    run: String,
}

/// Applies every document of `text` as the admin.
async fn apply_yaml(client: &Client, text: &str) {
    br2k_operator::manifests::apply(client, text, "br2k-rbac-test")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

impl Cluster {
    async fn new() -> Self {
        br2k_k8s::install_crypto_provider();
        let admin = Client::try_default().await.expect("KUBECONFIG");
        apply_yaml(&admin, include_str!("../../deploy/crd.yaml")).await;
        apply_yaml(&admin, RBAC).await;
        // What the cluster-wide version of rbac.yaml left (see its upgrade note).
        let _ = Api::<RoleBinding>::namespaced(admin.clone(), "br2k-system")
            .delete("br2k-operator-credentials", &DeleteParams::default())
            .await;
        let mut cfg = Config::infer().await.expect("config");
        cfg.auth_info.impersonate = Some(SA.into());
        let op = Client::try_from(cfg).expect("impersonating client");
        let run = unique();
        let served = format!("br2k-rbac-{run}");
        let other = format!("br2k-rbac-{run}-other");
        for name in [&served, &other] {
            let obj: Namespace = serde_json::from_value(
                json!({"metadata": {"name": name, "labels": {"br2k.io/test": "true"}}}),
            )
            .unwrap();
            Api::<Namespace>::all(admin.clone())
                .create(&PostParams::default(), &obj)
                .await
                .expect("namespace");
        }
        // The served namespace gets exactly the RoleBindings rbac.yaml gives `default`.
        let mut bound = 0;
        for doc in serde_yaml::Deserializer::from_str(RBAC) {
            let v: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
            if v["kind"] == "RoleBinding" && v["metadata"]["namespace"] == "default" {
                let mut rb: RoleBinding = serde_json::from_value(v).unwrap();
                rb.metadata.namespace = Some(served.clone());
                Api::<RoleBinding>::namespaced(admin.clone(), &served)
                    .create(&PostParams::default(), &rb)
                    .await
                    .expect("role binding");
                bound += 1;
            }
        }
        assert_eq!(
            bound, 2,
            "rbac.yaml binds two roles in the served namespace"
        );
        let c = Self {
            admin,
            op,
            served,
            other,
            run,
        };
        c.apply_policy().await;
        c
    }

    /// Applies the admission policy and waits until the API server enforces it (a
    /// dry-run of an unlabelled ConfigMap by the operator is refused by it).
    async fn apply_policy(&self) {
        apply_yaml(&self.admin, POLICY).await;
        let cms: Api<ConfigMap> = Api::namespaced(self.op.clone(), &self.served);
        let probe: ConfigMap =
            serde_json::from_value(json!({"metadata": {"name": "policy-probe"}})).unwrap();
        let dry = PostParams {
            dry_run: true,
            ..PostParams::default()
        };
        poll(Duration::from_secs(60), "policy enforced", || async {
            match cms.create(&dry, &probe).await {
                Err(kube::Error::Api(e)) if e.message.contains("br2k-operator-managed-only") => {
                    Ok(())
                }
                other => Err(format!("{other:?}")),
            }
        })
        .await;
    }

    /// Removes the namespaces and the admission policy.
    async fn cleanup(&self) {
        for ns in [&self.served, &self.other] {
            let _ = Api::<Namespace>::all(self.admin.clone())
                .delete(ns, &DeleteParams::background())
                .await;
        }
        let text = POLICY;
        for doc in serde_yaml::Deserializer::from_str(text) {
            let v: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
            let kind = v["kind"].as_str().unwrap_or_default().to_lowercase();
            let name = v["metadata"]["name"].as_str().unwrap_or_default();
            let out = Command::new(env("BR2K_KUBECTL_BIN"))
                .args(["delete", &kind, name, "--ignore-not-found"])
                .output()
                .expect("kubectl");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// The rights of the operator's account in `ns`, as (group, resource, verb),
    /// from the API server's own rules review (the review resources themselves and
    /// non-resource URLs left out).
    async fn rights(&self, ns: &str) -> BTreeSet<(String, String, String)> {
        let review = SelfSubjectRulesReview {
            spec: SelfSubjectRulesReviewSpec {
                namespace: Some(ns.to_owned()),
            },
            ..SelfSubjectRulesReview::default()
        };
        let answer = Api::<SelfSubjectRulesReview>::all(self.op.clone())
            .create(&PostParams::default(), &review)
            .await
            .expect("rules review");
        let status = answer.status.expect("status");
        assert!(!status.incomplete, "{status:?}");
        let mut out = BTreeSet::new();
        for rule in status.resource_rules {
            assert!(
                rule.resource_names.as_ref().is_none_or(|n| n.is_empty()),
                "{rule:?}"
            );
            for g in rule.api_groups.iter().flatten() {
                for r in rule.resources.iter().flatten() {
                    if r.starts_with("selfsubject") {
                        continue;
                    }
                    for v in &rule.verbs {
                        out.insert((g.clone(), r.clone(), v.clone()));
                    }
                }
            }
        }
        out
    }
}

fn rights(list: &[(&str, &[&str], &[&str])]) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for (group, resources, verbs) in list {
        for r in *resources {
            for v in *verbs {
                out.insert(((*group).to_owned(), (*r).to_owned(), (*v).to_owned()));
            }
        }
    }
    out
}

const CRUD: &[&str] = &["get", "list", "watch", "create", "patch", "delete"];

/// The rights the operator needs in a namespace it serves (see rbac.yaml): nothing
/// more, nothing less.
fn served_rights() -> BTreeSet<(String, String, String)> {
    rights(&[
        ("", &["nodes"], &["list", "watch"]),
        (
            "br2k.io",
            &["br2kservices"],
            &["get", "list", "watch", "patch"],
        ),
        ("br2k.io", &["br2kservices/status"], &["patch"]),
        ("apps", &["statefulsets"], CRUD),
        ("", &["services", "configmaps"], CRUD),
        ("", &["pods"], &["get", "list", "watch", "patch", "delete"]),
        ("policy", &["poddisruptionbudgets"], CRUD),
        (
            "autoscaling",
            &["horizontalpodautoscalers"],
            &["get", "create", "patch", "delete"],
        ),
        ("events.k8s.io", &["events"], &["create"]),
        ("", &["secrets"], &["get"]),
    ])
}

/// A workload object br2k would make for a sample service in `ns`.
fn sample_sts(ns: &str, id: &str) -> StatefulSet {
    let record = sample_record(
        &ServiceId::new(id).unwrap(),
        sample_spec("registry.test:5000"),
    );
    let placement = Placement {
        tolerations: vec![Toleration {
            key: Some("kwok.x-k8s.io/node".into()),
            operator: Some("Exists".into()),
            ..Toleration::default()
        }],
        ..Placement::default()
    };
    build::stateful_set(
        &record,
        &Names::of(&record.id),
        ns,
        1,
        Rollout::Roll,
        &placement,
    )
}

/// `sts` with `f` applied to its pod template's spec (as JSON).
fn with_pod(sts: &StatefulSet, f: impl FnOnce(&mut serde_json::Value)) -> StatefulSet {
    let mut v = serde_json::to_value(sts).unwrap();
    f(&mut v["spec"]["template"]["spec"]);
    serde_json::from_value(v).unwrap()
}

fn labelled_cm(name: &str, managed: bool) -> ConfigMap {
    let labels = if managed {
        json!({"app.kubernetes.io/managed-by": "br2k"})
    } else {
        json!({"app": "someone-else"})
    };
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name, "labels": labels},
        "data": {"k": "v"},
    }))
    .unwrap()
}

/// Every write the operator must not make is refused by the API server (by RBAC, or
/// by the admission policy where RBAC allows the kind), and the writes it needs
/// succeed. The account's rights are exactly those listed (no extra right).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs stack"]
async fn forbidden_writes_are_refused_and_the_needed_ones_allowed() {
    let _serial = SERIAL.lock().await;
    let c = Cluster::new().await;
    let (ns, other) = (c.served.as_str(), c.other.as_str());

    // Exactly these rights: in a served namespace, and (nodes only) elsewhere.
    assert_eq!(c.rights(ns).await, served_rights(), "rights in {ns}");
    assert_eq!(
        c.rights(other).await,
        rights(&[("", &["nodes"], &["list", "watch"])]),
        "rights in a namespace not served"
    );
    let leases = c.rights("br2k-system").await;
    for verb in ["get", "create", "update"] {
        assert!(leases.contains(&("coordination.k8s.io".into(), "leases".into(), verb.into())));
    }
    assert!(
        !leases.iter().any(|(_, r, _)| r == "secrets"),
        "no Secret in br2k-system: {leases:?}"
    );

    let op_cms: Api<ConfigMap> = Api::namespaced(c.op.clone(), ns);
    let op_stss: Api<StatefulSet> = Api::namespaced(c.op.clone(), ns);
    let admin_cms: Api<ConfigMap> = Api::namespaced(c.admin.clone(), ns);

    // RBAC: kinds and namespaces the operator has no business with.
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "stolen", "labels": {"app.kubernetes.io/managed-by": "br2k"}},
        "stringData": {"k": "v"},
    }))
    .unwrap();
    refused(
        Api::<Secret>::namespaced(c.op.clone(), ns)
            .create(&PostParams::default(), &secret)
            .await,
        Refusal::Rbac,
        "Secret create",
    );
    let sts = sample_sts(ns, &format!("rbac-{}", c.run));
    let deployment: Deployment = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "sneaky", "labels": {"app.kubernetes.io/managed-by": "br2k"}},
        "spec": {
            "selector": sts.spec.as_ref().unwrap().selector,
            "template": sts.spec.as_ref().unwrap().template,
        },
    }))
    .unwrap();
    refused(
        Api::<Deployment>::namespaced(c.op.clone(), ns)
            .create(&PostParams::default(), &deployment)
            .await,
        Refusal::Rbac,
        "Deployment create",
    );
    refused(
        Api::<ConfigMap>::namespaced(c.op.clone(), other)
            .patch(
                "x-config",
                &ssa(),
                &Patch::Apply(&labelled_cm("x-config", true)),
            )
            .await,
        Refusal::Rbac,
        "a managed ConfigMap in a namespace not served",
    );
    refused(
        Api::<StatefulSet>::namespaced(c.op.clone(), other)
            .patch(
                &sts.name_any(),
                &ssa(),
                &Patch::Apply(&sample_sts(other, &format!("rbac-{}", c.run))),
            )
            .await,
        Refusal::Rbac,
        "a StatefulSet in a namespace not served",
    );

    // The policy, where RBAC allows the kind.
    const MANAGED: Refusal = Refusal::Policy("br2k-operator-managed-only");
    const PODS: Refusal = Refusal::Policy("br2k-operator-pod-security");
    let mut unlabelled = sts.clone();
    unlabelled.metadata.labels = None;
    unlabelled.metadata.name = Some("unlabelled".into());
    refused(
        op_stss
            .patch("unlabelled", &ssa(), &Patch::Apply(&unlabelled))
            .await,
        MANAGED,
        "a StatefulSet without the managed label",
    );
    let name = sts.name_any();
    let bad_templates: [(&str, StatefulSet); 7] = [
        (
            "privileged",
            with_pod(&sts, |p| {
                // (The API server itself refuses privileged without escalation.)
                p["containers"][0]["securityContext"]["privileged"] = json!(true);
                p["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = json!(true);
            }),
        ),
        (
            "privilege escalation",
            with_pod(&sts, |p| {
                p["containers"][0]["securityContext"]["allowPrivilegeEscalation"] = json!(true)
            }),
        ),
        (
            "root",
            with_pod(&sts, |p| {
                p["containers"][0]["securityContext"]["runAsNonRoot"] = json!(false)
            }),
        ),
        (
            "an added capability",
            with_pod(&sts, |p| {
                p["containers"][0]["securityContext"]["capabilities"]["add"] = json!(["NET_ADMIN"])
            }),
        ),
        (
            "host network",
            with_pod(&sts, |p| p["hostNetwork"] = json!(true)),
        ),
        ("host PID", with_pod(&sts, |p| p["hostPID"] = json!(true))),
        (
            "a foreign ServiceAccount",
            with_pod(&sts, |p| {
                p["serviceAccountName"] = json!("cluster-admin-sa")
            }),
        ),
    ];
    for (what, bad) in &bad_templates {
        refused(
            op_stss.patch(&name, &ssa(), &Patch::Apply(bad)).await,
            PODS,
            &format!("a pod template with {what}"),
        );
    }
    // A mounted ServiceAccount token.
    refused(
        op_stss
            .patch(
                &name,
                &ssa(),
                &Patch::Apply(&with_pod(&sts, |p| {
                    p["automountServiceAccountToken"] = json!(true)
                })),
            )
            .await,
        PODS,
        "a pod template mounting the token",
    );

    // Someone else's ConfigMap: neither deleted, nor taken over, nor changed.
    allowed(
        admin_cms
            .create(&PostParams::default(), &labelled_cm("theirs", false))
            .await,
        "the admin creates an unlabelled ConfigMap (the policy binds only the operator)",
    );
    refused(
        op_cms.delete("theirs", &DeleteParams::default()).await,
        MANAGED,
        "delete of an unlabelled ConfigMap",
    );
    refused(
        op_cms
            .patch(
                "theirs",
                &PatchParams::default(),
                &Patch::Merge(
                    json!({"metadata": {"labels": {"app.kubernetes.io/managed-by": "br2k"}}}),
                ),
            )
            .await,
        MANAGED,
        "labelling an unlabelled ConfigMap as br2k's",
    );
    refused(
        op_cms
            .patch(
                "theirs",
                &PatchParams::default(),
                &Patch::Merge(json!({"data": {"k": "changed"}})),
            )
            .await,
        MANAGED,
        "a change of an unlabelled ConfigMap",
    );
    assert_eq!(
        admin_cms.get("theirs").await.expect("still there").data,
        Some(BTreeMap::from([("k".to_owned(), "v".to_owned())]))
    );

    // What the operator does: all allowed.
    let cm = allowed(
        op_cms
            .patch(
                "mine-config",
                &ssa(),
                &Patch::Apply(&labelled_cm("mine-config", true)),
            )
            .await,
        "apply a managed ConfigMap",
    );
    refused(
        op_cms
            .patch(
                "mine-config",
                &PatchParams::default(),
                &Patch::Merge(
                    json!({"metadata": {"labels": {"app.kubernetes.io/managed-by": null}}}),
                ),
            )
            .await,
        MANAGED,
        "removing the managed label",
    );
    allowed(
        op_stss.patch(&name, &ssa(), &Patch::Apply(&sts)).await,
        "apply br2k's StatefulSet",
    );
    // Its pod, made by the StatefulSet controller: the pod guard's patch and a
    // replacement's delete.
    let pods: Api<Pod> = Api::namespaced(c.op.clone(), ns);
    let pod_name = format!("{name}-0");
    poll(Duration::from_secs(60), "replica created", || async {
        Api::<Pod>::namespaced(c.admin.clone(), ns)
            .get_opt(&pod_name)
            .await
            .map_err(|e| e.to_string())?
            .map(drop)
            .ok_or_else(|| "no pod yet".to_owned())
    })
    .await;
    let guard = json!({"metadata": {"ownerReferences": [{
        "apiVersion": "v1", "kind": "ConfigMap", "name": "mine-config",
        "uid": cm.metadata.uid,
    }]}});
    allowed(
        pods.patch(&pod_name, &PatchParams::default(), &Patch::Strategic(guard))
            .await,
        "the pod guard's patch of a replica",
    );
    allowed(
        pods.delete(&pod_name, &DeleteParams::default().grace_period(0))
            .await,
        "delete a failed replica",
    );
    let admin_secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "oci-credentials"}, "stringData": {"token": "t"},
    }))
    .unwrap();
    allowed(
        Api::<Secret>::namespaced(c.admin.clone(), ns)
            .create(&PostParams::default(), &admin_secret)
            .await,
        "the admin creates the credential Secret",
    );
    allowed(
        Api::<Secret>::namespaced(c.op.clone(), ns)
            .get("oci-credentials")
            .await,
        "read the credential Secret",
    );
    refused(
        Api::<Secret>::namespaced(c.op.clone(), ns)
            .list(&ListParams::default())
            .await,
        Refusal::Rbac,
        "list Secrets",
    );
    let event: Event = serde_json::from_value(json!({
        "metadata": {"name": format!("rbac-{}", c.run)},
        "eventTime": "2026-01-01T00:00:00.000000Z",
        "reportingController": "br2k.io/operator",
        "reportingInstance": "rbac-test",
        "action": "Recover", "reason": "Recovered", "type": "Normal", "note": "test",
        "regarding": {"apiVersion": "v1", "kind": "ConfigMap", "namespace": ns, "name": "theirs"},
    }))
    .unwrap();
    allowed(
        Api::<Event>::namespaced(c.op.clone(), ns)
            .create(&PostParams::default(), &event)
            .await,
        "publish an Event",
    );
    allowed(
        op_stss.delete(&name, &DeleteParams::background()).await,
        "remove br2k's StatefulSet",
    );
    allowed(
        op_cms.delete("mine-config", &DeleteParams::default()).await,
        "remove br2k's ConfigMap",
    );
    c.cleanup().await;
}

// ------------------------------------------------------------- the operator binary

/// A kubeconfig for the admin's cluster holding only a fresh token of the
/// operator's ServiceAccount; returns its path.
fn operator_kubeconfig(dir: &std::path::Path) -> PathBuf {
    let kubectl = env("BR2K_KUBECTL_BIN");
    let out = Command::new(&kubectl)
        .args([
            "create",
            "token",
            "br2k-operator",
            "-n",
            "br2k-system",
            "--duration=1h",
        ])
        .output()
        .expect("kubectl create token");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let admin = kube::config::Kubeconfig::read_from(env("KUBECONFIG")).expect("KUBECONFIG");
    let ctx_name = admin.current_context.clone().expect("current context");
    let ctx = admin
        .contexts
        .iter()
        .find(|c| c.name == ctx_name)
        .and_then(|c| c.context.clone())
        .expect("context");
    let cluster = admin
        .clusters
        .iter()
        .find(|c| c.name == ctx.cluster)
        .cloned()
        .expect("cluster");
    let text = serde_yaml::to_string(&json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [serde_json::to_value(&cluster).unwrap()],
        "users": [{"name": "br2k-operator", "user": {"token": token}}],
        "contexts": [{"name": "br2k-operator", "context": {
            "cluster": cluster.name, "user": "br2k-operator",
        }}],
        "current-context": "br2k-operator",
    }))
    .unwrap();
    let path = dir.join("operator.kubeconfig");
    std::fs::write(&path, text).expect("write kubeconfig");
    path
}

/// Waits until no other operator holds a fresh lease in `br2k-system` (one serving
/// every namespace would act on this test's resource too).
async fn no_other_operator(client: &Client) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "br2k-system");
    poll(Duration::from_secs(180), "no other operator", || async {
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

/// The operator process; SIGTERMed (it releases its lease) and reaped on drop.
struct Operator {
    child: Option<Child>,
    log: PathBuf,
}

impl Operator {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn tail(&self) -> String {
        let text = self.log();
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

/// The operator binary, authenticated only by a token of its ServiceAccount (so with
/// exactly the rights of rbac.yaml, under the admission policy) and serving one
/// namespace: it deploys a service registered on the stack's anvil, guards its
/// replicas, restores a deleted StatefulSet and removes the workload with the
/// resource; its log shows no refused request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs stack"]
async fn the_operator_binary_works_with_exactly_these_rights() {
    let _serial = SERIAL.lock().await;
    let c = Cluster::new().await;
    let ns = c.served.clone();
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = operator_kubeconfig(dir.path());

    // The service: an image in both registries, a record on the stack's anvil.
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
    let image = ImageBuilder::new()
        .file("/opt/rbac/run.txt", c.run.clone().into_bytes(), 0o644)
        .and_then(|b| {
            b.file(
                "/usr/local/bin/app",
                b"#!/bin/sh\nsleep 1d\n".to_vec(),
                0o755,
            )
        })
        .map(|b| b.entrypoint(["/usr/local/bin/app"]))
        .and_then(|b| b.build())
        .expect("image");
    let repo = Repository::new(format!("br2k-rbac/app-{}", c.run)).unwrap();
    for r in &registries {
        OciImageStore::insecure(r)
            .expect("store")
            .push(&repo, &image, Some("1.0"))
            .await
            .expect("push");
    }
    let image = ImageRef::new(&registries[0], repo, Some("1.0"), Some(image.digest)).unwrap();
    let chain =
        ChainRegistry::deploy(ChainConfig::new(vec![rpc.parse().unwrap()]).with_private_key(KEY6))
            .await
            .expect("deploy the operator's registry contract");
    let id = ServiceId::new(format!("rbac-{}", c.run)).unwrap();
    let spec = ServiceSpec::new(image, 2).expect("spec");
    chain.register(&id, &spec).await.expect("register");
    chain
        .set_state(&id, ServiceState::Running)
        .await
        .expect("start");

    no_other_operator(&c.admin).await;
    let log = dir.path().join("operator.log");
    let out = std::fs::File::create(&log).expect("log");
    let err = out.try_clone().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let identity = format!("rbac-{}", c.run);
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
        &chain.chain_id().to_string(),
        "--rpc-url",
        &rpc,
        "--registry-contract",
        &chain.address().to_string(),
        "--allowed-owner",
        &chain.account().to_string(),
        "--watch-namespace",
        &ns,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for r in &registries {
        args.extend(["--oci-registry".to_owned(), r.clone()]);
    }
    let child = Command::new(env!("CARGO_BIN_EXE_br2k-operator"))
        .args(&args)
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "info,br2k_k8s=debug")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .expect("spawn the operator");
    let mut op = Operator {
        child: Some(child),
        log,
    };
    let leases: Api<Lease> = Api::namespaced(c.admin.clone(), "br2k-system");
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

    let crs: Api<Br2kService> = Api::namespaced(c.admin.clone(), &ns);
    let cr: Br2kService = serde_json::from_value(json!({
        "apiVersion": "br2k.io/v1alpha1", "kind": "Br2kService",
        "metadata": {"name": "svc"},
        "spec": {"serviceId": id.as_str()},
    }))
    .unwrap();
    crs.create(&PostParams::default(), &cr)
        .await
        .expect("create Br2kService");

    // Read as the admin: the StatefulSet, its replicas guarded by the ConfigMap.
    let names = Names::of(&id);
    let stss: Api<StatefulSet> = Api::namespaced(c.admin.clone(), &ns);
    let pods: Api<Pod> = Api::namespaced(c.admin.clone(), &ns);
    let selector = ListParams::default().labels(&format!("br2k.io/service-id={id}"));
    let deployed = || async {
        let sts = stss
            .get_opt(&names.base)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("no StatefulSet yet\n{}", op.tail()))?;
        let ready = sts.status.as_ref().and_then(|s| s.ready_replicas);
        if ready != Some(2) {
            return Err(format!("ready {ready:?}"));
        }
        let list = pods.list(&selector).await.map_err(|e| e.to_string())?;
        let guarded = list
            .items
            .iter()
            .filter(|p| {
                p.owner_references()
                    .iter()
                    .any(|o| o.kind == "ConfigMap" && o.name == names.config)
            })
            .count();
        if guarded != 2 {
            return Err(format!("{guarded} of {} pods guarded", list.items.len()));
        }
        Ok(sts.metadata.uid.unwrap_or_default())
    };
    let first = poll(Duration::from_secs(120), "deployed and guarded", deployed).await;
    let healthy = || async {
        let o = crs.get("svc").await.map_err(|e| e.to_string())?;
        let phase = o.status.and_then(|s| s.phase);
        if phase.as_deref() == Some("Healthy") {
            Ok(())
        } else {
            Err(format!("phase {phase:?}\n{}", op.tail()))
        }
    };
    poll(Duration::from_secs(60), "resource Healthy", healthy).await;

    // A deleted StatefulSet is restored (a new one, adopting the guarded replicas).
    stss.delete(&names.base, &DeleteParams::background())
        .await
        .expect("delete the StatefulSet");
    let second = poll(Duration::from_secs(120), "restored", || async {
        let uid = deployed().await?;
        if uid == first {
            Err("the deleted StatefulSet is still there".into())
        } else {
            Ok(uid)
        }
    })
    .await;
    assert_ne!(first, second);

    // The resource's removal removes the workload (the finalizer, by the operator).
    crs.delete("svc", &DeleteParams::default())
        .await
        .expect("delete the resource");
    poll(Duration::from_secs(60), "workload removed", || async {
        let cms: Api<ConfigMap> = Api::namespaced(c.admin.clone(), &ns);
        let left = (
            crs.get_opt("svc")
                .await
                .map_err(|e| e.to_string())?
                .is_some(),
            stss.get_opt(&names.base)
                .await
                .map_err(|e| e.to_string())?
                .is_some(),
            cms.get_opt(&names.config)
                .await
                .map_err(|e| e.to_string())?
                .is_some(),
        );
        if left == (false, false, false) {
            Ok(())
        } else {
            Err(format!("(resource, StatefulSet, ConfigMap) left: {left:?}"))
        }
    })
    .await;
    op.stop();
    let text = op.log();
    for needle in ["forbidden", "Forbidden", "may not"] {
        assert!(
            !text.contains(needle),
            "the operator was refused a request ({needle}):\n{}",
            text.lines()
                .filter(|l| l.contains(needle))
                .take(5)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let _ = leases.delete(&identity, &DeleteParams::default()).await;
    c.cleanup().await;
}
