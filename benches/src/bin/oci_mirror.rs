//! Mirrors a 5-layer ~100 MB image between two local Distribution registries with
//! br2k-oci and with `skopeo copy`, then re-mirrors it unchanged and counts requests.
//!
//! Every cold run copies into a freshly started, empty target registry, so neither
//! tool can reuse blobs from an earlier run. Runs alternate which tool goes first.
//!
//! Usage: `cargo run --release -p br2k-benches --bin oci_mirror [-- RUNS [LAYER_MIB [CONCURRENCY]]]`.
//! Needs a Distribution registry binary and `skopeo`. The registry is
//! `BR2K_REGISTRY_BIN` (the stack's upstream Distribution 3 after `source .stack/env`),
//! else Debian's `/usr/bin/docker-registry` (Distribution 2.8).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use br2k_core::artifact::{OCI_CONFIG, OCI_LAYER_GZIP};
use br2k_core::{Blob, Image, ImageStore, Repository};
use br2k_oci::{OciConfig, OciImageStore};
use rand::RngCore;

/// The registry binary the bench runs.
fn registry_bin() -> String {
    std::env::var("BR2K_REGISTRY_BIN").unwrap_or_else(|_| "/usr/bin/docker-registry".into())
}

struct Reg {
    addr: String,
    _dir: tempdir::Dir,
    /// The registry's stdout and stderr: its access log, one line per request.
    log: PathBuf,
    child: Child,
}

mod tempdir {
    /// A directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Reg {
    fn spawn() -> Reg {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let dir =
            std::env::temp_dir().join(format!("br2k-oci-bench-{port}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = dir.join("config.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                dir.join("data").display()
            ),
        )
        .unwrap();
        let bin = registry_bin();
        let log = dir.join("registry.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin)
            .arg("serve")
            .arg(&cfg)
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("spawn docker-registry");
        let start = Instant::now();
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "registry did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Reg {
            addr,
            _dir: tempdir::Dir(PathBuf::from(&dir)),
            log,
            child,
        }
    }

    /// Methods of the requests served so far, from the registry's access log.
    fn served(&self) -> Vec<String> {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let (_, rest) = l.split_once(" \"")?;
                let (req, _) = rest.split_once('"')?;
                let mut it = req.split(' ');
                let (method, _path, proto) = (it.next()?, it.next()?, it.next()?);
                proto.starts_with("HTTP/").then(|| method.to_owned())
            })
            .collect()
    }
}

/// Requests per method in `methods`, in the order of the table below.
fn by_method(methods: &[String]) -> [usize; 6] {
    let mut n = [0; 6];
    for m in methods {
        let i = match m.as_str() {
            "GET" => 0,
            "HEAD" => 1,
            "PUT" => 2,
            "POST" => 3,
            "PATCH" => 4,
            _ => 5,
        };
        n[i] += 1;
    }
    n
}

impl Drop for Reg {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// CPU seconds (user + system) of process `pid` ("self" for this one) and of its
/// reaped children, from `/proc/<pid>/stat` (clock ticks of 10 ms).
fn cpu(pid: &str) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime is field 14 overall.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let tick = 0.01;
    if f.len() < 15 {
        return (0.0, 0.0);
    }
    ((f[11] + f[12]) * tick, (f[13] + f[14]) * tick)
}

/// A copy tool run as a process: `skopeo copy` (Debian's), or a `containers/image`
/// program built with the current Go (`BR2K_BENCH_IMAGECOPY`, see br2k-oci/BENCH.md).
struct External {
    name: &'static str,
    program: String,
    args: Vec<&'static str>,
}

impl External {
    fn run(&self, src: &str, dst: &str) -> Duration {
        let t = Instant::now();
        let out = Command::new(&self.program)
            .args(&self.args)
            .arg(src)
            .arg(dst)
            .output()
            .unwrap_or_else(|e| panic!("run {} ({e})", self.program));
        assert!(
            out.status.success(),
            "{}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        t.elapsed()
    }
}

/// Cold-run results of one tool.
#[derive(Default)]
struct Results {
    secs: Vec<f64>,
    /// CPU seconds per run: (client, source registry, target registry).
    cpu: Vec<(f64, f64, f64)>,
    /// Requests the target registry served in the last cold run, from its access log
    /// (before the verification reads).
    target_log: [usize; 6],
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let runs: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(3);
    let layer_mib: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(20);
    let concurrency: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(6);

