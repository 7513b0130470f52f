//! Rebuilds what is live from the Kubernetes objects (pure functions, no I/O).
//!
//! Nothing here trusts br2k's own annotations: the template comes from the live pod
//! template (and the live ConfigMap the environment points at), replica health from
//! pod and node status.

use std::collections::{BTreeMap, BTreeSet};

use br2k_core::{
    Digest, ImageRef, ObservedReplica, ObservedState, Port, Probe, ProbeCheck, Probes, Resources,
    SecretEnv, ServiceId, ValidationError, WorkloadTemplate,
};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, Node, Pod, PodSpec, Probe as KProbe, Service,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;

use crate::build::hardening_gaps;
use crate::names::{CONTAINER, LABEL_RECORD_VERSION, LABEL_SERVICE_ID, Names};
use crate::ownership;

fn malformed(what: &str, reason: impl std::fmt::Display) -> ValidationError {
    ValidationError::malformed(what, reason)
}

/// Parses a CPU quantity (`"250m"`, `"1"`, `"1.5"`, `"2k"`) into millicores.
pub fn parse_cpu_millis(q: &str) -> Result<u32, ValidationError> {
    let bad = || malformed("cpu quantity", q);
    let (num, scale_milli): (&str, f64) = if let Some(n) = q.strip_suffix('m') {
        (n, 1.0)
    } else if let Some(n) = q.strip_suffix('k') {
        (n, 1_000_000.0)
    } else {
        (q, 1000.0)
    };
    let v: f64 = num.parse().map_err(|_| bad())?;
    let m = (v * scale_milli).round();
    if !(0.0..=f64::from(u32::MAX)).contains(&m) {
        return Err(bad());
    }
    Ok(m as u32)
}

