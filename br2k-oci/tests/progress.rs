//! Blob progress events ([`br2k_oci::OciConfig::with_progress`]) against real
//! registries: a push reports each blob started and done (skipped when present), a
//! streamed copy reports the bytes of each blob as they move.

mod common;

use std::sync::{Arc, Mutex};

use br2k_core::ImageStore;
use br2k_core::conformance::sample_image;
use br2k_oci::BlobProgress;
use common::{fresh_repo, shared_registries};

#[tokio::test]
#[ignore = "needs stack"]
async fn push_and_copy_report_each_blob() {
    let (addrs, _own) = shared_registries();
    let (a, b) = (&addrs[0], &addrs[addrs.len() - 1]);
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let progress: Arc<dyn Fn(BlobProgress) + Send + Sync> =
        Arc::new(move |e| sink.lock().unwrap().push(e));
    let with = |addr: &str| {
        br2k_oci::OciImageStore::new(
            br2k_oci::OciConfig::new(addr)
                .unwrap()
                .with_insecure(true)
                .with_progress(progress.clone()),
        )
        .unwrap()
    };
    let (src, dst) = (with(a), with(b));
    let repo = fresh_repo("progress");
    let img = sample_image(rand::random(), 2, 256 * 1024);
    let blobs: Vec<(br2k_core::Digest, u64)> = std::iter::once(&img.config)
        .chain(&img.layers)
        .map(|b| (b.digest, b.data.len() as u64))
        .collect();

    src.push(&repo, &img, None).await.unwrap();
    let pushed = std::mem::take(&mut *events.lock().unwrap());
    for (d, size) in &blobs {
        assert!(
            pushed.contains(&BlobProgress::Started {
                digest: *d,
                size: *size
            }),
            "{pushed:?}"
        );
        assert!(
            pushed.contains(&BlobProgress::Done {
                digest: *d,
                size: *size
            }),
            "{pushed:?}"
        );
    }
    src.push(&repo, &img, None).await.unwrap();
    let again = std::mem::take(&mut *events.lock().unwrap());
    assert_eq!(again.len(), blobs.len(), "{again:?}");
    assert!(
        again
            .iter()
            .all(|e| matches!(e, BlobProgress::Skipped { .. })),
        "{again:?}"
    );

    if a != b {
        src.copy_image(&repo, &img.digest, &dst).await.unwrap();
        let copied = std::mem::take(&mut *events.lock().unwrap());
        for (d, size) in &blobs {
            let bytes: u64 = copied
                .iter()
                .filter_map(|e| match e {
                    BlobProgress::Bytes { digest, bytes } if digest == d => Some(*bytes),
                    _ => None,
                })
                .sum();
            assert_eq!(bytes, *size, "streamed bytes of {d}: {copied:?}");
            assert!(copied.contains(&BlobProgress::Done {
                digest: *d,
                size: *size
            }));
        }
    }
}
