//! The table: per fault class (pairs on rows of their own), runs, acknowledged
//! commands, lost, duplicated, recovery times.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::matrix::RunResult;

/// One row of the table.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Row {
    /// Fault class (`a` or `a+b`, or `pairs` for all pairs together).
    pub class: String,
    /// Runs.
    pub runs: usize,
    /// Failed runs.
    pub failed: usize,
    /// Acknowledged commands.
    pub acknowledged: usize,
    /// Lost.
    pub lost: usize,
    /// Duplicated.
    pub duplicated: usize,
    /// Heal to first acknowledged command, p50 and max, ms.
    pub ack_p50_ms: Option<u64>,
    /// Max of the same.
    pub ack_max_ms: Option<u64>,
    /// Heal to converged, p50, ms.
    pub converged_p50_ms: Option<u64>,
    /// Max of the same.
    pub converged_max_ms: Option<u64>,
}

fn p50(v: &mut [u64]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    Some(v[(v.len() - 1) / 2])
}

fn row(class: String, runs: &[&RunResult]) -> Row {
    let mut ack: Vec<u64> = runs.iter().filter_map(|r| r.recovery_ack_ms).collect();
    let mut conv: Vec<u64> = runs
        .iter()
        .filter_map(|r| r.recovery_converged_ms)
        .collect();
    Row {
        class,
        runs: runs.len(),
        failed: runs.iter().filter(|r| !r.ok()).count(),
        acknowledged: runs.iter().map(|r| r.acknowledged).sum(),
        lost: runs.iter().map(|r| r.lost).sum(),
        duplicated: runs.iter().map(|r| r.duplicated).sum(),
        ack_max_ms: ack.iter().copied().max(),
        ack_p50_ms: p50(&mut ack),
        converged_max_ms: conv.iter().copied().max(),
        converged_p50_ms: p50(&mut conv),
    }
}

/// Rows per single class, then `pairs` (all pair runs), then `total`.
pub fn rows(results: &[RunResult]) -> Vec<Row> {
    let mut by: BTreeMap<&str, Vec<&RunResult>> = BTreeMap::new();
    let mut pairs = Vec::new();
    for r in results {
        if r.faults.contains('+') {
            pairs.push(r);
        } else {
            by.entry(r.faults.as_str()).or_default().push(r);
        }
    }
    let mut out: Vec<Row> = by
        .into_iter()
        .map(|(c, rs)| row(c.to_owned(), &rs))
        .collect();
    if !pairs.is_empty() {
        out.push(row("pairs (any two classes)".into(), &pairs));
    }
    let all: Vec<&RunResult> = results.iter().collect();
    out.push(row("total".into(), &all));
    out
}

fn secs(ms: Option<u64>) -> String {
    ms.map_or_else(|| "-".into(), |m| format!("{:.1}", m as f64 / 1000.0))
}

/// The table as Markdown, then one line per failed run.
pub fn table(results: &[RunResult]) -> String {
    let mut s = String::new();
    s.push_str("| fault class | runs | failed | acknowledged ops | lost | duplicated | heal→ack p50 / max (s) | heal→converged p50 / max (s) |\n");
    s.push_str("|---|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in rows(results) {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} / {} | {} / {} |",
            r.class,
            r.runs,
            r.failed,
            r.acknowledged,
            r.lost,
            r.duplicated,
            secs(r.ack_p50_ms),
            secs(r.ack_max_ms),
            secs(r.converged_p50_ms),
            secs(r.converged_max_ms)
        );
    }
    for r in results.iter().filter(|r| !r.ok()) {
        let first = r.problems.first().map_or("", String::as_str);
        let first: String = first
            .lines()
            .next()
            .unwrap_or("")
            .chars()
            .take(300)
            .collect();
        let _ = writeln!(
            s,
            "FAILED run {} seed {} ({}): lost {}, duplicated {}, {} problem(s); first: {first}",
            r.run,
            r.seed,
            r.faults,
            r.lost,
            r.duplicated,
            r.problems.len()
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(faults: &str, ack: u64, problems: usize) -> RunResult {
        RunResult {
            run: 0,
            seed: 7,
            faults: faults.into(),
            targets: vec![],
            acknowledged: 10,
            resolved_unknown: 0,
            lost: 0,
            duplicated: 0,
            recovery_ack_ms: Some(ack),
            recovery_converged_ms: Some(ack * 2),
            problems: vec!["x".into(); problems],
        }
    }

    #[test]
    fn rows_group_by_class_and_pairs_and_failed_runs_are_listed_with_their_seed() {
        let rs = vec![
            run("leader-kill", 100, 0),
            run("leader-kill", 300, 0),
            run("leader-kill", 200, 1),
            run("etcd-kill+anvil-stop", 50, 0),
        ];
        let rows = rows(&rs);
        assert_eq!(rows[0].class, "leader-kill");
        assert_eq!(rows[0].runs, 3);
        assert_eq!(rows[0].failed, 1);
        assert_eq!(rows[0].acknowledged, 30);
        assert_eq!(rows[0].ack_p50_ms, Some(200));
        assert_eq!(rows[0].ack_max_ms, Some(300));
        assert_eq!(rows[1].class, "pairs (any two classes)");
        assert_eq!(rows[2].class, "total");
        assert_eq!(rows[2].runs, 4);
        let t = table(&rs);
        assert!(t.contains("FAILED run 0 seed 7 (leader-kill)"), "{t}");
    }
}
