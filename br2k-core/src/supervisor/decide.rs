//! The supervisor's decision logic as pure functions: what is wrong
//! ([`diagnose`]) and what to do about it ([`plan`]). No I/O, so every rule is
//! tested without a backend.

use serde::{Deserialize, Serialize};

use crate::diagnosis::{Diagnosis, Finding, RecoveryAction};
use crate::observed::{ObservedState, WorkloadTemplate};
use crate::record::{ServiceRecord, ServiceState};

/// The state of the recorded image in one registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "status", content = "detail")]
pub enum ImageStatus {
    /// The registry holds the image and its bytes match the recorded digest.
    Ok,
    /// The registry does not hold the image.
    Missing,
    /// The registry serves bytes that do not match the recorded digest.
    Tampered(String),
    /// The registry cannot be reached.
    Down,
}

/// The state of the recorded image in one registry, named by its host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageHealth {
    /// Registry host (as in image references).
    pub registry: String,
    /// What that registry holds.
    pub status: ImageStatus,
}

impl ImageHealth {
    /// Builds an entry.
    pub fn new(registry: impl Into<String>, status: ImageStatus) -> Self {
        Self {
            registry: registry.into(),
            status,
        }
    }

    /// Whether this registry serves the verified image.
    pub fn is_ok(&self) -> bool {
        self.status == ImageStatus::Ok
    }
}

/// Compares the record with what runs and with what the registries hold.
///
/// Findings, in order: chain endpoint down (`record.stale`), missing or unexpected
/// workload, replicas drifted, image drifted, image source unhealthy, template
/// tampered, foreign fields, replicas unhealthy, then one per registry that is
/// missing, tampered or down.
///
/// - The replica count is drift unless the state is Running and an autoscaler owns the
///   count within its bounds ([`crate::ServiceSpec::allows_replicas`]); Paused wants 0.
/// - The image is compared by digest only: a mirror serving the same digest is fine.
/// - A replica counts as unhealthy when it has *failed*; one that is merely not ready
///   yet (starting) is left to the replicator's probes, so the supervisor does not
///   kill replicas that are still starting.
pub fn diagnose(
    record: &ServiceRecord,
    observed: Option<&ObservedState>,
    images: &[ImageHealth],
) -> Diagnosis {
    let mut findings = Vec::new();
    if record.stale {
        findings.push(Finding::ChainEndpointDown {
            detail: format!(
                "registry unreachable; using the last verified record v{}",
                record.version
            ),
        });
    }
    match (record.wants_workload(), observed) {
        (true, None) => findings.push(Finding::MissingWorkload { parts: Vec::new() }),
        (false, Some(_)) => findings.push(Finding::UnexpectedWorkload),
        (false, None) => {}
        (true, Some(obs)) => workload_findings(record, obs, images, &mut findings),
    }
    for health in images {
        let registry = health.registry.clone();
        match &health.status {
            ImageStatus::Ok => {}
            ImageStatus::Missing => findings.push(Finding::ImageUnavailable { registry }),
            ImageStatus::Tampered(detail) => findings.push(Finding::ImageTampered {
                registry,
                detail: detail.clone(),
            }),
            ImageStatus::Down => findings.push(Finding::RegistryDown { registry }),
        }
    }
    Diagnosis {
        id: record.id.clone(),
        record_version: Some(record.version),
        findings,
    }
}