    let mut rng = rand::rng();
    let layers: Vec<Blob> = (0..5)
        .map(|_| {
            let mut data = vec![0u8; layer_mib << 20];
            rng.fill_bytes(&mut data);
            Blob::new(OCI_LAYER_GZIP, data)
        })
        .collect();
    let config = Blob::new(
        OCI_CONFIG,
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
            .to_vec(),
    );
    let image = Image::build(config, layers, None);
    let total_mb = image.size() as f64 / 1e6;

    let source = Reg::spawn();
    let src = OciImageStore::new(
        OciConfig::new(&source.addr)
            .unwrap()
            .with_insecure(true)
            .with_concurrency(concurrency),
    )
    .unwrap();
    let repo = Repository::new("bench/app").unwrap();
    src.push(&repo, &image, Some("v1")).await.unwrap();
    let digest = src.resolve(&repo, "v1").await.unwrap();

    let version = Command::new(registry_bin())
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    println!("registries: {version}");
    println!("br2k blob concurrency {concurrency}");
    println!(
        "image: 5 layers x {layer_mib} MiB random + config = {total_mb:.1} MB, digest {digest}"
    );
    println!(
        "{:<5} {:<8} {:>10} {:>10}",
        "run", "tool", "seconds", "MB/s"
    );
    let mut externals = vec![External {
        name: "skopeo",
        program: "skopeo".into(),
        args: vec![
            "copy",
            "--quiet",
            "--preserve-digests",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
        ],
    }];
    if let Ok(program) = std::env::var("BR2K_BENCH_IMAGECOPY") {
        externals.push(External {
            name: "c/image",
            program,
            args: vec![],
        });
    }
    let tools: Vec<&str> = std::iter::once("br2k")
        .chain(externals.iter().map(|x| x.name))
        .collect();
    let mut results: Vec<Results> = tools.iter().map(|_| Results::default()).collect();
    let src_pid = source.child.id().to_string();
    let mut last_target = None;
    for run in 0..runs {
        // Which tool goes first rotates between runs.
        for k in 0..tools.len() {
            let i = (k + run) % tools.len();
            let target = Reg::spawn();
            let dst_pid = target.child.id().to_string();
            let before = (cpu("self"), cpu(&src_pid).0, cpu(&dst_pid).0);
            // br2k's store into the target, kept for the re-mirror below.
            let (secs, ours) = if i == 0 {
                let dst = OciImageStore::new(
                    OciConfig::new(&target.addr)
                        .unwrap()
                        .with_insecure(true)
                        .with_concurrency(concurrency),
                )
                .unwrap();
                let t = Instant::now();
                let report = src.copy_image(&repo, &digest, &dst).await.unwrap();
                let e = t.elapsed().as_secs_f64();
                assert_eq!(report.blobs_copied, 6);
                (e, Some(dst))
            } else {
                let e = externals[i - 1].run(
                    &format!("docker://{}/{repo}@{digest}", source.addr),
                    &format!("docker://{}/{repo}:v1", target.addr),
                );
                (e.as_secs_f64(), None)
            };
            let after = (cpu("self"), cpu(&src_pid).0, cpu(&dst_pid).0);
            // The client is this process for br2k, a waited-for child for the others.
            let client = if i == 0 {
                after.0.0 - before.0.0
            } else {
                after.0.1 - before.0.1
            };
            results[i]
                .cpu
                .push((client, after.1 - before.1, after.2 - before.2));
            std::thread::sleep(Duration::from_millis(100));
            results[i].target_log = by_method(&target.served());
            let is_ours = ours.is_some();
            let dst = ours.unwrap_or_else(|| OciImageStore::insecure(&target.addr).unwrap());
            dst.verify(&repo, &digest).await.unwrap();
            if is_ours {
                last_target = Some((target, dst));
            }
            results[i].secs.push(secs);
            println!(
                "{:<5} {:<8} {:>10.3} {:>10.1}",
                run + 1,
                tools[i],
                secs,
                total_mb / secs
            );
        }
    }
    println!();
    let ours = median(&mut results[0].secs);
    for (i, tool) in tools.iter().enumerate().skip(1) {
        let theirs = median(&mut results[i].secs);
        println!(
            "cold mirror medians over {runs} runs: br2k {ours:.3} s, {tool} {theirs:.3} s, speed-up x{:.2}",
            theirs / ours
        );
    }
    for (tool, r) in tools.iter().zip(&results) {
        let mut client: Vec<f64> = r.cpu.iter().map(|c| c.0).collect();
        let mut a: Vec<f64> = r.cpu.iter().map(|c| c.1).collect();
        let mut b: Vec<f64> = r.cpu.iter().map(|c| c.2).collect();
        println!(
            "CPU seconds per cold run (medians), {tool}: client {:.2}, source registry {:.2}, target registry {:.2}",
            median(&mut client),
            median(&mut a),
            median(&mut b)
        );
    }

