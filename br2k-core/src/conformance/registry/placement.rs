//! Conformance behaviours of multi-cluster services: the clusters a spec lists and
//! the placement (active cluster and epoch) their operators record.

use futures::StreamExt;

use super::super::{DEFAULT_TIMEOUT, expect_kind};
use super::spec_v1;
use crate::id::ServiceId;
use crate::record::{ChangeKind, Placement, Role};
use crate::registry::Registry;

/// The clusters of a spec round-trip through the record; the placement is recorded
/// by the owner or an operator only, its epoch only grows (the same placement again
/// is a no-op), an invalid cluster name changes nothing, and each new placement is
/// one `Placed` change.
pub async fn placement(owner: &dyn Registry, stranger: &dyn Registry, id: &ServiceId) {
    let mut spec = spec_v1();
    spec.clusters = vec!["eu-1".into(), "us-2".into()];
    let rec = owner.register(id, &spec).await.expect("register");
    assert_eq!(rec.spec.clusters, spec.clusters, "clusters in the record");
    assert_eq!(rec.placement, None, "no placement before one is recorded");
    let mut changes = owner.changes().await.expect("changes");

    let p5 = Placement::new("eu-1", 5).expect("placement");
    expect_kind(
        owner
            .set_placement(id, &Placement::new("eu-1", 0).expect("placement"))
            .await,
        crate::ErrorKind::Conflict,
        "epoch 0",
    );
    expect_kind(
        stranger.set_placement(id, &p5).await,
        crate::ErrorKind::PermissionDenied,
        "placement without the operator role",
    );
    owner
        .grant(id, &stranger.account(), Role::Operator)
        .await
        .expect("grant operator");
    stranger.set_placement(id, &p5).await.expect("placement");
    stranger
        .set_placement(id, &p5)
        .await
        .expect("same placement is a no-op");
    assert_eq!(
        owner.active(id).await.expect("active").placement,
        Some(p5.clone())
    );
    for (stale, ctx) in [(5, "same epoch, other cluster"), (4, "older epoch")] {
        let p = Placement::new("us-2", stale).expect("placement");
        expect_kind(
            stranger.set_placement(id, &p).await,
            crate::ErrorKind::Conflict,
            ctx,
        );
    }
    let bad = Placement {
        cluster: "Not A Cluster".into(),
        epoch: 9,
    };
    expect_kind(
        owner.set_placement(id, &bad).await,
        crate::ErrorKind::InvalidInput,
        "invalid cluster name",
    );
    let p9 = Placement::new("us-2", 9).expect("placement");
    owner
        .set_placement(id, &p9)
        .await
        .expect("newer epoch by the owner");
    assert_eq!(
        owner.active(id).await.expect("active").placement,
        Some(p9.clone())
    );

    let mut placed = Vec::new();
    while placed.len() < 2 {
        match tokio::time::timeout(DEFAULT_TIMEOUT, changes.next()).await {
            Ok(Some(Ok(c))) if c.id == *id => {
                if let ChangeKind::Placed { placement } = c.kind {
                    placed.push(placement);
                }
            }
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => break,
        }
    }
    assert_eq!(placed, vec![p5, p9], "one Placed change per new placement");

    let mut invalid = spec_v1();
    invalid.clusters = vec!["eu-1".into(), "eu-1".into()];
    expect_kind(
        owner.publish(id, &invalid).await,
        crate::ErrorKind::InvalidInput,
        "a cluster listed twice",
    );
}
