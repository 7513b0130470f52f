//! Integration tests against real Distribution registries (`docker-registry`).

mod common;

use std::time::Duration;

use br2k_core::artifact::{OCI_INDEX, OCI_MANIFEST};
use br2k_core::conformance::sample_image;
use br2k_core::{Error, Image, ImageStore, Repository};
use br2k_oci::{ImageBuilder, MirroredImageStore, OciImageStore, PlatformSpec, RepairStatus};
use common::{Registry, fresh_repo, shared_registries};

#[tokio::test]
#[ignore = "needs stack"]
async fn round_trip_on_each_shared_registry() {
    let (addrs, _own) = shared_registries();
    for addr in &addrs {
        let store = OciImageStore::insecure(addr).unwrap();
        store.ping().await.unwrap();
        let repo = fresh_repo("rt");
        let img = sample_image(rand::random(), 3, 64 * 1024);
        assert!(!store.has(&repo, &img.digest).await.unwrap());
        assert_eq!(
            store.pull(&repo, &img.digest).await.unwrap_err().kind(),
            br2k_core::ErrorKind::NotFound
        );
        let d = store.push(&repo, &img, Some("v1")).await.unwrap();
        assert_eq!(d, img.digest);
        assert!(store.has(&repo, &img.digest).await.unwrap());
        assert_eq!(store.resolve(&repo, "v1").await.unwrap(), img.digest);
        let pulled = store.pull(&repo, &img.digest).await.unwrap();
        assert_eq!(pulled, img);
        store.verify(&repo, &img.digest).await.unwrap();
        // Idempotent push: blobs are skipped (HEAD), only the manifests are re-put.
        let before = store.request_counts();
        store.push(&repo, &img, None).await.unwrap();
        let delta = store.request_counts().since(&before);
        assert_eq!((delta.post, delta.put, delta.head), (0, 1, 4), "{delta:?}");
        assert_eq!(
            store.resolve(&repo, "nope").await.unwrap_err().kind(),
            br2k_core::ErrorKind::NotFound
        );
    }
}

#[tokio::test]
#[ignore = "needs stack"]
async fn snapshot_artifacts_and_built_images() {
    let (addrs, _own) = shared_registries();
    let store = OciImageStore::insecure(&addrs[0]).unwrap();
    let repo = fresh_repo("artifact");
    let snap = Image::snapshot(b"state at block 42".to_vec());
    store.push(&repo, &snap, Some("snap-42")).await.unwrap();
    let back = store.pull(&repo, &snap.digest).await.unwrap();
    assert_eq!(
        back.manifest.artifact_type.as_deref(),
        Some(br2k_core::artifact::SNAPSHOT_ARTIFACT)
    );
    assert_eq!(&back.layers[0].data[..], b"state at block 42");

    let img = ImageBuilder::new()
        .file("/app/svc", vec![7u8; 10_000], 0o755)
        .unwrap()
        .entrypoint(["/app/svc"])
        .build()
        .unwrap();
    store.push(&repo, &img, Some("built")).await.unwrap();
    assert_eq!(store.pull(&repo, &img.digest).await.unwrap(), img);
}

/// What a registry serves as a built image's config: the manifest read over plain
/// HTTP names a config blob whose bytes give a numeric non-root user (so pods with
/// `runAsNonRoot: true` start it).
#[tokio::test]
#[ignore = "needs stack"]
async fn built_images_run_as_a_numeric_non_root_user_in_the_registry() {
    let (addrs, _own) = shared_registries();
    let store = OciImageStore::insecure(&addrs[0]).unwrap();
    let repo = fresh_repo("nonroot");
    let img = ImageBuilder::new()
        .file("/app/svc", vec![9u8; 1000], 0o755)
        .unwrap()
        .entrypoint(["/app/svc"])
        .build()
        .unwrap();
    store.push(&repo, &img, Some("nonroot")).await.unwrap();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let base = format!("http://{}/v2/{}", addrs[0], repo.as_str());
    let manifest: serde_json::Value = http
        .get(format!("{base}/manifests/nonroot"))
        .header("Accept", OCI_MANIFEST)
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    let config_digest = manifest["config"]["digest"].as_str().unwrap().to_owned();
    assert_eq!(config_digest, img.config.digest.to_string());
    let bytes = http
        .get(format!("{base}/blobs/{config_digest}"))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let config: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let user = config["config"]["User"].as_str().unwrap_or_default();
    let (uid, gid) = user.split_once(':').unwrap_or((user, ""));
    let uid: u32 = uid.parse().unwrap_or_else(|_| panic!("user {user:?}"));
    assert!(uid != 0, "user {user:?} is root");
    assert!(gid.parse::<u32>().is_ok(), "group of {user:?}");
    assert_eq!(user, "65532:65532");
}

