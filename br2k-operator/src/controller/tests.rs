use std::time::Duration;

use br2k_core::{
    ActionOutcome, Diagnosis, ErrorKind, Finding, Outcome, RecoveryAction, RecoveryReport,
    ServiceId,
};

use super::backoff;
use super::status::{StatusUpdate, assess, condition, merge_conditions};
use crate::crd::{Br2kService, Br2kServiceSpec, Br2kServiceStatus, Condition};

#[test]
fn backoff_grows_and_is_capped() {
    assert_eq!(backoff(1), Duration::from_secs(1));
    assert_eq!(backoff(2), Duration::from_secs(2));
    assert_eq!(backoff(5), Duration::from_secs(16));
    assert_eq!(backoff(40), Duration::from_secs(300));
}

#[test]
fn unchanged_conditions_keep_their_transition_time() {
    let mut old = condition("Ready", true, "Healthy", "ok");
    old.last_transition_time = "2020-01-01T00:00:00Z".into();
    let merged = merge_conditions(
        std::slice::from_ref(&old),
        vec![condition("Ready", true, "Healthy", "ok")],
    );
    assert_eq!(merged[0].last_transition_time, "2020-01-01T00:00:00Z");
    let merged = merge_conditions(&[old], vec![condition("Ready", false, "Degraded", "x")]);
    assert_ne!(merged[0].last_transition_time, "2020-01-01T00:00:00Z");
}

fn id() -> ServiceId {
    ServiceId::new("svc").unwrap()
}

fn report(findings: Vec<Finding>, remaining: Vec<Finding>, converged: bool) -> RecoveryReport {
    let outcome = if findings.is_empty() {
        Outcome::Healthy
    } else if remaining.is_empty() {
        Outcome::Recovered
    } else {
        Outcome::Partial
    };
    RecoveryReport {
        id: id(),
        diagnosis: Diagnosis {
            id: id(),
            record_version: Some(3),
            findings,
        },
        actions: Vec::new(),
        duration: Duration::from_millis(5),
        outcome,
        remaining,
        converged,
    }
}

fn by_type<'a>(conditions: &'a [Condition], t: &str) -> &'a Condition {
    conditions.iter().find(|c| c.type_ == t).unwrap()
}

#[test]
fn a_healthy_reconcile_reports_every_condition_true() {
    let a = assess(&report(vec![], vec![], true), &[], 3, None);
    assert!(a.healthy);
    assert!(!a.refused);
    assert_eq!(a.update.phase, "Healthy");
    assert_eq!(a.update.observed_version, Some(3));
    let types: Vec<&str> = a
        .update
        .conditions
        .iter()
        .map(|c| c.type_.as_str())
        .collect();
    assert_eq!(
        types,
        [
            "Valid",
            "ChainAvailable",
            "ImageVerified",
            "WorkloadReady",
            "Ready"
        ]
    );
    assert!(a.update.conditions.iter().all(|c| c.status == "True"));
    assert_eq!(
        by_type(&a.update.conditions, "Ready").message,
        "0 finding(s) left at record v3"
    );
}

#[test]
fn a_registry_left_down_degrades_a_ready_workload() {
    let down = Finding::RegistryDown {
        registry: "reg:5000".into(),
    };
    let a = assess(&report(vec![down.clone()], vec![down], true), &[], 3, None);
    assert!(!a.healthy);
    assert_eq!(a.update.phase, "Degraded");
    let image = by_type(&a.update.conditions, "ImageVerified");
    assert_eq!(
        (
            image.status.as_str(),
            image.reason.as_str(),
            image.message.as_str()
        ),
        ("False", "RegistryProblem", "reg:5000: unreachable")
    );
    assert_eq!(
        by_type(&a.update.conditions, "WorkloadReady").status,
        "True"
    );
    assert_eq!(by_type(&a.update.conditions, "Ready").reason, "Degraded");
}

#[test]
fn a_missing_workload_is_recovering_and_a_chain_outage_is_shown() {
    let missing = Finding::MissingWorkload { parts: vec![] };
    let chain = Finding::ChainEndpointDown {
        detail: "http://rpc: refused".into(),
    };
    let a = assess(
        &report(vec![missing.clone()], vec![missing, chain], false),
        &[],
        3,
        None,
    );
    assert_eq!(a.update.phase, "Recovering");
    let workload = by_type(&a.update.conditions, "WorkloadReady");
    assert_eq!(workload.reason, "NotConverged");
    assert_eq!(
        workload.message,
        "still wrong: missing_workload, chain_endpoint_down"
    );
    assert_eq!(
        by_type(&a.update.conditions, "ChainAvailable").reason,
        "Unreachable"
    );
}

#[test]
fn a_refusal_by_the_api_server_is_an_error() {
    let missing = Finding::MissingWorkload { parts: vec![] };
    let mut r = report(vec![missing.clone()], vec![missing], false);
    r.actions.push(ActionOutcome {
        action: RecoveryAction::RemoveWorkload,
        duration: Duration::ZERO,
        error: Some("422: bad".into()),
        error_kind: Some(ErrorKind::InvalidInput),
    });
    let a = assess(&r, &[], 3, None);
    assert!(a.refused);
    assert_eq!(a.update.phase, "Error");
    let valid = by_type(&a.update.conditions, "Valid");
    assert_eq!(
        (
            valid.status.as_str(),
            valid.reason.as_str(),
            valid.message.as_str()
        ),
        ("False", "RefusedByKubernetes", "422: bad")
    );
}

#[test]
fn an_update_keeps_what_it_does_not_decide() {
    let mut obj = Br2kService::new("svc", Br2kServiceSpec::for_service("svc"));
    obj.metadata.generation = Some(7);
    let old = assess(&report(vec![], vec![], true), &[], 3, None).update;
    obj.status = Some(old.clone().status_of(&obj));
    let status: Br2kServiceStatus =
        StatusUpdate::refused("InvalidSpec", "bad".into()).status_of(&obj);
    assert_eq!(status.phase.as_deref(), Some("Error"));
    assert_eq!(status.observed_version, Some(3));
    assert_eq!(status.observed_generation, Some(7));
    // Valid and Ready replaced; the other conditions of the old status kept.
    assert_eq!(status.conditions.len(), 5);
    assert_eq!(by_type(&status.conditions, "Valid").reason, "InvalidSpec");
    assert_eq!(by_type(&status.conditions, "Ready").reason, "InvalidSpec");
    assert_eq!(by_type(&status.conditions, "ChainAvailable").status, "True");
}