/// Parses a memory quantity (`"64Mi"`, `"1Gi"`, `"67108864"`, `"128M"`, `"1e9"`) into
/// MiB; an amount that is not a whole number of MiB is rejected (br2k only writes MiB).
pub fn parse_memory_mib(q: &str) -> Result<u32, ValidationError> {
    let bad = || malformed("memory quantity", q);
    const SUFFIXES: [(&str, f64); 12] = [
        ("Ki", 1024.0),
        ("Mi", 1048576.0),
        ("Gi", 1073741824.0),
        ("Ti", 1099511627776.0),
        ("Pi", 1125899906842624.0),
        ("Ei", 1152921504606846976.0),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    let (num, mult) = SUFFIXES
        .iter()
        .find_map(|(s, m)| q.strip_suffix(s).map(|n| (n, *m)))
        .unwrap_or((q, 1.0));
    let v: f64 = num.parse().map_err(|_| bad())?;
    let bytes = v * mult;
    let mib = bytes / 1048576.0;
    if mib < 0.0 || mib > f64::from(u32::MAX) || (mib - mib.round()).abs() > 1e-9 {
        return Err(bad());
    }
    Ok(mib.round() as u32)
}

fn port_of(p: &IntOrString, named: &BTreeMap<String, u16>) -> Result<u16, ValidationError> {
    match p {
        IntOrString::Int(i) => u16::try_from(*i).map_err(|_| malformed("probe port", i)),
        IntOrString::String(s) => named
            .get(s)
            .copied()
            .or_else(|| s.parse().ok())
            .ok_or_else(|| malformed("probe port", s)),
    }
}

fn probe(p: &KProbe, named: &BTreeMap<String, u16>) -> Result<Probe, ValidationError> {
    let check = if let Some(h) = &p.http_get {
        ProbeCheck::Http {
            path: h.path.clone().unwrap_or_else(|| "/".into()),
            port: port_of(&h.port, named)?,
        }
    } else if let Some(t) = &p.tcp_socket {
        ProbeCheck::Tcp {
            port: port_of(&t.port, named)?,
        }
    } else if let Some(e) = &p.exec {
        ProbeCheck::Exec {
            command: e.command.clone().unwrap_or_default(),
        }
    } else {
        return Err(malformed("probe", "no http, tcp or exec check"));
    };
    Ok(Probe {
        check,
        // Kubernetes defaults: period 10 s, failure threshold 3.
        period_seconds: p.period_seconds.unwrap_or(10).max(0) as u32,
        failure_threshold: p.failure_threshold.unwrap_or(3).max(0) as u32,
    })
}

/// The br2k container of a pod template (named [`CONTAINER`], else the first one).
pub fn main_container(containers: &[Container]) -> Option<&Container> {
    containers
        .iter()
        .find(|c| c.name == CONTAINER)
        .or_else(|| containers.first())
}

/// Rebuilds the template from the live StatefulSet and the live ConfigMap its
/// environment refers to (`config`, `None` when missing).
///
/// An environment variable referring to a missing ConfigMap or key, or one that is
/// neither a plain value, a ConfigMap key nor a Secret key, shows up in `env` with a
/// marker value `<unresolved ...>` so the template differs from any valid spec.
pub fn template_of(
    sts: &StatefulSet,
    config: Option<&ConfigMap>,
) -> Result<WorkloadTemplate, ValidationError> {
    let pod = sts
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .ok_or_else(|| malformed("statefulset", "no pod template"))?;
    template_of_pod(pod, config)
}

/// Rebuilds the template a pod runs from its spec (as [`template_of`] does for the
/// StatefulSet's pod template).
pub fn template_of_pod(
    pod: &PodSpec,
    config: Option<&ConfigMap>,
) -> Result<WorkloadTemplate, ValidationError> {
    let c = main_container(&pod.containers)
        .ok_or_else(|| malformed("statefulset", "pod template has no container"))?;
    let image = ImageRef::parse(c.image.as_deref().unwrap_or_default())?;
    let ports: Vec<Port> = c
        .ports
        .iter()
        .flatten()
        .map(|p| {
            Ok(Port {
                name: p.name.clone().unwrap_or_default(),
                port: u16::try_from(p.container_port)
                    .map_err(|_| malformed("container port", p.container_port))?,
            })
        })
        .collect::<Result<_, ValidationError>>()?;
    let named: BTreeMap<String, u16> = ports.iter().map(|p| (p.name.clone(), p.port)).collect();
    let config_name = config.and_then(|c| c.metadata.name.clone());
    let config_data = config.and_then(|c| c.data.clone()).unwrap_or_default();
    let mut env = BTreeMap::new();
    let mut secret_env = Vec::new();
    for e in c.env.iter().flatten() {
        let src = e.value_from.as_ref();
        if let Some(s) = src.and_then(|s| s.secret_key_ref.as_ref()) {
            secret_env.push(SecretEnv {
                name: e.name.clone(),
                secret: s.name.clone(),
                key: s.key.clone(),
            });
        } else if let Some(r) = src.and_then(|s| s.config_map_key_ref.as_ref()) {
            let value = if config_name.as_deref() == Some(r.name.as_str()) {
                config_data.get(&r.key).cloned()
            } else {
                None
            };
            let value =
                value.unwrap_or_else(|| format!("<unresolved configmap {}/{}>", r.name, r.key));
            env.insert(e.name.clone(), value);
        } else if src.is_some() {
            env.insert(e.name.clone(), "<unresolved value source>".into());
        } else {
            env.insert(e.name.clone(), e.value.clone().unwrap_or_default());
        }
    }
    let limits = c.resources.as_ref().and_then(|r| r.limits.as_ref());
    let requests = c.resources.as_ref().and_then(|r| r.requests.as_ref());
    let amount = |key: &str| {
        limits
            .and_then(|l| l.get(key))
            .or_else(|| requests.and_then(|r| r.get(key)))
            .map(|q| q.0.clone())
    };
    let resources = Resources {
        cpu_millis: amount("cpu").map(|q| parse_cpu_millis(&q)).transpose()?,
        memory_mib: amount("memory").map(|q| parse_memory_mib(&q)).transpose()?,
    };
    let probes = Probes {
        startup: c
            .startup_probe
            .as_ref()
            .map(|p| probe(p, &named))
            .transpose()?,
        readiness: c
            .readiness_probe
            .as_ref()
            .map(|p| probe(p, &named))
            .transpose()?,
        liveness: c
            .liveness_probe
            .as_ref()
            .map(|p| probe(p, &named))
            .transpose()?,
    };
    Ok(WorkloadTemplate {
        image,
        args: c.args.clone().unwrap_or_default(),
        ports,
        env,
        secret_env,
        resources,
        probes,
    })
}

/// The digest in a container status `imageID` such as
/// `docker-pullable://reg/repo@sha256:...` or `sha256:...`, if it carries one.
pub fn digest_in_image_id(image_id: &str) -> Option<Digest> {
    let at = image_id.rfind("sha256:")?;
    Digest::parse(&image_id[at..]).ok()
}

/// Whether a node is unusable: its Ready condition is not `True`, or it carries the
/// `node.kubernetes.io/unreachable` or `not-ready` taint.
pub fn node_failed(node: &Node) -> bool {
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True");
    let tainted = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|ts| {
            ts.iter().any(|t| {
                t.key == "node.kubernetes.io/unreachable" || t.key == "node.kubernetes.io/not-ready"
            })
        });
    !ready || tainted
}

