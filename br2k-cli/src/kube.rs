//! The cluster side: the `Br2kService` resource the operator acts on, and the live
//! StatefulSet and pods of a service.

use std::time::{Duration, Instant};

use br2k_core::{Digest, ImageRef, ServiceId, ServiceRecord, ServiceState};
use br2k_operator::crd::{Br2kService, Br2kServiceSpec, Br2kServiceStatus};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use serde::Serialize;

use br2k_k8s::names::{ANNOTATION_CONFIG_HASH, ANNOTATION_SPEC_HASH};

use crate::context::Context;
use crate::error::{CliError, CliResult};

fn kube_err(what: &str, e: kube::Error) -> CliError {
    match e {
        kube::Error::Api(s) if s.code == 404 && what.contains("Br2kService") => CliError::fail(
            format!("{what}: the Br2kService resource type is not installed in the cluster"),
        )
        .hint("install the operator's CRD and RBAC: kubectl apply -f deploy/crd.yaml -f deploy/rbac.yaml"),
        kube::Error::Api(s) => CliError::fail(format!("{what}: {} ({})", s.message, s.code)),
        e => CliError::fail(format!("{what}: cluster unreachable: {e}"))
            .hint("check the context's kubeconfig/kube_context (`br2k context show`) and that the API server is up"),
    }
}

/// The resource spec for service `id`: only the service id. The chain, contract
/// and registries are the operator's own configuration; the context's must be the
/// same for the operator to deploy what `br2k deploy` published.
pub fn cr_spec(_ctx: &Context, id: &ServiceId) -> CliResult<Br2kServiceSpec> {
    Ok(Br2kServiceSpec::for_service(id.as_str()))
}

/// What applying the resource does (or did).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CrChange {
    /// No resource yet: created.
    Create,
    /// A resource with another spec: updated.
    Update,
    /// Already as wanted.
    Unchanged,
}

/// The resource of `id`, if any.
pub async fn get_cr(
    client: &kube::Client,
    ns: &str,
    id: &ServiceId,
) -> CliResult<Option<Br2kService>> {
    Api::<Br2kService>::namespaced(client.clone(), ns)
        .get_opt(id.as_str())
        .await
        .map_err(|e| kube_err("read the Br2kService", e))
}

/// What [`apply_cr`] would do, read-only.
pub async fn plan_cr(
    client: &kube::Client,
    ns: &str,
    id: &ServiceId,
    spec: &Br2kServiceSpec,
) -> CliResult<CrChange> {
    Ok(match get_cr(client, ns, id).await? {
        None => CrChange::Create,
        Some(cr) if &cr.spec == spec => CrChange::Unchanged,
        Some(_) => CrChange::Update,
    })
}

/// Creates or updates the resource of `id`; writes nothing when it is as wanted.
pub async fn apply_cr(
    client: &kube::Client,
    ns: &str,
    id: &ServiceId,
    spec: &Br2kServiceSpec,
) -> CliResult<CrChange> {
    let api = Api::<Br2kService>::namespaced(client.clone(), ns);
    let change = plan_cr(client, ns, id, spec).await?;
    match change {
        CrChange::Create => {
            api.create(
                &PostParams::default(),
                &Br2kService::new(id.as_str(), spec.clone()),
            )
            .await
            .map_err(|e| kube_err("create the Br2kService", e))?;
        }
        CrChange::Update => {
            let patch = serde_json::json!({ "spec": spec });
            api.patch(id.as_str(), &PatchParams::default(), &Patch::Merge(&patch))
                .await
                .map_err(|e| kube_err("update the Br2kService", e))?;
        }
        CrChange::Unchanged => {}
    }
    Ok(change)
}

/// One live pod.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LivePod {
    /// Pod name.
    pub name: String,
    /// Whether its Ready condition is True.
    pub ready: bool,
    /// Digest of the image it runs.
    pub digest: Option<String>,
    /// Hash of the environment values it started with.
    pub config: Option<String>,
}

/// The live workload of a service.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Live {
    /// Whether the StatefulSet exists.
    pub statefulset: bool,
    /// Its `spec.replicas`.
    pub replicas: Option<i32>,
    /// Its `status.readyReplicas`.
    pub ready_replicas: i32,
    /// Digest of its pod template's image.
    pub template_digest: Option<String>,
    /// Spec hash of the record it was applied from.
    pub spec_hash: Option<String>,
    /// Hash of the environment values of its pod template.
    pub template_config: Option<String>,
    /// The pods (terminating ones left out).
    pub pods: Vec<LivePod>,
}

fn image_digest(image: &str) -> Option<String> {
    ImageRef::parse(image).ok()?.digest().map(Digest::to_string)
}

