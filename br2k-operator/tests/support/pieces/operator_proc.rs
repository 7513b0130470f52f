//! The operator binary as its own process.

use std::fs;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use alloy::transports::http::reqwest;

use super::{free_port, log_pair, metric, record_pid, signal, strip_ansi};

/// The operator binary as its own process.
pub struct OperatorProc {
    /// The `br2k-operator` binary.
    pub bin: PathBuf,
    /// Its log (stdout and stderr, appended across restarts).
    pub log: PathBuf,
    /// The kubeconfig it uses (`KUBECONFIG`), if not the runner's own.
    pub kubeconfig: Option<PathBuf>,
    /// Its lease's name in `br2k-system`.
    pub lease: String,
    /// Its leader-election identity.
    pub identity: String,
    /// `127.0.0.1:PORT` of its metrics (a fresh port each start).
    pub metrics_addr: String,
    /// Trust anchors: `--chain-id`, `--rpc-url`, `--registry-contract`,
    /// `--oci-registry` and `--allowed-owner`.
    pub anchors: Vec<String>,
    /// The harness's name: lease `br2k-NAME-RUN`, identity `NAME-RUN`, and the
    /// environment variables `BR2K_NAME_RESYNC_SECONDS` and `BR2K_NAME_VERIFY_SECONDS`
    /// that shorten its periods (2 s each by default).
    name: String,
    detach: bool,
    child: Option<Child>,
    stopped: bool,
}

impl OperatorProc {
    /// The process of harness `name`'s run `run`, not started.
    pub fn new(bin: PathBuf, log: PathBuf, name: &str, run: &str, anchors: Vec<String>) -> Self {
        Self {
            bin,
            log,
            kubeconfig: None,
            lease: format!("br2k-{name}-{run}"),
            identity: format!("{name}-{run}"),
            metrics_addr: String::new(),
            anchors,
            name: name.to_owned(),
            detach: false,
            child: None,
            stopped: false,
        }
    }

    /// With `kubeconfig` instead of the runner's own.
    pub fn with_kubeconfig(mut self, kubeconfig: PathBuf) -> Self {
        self.kubeconfig = Some(kubeconfig);
        self
    }

    /// Started detached (see the module's text).
    pub fn detached(mut self) -> Self {
        self.detach = true;
        self
    }

    /// Starts the process (a fresh metrics port each time).
    pub fn start(&mut self) -> Result<(), String> {
        if self.child.is_some() {
            return Ok(());
        }
        self.metrics_addr = format!("127.0.0.1:{}", free_port()?);
        let (mut out, err) = log_pair(&self.log)?;
        let _ = writeln!(out, "===== {}: starting {}", self.name, self.bin.display());
        // The periods can be shortened for a run (the bench's `--verify-seconds`):
        // on-disk corruption has no signal, so its detection waits for them.
        let var = |what: &str| {
            let name = format!("BR2K_{}_{what}_SECONDS", self.name.to_uppercase());
            std::env::var(name).unwrap_or("2".into())
        };
        let (resync, verify) = (var("RESYNC"), var("VERIFY"));
        let _ = writeln!(
            out,
            "===== {}: resync {resync} s, verify {verify} s",
            self.name
        );
        let mut cmd = Command::new(&self.bin);
        cmd.args([
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
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err));
        if let Some(k) = &self.kubeconfig {
            cmd.env("KUBECONFIG", k);
        }
        if self.detach {
            cmd.process_group(0);
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", self.bin.display()))?;
        if self.detach {
            record_pid(&self.log, child.id());
        }
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

    /// Whether the process still runs (reaps it if it exited).
    pub fn alive(&mut self) -> bool {
        self.exited().is_none()
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

    /// The last `lines` lines of its log, without colour codes.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..]
            .iter()
            .map(|l| strip_ansi(l))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Its metrics text.
    pub async fn metrics(&self, http: &reqwest::Client) -> Result<String, String> {
        let url = format!("http://{}/metrics", self.metrics_addr);
        let resp = http
            .get(&url)
            .send()
            .await
            .map_err(|e| format!("GET {url}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("GET {url}: {}", resp.status()));
        }
        resp.text().await.map_err(|e| e.to_string())
    }

    /// Ok once it leads (`br2k_leader` 1); else what it reported.
    pub async fn leads(&self, http: &reqwest::Client) -> Result<(), String> {
        let text = self.metrics(http).await?;
        match metric(&text, "br2k_leader", None) {
            Some(1.0) => Ok(()),
            other => Err(format!("br2k_leader {other:?}")),
        }
    }

    /// Its `br2k_reconciles_total`.
    pub async fn reconciles(&self, http: &reqwest::Client) -> Result<u64, String> {
        let text = self.metrics(http).await?;
        metric(&text, "br2k_reconciles_total", None)
            .map(|v| v as u64)
            .ok_or_else(|| "no br2k_reconciles_total".to_owned())
    }
}

impl Drop for OperatorProc {
    fn drop(&mut self) {
        // SIGKILL ends a stopped process too; nothing stays stopped.
        self.kill();
    }
}