/// One replica as seen live.
///
/// The image digest comes from the container status `imageID` when it carries a
/// digest (what the runtime reports it runs); otherwise, as on simulated (kwok) nodes
/// where no runtime reports one, from the digest the pod spec pins its image to.
///
/// Failed: pod phase `Failed`, the container terminated with a non-zero exit code (or
/// waiting after such a termination), or the pod's node NotReady, unreachable or gone
/// (`failed_nodes`). Ready: the pod's `Ready` condition is `True`, it is not being
/// deleted and not failed.
pub fn replica_of(pod: &Pod, failed_nodes: &BTreeSet<String>) -> ObservedReplica {
    let name = pod.metadata.name.clone().unwrap_or_default();
    let status = pod.status.as_ref();
    let spec_container = pod
        .spec
        .as_ref()
        .and_then(|s| main_container(&s.containers));
    let cstatus = status
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| {
            cs.iter()
                .find(|c| c.name == CONTAINER)
                .or_else(|| cs.first())
        });
    let image_digest = cstatus
        .and_then(|c| digest_in_image_id(&c.image_id))
        .or_else(|| {
            spec_container
                .and_then(|c| c.image.as_deref())
                .and_then(|i| ImageRef::parse(i).ok())
                .and_then(|i| i.digest().copied())
        });
    let phase_failed = status.and_then(|s| s.phase.as_deref()) == Some("Failed");
    let terminated_bad = cstatus.is_some_and(|c| {
        let now = c
            .state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .is_some_and(|t| t.exit_code != 0);
        let crash_loop = c
            .state
            .as_ref()
            .and_then(|s| s.waiting.as_ref())
            .is_some_and(|w| {
                w.reason.as_deref() == Some("CrashLoopBackOff")
                    || c.last_state
                        .as_ref()
                        .and_then(|l| l.terminated.as_ref())
                        .is_some_and(|t| t.exit_code != 0)
            });
        now || crash_loop
    });
    let node_bad = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.as_ref())
        .is_some_and(|n| failed_nodes.contains(n));
    let failed = phase_failed || terminated_bad || node_bad;
    let ready_cond = status
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True");
    let deleting = pod.metadata.deletion_timestamp.is_some();
    ObservedReplica {
        name,
        image_digest,
        ready: ready_cond && !deleting && !failed,
        failed,
    }
}

/// Live replica count of a StatefulSet (`spec.replicas`, default 1).
pub fn sts_replicas(sts: &StatefulSet) -> u32 {
    sts.spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1)
        .max(0) as u32
}

/// The ordinal of a StatefulSet pod named `<base>-<n>`, if it is one.
pub fn ordinal(base: &str, pod: &str) -> Option<u32> {
    pod.strip_prefix(base)?.strip_prefix('-')?.parse().ok()
}

