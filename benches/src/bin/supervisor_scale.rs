//! Supervisor at scale on the in-memory backends: for 1,000 and 10,000 services,
//! time to deploy all, time to converge all after a mass failure (every workload
//! deleted), time per event, single-failure latency, steady-state reconcile cost
//! and peak RSS.
//!
//! `cargo run --release -p br2k-benches --bin supervisor_scale [-- --runs R]` runs
//! each size R times (default 3), each in a fresh child process so that peak RSS is
//! per size, and prints medians. `-- --services N` runs one size once.

use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use br2k_benches::supervisor::{Fleet, median, peak_rss_kib};
use br2k_core::{Replicator, Result};
use rand::Rng;

const SIZES: [usize; 2] = [1_000, 10_000];
const TIMEOUT: Duration = Duration::from_secs(300);

/// Resync period: `BR2K_BENCH_RESYNC_MS` or 1 s.
fn resync() -> Duration {
    std::env::var("BR2K_BENCH_RESYNC_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(1), Duration::from_millis)
}

/// Figures of one run.
#[derive(Debug, Clone, Copy)]
struct Figures {
    services: usize,
    deploy: Duration,
    converge: Duration,
    reconciles: u64,
    latency: Duration,
    steady: Duration,
    rss_kib: u64,
}

async fn measure(n: usize) -> Result<Figures> {
    let fleet = Fleet::start(n, resync(), TIMEOUT).await?;

    // Mass failure: every workload deleted at once.
    let before = fleet.supervisor.metrics().reconciles;
    let start = Instant::now();
    for id in &fleet.ids {
        fleet.replicator.delete_workload(id)?;
    }
    fleet.wait_all_live(TIMEOUT).await?;
    let converge = start.elapsed();
    let reconciles = fleet.supervisor.metrics().reconciles - before;

    // One failure at a time among n healthy services.
    let mut rng = rand::rng();
    let mut latencies = Vec::new();
    for _ in 0..30 {
        let id = &fleet.ids[rng.random_range(0..n)];
        latencies.push(fleet.break_and_recover(id, TIMEOUT).await?);
    }

    // Steady state: one reconcile of a healthy service (what every event costs when
    // nothing is wrong).
    let mut steady = Vec::new();
    for _ in 0..1000 {
        let id = &fleet.ids[rng.random_range(0..n)];
        let t = Instant::now();
        fleet.supervisor.reconcile(id).await?;
        steady.push(t.elapsed());
    }
    assert_eq!(fleet.replicator.managed().await?.len(), n);

    Ok(Figures {
        services: n,
        deploy: fleet.deploy_time,
        converge,
        reconciles,
        latency: median(&mut latencies),
        steady: median(&mut steady),
        rss_kib: peak_rss_kib().unwrap_or(0),
    })
}

fn child(n: usize) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(measure(n)) {
        Ok(f) => {
            println!(
                "RESULT {} {} {} {} {} {} {}",
                f.services,
                f.deploy.as_nanos(),
                f.converge.as_nanos(),
                f.reconciles,
                f.latency.as_nanos(),
                f.steady.as_nanos(),
                f.rss_kib
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{n} services: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse(line: &str) -> Option<Figures> {
    let v: Vec<u128> = line
        .strip_prefix("RESULT ")?
        .split_whitespace()
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let d = |x: u128| Duration::from_nanos(u64::try_from(x).unwrap_or(u64::MAX));
    Some(Figures {
        services: usize::try_from(*v.first()?).ok()?,
        deploy: d(*v.get(1)?),
        converge: d(*v.get(2)?),
        reconciles: u64::try_from(*v.get(3)?).ok()?,
        latency: d(*v.get(4)?),
        steady: d(*v.get(5)?),
        rss_kib: u64::try_from(*v.get(6)?).ok()?,
    })
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

fn us(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut runs = 3usize;
    let mut only = None;
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).and_then(|v| v.parse::<usize>().ok());
        match (args[i].as_str(), value) {
            ("--services", Some(n)) if n > 0 => only = Some(n),
            ("--runs", Some(r)) if r > 0 => runs = r,
            _ => {
                eprintln!("usage: supervisor_scale [--runs R] [--services N]");
                return ExitCode::from(2);
            }
        }
        i += 2;
    }
    if let Some(n) = only {
        return child(n);
    }
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("current_exe: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "| services | runs | deploy all (ms) | converge after mass failure (ms) | reconciles | time per event (µs) | single failure → recovered (µs) | healthy reconcile (µs) | peak RSS (MiB) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for n in SIZES {
        let mut all = Vec::new();
        for r in 0..runs {
            eprintln!("{n} services, run {}/{runs}", r + 1);
            let out = match Command::new(&exe)
                .args(["--services", &n.to_string()])
                .output()
            {
                Ok(o) => o,
                Err(e) => {
                    eprintln!("spawn: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let text = String::from_utf8_lossy(&out.stdout);
            match text.lines().find_map(parse) {
                Some(f) if out.status.success() => all.push(f),
                _ => {
                    eprintln!(
                        "run failed: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    );
                    return ExitCode::FAILURE;
                }
            }
        }
        let med = |f: fn(&Figures) -> Duration| median(&mut all.iter().map(f).collect::<Vec<_>>());
        let converge = med(|f| f.converge);
        let mut reconciles: Vec<u64> = all.iter().map(|f| f.reconciles).collect();
        reconciles.sort_unstable();
        let mut rss: Vec<u64> = all.iter().map(|f| f.rss_kib).collect();
        rss.sort_unstable();
        println!(
            "| {n} | {runs} | {} | {} | {} | {} | {} | {} | {:.1} |",
            ms(med(|f| f.deploy)),
            ms(converge),
            reconciles[reconciles.len() / 2],
            us(converge / u32::try_from(n).unwrap_or(u32::MAX)),
            us(med(|f| f.latency)),
            us(med(|f| f.steady)),
            rss[rss.len() / 2] as f64 / 1024.0,
        );
    }
    ExitCode::SUCCESS
}
