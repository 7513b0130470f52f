//! The supervisor over the in-memory backends: every finding is produced by a
//! `diagnoses_*` test and repaired by the running supervisor in a `repairs_*` test.

use std::sync::Arc;
use std::time::Duration;

use br2k_core::conformance::{eventually, sample_image};
use br2k_core::fault::{FaultHandle, Faulty};
use br2k_core::memory::{InMemoryImageStore, InMemoryRegistry, InMemoryReplicator};
use br2k_core::supervisor::{Supervisor, SupervisorEvent};
use br2k_core::{
    Autoscaling, Digest, Error, Finding, ImageRef, ImageStore, Outcome, Recoverer, RecoveryAction,
    Registry, Replicator, Repository, ServiceId, ServiceSpec,
};
use tokio::sync::{broadcast, oneshot};

const PRIMARY: &str = "primary.local";
const MIRROR: &str = "mirror.local";
const WAIT: Duration = Duration::from_secs(10);

struct Env {
    registry: InMemoryRegistry,
    chain: FaultHandle,
    replicator: InMemoryReplicator,
    replicator_faults: FaultHandle,
    primary: InMemoryImageStore,
    primary_faults: FaultHandle,
    mirror: InMemoryImageStore,
    sup: Arc<Supervisor>,
    id: ServiceId,
    repo: Repository,
    digest: Digest,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn image_ref(registry: &str, repo: &Repository, digest: Digest) -> ImageRef {
    ImageRef::new(registry, repo.clone(), Some("1.0"), Some(digest)).unwrap()
}

async fn env_with(edit: impl FnOnce(&mut ServiceSpec)) -> Env {
    let registry = InMemoryRegistry::new("operator");
    let faulty_registry = Faulty::new(registry.clone());
    let chain = faulty_registry.handle();
    let replicator = InMemoryReplicator::new();
    let faulty_replicator = Faulty::new(replicator.clone());
    let replicator_faults = faulty_replicator.handle();
    let primary = InMemoryImageStore::new(PRIMARY);
    let faulty_primary = Faulty::new(primary.clone());
    let primary_faults = faulty_primary.handle();
    let mirror = InMemoryImageStore::new(MIRROR);
    let repo = Repository::new("br2k/app").unwrap();
    let image = sample_image(1, 2, 512);
    primary.push(&repo, &image, Some("1.0")).await.unwrap();
    mirror.push(&repo, &image, Some("1.0")).await.unwrap();
    let mut spec = ServiceSpec::new(image_ref(PRIMARY, &repo, image.digest), 3).unwrap();
    spec.env.insert("MODE".into(), "prod".into());
    edit(&mut spec);
    let id = ServiceId::new("app").unwrap();
    registry.register(&id, &spec).await.unwrap();
    registry.resume(&id).await.unwrap();
    let sup = Supervisor::builder()
        .registry(Arc::new(faulty_registry))
        .replicator(Arc::new(faulty_replicator))
        .image_store(Arc::new(faulty_primary))
        .image_store(Arc::new(mirror.clone()))
        .resync(Duration::from_millis(100))
        .backoff(Duration::from_millis(20), Duration::from_millis(500))
        .verify_ttl(Duration::from_millis(50))
        .build()
        .unwrap();
    Env {
        registry,
        chain,
        replicator,
        replicator_faults,
        primary,
        primary_faults,
        mirror,
        sup: Arc::new(sup),
        id,
        repo,
        digest: image.digest,
        stop: None,
    }
}

async fn env() -> Env {
    env_with(|_| {}).await
}

impl Env {
    /// Deploys the record once (without the loop) and checks it is healthy.
    async fn deployed(self) -> Self {
        let report = self.sup.reconcile(&self.id).await.unwrap();
        assert_eq!(report.outcome, Outcome::Recovered, "{report:?}");
        let d = self.sup.diagnose(&self.id).await.unwrap();
        assert!(d.is_healthy(), "{d:?}");
        self
    }

