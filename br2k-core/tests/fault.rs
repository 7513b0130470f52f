//! Tests of the fault-injection wrapper around the in-memory backends.

use std::time::{Duration, Instant};

use br2k_core::conformance::{sample_image, sample_spec};
use br2k_core::fault::{FaultHandle, Faulty};
use br2k_core::memory::{InMemoryImageStore, InMemoryRegistry, InMemoryReplicator};
use br2k_core::{Error, ImageStore, Registry, Replicator, Repository, ServiceId};

fn id(s: &str) -> ServiceId {
    ServiceId::new(s).unwrap()
}

#[tokio::test]
async fn fail_next_fails_exactly_n_calls_then_passes_through() {
    let reg = Faulty::new(InMemoryRegistry::new("alice"));
    let faults = reg.handle();
    let s = id("svc");
    faults.fail_next(2);
    for _ in 0..2 {
        let err = reg
            .register(&s, &sample_spec("mem.local"))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
        assert!(err.is_retryable());
    }
    // The failed calls changed nothing: the third registers.
    reg.register(&s, &sample_spec("mem.local")).await.unwrap();
    assert_eq!(reg.inner().services().await.unwrap(), vec![s]);
    assert_eq!(faults.calls(), 3);
    // account() is passed through and not counted.
    assert_eq!(reg.account().0, "alice");
    assert_eq!(faults.calls(), 3);
}

#[tokio::test]
async fn down_fails_every_call_until_back_up() {
    let rep = Faulty::new(InMemoryReplicator::new());
    let faults = rep.handle();
    let s = id("svc");
    faults.set_down(true);
    assert!(faults.is_down());
    for _ in 0..5 {
        assert!(matches!(
            rep.observe(&s).await,
            Err(Error::Unavailable { .. })
        ));
    }
    assert!(matches!(
        rep.managed().await,
        Err(Error::Unavailable { .. })
    ));
    assert!(matches!(
        rep.changes().await,
        Err(Error::Unavailable { .. })
    ));
    faults.set_down(false);
    assert_eq!(rep.observe(&s).await.unwrap(), None);
    assert_eq!(faults.calls(), 8);
}

#[tokio::test]
async fn latency_delays_every_call() {
    let store = Faulty::new(InMemoryImageStore::new("mem.local"));
    let faults = store.handle();
    faults.set_latency(Duration::from_millis(50));
    let start = Instant::now();
    store.ping().await.unwrap();
    store.ping().await.unwrap();
    assert!(start.elapsed() >= Duration::from_millis(100));
    faults.set_latency(Duration::ZERO);
    store.ping().await.unwrap();
    assert_eq!(faults.calls(), 3);
}

#[tokio::test]
async fn latency_applies_before_failing() {
    let reg = Faulty::new(InMemoryRegistry::new("alice"));
    let faults = reg.handle();
    faults.set_latency(Duration::from_millis(30));
    faults.set_down(true);
    let start = Instant::now();
    assert!(reg.services().await.is_err());
    assert!(start.elapsed() >= Duration::from_millis(30));
}

#[tokio::test]
async fn tampered_store_serves_bytes_the_client_rejects() {
    let inner = InMemoryImageStore::new("mem.local");
    let store = Faulty::new(inner.clone());
    let faults = store.handle();
    let repo = Repository::new("team/app").unwrap();
    let image = sample_image(3, 2, 512);
    store.push(&repo, &image, Some("v1")).await.unwrap();
    faults.set_tampered(true);
    match store.pull(&repo, &image.digest).await {
        Err(Error::Tampered { what, expected, .. }) => {
            assert_eq!(what, "layer 0");
            assert_eq!(expected, image.layers[0].digest.to_string());
        }
        other => panic!("expected Tampered, got {other:?}"),
    }
    // verify (a provided method) sees the same fault.
    assert!(matches!(
        store.verify(&repo, &image.digest).await,
        Err(Error::Tampered { .. })
    ));
    // Other reads are unaffected, and the stored bytes are intact.
    assert!(store.has(&repo, &image.digest).await.unwrap());
    assert_eq!(store.resolve(&repo, "v1").await.unwrap(), image.digest);
    assert_eq!(inner.pull(&repo, &image.digest).await.unwrap(), image);
    faults.set_tampered(false);
    assert_eq!(store.pull(&repo, &image.digest).await.unwrap(), image);
}