fn index_of(entries: &[(&Image, &str)]) -> bytes::Bytes {
    let manifests: Vec<serde_json::Value> = entries
        .iter()
        .map(|(img, arch)| {
            serde_json::json!({
                "mediaType": OCI_MANIFEST,
                "digest": img.digest.to_string(),
                "size": img.manifest_bytes.len(),
                "platform": {"os": "linux", "architecture": arch},
            })
        })
        .collect();
    serde_json::to_vec(
        &serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}),
    )
    .unwrap()
    .into()
}

#[tokio::test]
#[ignore = "needs stack"]
async fn multi_platform_index_resolve_pull_and_copy() {
    let a = Registry::spawn();
    let b = Registry::spawn();
    let (sa, sb) = (a.store(), b.store());
    let repo = fresh_repo("index");
    let amd = sample_image(1, 2, 10_000);
    let arm = sample_image(2, 2, 10_000);
    sa.push(&repo, &amd, None).await.unwrap();
    sa.push(&repo, &arm, None).await.unwrap();
    let idx = sa
        .push_index(
            &repo,
            index_of(&[(&arm, "arm64"), (&amd, "amd64")]),
            Some("multi"),
        )
        .await
        .unwrap();
    assert_eq!(sa.resolve_raw(&repo, "multi").await.unwrap(), idx);
    assert_eq!(sa.resolve(&repo, "multi").await.unwrap(), amd.digest);
    assert_eq!(sa.pull(&repo, &idx).await.unwrap(), amd);
    let arm_store = a.store_with(|c| c.with_platform(PlatformSpec::parse("linux/arm64").unwrap()));
    assert_eq!(arm_store.pull(&repo, &idx).await.unwrap(), arm);
    let s390 = a.store_with(|c| c.with_platform(PlatformSpec::parse("linux/s390x").unwrap()));
    assert_eq!(
        s390.pull(&repo, &idx).await.unwrap_err().kind(),
        br2k_core::ErrorKind::NotFound
    );

    let report = sa.copy_image(&repo, &idx, &sb).await.unwrap();
    assert_eq!(report.blobs_copied, 6, "{report:?}");
    assert!(report.manifest_written);
    assert!(sb.has(&repo, &idx).await.unwrap());
    assert_eq!(sb.pull(&repo, &idx).await.unwrap(), amd);
    sb.verify(&repo, &idx).await.unwrap();
    let again = sa.copy_image(&repo, &idx, &sb).await.unwrap();
    assert_eq!((again.blobs_copied, again.manifest_written), (0, false));

    // Same registry, other repository: blobs are mounted, not re-sent.
    let other = fresh_repo("mounted");
    let before = sa.request_counts();
    let r = sa
        .copy_image_to(&repo, &amd.digest, &sa, &other)
        .await
        .unwrap();
    let delta = sa.request_counts().since(&before);
    assert_eq!(r.blobs_copied, 3);
    assert_eq!(
        r.bytes_copied,
        amd.manifest_bytes.len() as u64,
        "mount sends no blob bytes"
    );
    assert_eq!(delta.patch, 0);
    assert_eq!(sa.pull(&other, &amd.digest).await.unwrap(), amd);
}

