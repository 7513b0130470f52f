//! The operator on the real control plane, with exactly the RBAC of `deploy/`
//! (impersonating its ServiceAccount): two replicas, one leads and recovers drift,
//! the other stays passive until the first stops; bad resources get clear status
//! conditions and a per-object backoff.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use br2k_core::conformance::{sample_image, sample_spec};
use br2k_core::memory::{InMemoryImageStore, InMemoryRegistry};
use br2k_core::supervisor::Supervisor;
use br2k_core::{ImageRef, ImageStore, Registry, Replicator, Repository, ServiceId};
use br2k_k8s::{KubeReplicator, Names};
use br2k_operator::backends::{Backends, ChainOciBackends, SharedBackends};
use br2k_operator::controller::{Context, Scope};
use br2k_operator::crd::{Br2kService, Br2kServiceSpec};
use br2k_operator::lease::LeaseConfig;
use br2k_operator::metrics::Metrics;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, Config};
use serde_json::json;
use tokio::sync::watch;

const SA: &str = "system:serviceaccount:br2k-system:br2k-operator";
const REGISTRY_HOST: &str = "registry.test:5000";

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

async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        match check().await {
            Ok(v) => return v,
            Err(e) if start.elapsed() > timeout => {
                panic!("{what}: not reached after {timeout:?}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Server-side applies every document of a YAML file as the admin.
async fn apply_yaml(client: &Client, text: &str) {
    br2k_operator::manifests::apply(client, text, "br2k-test")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Routes the resource of service `unreachable` to the real chain and OCI backends
/// (configured with an endpoint nobody serves), every other to in-process backends.
#[derive(Debug)]
struct Routed {
    memory: SharedBackends,
    real: ChainOciBackends,
}

#[async_trait]
impl Backends for Routed {
    async fn supervisor(
        &self,
        client: &Client,
        cr_ns: &str,
        ns: &str,
        spec: &Br2kServiceSpec,
    ) -> br2k_core::Result<Supervisor> {
        if spec.service_id == "unreachable" {
            self.real.supervisor(client, cr_ns, ns, spec).await
        } else {
            self.memory.supervisor(client, cr_ns, ns, spec).await
        }
    }
}

struct Replica {
    metrics: Metrics,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

fn start_replica(
    client: &Client,
    backends: Arc<dyn Backends>,
    identity: &str,
    lease: &str,
    ns: &str,
) -> Replica {
    let metrics = Metrics::default();
    // Served namespaces as deploy/operator.yaml configures them: namespaced watches,
    // which the namespaced Roles of deploy/rbac.yaml allow.
    let ctx = Context::scoped(
        client.clone(),
        backends,
        metrics.clone(),
        identity,
        Duration::from_secs(5),
        Scope {
            watch_namespaces: vec![ns.to_owned()],
            allowed_target_namespaces: vec![],
        },
    );
    let (stop, stop_rx) = watch::channel(false);
    let cfg = LeaseConfig {
        name: lease.to_owned(),
        namespace: "br2k-system".into(),
        identity: identity.to_owned(),
        duration: Duration::from_secs(4),
    };
    let task = tokio::spawn(br2k_operator::run_with_leader_election(
        ctx,
        client.clone(),
        cfg,
        stop_rx,
    ));
    Replica {
        metrics,
        stop,
        task,
    }
}

async fn holder(admin: &Client, lease: &str) -> Option<String> {
    Api::<Lease>::namespaced(admin.clone(), "br2k-system")
        .get_opt(lease)
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec?.holder_identity)
}

fn cr(name: &str, spec: Br2kServiceSpec) -> Br2kService {
    Br2kService::new(name, spec)
}

fn memory_spec(id: &str, ns: &str) -> Br2kServiceSpec {
    Br2kServiceSpec {
        namespace: Some(ns.into()),
        ..Br2kServiceSpec::for_service(id)
    }
}

fn status_of(o: &Br2kService) -> (String, BTreeMap<String, (String, String)>) {
    let s = o.status.clone().unwrap_or_default();
    (
        s.phase.unwrap_or_default(),
        s.conditions
            .into_iter()
            .map(|c| (c.type_, (c.status, c.reason)))
            .collect(),
    )
}

#[tokio::test]
#[ignore = "needs stack"]
async fn operator_with_deploy_rbac_leader_election_recovery_and_bad_input() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
    br2k_k8s::install_crypto_provider();
    let admin = Client::try_default().await.expect("KUBECONFIG");
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
    apply_yaml(
        &admin,
        &std::fs::read_to_string(format!("{root}/crd.yaml")).unwrap(),
    )
    .await;
    apply_yaml(
        &admin,
        &std::fs::read_to_string(format!("{root}/rbac.yaml")).unwrap(),
    )
    .await;
    // The CRD must be served before anyone watches it.
    let probe: Api<Br2kService> = Api::all(admin.clone());
    wait_for(Duration::from_secs(30), "CRD served", || async {
        probe
            .list(&ListParams::default().limit(1))
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    })
    .await;

    // The operator's client: exactly the RBAC of deploy/.
    let mut cfg = Config::infer().await.expect("config");
    cfg.auth_info.impersonate = Some(SA.into());
    let op_client = Client::try_from(cfg).expect("impersonating client");

    let run = unique();
    let ns = format!("br2k-op-{run}");
    Api::<Namespace>::all(admin.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"metadata": {"name": ns, "labels": {"br2k.io/test": "true"}}}),
            )
            .unwrap(),
        )
        .await
        .expect("namespace");
    // The operator's rights in the namespace it serves (deploy/rbac.yaml binds them
    // per served namespace).
    for role in ["br2k-operator-namespace", "br2k-operator-credentials"] {
        let binding = format!(
            "apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  name: {role}\n  namespace: {ns}\nroleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: ClusterRole\n  name: {role}\nsubjects:\n- kind: ServiceAccount\n  name: br2k-operator\n  namespace: br2k-system\n"
        );
        apply_yaml(&admin, &binding).await;
    }

    // The registry record and the image, in memory.
    let registry = Arc::new(InMemoryRegistry::new("owner"));
    let store = Arc::new(InMemoryImageStore::new(REGISTRY_HOST));
    let repo = Repository::new("br2k/sample").unwrap();
    let digest = store
        .push(&repo, &sample_image(7, 1, 1024), Some("1.0"))
        .await
        .expect("push");
    let mut spec = sample_spec(REGISTRY_HOST);
    spec.image = ImageRef::new(REGISTRY_HOST, repo, Some("1.0"), Some(digest)).unwrap();
    let id = ServiceId::new(format!("svc-{run}")).unwrap();
    registry.register(&id, &spec).await.expect("register");
    let record = registry.resume(&id).await.expect("resume");

    let backends: Arc<dyn Backends> = Arc::new(Routed {
        memory: SharedBackends {
            registry: registry.clone() as Arc<dyn Registry>,
            stores: vec![store.clone() as Arc<dyn ImageStore>],
            replicators: Default::default(),
        },
        real: ChainOciBackends::new(
            br2k_chain::ChainConfig::new(vec!["http://127.0.0.1:1".parse().unwrap()])
                .with_registry(
                    "0x00000000000000000000000000000000000000b2"
                        .parse()
                        .unwrap(),
                )
                .with_chain_id(31337)
                .with_request_timeout(Duration::from_secs(2)),
            vec![REGISTRY_HOST.into()],
        )
        .expect("backends"),
    });
    let lease = format!("br2k-test-{run}");
    let a = start_replica(&op_client, backends.clone(), "op-a", &lease, &ns);
    wait_for(Duration::from_secs(20), "op-a leads", || async {
        match holder(&admin, &lease).await.as_deref() {
            Some("op-a") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let b = start_replica(&op_client, backends.clone(), "op-b", &lease, &ns);

    let crs: Api<Br2kService> = Api::namespaced(admin.clone(), &ns);
    crs.create(
        &PostParams::default(),
        &cr("ledger", memory_spec(id.as_str(), &ns)),
    )
    .await
    .expect("create CR");
    // The test's own observer must not guard pods itself: the operator does, with
    // exactly the RBAC of deploy/.
    let observer = KubeReplicator::builder(&ns)
        .guard_pods(false)
        .build(admin.clone());
    let matches = || async {
        match observer.observe(&id).await {
            Ok(Some(o))
                if o.ready_replicas == record.replicas
                    && o.desired_replicas == record.replicas
                    && o.template == br2k_core::WorkloadTemplate::from_spec(&record.spec)
                    && o.missing_parts.is_empty() =>
            {
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    };
    wait_for(
        Duration::from_secs(60),
        "operator deploys the record",
        matches,
    )
    .await;

    // The operator guards the replicas: each pod gets the service's ConfigMap as a
    // second owner (needs `patch` on pods in deploy/rbac.yaml).
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
    let config = Names::of(&id).config;
    let pod_selector = ListParams::default().labels(&format!("br2k.io/service-id={id}"));
    let guarded = || async {
        let list = pods.list(&pod_selector).await.map_err(|e| e.to_string())?;
        let uids: BTreeMap<String, bool> = list
            .items
            .iter()
            .map(|p| {
                let guard = p
                    .metadata
                    .owner_references
                    .iter()
                    .flatten()
                    .any(|o| o.kind == "ConfigMap" && o.name == config);
                (p.metadata.uid.clone().unwrap_or_default(), guard)
            })
            .collect();
        if uids.len() == record.replicas as usize && uids.values().all(|g| *g) {
            Ok(uids.into_keys().collect::<Vec<_>>())
        } else {
            Err(format!("{uids:?}"))
        }
    };
    let pods_before = wait_for(Duration::from_secs(30), "pods guarded", guarded).await;

    // Drift: the StatefulSet is deleted; the leader restores it, records an Event,
    // counts the recovery and reports it in the status.
    let stss: Api<StatefulSet> = Api::namespaced(admin.clone(), &ns);
    let base = Names::of(&id).base;
    let t0 = Instant::now();
    stss.delete(&base, &DeleteParams::background())
        .await
        .expect("delete sts");
    wait_for(
        Duration::from_secs(60),
        "op-a restores the StatefulSet",
        || async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            matches().await
        },
    )
    .await;
    eprintln!(
        "deleted StatefulSet recovered by the operator in {:?}",
        t0.elapsed()
    );
    // The replicas kept running: the re-created StatefulSet adopted the same pods.
    let pods_after = wait_for(Duration::from_secs(30), "pods guarded", guarded).await;
    assert_eq!(pods_after, pods_before, "replicas were recreated");
    wait_for(Duration::from_secs(30), "recovery in status", || async {
        let o = crs.get("ledger").await.map_err(|e| e.to_string())?;
        let last = o
            .status
            .and_then(|s| s.last_recovery)
            .ok_or("no last recovery")?;
        if last.findings.contains(&"missing_workload".to_owned()) {
            Ok(())
        } else {
            Err(format!("{last:?}"))
        }
    })
    .await;
    let events: Api<Event> = Api::namespaced(admin.clone(), &ns);
    wait_for(Duration::from_secs(30), "Recovered event", || async {
        let list = events
            .list(&ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        list.items
            .iter()
            .find(|e| {
                e.reason.as_deref() == Some("Recovered")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("ledger")
            })
            .map(drop)
            .ok_or_else(|| format!("{} events", list.items.len()))
    })
    .await;
    assert!(
        a.metrics
            .render()
            .contains("br2k_recoveries_total{finding=\"missing_workload\"}")
    );
    assert!(a.metrics.render().contains("br2k_leader 1"));
    // The standby never acted.
    let b_text = b.metrics.render();
    assert!(b_text.contains("br2k_leader 0"), "{b_text}");
    assert!(!b_text.contains("br2k_recoveries_total{"), "{b_text}");

    // Bad input: an invalid service id and unreachable endpoints.
    crs.create(
        &PostParams::default(),
        &cr("invalid", memory_spec("Not_A_Valid_Id", &ns)),
    )
    .await
    .expect("create invalid CR");
    let unreachable = memory_spec("unreachable", &ns);
    crs.create(&PostParams::default(), &cr("unreachable", unreachable))
        .await
        .expect("create unreachable CR");
    wait_for(Duration::from_secs(30), "invalid id condition", || async {
        let o = crs.get("invalid").await.map_err(|e| e.to_string())?;
        let (phase, c) = status_of(&o);
        match c.get("Valid") {
            Some((s, r)) if phase == "Error" && s == "False" && r == "InvalidServiceId" => Ok(()),
            other => Err(format!("{phase} {other:?}")),
        }
    })
    .await;
    wait_for(Duration::from_secs(30), "unreachable condition", || async {
        let o = crs.get("unreachable").await.map_err(|e| e.to_string())?;
        let (phase, c) = status_of(&o);
        match c.get("ChainAvailable") {
            Some((s, r)) if phase == "Error" && s == "False" && r == "Unreachable" => Ok(()),
            _ => Err(format!("{phase} {:?}", o.status)),
        }
    })
    .await;
    // Backoff, not hammering: over 8 s at most a handful of retries (1+2+4 s ...).
    let errors = |m: &Metrics| -> u64 {
        m.render()
            .lines()
            .find_map(|l| l.strip_prefix("br2k_reconcile_errors_total "))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let before = errors(&a.metrics);
    tokio::time::sleep(Duration::from_secs(8)).await;
    let during = errors(&a.metrics) - before;
    assert!(during <= 4, "{during} failed reconciles in 8 s");
    assert!(!a.task.is_finished(), "the operator keeps running");

    // Failover: op-a stops (releasing the lease); op-b takes over and recovers drift.
    a.stop.send(true).unwrap();
    a.task.await.unwrap();
    wait_for(Duration::from_secs(20), "op-b leads", || async {
        match holder(&admin, &lease).await.as_deref() {
            Some("op-b") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    stss.patch_scale(
        &base,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 6}})),
    )
    .await
    .expect("scale");
    wait_for(
        Duration::from_secs(60),
        "op-b restores the replica count",
        || async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            matches().await
        },
    )
    .await;
    wait_for(Duration::from_secs(10), "op-b counted it", || async {
        let text = b.metrics.render();
        if text.contains("br2k_recoveries_total{finding=\"replicas_drifted\"}") {
            Ok(())
        } else {
            Err(text)
        }
    })
    .await;

    // Deleting the resources removes the workload (finalizer) while op-b runs.
    for name in ["ledger", "invalid", "unreachable"] {
        crs.delete(name, &DeleteParams::default())
            .await
            .expect("delete CR");
    }
    wait_for(
        Duration::from_secs(60),
        "resources and workload gone",
        || async {
            let left = crs
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?;
            let live = observer.observe(&id).await.map_err(|e| e.to_string())?;
            if left.items.is_empty() && live.is_none() {
                Ok(())
            } else {
                Err(format!(
                    "{} resources, workload {}",
                    left.items.len(),
                    live.is_some()
                ))
            }
        },
    )
    .await;
    b.stop.send(true).unwrap();
    b.task.await.unwrap();
    let _ = Api::<Namespace>::all(admin.clone())
        .delete(&ns, &DeleteParams::background())
        .await;
}