    /// Deploys, starts the supervision loop and waits until the service is healthy.
    async fn running(mut self) -> (Self, broadcast::Receiver<SupervisorEvent>) {
        // Deploy first, so that the events received are about injected failures only.
        self.sup.reconcile(&self.id).await.unwrap();
        let events = self.sup.subscribe();
        let (tx, rx) = oneshot::channel();
        tokio::spawn(Arc::clone(&self.sup).run(async {
            let _ = rx.await;
        }));
        self.stop = Some(tx);
        // The loop has subscribed and done its first resync.
        eventually(WAIT, "first resync", || async {
            match self.sup.metrics().reconciles {
                n if n >= 2 => Ok(()),
                n => Err(format!("{n} reconciles")),
            }
        })
        .await;
        self.wait_healthy().await;
        (self, events)
    }

    async fn findings(&self) -> Vec<&'static str> {
        let d = self.sup.diagnose(&self.id).await.unwrap();
        d.findings.iter().map(Finding::name).collect()
    }

    async fn wait_findings(&self, expected: &[&str]) {
        eventually(WAIT, "expected findings", || async {
            let f = self.findings().await;
            if f == expected {
                Ok(())
            } else {
                Err(format!("{f:?}"))
            }
        })
        .await
    }

    async fn wait_healthy(&self) {
        self.wait_findings(&[]).await
    }
}