#[tokio::test]
#[ignore = "needs stack"]
async fn tampered_blob_fails_over_to_mirror_and_repair_reports() {
    let mut primary = Registry::spawn();
    let mirror = Registry::spawn();
    let store = MirroredImageStore::new(primary.store(), vec![mirror.store()]);
    let repo = fresh_repo("tamper");
    let img = sample_image(rand::random(), 3, 50_000);
    store.push(&repo, &img, Some("v1")).await.unwrap();

    // Overwrite a layer's bytes on the primary's disk (same size).
    let victim = img.layers[1].digest;
    std::fs::write(primary.blob_data(&victim), vec![0u8; 50_000]).unwrap();

    let err = primary.store().pull(&repo, &img.digest).await.unwrap_err();
    assert!(matches!(err, Error::Tampered { .. }), "{err}");
    assert_eq!(
        primary
            .store()
            .verify(&repo, &img.digest)
            .await
            .unwrap_err()
            .kind(),
        br2k_core::ErrorKind::Tampered
    );

    let (pulled, report) = store.pull_detailed(&repo, &img.digest).await.unwrap();
    assert_eq!(pulled, img);
    assert_eq!(report.served_by, mirror.addr);
    assert_eq!(report.skipped.len(), 1);
    assert_eq!(report.skipped[0].registry, primary.addr);
    assert_eq!(report.skipped[0].kind, br2k_core::ErrorKind::Tampered);

    let rep = store.repair(&repo, &img.digest).await.unwrap();
    eprintln!(
        "repair of a blob tampered on disk: {:?}",
        rep.registries[0].1
    );
    assert_eq!(rep.source, mirror.addr);
    assert_eq!(rep.registries[1].1, RepairStatus::Healthy);
    // Distribution keeps a blob's data file once written (content-addressed; only
    // garbage collection removes it), so a blob corrupted on disk cannot be replaced
    // over the API: repair must say so rather than claim success.
    match &rep.registries[0].1 {
        RepairStatus::Repaired { .. } => primary.store().verify(&repo, &img.digest).await.unwrap(),
        RepairStatus::Failed { was, reason } => {
            assert!(was.starts_with("tampered"), "{was}");
            assert!(reason.contains("tampered"), "{reason}");
            assert_eq!(
                primary
                    .store()
                    .verify(&repo, &img.digest)
                    .await
                    .unwrap_err()
                    .kind(),
                br2k_core::ErrorKind::Tampered
            );
        }
        RepairStatus::Healthy => panic!("tampered primary reported healthy"),
    }
    // Reads keep working through the mirror.
    assert_eq!(store.pull(&repo, &img.digest).await.unwrap(), img);

    // Operator procedure: delete the damaged image, garbage-collect offline, repair.
    primary
        .store()
        .delete_manifest(&repo, &img.digest)
        .await
        .unwrap();
    primary.stop();
    primary.garbage_collect();
    assert!(
        !primary.blob_data(&victim).exists(),
        "GC removed the corrupted data"
    );
    primary.start();
    let rep = store.repair(&repo, &img.digest).await.unwrap();
    assert!(
        matches!(rep.registries[0].1, RepairStatus::Repaired { .. }),
        "{rep:?}"
    );
    primary.store().verify(&repo, &img.digest).await.unwrap();
    assert_eq!(primary.store().pull(&repo, &img.digest).await.unwrap(), img);
}

#[tokio::test]
#[ignore = "needs stack"]
async fn repair_recopies_lost_blobs_and_manifests() {
    let primary = Registry::spawn();
    let mirror = Registry::spawn();
    let store = MirroredImageStore::new(primary.store(), vec![mirror.store()]);
    let repo = fresh_repo("lost");
    let img = sample_image(rand::random(), 3, 50_000);
    store.push(&repo, &img, None).await.unwrap();
    // The primary loses a layer's data.
    std::fs::remove_file(primary.blob_data(&img.layers[0].digest)).unwrap();
    assert_eq!(
        primary
            .store()
            .verify(&repo, &img.digest)
            .await
            .unwrap_err()
            .kind(),
        br2k_core::ErrorKind::NotFound
    );
    let rep = store.repair(&repo, &img.digest).await.unwrap();
    assert!(rep.all_healthy(), "{rep:?}");
    match &rep.registries[0].1 {
        RepairStatus::Repaired { copy, .. } => {
            assert_eq!(copy.blobs_copied, 1, "{copy:?}");
            assert_eq!(copy.blobs_skipped, 3);
        }
        other => panic!("primary not repaired: {other:?}"),
    }
    primary.store().verify(&repo, &img.digest).await.unwrap();
    assert_eq!(primary.store().pull(&repo, &img.digest).await.unwrap(), img);

    // A mirror that lost the whole repository gets everything back.
    let repo2 = fresh_repo("lost2");
    primary.store().push(&repo2, &img, None).await.unwrap();
    let rep = store.repair(&repo2, &img.digest).await.unwrap();
    assert!(
        matches!(rep.registries[1].1, RepairStatus::Repaired { .. }),
        "{rep:?}"
    );
    mirror.store().verify(&repo2, &img.digest).await.unwrap();
}