fn workload_findings(
    record: &ServiceRecord,
    obs: &ObservedState,
    images: &[ImageHealth],
    findings: &mut Vec<Finding>,
) {
    if !obs.missing_parts.is_empty() {
        findings.push(Finding::MissingWorkload {
            parts: obs.missing_parts.clone(),
        });
    }
    let desired = record.desired_replicas();
    let replicas_ok = match record.state {
        ServiceState::Running => record
            .spec
            .allows_replicas(obs.desired_replicas, record.replicas),
        _ => obs.desired_replicas == 0,
    };
    if !replicas_ok {
        findings.push(Finding::ReplicasDrifted {
            desired,
            observed: obs.desired_replicas,
        });
    }
    let expected = record.spec.image.digest().copied();
    if let Some(expected) = expected {
        let live = obs.template.image.digest().copied();
        let running_other = obs
            .replicas
            .iter()
            .find_map(|r| r.image_digest.filter(|d| *d != expected));
        if live != Some(expected) {
            findings.push(Finding::ImageDrifted {
                expected,
                observed: obs.template.image.to_string(),
            });
        } else if let Some(other) = running_other {
            findings.push(Finding::ImageDrifted {
                expected,
                observed: format!("a replica runs {other}"),
            });
        }
    }
    // The live image's registry must not be down or serve wrong bytes while another
    // registry serves the verified image: the next replica started (rescheduled,
    // scaled) could not pull it, or would pull corrupt bytes. (A copy that is merely
    // missing is repaired in place by a copy.)
    let live_registry = obs.template.image.registry();
    let source = images.iter().find(|h| h.registry == live_registry);
    if let Some(source) = source
        && matches!(source.status, ImageStatus::Down | ImageStatus::Tampered(_))
        && images.iter().any(ImageHealth::is_ok)
    {
        findings.push(Finding::ImageSourceUnhealthy {
            registry: live_registry.to_owned(),
        });
    }
    let fields = WorkloadTemplate::from_spec(&record.spec).differing_fields(&obs.template);
    if !fields.is_empty() {
        findings.push(Finding::TemplateTampered {
            fields: fields.into_iter().map(str::to_owned).collect(),
        });
    }
    if !obs.foreign_fields.is_empty() {
        findings.push(Finding::ForeignFields {
            fields: obs.foreign_fields.clone(),
        });
    }
    let failed: Vec<String> = obs
        .replicas
        .iter()
        .filter(|r| r.failed)
        .map(|r| r.name.clone())
        .collect();
    if !failed.is_empty() {
        findings.push(Finding::ReplicasUnhealthy {
            ready: obs.ready_replicas,
            desired,
            replicas: failed,
        });
    }
}

/// Whether `observed` runs exactly what `record` asks for, as far as readiness goes:
/// the recorded replica count, every replica ready (not failed) and running the
/// recorded digest; or no workload when none must run.
pub fn converged(record: &ServiceRecord, observed: Option<&ObservedState>) -> bool {
    match (record.wants_workload(), observed) {
        (false, obs) => obs.is_none(),
        (true, None) => false,
        (true, Some(obs)) => {
            let expected = record.spec.image.digest().copied();
            obs.replicas.len() as u32 == obs.desired_replicas
                && obs.ready_replicas == obs.desired_replicas
                && obs.replicas.iter().all(|r| {
                    r.ready && !r.failed && (expected.is_none() || r.image_digest == expected)
                })
        }
    }
}

/// Findings that concern the live workload (as opposed to the chain or the image
/// stores): the ones a recovery waits to see cleared.
pub fn is_workload_finding(f: &Finding) -> bool {
    matches!(
        f,
        Finding::MissingWorkload { .. }
            | Finding::UnexpectedWorkload
            | Finding::ReplicasDrifted { .. }
            | Finding::ImageDrifted { .. }
            | Finding::TemplateTampered { .. }
            | Finding::ForeignFields { .. }
            | Finding::ImageSourceUnhealthy { .. }
            | Finding::ReplicasUnhealthy { .. }
    )
}