/// The live objects of one service.
pub(crate) struct Live {
    pub(crate) sts: StatefulSet,
    pub(crate) cm: Option<ConfigMap>,
    pub(crate) headless: Option<Service>,
    pub(crate) client_svc: Option<Service>,
    pub(crate) pdb: Option<PodDisruptionBudget>,
    pub(crate) pods: Vec<Pod>,
    pub(crate) healthy_nodes: BTreeSet<String>,
}

/// Recomputes what matters from the live objects (never from annotations alone).
pub(crate) fn observed_of(id: &ServiceId, live: &Live) -> Result<ObservedState, ValidationError> {
    let names = Names::of(id);
    let template = template_of(&live.sts, live.cm.as_ref())?;
    // A service without ports has no client Service (Kubernetes requires ports for
    // one); the headless Service needs none.
    let wants_client_service = !template.ports.is_empty();
    let mut missing_parts = Vec::new();
    for (part, present) in [
        ("config", live.cm.as_ref().is_some_and(|o| owned_by(o, id))),
        (
            "headless-service",
            live.headless.as_ref().is_some_and(|o| owned_by(o, id)),
        ),
        (
            "service",
            !wants_client_service || live.client_svc.as_ref().is_some_and(|o| owned_by(o, id)),
        ),
        (
            "disruption-budget",
            live.pdb.as_ref().is_some_and(|o| owned_by(o, id)),
        ),
    ] {
        if !present {
            missing_parts.push(part.to_owned());
        }
    }

    let desired = sts_replicas(&live.sts);
    let mut foreign_fields = ownership::foreign_fields("statefulset", &live.sts.metadata);
    let parts = [
        ("configmap", live.cm.as_ref().map(|o| &o.metadata)),
        ("service", live.headless.as_ref().map(|o| &o.metadata)),
        ("service", live.client_svc.as_ref().map(|o| &o.metadata)),
        (
            "poddisruptionbudget",
            live.pdb.as_ref().map(|o| &o.metadata),
        ),
    ];
    for (kind, meta) in parts {
        if let Some(m) = meta.filter(|m| meta_owned_by(m, id)) {
            foreign_fields.extend(ownership::foreign_fields(kind, m));
        }
    }
    // A hardening field another writer removed leaves no foreign owner in
    // managedFields: compare the live template with what br2k sets.
    if let Some(pod) = live
        .sts
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
    {
        foreign_fields.extend(hardening_gaps(pod).into_iter().map(|f| {
            format!(
                "statefulset/{}: spec.template.spec.{f} (missing)",
                names.base
            )
        }));
    }

    let failed_nodes: BTreeSet<String> = live
        .pods
        .iter()
        .filter_map(|p| p.spec.as_ref().and_then(|s| s.node_name.clone()))
        .filter(|n| !live.healthy_nodes.contains(n))
        .collect();

    let mut by_ordinal: BTreeMap<u32, ObservedReplica> = BTreeMap::new();
    for pod in &live.pods {
        let Some(name) = pod.metadata.name.as_deref() else {
            continue;
        };
        match ordinal(&names.base, name) {
            Some(i) if i < desired => {
                by_ordinal.insert(i, replica_of(pod, &failed_nodes));
            }
            _ => {}
        }
    }
    let replicas: Vec<ObservedReplica> = (0..desired)
        .map(|i| {
            by_ordinal.remove(&i).unwrap_or_else(|| ObservedReplica {
                // Not created (yet): counts as not ready.
                name: format!("{}-{i}", names.base),
                image_digest: None,
                ready: false,
                failed: false,
            })
        })
        .collect();
    let ready_replicas = replicas.iter().filter(|r| r.ready && !r.failed).count() as u32;
    let applied_version = live
        .sts
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(LABEL_RECORD_VERSION))
        .and_then(|v| v.parse().ok());
    Ok(ObservedState {
        id: id.clone(),
        applied_version,
        desired_replicas: desired,
        ready_replicas,
        template,
        replicas,
        missing_parts,
        foreign_fields,
    })
}

