//! Operator acceptance: the operator binary as its own process, against the stack's
//! Kubernetes and anvil and two registries of the harness, recovers every failure
//! class once (each end state read independently of the operator) and never loops.
//!
//! Run: `source .stack/env && cargo test -p br2k-operator --test acceptance -- --ignored --nocapture`.

#[path = "support/acceptance.rs"]
mod acceptance;

use acceptance::{Class, Harness};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs stack"]
async fn every_failure_class_recovers_once_without_loops() {
    let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_br2k-operator"));
    let mut h = match Harness::start(bin).await {
        Ok(h) => h,
        Err(e) => panic!("acceptance setup failed: {e}"),
    };
    let mut results = Vec::new();
    for class in Class::ALL {
        let r = h.run(class).await;
        eprintln!("[acceptance] {}", r.line());
        results.push(r);
    }
    eprintln!("\n{}", acceptance::table(&results));
    let failed: Vec<String> = results
        .iter()
        .filter(|r| !r.passed())
        .map(|r| r.line())
        .collect();
    if !failed.is_empty() {
        eprintln!("--- operator log (tail) ---\n{}", h.log_tail(150));
        h.keep_dir();
    }
    h.shutdown().await;
    assert!(
        failed.is_empty(),
        "{} of {} classes failed:\n{}",
        failed.len(),
        results.len(),
        failed.join("\n")
    );
}
