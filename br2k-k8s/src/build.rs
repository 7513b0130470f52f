//! Builds the Kubernetes objects of a record (pure functions, no I/O).

use std::collections::BTreeMap;

use br2k_core::{Digest, Probe, ProbeCheck, ServiceRecord, ServiceSpec, ServiceState};
use k8s_openapi::api::apps::v1::{
    RollingUpdateStatefulSetStrategy, StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy,
};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HorizontalPodAutoscaler, HorizontalPodAutoscalerSpec,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMap, ConfigMapKeySelector, Container, ContainerPort, EnvVar,
    EnvVarSource, ExecAction, HTTPGetAction, PodAffinityTerm, PodAntiAffinity, PodSpec,
    PodTemplateSpec, Probe as KProbe, ResourceRequirements, SeccompProfile, SecretKeySelector,
    SecurityContext, Service, ServicePort, ServiceSpec as KServiceSpec, TCPSocketAction,
    Toleration, TopologySpreadConstraint, WeightedPodAffinityTerm,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::names::{
    ANNOTATION_CONFIG_HASH, ANNOTATION_SPEC_HASH, CONTAINER, Names, object_labels, selector_labels,
};

/// Node-level placement options applied to every pod (e.g. tolerations for fake or
/// dedicated nodes).
#[derive(Debug, Clone, Default)]
pub struct Placement {
    /// Tolerations added to the pod spec.
    pub tolerations: Vec<Toleration>,
    /// Node selector added to the pod spec.
    pub node_selector: BTreeMap<String, String>,
}

/// The topology key spreading replicas across nodes.
pub const HOSTNAME_KEY: &str = "kubernetes.io/hostname";

/// Quorum of `n` replicas: `n/2 + 1`, or 0 for no replicas.
pub fn quorum(n: u32) -> u32 {
    if n == 0 { 0 } else { n / 2 + 1 }
}

fn meta(record: &ServiceRecord, names: &Names, name: &str, ns: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(ns.to_owned()),
        labels: Some(object_labels(&record.id, names, record.version)),
        annotations: Some(BTreeMap::from([(
            ANNOTATION_SPEC_HASH.to_owned(),
            record.spec_hash.to_string(),
        )])),
        ..ObjectMeta::default()
    }
}

/// The owner reference every dependent object carries: the ConfigMap is the root, so
/// deleting it removes everything (the garbage collector cascades).
pub fn owner_reference(config: &ConfigMap) -> Option<OwnerReference> {
    Some(OwnerReference {
        api_version: "v1".into(),
        kind: "ConfigMap".into(),
        name: config.metadata.name.clone()?,
        uid: config.metadata.uid.clone()?,
        controller: Some(true),
        block_owner_deletion: Some(true),
    })
}

/// The hash of the environment values of `spec` (the ConfigMap's data), the pod
/// template's [`ANNOTATION_CONFIG_HASH`].
pub fn config_hash(spec: &ServiceSpec) -> String {
    // A sorted map of strings: its JSON is canonical.
    let bytes = serde_json::to_vec(&spec.env).expect("a map of strings serializes");
    Digest::of(&bytes).to_string()
}

/// The ConfigMap: the non-secret environment, one key per variable.
pub fn config_map(record: &ServiceRecord, names: &Names, ns: &str) -> ConfigMap {
    ConfigMap {
        metadata: meta(record, names, &names.config, ns),
        data: Some(record.spec.env.clone()),
        ..ConfigMap::default()
    }
}

fn probe(p: &Probe) -> KProbe {
    let mut k = KProbe {
        period_seconds: Some(p.period_seconds as i32),
        failure_threshold: Some(p.failure_threshold as i32),
        ..KProbe::default()
    };
    match &p.check {
        ProbeCheck::Http { path, port } => {
            k.http_get = Some(HTTPGetAction {
                path: Some(path.clone()),
                port: IntOrString::Int(i32::from(*port)),
                ..HTTPGetAction::default()
            })
        }
        ProbeCheck::Tcp { port } => {
            k.tcp_socket = Some(TCPSocketAction {
                port: IntOrString::Int(i32::from(*port)),
                ..TCPSocketAction::default()
            })
        }
        ProbeCheck::Exec { command } => {
            k.exec = Some(ExecAction {
                command: Some(command.clone()),
            })
        }
    }
    k
}

