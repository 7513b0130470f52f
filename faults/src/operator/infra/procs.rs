//! The operator binary as its own process.

use super::*;

// ------------------------------------------------------------------ operator process

/// The operator binary as its own process.
pub struct OperatorProc {
    /// The `br2k-operator` binary.
    pub bin: PathBuf,
    /// Its log (stdout and stderr, appended across restarts).
    pub log: PathBuf,
    /// The kubeconfig it uses (`KUBECONFIG`).
    pub kubeconfig: PathBuf,
    /// Its lease's name in `br2k-system`.
    pub lease: String,
    /// Its leader-election identity.
    pub identity: String,
    /// `127.0.0.1:PORT` of its metrics (a fresh port each start).
    pub metrics_addr: String,
    /// Trust anchors: `--chain-id`, `--rpc-url`, `--registry-contract`,
    /// `--oci-registry` and `--allowed-owner`.
    pub anchors: Vec<String>,
    child: Option<Child>,
    stopped: bool,
}

impl OperatorProc {
    /// The process of run `run`, not started.
    pub fn new(
        bin: PathBuf,
        log: PathBuf,
        kubeconfig: PathBuf,
        run: &str,
        anchors: Vec<String>,
    ) -> Self {
        Self {
            bin,
            log,
            kubeconfig,
            lease: format!("br2k-faults-{run}"),
            identity: format!("faults-{run}"),
            metrics_addr: String::new(),
            anchors,
            child: None,
            stopped: false,
        }
    }

    /// Starts the process (a fresh metrics port each time).
    pub fn start(&mut self) -> Result<(), String> {
        if self.child.is_some() {
            return Ok(());
        }
        self.metrics_addr = format!("127.0.0.1:{}", free_port()?);
        let mut out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("{}: {e}", self.log.display()))?;
        let _ = writeln!(out, "===== faults: starting {}", self.bin.display());
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let resync = std::env::var("BR2K_FAULTS_RESYNC_SECONDS").unwrap_or("2".into());
        let verify = std::env::var("BR2K_FAULTS_VERIFY_SECONDS").unwrap_or("2".into());
        let child = Command::new(&self.bin)
            .args([
                "--metrics-addr",
                self.metrics_addr.as_str(),
                "--lease-namespace",
                "br2k-system",
                "--lease-name",
                self.lease.as_str(),
                "--identity",
                self.identity.as_str(),
                "--insecure-loopback-registries",
                "--resync-seconds",
                resync.as_str(),
                "--verify-seconds",
                verify.as_str(),
                "--lease-seconds",
                "4",
            ])
            .args(&self.anchors)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .process_group(0)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", self.bin.display()))?;
        record_pid(&self.log, child.id());
        self.child = Some(child);
        self.stopped = false;
        Ok(())
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process still runs; an exit is returned as its status text.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => None,
            Some(Ok(Some(st))) => {
                self.child = None;
                Some(st.to_string())
            }
            Some(Err(e)) => Some(e.to_string()),
            None => Some("not started".into()),
        }
    }

    /// SIGSTOP (nothing when it does not run: it is down already).
    pub fn pause(&mut self) -> Result<(), String> {
        let Some(pid) = self.pid() else {
            return Ok(());
        };
        signal(pid, "STOP")?;
        self.stopped = true;
        Ok(())
    }

    /// SIGCONT (after [`OperatorProc::pause`]).
    pub fn resume(&mut self) -> Result<(), String> {
        if !self.stopped {
            return Ok(());
        }
        let pid = self.pid().ok_or("operator not running")?;
        signal(pid, "CONT")?;
        self.stopped = false;
        Ok(())
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.stopped = false;
    }

    /// SIGTERM (the operator releases its lease), up to 10 s, then SIGKILL.
    pub async fn terminate(&mut self) {
        let _ = self.resume();
        let Some(mut c) = self.child.take() else {
            return;
        };
        let _ = signal(c.id(), "TERM");
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for OperatorProc {
    fn drop(&mut self) {
        // SIGKILL ends a stopped process too; nothing stays stopped.
        self.kill();
    }
}
