//! What a recovery tells: one Kubernetes Event per recovery, and the one-line
//! descriptions of findings and actions that the Event, the log and the status share.

use br2k_core::{Finding, Outcome, RecoveryAction, RecoveryReport};
use k8s_openapi::api::events::v1::Event as KubeEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::{Resource, ResourceExt};

use super::Context;
use crate::crd::Br2kService;

/// One line naming each action and, when it failed, why.
pub(super) fn describe_actions(report: &RecoveryReport) -> String {
    let names: Vec<String> = report
        .actions
        .iter()
        .map(|a| {
            let name = match &a.action {
                RecoveryAction::ApplyRecord { registry, .. } => format!("apply from {registry}"),
                RecoveryAction::ReplaceReplicas { replicas } => {
                    format!("replace {}", replicas.join(" "))
                }
                RecoveryAction::RemoveWorkload => "remove workload".into(),
                RecoveryAction::RepairImage { from, to } => format!("repair image {from} -> {to}"),
                RecoveryAction::UseLastVerifiedRecord => "use last verified record".into(),
                RecoveryAction::Wait { reason } => format!("wait ({reason})"),
                other => format!("{other:?}"),
            };
            match &a.error {
                Some(e) => format!("{name} FAILED: {e}"),
                None => name,
            }
        })
        .collect();
    if names.is_empty() {
        "no action".into()
    } else {
        names.join("; ")
    }
}

/// Names of findings, comma separated.
pub(super) fn finding_names(findings: &[Finding]) -> String {
    let names: Vec<&str> = findings.iter().map(Finding::name).collect();
    if names.is_empty() {
        "nothing".into()
    } else {
        names.join(", ")
    }
}

/// The message of a recovery action that a backend refused as invalid input (the
/// API server answered 400/422 to what the record asks for), if any.
pub(super) fn refused_by_backend(report: &RecoveryReport) -> Option<String> {
    report
        .actions
        .iter()
        .find(|o| o.error_kind == Some(br2k_core::ErrorKind::InvalidInput))
        .and_then(|o| o.error.clone())
}

/// Records one recovery as its own Event (events.k8s.io/v1), so that every
/// recovery keeps its own note (an event recorder would fold a series under the
/// first note).
pub(super) async fn publish(ctx: &Context, obj: &Br2kService, report: &RecoveryReport) {
    let ok = report.outcome == Outcome::Recovered;
    let mut note = format!(
        "{}: found {}; {}; {} ms; outcome {:?}; still wrong: {}",
        report.id,
        finding_names(&report.diagnosis.findings),
        describe_actions(report),
        report.duration.as_millis(),
        report.outcome,
        finding_names(&report.remaining),
    );
    if note.len() > 1000 {
        let mut cut = 1000;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
    }
    let ns = obj.namespace().unwrap_or_default();
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let ev = KubeEvent {
        metadata: ObjectMeta {
            name: Some(format!("{}.{stamp:x}", obj.name_any())),
            namespace: Some(ns.clone()),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(Timestamp::now())),
        type_: Some(if ok { "Normal" } else { "Warning" }.into()),
        reason: Some(
            if ok {
                "Recovered"
            } else {
                "RecoveryIncomplete"
            }
            .into(),
        ),
        action: Some("Recover".into()),
        note: Some(note),
        regarding: Some(obj.object_ref(&())),
        reporting_controller: Some("br2k.io/operator".into()),
        reporting_instance: Some(ctx.identity.clone()),
        ..KubeEvent::default()
    };
    let api: Api<KubeEvent> = Api::namespaced(ctx.client.clone(), &ns);
    if let Err(e) = api.create(&PostParams::default(), &ev).await {
        tracing::warn!(error = %e, "publishing event failed");
    }
}