/// Whether a live object carries the service-id label of `id` (objects of the same
/// name not made by br2k for this service are ignored).
pub(crate) fn owned_by<K: Resource>(obj: &K, id: &ServiceId) -> bool {
    meta_owned_by(obj.meta(), id)
}

/// [`owned_by`] on an object's metadata.
pub(crate) fn meta_owned_by(meta: &ObjectMeta, id: &ServiceId) -> bool {
    meta.labels
        .as_ref()
        .and_then(|l| l.get(LABEL_SERVICE_ID))
        .is_some_and(|v| v == id.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::{self, Placement};
    use crate::names::Names;
    use br2k_core::conformance::{sample_record, sample_spec};
    use br2k_core::{ServiceId, ServiceRecord, WorkloadTemplate};
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateTerminated, ContainerStatus, NodeCondition, NodeSpec,
        NodeStatus, PodCondition, PodSpec, PodStatus, Taint,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn full_record() -> ServiceRecord {
        let mut spec = sample_spec("registry.test:5000");
        spec.probes.startup = Some(Probe {
            check: ProbeCheck::Exec {
                command: vec!["/bin/check".into(), "--start".into()],
            },
            period_seconds: 2,
            failure_threshold: 30,
        });
        spec.probes.liveness = Some(Probe {
            check: ProbeCheck::Tcp { port: 8080 },
            period_seconds: 10,
            failure_threshold: 3,
        });
        spec.validate().unwrap();
        sample_record(&ServiceId::new("ledger").unwrap(), spec)
    }

    fn built(record: &ServiceRecord) -> (StatefulSet, ConfigMap) {
        let names = Names::of(&record.id);
        let mut cm = build::config_map(record, &names, "ns");
        cm.metadata.uid = Some("uid-1".into());
        let mut sts = build::stateful_set(
            record,
            &names,
            "ns",
            3,
            build::Rollout::Roll,
            &Placement::default(),
        );
        build::set_owner(&mut sts.metadata, build::owner_reference(&cm));
        (sts, cm)
    }

    #[test]
    fn template_round_trips_through_the_objects() {
        let record = full_record();
        let (sts, cm) = built(&record);
        // Through JSON, as the API server stores and returns it.
        let sts: StatefulSet = serde_json::from_value(serde_json::to_value(&sts).unwrap()).unwrap();
        let t = template_of(&sts, Some(&cm)).unwrap();
        assert_eq!(t, WorkloadTemplate::from_spec(&record.spec));
        assert_eq!(sts_replicas(&sts), 3);
        let owner = &sts.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("ConfigMap", "uid-1")
        );
    }

    #[test]
    fn tampering_shows_in_the_rebuilt_template() {
        let record = full_record();
        let want = WorkloadTemplate::from_spec(&record.spec);
        let (mut sts, mut cm) = built(&record);
        cm.data
            .as_mut()
            .unwrap()
            .insert("LOG_LEVEL".into(), "debug".into());
        assert_eq!(
            template_of(&sts, Some(&cm))
                .unwrap()
                .differing_fields(&want),
            ["env"]
        );
        assert!(
            template_of(&sts, None).unwrap().env["LOG_LEVEL"].starts_with("<unresolved"),
            "a missing ConfigMap is visible"
        );
        let c = &mut sts
            .spec
            .as_mut()
            .unwrap()
            .template
            .spec
            .as_mut()
            .unwrap()
            .containers[0];
        c.args = Some(vec!["--evil".into()]);
        c.resources
            .as_mut()
            .unwrap()
            .limits
            .as_mut()
            .unwrap()
            .insert(
                "cpu".into(),
                k8s_openapi::apimachinery::pkg::api::resource::Quantity("2".into()),
            );
        let (_, cm) = built(&record);
        let got = template_of(&sts, Some(&cm)).unwrap();
        assert_eq!(got.differing_fields(&want), ["args", "resources"]);
        assert_eq!(got.resources.cpu_millis, Some(2000));
    }

    #[test]
    fn quantities_in_canonical_forms() {
        assert_eq!(parse_cpu_millis("250m").unwrap(), 250);
        assert_eq!(parse_cpu_millis("1").unwrap(), 1000);
        assert_eq!(parse_cpu_millis("1.5").unwrap(), 1500);
        assert!(parse_cpu_millis("lots").is_err());
        assert_eq!(parse_memory_mib("64Mi").unwrap(), 64);
        assert_eq!(parse_memory_mib("1Gi").unwrap(), 1024);
        assert_eq!(parse_memory_mib("67108864").unwrap(), 64);
        assert_eq!(parse_memory_mib("1024Ki").unwrap(), 1);
        assert!(parse_memory_mib("100M").is_err(), "not whole MiB");
        assert!(parse_memory_mib("x").is_err());
    }

    fn pod(name: &str, node: &str, image: &str) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some(node.into()),
                containers: vec![Container {
                    name: CONTAINER.into(),
                    image: Some(image.into()),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
            status: Some(PodStatus {
                phase: Some("Running".into()),
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..PodCondition::default()
                }]),
                container_statuses: Some(vec![ContainerStatus {
                    name: CONTAINER.into(),
                    image: image.into(),
                    ready: true,
                    ..ContainerStatus::default()
                }]),
                ..PodStatus::default()
            }),
        }
    }

    #[test]
    fn replica_health_and_digest() {
        let spec_digest = Digest::of(b"spec");
        let runtime_digest = Digest::of(b"runtime");
        let image = format!("reg.test/a/b:1@{spec_digest}");
        let none = BTreeSet::new();

        let p = pod("x-0", "n1", &image);
        let r = replica_of(&p, &none);
        assert!(r.ready && !r.failed);
        assert_eq!(
            r.image_digest,
            Some(spec_digest),
            "falls back to the pod spec"
        );

        let mut p2 = p.clone();
        p2.status
            .as_mut()
            .unwrap()
            .container_statuses
            .as_mut()
            .unwrap()[0]
            .image_id = format!("docker-pullable://reg.test/a/b@{runtime_digest}");
        assert_eq!(replica_of(&p2, &none).image_digest, Some(runtime_digest));

        let mut failed = p.clone();
        let st = failed.status.as_mut().unwrap();
        st.phase = Some("Failed".into());
        st.container_statuses.as_mut().unwrap()[0].state = Some(ContainerState {
            terminated: Some(ContainerStateTerminated {
                exit_code: 1,
                ..ContainerStateTerminated::default()
            }),
            ..ContainerState::default()
        });
        let r = replica_of(&failed, &none);
        assert!(r.failed && !r.ready);

        let lost = BTreeSet::from(["n1".to_owned()]);
        let r = replica_of(&p, &lost);
        assert!(r.failed && !r.ready, "a pod on a lost node failed");

        let mut deleting = p.clone();
        deleting.metadata.deletion_timestamp =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
            ));
        assert!(!replica_of(&deleting, &none).ready);
    }

    #[test]
    fn node_readiness() {
        let node = |ready: &str, taint: Option<&str>| Node {
            spec: Some(NodeSpec {
                taints: taint.map(|k| {
                    vec![Taint {
                        key: k.into(),
                        effect: "NoSchedule".into(),
                        ..Taint::default()
                    }]
                }),
                ..NodeSpec::default()
            }),
            status: Some(NodeStatus {
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: ready.into(),
                    ..NodeCondition::default()
                }]),
                ..NodeStatus::default()
            }),
            ..Node::default()
        };
        assert!(!node_failed(&node("True", None)));
        assert!(node_failed(&node("False", None)));
        assert!(node_failed(&node("Unknown", None)));
        assert!(node_failed(&node(
            "True",
            Some("node.kubernetes.io/unreachable")
        )));
        assert!(!node_failed(&node("True", Some("dedicated"))));
    }

    #[test]
    fn ordinals() {
        assert_eq!(ordinal("ledger", "ledger-2"), Some(2));
        assert_eq!(ordinal("ledger", "ledger-x"), None);
        assert_eq!(ordinal("ledger", "ledgers-1"), None);
        assert_eq!(ordinal("ledger", "other-1"), None);
    }
}