#[tokio::test]
#[ignore = "needs stack"]
async fn failover_when_primary_down_and_unavailable_when_all_down() {
    let mut primary = Registry::spawn();
    let mut mirror = Registry::spawn();
    let fast = |c: br2k_oci::OciConfig| c.with_connect_timeout(Duration::from_secs(1));
    let store = MirroredImageStore::new(primary.store_with(fast), vec![mirror.store_with(fast)])
        .with_quorum(1);
    let repo = fresh_repo("failover");
    let img = sample_image(rand::random(), 2, 20_000);
    store.push(&repo, &img, Some("v1")).await.unwrap();

    primary.stop();
    let (pulled, report) = store.pull_detailed(&repo, &img.digest).await.unwrap();
    assert_eq!(pulled, img);
    assert_eq!(report.served_by, mirror.addr);
    assert_eq!(report.skipped[0].kind, br2k_core::ErrorKind::Unavailable);
    assert_eq!(store.resolve(&repo, "v1").await.unwrap(), img.digest);
    // Quorum 1: a push still succeeds with the primary down.
    let img2 = sample_image(rand::random(), 1, 1000);
    store.push(&repo, &img2, None).await.unwrap();
    let all = MirroredImageStore::new(primary.store_with(fast), vec![mirror.store_with(fast)]);
    assert_eq!(
        all.push(&repo, &img2, None).await.unwrap_err().kind(),
        br2k_core::ErrorKind::Unavailable
    );

    mirror.stop();
    let err = store.pull(&repo, &img.digest).await.unwrap_err();
    assert_eq!(err.kind(), br2k_core::ErrorKind::Unavailable, "{err}");
    assert!(err.is_retryable());
    assert_eq!(
        store.ping().await.unwrap_err().kind(),
        br2k_core::ErrorKind::Unavailable
    );

    primary.start();
    assert_eq!(store.pull(&repo, &img.digest).await.unwrap(), img);
    // The mirror came back without img2? The primary missed it: sync repairs that.
    mirror.start();
    let rep = store.repair(&repo, &img2.digest).await.unwrap();
    assert!(
        matches!(rep.registries[0].1, RepairStatus::Repaired { .. }),
        "{rep:?}"
    );
}

