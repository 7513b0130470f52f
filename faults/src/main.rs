//! `br2k-faults`: the fault-matrix runner.
//!
//! ```text
//! br2k-faults --runs N --seed S [--classes a,b,...] [--pairs P] [--output json]
//!             [--stack-dir DIR] [--ledger-bin PATH] [--operator-bin PATH | --no-operator]
//!             [--work-dir DIR] [--world-runs K]
//! ```
//! Run `r` (0-based) uses seed `S + r` to pick its fault(s): each class alone in turn,
//! or with probability `P`% (default 25) a random pair across all classes (this crate's
//! and the operator workload's). `--runs 1 --seed X` repeats the run of seed X. Prints
//! the table and one line per failed run; exits 1 if any check failed, 2 on a usage or
//! setup error.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use br2k_faults::matrix::{Matrix, Options, RunResult};
use br2k_faults::nemesis::{self, Plan};
use br2k_faults::operator::OperatorWorkload;
use br2k_faults::report;

struct Args {
    runs: usize,
    seed: u64,
    classes: Vec<String>,
    pairs: u32,
    json: bool,
    opts: Options,
}

const USAGE: &str = "usage: br2k-faults --runs N --seed S [--classes a,b,...] [--pairs P] [--output json|table]
       [--stack-dir DIR] [--ledger-bin PATH] [--operator-bin PATH | --no-operator] [--work-dir DIR] [--world-runs K]";

fn parse() -> Result<Args, String> {
    let mut argv = std::env::args().skip(1);
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(PathBuf::from))
        .unwrap_or_default();
    let mut runs = None;
    let mut seed = None;
    let mut classes: Option<Vec<String>> = None;
    let mut pairs = 25;
    let mut json = false;
    let mut stack_dir = std::env::var("BR2K_STACK_DIR").ok().map(PathBuf::from);
    let mut ledger_bin = exe_dir.join("ledger");
    let mut operator_bin = Some(exe_dir.join("br2k-operator"));
    let mut work_dir = None;
    let mut world_runs = 10;
    while let Some(a) = argv.next() {
        let mut val = |name: &str| argv.next().ok_or_else(|| format!("{name} needs a value"));
        match a.as_str() {
            "--runs" => runs = Some(val("--runs")?.parse().map_err(|e| format!("--runs: {e}"))?),
            "--seed" => seed = Some(val("--seed")?.parse().map_err(|e| format!("--seed: {e}"))?),
            "--classes" => {
                classes = Some(val("--classes")?.split(',').map(str::to_owned).collect())
            }
            "--pairs" => {
                pairs = val("--pairs")?
                    .parse()
                    .map_err(|e| format!("--pairs: {e}"))?
            }
            "--output" => json = val("--output")? == "json",
            "--stack-dir" => stack_dir = Some(val("--stack-dir")?.into()),
            "--ledger-bin" => ledger_bin = val("--ledger-bin")?.into(),
            "--operator-bin" => operator_bin = Some(val("--operator-bin")?.into()),
            "--no-operator" => operator_bin = None,
            "--work-dir" => work_dir = Some(PathBuf::from(val("--work-dir")?)),
            "--world-runs" => {
                world_runs = val("--world-runs")?
                    .parse()
                    .map_err(|e| format!("--world-runs: {e}"))?
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    let all: Vec<String> = nemesis::CLASSES
        .iter()
        .chain(OperatorWorkload::FAULTS)
        .map(|c| (*c).to_owned())
        .collect();
    let classes = classes.unwrap_or_else(|| {
        let n = if operator_bin.is_some() {
            all.len()
        } else {
            nemesis::CLASSES.len()
        };
        all[..n].to_vec()
    });
    for c in &classes {
        if !all.contains(c) {
            return Err(format!("unknown class {c} (known: {})", all.join(",")));
        }
    }
    if operator_bin.is_none()
        && let Some(c) = classes
            .iter()
            .find(|c| OperatorWorkload::FAULTS.contains(&c.as_str()))
    {
        return Err(format!("class {c} needs the operator workload"));
    }
    let stack_dir = stack_dir.ok_or("set BR2K_STACK_DIR or --stack-dir")?;
    Ok(Args {
        runs: runs.ok_or("--runs is required")?,
        seed: seed.ok_or("--seed is required")?,
        classes,
        pairs: pairs.min(100),
        json,
        opts: Options {
            work_dir: work_dir.unwrap_or_else(|| stack_dir.join("faults")),
            stack_dir,
            ledger_bin,
            operator_bin,
            world_runs,
        },
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() -> ExitCode {
    let args = match parse() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("br2k-faults: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let interrupted = interrupted.clone();
        tokio::spawn(async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            eprintln!("br2k-faults: interrupted; healing and stopping after this run");
            interrupted.store(true, Ordering::Relaxed);
        });
    }
    let mut m = match Matrix::start(args.opts.clone()).await {
        Ok(m) => m,
        Err(e) => {
            eprintln!("br2k-faults: setup: {e}");
            return ExitCode::from(2);
        }
    };
    eprintln!(
        "br2k-faults: {} runs from seed {}, classes {}, {}% pairs (iptables chain {})",
        args.runs,
        args.seed,
        args.classes.join(","),
        args.pairs,
        m.chain()
    );
    let mut results: Vec<RunResult> = Vec::new();
    for r in 0..args.runs {
        if interrupted.load(Ordering::Relaxed) {
            break;
        }
        let plan = Plan::of(args.seed + r as u64, &args.classes, args.pairs);
        let res = m.run(r, &plan).await;
        eprintln!(
            "run {r} seed {} {}{}: acked {} (unknown at first {}), lost {}, dup {}, heal→ack {:?} ms, →converged {:?} ms{}",
            res.seed,
            res.faults,
            if res.targets.is_empty() {
                String::new()
            } else {
                format!(" [{}]", res.targets.join(", "))
            },
            res.acknowledged,
            res.resolved_unknown,
            res.lost,
            res.duplicated,
            res.recovery_ack_ms,
            res.recovery_converged_ms,
            if res.ok() {
                String::new()
            } else {
                format!(" FAILED:\n  {}", res.problems.join("\n  "))
            }
        );
        results.push(res);
    }
    m.shutdown().await;
    if args.json {
        let out = serde_json::json!({
            "seed": args.seed,
            "runs": results,
            "table": report::rows(&results),
        });
        println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
    } else {
        print!("{}", report::table(&results));
    }
    if results.iter().all(RunResult::ok) && !interrupted.load(Ordering::Relaxed) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