/// Waits for an event that found `finding`, returns it.
async fn event_with(
    events: &mut broadcast::Receiver<SupervisorEvent>,
    finding: &str,
) -> SupervisorEvent {
    tokio::time::timeout(WAIT, async {
        loop {
            let e = events.recv().await.unwrap();
            if e.report
                .diagnosis
                .findings
                .iter()
                .any(|f| f.name() == finding)
            {
                return e;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no event with {finding}"))
}

fn action_names(e: &SupervisorEvent) -> Vec<RecoveryAction> {
    e.report.actions.iter().map(|a| a.action.clone()).collect()
}

// ---------------------------------------------------------------- diagnoses

#[tokio::test(start_paused = true)]
async fn diagnoses_missing_workload_and_parts() {
    let env = env().await;
    assert_eq!(env.findings().await, ["missing_workload"]);
    let env = env.deployed().await;
    env.replicator.delete_part(&env.id, "service").unwrap();
    let d = env.sup.diagnose(&env.id).await.unwrap();
    assert_eq!(
        d.findings,
        [Finding::MissingWorkload {
            parts: vec!["service".into()]
        }]
    );
}

#[tokio::test(start_paused = true)]
async fn diagnoses_unexpected_workload_of_stopped_and_unknown_services() {
    let env = env().await.deployed().await;
    env.registry.stop(&env.id).await.unwrap();
    assert_eq!(env.findings().await, ["unexpected_workload"]);
    let stranger = ServiceId::new("stranger").unwrap();
    let mut rec = env.registry.active(&env.id).await.unwrap();
    rec.id = stranger.clone();
    env.replicator.apply(&rec).await.unwrap();
    let d = env.sup.diagnose(&stranger).await.unwrap();
    assert_eq!(d.record_version, None);
    assert_eq!(d.findings, [Finding::UnexpectedWorkload]);
}

#[tokio::test(start_paused = true)]
async fn diagnoses_replicas_drifted() {
    let env = env().await.deployed().await;
    env.replicator.set_live_replicas(&env.id, 5).unwrap();
    let d = env.sup.diagnose(&env.id).await.unwrap();
    assert_eq!(
        d.findings,
        [Finding::ReplicasDrifted {
            desired: 3,
            observed: 5
        }]
    );
}

#[tokio::test(start_paused = true)]
async fn diagnoses_image_drifted_by_digest_not_host() {
    let env = env().await.deployed().await;
    // The same digest from the mirror is not drift.
    let same = image_ref(MIRROR, &env.repo, env.digest);
    env.replicator.set_live_image(&env.id, same).unwrap();
    assert!(env.findings().await.is_empty());
    let other = image_ref(PRIMARY, &env.repo, Digest::of(b"other"));
    env.replicator.set_live_image(&env.id, other).unwrap();
    assert_eq!(env.findings().await, ["image_drifted"]);
}

#[tokio::test(start_paused = true)]
async fn diagnoses_template_tampered() {
    let env = env().await.deployed().await;
    env.replicator
        .tamper_template(&env.id, |t| {
            t.env.insert("MODE".into(), "debug".into());
        })
        .unwrap();
    let d = env.sup.diagnose(&env.id).await.unwrap();
    assert_eq!(
        d.findings,
        [Finding::TemplateTampered {
            fields: vec!["env".into()]
        }]
    );
}

#[tokio::test(start_paused = true)]
async fn diagnoses_replicas_unhealthy() {
    let env = env().await.deployed().await;
    env.replicator.fail_replica(&env.id, "app-1").unwrap();
    let d = env.sup.diagnose(&env.id).await.unwrap();
    assert_eq!(
        d.findings,
        [Finding::ReplicasUnhealthy {
            ready: 2,
            desired: 3,
            replicas: vec!["app-1".into()]
        }]
    );
}

#[tokio::test(start_paused = true)]
async fn diagnoses_image_unavailable() {
    let env = env().await.deployed().await;
    env.mirror.remove_image(&env.repo, &env.digest).unwrap();
    let d = env.sup.diagnose(&env.id).await.unwrap();
    assert_eq!(
        d.findings,
        [Finding::ImageUnavailable {
            registry: MIRROR.into()
        }]
    );
}

#[tokio::test(start_paused = true)]
async fn diagnoses_image_tampered_stored_or_served() {
    let env = env().await.deployed().await;
    let layer = sample_image(1, 2, 512).layers[0].digest;
    env.primary.corrupt_blob(&layer).unwrap();
    // The earlier verification is trusted for the TTL only.
    tokio::time::sleep(Duration::from_millis(60)).await;
    // The workload pulls from the primary: it must move to the mirror too.
    assert_eq!(
        env.findings().await,
        ["image_source_unhealthy", "image_tampered"]
    );

    let env2 = self::env().await.deployed().await;
    env2.primary_faults.set_tampered(true);
    tokio::time::sleep(Duration::from_millis(60)).await;
    let d = env2.sup.diagnose(&env2.id).await.unwrap();
    assert!(
        matches!(&d.findings[..], [Finding::ImageSourceUnhealthy { registry: r1 }, Finding::ImageTampered { registry, .. }] if registry == PRIMARY && r1 == PRIMARY),
        "{d:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn diagnoses_registry_down() {
    let env = env().await.deployed().await;
    env.primary_faults.set_down(true);
    let d = env.sup.diagnose(&env.id).await.unwrap();
    assert_eq!(
        d.findings,
        [
            Finding::ImageSourceUnhealthy {
                registry: PRIMARY.into()
            },
            Finding::RegistryDown {
                registry: PRIMARY.into()
            }
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn diagnoses_chain_endpoint_down_from_the_last_verified_record() {
    let env = env().await;
    // Never read: no record to fall back on.
    env.chain.set_down(true);
    assert!(matches!(
        env.sup.diagnose(&env.id).await,
        Err(Error::Unavailable { .. })
    ));
    env.chain.set_down(false);
    let env = env.deployed().await;
    env.chain.set_down(true);
    let d = env.sup.diagnose(&env.id).await.unwrap();
    assert_eq!(d.record_version, Some(1));
    assert_eq!(d.findings.len(), 1);
    assert_eq!(d.findings[0].name(), "chain_endpoint_down");
}

#[tokio::test(start_paused = true)]
async fn steady_state_does_not_pull_image_bytes_again() {
    let env = env().await;
    let sup = Supervisor::builder()
        .registry(Arc::new(env.registry.clone()))
        .replicator(Arc::new(env.replicator.clone()))
        .image_store(Arc::new(env.primary.clone()))
        .verify_ttl(Duration::from_secs(600))
        .build()
        .unwrap();
    sup.reconcile(&env.id).await.unwrap();
    let after_first = env.primary.request_count();
    for _ in 0..5 {
        assert!(sup.diagnose(&env.id).await.unwrap().is_healthy());
    }
    // One presence check per diagnosis, no pull.
    assert_eq!(env.primary.request_count(), after_first + 5);
}

#[tokio::test(start_paused = true)]
async fn recover_of_a_healthy_diagnosis_does_nothing() {
    let env = env().await.deployed().await;
    let applies = env.replicator.apply_count();
    let d = env.sup.diagnose(&env.id).await.unwrap();
    let report = env.sup.recover(&d).await.unwrap();
    assert_eq!(report.outcome, Outcome::Healthy);
    assert!(report.actions.is_empty());
    assert_eq!(env.replicator.apply_count(), applies);
}

#[tokio::test(start_paused = true)]
async fn builder_rejects_incomplete_or_inverted_settings() {
    let no_registry = Supervisor::builder()
        .replicator(Arc::new(InMemoryReplicator::new()))
        .build();
    assert!(matches!(no_registry, Err(Error::InvalidInput(_))));
    let inverted = Supervisor::builder()
        .registry(Arc::new(InMemoryRegistry::new("a")))
        .replicator(Arc::new(InMemoryReplicator::new()))
        .backoff(Duration::from_secs(2), Duration::from_secs(1))
        .build();
    assert!(matches!(inverted, Err(Error::InvalidInput(_))));
}

// ---------------------------------------------------------------- repairs

#[tokio::test(start_paused = true)]
async fn repairs_missing_workload_and_parts() {
    let (env, mut events) = env().await.running().await;
    env.replicator.delete_workload(&env.id).unwrap();
    let e = event_with(&mut events, "missing_workload").await;
    assert_eq!(
        action_names(&e),
        [RecoveryAction::ApplyRecord {
            version: 1,
            registry: PRIMARY.into()
        }]
    );
    assert_eq!(e.report.outcome, Outcome::Recovered);
    env.wait_healthy().await;
    env.replicator.delete_part(&env.id, "service").unwrap();
    event_with(&mut events, "missing_workload").await;
    env.wait_healthy().await;
}

#[tokio::test(start_paused = true)]
async fn repairs_unexpected_workload_after_stop() {
    let (env, mut events) = env().await.running().await;
    let as_of = env.registry.active(&env.id).await.unwrap().as_of;
    env.registry.stop(&env.id).await.unwrap();
    let e = event_with(&mut events, "unexpected_workload").await;
    assert_eq!(action_names(&e), [RecoveryAction::RemoveWorkload]);
    eventually(WAIT, "workload removed", || async {
        match env.replicator.observe(&env.id).await.unwrap() {
            None => Ok(()),
            Some(_) => Err("still there".to_owned()),
        }
    })
    .await;
    // The supervisor never wrote to the registry (only our stop did).
    let rec = env.registry.active(&env.id).await.unwrap();
    assert_eq!(rec.as_of, as_of.map(|s| s + 1));
}

#[tokio::test(start_paused = true)]
async fn repairs_replicas_drifted() {
    let (env, mut events) = env().await.running().await;
    env.replicator.set_live_replicas(&env.id, 7).unwrap();
    event_with(&mut events, "replicas_drifted").await;
    env.wait_healthy().await;
    let live = env.replicator.observe(&env.id).await.unwrap().unwrap();
    assert_eq!(live.desired_replicas, 3);
}

#[tokio::test(start_paused = true)]
async fn repairs_image_drifted() {
    let (env, mut events) = env().await.running().await;
    let evil = image_ref(PRIMARY, &env.repo, Digest::of(b"evil"));
    env.replicator.set_live_image(&env.id, evil).unwrap();
    event_with(&mut events, "image_drifted").await;
    env.wait_healthy().await;
    let live = env.replicator.observe(&env.id).await.unwrap().unwrap();
    assert_eq!(live.template.image.digest(), Some(&env.digest));
}

#[tokio::test(start_paused = true)]
async fn repairs_template_tampered() {
    let (env, mut events) = env().await.running().await;
    env.replicator
        .tamper_template(&env.id, |t| t.args.push("--evil".into()))
        .unwrap();
    event_with(&mut events, "template_tampered").await;
    env.wait_healthy().await;
}

#[tokio::test(start_paused = true)]
async fn repairs_replicas_unhealthy() {
    let (env, mut events) = env().await.running().await;
    env.replicator.fail_replica(&env.id, "app-2").unwrap();
    let e = event_with(&mut events, "replicas_unhealthy").await;
    assert_eq!(
        action_names(&e),
        [RecoveryAction::ReplaceReplicas {
            replicas: vec!["app-2".into()]
        }]
    );
    env.wait_healthy().await;
}

#[tokio::test(start_paused = true)]
async fn repairs_image_unavailable_from_the_mirror() {
    let (env, mut events) = env().await.running().await;
    env.primary.remove_image(&env.repo, &env.digest).unwrap();
    let e = event_with(&mut events, "image_unavailable").await;
    assert_eq!(
        action_names(&e),
        [RecoveryAction::RepairImage {
            from: MIRROR.into(),
            to: PRIMARY.into()
        }]
    );
    env.wait_healthy().await;
    assert!(env.primary.has(&env.repo, &env.digest).await.unwrap());
}

#[tokio::test(start_paused = true)]
async fn repairs_image_tampered() {
    let (env, mut events) = env().await.running().await;
    let layer = sample_image(1, 2, 512).layers[1].digest;
    env.mirror.corrupt_blob(&layer).unwrap();
    let e = event_with(&mut events, "image_tampered").await;
    assert_eq!(
        action_names(&e),
        [RecoveryAction::RepairImage {
            from: PRIMARY.into(),
            to: MIRROR.into()
        }]
    );
    env.wait_healthy().await;
    env.mirror.verify(&env.repo, &env.digest).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn registry_down_applies_from_the_mirror() {
    let (env, mut events) = env().await.running().await;
    env.primary_faults.set_down(true);
    env.replicator.delete_workload(&env.id).unwrap();
    let e = event_with(&mut events, "missing_workload").await;
    assert_eq!(
        action_names(&e),
        [RecoveryAction::ApplyRecord {
            version: 1,
            registry: MIRROR.into()
        }]
    );
    env.wait_findings(&["registry_down"]).await;
    let live = env.replicator.observe(&env.id).await.unwrap().unwrap();
    assert_eq!(live.template.image.registry(), MIRROR);
    assert_eq!(live.template.image.digest(), Some(&env.digest));
    env.primary_faults.set_down(false);
    // Same digest from the mirror: healthy, no move back needed.
    env.wait_healthy().await;
}

#[tokio::test(start_paused = true)]
async fn chain_endpoint_down_recovers_from_the_last_verified_record() {
    let (env, mut events) = env().await.running().await;
    env.chain.set_down(true);
    env.replicator.delete_workload(&env.id).unwrap();
    let e = event_with(&mut events, "missing_workload").await;
    assert_eq!(e.report.diagnosis.findings[0].name(), "chain_endpoint_down");
    assert_eq!(
        action_names(&e)[..2],
        [
            RecoveryAction::UseLastVerifiedRecord,
            RecoveryAction::ApplyRecord {
                version: 1,
                registry: PRIMARY.into()
            }
        ]
    );
    env.wait_findings(&["chain_endpoint_down"]).await;
    env.chain.set_down(false);
    env.wait_healthy().await;
}

#[tokio::test(start_paused = true)]
async fn autoscaler_change_within_bounds_is_left_alone() {
    let env = env_with(|s| {
        s.autoscaling = Some(Autoscaling {
            min_replicas: 2,
            max_replicas: 6,
        })
    })
    .await;
    let (env, mut events) = env.running().await;
    env.replicator.set_live_replicas(&env.id, 5).unwrap();
    // Several resync periods: nothing is found, nothing is applied.
    let applies = env.replicator.apply_count();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(env.findings().await.is_empty());
    assert_eq!(env.replicator.apply_count(), applies);
    assert!(events.try_recv().is_err());
    // A template repair keeps the autoscaler's count.
    env.replicator
        .tamper_template(&env.id, |t| t.env.clear())
        .unwrap();
    event_with(&mut events, "template_tampered").await;
    env.wait_healthy().await;
    let live = env.replicator.observe(&env.id).await.unwrap().unwrap();
    assert_eq!(live.desired_replicas, 5);
    // Outside the bounds it is drift.
    env.replicator.set_live_replicas(&env.id, 9).unwrap();
    event_with(&mut events, "replicas_drifted").await;
    env.wait_healthy().await;
}

#[tokio::test(start_paused = true)]
async fn rollback_in_the_registry_is_applied_without_a_fight() {
    let (env, _events) = env().await.running().await;
    let v2_image = sample_image(2, 1, 256);
    env.primary.push(&env.repo, &v2_image, None).await.unwrap();
    env.mirror.push(&env.repo, &v2_image, None).await.unwrap();
    let mut spec = env.registry.active(&env.id).await.unwrap().spec;
    spec.image = image_ref(PRIMARY, &env.repo, v2_image.digest);
    env.registry.publish(&env.id, &spec).await.unwrap();
    let live_digest = || async {
        let live = env.replicator.observe(&env.id).await.unwrap().unwrap();
        (live.template.image.digest().copied(), live.applied_version)
    };
    eventually(WAIT, "v2 live", || async {
        let got = live_digest().await;
        if got == (Some(v2_image.digest), Some(2)) {
            Ok(())
        } else {
            Err(format!("{got:?}"))
        }
    })
    .await;
    env.registry.rollback(&env.id, 1).await.unwrap();
    eventually(WAIT, "v1 live again", || async {
        let got = live_digest().await;
        if got == (Some(env.digest), Some(1)) {
            Ok(())
        } else {
            Err(format!("{got:?}"))
        }
    })
    .await;
    env.wait_healthy().await;
    let applies = env.replicator.apply_count();
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(env.replicator.apply_count(), applies, "no re-apply of v2");
    assert_eq!(live_digest().await, (Some(env.digest), Some(1)));
}

#[tokio::test(start_paused = true)]
async fn backoff_grows_on_persistent_failure_and_resets_after() {
    let (env, _events) = env().await.running().await;
    env.replicator_faults.set_down(true);
    env.replicator.delete_workload(&env.id).unwrap();
    eventually(WAIT, "backoff at 160 ms or more", || async {
        match env.sup.backoff(&env.id) {
            Some(d) if d >= Duration::from_millis(160) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(env.sup.metrics().errors >= 4);
    env.replicator_faults.set_down(false);
    env.wait_healthy().await;
    eventually(WAIT, "backoff reset", || async {
        match env.sup.backoff(&env.id) {
            None => Ok(()),
            Some(d) => Err(format!("{d:?}")),
        }
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn metrics_count_recoveries_by_finding() {
    let (env, mut events) = env().await.running().await;
    env.replicator.fail_replica(&env.id, "app-0").unwrap();
    event_with(&mut events, "replicas_unhealthy").await;
    env.replicator.set_live_replicas(&env.id, 1).unwrap();
    event_with(&mut events, "replicas_drifted").await;
    let m = env.sup.metrics();
    assert!(m.recoveries >= 2, "{m:?}");
    assert!(m.recoveries_by_finding["replicas_unhealthy"] >= 1);
    assert!(m.recoveries_by_finding["replicas_drifted"] >= 1);
    assert!(m.change_events >= 2);
}

#[tokio::test(start_paused = true)]
async fn unknown_service_workload_is_removed() {
    let (env, mut events) = env().await.running().await;
    let stranger = ServiceId::new("stranger").unwrap();
    let mut rec = env.registry.active(&env.id).await.unwrap();
    rec.id = stranger.clone();
    env.replicator.apply(&rec).await.unwrap();
    let e = event_with(&mut events, "unexpected_workload").await;
    assert_eq!(e.id, stranger);
    eventually(WAIT, "stranger removed", || async {
        match env.replicator.observe(&stranger).await.unwrap() {
            None => Ok(()),
            Some(_) => Err("still there".to_owned()),
        }
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn event_buffer_must_hold_an_event() {
    let registry: Arc<dyn Registry> = Arc::new(InMemoryRegistry::new("owner"));
    let replicator: Arc<dyn Replicator> = Arc::new(InMemoryReplicator::new());
    let build = |n: usize| {
        Supervisor::builder()
            .registry(registry.clone())
            .replicator(replicator.clone())
            .event_buffer(n)
            .build()
    };
    assert_eq!(
        build(0).unwrap_err().kind(),
        br2k_core::ErrorKind::InvalidInput
    );
    let sup = build(16).unwrap();
    let mut events = sup.subscribe();
    assert!(matches!(
        events.try_recv(),
        Err(broadcast::error::TryRecvError::Empty)
    ));
}

/// A replicator whose applies report success and change nothing (a lying backend).
#[derive(Debug)]
struct ApplyDoesNothing(InMemoryReplicator);

#[async_trait::async_trait]
impl Replicator for ApplyDoesNothing {
    async fn apply(&self, _: &br2k_core::ServiceRecord) -> br2k_core::Result<()> {
        Ok(())
    }
    async fn observe(&self, id: &ServiceId) -> br2k_core::Result<Option<br2k_core::ObservedState>> {
        self.0.observe(id).await
    }
    async fn remove(&self, id: &ServiceId) -> br2k_core::Result<()> {
        self.0.remove(id).await
    }
    async fn replace_replicas(&self, id: &ServiceId, replicas: &[String]) -> br2k_core::Result<()> {
        self.0.replace_replicas(id, replicas).await
    }
    async fn managed(&self) -> br2k_core::Result<Vec<ServiceId>> {
        self.0.managed().await
    }
    async fn changes(&self) -> br2k_core::Result<futures::stream::BoxStream<'static, ServiceId>> {
        self.0.changes().await
    }
}

#[tokio::test(start_paused = true)]
async fn a_recovery_is_recovered_only_when_the_live_state_matches_afterwards() {
    let env = env().await.deployed().await;
    env.replicator.remove(&env.id).await.unwrap();
    let sup = Supervisor::builder()
        .registry(Arc::new(env.registry.clone()))
        .replicator(Arc::new(ApplyDoesNothing(env.replicator.clone())))
        .image_store(Arc::new(env.primary.clone()))
        .image_store(Arc::new(env.mirror.clone()))
        .settle_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let report = sup.reconcile(&env.id).await.unwrap();
    assert!(
        report.actions.iter().all(|a| a.error.is_none()),
        "{report:?}"
    );
    assert_eq!(report.outcome, Outcome::Partial, "{report:?}");
    assert!(!report.converged);
    assert_eq!(
        report.remaining,
        [Finding::MissingWorkload { parts: vec![] }]
    );
    // The honest backend does converge, and says so.
    let report = env.sup.reconcile(&env.id).await.unwrap();
    assert_eq!(report.outcome, Outcome::Recovered, "{report:?}");
    assert!(report.converged && report.remaining.is_empty());
}

#[tokio::test(start_paused = true)]
async fn an_apply_verifies_its_source_anew_despite_a_fresh_cache() {
    let env = env().await.deployed().await;
    // A supervisor that trusts a verification for an hour, and has just verified.
    let sup = Supervisor::builder()
        .registry(Arc::new(env.registry.clone()))
        .replicator(Arc::new(env.replicator.clone()))
        .image_store(Arc::new(env.primary.clone()))
        .image_store(Arc::new(env.mirror.clone()))
        .verify_ttl(Duration::from_secs(3600))
        .build()
        .unwrap();
    assert!(sup.diagnose(&env.id).await.unwrap().is_healthy());
    let layer = sample_image(1, 2, 512).layers[0].digest;
    env.primary.corrupt_blob(&layer).unwrap();
    env.replicator.remove(&env.id).await.unwrap();
    let report = sup.reconcile(&env.id).await.unwrap();
    assert!(
        report
            .actions
            .iter()
            .any(|a| matches!(&a.action, RecoveryAction::ApplyRecord { .. }) && a.error.is_none()),
        "{report:?}"
    );
    let live = env.replicator.observe(&env.id).await.unwrap().unwrap();
    assert_eq!(
        live.template.image.registry(),
        MIRROR,
        "applied from the corrupt primary"
    );
}

#[tokio::test(start_paused = true)]
async fn a_copy_a_repair_cannot_fix_is_reported_unrepairable_until_it_verifies() {
    let env = env().await.deployed().await;
    // The primary serves wrong bytes whatever is copied to it.
    env.primary_faults.set_tampered(true);
    tokio::time::sleep(Duration::from_millis(60)).await;
    let report = env.sup.reconcile(&env.id).await.unwrap();
    let repair = report
        .actions
        .iter()
        .find(|a| matches!(a.action, RecoveryAction::RepairImage { .. }))
        .expect("a repair");
    assert!(repair.error.is_some(), "{report:?}");
    assert_eq!(report.outcome, Outcome::Partial);
    assert_eq!(env.sup.unrepairable(), [(PRIMARY.to_owned(), env.digest)]);
    // Never a source: the workload now pulls from the mirror.
    let live = env.replicator.observe(&env.id).await.unwrap().unwrap();
    assert_eq!(live.template.image.registry(), MIRROR);
    // Not repaired again and again.
    tokio::time::sleep(Duration::from_millis(60)).await;
    let report = env.sup.reconcile(&env.id).await.unwrap();
    assert!(
        !report
            .actions
            .iter()
            .any(|a| matches!(a.action, RecoveryAction::RepairImage { .. })),
        "{report:?}"
    );
    assert_eq!(report.remaining.len(), 1, "{report:?}");
    // Once the copy verifies again, it is no longer reported.
    env.primary_faults.set_tampered(false);
    tokio::time::sleep(Duration::from_millis(60)).await;
    let report = env.sup.reconcile(&env.id).await.unwrap();
    assert_eq!(report.outcome, Outcome::Healthy, "{report:?}");
    assert!(env.sup.unrepairable().is_empty());
}

/// A change by another writer while a recovery waits for its apply to settle ends
/// the wait: the recovery returns with the new drift instead of blocking the next
/// one until the settle timeout (15 s). Found by the fault matrix (registry-stop
/// with the image patched by another field manager: the foreign image stayed in the
/// StatefulSet for the whole settle timeout).
#[tokio::test(start_paused = true)]
async fn a_change_by_another_writer_during_settle_ends_the_wait() {
    let e = env().await.deployed().await;
    e.replicator.delete_workload(&e.id).unwrap();
    // Every replicator call takes a while, so the other writer acts between the
    // apply and the first look after it.
    e.replicator_faults.set_latency(Duration::from_millis(100));
    let applies = e.replicator.apply_count();
    let sup = Arc::clone(&e.sup);
    let id = e.id.clone();
    let t0 = tokio::time::Instant::now();
    let recovery = tokio::spawn(async move { sup.reconcile(&id).await });
    while e.replicator.apply_count() == applies {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let foreign = ImageRef::parse("example.invalid/intruder:1").unwrap();
    e.replicator.set_live_image(&e.id, foreign).unwrap();
    let report = recovery.await.unwrap().unwrap();
    let took = t0.elapsed();
    assert!(
        report
            .remaining
            .iter()
            .any(|f| matches!(f, Finding::ImageDrifted { .. })),
        "{report:?}"
    );
    assert!(
        took < Duration::from_secs(5),
        "the recovery waited {took:?} for a workload another writer changed"
    );
    // The next recovery repairs it.
    e.replicator_faults.set_latency(Duration::ZERO);
    let next = e.sup.reconcile(&e.id).await.unwrap();
    assert_eq!(next.outcome, Outcome::Recovered, "{next:?}");
}
