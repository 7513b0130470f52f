//! The pieces both operator harnesses share, written once: the acceptance harness
//! (`support/acceptance.rs`, also run by the `operator_acceptance` bench) and the
//! fault matrix's operator workload (`faults/src/operator`, which includes this
//! directory with `#[path]`). Killable processes and proxies of a harness's own
//! (registries, the operator, loopback TCP proxies), the stack's environment, the set-up
//! of the service image, its record and the Kubernetes side, and the small readings
//! (metrics, CPU ticks) both measure with.
//!
//! A process started `detached` runs in its own process group (a ^C of the runner
//! does not reach it) and leaves its pid beside its log (`NAME.pid` for `NAME.log`),
//! so that a later run can clean up after a runner killed without unwinding (the fault
//! matrix's `clean_stale`); otherwise it is an ordinary child.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::StatefulSet;

mod operator_proc;
mod proxy;
mod registry;
mod stack;

pub use operator_proc::OperatorProc;
pub use proxy::TcpProxy;
pub use registry::RegistryProc;
pub use stack::{
    Kubectl, StackEnv, blobs_of, build_image, create_namespaces, host_port, http_client,
    install_and_connect, live_sts, push_everywhere, register, service_spec, tear_down,
    trust_anchors,
};

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
            format!(
                "{name} is not set (source $BR2K_STACK_DIR/env, by default .stack/env, after scripts/stack up)"
            )
        })
}

/// Polls `check` every [`POLL`] until it succeeds or `timeout` passes; the error
/// names the last thing observed.
pub async fn poll<T>(
    timeout: Duration,
    what: &str,
    check: impl AsyncFnMut() -> Result<T, String>,
) -> Result<T, String> {
    poll_every(POLL, timeout, what, check).await
}

/// [`poll`] every `every`.
pub async fn poll_every<T>(
    every: Duration,
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
            Err(_) => tokio::time::sleep(every).await,
        }
    }
}

/// The value of the metric line `name` (no labels) or `name{labels}` in an
/// OpenMetrics text.
pub fn metric(text: &str, name: &str, labels: Option<&str>) -> Option<f64> {
    let key = match labels {
        Some(l) => format!("{name}{{{l}}}"),
        None => name.to_owned(),
    };
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, rest) = l.split_once(' ')?;
        if k != key {
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

/// Writes `pid` beside `log` (`NAME.pid` for `NAME.log`): how a detached process is
/// found again after its runner was killed.
pub fn record_pid(log: &Path, pid: u32) {
    let _ = fs::write(log.with_extension("pid"), format!("{pid}\n"));
}

/// Opens `log` for appending; the two handles are a child's stdout and stderr.
pub fn log_pair(log: &Path) -> Result<(fs::File, fs::File), String> {
    let out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    Ok((out, err))
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

/// `line` without ANSI colour sequences.
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The image of the first container of the pod template.
pub fn template_image(s: &StatefulSet) -> Option<String> {
    s.spec
        .as_ref()?
        .template
        .spec
        .as_ref()?
        .containers
        .first()?
        .image
        .clone()
}