/// The actions that repair `diagnosis`, deduplicated, in execution order:
/// use the last verified record, repair images, apply the record, replace replicas,
/// remove the workload, wait.
///
/// - Missing workload or parts, drifted replicas or image, tampered template → one
///   [`RecoveryAction::ApplyRecord`] from the first registry whose image is Ok (the
///   record's own registry when no store is known; [`RecoveryAction::Wait`] when
///   stores are known and none is Ok).
/// - Unhealthy replicas → [`RecoveryAction::ReplaceReplicas`].
/// - Unexpected workload → [`RecoveryAction::RemoveWorkload`].
/// - Image missing or tampered in a registry → [`RecoveryAction::RepairImage`] from the
///   first Ok registry, or a wait when there is none.
/// - Registry down → nothing for it (applies use a healthy registry).
/// - Chain endpoint down → [`RecoveryAction::UseLastVerifiedRecord`], then the
///   actions above computed from that cached record.
pub fn plan(
    record: &ServiceRecord,
    diagnosis: &Diagnosis,
    images: &[ImageHealth],
) -> Vec<RecoveryAction> {
    let healthy = images
        .iter()
        .find(|h| h.is_ok())
        .map(|h| h.registry.clone());
    let no_source = || RecoveryAction::Wait {
        reason: format!(
            "no registry serves verified image {}",
            record
                .spec
                .image
                .digest()
                .map_or_else(String::new, |d| d.to_string())
        ),
    };
    let mut use_cached = false;
    let mut repairs = Vec::new();
    let mut apply = false;
    let mut replace: Vec<String> = Vec::new();
    let mut remove = false;
    let mut waits = Vec::new();
    for finding in &diagnosis.findings {
        match finding {
            Finding::ChainEndpointDown { .. } => use_cached = true,
            Finding::MissingWorkload { .. }
            | Finding::ReplicasDrifted { .. }
            | Finding::ImageDrifted { .. }
            | Finding::TemplateTampered { .. }
            | Finding::ForeignFields { .. }
            | Finding::ImageSourceUnhealthy { .. } => apply = true,
            Finding::ReplicasUnhealthy { replicas, .. } => {
                for r in replicas {
                    if !replace.contains(r) {
                        replace.push(r.clone());
                    }
                }
            }
            Finding::UnexpectedWorkload => remove = true,
            Finding::ImageUnavailable { registry } | Finding::ImageTampered { registry, .. } => {
                match &healthy {
                    Some(from) => {
                        let action = RecoveryAction::RepairImage {
                            from: from.clone(),
                            to: registry.clone(),
                        };
                        if !repairs.contains(&action) {
                            repairs.push(action);
                        }
                    }
                    None => waits.push(no_source()),
                }
            }
            Finding::RegistryDown { .. } => {}
        }
    }
    let mut actions = Vec::new();
    if use_cached {
        actions.push(RecoveryAction::UseLastVerifiedRecord);
    }
    actions.extend(repairs);
    if apply {
        let registry = match (&healthy, images.is_empty()) {
            (Some(r), _) => Some(r.clone()),
            (None, true) => Some(record.spec.image.registry().to_owned()),
            (None, false) => None,
        };
        match registry {
            Some(registry) => actions.push(RecoveryAction::ApplyRecord {
                version: record.version,
                registry,
            }),
            None => waits.push(no_source()),
        }
    }
    if !replace.is_empty() {
        actions.push(RecoveryAction::ReplaceReplicas { replicas: replace });
    }
    if remove {
        actions.push(RecoveryAction::RemoveWorkload);
    }
    for w in waits {
        if !actions.contains(&w) {
            actions.push(w);
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;
    use crate::id::ServiceId;
    use crate::image::{ImageRef, Repository};
    use crate::observed::ObservedReplica;
    use crate::spec::{Autoscaling, ServiceSpec};

    const PRIMARY: &str = "primary.local";
    const MIRROR: &str = "mirror.local";

    fn image(registry: &str, seed: &[u8]) -> ImageRef {
        ImageRef::new(
            registry,
            Repository::new("team/app").unwrap(),
            Some("1.0"),
            Some(Digest::of(seed)),
        )
        .unwrap()
    }

    fn record(state: ServiceState) -> ServiceRecord {
        let mut spec = ServiceSpec::new(image(PRIMARY, b"v1"), 3).unwrap();
        spec.env.insert("MODE".into(), "prod".into());
        ServiceRecord {
            id: ServiceId::new("app").unwrap(),
            version: 2,
            latest_version: 2,
            spec_hash: spec.spec_hash(),
            spec,
            replicas: 3,
            state,
            owner: crate::record::Account("alice".into()),
            checkpoint: None,
            location: None,
            placement: None,
            as_of: Some(7),
            stale: false,
        }
    }

    fn running() -> ServiceRecord {
        record(ServiceState::Running)
    }

    /// What an in-sync replicator would report for `record`.
    fn live(record: &ServiceRecord) -> ObservedState {
        let template = WorkloadTemplate::from_spec(&record.spec);
        let n = record.desired_replicas();
        ObservedState {
            id: record.id.clone(),
            applied_version: Some(record.version),
            desired_replicas: n,
            ready_replicas: n,
            replicas: (0..n)
                .map(|i| ObservedReplica {
                    name: format!("{}-{i}", record.id),
                    image_digest: template.image.digest().copied(),
                    ready: true,
                    failed: false,
                })
                .collect(),
            template,
            missing_parts: Vec::new(),
            foreign_fields: Vec::new(),
        }
    }

    fn ok_both() -> Vec<ImageHealth> {
        vec![
            ImageHealth::new(PRIMARY, ImageStatus::Ok),
            ImageHealth::new(MIRROR, ImageStatus::Ok),
        ]
    }

    fn apply_from(registry: &str) -> RecoveryAction {
        RecoveryAction::ApplyRecord {
            version: 2,
            registry: registry.into(),
        }
    }

    fn names(d: &Diagnosis) -> Vec<&'static str> {
        d.findings.iter().map(Finding::name).collect()
    }

    #[test]
    fn in_sync_service_is_healthy_and_needs_nothing() {
        let rec = running();
        let d = diagnose(&rec, Some(&live(&rec)), &ok_both());
        assert!(d.is_healthy(), "{d:?}");
        assert_eq!(d.record_version, Some(2));
        assert!(plan(&rec, &d, &ok_both()).is_empty());
    }

    #[test]
    fn ready_or_stopped_without_workload_is_healthy() {
        for state in [ServiceState::Ready, ServiceState::Stopped] {
            let rec = record(state);
            let d = diagnose(&rec, None, &ok_both());
            assert!(d.is_healthy(), "{state}: {d:?}");
        }
    }

    /// One row: a name, how to break the live state, the images, the expected finding
    /// names and the expected plan.
    struct Case {
        name: &'static str,
        state: ServiceState,
        stale: bool,
        observed: fn(&ServiceRecord) -> Option<ObservedState>,
        images: Vec<ImageHealth>,
        findings: Vec<&'static str>,
        actions: Vec<RecoveryAction>,
    }

    fn case(name: &'static str) -> Case {
        Case {
            name,
            state: ServiceState::Running,
            stale: false,
            observed: |r| Some(live(r)),
            images: ok_both(),
            findings: Vec::new(),
            actions: Vec::new(),
        }
    }

    fn cases() -> Vec<Case> {
        vec![
            Case {
                observed: |_| None,
                findings: vec!["missing_workload"],
                actions: vec![apply_from(PRIMARY)],
                ..case("missing workload")
            },
            Case {
                observed: |r| {
                    let mut o = live(r);
                    o.missing_parts = vec!["service".into()];
                    Some(o)
                },
                findings: vec!["missing_workload"],
                actions: vec![apply_from(PRIMARY)],
                ..case("missing part")
            },
            Case {
                state: ServiceState::Stopped,
                observed: |_| Some(live(&running())),
                findings: vec!["unexpected_workload"],
                actions: vec![RecoveryAction::RemoveWorkload],
                ..case("stopped service with a live workload")
            },
            Case {
                state: ServiceState::Ready,
                observed: |_| Some(live(&running())),
                findings: vec!["unexpected_workload"],
                actions: vec![RecoveryAction::RemoveWorkload],
                ..case("ready service with a live workload")
            },
            Case {
                observed: |r| {
                    let mut o = live(r);
                    o.desired_replicas = 5;
                    Some(o)
                },
                findings: vec!["replicas_drifted"],
                actions: vec![apply_from(PRIMARY)],
                ..case("replicas drifted")
            },
            Case {
                state: ServiceState::Paused,
                observed: |_| Some(live(&running())),
                findings: vec!["replicas_drifted"],
                actions: vec![apply_from(PRIMARY)],
                ..case("paused service still has replicas")
            },
            Case {
                state: ServiceState::Paused,
                observed: |_| None,
                findings: vec!["missing_workload"],
                actions: vec![apply_from(PRIMARY)],
                ..case("paused service without workload")
            },
            Case {
                state: ServiceState::Paused,
                ..case("paused service with zero replicas is healthy")
            },
            Case {
                observed: |r| {
                    let mut o = live(r);
                    o.template.image = image(PRIMARY, b"evil");
                    for rep in &mut o.replicas {
                        rep.image_digest = Some(Digest::of(b"evil"));
                    }
                    Some(o)
                },
                findings: vec!["image_drifted"],
                actions: vec![apply_from(PRIMARY)],
                ..case("image drifted")
            },
            Case {
                observed: |r| {
                    let mut o = live(r);
                    o.replicas[1].image_digest = Some(Digest::of(b"old"));
                    Some(o)
                },
                findings: vec!["image_drifted"],
                actions: vec![apply_from(PRIMARY)],
                ..case("one replica runs another digest")
            },
            Case {
                observed: |r| {
                    let mut o = live(r);
                    o.template.image = o.template.image.with_registry(MIRROR).unwrap();
                    Some(o)
                },
                ..case("mirror serving the same digest is not drift")
            },
            Case {
                observed: |r| {
                    let mut o = live(r);
                    o.template.env.insert("MODE".into(), "debug".into());
                    o.template.args.push("--evil".into());
                    Some(o)
                },
                findings: vec!["template_tampered"],
                actions: vec![apply_from(PRIMARY)],
                ..case("template tampered")
            },
            Case {
                observed: |r| {
                    let mut o = live(r);
                    o.replicas[2].failed = true;
                    o.replicas[2].ready = false;
                    o.ready_replicas = 2;
                    Some(o)
                },
                findings: vec!["replicas_unhealthy"],
                actions: vec![RecoveryAction::ReplaceReplicas {
                    replicas: vec!["app-2".into()],
                }],
                ..case("replica failed")
            },
            Case {
                observed: |r| {
                    let mut o = live(r);
                    o.replicas[0].ready = false;
                    o.ready_replicas = 2;
                    Some(o)
                },
                ..case("a starting (not ready, not failed) replica is left alone")
            },
            Case {
                images: vec![
                    ImageHealth::new(PRIMARY, ImageStatus::Missing),
                    ImageHealth::new(MIRROR, ImageStatus::Ok),
                ],
                findings: vec!["image_unavailable"],
                actions: vec![RecoveryAction::RepairImage {
                    from: MIRROR.into(),
                    to: PRIMARY.into(),
                }],
                ..case("image missing in the primary the workload pulls from: repaired in place")
            },
            Case {
                images: vec![
                    ImageHealth::new(PRIMARY, ImageStatus::Tampered("layer 0".into())),
                    ImageHealth::new(MIRROR, ImageStatus::Ok),
                ],
                findings: vec!["image_source_unhealthy", "image_tampered"],
                actions: vec![
                    RecoveryAction::RepairImage {
                        from: MIRROR.into(),
                        to: PRIMARY.into(),
                    },
                    apply_from(MIRROR),
                ],
                ..case("corrupt copy in the primary the workload pulls from: pointed at the mirror")
            },
            Case {
                observed: |r| {
                    let mut o = live(r);
                    o.template.image = o.template.image.with_registry(MIRROR).unwrap();
                    Some(o)
                },
                images: vec![
                    ImageHealth::new(PRIMARY, ImageStatus::Missing),
                    ImageHealth::new(MIRROR, ImageStatus::Ok),
                ],
                findings: vec!["image_unavailable"],
                actions: vec![RecoveryAction::RepairImage {
                    from: MIRROR.into(),
                    to: PRIMARY.into(),
                }],
                ..case("image missing in the primary, workload on the mirror")
            },
            Case {
                observed: |r| {
                    let mut o = live(r);
                    o.foreign_fields = vec![
                        "statefulset/app: spec.template.metadata.labels.x (by kubectl-patch)"
                            .into(),
                    ];
                    Some(o)
                },
                findings: vec!["foreign_fields"],
                actions: vec![apply_from(PRIMARY)],
                ..case("a field set by another writer")
            },
            Case {
                images: vec![
                    ImageHealth::new(PRIMARY, ImageStatus::Ok),
                    ImageHealth::new(MIRROR, ImageStatus::Tampered("layer 0".into())),
                ],
                findings: vec!["image_tampered"],
                actions: vec![RecoveryAction::RepairImage {
                    from: PRIMARY.into(),
                    to: MIRROR.into(),
                }],
                ..case("image tampered in the mirror")
            },
            Case {
                images: vec![
                    ImageHealth::new(PRIMARY, ImageStatus::Down),
                    ImageHealth::new(MIRROR, ImageStatus::Ok),
                ],
                findings: vec!["image_source_unhealthy", "registry_down"],
                actions: vec![apply_from(MIRROR)],
                ..case("primary down: the workload is pointed at the mirror")
            },
            Case {
                observed: |r| {
                    let mut o = live(r);
                    o.template.image = o.template.image.with_registry(MIRROR).unwrap();
                    Some(o)
                },
                images: vec![
                    ImageHealth::new(PRIMARY, ImageStatus::Down),
                    ImageHealth::new(MIRROR, ImageStatus::Ok),
                ],
                findings: vec!["registry_down"],
                ..case("primary down, workload on the mirror: nothing to do")
            },
            Case {
                stale: true,
                findings: vec!["chain_endpoint_down"],
                actions: vec![RecoveryAction::UseLastVerifiedRecord],
                ..case("chain endpoint down, workload in sync")
            },
            // Combinations.
            Case {
                observed: |_| None,
                images: vec![
                    ImageHealth::new(PRIMARY, ImageStatus::Down),
                    ImageHealth::new(MIRROR, ImageStatus::Ok),
                ],
                findings: vec!["missing_workload", "registry_down"],
                actions: vec![apply_from(MIRROR)],
                ..case("primary down and workload missing: apply from the mirror")
            },
            Case {
                observed: |r| {
                    let mut o = live(r);
                    o.desired_replicas = 1;
                    o.template.image = image(PRIMARY, b"evil");
                    o.template.probes = Default::default();
                    o.template.resources.cpu_millis = Some(1);
                    o.missing_parts = vec!["budget".into()];
                    Some(o)
                },
                findings: vec![
                    "missing_workload",
                    "replicas_drifted",
                    "image_drifted",
                    "template_tampered",
                ],
                actions: vec![apply_from(PRIMARY)],
                ..case("several drifts give one apply")
            },
            Case {
                stale: true,
                observed: |r| {
                    let mut o = live(r);
                    o.desired_replicas = 9;
                    o.replicas[0].failed = true;
                    Some(o)
                },
                images: vec![
                    ImageHealth::new(PRIMARY, ImageStatus::Tampered("manifest".into())),
                    ImageHealth::new(MIRROR, ImageStatus::Ok),
                ],
                findings: vec![
                    "chain_endpoint_down",
                    "replicas_drifted",
                    "image_source_unhealthy",
                    "replicas_unhealthy",
                    "image_tampered",
                ],
                actions: vec![
                    RecoveryAction::UseLastVerifiedRecord,
                    RecoveryAction::RepairImage {
                        from: MIRROR.into(),
                        to: PRIMARY.into(),
                    },
                    apply_from(MIRROR),
                    RecoveryAction::ReplaceReplicas {
                        replicas: vec!["app-0".into()],
                    },
                ],
                ..case("chain down plus drift, failure and tampered primary")
            },
            Case {
                observed: |_| None,
                images: vec![
                    ImageHealth::new(PRIMARY, ImageStatus::Missing),
                    ImageHealth::new(MIRROR, ImageStatus::Down),
                ],
                findings: vec!["missing_workload", "image_unavailable", "registry_down"],
                actions: vec![RecoveryAction::Wait {
                    reason: format!("no registry serves verified image {}", Digest::of(b"v1")),
                }],
                ..case("no healthy registry: wait once")
            },
            Case {
                state: ServiceState::Stopped,
                observed: |_| Some(live(&running())),
                images: vec![
                    ImageHealth::new(PRIMARY, ImageStatus::Missing),
                    ImageHealth::new(MIRROR, ImageStatus::Ok),
                ],
                findings: vec!["unexpected_workload", "image_unavailable"],
                actions: vec![
                    RecoveryAction::RepairImage {
                        from: MIRROR.into(),
                        to: PRIMARY.into(),
                    },
                    RecoveryAction::RemoveWorkload,
                ],
                ..case("stopped service keeps its images safe")
            },
            Case {
                images: Vec::new(),
                observed: |_| None,
                findings: vec!["missing_workload"],
                actions: vec![apply_from(PRIMARY)],
                ..case("no image store configured: apply from the recorded registry")
            },
        ]
    }

    #[test]
    fn table_of_findings_and_plans() {
        for c in cases() {
            let mut rec = record(c.state);
            rec.stale = c.stale;
            let observed = (c.observed)(&rec);
            let d = diagnose(&rec, observed.as_ref(), &c.images);
            assert_eq!(names(&d), c.findings, "findings of {:?}", c.name);
            let actions = plan(&rec, &d, &c.images);
            assert_eq!(actions, c.actions, "plan of {:?}", c.name);
        }
    }

    #[test]
    fn findings_carry_details() {
        let rec = running();
        let mut o = live(&rec);
        o.desired_replicas = 5;
        o.template.image = image(MIRROR, b"evil");
        o.template.env.clear();
        o.replicas[1].failed = true;
        o.replicas[1].ready = false;
        o.ready_replicas = 2;
        let images = vec![
            ImageHealth::new(PRIMARY, ImageStatus::Tampered("layer 0 mismatch".into())),
            ImageHealth::new(MIRROR, ImageStatus::Missing),
        ];
        let d = diagnose(&rec, Some(&o), &images);
        assert_eq!(
            d.findings,
            vec![
                Finding::ReplicasDrifted {
                    desired: 3,
                    observed: 5
                },
                Finding::ImageDrifted {
                    expected: Digest::of(b"v1"),
                    observed: image(MIRROR, b"evil").to_string(),
                },
                Finding::TemplateTampered {
                    fields: vec!["env".into()]
                },
                Finding::ReplicasUnhealthy {
                    ready: 2,
                    desired: 3,
                    replicas: vec!["app-1".into()]
                },
                Finding::ImageTampered {
                    registry: PRIMARY.into(),
                    detail: "layer 0 mismatch".into()
                },
                Finding::ImageUnavailable {
                    registry: MIRROR.into()
                },
            ]
        );
        // Neither registry is Ok: nothing to repair from or apply from.
        let actions = plan(&rec, &d, &images);
        assert_eq!(actions.len(), 2, "{actions:?}");
        assert!(matches!(actions[0], RecoveryAction::ReplaceReplicas { .. }));
        assert!(matches!(actions[1], RecoveryAction::Wait { .. }));
    }

    #[test]
    fn autoscaler_owns_replicas_within_bounds_only() {
        let mut rec = running();
        rec.spec.autoscaling = Some(Autoscaling {
            min_replicas: 2,
            max_replicas: 6,
        });
        for (live_count, drift) in [(2, false), (3, false), (6, false), (1, true), (7, true)] {
            let mut o = live(&rec);
            o.desired_replicas = live_count;
            let d = diagnose(&rec, Some(&o), &ok_both());
            assert_eq!(
                names(&d) == vec!["replicas_drifted"],
                drift,
                "{live_count}: {d:?}"
            );
        }
        // When paused the autoscaler owns nothing: zero is required.
        rec.state = ServiceState::Paused;
        let mut o = live(&rec);
        o.desired_replicas = 3;
        assert_eq!(
            names(&diagnose(&rec, Some(&o), &ok_both())),
            vec!["replicas_drifted"]
        );
    }

    #[test]
    fn duplicate_findings_give_one_action_each() {
        let rec = running();
        let d = Diagnosis {
            id: rec.id.clone(),
            record_version: Some(2),
            findings: vec![
                Finding::MissingWorkload { parts: vec![] },
                Finding::ReplicasDrifted {
                    desired: 3,
                    observed: 1,
                },
                Finding::ImageUnavailable {
                    registry: MIRROR.into(),
                },
                Finding::ImageTampered {
                    registry: MIRROR.into(),
                    detail: "x".into(),
                },
                Finding::ReplicasUnhealthy {
                    ready: 1,
                    desired: 3,
                    replicas: vec!["app-0".into()],
                },
                Finding::ReplicasUnhealthy {
                    ready: 1,
                    desired: 3,
                    replicas: vec!["app-0".into(), "app-1".into()],
                },
                Finding::ChainEndpointDown { detail: "a".into() },
                Finding::ChainEndpointDown { detail: "b".into() },
            ],
        };
        let images = vec![
            ImageHealth::new(PRIMARY, ImageStatus::Ok),
            ImageHealth::new(MIRROR, ImageStatus::Missing),
        ];
        assert_eq!(
            plan(&rec, &d, &images),
            vec![
                RecoveryAction::UseLastVerifiedRecord,
                RecoveryAction::RepairImage {
                    from: PRIMARY.into(),
                    to: MIRROR.into()
                },
                apply_from(PRIMARY),
                RecoveryAction::ReplaceReplicas {
                    replicas: vec!["app-0".into(), "app-1".into()]
                },
            ]
        );
    }

    #[test]
    fn every_finding_kind_is_covered_by_the_table() {
        let mut seen: Vec<&str> = cases().iter().flat_map(|c| c.findings.clone()).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(
            seen,
            vec![
                "chain_endpoint_down",
                "foreign_fields",
                "image_drifted",
                "image_source_unhealthy",
                "image_tampered",
                "image_unavailable",
                "missing_workload",
                "registry_down",
                "replicas_drifted",
                "replicas_unhealthy",
                "template_tampered",
                "unexpected_workload",
            ]
        );
    }
}
