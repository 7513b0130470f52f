//! Times `br2k deploy` (the CLI binary as its own process) on the local stack: an
//! already built ~50 MB image, 3 replicas, from the command to every replica Ready on
//! the recorded digest, with each phase's share (build lookup, push and mirror, chain,
//! apply, roll-out); then a re-deploy with nothing changed and `deploy --dry-run`.
//!
//! Usage: `cli_deploy [RUNS] [--mib N] [--output json]` (3 runs, 50 MiB by default).
//! Needs the stack's environment (`source .stack/env`) and the `br2k` and
//! `br2k-operator` binaries beside this one (or `BR2K_BIN`, `BR2K_OPERATOR_BIN`):
//! `cargo build --release -p br2k-cli -p br2k-operator -p br2k-benches --bin cli_deploy`.
//! Each run deploys a new service (a new repository: every blob is pushed and
//! mirrored) into two Distribution registries of the bench's own; the operator runs
//! as its own process.

#[path = "../../../br2k-cli/tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::time::Instant;

use serde_json::{Value, json};
use support::{Br2k, OciRegistry, Operator, Stack};

fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn main() {
    let mut runs = 3usize;
    let mut mib = 50usize;
    let mut json_out = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--output" => json_out = args.next().as_deref() == Some("json"),
            "--mib" => mib = args.next().and_then(|v| v.parse().ok()).expect("--mib N"),
            n => {
                runs = n
                    .parse()
                    .expect("usage: cli_deploy [RUNS] [--mib N] [--output json]")
            }
        }
    }
    let stack = Stack::from_env();
    let run = support::unique();
    let tmp = std::env::temp_dir().join(format!("br2k-cli-bench-{run}"));
    std::fs::create_dir_all(&tmp).expect("tmp");
    let dir = tmp.as_path();
    let ns = format!("br2k-cli-bench-{run}");
    let primary = OciRegistry::spawn(&stack.registry_bin, dir, "primary");
    let mirror = OciRegistry::spawn(&stack.registry_bin, dir, "mirror");
    let deploy_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    support::prepare_cluster(&stack, &deploy_dir, &ns);
    let cli = Br2k::new(dir).with_env("BR2K_BENCH_KEY", support::KEY7);
    support::context(
        &cli,
        dir,
        &stack.rpc,
        &[&primary.addr, &mirror.addr],
        &ns,
        "BR2K_BENCH_KEY",
    );
    // The operator's trust anchors are the context's: the contract comes first.
    let (mut operator, _) =
        Operator::start_for_context(&stack, dir, &run, &cli, &[&primary.addr, &mirror.addr]);
    let proj = dir.join("proj");
    cli.run(dir, &["init", "proj", "--service", "bench"]).ok();
    std::fs::write(
        proj.join("app/payload.bin"),
        noise(u64::from_str_radix(&run, 16).unwrap_or(7), mib << 20),
    )
    .expect("payload");
    let template = std::fs::read_to_string(proj.join("br2k.toml")).expect("toml");

    let mut rows = Vec::new();
    let mut services = Vec::new();
    for i in 0..runs {
        let service = format!("bench-{run}-{i}");
        std::fs::write(
            proj.join("br2k.toml"),
            template.replace("service = \"bench\"", &format!("service = \"{service}\"")),
        )
        .expect("toml");
        // The image is built before the clock starts ("an already built image").
        let b = cli.run(&proj, &["image", "build", "-o", "json"]).json();
        let t = Instant::now();
        let d = cli
            .run(&proj, &["deploy", "-o", "json", "--timeout", "300"])
            .json();
        let wall = t.elapsed().as_millis() as u64;
        assert_eq!(d["ready_replicas"], 3, "{d}");
        assert_eq!(d["digest"], b["digest"]);
        let t = Instant::now();
        let again = cli.run(&proj, &["deploy", "-o", "json"]).json();
        let redeploy = t.elapsed().as_millis() as u64;
        assert_eq!(
            again["wrote"], false,
            "a re-deploy with nothing changed wrote: {again}"
        );
        let t = Instant::now();
        let plan = cli
            .run(&proj, &["deploy", "--dry-run", "-o", "json"])
            .json();
        let dry = t.elapsed().as_millis() as u64;
        assert_eq!(plan["changes"], false, "{plan}");
        let p = &d["phases"];
        let get = |k: &str| p[k].as_u64().unwrap_or(0);
        rows.push(json!({
            "run": i,
            "image_bytes": b["bytes"],
            "wall_ms": wall,
            "total_ms": get("total_ms"),
            "build_ms": get("build_ms"),
            "push_ms": get("push_ms"),
            "chain_ms": get("chain_ms"),
            "apply_ms": get("apply_ms"),
            "wait_ms": get("wait_ms"),
            "blobs_pushed": d["blobs_pushed"],
            "redeploy_ms": redeploy,
            "dry_run_ms": dry,
        }));
        services.push(service);
    }
    for s in &services {
        let _ = cli.run(dir, &["stop", s]);
    }
    operator.terminate();
    for s in &services {
        support::cleanup(&stack, &ns, s);
    }
    drop((primary, mirror));
    let _ = std::fs::remove_dir_all(&tmp);

    let col = |k: &str| {
        rows.iter()
            .map(|r: &Value| r[k].as_u64().unwrap_or(0))
            .collect::<Vec<_>>()
    };
    let total = median(col("wall_ms"));
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"runs": rows, "median_wall_ms": total}))
                .expect("json")
        );
        return;
    }
    println!(
        "{:<4} {:>10} {:>8} {:>9} {:>13} {:>11} {:>10} {:>12} {:>11} {:>9}",
        "run",
        "image MiB",
        "wall ms",
        "build ms",
        "push+mirror",
        "chain ms",
        "apply ms",
        "roll-out ms",
        "redeploy",
        "dry-run"
    );
    for r in &rows {
        let g = |k: &str| r[k].as_u64().unwrap_or(0);
        let share = |k: &str| {
            format!(
                "{} ({:.0}%)",
                g(k),
                100.0 * g(k) as f64 / g("total_ms").max(1) as f64
            )
        };
        println!(
            "{:<4} {:>10.1} {:>8} {:>9} {:>13} {:>11} {:>10} {:>12} {:>11} {:>9}",
            g("run"),
            g("image_bytes") as f64 / 1048576.0,
            g("wall_ms"),
            share("build_ms"),
            share("push_ms"),
            share("chain_ms"),
            share("apply_ms"),
            share("wait_ms"),
            g("redeploy_ms"),
            g("dry_run_ms"),
        );
    }
    println!(
        "median: deploy {} ms, re-deploy {} ms, dry-run {} ms",
        total,
        median(col("redeploy_ms")),
        median(col("dry_run_ms"))
    );
}