/// Reads the live StatefulSet and pods of `id` in `ns`.
pub async fn live(client: &kube::Client, ns: &str, id: &ServiceId) -> CliResult<Live> {
    let names = br2k_k8s::Names::of(id);
    let sts = Api::<StatefulSet>::namespaced(client.clone(), ns)
        .get_opt(&names.base)
        .await
        .map_err(|e| kube_err("read the StatefulSet", e))?;
    let pods = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&br2k_k8s::names::selector_string(id)))
        .await
        .map_err(|e| kube_err("list pods", e))?;
    let mut live = Live::default();
    if let Some(s) = sts {
        live.statefulset = true;
        live.replicas = s.spec.as_ref().and_then(|sp| sp.replicas);
        live.ready_replicas = s
            .status
            .as_ref()
            .and_then(|st| st.ready_replicas)
            .unwrap_or(0);
        live.spec_hash = s
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_SPEC_HASH).cloned());
        live.template_config = s
            .spec
            .as_ref()
            .and_then(|sp| sp.template.metadata.as_ref())
            .and_then(|m| m.annotations.as_ref())
            .and_then(|a| a.get(ANNOTATION_CONFIG_HASH).cloned());
        live.template_digest = s
            .spec
            .as_ref()
            .and_then(|sp| sp.template.spec.as_ref())
            .and_then(|p| p.containers.first())
            .and_then(|c| c.image.as_deref())
            .and_then(image_digest);
    }
    for p in pods.items {
        if p.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let ready = p
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        let digest = p
            .spec
            .as_ref()
            .and_then(|s| s.containers.first())
            .and_then(|c| c.image.as_deref())
            .and_then(image_digest);
        let config = p
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_CONFIG_HASH).cloned());
        live.pods.push(LivePod {
            name: p.metadata.name.unwrap_or_default(),
            ready,
            digest,
            config,
        });
    }
    live.pods.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(live)
}

/// What still differs between the record and the live workload (`None`: it matches).
pub fn pending(record: &ServiceRecord, live: &Live) -> Option<String> {
    let digest = record.spec.image.digest().map(Digest::to_string);
    match record.state {
        ServiceState::Running => {
            let n = record.replicas as usize;
            if !live.statefulset {
                return Some("no StatefulSet yet".into());
            }
            if live.replicas != Some(record.replicas as i32) {
                return Some(format!(
                    "StatefulSet replicas {:?}, record {}",
                    live.replicas, record.replicas
                ));
            }
            if live.spec_hash.as_deref() != Some(record.spec_hash.to_string().as_str()) {
                return Some(format!(
                    "StatefulSet not applied from record v{} yet",
                    record.version
                ));
            }
            if live.template_digest != digest {
                return Some("StatefulSet template not on the recorded digest yet".into());
            }
            let good = live
                .pods
                .iter()
                .filter(|p| p.ready && p.digest == digest && p.config == live.template_config)
                .count();
            if good != n || live.pods.len() != n {
                return Some(format!(
                    "{good}/{n} replicas Ready on the recorded digest ({} pods)",
                    live.pods.len()
                ));
            }
            // What `kubectl get statefulset` shows: the controller counts the Ready
            // pods a moment after they are; done means it shows them too.
            if live.ready_replicas != n as i32 {
                return Some(format!(
                    "StatefulSet status shows {}/{n} Ready",
                    live.ready_replicas
                ));
            }
            None
        }
        ServiceState::Paused => {
            if live.spec_hash.as_deref() != Some(record.spec_hash.to_string().as_str())
                || !live.statefulset
                || live.replicas != Some(0)
                || !live.pods.is_empty()
            {
                return Some(format!(
                    "paused: StatefulSet replicas {:?}, {} pods",
                    live.replicas,
                    live.pods.len()
                ));
            }
            None
        }
        ServiceState::Stopped | ServiceState::Ready => {
            if live.statefulset || !live.pods.is_empty() {
                return Some(format!(
                    "{}: StatefulSet still present or {} pods",
                    record.state,
                    live.pods.len()
                ));
            }
            None
        }
    }
}

/// Replicas Ready on the recorded digest.
pub fn ready_on_digest(record: &ServiceRecord, live: &Live) -> usize {
    let digest = record.spec.image.digest().map(Digest::to_string);
    live.pods
        .iter()
        .filter(|p| p.ready && p.digest == digest && p.config == live.template_config)
        .count()
}

