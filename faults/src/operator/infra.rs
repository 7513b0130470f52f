//! The killable pieces of the operator workload: registry processes, loopback TCP
//! proxies (one can answer 503), the operator process, iptables drops on loopback, a
//! tmpfs for the mirror's storage and the kwok cluster's kube-apiserver. Every piece
//! that changes the machine (rules, mounts, stopped or killed processes) undoes it in
//! `Drop` too, so a panic or an early return leaves nothing behind.

use std::fs;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;

// The registry processes, the proxies and the operator process are the acceptance
// harness's (one copy of each, shared with `br2k-operator/tests/support/acceptance.rs`).
#[path = "../../../br2k-operator/tests/support/pieces/mod.rs"]
mod pieces;

mod iptables;
mod kwok;
mod leftovers;
mod tmpfs;

pub use iptables::IptablesDrop;
pub use kwok::{ControlPlaneSupervisor, KilledApiserver};
pub use leftovers::clean_stale;
pub use pieces::*;
pub use tmpfs::Tmpfs;

use kwok::{alive, read_pid};

/// Runs a command to completion; its stderr in the error.
pub fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
