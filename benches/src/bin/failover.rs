//! `failover`: whole-cluster failover (#19) on two real Kubernetes control planes,
//! measured over N trials (default 10): loss of the active cluster (its API server
//! killed, or the cluster cut off from etcd) → every replica Ready in the other
//! cluster, → the new placement on chain, → a ledger leader there; and the lost
//! cluster's stand-down after it returns. Settlements run throughout and are counted
//! on chain at the end (each acknowledged one exactly once, no other).
//!
//! `scripts/failover [--trials N]` starts both clusters and runs this; by hand:
//! `failover --stack-a DIR --stack-b DIR --ledger-bin PATH --operator-bin PATH
//! [--trials N] [--scenarios apiserver-kill,partition] [--lease-seconds S] [--output json]`.
//! Exits 1 when a check failed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use br2k_benches::measure::arg;
use br2k_faults::failover::{self, Options, Scenario, p50_max};

fn path_arg(name: &str) -> Result<PathBuf, String> {
    let v: String = arg(name, String::new());
    if v.is_empty() {
        Err(format!("{name} is required"))
    } else {
        Ok(PathBuf::from(v))
    }
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.1}", d.as_secs_f64()))
}

fn stats(values: Vec<Duration>) -> String {
    match p50_max(&values) {
        Some((p50, max)) => format!("{:.1} / {:.1}", p50.as_secs_f64(), max.as_secs_f64()),
        None => "-".into(),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    br2k_k8s::install_crypto_provider();
    let opts = (|| -> Result<Options, String> {
        let scenarios: String = arg("--scenarios", "apiserver-kill,partition".to_owned());
        Ok(Options {
            stack_a: path_arg("--stack-a")?,
            stack_b: path_arg("--stack-b")?,
            ledger_bin: path_arg("--ledger-bin")?,
            operator_bin: path_arg("--operator-bin")?,
            work_dir: PathBuf::from(arg(
                "--work-dir",
                std::env::temp_dir().display().to_string(),
            )),
            trials: arg("--trials", 10),
            scenarios: scenarios
                .split(',')
                .map(|s| Scenario::parse(s).ok_or(format!("unknown scenario {s}")))
                .collect::<Result<_, _>>()?,
            lease: Duration::from_secs(arg("--lease-seconds", 5)),
        })
    })();
    let opts = match opts {
        Ok(o) => o,
        Err(e) => {
            eprintln!("failover: {e}");
            return ExitCode::from(2);
        }
    };
    let summary = match failover::run(&opts).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("failover: setup or run failed: {e}");
            return ExitCode::from(2);
        }
    };
    let json = arg("--output", String::new()) == "json";
    if json {
        let trials: Vec<_> = summary
            .trials
            .iter()
            .map(|t| {
                serde_json::json!({
                    "scenario": t.scenario.name(), "from": t.from, "to": t.to,
                    "epoch_before": t.epochs.0, "epoch_after": t.epochs.1,
                    "to_ready_ms": t.to_ready.map(|d| d.as_millis() as u64),
                    "to_recorded_ms": t.to_recorded.map(|d| d.as_millis() as u64),
                    "to_serving_ms": t.to_serving.map(|d| d.as_millis() as u64),
                    "from_fenced_ms": t.from_fenced.map(|d| d.as_millis() as u64),
                    "resolution_ms": t.resolution.as_millis() as u64,
                    "braked_ms": t.braked.map(|d| d.as_millis() as u64),
                    "returned_ms": t.returned.map(|d| d.as_millis() as u64),
                    "standdown_ms": t.standdown.map(|d| d.as_millis() as u64),
                    "pods_gone_ms": t.pods_gone.map(|d| d.as_millis() as u64),
                    "timeline": t.timeline, "problems": t.problems,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "trials": trials, "acknowledged_settlements": summary.acknowledged,
                "lost": summary.lost, "duplicated": summary.duplicated,
                "unexpected": summary.unexpected, "problems": summary.problems,
                "passed": summary.passed(),
            })
        );
    } else {
        println!(
            "| # | scenario | from→to | epochs | loss→old fenced (s) | loss→ready (s) | loss→recorded (s) | loss→serving (s) | heal→back (s) | back→scaled to 0 (s) | back→pods gone (s) | loss→braked status (s) | poll round max (s) |"
        );
        println!("|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for (i, t) in summary.trials.iter().enumerate() {
            println!(
                "| {i} | {} | {}→{} | {}→{} | {} | {} | {} | {} | {} | {} | {} | {} | {:.2} |",
                t.scenario.name(),
                t.from,
                t.to,
                t.epochs.0,
                t.epochs.1,
                secs(t.from_fenced),
                secs(t.to_ready),
                secs(t.to_recorded),
                secs(t.to_serving),
                secs(t.returned),
                secs(t.standdown),
                secs(t.pods_gone),
                secs(t.braked),
                t.resolution.as_secs_f64()
            );
        }
        println!();
        println!(
            "| scenario | trials | loss→old fenced p50 / max (s) | loss→ready p50 / max | loss→recorded p50 / max | loss→serving p50 / max | back→scaled to 0 p50 / max | back→pods gone p50 / max | loss→braked p50 / max |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        let mut scenarios: Vec<Scenario> = summary.trials.iter().map(|t| t.scenario).collect();
        scenarios.sort_by_key(|s| s.name());
        scenarios.dedup();
        for s in scenarios.into_iter().map(Some).chain([None]) {
            let ts: Vec<_> = summary
                .trials
                .iter()
                .filter(|t| s.is_none_or(|s| t.scenario == s))
                .collect();
            let col = |f: fn(&failover::TrialResult) -> Option<Duration>| {
                stats(ts.iter().filter_map(|t| f(t)).collect())
            };
            println!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                s.map_or("all", |s| s.name()),
                ts.len(),
                col(|t| t.from_fenced),
                col(|t| t.to_ready),
                col(|t| t.to_recorded),
                col(|t| t.to_serving),
                col(|t| t.standdown),
                col(|t| t.pods_gone),
                col(|t| t.braked)
            );
        }
        println!();
        println!(
            "settlements: {} acknowledged, {} lost, {} duplicated, {} unexpected on chain",
            summary.acknowledged, summary.lost, summary.duplicated, summary.unexpected
        );
        for t in &summary.trials {
            for p in &t.problems {
                println!("PROBLEM trial {}→{}: {p}", t.from, t.to);
            }
        }
        for p in &summary.problems {
            println!("PROBLEM: {p}");
        }
    }
    if summary.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
