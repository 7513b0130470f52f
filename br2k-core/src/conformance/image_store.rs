//! Conformance of [`ImageStore`] implementations.
//!
//! Every behaviour pushes images made from a random seed into its own repository
//! under `repo_prefix`, so the suite can run repeatedly against a persistent registry.

use bytes::Bytes;

use super::{expect_kind, sample_image};
use crate::artifact::{Image, SNAPSHOT_ARTIFACT};
use crate::digest::Digest;
use crate::error::Error;
use crate::image::Repository;
use crate::store::ImageStore;

/// A repository `<prefix>/<name>-<random>` never used before.
pub fn fresh_repository(prefix: &str, name: &str) -> Repository {
    let suffix: u32 = rand::random();
    Repository::new(format!("{prefix}/{name}-{suffix:08x}"))
        .expect("repo_prefix must be a valid repository path")
}

fn assert_same_image(got: &Image, want: &Image, ctx: &str) {
    assert_eq!(got.digest, want.digest, "{ctx}: digest");
    assert_eq!(
        got.manifest_bytes, want.manifest_bytes,
        "{ctx}: manifest bytes"
    );
    assert_eq!(got.config.data, want.config.data, "{ctx}: config");
    assert_eq!(got.layers.len(), want.layers.len(), "{ctx}: layer count");
    for (i, (g, w)) in got.layers.iter().zip(&want.layers).enumerate() {
        assert_eq!(g.digest, w.digest, "{ctx}: layer {i} digest");
        assert_eq!(g.data, w.data, "{ctx}: layer {i} bytes");
    }
}

/// The store answers and names its registry.
pub async fn ping_and_name(store: &dyn ImageStore) {
    store.ping().await.expect("ping");
    assert!(!store.registry().is_empty(), "registry name");
}

/// Push then pull gives the same verified image; `has`, `resolve` and `verify` agree.
pub async fn push_pull_round_trip(store: &dyn ImageStore, repo: &Repository) {
    let image = sample_image(rand::random(), 3, 4096);
    let digest = store.push(repo, &image, Some("v1")).await.expect("push");
    assert_eq!(digest, image.digest);
    assert!(store.has(repo, &digest).await.expect("has"));
    assert_eq!(store.resolve(repo, "v1").await.expect("resolve"), digest);
    let pulled = store.pull(repo, &digest).await.expect("pull");
    assert_same_image(&pulled, &image, "pulled");
    pulled.verify().expect("pulled image verifies");
    store.verify(repo, &digest).await.expect("verify");
}

/// Pushing again succeeds and changes nothing; pushing another image with the same
/// tag moves the tag.
pub async fn push_is_idempotent(store: &dyn ImageStore, repo: &Repository) {
    let image = sample_image(rand::random(), 2, 1024);
    let d1 = store
        .push(repo, &image, Some("latest"))
        .await
        .expect("push");
    let d2 = store
        .push(repo, &image, Some("latest"))
        .await
        .expect("push again");
    assert_eq!(d1, d2);
    assert_same_image(
        &store.pull(repo, &d1).await.expect("pull"),
        &image,
        "after two pushes",
    );
    let newer = sample_image(rand::random(), 2, 1024);
    store
        .push(repo, &newer, Some("latest"))
        .await
        .expect("push newer");
    assert_eq!(
        store.resolve(repo, "latest").await.expect("resolve"),
        newer.digest
    );
    assert!(
        store.has(repo, &image.digest).await.expect("has old"),
        "old image kept"
    );
}

/// Unknown content: pull and resolve are NotFound, `has` is false.
pub async fn unknown_content(store: &dyn ImageStore, repo: &Repository) {
    let absent = Digest::of(format!("absent {}", rand::random::<u64>()).as_bytes());
    assert!(!store.has(repo, &absent).await.expect("has"));
    expect_kind(
        store.pull(repo, &absent).await,
        crate::ErrorKind::NotFound,
        "pull unknown",
    );
    expect_kind(
        store.resolve(repo, "no-such-tag").await,
        crate::ErrorKind::NotFound,
        "resolve unknown tag",
    );
}

/// Bad tags are InvalidInput; an image whose bytes do not match its manifest is
/// refused (Tampered or InvalidInput) and not stored.
pub async fn invalid_inputs(store: &dyn ImageStore, repo: &Repository) {
    expect_kind(
        store.resolve(repo, "bad tag!").await,
        crate::ErrorKind::InvalidInput,
        "resolve bad tag",
    );
    let image = sample_image(rand::random(), 1, 256);
    expect_kind(
        store.push(repo, &image, Some("-bad")).await,
        crate::ErrorKind::InvalidInput,
        "push with bad tag",
    );
    let mut forged = sample_image(rand::random(), 2, 256);
    let mut data = forged.layers[1].data.to_vec();
    data[0] ^= 0xff;
    forged.layers[1].data = Bytes::from(data);
    match store.push(repo, &forged, None).await {
        Err(Error::Tampered { .. } | Error::InvalidInput(_)) => {}
        other => panic!("push of a forged image: expected Tampered or InvalidInput, got {other:?}"),
    }
    assert!(
        !store.has(repo, &forged.digest).await.expect("has"),
        "forged image not stored"
    );
}

/// A state snapshot artifact round-trips with its artifact type.
pub async fn snapshot_round_trip(store: &dyn ImageStore, repo: &Repository) {
    let data = Bytes::from(format!("snapshot state {}", rand::random::<u64>()).repeat(100));
    let snapshot = Image::snapshot(data.clone());
    let digest = store
        .push(repo, &snapshot, Some("state-1"))
        .await
        .expect("push");
    let pulled = store.pull(repo, &digest).await.expect("pull");
    assert_same_image(&pulled, &snapshot, "snapshot");
    assert_eq!(
        pulled.manifest.artifact_type.as_deref(),
        Some(SNAPSHOT_ARTIFACT)
    );
    assert_eq!(pulled.layers[0].data, data);
}

/// Copying to another store makes the image available there; a second copy
/// transfers nothing.
pub async fn copy_to_other(store: &dyn ImageStore, other: &dyn ImageStore, repo: &Repository) {
    let image = sample_image(rand::random(), 2, 2048);
    store.push(repo, &image, None).await.expect("push");
    let report = store
        .copy_to(repo, &image.digest, other)
        .await
        .expect("copy");
    assert!(report.manifest_written, "first copy writes the manifest");
    assert_same_image(
        &other.pull(repo, &image.digest).await.expect("pull copy"),
        &image,
        "copy",
    );
    let again = store
        .copy_to(repo, &image.digest, other)
        .await
        .expect("copy again");
    assert!(!again.manifest_written, "second copy writes nothing");
    assert_eq!(again.blobs_copied, 0, "second copy sends no blob");
    assert_eq!(again.bytes_copied, 0, "second copy sends no byte");
}

/// Runs every behaviour under `repo_prefix` (a valid repository path such as
/// `"conformance"`); `other`, when given, is a second store for [`copy_to_other`].
pub async fn run_all(store: &dyn ImageStore, other: Option<&dyn ImageStore>, repo_prefix: &str) {
    let repo = |name| fresh_repository(repo_prefix, name);
    ping_and_name(store).await;
    push_pull_round_trip(store, &repo("round-trip")).await;
    push_is_idempotent(store, &repo("idempotent")).await;
    unknown_content(store, &repo("unknown")).await;
    invalid_inputs(store, &repo("invalid")).await;
    snapshot_round_trip(store, &repo("snapshot")).await;
    if let Some(other) = other {
        ping_and_name(other).await;
        copy_to_other(store, other, &repo("copy")).await;
    }
}
