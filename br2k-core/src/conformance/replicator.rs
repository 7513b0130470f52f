//! Conformance of [`Replicator`] implementations.
//!
//! Real backends converge asynchronously, so every expectation about the live state
//! is polled with [`eventually`] for up to [`DEFAULT_TIMEOUT`].

use std::collections::BTreeSet;

use futures::StreamExt;

use super::{DEFAULT_TIMEOUT, eventually, sample_record, sample_spec};
use crate::digest::Digest;
use crate::id::ServiceId;
use crate::observed::{ObservedState, WorkloadTemplate};
use crate::record::{ServiceRecord, ServiceState};
use crate::replicator::Replicator;

/// Registry host used in the specs of this suite.
const REG: &str = "registry.conformance.local";

fn record(id: &ServiceId) -> ServiceRecord {
    sample_record(id, sample_spec(REG))
}

/// Checks that `obs` runs `record` with every replica ready.
fn converged(obs: &ObservedState, record: &ServiceRecord) -> Result<(), String> {
    let want = record.desired_replicas();
    if obs.id != record.id {
        return Err(format!("observed id {} for {}", obs.id, record.id));
    }
    if obs.template != WorkloadTemplate::from_spec(&record.spec) {
        return Err(format!(
            "template differs: {:?} (image {} vs {})",
            obs.template
                .differing_fields(&WorkloadTemplate::from_spec(&record.spec)),
            obs.template.image,
            record.spec.image
        ));
    }
    if obs.desired_replicas != want || obs.ready_replicas != want {
        return Err(format!(
            "desired {} ready {}, want {want}",
            obs.desired_replicas, obs.ready_replicas
        ));
    }
    if obs.replicas.len() != want as usize {
        return Err(format!(
            "{} replicas listed, want {want}",
            obs.replicas.len()
        ));
    }
    if !obs.unhealthy().is_empty() {
        return Err(format!("unhealthy replicas {:?}", obs.unhealthy()));
    }
    let names: BTreeSet<&str> = obs.replicas.iter().map(|r| r.name.as_str()).collect();
    if names.len() != obs.replicas.len() {
        return Err("replica names are not unique".into());
    }
    let digest = record.spec.image.digest();
    if let Some(r) = obs
        .replicas
        .iter()
        .find(|r| r.image_digest.is_some() && r.image_digest.as_ref() != digest)
    {
        return Err(format!("replica {} runs {:?}", r.name, r.image_digest));
    }
    if !obs.missing_parts.is_empty() {
        return Err(format!("missing parts {:?}", obs.missing_parts));
    }
    if let Some(v) = obs.applied_version
        && v != record.version
    {
        return Err(format!("applied version {v}, want {}", record.version));
    }
    Ok(())
}

