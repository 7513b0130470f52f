//! The conformance suites run against the in-memory backends, bare and wrapped in
//! `Faulty` with no fault active.

use br2k_core::ServiceId;
use br2k_core::conformance::{image_store, registry, replicator};
use br2k_core::fault::Faulty;
use br2k_core::memory::{InMemoryImageStore, InMemoryRegistry, InMemoryReplicator};

fn fresh_id(name: &str) -> ServiceId {
    ServiceId::new(format!("{name}-{:08x}", rand::random::<u32>())).unwrap()
}

#[tokio::test]
async fn registry_conformance() {
    let owner = InMemoryRegistry::new("owner");
    let stranger = owner.as_account("stranger");
    let replica = owner.as_account("replica");
    registry::run_all(&owner, &stranger, &replica, fresh_id).await;
    // Twice on the same state: the suite only uses fresh ids.
    registry::run_all(&owner, &stranger, &replica, fresh_id).await;
}

#[tokio::test]
async fn registry_conformance_through_faulty() {
    let owner = InMemoryRegistry::new("owner");
    let stranger = Faulty::new(owner.as_account("stranger"));
    let replica = Faulty::new(owner.as_account("replica"));
    let owner = Faulty::new(owner);
    registry::run_all(&owner, &stranger, &replica, fresh_id).await;
    assert!(owner.handle().calls() > 50);
}

#[tokio::test]
async fn replicator_conformance() {
    let r = InMemoryReplicator::new();
    replicator::run_all(&r, fresh_id).await;
    replicator::run_all(&r, fresh_id).await;
}

#[tokio::test]
async fn replicator_conformance_through_faulty() {
    let r = Faulty::new(InMemoryReplicator::new());
    replicator::run_all(&r, fresh_id).await;
    assert!(r.handle().calls() > 20);
}

#[tokio::test]
async fn image_store_conformance() {
    let store = InMemoryImageStore::new("primary.local");
    let other = InMemoryImageStore::new("mirror.local:5000");
    image_store::run_all(&store, Some(&other), "conformance").await;
    image_store::run_all(&store, Some(&other), "conformance").await;
    image_store::run_all(&other, None, "team/conformance").await;
}

#[tokio::test]
async fn image_store_conformance_through_faulty() {
    let store = Faulty::new(InMemoryImageStore::new("primary.local"));
    let other = Faulty::new(InMemoryImageStore::new("mirror.local"));
    image_store::run_all(&store, Some(&other), "conformance").await;
    assert!(store.handle().calls() > 10);
    assert!(other.handle().calls() > 3);
}