fn container(spec: &ServiceSpec, names: &Names) -> Container {
    let mut env: Vec<EnvVar> = spec
        .env
        .keys()
        .map(|k| EnvVar {
            name: k.clone(),
            value_from: Some(EnvVarSource {
                config_map_key_ref: Some(ConfigMapKeySelector {
                    name: names.config.clone(),
                    key: k.clone(),
                    optional: Some(false),
                }),
                ..EnvVarSource::default()
            }),
            ..EnvVar::default()
        })
        .collect();
    env.extend(spec.secret_env.iter().map(|s| EnvVar {
        name: s.name.clone(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: s.secret.clone(),
                key: s.key.clone(),
                optional: Some(false),
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }));
    let mut amounts = BTreeMap::new();
    if let Some(cpu) = spec.resources.cpu_millis {
        amounts.insert("cpu".to_owned(), Quantity(format!("{cpu}m")));
    }
    if let Some(mem) = spec.resources.memory_mib {
        amounts.insert("memory".to_owned(), Quantity(format!("{mem}Mi")));
    }
    let resources = (!amounts.is_empty()).then(|| ResourceRequirements {
        limits: Some(amounts.clone()),
        requests: Some(amounts),
        ..ResourceRequirements::default()
    });
    Container {
        name: CONTAINER.to_owned(),
        image: Some(spec.image.to_string()),
        args: (!spec.args.is_empty()).then(|| spec.args.clone()),
        ports: (!spec.ports.is_empty()).then(|| {
            spec.ports
                .iter()
                .map(|p| ContainerPort {
                    name: Some(p.name.clone()),
                    container_port: i32::from(p.port),
                    protocol: Some("TCP".into()),
                    ..ContainerPort::default()
                })
                .collect()
        }),
        env: (!env.is_empty()).then_some(env),
        resources,
        startup_probe: spec.probes.startup.as_ref().map(probe),
        readiness_probe: spec.probes.readiness.as_ref().map(probe),
        liveness_probe: spec.probes.liveness.as_ref().map(probe),
        security_context: Some(hardened()),
        ..Container::default()
    }
}

/// The container's security context: not privileged, no privilege escalation, every
/// capability dropped, the runtime's default seccomp profile, and `runAsNonRoot` (the
/// kubelet refuses to start an image whose user is root or not numeric; images built
/// by br2k-oci's `ImageBuilder` carry a numeric non-root user).
fn hardened() -> SecurityContext {
    SecurityContext {
        privileged: Some(false),
        allow_privilege_escalation: Some(false),
        run_as_non_root: Some(true),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".to_owned()]),
            ..Capabilities::default()
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".to_owned(),
            ..SeccompProfile::default()
        }),
        ..SecurityContext::default()
    }
}

/// The hardening fields of a live pod spec (a StatefulSet's template) that differ from
/// what [`stateful_set`] sets, as paths under `spec.template.spec` (e.g.
/// `containers[app].securityContext.runAsNonRoot`). A field another writer removed
/// leaves no foreign owner in `managedFields`; this finds it all the same.
pub fn hardening_gaps(pod: &PodSpec) -> Vec<String> {
    let mut gaps = Vec::new();
    if pod.automount_service_account_token != Some(false) {
        gaps.push("automountServiceAccountToken".to_owned());
    }
    let want = hardened();
    let all = pod
        .containers
        .iter()
        .chain(pod.init_containers.iter().flatten());
    for c in all {
        let at = |field: &str| format!("containers[{}].securityContext.{field}", c.name);
        let Some(sc) = c.security_context.as_ref() else {
            gaps.push(format!("containers[{}].securityContext", c.name));
            continue;
        };
        if sc.privileged != want.privileged {
            gaps.push(at("privileged"));
        }
        if sc.allow_privilege_escalation != want.allow_privilege_escalation {
            gaps.push(at("allowPrivilegeEscalation"));
        }
        if sc.run_as_non_root != want.run_as_non_root {
            gaps.push(at("runAsNonRoot"));
        }
        let caps = sc.capabilities.as_ref();
        if !caps
            .and_then(|c| c.drop.as_ref())
            .is_some_and(|d| d.iter().any(|x| x == "ALL"))
        {
            gaps.push(at("capabilities.drop"));
        }
        if caps
            .and_then(|c| c.add.as_ref())
            .is_some_and(|a| !a.is_empty())
        {
            gaps.push(at("capabilities.add"));
        }
        if sc.seccomp_profile.as_ref().map(|p| p.type_.as_str()) != Some("RuntimeDefault") {
            gaps.push(at("seccompProfile"));
        }
    }
    gaps
}