#[tokio::test]
#[ignore = "needs stack"]
async fn interrupted_copy_resumes_without_resending_finished_blobs() {
    let a = Registry::spawn();
    let b = Registry::spawn();
    let src = a.store();
    let dst = b.store_with(|c| c.with_concurrency(1));
    let src1 = a.store_with(|c| c.with_concurrency(1));
    let repo = fresh_repo("resume");
    let layers = 8;
    let img = sample_image(rand::random(), layers, 4 << 20);
    src.push(&repo, &img, None).await.unwrap();

    let (s, d, r) = (src1.clone(), dst.clone(), repo.clone());
    let digest = img.digest;
    let task = tokio::spawn(async move { s.copy_image(&r, &digest, &d).await });
    // Abort once at least 3 blob uploads have finished: with one upload at a time,
    // the 4th PUT ?digest= starting means the 3rd has been answered.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while dst.request_counts().put < 4 {
        assert!(
            std::time::Instant::now() < deadline,
            "copy made no progress"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    task.abort();
    let _ = task.await;
    // Let the registry settle an upload that was in flight when the task died.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !dst.has(&repo, &img.digest).await.unwrap(),
        "manifest must be written last"
    );
    let mut present = 0u64;
    for l in std::iter::once(&img.config).chain(&img.layers) {
        if b.blob_data(&l.digest).exists() {
            present += 1;
        }
    }
    assert!(
        present >= 3 && present < layers as u64 + 1,
        "present {present}"
    );

    let before = dst.request_counts();
    let report = src1.copy_image(&repo, &img.digest, &dst).await.unwrap();
    let delta = dst.request_counts().since(&before);
    assert_eq!(report.blobs_skipped, present, "{report:?}");
    assert_eq!(report.blobs_copied, layers as u64 + 1 - present);
    // One PUT per missing blob plus the manifest; nothing re-sent.
    assert_eq!(delta.put, report.blobs_copied + 1, "{delta:?}");
    assert_eq!(delta.post, report.blobs_copied);
    assert_eq!(dst.pull(&repo, &img.digest).await.unwrap(), img);

    // Re-mirroring the unchanged image only HEADs the target: counted by the store
    // and by the target registry's own access log (which also sees any request
    // oci-client would make on its own, such as `GET /v2/`).
    let before = dst.request_counts();
    let served_before = b.served_since(0, 0).len();
    let served_a_before = a.served_since(0, 0).len();
    let report = src1.copy_image(&repo, &img.digest, &dst).await.unwrap();
    let delta = dst.request_counts().since(&before);
    assert_eq!(delta.non_head(), 0, "{delta:?}");
    assert_eq!(delta.head, layers as u64 + 2);
    assert_eq!((report.blobs_copied, report.manifest_written), (0, false));
    let served = b.served_since(served_before, layers + 2);
    assert_eq!(served.len(), layers + 2, "{served:?}");
    assert!(served.iter().all(|(m, _)| m == "HEAD"), "{served:?}");
    let manifest_path = format!("/v2/{repo}/manifests/{}", img.digest);
    assert!(
        served.iter().any(|(_, p)| *p == manifest_path),
        "{served:?}"
    );
    // And the source registry served the manifest once, the only request there.
    let served_a = a.served_since(served_a_before, 1);
    assert_eq!(
        served_a,
        [("GET".to_owned(), manifest_path)],
        "{served_a:?}"
    );
    // Nothing in this test pinged `b`, and no request of the copies, HEADs and pulls
    // above made oci-client ask `/v2/` for credentials of this open registry.
    let all = b.served();
    assert!(all.len() > 2 * layers, "{all:?}");
    assert!(!all.iter().any(|(_, p)| p == "/v2/"), "{all:?}");
}

#[tokio::test]
#[ignore = "needs stack"]
async fn layouts_push_from_dir_and_tarball() {
    let a = Registry::spawn();
    let store = a.store();
    let repo = fresh_repo("layout");
    let img = sample_image(rand::random(), 2, 30_000);
    let dir = tempfile::tempdir().unwrap();
    br2k_oci::write_layout(&img, dir.path(), Some("l1")).unwrap();
    let d = store.push_layout(dir.path(), &repo, None).await.unwrap();
    assert_eq!(d, img.digest);
    assert_eq!(store.resolve(&repo, "l1").await.unwrap(), img.digest);
    assert_eq!(store.pull(&repo, &d).await.unwrap(), img);

    // As a tarball, into another repository.
    let tarball = tempfile::NamedTempFile::new().unwrap();
    {
        let mut ar = tar::Builder::new(std::fs::File::create(tarball.path()).unwrap());
        ar.append_dir_all(".", dir.path()).unwrap();
        ar.finish().unwrap();
    }
    let repo2 = fresh_repo("layout-tar");
    assert_eq!(
        store
            .push_layout(tarball.path(), &repo2, Some("t"))
            .await
            .unwrap(),
        img.digest
    );
    assert_eq!(store.resolve(&repo2, "t").await.unwrap(), img.digest);

    // A corrupted layout blob is refused.
    std::fs::write(
        dir.path()
            .join("blobs/sha256")
            .join(img.layers[0].digest.hex()),
        vec![1u8; 30_000],
    )
    .unwrap();
    let repo3 = fresh_repo("layout-bad");
    let err = store
        .push_layout(dir.path(), &repo3, None)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), br2k_core::ErrorKind::Tampered, "{err}");
    assert!(!store.has(&repo3, &img.digest).await.unwrap());
    assert_eq!(
        store
            .push_layout("/nonexistent/layout", &repo3, None)
            .await
            .unwrap_err()
            .kind(),
        br2k_core::ErrorKind::NotFound
    );
}