    println!(
        "{:<24} {:>5} {:>5} {:>5} {:>5} {:>5} {:>6}",
        "cold run, target log", "GET", "HEAD", "PUT", "POST", "PATCH", "DELETE"
    );
    for (tool, r) in tools.iter().zip(&results) {
        let c = r.target_log;
        println!(
            "{:<24} {:>5} {:>5} {:>5} {:>5} {:>5} {:>6}",
            tool, c[0], c[1], c[2], c[3], c[4], c[5]
        );
    }

    // Lower bounds: reading + hashing everything from A alone, and uploading from
    // memory into an empty registry alone.
    let (mut reads, mut uploads) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let t = Instant::now();
        src.verify(&repo, &digest).await.unwrap();
        reads.push(t.elapsed().as_secs_f64());
        let empty = Reg::spawn();
        let up = OciImageStore::insecure(&empty.addr).unwrap();
        let t = Instant::now();
        up.push(&repo, &image, None).await.unwrap();
        uploads.push(t.elapsed().as_secs_f64());
    }
    println!(
        "phases alone (medians): read+hash from A {:.3} s, upload from memory to empty B {:.3} s",
        median(&mut reads),
        median(&mut uploads)
    );
    drop(image);

    let (target, dst) = last_target.expect("at least one run");
    let (sb, db) = (src.request_counts(), dst.request_counts());
    // The access log line follows the response: let earlier lines land first.
    std::thread::sleep(Duration::from_millis(300));
    let (sl, dl) = (source.served().len(), target.served().len());
    let t = Instant::now();
    let report = src.copy_image(&repo, &digest, &dst).await.unwrap();
    let e = t.elapsed().as_secs_f64();
    let (sd, dd) = (
        src.request_counts().since(&sb),
        dst.request_counts().since(&db),
    );
    std::thread::sleep(Duration::from_millis(300));
    let (s_log, d_log) = (
        by_method(&source.served()[sl..]),
        by_method(&target.served()[dl..]),
    );
    println!();
    println!(
        "re-mirror of the unchanged image: {:.1} ms, blobs copied {}, skipped {}, manifest written {}",
        e * 1e3,
        report.blobs_copied,
        report.blobs_skipped,
        report.manifest_written
    );
    println!(
        "{:<22} {:>5} {:>5} {:>5} {:>5} {:>5} {:>6}",
        "side (counted by)", "GET", "HEAD", "PUT", "POST", "PATCH", "DELETE"
    );
    for (side, c) in [("source (br2k)", sd), ("target (br2k)", dd)] {
        println!(
            "{:<22} {:>5} {:>5} {:>5} {:>5} {:>5} {:>6}",
            side, c.get, c.head, c.put, c.post, c.patch, c.delete
        );
    }
    for (side, c) in [
        ("source (registry log)", s_log),
        ("target (registry log)", d_log),
    ] {
        println!(
            "{:<22} {:>5} {:>5} {:>5} {:>5} {:>5} {:>6}",
            side, c[0], c[1], c[2], c[3], c[4], c[5]
        );
    }
    let target_non_head = d_log[0] + d_log[2] + d_log[3] + d_log[4] + d_log[5];
    assert_eq!(
        target_non_head, 0,
        "re-mirror sent more than HEADs to the target"
    );
}
