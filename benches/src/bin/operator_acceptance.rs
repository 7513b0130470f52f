//! Runs every failure class of the operator acceptance harness N times against the
//! operator binary (its own process) and prints, per class: recoveries, time to
//! recovered (p50 / max), reconciles spent (median), and the operator's CPU during
//! lasting failures.
//!
//! Usage: `operator_acceptance [N] [--output json] [--classes a,b,...]` (N defaults to
//! 5). Needs the stack's environment (`source .stack/env`); the operator binary is
//! `BR2K_OPERATOR_BIN`, else `br2k-operator` beside this binary. `scripts/acceptance`
//! builds both and runs this. The operator runs with `--resync-seconds` and
//! `--verify-seconds` from `BR2K_ACCEPTANCE_RESYNC_SECONDS` and
//! `BR2K_ACCEPTANCE_VERIFY_SECONDS` (2 each by default). The work directory (with the
//! operator's log) is kept when a class fails or `BR2K_ACCEPTANCE_KEEP` is set.

#[path = "../../../br2k-operator/tests/support/acceptance.rs"]
mod acceptance;

use std::path::PathBuf;

use acceptance::{Class, ClassResult, Harness};
use serde_json::json;

/// Command-line options.
struct Options {
    runs: usize,
    json: bool,
    classes: Vec<Class>,
}

fn usage() -> ! {
    eprintln!("usage: operator_acceptance [N] [--output json|table] [--classes a,b,...]");
    eprintln!("classes: {}", Class::ALL.map(Class::name).join(", "));
    std::process::exit(2)
}

fn options() -> Options {
    let mut o = Options {
        runs: 5,
        json: false,
        classes: Class::ALL.to_vec(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--output" => match args.next().as_deref() {
                Some("json") => o.json = true,
                Some("table") => o.json = false,
                _ => usage(),
            },
            "--classes" => {
                let list = args.next().unwrap_or_else(|| usage());
                o.classes = list
                    .split(',')
                    .map(|n| Class::parse(n.trim()).unwrap_or_else(|| usage()))
                    .collect();
            }
            "-h" | "--help" => usage(),
            n => match n.parse() {
                Ok(n) if n > 0 => o.runs = n,
                _ => usage(),
            },
        }
    }
    o
}

/// The operator binary: `BR2K_OPERATOR_BIN`, else `br2k-operator` beside this binary.
fn operator_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("BR2K_OPERATOR_BIN") {
        return PathBuf::from(p);
    }
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("br2k-operator")))
        .unwrap_or_else(|| PathBuf::from("br2k-operator"))
}

/// The `q` quantile (nearest rank) of `v`.
fn quantile(v: &[u64], q: f64) -> Option<u64> {
    let mut s = v.to_vec();
    s.sort_unstable();
    (!s.is_empty()).then(|| s[((s.len() as f64 * q).ceil() as usize).clamp(1, s.len()) - 1])
}

/// The median of `v`.
fn median_f(v: &[f64]) -> Option<f64> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    (!s.is_empty()).then(|| s[(s.len() - 1) / 2])
}

/// Per-class aggregate of its runs.
struct Summary<'a> {
    class: Class,
    runs: Vec<&'a ClassResult>,
}