/// Waits until the live workload of `record.id` matches `record`, and returns it.
pub async fn wait_converged(r: &dyn Replicator, record: &ServiceRecord) -> ObservedState {
    eventually(
        DEFAULT_TIMEOUT,
        &format!("{} converges", record.id),
        || async {
            match r.observe(&record.id).await {
                Ok(Some(obs)) => converged(&obs, record).map(|()| obs),
                Ok(None) => Err("no workload".into()),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await
}

async fn wait_removed(r: &dyn Replicator, id: &ServiceId) {
    eventually(DEFAULT_TIMEOUT, &format!("{id} removed"), || async {
        match r.observe(id).await {
            Ok(None) => Ok(()),
            Ok(Some(obs)) => Err(format!("still live: {obs:?}")),
            Err(e) => Err(e.to_string()),
        }
    })
    .await
}

/// Observing a service that was never applied is `None`.
pub async fn observe_unknown_is_none(r: &dyn Replicator, id: &ServiceId) {
    assert_eq!(r.observe(id).await.expect("observe"), None);
}

/// Apply creates the workload; observe reports the record's template, replica count
/// and ready replicas running the recorded digest.
pub async fn apply_and_observe(r: &dyn Replicator, id: &ServiceId) {
    let rec = record(id);
    r.apply(&rec).await.expect("apply");
    wait_converged(r, &rec).await;
    r.remove(id).await.expect("cleanup");
}

/// Applying the same record again changes nothing: same replicas, same template.
pub async fn apply_is_idempotent(r: &dyn Replicator, id: &ServiceId) {
    let rec = record(id);
    r.apply(&rec).await.expect("apply");
    let before = wait_converged(r, &rec).await;
    r.apply(&rec).await.expect("apply again");
    let after = wait_converged(r, &rec).await;
    let names = |o: &ObservedState| -> BTreeSet<String> {
        o.replicas.iter().map(|r| r.name.clone()).collect()
    };
    assert_eq!(names(&before), names(&after), "replicas kept");
    assert_eq!(before.template, after.template);
    r.remove(id).await.expect("cleanup");
}

/// A new record with another replica count scales the workload; Paused keeps the
/// workload with zero replicas.
pub async fn scale_with_new_record(r: &dyn Replicator, id: &ServiceId) {
    let mut rec = record(id);
    r.apply(&rec).await.expect("apply");
    wait_converged(r, &rec).await;
    rec.replicas = 5;
    r.apply(&rec).await.expect("scale up");
    wait_converged(r, &rec).await;
    rec.replicas = 1;
    r.apply(&rec).await.expect("scale down");
    wait_converged(r, &rec).await;
    rec.state = ServiceState::Paused;
    r.apply(&rec).await.expect("pause");
    let obs = wait_converged(r, &rec).await;
    assert_eq!(obs.desired_replicas, 0);
    r.remove(id).await.expect("cleanup");
}

/// A new version with another image and environment replaces the template.
pub async fn update_template(r: &dyn Replicator, id: &ServiceId) {
    let mut rec = record(id);
    r.apply(&rec).await.expect("apply");
    wait_converged(r, &rec).await;
    rec.version = 2;
    rec.latest_version = 2;
    rec.spec.image = rec
        .spec
        .image
        .with_digest(Digest::of(b"conformance replicator v2"));
    rec.spec.env.insert("FEATURE".into(), "v2".into());
    rec.spec_hash = rec.spec.spec_hash();
    r.apply(&rec).await.expect("apply v2");
    wait_converged(r, &rec).await;
    r.remove(id).await.expect("cleanup");
}

/// `observe` right after `apply` or `remove` returns reports what was written, without
/// waiting for the backend to catch up (read-your-writes): the workload object's
/// template, replica count and applied version; after `remove`, nothing. Replicas are
/// not checked: they start asynchronously.
pub async fn observe_reads_its_own_writes(r: &dyn Replicator, id: &ServiceId) {
    let mut rec = record(id);
    r.apply(&rec).await.expect("apply");
    wait_converged(r, &rec).await;
    for version in 2..=7u64 {
        rec.version = version;
        rec.latest_version = version;
        match version % 3 {
            0 => {
                rec.spec.image = rec
                    .spec
                    .image
                    .with_digest(Digest::of(format!("conformance rw {version}").as_bytes()));
            }
            1 => {
                rec.spec.env.insert("FEATURE".into(), format!("v{version}"));
            }
            _ => rec.replicas = 1 + (version % 2) as u32,
        }
        rec.spec_hash = rec.spec.spec_hash();
        r.apply(&rec).await.expect("apply");
        let obs = r
            .observe(id)
            .await
            .expect("observe")
            .expect("applied workload is observed");
        assert_eq!(
            obs.template,
            WorkloadTemplate::from_spec(&rec.spec),
            "template of version {version} right after its apply"
        );
        assert_eq!(
            obs.desired_replicas,
            rec.desired_replicas(),
            "replicas of version {version} right after its apply"
        );
        if let Some(v) = obs.applied_version {
            assert_eq!(v, version, "applied version right after its apply");
        }
    }
    r.remove(id).await.expect("remove");
    assert_eq!(
        r.observe(id).await.expect("observe"),
        None,
        "nothing observed right after remove"
    );
}

/// Remove deletes the workload; removing again (or something never applied) succeeds.
pub async fn remove_is_idempotent(r: &dyn Replicator, id: &ServiceId, never: &ServiceId) {
    let rec = record(id);
    r.apply(&rec).await.expect("apply");
    wait_converged(r, &rec).await;
    r.remove(id).await.expect("remove");
    wait_removed(r, id).await;
    r.remove(id).await.expect("remove again");
    r.remove(never).await.expect("remove never applied");
    eventually(DEFAULT_TIMEOUT, "managed forgets it", || async {
        match r.managed().await {
            Ok(ids) if !ids.contains(id) => Ok(()),
            Ok(_) => Err("still managed".into()),
            Err(e) => Err(e.to_string()),
        }
    })
    .await;
}

/// Replacing replicas recreates them; unknown names are ignored.
pub async fn replace_replicas_recreates(r: &dyn Replicator, id: &ServiceId) {
    let rec = record(id);
    r.apply(&rec).await.expect("apply");
    let obs = wait_converged(r, &rec).await;
    let first = obs.replicas[0].name.clone();
    r.replace_replicas(id, &[first, "no-such-replica".into()])
        .await
        .expect("replace");
    wait_converged(r, &rec).await;
    r.remove(id).await.expect("cleanup");
}

/// The change stream reports the id of an applied workload.
pub async fn changes_report_the_id(r: &dyn Replicator, id: &ServiceId) {
    let mut stream = r.changes().await.expect("changes");
    let rec = record(id);
    r.apply(&rec).await.expect("apply");
    let found = tokio::time::timeout(DEFAULT_TIMEOUT, async {
        while let Some(changed) = stream.next().await {
            if changed == *id {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(found, Ok(true), "changes stream reports {id}");
    r.remove(id).await.expect("cleanup");
}

/// `managed` lists an applied workload.
pub async fn managed_lists_it(r: &dyn Replicator, id: &ServiceId) {
    r.apply(&record(id)).await.expect("apply");
    assert!(
        r.managed().await.expect("managed").contains(id),
        "managed lists {id}"
    );
    r.remove(id).await.expect("cleanup");
}

/// Runs every behaviour; `fresh_id(name)` returns an id never used before.
pub async fn run_all(r: &dyn Replicator, fresh_id: impl Fn(&str) -> ServiceId) {
    observe_unknown_is_none(r, &fresh_id("unknown")).await;
    apply_and_observe(r, &fresh_id("apply")).await;
    apply_is_idempotent(r, &fresh_id("idempotent")).await;
    scale_with_new_record(r, &fresh_id("scale")).await;
    update_template(r, &fresh_id("update")).await;
    observe_reads_its_own_writes(r, &fresh_id("rw")).await;
    remove_is_idempotent(r, &fresh_id("remove"), &fresh_id("never")).await;
    replace_replicas_recreates(r, &fresh_id("replace")).await;
    changes_report_the_id(r, &fresh_id("changes")).await;
    managed_lists_it(r, &fresh_id("managed")).await;
}
