//! One `ledger serve` replica as a child process.

use super::*;

/// One `ledger serve` child process.
pub struct ReplicaProc {
    /// 0, 1 or 2.
    pub slot: usize,
    /// Its port.
    pub port: u16,
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    /// Its stderr.
    pub log: PathBuf,
    pub(super) child: Option<Child>,
    /// SIGSTOPped.
    pub stopped: bool,
    /// Running under libfaketime with this offset.
    pub skew: Option<String>,
}

impl ReplicaProc {
    /// Its PID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether it runs (not killed).
    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL, reaped.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.stopped = false;
        self.skew = None;
    }

    /// SIGSTOP.
    pub fn pause(&mut self) -> Result<(), String> {
        if let Some(pid) = self.pid()
            && !self.stopped
        {
            procs::signal(pid, "STOP")?;
            self.stopped = true;
        }
        Ok(())
    }

    /// SIGCONT.
    pub fn resume(&mut self) -> Result<(), String> {
        if let Some(pid) = self.pid()
            && self.stopped
        {
            procs::signal(pid, "CONT")?;
            self.stopped = false;
        }
        Ok(())
    }

    /// Whether it exited by itself (crashed); it then counts as not running (a heal
    /// starts it again).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let st = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten());
        if st.is_some() {
            self.child = None;
        }
        st
    }

    /// The last `n` lines of its log.
    pub fn tail(&self, n: usize) -> String {
        let t = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = t.lines().rev().take(n).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for ReplicaProc {
    fn drop(&mut self) {
        let _ = self.resume();
        self.kill();
    }
}