impl Summary<'_> {
    fn recovered(&self) -> usize {
        self.runs.iter().filter(|r| r.recovered).count()
    }
    fn passed(&self) -> usize {
        self.runs.iter().filter(|r| r.passed()).count()
    }
    fn ms(&self) -> Vec<u64> {
        self.runs.iter().filter_map(|r| r.ms).collect()
    }
    fn reconciles(&self) -> Vec<u64> {
        self.runs.iter().filter_map(|r| r.reconciles).collect()
    }
    fn cpu(&self) -> Vec<f64> {
        self.runs.iter().filter_map(|r| r.cpu_pct).collect()
    }
    fn outcomes(&self) -> String {
        let mut counts = std::collections::BTreeMap::<String, usize>::new();
        for o in self.runs.iter().filter_map(|r| r.outcome.clone()) {
            *counts.entry(o).or_default() += 1;
        }
        counts
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn print_table(summaries: &[Summary<'_>]) {
    println!(
        "{:<30} | {:>9} | {:>21} | {:>10} | {:>12} | {:>9} | outcomes",
        "class", "recovered", "to recovered p50/max", "reconciles", "operator CPU", "all checks"
    );
    println!("{}", "-".repeat(118));
    let opt = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
    for s in summaries {
        let ms = s.ms();
        let cpu = median_f(&s.cpu());
        println!(
            "{:<30} | {:>9} | {:>21} | {:>10} | {:>12} | {:>9} | {}",
            s.class.name(),
            format!("{}/{}", s.recovered(), s.runs.len()),
            format!(
                "{} / {} ms",
                opt(quantile(&ms, 0.5)),
                opt(quantile(&ms, 1.0))
            ),
            opt(quantile(&s.reconciles(), 0.5)),
            if s.class.lasting() {
                cpu.map_or("-".to_owned(), |c| format!("{c:.1}%"))
            } else {
                "n/a".to_owned()
            },
            format!("{}/{}", s.passed(), s.runs.len()),
            s.outcomes(),
        );
    }
    println!(
        "\nrecovered: end state read from the API server / registry bytes within 60 s; to recovered: from the injection's command returning; reconciles: br2k_reconciles_total spent until then (median); operator CPU: % of one core over a 10 s window while the failure lasts (median); all checks: also Healthy again, restores done, at most 20 reconciles in the 5 s after."
    );
}

/// `rounds`: how many times the class list ran.
fn print_json(summaries: &[Summary<'_>], rounds: usize) {
    let classes: Vec<serde_json::Value> = summaries
        .iter()
        .map(|s| {
            let ms = s.ms();
            json!({
                "class": s.class.name(),
                "runs": s.runs.len(),
                "recovered": s.recovered(),
                "passed": s.passed(),
                "ms_p50": quantile(&ms, 0.5),
                "ms_max": quantile(&ms, 1.0),
                "reconciles_median": quantile(&s.reconciles(), 0.5),
                "cpu_pct_median": if s.class.lasting() { median_f(&s.cpu()) } else { None },
                "outcomes": s.outcomes(),
                "results": s.runs.iter().map(|r| json!({
                    "recovered": r.recovered,
                    "passed": r.passed(),
                    "ms": r.ms,
                    "reconciles": r.reconciles,
                    "cpu_pct": r.cpu_pct,
                    "window_reconciles": r.window_reconciles,
                    "outcome": r.outcome,
                    "healthy_after": r.healthy_after,
                    "quiet_reconciles": r.quiet_reconciles,
                    "no_loop": r.no_loop,
                    "problems": r.problems,
                    "note": r.note,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({ "rounds": rounds, "classes": classes }))
            .expect("json serializes")
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    let o = options();
    let bin = operator_bin();
    eprintln!(
        "[operator_acceptance] operator {} (resync {} s, verify {} s); {} round(s) of {} class(es)",
        bin.display(),
        std::env::var("BR2K_ACCEPTANCE_RESYNC_SECONDS").unwrap_or("2".into()),
        std::env::var("BR2K_ACCEPTANCE_VERIFY_SECONDS").unwrap_or("2".into()),
        o.runs,
        o.classes.len()
    );
    let mut h = match Harness::start(bin).await {
        Ok(h) => h,
        Err(e) => {
            eprintln!("setup failed: {e}");
            std::process::exit(1);
        }
    };
    let mut results: Vec<ClassResult> = Vec::new();
    for round in 1..=o.runs {
        for &class in &o.classes {
            let r = h.run(class).await;
            eprintln!("[round {round}/{}] {}", o.runs, r.line());
            results.push(r);
        }
    }
    let any_failed = results.iter().any(|r| !r.passed());
    if any_failed {
        eprintln!("--- operator log (tail) ---\n{}", h.log_tail(100));
    }
    if any_failed || std::env::var_os("BR2K_ACCEPTANCE_KEEP").is_some() {
        h.keep_dir();
    }
    h.shutdown().await;
    let mut classes = o.classes.clone();
    let mut seen = std::collections::HashSet::new();
    classes.retain(|c| seen.insert(*c));
    let summaries: Vec<Summary<'_>> = classes
        .iter()
        .map(|&class| Summary {
            class,
            runs: results.iter().filter(|r| r.class == class).collect(),
        })
        .collect();
    if o.json {
        print_json(&summaries, o.runs);
    } else {
        print_table(&summaries);
    }
    if any_failed {
        std::process::exit(1);
    }
}
