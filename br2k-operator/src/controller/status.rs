//! The status of a `Br2kService`: every reconcile builds one [`StatusUpdate`] and
//! writes it once ([`write_status`]).

use br2k_core::supervisor::is_workload_finding;
use br2k_core::{Digest, Error, Finding, Outcome, RecoveryReport, ServiceId};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::json;

use super::events::{finding_names, refused_by_backend};
use crate::crd::{Br2kService, Br2kServiceStatus, Condition, LastRecovery, PlacementView};

/// Field manager of status writes.
const MANAGER: &str = "br2k-operator";

/// The current time, RFC 3339.
pub(super) fn now() -> String {
    Timestamp::now().to_string()
}

/// One condition, its transition time now.
pub(super) fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: impl Into<String>,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: now(),
    }
}

/// Merges `new` conditions into `old`, keeping the transition time of unchanged ones.
pub(super) fn merge_conditions(old: &[Condition], new: Vec<Condition>) -> Vec<Condition> {
    let mut out: Vec<Condition> = old
        .iter()
        .filter(|o| !new.iter().any(|n| n.type_ == o.type_))
        .cloned()
        .collect();
    for mut n in new {
        if let Some(o) = old.iter().find(|o| o.type_ == n.type_)
            && o.status == n.status
        {
            n.last_transition_time = o.last_transition_time.clone();
        }
        out.push(n);
    }
    out.sort_by(|a, b| a.type_.cmp(&b.type_));
    out
}

/// What one reconcile found: the status it writes (once, by [`write_status`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct StatusUpdate {
    /// `Healthy`, `Recovering`, `Degraded` or `Error`.
    pub phase: String,
    /// The conditions this reconcile decided (others are kept).
    pub conditions: Vec<Condition>,
    /// The record version reconciled against (`None`: keep the old one).
    pub observed_version: Option<u64>,
    /// The recovery just made (`None`: keep the old one).
    pub last_recovery: Option<LastRecovery>,
    /// The placement of a multi-cluster service (`None`: keep the old one).
    pub placement: Option<PlacementView>,
}

impl StatusUpdate {
    /// Phase `Error` with `conditions`.
    fn error(conditions: Vec<Condition>) -> Self {
        Self {
            phase: "Error".into(),
            conditions,
            observed_version: None,
            last_recovery: None,
            placement: None,
        }
    }

    /// An invalid resource: `Valid=False` with `reason`.
    pub(super) fn refused(reason: &str, message: String) -> Self {
        Self::error(vec![
            condition("Valid", false, reason, message),
            condition("Ready", false, "InvalidSpec", "the spec is invalid"),
        ])
    }

    /// The registry on chain could not be read to build the supervisor.
    pub(super) fn chain_unavailable(e: &Error) -> Self {
        Self::error(vec![
            condition("Valid", true, "Valid", "spec is valid"),
            condition("ChainAvailable", false, "Unreachable", e.to_string()),
            condition(
                "Ready",
                false,
                "ChainUnavailable",
                "cannot read the service registry on chain",
            ),
        ])
    }

    /// The record's owner is not one this operator may deploy for.
    pub(super) fn owner_not_allowed(reason: String) -> Self {
        Self::error(vec![
            condition("Valid", false, "OwnerNotAllowed", reason),
            condition("Ready", false, "OwnerNotAllowed", "not deployed"),
        ])
    }

    /// The supervisor's reconcile failed with `e`.
    pub(super) fn reconcile_failed(e: &Error) -> Self {
        Self::error(vec![condition(
            "Ready",
            false,
            "ReconcileFailed",
            e.to_string(),
        )])
    }

    /// The service `id` has no record on chain.
    pub(super) fn not_registered(id: &ServiceId) -> Self {
        Self::error(vec![
            condition("Valid", true, "Valid", "spec is valid"),
            condition(
                "ChainAvailable",
                true,
                "Reachable",
                "the service registry answers",
            ),
            condition(
                "Ready",
                false,
                "NotRegistered",
                format!("service {id} is not registered"),
            ),
        ])
    }

    /// The status `obj` gets from this update: the conditions merged into its old
    /// ones, the old version and recovery kept where this update has none.
    pub(super) fn status_of(self, obj: &Br2kService) -> Br2kServiceStatus {
        let old = obj.status.clone().unwrap_or_default();
        Br2kServiceStatus {
            observed_version: self.observed_version.or(old.observed_version),
            phase: Some(self.phase),
            conditions: merge_conditions(&old.conditions, self.conditions),
            last_recovery: self.last_recovery.or(old.last_recovery),
            observed_generation: obj.metadata.generation,
            placement: self.placement.or(old.placement),
        }
    }
}

