//! Tests of the in-memory backends' own behaviour and test controls.

use br2k_core::conformance::{sample_image, sample_spec};
use br2k_core::memory::{InMemoryImageStore, InMemoryRegistry, InMemoryReplicator};
use br2k_core::{
    Error, ImageRef, ImageStore, Registry, Replicator, Repository, Role, ServiceId, ServiceState,
};
use futures::StreamExt;

fn id(s: &str) -> ServiceId {
    ServiceId::new(s).unwrap()
}

#[tokio::test]
async fn registry_handles_share_state_and_act_as_their_account() {
    let owner = InMemoryRegistry::new("alice");
    let bob = owner.as_account("bob");
    assert_eq!(owner.account().0, "alice");
    assert_eq!(bob.account().0, "bob");
    let s = id("ledger");
    let rec = owner.register(&s, &sample_spec("mem.local")).await.unwrap();
    assert_eq!(rec.owner.0, "alice");
    assert_eq!(rec.state, ServiceState::Ready);
    assert_eq!(
        bob.active(&s).await.unwrap(),
        owner.active(&s).await.unwrap()
    );
    assert!(matches!(
        bob.set_replicas(&s, 5).await,
        Err(Error::PermissionDenied { .. })
    ));
    owner
        .grant(&s, &bob.account(), Role::Operator)
        .await
        .unwrap();
    assert_eq!(bob.set_replicas(&s, 5).await.unwrap().replicas, 5);
}

#[tokio::test]
async fn registry_as_of_is_a_sequence_increased_by_each_change_only() {
    let reg = InMemoryRegistry::new("alice");
    let s = id("seq");
    let r1 = reg.register(&s, &sample_spec("mem.local")).await.unwrap();
    let r2 = reg.set_replicas(&s, 4).await.unwrap();
    let r3 = reg.set_replicas(&s, 4).await.unwrap();
    assert!(r2.as_of.unwrap() > r1.as_of.unwrap());
    assert_eq!(r3.as_of, r2.as_of, "a no-op write changes nothing");
}

#[tokio::test]
async fn replicator_apply_creates_ready_replicas_running_the_digest() {
    let reg = InMemoryRegistry::new("alice");
    let rep = InMemoryReplicator::new();
    let s = id("web");
    reg.register(&s, &sample_spec("mem.local")).await.unwrap();
    let rec = reg.resume(&s).await.unwrap();
    rep.apply(&rec).await.unwrap();
    let obs = rep.observe(&s).await.unwrap().unwrap();
    let names: Vec<_> = obs.replicas.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["web-0", "web-1", "web-2"]);
    assert_eq!(obs.ready_replicas, 3);
    assert!(
        obs.replicas
            .iter()
            .all(|r| r.image_digest.as_ref() == rec.spec.image.digest())
    );
    assert_eq!(rep.apply_count(), 1);
    rep.apply(&rec).await.unwrap();
    assert_eq!(rep.apply_count(), 2);
    assert_eq!(rep.observe(&s).await.unwrap().unwrap(), obs);
}

#[tokio::test]
async fn replicator_failure_injection_changes_the_live_state_and_notifies() {
    let reg = InMemoryRegistry::new("alice");
    let rep = InMemoryReplicator::new();
    let s = id("web");
    reg.register(&s, &sample_spec("mem.local")).await.unwrap();
    let rec = reg.resume(&s).await.unwrap();
    rep.apply(&rec).await.unwrap();
    let mut changes = rep.changes().await.unwrap();

    rep.fail_replica(&s, "web-1").unwrap();
    assert_eq!(changes.next().await.unwrap(), s);
    let obs = rep.observe(&s).await.unwrap().unwrap();
    assert_eq!(obs.unhealthy(), ["web-1"]);
    assert_eq!(obs.ready_replicas, 2);
    rep.replace_replicas(&s, &["web-1".into(), "nope".into()])
        .await
        .unwrap();
    assert_eq!(changes.next().await.unwrap(), s);
    assert!(
        rep.observe(&s)
            .await
            .unwrap()
            .unwrap()
            .unhealthy()
            .is_empty()
    );

    rep.set_live_replicas(&s, 5).unwrap();
    assert_eq!(changes.next().await.unwrap(), s);
    let obs = rep.observe(&s).await.unwrap().unwrap();
    assert_eq!((obs.desired_replicas, obs.ready_replicas), (5, 5));

    let other = ImageRef::parse(&format!(
        "mem.local/evil/image@{}",
        br2k_core::Digest::of(b"evil")
    ))
    .unwrap();
    rep.set_live_image(&s, other.clone()).unwrap();
    assert_eq!(changes.next().await.unwrap(), s);
    let obs = rep.observe(&s).await.unwrap().unwrap();
    assert_eq!(obs.template.image, other);
    assert!(
        obs.replicas
            .iter()
            .all(|r| r.image_digest.as_ref() == other.digest())
    );

    rep.tamper_template(&s, |t| {
        t.env.insert("INJECTED".into(), "1".into());
    })
    .unwrap();
    assert_eq!(changes.next().await.unwrap(), s);
    rep.delete_part(&s, "service").unwrap();
    assert_eq!(changes.next().await.unwrap(), s);
    let obs = rep.observe(&s).await.unwrap().unwrap();
    assert_eq!(obs.missing_parts, ["service"]);
    assert_eq!(
        obs.template
            .differing_fields(&br2k_core::WorkloadTemplate::from_spec(&rec.spec)),
        ["env"]
    );

    // Applying the record again restores everything.
    rep.apply(&rec).await.unwrap();
    assert_eq!(changes.next().await.unwrap(), s);
    let obs = rep.observe(&s).await.unwrap().unwrap();
    assert_eq!(
        obs.template,
        br2k_core::WorkloadTemplate::from_spec(&rec.spec)
    );
    assert_eq!((obs.desired_replicas, obs.ready_replicas), (3, 3));
    assert!(obs.missing_parts.is_empty());
    assert!(
        obs.replicas
            .iter()
            .all(|r| r.image_digest.as_ref() == rec.spec.image.digest())
    );

    rep.delete_workload(&s).unwrap();
    assert_eq!(changes.next().await.unwrap(), s);
    assert!(rep.observe(&s).await.unwrap().is_none());
    assert!(matches!(
        rep.delete_workload(&s),
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        rep.fail_replica(&s, "web-0"),
        Err(Error::NotFound { .. })
    ));
}