/// Waits until the live workload of `record` matches it, with a progress bar on
/// stderr (ready replicas on the recorded digest).
pub async fn wait(
    client: &kube::Client,
    ns: &str,
    record: &ServiceRecord,
    timeout: Duration,
    show: bool,
) -> CliResult<Duration> {
    let t0 = Instant::now();
    let bar = if show {
        indicatif::ProgressBar::new(u64::from(record.desired_replicas()))
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {prefix} [{bar:20}] {pos}/{len} ready on the recorded digest {msg} ({elapsed})",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    bar.set_prefix(format!(
        "{} v{} {}",
        record.id, record.version, record.state
    ));
    bar.enable_steady_tick(Duration::from_millis(200));
    loop {
        let l = live(client, ns, &record.id).await?;
        bar.set_position(ready_on_digest(record, &l) as u64);
        match pending(record, &l) {
            None => {
                bar.finish_and_clear();
                return Ok(t0.elapsed());
            }
            Some(why) => {
                bar.set_message(why.clone());
                if t0.elapsed() > timeout {
                    bar.abandon();
                    return Err(CliError::fail(format!(
                        "{} did not reach its recorded state in {} s: {why}",
                        record.id,
                        timeout.as_secs()
                    ))
                    .hint("is the operator running (`kubectl -n br2k-system get lease`)? see `br2k status` for its conditions"));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The resource's status, if any.
pub async fn cr_status(
    client: &kube::Client,
    ns: &str,
    id: &ServiceId,
) -> CliResult<Option<Br2kServiceStatus>> {
    Ok(get_cr(client, ns, id).await?.and_then(|c| c.status))
}

#[cfg(test)]
mod tests {
    use super::*;
    use br2k_core::{Account, ServiceSpec};

    fn record(state: ServiceState, replicas: u32) -> ServiceRecord {
        let digest = Digest::of(b"img");
        let image = ImageRef::new(
            "127.0.0.1:5000",
            br2k_core::Repository::new("br2k/x").expect("repo"),
            None,
            Some(digest),
        )
        .expect("ref");
        let spec = ServiceSpec::new(image, replicas).expect("spec");
        ServiceRecord {
            id: ServiceId::new("x").expect("id"),
            version: 1,
            latest_version: 1,
            spec_hash: spec.spec_hash(),
            spec,
            replicas,
            state,
            owner: Account("0x0".into()),
            checkpoint: None,
            location: None,
            placement: None,
            as_of: None,
            stale: false,
        }
    }

    fn pods(n: usize, ready: bool, digest: &Digest) -> Vec<LivePod> {
        (0..n)
            .map(|i| LivePod {
                name: format!("x-{i}"),
                ready,
                digest: Some(digest.to_string()),
                config: Some("c1".into()),
            })
            .collect()
    }

    #[test]
    fn running_matches_only_with_every_replica_ready_on_the_digest() {
        let r = record(ServiceState::Running, 3);
        let d = Digest::of(b"img");
        let mut l = Live {
            statefulset: true,
            replicas: Some(3),
            ready_replicas: 3,
            template_digest: Some(d.to_string()),
            spec_hash: Some(r.spec_hash.to_string()),
            template_config: Some("c1".into()),
            pods: pods(3, true, &d),
        };
        assert_eq!(pending(&r, &l), None);
        // Applied from another record version: not yet.
        l.spec_hash = Some(Digest::of(b"other").to_string());
        assert!(pending(&r, &l).expect("pending").contains("not applied"));
        l.spec_hash = Some(r.spec_hash.to_string());
        // Pods that started with other environment values: not yet.
        l.template_config = Some("c2".into());
        assert!(pending(&r, &l).expect("pending").contains("0/3"));
        l.template_config = Some("c1".into());
        l.pods[1].ready = false;
        assert!(pending(&r, &l).expect("pending").contains("2/3"));
        l.pods = pods(3, true, &Digest::of(b"old"));
        assert!(pending(&r, &l).is_some());
        l.pods = pods(4, true, &d);
        assert!(pending(&r, &l).is_some());
        l.pods = pods(3, true, &d);
        l.template_digest = Some(Digest::of(b"old").to_string());
        assert!(pending(&r, &l).is_some());
        l.template_digest = Some(d.to_string());
        assert_eq!(pending(&r, &l), None);
        // Every pod Ready, but the StatefulSet's status does not count them yet.
        l.ready_replicas = 2;
        assert!(
            pending(&r, &l)
                .expect("pending")
                .contains("status shows 2/3")
        );
    }

    #[test]
    fn paused_and_stopped_need_no_pods() {
        let d = Digest::of(b"img");
        let paused = Live {
            statefulset: true,
            replicas: Some(0),
            ready_replicas: 0,
            template_digest: Some(d.to_string()),
            spec_hash: Some(record(ServiceState::Paused, 3).spec_hash.to_string()),
            template_config: None,
            pods: vec![],
        };
        assert_eq!(pending(&record(ServiceState::Paused, 3), &paused), None);
        assert!(pending(&record(ServiceState::Stopped, 3), &paused).is_some());
        assert_eq!(
            pending(&record(ServiceState::Stopped, 3), &Live::default()),
            None
        );
        assert!(pending(&record(ServiceState::Running, 3), &paused).is_some());
    }
}