/// What is wrong after a reconcile: nothing when the diagnosis was clean, else what
/// the recovery left (observed again after acting).
pub(super) fn now_wrong(report: &RecoveryReport) -> &[Finding] {
    if report.diagnosis.is_healthy() {
        &[]
    } else {
        &report.remaining
    }
}

/// The status after a reconcile of a registered service, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Assessment {
    /// The status to write.
    pub update: StatusUpdate,
    /// Everything is as the record asks.
    pub healthy: bool,
    /// The API server refused what the record asks for.
    pub refused: bool,
}

/// Assesses a reconcile of record `version` that produced `report`, with the
/// registries' `unrepairable` copies and the recovery `last` made (if any).
pub(super) fn assess(
    report: &RecoveryReport,
    unrepairable: &[(String, Digest)],
    version: u64,
    last: Option<LastRecovery>,
) -> Assessment {
    let now_wrong = now_wrong(report);
    let chain_down = now_wrong
        .iter()
        .any(|f| matches!(f, Finding::ChainEndpointDown { .. }));
    let image_problems: Vec<String> = now_wrong
        .iter()
        .filter_map(|f| match f {
            Finding::ImageTampered { registry, .. } => Some(format!("{registry}: corrupt copy")),
            Finding::ImageUnavailable { registry } => Some(format!("{registry}: missing")),
            Finding::RegistryDown { registry } => Some(format!("{registry}: unreachable")),
            _ => None,
        })
        .chain(
            unrepairable
                .iter()
                .map(|(r, d)| format!("{r}: unrepairable copy of {d}, not used as a source")),
        )
        .collect();
    let workload_wrong: Vec<&Finding> = now_wrong
        .iter()
        .filter(|f| is_workload_finding(f))
        .collect();
    let workload_ready = report.converged && workload_wrong.is_empty();
    let healthy = workload_ready && now_wrong.is_empty() && unrepairable.is_empty();
    // The API server refused what the record asks for: no retry will change that,
    // only a new record (checked again at the capped backoff) or a new operator.
    let refused = refused_by_backend(report);
    let valid = match &refused {
        Some(why) => condition("Valid", false, "RefusedByKubernetes", why.clone()),
        None => condition("Valid", true, "Valid", "spec is valid"),
    };
    let phase = if refused.is_some() {
        "Error"
    } else if healthy {
        "Healthy"
    } else if workload_ready {
        // Serving the record, but something it relies on is wrong.
        "Degraded"
    } else if report.outcome == Outcome::Failed {
        "Degraded"
    } else {
        "Recovering"
    };
    let conditions = vec![
        valid,
        condition(
            "ChainAvailable",
            !chain_down,
            if chain_down {
                "Unreachable"
            } else {
                "Reachable"
            },
            if chain_down {
                "no chain endpoint answers; using the last verified record"
            } else {
                "the service registry answers"
            },
        ),
        condition(
            "ImageVerified",
            image_problems.is_empty(),
            if image_problems.is_empty() {
                "Verified"
            } else {
                "RegistryProblem"
            },
            if image_problems.is_empty() {
                "every registry serves the recorded digest, verified".to_owned()
            } else {
                image_problems.join("; ")
            },
        ),
        condition(
            "WorkloadReady",
            workload_ready,
            if workload_ready {
                "AllReplicasReady"
            } else {
                "NotConverged"
            },
            if workload_ready {
                "every replica is ready on the recorded digest".to_owned()
            } else if workload_wrong.is_empty() {
                "replicas are starting".to_owned()
            } else {
                format!("still wrong: {}", finding_names(now_wrong))
            },
        ),
        condition(
            "Ready",
            healthy,
            phase,
            format!("{} finding(s) left at record v{version}", now_wrong.len()),
        ),
    ];
    Assessment {
        update: StatusUpdate {
            phase: phase.to_owned(),
            conditions,
            observed_version: Some(version),
            last_recovery: last,
            placement: None,
        },
        healthy,
        refused: refused.is_some(),
    }
}

/// Writes `update` into the status of `obj` (nothing when it would not change).
pub(super) async fn write_status(
    obj: &Br2kService,
    client: &Client,
    update: StatusUpdate,
) -> Result<(), kube::Error> {
    let old = obj.status.clone().unwrap_or_default();
    let status = update.status_of(obj);
    if status == old {
        return Ok(());
    }
    let api: Api<Br2kService> =
        Api::namespaced(client.clone(), &obj.namespace().unwrap_or_default());
    api.patch_status(
        &obj.name_any(),
        &PatchParams::apply(MANAGER),
        &Patch::Merge(json!({ "status": status })),
    )
    .await?;
    Ok(())
}