#[tokio::test]
async fn tampered_source_cannot_be_copied_from() {
    let source = Faulty::new(InMemoryImageStore::new("primary.local"));
    let mirror = InMemoryImageStore::new("mirror.local");
    let repo = Repository::new("team/app").unwrap();
    let image = sample_image(4, 1, 64);
    source.push(&repo, &image, None).await.unwrap();
    source.handle().set_tampered(true);
    assert!(matches!(
        source.copy_to(&repo, &image.digest, &mirror).await,
        Err(Error::Tampered { .. })
    ));
    assert!(!mirror.has(&repo, &image.digest).await.unwrap());
    source.handle().set_tampered(false);
    let report = source.copy_to(&repo, &image.digest, &mirror).await.unwrap();
    assert!(report.manifest_written);
    assert_eq!(mirror.pull(&repo, &image.digest).await.unwrap(), image);
}

#[tokio::test]
async fn one_handle_can_control_several_wrappers() {
    let site = FaultHandle::new();
    let reg = Faulty::with_handle(InMemoryRegistry::new("alice"), site.clone());
    let rep = Faulty::with_handle(InMemoryReplicator::new(), site.clone());
    site.set_down(true);
    assert!(reg.services().await.is_err());
    assert!(rep.managed().await.is_err());
    site.clear();
    assert!(reg.services().await.unwrap().is_empty());
    assert!(rep.managed().await.unwrap().is_empty());
    assert_eq!(site.calls(), 4);
}

#[tokio::test]
async fn a_stream_obtained_while_up_keeps_delivering_while_down() {
    use futures::StreamExt;
    let reg = Faulty::new(InMemoryRegistry::new("alice"));
    let mut changes = reg.changes().await.unwrap();
    reg.handle().set_down(true);
    // A write through another handle on the same registry.
    reg.inner()
        .register(&id("svc"), &sample_spec("mem.local"))
        .await
        .unwrap();
    let change = changes.next().await.unwrap().unwrap();
    assert_eq!(change.id, id("svc"));
}

#[tokio::test]
async fn faulty_log_fails_like_the_other_wrappers() {
    use br2k_core::log::{InMemoryLog, ReplicatedLog};
    use bytes::Bytes;
    let log = Faulty::new(InMemoryLog::new());
    let faults = log.handle();
    let lead = log.campaign("a").await.unwrap();
    faults.fail_next(1);
    let err = log
        .append(&lead, vec![Bytes::from_static(b"x")])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Unavailable { .. }), "{err:?}");
    assert!(err.is_retryable());
    // The failed append wrote nothing; the next one goes through.
    assert_eq!(log.inner().last_index().await.unwrap(), 0);
    assert_eq!(
        log.append(&lead, vec![Bytes::from_static(b"y")])
            .await
            .unwrap(),
        1..=1
    );
    // A watch opened while up keeps delivering while down.
    let mut entries = log.watch(1).await.unwrap();
    faults.set_down(true);
    for call in [
        log.last_index().await.map(drop),
        log.first_index().await.map(drop),
        log.read(1, 10).await.map(drop),
        log.leader().await.map(drop),
        log.compact(1).await,
        log.resign(&lead).await,
    ] {
        assert!(matches!(call, Err(Error::Unavailable { .. })), "{call:?}");
    }
    assert!(matches!(log.watch(1).await, Err(Error::Unavailable { .. })));
    assert!(matches!(
        log.observe().await,
        Err(Error::Unavailable { .. })
    ));
    assert!(matches!(
        log.campaign("b").await,
        Err(Error::Unavailable { .. })
    ));
    use futures::StreamExt;
    assert_eq!(entries.next().await.unwrap().unwrap().data, "y");
    faults.set_down(false);
    assert_eq!(log.read(1, 10).await.unwrap().len(), 1);
    // 1 campaign + 2 appends + 1 watch + 9 while down + 1 read.
    assert_eq!(faults.calls(), 14);
}