#[tokio::test]
#[ignore = "needs stack"]
async fn skopeo_made_layout_pushes_identically() {
    if std::process::Command::new("skopeo")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("skopeo missing: apt-get install -y skopeo");
    }
    let a = Registry::spawn();
    let b = Registry::spawn();
    let repo = fresh_repo("skopeo");
    let img = sample_image(rand::random(), 2, 10_000);
    a.store().push(&repo, &img, Some("v1")).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("skopeo")
        .args(["copy", "--preserve-digests", "--src-tls-verify=false"])
        .arg(format!("docker://{}/{repo}@{}", a.addr, img.digest))
        .arg(format!("oci:{}:v1", dir.path().display()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = b
        .store()
        .push_layout(dir.path(), &repo, None)
        .await
        .unwrap();
    assert_eq!(d, img.digest);
    assert_eq!(b.store().resolve(&repo, "v1").await.unwrap(), img.digest);
    assert_eq!(b.store().pull(&repo, &d).await.unwrap(), img);
}

#[tokio::test]
#[ignore = "needs stack"]
async fn bad_references_are_invalid_input() {
    let a = Registry::spawn();
    let store = a.store();
    let repo = Repository::new("br2k-test/bad").unwrap();
    for tag in ["bad tag", "", "-x", "a:b", &"x".repeat(129)] {
        assert_eq!(
            store.resolve(&repo, tag).await.unwrap_err().kind(),
            br2k_core::ErrorKind::InvalidInput,
            "{tag:?}"
        );
    }
    assert_eq!(
        store
            .fetch_manifest(&repo, "sha256:zz")
            .await
            .unwrap_err()
            .kind(),
        br2k_core::ErrorKind::InvalidInput
    );
    let img = sample_image(3, 1, 10);
    assert_eq!(
        store
            .push(&repo, &img, Some("no spaces"))
            .await
            .unwrap_err()
            .kind(),
        br2k_core::ErrorKind::InvalidInput
    );
    let mut bad = img.clone();
    bad.layers[0].data = bytes::Bytes::from_static(b"0123456789");
    assert_eq!(
        store.push(&repo, &bad, None).await.unwrap_err().kind(),
        br2k_core::ErrorKind::Tampered
    );
}

#[tokio::test]
#[ignore = "needs stack"]
async fn basic_auth_from_a_secret_file() {
    // bcrypt of the throwaway test password "br2k-test-pw".
    let a = Registry::spawn_with_htpasswd(
        "tester:$2b$04$u57d/ss.a7Ac06yOoKr2Ge29hUs.bdL4NHQQVYb7pF6lT/jO6nE3.\n",
    );
    let anonymous = a.store();
    assert_eq!(
        anonymous.ping().await.unwrap_err().kind(),
        br2k_core::ErrorKind::PermissionDenied
    );
    let wrong = a.store_with(|c| {
        c.with_auth(br2k_oci::Auth::Basic {
            username: "tester".into(),
            password: br2k_oci::Secret::new("wrong"),
        })
    });
    assert_eq!(
        wrong.ping().await.unwrap_err().kind(),
        br2k_core::ErrorKind::PermissionDenied
    );

    let secret_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret_file.path(), "br2k-test-pw\n").unwrap();
    let password = br2k_oci::Secret::from_file(secret_file.path()).unwrap();
    let store = a.store_with(|c| {
        c.with_auth(br2k_oci::Auth::Basic {
            username: "tester".into(),
            password,
        })
    });
    assert!(
        !format!("{store:?}").contains("br2k-test-pw"),
        "Debug must redact"
    );
    store.ping().await.unwrap();
    let repo = fresh_repo("auth");
    let img = sample_image(rand::random(), 2, 1000);
    store.push(&repo, &img, Some("v1")).await.unwrap();
    assert_eq!(store.pull(&repo, &img.digest).await.unwrap(), img);
    assert_eq!(
        anonymous.pull(&repo, &img.digest).await.unwrap_err().kind(),
        br2k_core::ErrorKind::PermissionDenied
    );
}
