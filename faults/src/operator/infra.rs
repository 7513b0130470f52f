//! The killable pieces of the operator workload: registry processes, loopback TCP
//! proxies (one can answer 503), the operator process, iptables drops on loopback, a
//! tmpfs for the mirror's storage and the kwok cluster's kube-apiserver. Every piece
//! that changes the machine (rules, mounts, stopped or killed processes) undoes it in
//! `Drop` too, so a panic or an early return leaves nothing behind.

use std::fs;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;

mod iptables;
mod kwok;
mod leftovers;
mod procs;
mod proxy;
mod registry;
mod tmpfs;

pub use iptables::IptablesDrop;
pub use kwok::{ControlPlaneSupervisor, KilledApiserver};
pub use leftovers::clean_stale;
pub use procs::OperatorProc;
pub use proxy::TcpProxy;
pub use registry::RegistryProc;
pub use tmpfs::Tmpfs;

use kwok::{alive, read_pid};
use leftovers::record_pid;

/// How often end states are polled.
pub const POLL: Duration = Duration::from_millis(50);

/// A short hex string unique to this process and moment.
pub fn unique() -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!(
        "{:06x}",
        ((n as u64) ^ (u64::from(std::process::id()) << 20)) & 0xff_ffff
    )
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("free port: {e}"))
}

/// An environment variable the stack's env file sets.
pub fn env(name: &str) -> Result<String, String> {
    std::env::var(name)
        .ok()
        .filter(|v| !v.trim().is_empty())
        .ok_or_else(|| {
            format!("{name} is not set (source $BR2K_STACK_DIR/env after scripts/stack up)")
        })
}

/// Polls `check` every [`POLL`] until it succeeds or `timeout` passes; the error
/// names the last thing observed.
pub async fn poll<T>(
    timeout: Duration,
    what: &str,
    mut check: impl AsyncFnMut() -> Result<T, String>,
) -> Result<T, String> {
    let start = Instant::now();
    loop {
        match check().await {
            Ok(v) => return Ok(v),
            Err(e) if start.elapsed() >= timeout => {
                return Err(format!(
                    "{what}: not reached within {timeout:?}; last seen: {e}"
                ));
            }
            Err(_) => tokio::time::sleep(POLL).await,
        }
    }
}

/// The value of the metric line `name` (no labels) in an OpenMetrics text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, rest) = l.split_once(' ')?;
        if k != name {
            return None;
        }
        rest.split_whitespace().next()?.parse::<f64>().ok()
    })
}

/// Clock ticks per second of `/proc/PID/stat` times (`getconf CLK_TCK`, else 100).
pub fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

/// utime + stime of process `pid`, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Result<u64, String> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("/proc/{pid}/stat: {e}"))?;
    // Fields after the command name (which may hold spaces): field 3 is index 0.
    let rest = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .ok_or("malformed stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| -> Result<u64, String> {
        f.get(i)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("malformed stat field {}", i + 3))
    };
    Ok(num(11)? + num(12)?)
}

/// Sends `signal` (`KILL`, `STOP`, `CONT`, `TERM`) to `pid` with kill(1).
pub fn signal(pid: u32, signal: &str) -> Result<(), String> {
    let st = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("kill -{signal} {pid}: {e}"))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("kill -{signal} {pid}: {st}"))
    }
}

/// Pseudo-random, incompressible bytes (xorshift64*), so the layer has real size.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

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
