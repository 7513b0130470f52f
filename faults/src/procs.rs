//! Processes: signals by PID, CPU time from `/proc`, and the stack's own processes
//! (etcd members, anvil) killed and started again with their recorded command line.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Sends `sig` (`KILL`, `STOP`, `CONT`, `TERM`, `INT`) to `pid`.
pub fn signal(pid: u32, sig: &str) -> Result<(), String> {
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("kill -{sig} {pid}: {e}"))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("kill -{sig} {pid}: {st}"))
    }
}

/// Whether `pid` exists (a zombie counts as gone).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !matches!(stat_state(&s), Some('Z') | Some('X')),
        Err(_) => false,
    }
}

fn stat_state(stat: &str) -> Option<char> {
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.chars().next()
}

/// CPU time (user + system) used by `pid` so far.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of stat; `rest` starts at field 3.
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// Waits until `pid` is gone, at most `within`.
pub fn wait_gone(pid: u32, within: Duration) -> bool {
    let start = Instant::now();
    while alive(pid) {
        if start.elapsed() > within {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// A process of the stack (recorded in `$BR2K_STACK_DIR/pids/<name>.pid` as
/// `PID BINARY`) that a fault kills and starts again as it was started.
#[derive(Debug)]
pub struct StackProc {
    /// Its name in the stack (`etcd-0`, `anvil`).
    pub name: String,
    pid_file: PathBuf,
    log: PathBuf,
    argv: Vec<String>,
    cwd: PathBuf,
    env: Vec<(String, String)>,
    bin: String,
    pid: u32,
    /// Set when we started it (we reap it).
    child: Option<Child>,
    /// Whether it is down (killed, not yet started again).
    pub down: bool,
    /// Whether it is stopped (SIGSTOP).
    pub stopped: bool,
}

impl StackProc {
    /// Reads the recorded PID and the command line, working directory and environment
    /// of the running process.
    pub fn open(stack_dir: &Path, name: &str) -> Result<Self, String> {
        let pid_file = stack_dir.join("pids").join(format!("{name}.pid"));
        let text = std::fs::read_to_string(&pid_file)
            .map_err(|e| format!("{}: {e}", pid_file.display()))?;
        let mut it = text.split_whitespace();
        let pid: u32 = it
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| format!("{}: no PID", pid_file.display()))?;
        let bin = it.next().unwrap_or_default().to_owned();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map_err(|e| format!("{name} ({pid}) is not running: {e}"))?;
        let argv: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap_or_else(|_| "/".into());
        let env = std::fs::read(format!("/proc/{pid}/environ"))
            .map(|e| {
                e.split(|b| *b == 0)
                    .filter_map(|kv| {
                        let kv = String::from_utf8_lossy(kv);
                        kv.split_once('=')
                            .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Self {
            name: name.to_owned(),
            log: stack_dir.join("logs").join(format!("{name}.log")),
            pid_file,
            argv,
            cwd,
            env,
            bin,
            pid,
            child: None,
            down: false,
            stopped: false,
        })
    }

    /// Its current PID.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Stops it with `sig` (`KILL`, or `TERM`/`INT` for a clean exit) and waits until
    /// it is gone.
    pub fn kill(&mut self, sig: &str) -> Result<(), String> {
        if self.down {
            return Ok(());
        }
        if self.stopped {
            let _ = signal(self.pid, "CONT");
            self.stopped = false;
        }
        signal(self.pid, sig)?;
        if let Some(c) = self.child.as_mut() {
            let _ = c.wait();
            self.child = None;
        }
        if !wait_gone(self.pid, Duration::from_secs(20)) {
            signal(self.pid, "KILL")?;
            wait_gone(self.pid, Duration::from_secs(5));
        }
        self.down = true;
        Ok(())
    }

    /// SIGSTOP.
    pub fn pause(&mut self) -> Result<(), String> {
        if self.down || self.stopped {
            return Ok(());
        }
        signal(self.pid, "STOP")?;
        self.stopped = true;
        Ok(())
    }

    /// Ends a pause and starts it again if it is down (same command line, working
    /// directory and environment; the PID file is updated so `scripts/stack down`
    /// stops the new process).
    pub fn heal(&mut self) -> Result<(), String> {
        if self.stopped {
            signal(self.pid, "CONT")?;
            self.stopped = false;
        }
        if !self.down {
            return Ok(());
        }
        use std::os::unix::process::CommandExt;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("{}: {e}", self.log.display()))?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(&self.argv[0])
            .args(&self.argv[1..])
            .current_dir(&self.cwd)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(|e| format!("restart {}: {e}", self.name))?;
        self.pid = child.id();
        self.child = Some(child);
        self.down = false;
        std::fs::write(&self.pid_file, format!("{} {}\n", self.pid, self.bin))
            .map_err(|e| format!("{}: {e}", self.pid_file.display()))?;
        Ok(())
    }
}

impl Drop for StackProc {
    fn drop(&mut self) {
        // Never leave a stack process stopped or down.
        let _ = self.heal();
    }
}
