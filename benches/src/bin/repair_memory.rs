//! Peak memory of an image repair, by image size: the supervisor's repair path
//! (`ImageStore::copy_to` through trait objects, as `RepairImage` calls it) between
//! two real OCI registries, against the generic pull-then-push copy, side by side.
//!
//! Each copy runs in a child process of its own, so its peak RSS (`VmHWM`) is the
//! copy's alone (the parent builds and pushes the test images). The copy is checked
//! by a streamed verification of the target's bytes.
//!
//! ```sh
//! scripts/stack up && source .stack/env
//! cargo run --release -p br2k-benches --bin repair_memory -- 16 128 512   # sizes in MiB
//! ```
//! Registries: the first two of `BR2K_OCI_REGISTRIES` (source, target).

use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use br2k_core::{Digest, ImageStore, Repository};
use br2k_oci::ImageBuilder;
use br2k_oci::OciImageStore;
use rand::{RngCore, SeedableRng};

fn registries() -> (String, String) {
    let list = std::env::var("BR2K_OCI_REGISTRIES")
        .expect("BR2K_OCI_REGISTRIES (source .stack/env after scripts/stack up)");
    let mut it = list.split(',').map(str::to_owned);
    match (it.next(), it.next()) {
        (Some(a), Some(b)) => (a, b),
        _ => panic!("BR2K_OCI_REGISTRIES needs two registries"),
    }
}

/// Peak resident set of this process, in KiB.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Child: copies `repo@digest` from `src` to `dst` with `mode` (`streamed`: the
/// store's `copy_to`; `pull`: the generic copy), verifies the target, prints
/// `seconds peak_kib`.
async fn child(mode: &str, src: &str, dst: &str, repo: &str, digest: &str) {
    let repo = Repository::new(repo).expect("repository");
    let digest: Digest = digest.parse().expect("digest");
    let source: Arc<dyn ImageStore> = Arc::new(OciImageStore::insecure(src).expect("source"));
    let target: Arc<dyn ImageStore> = Arc::new(OciImageStore::insecure(dst).expect("target"));
    let t = Instant::now();
    match mode {
        "streamed" => source.copy_to(&repo, &digest, target.as_ref()).await,
        "pull" => {
            br2k_core::store::copy_by_pull(source.as_ref(), &repo, &digest, target.as_ref()).await
        }
        other => panic!("unknown mode {other}"),
    }
    .expect("copy");
    let secs = t.elapsed().as_secs_f64();
    target
        .verify(&repo, &digest)
        .await
        .expect("the target's copy verifies");
    println!("{secs:.3} {}", peak_rss_kib());
}

fn run_child(mode: &str, src: &str, dst: &str, repo: &Repository, digest: &Digest) -> (f64, u64) {
    let exe = std::env::current_exe().expect("current exe");
    let out = Command::new(exe)
        .args([
            "--child",
            mode,
            src,
            dst,
            repo.as_str(),
            &digest.to_string(),
        ])
        .output()
        .expect("spawn child");
    assert!(
        out.status.success(),
        "child failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.split_whitespace();
    let secs = it.next().and_then(|v| v.parse().ok()).expect("seconds");
    let kib = it.next().and_then(|v| v.parse().ok()).expect("peak");
    (secs, kib)
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--child") {
        child(&args[2], &args[3], &args[4], &args[5], &args[6]).await;
        return;
    }
    let sizes: Vec<usize> = if args.len() > 1 {
        args[1..]
            .iter()
            .map(|a| a.parse().expect("size in MiB"))
            .collect()
    } else {
        vec![16, 128, 512]
    };
    let (src, dst) = registries();
    let source = OciImageStore::insecure(&src).expect("source");
    let nonce = std::process::id();
    println!("repair copy {src} -> {dst}, each in its own process; peak RSS = VmHWM");
    println!(
        "{:>9}  {:>16}  {:>10}  {:>16}  {:>10}",
        "image MiB", "streamed peak MiB", "streamed s", "pull+push peak MiB", "pull+push s"
    );
    for size in sizes {
        let mut data = vec![0u8; size << 20];
        rand::rngs::StdRng::seed_from_u64(size as u64).fill_bytes(&mut data);
        let image = ImageBuilder::new()
            .file("data/blob.bin", data, 0o644)
            .expect("file")
            .build()
            .expect("image");
        let digest = image.digest;
        // One repository per mode, so each copy starts with an empty target.
        let repo_s = Repository::new(format!("bench/repair-{nonce}-{size}-s")).unwrap();
        let repo_p = Repository::new(format!("bench/repair-{nonce}-{size}-p")).unwrap();
        source.push(&repo_s, &image, None).await.expect("push");
        source.push(&repo_p, &image, None).await.expect("push");
        drop(image);
        let (ss, sk) = run_child("streamed", &src, &dst, &repo_s, &digest);
        let (ps, pk) = run_child("pull", &src, &dst, &repo_p, &digest);
        println!(
            "{size:>9}  {:>16.1}  {ss:>10.2}  {:>16.1}  {ps:>10.2}",
            sk as f64 / 1024.0,
            pk as f64 / 1024.0
        );
    }
}
