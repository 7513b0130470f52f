//! The operator workload: the `br2k-operator` binary supervising two services on the
//! stack's API server, its faults, and the check that both are back to their record.
//!
//! (Being written; the interface below is what the runner calls.)

use std::path::{Path, PathBuf};
use std::time::Duration;

/// What [`OperatorWorkload::check`] found.
#[derive(Debug, Clone, Default)]
pub struct OperatorCheck {
    /// Time from the heal to both services matching their record.
    pub converged_after: Duration,
    /// What did not match (empty when converged).
    pub problems: Vec<String>,
    /// Whether the operator was busy in a loop while nothing was wrong.
    pub hot_loop: bool,
}

/// The operator and its two services.
pub struct OperatorWorkload {
    _dir: PathBuf,
}

impl OperatorWorkload {
    /// The fault classes this workload injects itself.
    pub const FAULTS: &'static [&'static str] = &[];

    /// Sets up two services and starts the operator; returns once both are healthy.
    pub async fn start(_operator_bin: PathBuf, work_dir: &Path) -> Result<Self, String> {
        Err(format!(
            "operator workload not built yet ({})",
            work_dir.display()
        ))
    }

    /// Starts fault `fault` (one of [`Self::FAULTS`]); returns once it is in effect.
    pub async fn inject(&mut self, fault: &str, _seed: u64) -> Result<(), String> {
        Err(format!("unknown fault {fault}"))
    }

    /// Ends every fault this workload injected.
    pub async fn heal(&mut self) -> Result<(), String> {
        Ok(())
    }

    /// Waits at most `within` until both services match their record.
    pub async fn check(&mut self, _within: Duration) -> Result<OperatorCheck, String> {
        Err("operator workload not built yet".into())
    }

    /// Stops the operator and removes what the workload created.
    pub async fn shutdown(self) {}
}