/// The replica count to apply: the record's desired count, except that when an
/// autoscaler owns the count (`spec.autoscaling`) and the service runs, a live count
/// inside the bounds is kept (so br2k and the autoscaler do not fight).
pub fn replicas_to_apply(record: &ServiceRecord, live: Option<u32>) -> u32 {
    let desired = record.desired_replicas();
    match (&record.spec.autoscaling, record.state, live) {
        (Some(a), ServiceState::Running, Some(n)) => n.clamp(a.min_replicas, a.max_replicas),
        _ => desired,
    }
}

/// How the StatefulSet controller may update running pods after a template change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rollout {
    /// Roll every pod to the template (`partition: 0`): the record changed.
    Roll,
    /// Update no pod (`partition` = replicas): the pods run the record, so a template
    /// change can only be tampering, which br2k reverts; no pod is restarted for it,
    /// and a pod that is recreated meanwhile gets the current (recorded) revision.
    Frozen,
}

/// The StatefulSet: stable identities, pods spread across nodes, image pinned by
/// digest, parallel pod management for fast recovery, rolling updates gated by
/// `rollout`.
pub fn stateful_set(
    record: &ServiceRecord,
    names: &Names,
    ns: &str,
    replicas: u32,
    rollout: Rollout,
    placement: &Placement,
) -> StatefulSet {
    let selector = LabelSelector {
        match_labels: Some(selector_labels(&record.id)),
        ..LabelSelector::default()
    };
    let mut pod_labels = selector_labels(&record.id);
    pod_labels.insert(crate::names::LABEL_NAME.to_owned(), names.base.clone());
    let pod = PodSpec {
        containers: vec![container(&record.spec, names)],
        enable_service_links: Some(false),
        // A service talks to its chain and peers, not to the Kubernetes API.
        automount_service_account_token: Some(false),
        topology_spread_constraints: Some(vec![TopologySpreadConstraint {
            max_skew: 1,
            topology_key: HOSTNAME_KEY.into(),
            when_unsatisfiable: "ScheduleAnyway".into(),
            label_selector: Some(selector.clone()),
            ..TopologySpreadConstraint::default()
        }]),
        affinity: Some(Affinity {
            pod_anti_affinity: Some(PodAntiAffinity {
                preferred_during_scheduling_ignored_during_execution: Some(vec![
                    WeightedPodAffinityTerm {
                        weight: 100,
                        pod_affinity_term: PodAffinityTerm {
                            label_selector: Some(selector.clone()),
                            topology_key: HOSTNAME_KEY.into(),
                            ..PodAffinityTerm::default()
                        },
                    },
                ]),
                ..PodAntiAffinity::default()
            }),
            ..Affinity::default()
        }),
        tolerations: (!placement.tolerations.is_empty()).then(|| placement.tolerations.clone()),
        node_selector: (!placement.node_selector.is_empty())
            .then(|| placement.node_selector.clone()),
        ..PodSpec::default()
    };
    StatefulSet {
        metadata: meta(record, names, &names.base, ns),
        spec: Some(StatefulSetSpec {
            replicas: Some(replicas as i32),
            selector,
            service_name: Some(names.headless.clone()),
            pod_management_policy: Some("Parallel".into()),
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateStatefulSetStrategy {
                    partition: Some(match rollout {
                        Rollout::Roll => 0,
                        Rollout::Frozen => replicas as i32,
                    }),
                    ..RollingUpdateStatefulSetStrategy::default()
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(BTreeMap::from([(
                        ANNOTATION_CONFIG_HASH.to_owned(),
                        config_hash(&record.spec),
                    )])),
                    ..ObjectMeta::default()
                }),
                spec: Some(pod),
            },
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    }
}

fn service_ports(spec: &ServiceSpec) -> Option<Vec<ServicePort>> {
    (!spec.ports.is_empty()).then(|| {
        spec.ports
            .iter()
            .map(|p| ServicePort {
                name: Some(p.name.clone()),
                port: i32::from(p.port),
                target_port: Some(IntOrString::String(p.name.clone())),
                protocol: Some("TCP".into()),
                ..ServicePort::default()
            })
            .collect()
    })
}