#[tokio::test]
async fn replicator_paused_record_keeps_a_workload_with_zero_replicas() {
    let reg = InMemoryRegistry::new("alice");
    let rep = InMemoryReplicator::new();
    let s = id("paused");
    reg.register(&s, &sample_spec("mem.local")).await.unwrap();
    reg.resume(&s).await.unwrap();
    let rec = reg.pause(&s).await.unwrap();
    rep.apply(&rec).await.unwrap();
    let obs = rep.observe(&s).await.unwrap().unwrap();
    assert_eq!((obs.desired_replicas, obs.replicas.len()), (0, 0));
}

#[tokio::test]
async fn image_store_detects_corruption_and_removal() {
    let store = InMemoryImageStore::new("mem.local");
    let repo = Repository::new("team/app").unwrap();
    let image = sample_image(7, 3, 1024);
    store.push(&repo, &image, Some("v1")).await.unwrap();
    assert_eq!(store.pull(&repo, &image.digest).await.unwrap(), image);

    // A corrupted layer.
    store.corrupt_blob(&image.layers[1].digest).unwrap();
    match store.pull(&repo, &image.digest).await {
        Err(Error::Tampered { what, .. }) => assert_eq!(what, "layer 1"),
        other => panic!("expected Tampered, got {other:?}"),
    }
    // Pushing the good image again repairs it.
    store.push(&repo, &image, None).await.unwrap();
    assert_eq!(store.pull(&repo, &image.digest).await.unwrap(), image);

    // A corrupted manifest.
    store.corrupt_blob(&image.digest).unwrap();
    match store.pull(&repo, &image.digest).await {
        Err(Error::Tampered { what, .. }) => assert_eq!(what, "manifest"),
        other => panic!("expected Tampered, got {other:?}"),
    }
    assert!(matches!(
        store.corrupt_blob(&br2k_core::Digest::of(b"absent")),
        Err(Error::NotFound { .. })
    ));

    store.remove_image(&repo, &image.digest).unwrap();
    assert!(!store.has(&repo, &image.digest).await.unwrap());
    assert!(matches!(
        store.resolve(&repo, "v1").await,
        Err(Error::NotFound { .. })
    ));
    assert!(matches!(
        store.remove_image(&repo, &image.digest),
        Err(Error::NotFound { .. })
    ));
}

#[tokio::test]
async fn image_store_counts_requests_and_clones_share_content() {
    let store = InMemoryImageStore::new("mem.local");
    let clone = store.clone();
    let repo = Repository::new("team/app").unwrap();
    let image = sample_image(1, 1, 16);
    assert_eq!(store.request_count(), 0);
    store.push(&repo, &image, None).await.unwrap();
    assert!(clone.has(&repo, &image.digest).await.unwrap());
    clone.ping().await.unwrap();
    assert_eq!(store.request_count(), 3);
    assert_eq!(store.registry(), "mem.local");
}

#[tokio::test]
async fn registry_changes_are_ordered_under_concurrent_writers() {
    let reg = InMemoryRegistry::new("alice");
    let mut changes = reg.changes().await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let reg = reg.clone();
        tasks.push(tokio::spawn(async move {
            let s = id(&format!("svc-{t}"));
            reg.register(&s, &sample_spec("mem.local")).await.unwrap();
            for n in 1..=20 {
                reg.set_replicas(&s, n).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let mut last = 0;
    for _ in 0..8 * 21 {
        let change = changes.next().await.unwrap().unwrap();
        let at = change.at.unwrap();
        assert_eq!(at, last + 1, "positions are consecutive and in order");
        last = at;
    }
}

#[tokio::test]
async fn registry_change_stream_reports_lag_as_a_transient_error() {
    let reg = InMemoryRegistry::new("alice");
    let mut changes = reg.changes().await.unwrap();
    let s = id("busy");
    reg.register(&s, &sample_spec("mem.local")).await.unwrap();
    for n in 0..9000u32 {
        reg.set_replicas(&s, n % 2).await.unwrap();
    }
    let first = changes.next().await.unwrap();
    assert!(
        matches!(&first, Err(e) if e.is_retryable()),
        "a subscriber that fell behind learns it: {first:?}"
    );
    // The stream goes on with the changes still buffered.
    assert!(changes.next().await.unwrap().is_ok());
}