/// The headless Service: stable DNS names `<pod>.<name>-peers` for every replica,
/// published before readiness so peers can find each other while starting.
pub fn headless_service(record: &ServiceRecord, names: &Names, ns: &str) -> Service {
    Service {
        metadata: meta(record, names, &names.headless, ns),
        spec: Some(KServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(selector_labels(&record.id)),
            ports: service_ports(&record.spec),
            publish_not_ready_addresses: Some(true),
            ..KServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The client Service: a cluster IP balancing over ready replicas.
pub fn client_service(record: &ServiceRecord, names: &Names, ns: &str) -> Service {
    Service {
        metadata: meta(record, names, &names.base, ns),
        spec: Some(KServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector_labels(&record.id)),
            ports: service_ports(&record.spec),
            ..KServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The PodDisruptionBudget keeping a quorum (`n/2 + 1`) of replicas available.
pub fn disruption_budget(
    record: &ServiceRecord,
    names: &Names,
    ns: &str,
    replicas: u32,
) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: meta(record, names, &names.base, ns),
        spec: Some(PodDisruptionBudgetSpec {
            min_available: Some(IntOrString::Int(quorum(replicas) as i32)),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(&record.id)),
                ..LabelSelector::default()
            }),
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}

/// The HorizontalPodAutoscaler for a spec with `autoscaling` (CPU target 80 %), or
/// `None` when the spec fixes the replica count.
pub fn autoscaler(
    record: &ServiceRecord,
    names: &Names,
    ns: &str,
) -> Option<HorizontalPodAutoscaler> {
    let a = record.spec.autoscaling.as_ref()?;
    Some(HorizontalPodAutoscaler {
        metadata: meta(record, names, &names.base, ns),
        spec: HorizontalPodAutoscalerSpec {
            min_replicas: Some(a.min_replicas.max(1) as i32),
            max_replicas: a.max_replicas.max(1) as i32,
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".into()),
                kind: "StatefulSet".into(),
                name: names.base.clone(),
            },
            ..HorizontalPodAutoscalerSpec::default()
        },
        ..HorizontalPodAutoscaler::default()
    })
}

/// Sets `owner` as the only owner reference of `meta`.
pub fn set_owner(meta: &mut ObjectMeta, owner: Option<OwnerReference>) {
    meta.owner_references = owner.map(|o| vec![o]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use br2k_core::Autoscaling;
    use br2k_core::ServiceId;
    use br2k_core::conformance::{sample_record, sample_spec};

    fn record() -> ServiceRecord {
        sample_record(&ServiceId::new("ledger").unwrap(), sample_spec("reg.test"))
    }

    #[test]
    fn quorum_is_a_majority() {
        assert_eq!([0, 1, 2, 3, 4, 5].map(quorum), [0, 1, 2, 2, 3, 3]);
    }

    #[test]
    fn replicas_follow_the_record_unless_an_autoscaler_owns_them() {
        let mut r = record();
        assert_eq!(replicas_to_apply(&r, Some(7)), 3);
        r.state = ServiceState::Paused;
        assert_eq!(replicas_to_apply(&r, Some(7)), 0);
        r.state = ServiceState::Running;
        r.spec.autoscaling = Some(Autoscaling {
            min_replicas: 2,
            max_replicas: 6,
        });
        assert_eq!(
            replicas_to_apply(&r, Some(5)),
            5,
            "autoscaler's choice kept"
        );
        assert_eq!(replicas_to_apply(&r, Some(9)), 6, "clamped to the bounds");
        assert_eq!(
            replicas_to_apply(&r, None),
            3,
            "created with the record's count"
        );
        assert!(autoscaler(&r, &Names::of(&r.id), "ns").is_some());
    }

    #[test]
    fn rollout_sets_the_partition() {
        let r = record();
        let names = Names::of(&r.id);
        let partition = |rollout| {
            let sts = stateful_set(&r, &names, "ns", 3, rollout, &Placement::default());
            let v = serde_json::to_value(&sts).unwrap();
            assert_eq!(v["spec"]["updateStrategy"]["type"], "RollingUpdate");
            v["spec"]["updateStrategy"]["rollingUpdate"]["partition"].clone()
        };
        assert_eq!(
            partition(Rollout::Roll),
            0,
            "every pod follows the template"
        );
        assert_eq!(partition(Rollout::Frozen), 3, "no pod follows the template");
    }

    #[test]
    fn pod_template_changes_with_the_environment_values_only() {
        let r = record();
        let names = Names::of(&r.id);
        let template_hash = |r: &ServiceRecord| {
            let sts = stateful_set(r, &names, "ns", 3, Rollout::Roll, &Placement::default());
            let v = serde_json::to_value(&sts).unwrap();
            v["spec"]["template"]["metadata"]["annotations"][ANNOTATION_CONFIG_HASH].clone()
        };
        let base = template_hash(&r);
        assert_eq!(base, config_hash(&r.spec).as_str());
        let mut changed = r.clone();
        changed.spec.env.insert("LOG_LEVEL".into(), "debug".into());
        assert_ne!(
            template_hash(&changed),
            base,
            "a new value restarts the pods"
        );
        let mut scaled = r.clone();
        scaled.spec.replicas = 5;
        scaled.replicas = 5;
        scaled.version = 2;
        assert_eq!(template_hash(&scaled), base, "scaling alone does not");
        let mut renamed = r.clone();
        let v = renamed.spec.env.remove("LOG_LEVEL").unwrap();
        renamed.spec.env.insert("LOG_LEVE".into(), format!("L{v}"));
        assert_ne!(
            template_hash(&renamed),
            base,
            "keys and values are not confused"
        );
    }

    #[test]
    fn containers_are_hardened_and_run_as_non_root() {
        let r = record();
        let names = Names::of(&r.id);
        let sts = stateful_set(&r, &names, "ns", 3, Rollout::Roll, &Placement::default());
        let v = serde_json::to_value(&sts).unwrap();
        let pod = &v["spec"]["template"]["spec"];
        assert_eq!(pod["automountServiceAccountToken"], false);
        assert!(
            pod.get("serviceAccountName").is_none(),
            "the namespace default"
        );
        for key in ["hostNetwork", "hostPID", "hostIPC"] {
            assert!(pod.get(key).is_none(), "{key}");
        }
        let sc = &pod["containers"][0]["securityContext"];
        assert_eq!(sc["runAsNonRoot"], true);
        assert_eq!(sc["privileged"], false);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["capabilities"]["drop"][0], "ALL");
        assert!(sc["capabilities"].get("add").is_none());
        assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    }

    #[test]
    fn hardening_gaps_find_removed_and_weakened_fields() {
        let r = record();
        let names = Names::of(&r.id);
        let sts = stateful_set(&r, &names, "ns", 3, Rollout::Roll, &Placement::default());
        let pod = sts.spec.unwrap().template.spec.unwrap();
        assert!(
            hardening_gaps(&pod).is_empty(),
            "{:?}",
            hardening_gaps(&pod)
        );
        let mut removed = pod.clone();
        let sc = removed.containers[0].security_context.as_mut().unwrap();
        sc.run_as_non_root = None;
        sc.capabilities.as_mut().unwrap().add = Some(vec!["SYS_ADMIN".into()]);
        removed.automount_service_account_token = None;
        assert_eq!(
            hardening_gaps(&removed),
            [
                "automountServiceAccountToken",
                "containers[app].securityContext.runAsNonRoot",
                "containers[app].securityContext.capabilities.add",
            ]
        );
        let mut bare = pod;
        bare.containers[0].security_context = None;
        assert_eq!(hardening_gaps(&bare), ["containers[app].securityContext"]);
    }

    #[test]
    fn statefulset_spreads_pins_and_carries_labels() {
        let r = record();
        let names = Names::of(&r.id);
        let sts = stateful_set(&r, &names, "ns", 3, Rollout::Roll, &Placement::default());
        let v = serde_json::to_value(&sts).unwrap();
        assert_eq!(v["kind"], "StatefulSet");
        assert_eq!(v["spec"]["podManagementPolicy"], "Parallel");
        assert_eq!(v["spec"]["serviceName"], "ledger-peers");
        assert_eq!(
            v["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "br2k"
        );
        assert_eq!(v["metadata"]["labels"]["br2k.io/record-version"], "1");
        assert_eq!(
            v["metadata"]["annotations"]["br2k.io/spec-hash"],
            r.spec_hash.to_string()
        );
        let pod = &v["spec"]["template"]["spec"];
        assert_eq!(
            pod["topologySpreadConstraints"][0]["topologyKey"],
            HOSTNAME_KEY
        );
        assert!(
            pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
                .is_array()
        );
        assert!(
            pod["containers"][0]["image"]
                .as_str()
                .unwrap()
                .contains("@sha256:")
        );
        let env = pod["containers"][0]["env"].as_array().unwrap();
        assert!(
            env.iter()
                .any(|e| e["valueFrom"]["secretKeyRef"]["name"] == "sample-signer")
        );
        assert!(
            env.iter().all(|e| e.get("value").is_none()),
            "values live in the ConfigMap"
        );
        let pdb = serde_json::to_value(disruption_budget(&r, &names, "ns", 3)).unwrap();
        assert_eq!(pdb["spec"]["minAvailable"], 2);
        let hl = serde_json::to_value(headless_service(&r, &names, "ns")).unwrap();
        assert_eq!(hl["spec"]["clusterIP"], "None");
    }
}
