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

// ------------------------------------------------------------------ registries

/// A Distribution registry process on a loopback port with its own storage; it can
/// be stopped and started again on the same port and storage.
pub struct RegistryProc {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    /// The storage root (`rootdirectory`).
    pub data: PathBuf,
    config: PathBuf,
    log: PathBuf,
    bin: String,
    child: Option<Child>,
}

impl RegistryProc {
    /// Writes the config of a registry under `root` (storage in `root/data`, which
    /// the caller may have mounted) and starts it.
    pub async fn spawn(bin: &str, root: &Path) -> Result<Self, String> {
        let data = root.join("data");
        fs::create_dir_all(&data).map_err(|e| format!("{}: {e}", data.display()))?;
        let addr = format!("127.0.0.1:{}", free_port()?);
        let config = root.join("config.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
                data.display()
            ),
        )
        .map_err(|e| format!("{}: {e}", config.display()))?;
        let mut r = Self {
            addr,
            data,
            log: root.join("registry.log"),
            config,
            bin: bin.to_owned(),
            child: None,
        };
        r.start().await?;
        Ok(r)
    }

    /// Starts the process and waits until its port accepts connections.
    pub async fn start(&mut self) -> Result<(), String> {
        if self.child.is_some() {
            return Ok(());
        }
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("{}: {e}", self.log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(&self.bin)
            .arg("serve")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .process_group(0)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", self.bin))?;
        record_pid(&self.log, child.id());
        self.child = Some(child);
        let addr = self.addr.clone();
        poll(Duration::from_secs(15), "registry listening", async || {
            TcpStream::connect(&addr)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        })
        .await
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The repository directory of `repo` in the storage.
    pub fn repo_dir(&self, repo: &str) -> PathBuf {
        self.data.join("docker/registry/v2/repositories").join(repo)
    }

    /// The data file of blob `hex` (sha256) in the storage.
    pub fn blob_data(&self, hex: &str) -> PathBuf {
        self.data
            .join("docker/registry/v2/blobs/sha256")
            .join(hex.get(..2).unwrap_or(hex))
            .join(hex)
            .join("data")
    }
}

impl Drop for RegistryProc {
    fn drop(&mut self) {
        self.stop();
    }
}

// ------------------------------------------------------------------ TCP proxy

/// A loopback TCP proxy: forwards to a target, or (in 503 mode) answers every HTTP
/// request with `503 Service Unavailable`. Stopping it drops the listener and every
/// live connection; it listens again on the same port.
pub struct TcpProxy {
    /// The port it listens on.
    pub port: u16,
    target: String,
    fail: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

/// The answer of a proxy in 503 mode.
const ANSWER_503: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 20\r\nConnection: close\r\n\r\nbr2k-faults: 503 :)\n";

impl TcpProxy {
    /// A proxy to `target` (`host:port`) on a free loopback port.
    pub async fn start(target: &str) -> Result<Self, String> {
        let mut p = Self {
            port: free_port()?,
            target: target.to_owned(),
            fail: Arc::default(),
            accept: None,
            conns: Arc::default(),
        };
        p.resume().await?;
        Ok(p)
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Switches the 503 mode; live connections are dropped either way, so that no
    /// keep-alive connection outlives the switch.
    pub async fn set_failing(&mut self, fail: bool) {
        self.fail.store(fail, Ordering::SeqCst);
        self.drop_conns().await;
    }

    /// Listens again on the same port (retrying while the port is still taken).
    pub async fn resume(&mut self) -> Result<(), String> {
        if self.accept.is_some() {
            return Ok(());
        }
        let addr: std::net::SocketAddr = self.addr().parse().map_err(|e| format!("{e}"))?;
        let listener = poll(Duration::from_secs(10), "proxy port free", async || {
            let s = TcpSocket::new_v4().map_err(|e| e.to_string())?;
            s.set_reuseaddr(true).map_err(|e| e.to_string())?;
            s.bind(addr).map_err(|e| e.to_string())?;
            s.listen(1024).map_err(|e| e.to_string())
        })
        .await?;
        let target = self.target.clone();
        let conns = self.conns.clone();
        let fail = self.fail.clone();
        self.accept = Some(tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                let failing = fail.load(Ordering::SeqCst);
                let conn = tokio::spawn(async move {
                    if failing {
                        answer_503(&mut inbound).await;
                    } else if let Ok(mut outbound) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                let mut c = conns.lock().unwrap_or_else(|e| e.into_inner());
                c.retain(|t| !t.is_finished());
                c.push(conn);
            }
        }));
        Ok(())
    }

    /// Drops the listener and every live connection, and waits until they are gone.
    pub async fn stop(&mut self) {
        if let Some(a) = self.accept.take() {
            a.abort();
            let _ = a.await;
        }
        self.drop_conns().await;
    }

    async fn drop_conns(&mut self) {
        let conns: Vec<JoinHandle<()>> = self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        for c in conns {
            c.abort();
            let _ = c.await;
        }
    }
}

/// Reads one request head (up to 64 KiB or 5 s) and answers 503.
async fn answer_503(s: &mut TcpStream) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read_head = async {
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 64 * 1024 {
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        true
    };
    if tokio::time::timeout(Duration::from_secs(5), read_head)
        .await
        .unwrap_or(false)
    {
        let _ = s.write_all(ANSWER_503).await;
        let _ = s.shutdown().await;
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        if let Some(a) = self.accept.take() {
            a.abort();
        }
        for c in self
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            c.abort();
        }
    }
}

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

// ------------------------------------------------------------------ iptables

/// DROP rules in the INPUT chain for loopback traffic of one port; removed on
/// [`IptablesDrop::remove`] and on drop.
pub struct IptablesDrop {
    rules: Vec<Vec<String>>,
    /// The rules, one a line, written before they are inserted (see [`clean_stale`]).
    record: PathBuf,
}

impl IptablesDrop {
    /// Drops packets to `port` (`both`: also from it) on loopback; the rules are
    /// written to file `record` first.
    pub fn install(port: u16, both: bool, tag: &str, record: &Path) -> Result<Self, String> {
        let rule = |dir: &str| -> Vec<String> {
            [
                "-i",
                "lo",
                "-p",
                "tcp",
                dir,
                &port.to_string(),
                "-m",
                "comment",
                "--comment",
                tag,
                "-j",
                "DROP",
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect()
        };
        let mut me = Self {
            rules: Vec::new(),
            record: record.to_owned(),
        };
        let dirs: &[&str] = if both {
            &["--dport", "--sport"]
        } else {
            &["--dport"]
        };
        let lines: Vec<String> = dirs.iter().map(|d| rule(d).join(" ")).collect();
        fs::write(record, lines.join("\n") + "\n")
            .map_err(|e| format!("{}: {e}", record.display()))?;
        for dir in dirs {
            let r = rule(dir);
            let mut args = vec!["-w", "-I", "INPUT"];
            args.extend(r.iter().map(String::as_str));
            run("iptables", &args)?; // `me` drops what was installed so far
            me.rules.push(r);
        }
        Ok(me)
    }

    /// Removes every rule this guard installed; the error names the ones left.
    pub fn remove(&mut self) -> Result<(), String> {
        let mut left = Vec::new();
        for r in self.rules.drain(..) {
            let mut args = vec!["-w", "-D", "INPUT"];
            args.extend(r.iter().map(String::as_str));
            if let Err(e) = run("iptables", &args) {
                left.push(e);
            }
        }
        if left.is_empty() {
            let _ = fs::remove_file(&self.record);
            Ok(())
        } else {
            Err(left.join("; "))
        }
    }
}

impl Drop for IptablesDrop {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!("[faults/operator] iptables cleanup: {e}");
        }
    }
}

// ------------------------------------------------------------------ tmpfs

/// A tmpfs mounted at a directory, unmounted on drop.
pub struct Tmpfs {
    /// The mount point.
    pub dir: PathBuf,
    mounted: bool,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`mount -o size=`, e.g. `16m`) at `dir`.
    pub fn mount(dir: &Path, size: &str) -> Result<Self, String> {
        fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let d = dir.to_string_lossy().into_owned();
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "br2k-faults",
                &d,
            ],
        )?;
        Ok(Self {
            dir: dir.to_owned(),
            mounted: true,
        })
    }

    /// Fills the file system with file `name` until it is full; returns the bytes
    /// written.
    pub fn fill(&self, name: &str) -> Result<u64, String> {
        let path = self.dir.join(name);
        let mut f = fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let chunk = vec![0u8; 256 * 1024];
        let mut n = 0u64;
        loop {
            match f.write(&chunk) {
                Ok(0) => break,
                Ok(k) => n += k as u64,
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
                Err(e) => return Err(format!("fill {}: {e}", path.display())),
            }
        }
        let _ = f.flush();
        Ok(n)
    }

    /// Unmounts (lazily if busy).
    pub fn unmount(&mut self) {
        if !self.mounted {
            return;
        }
        let d = self.dir.to_string_lossy().into_owned();
        if run("umount", &[&d]).is_err()
            && let Err(e) = run("umount", &["-l", &d])
        {
            eprintln!("[faults/operator] umount {d}: {e}");
        }
        self.mounted = false;
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        self.unmount();
    }
}

// ------------------------------------------------------------------ kwok control plane

/// The pid file of component `name` of the kwok cluster `$BR2K_KWOK_CLUSTER` (under
/// `$KWOK_WORKDIR`).
fn kwok_pid_file(name: &str) -> Result<PathBuf, String> {
    let workdir = env("KWOK_WORKDIR")?;
    let cluster = env("BR2K_KWOK_CLUSTER")?;
    Ok(Path::new(&workdir)
        .join("clusters")
        .join(&cluster)
        .join("pids")
        .join(format!("{name}.pid")))
}

/// The pid in `pid_file`.
fn read_pid(pid_file: &Path) -> Result<u32, String> {
    fs::read_to_string(pid_file)
        .map_err(|e| format!("{}: {e}", pid_file.display()))?
        .trim()
        .parse()
        .map_err(|e| format!("{}: {e}", pid_file.display()))
}

/// Whether process `pid` runs (a zombie does not).
fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'))
    })
}

/// What it takes to start a kwok component again as kwokctl started it: its
/// command line, working directory and log, read from `/proc`.
#[derive(Clone)]
struct ProcImage {
    name: String,
    pid_file: PathBuf,
    argv: Vec<String>,
    cwd: PathBuf,
    log: PathBuf,
}

impl ProcImage {
    /// Reads component `name` (its pid file names a running process).
    fn capture(name: &str) -> Result<(Self, u32), String> {
        let pid_file = kwok_pid_file(name)?;
        let pid = read_pid(&pid_file)?;
        let proc_dir = PathBuf::from(format!("/proc/{pid}"));
        let cmdline =
            fs::read(proc_dir.join("cmdline")).map_err(|e| format!("{name} {pid}: {e}"))?;
        let argv: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if !argv.first().is_some_and(|a| a.ends_with(name)) {
            return Err(format!("pid {pid} of {} is {argv:?}", pid_file.display()));
        }
        let cwd = fs::read_link(proc_dir.join("cwd")).map_err(|e| e.to_string())?;
        let log = fs::read_link(proc_dir.join("fd/2"))
            .unwrap_or_else(|_| cwd.join(format!("logs/{name}.log")));
        Ok((
            Self {
                name: name.to_owned(),
                pid_file,
                argv,
                cwd,
                log,
            },
            pid,
        ))
    }

    /// Starts it again (its own process group, so it outlives this process like
    /// kwokctl's; a thread reaps it when it exits) and records its pid in the pid
    /// file, where `scripts/stack down` finds it; returns the pid.
    fn spawn(&self) -> Result<u32, String> {
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("{}: {e}", self.log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let mut child = Command::new(&self.argv[0])
            .args(&self.argv[1..])
            .current_dir(&self.cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .process_group(0)
            .spawn()
            .map_err(|e| format!("start {}: {e}", self.argv[0]))?;
        let pid = child.id();
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        // Digits only, as kwokctl writes it: kwokctl does not parse "PID\n", and
        // `kwokctl delete cluster` (scripts/stack down) then left the process running.
        fs::write(&self.pid_file, pid.to_string())
            .map_err(|e| format!("{}: {e}", self.pid_file.display()))?;
        Ok(pid)
    }
}

/// Restarts the kwok cluster's kube-scheduler, kube-controller-manager and
/// kwok-controller when one exits, as the kubelet (static pods) or systemd does on a
/// real control plane. The scheduler exits on purpose when it finds its cache
/// corrupted, which an API-server restart can cause ("Pod updated on a different node
/// than previously added to"); kwokctl's binary runtime restarts nothing, so the
/// cluster scheduled no pod after that. Stops on drop.
pub struct ControlPlaneSupervisor {
    task: JoinHandle<()>,
    restarts: Arc<Mutex<Vec<String>>>,
}

/// The components [`ControlPlaneSupervisor`] keeps running (the API server is the
/// fault's own business: see [`KilledApiserver`]).
const SUPERVISED: [&str; 3] = [
    "kube-scheduler",
    "kube-controller-manager",
    "kwok-controller",
];

impl ControlPlaneSupervisor {
    /// Reads the components (each must run now) and starts watching them.
    pub fn start() -> Result<Self, String> {
        let images: Vec<ProcImage> = SUPERVISED
            .iter()
            .map(|n| ProcImage::capture(n).map(|(i, _)| i))
            .collect::<Result<_, _>>()?;
        let restarts: Arc<Mutex<Vec<String>>> = Arc::default();
        let log = restarts.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                for img in &images {
                    let old = match read_pid(&img.pid_file) {
                        Ok(pid) if alive(pid) => continue,
                        Ok(pid) => pid.to_string(),
                        Err(e) => e,
                    };
                    let line = match img.spawn() {
                        Ok(pid) => {
                            format!("{} exited (pid {old}), restarted as pid {pid}", img.name)
                        }
                        Err(e) => format!("{} exited (pid {old}), restart failed: {e}", img.name),
                    };
                    eprintln!("[faults/operator] {line}");
                    log.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                }
            }
        });
        Ok(Self { task, restarts })
    }

    /// The restarts so far, and forgets them.
    pub fn take_restarts(&self) -> Vec<String> {
        std::mem::take(&mut *self.restarts.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Drop for ControlPlaneSupervisor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ------------------------------------------------------------------ kube-apiserver

/// The kwok cluster's kube-apiserver, killed: what it takes to start it again with
/// the same command line, working directory and log. Dropping it starts it again.
pub struct KilledApiserver {
    image: ProcImage,
    restarted: bool,
}

impl KilledApiserver {
    /// SIGKILLs the kube-apiserver of cluster `$BR2K_KWOK_CLUSTER` (pid file under
    /// `$KWOK_WORKDIR`) and waits until it is gone.
    pub async fn kill() -> Result<Self, String> {
        let (image, pid) = ProcImage::capture("kube-apiserver")?;
        signal(pid, "KILL")?;
        let me = Self {
            image,
            restarted: false,
        };
        poll(Duration::from_secs(10), "kube-apiserver gone", async || {
            if alive(pid) {
                Err(format!("pid {pid} still runs"))
            } else {
                Ok(())
            }
        })
        .await?;
        Ok(me)
    }

    /// Starts it again with the same command line; returns the pid.
    pub fn restart(&mut self) -> Result<u32, String> {
        if self.restarted {
            return Err("already restarted".into());
        }
        self.restarted = true;
        self.image.spawn()
    }
}

impl Drop for KilledApiserver {
    fn drop(&mut self) {
        if !self.restarted
            && let Err(e) = self.restart()
        {
            eprintln!("[faults/operator] restarting kube-apiserver: {e}");
        }
    }
}

// ------------------------------------------------------------------ leftovers

/// Writes `pid` beside `log` (`NAME.pid` for `NAME.log`), for [`clean_stale`].
fn record_pid(log: &Path, pid: u32) {
    let _ = fs::write(log.with_extension("pid"), format!("{pid}\n"));
}

/// Whether process `pid` runs a command line containing `needle`.
fn runs(pid: u32, needle: &str) -> bool {
    alive(pid)
        && fs::read(format!("/proc/{pid}/cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(needle))
}

/// Undoes what an earlier workload under `work_dir` left when its process was
/// killed without unwinding (SIGKILL, a second ^C) in its directory
/// `work_dir/operator-*`: its operator (maybe SIGSTOPped) and registry processes
/// (by the pid files they left, if the pid still runs that program), its iptables
/// rules and its tmpfs. The directory itself (logs) stays. Returns what it did and
/// the run ids of the directories (`operator-<run>`).
pub fn clean_stale(work_dir: &Path) -> (Vec<String>, Vec<String>) {
    let mut did = Vec::new();
    let mut ids = Vec::new();
    let Ok(entries) = fs::read_dir(work_dir) else {
        return (did, ids);
    };
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    for e in entries.flatten() {
        let dir = e.path();
        let id = dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("operator-"))
            .map(str::to_owned);
        let Some(id) = id.filter(|_| dir.is_dir()) else {
            continue;
        };
        ids.push(id);
        for (pid_file, needle) in [
            (dir.join("operator.pid"), "br2k-operator"),
            (dir.join("registry-primary/registry.pid"), "registry"),
            (dir.join("registry-mirror/registry.pid"), "registry"),
        ] {
            if let Ok(pid) = read_pid(&pid_file)
                && runs(pid, needle)
            {
                let _ = signal(pid, "CONT");
                let _ = signal(pid, "KILL");
                did.push(format!("killed {needle} {pid} ({})", pid_file.display()));
            }
            let _ = fs::remove_file(&pid_file);
        }
        let rule_files = fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_str()
                    .is_some_and(|n| n.starts_with("iptables") && n.ends_with(".rules"))
            });
        for f in rule_files {
            for r in fs::read_to_string(f.path())
                .unwrap_or_default()
                .lines()
                .filter(|l| !l.trim().is_empty())
            {
                let mut args = vec!["-w", "-D", "INPUT"];
                args.extend(r.split(' '));
                if run("iptables", &args).is_ok() {
                    did.push(format!("removed iptables rule {r}"));
                }
            }
            let _ = fs::remove_file(f.path());
        }
        let data = dir.join("registry-mirror/data");
        let data_s = data.to_string_lossy().into_owned();
        if mounts
            .lines()
            .any(|l| l.split(' ').nth(1) == Some(data_s.as_str()))
        {
            match run("umount", &["-l", &data_s]) {
                Ok(_) => did.push(format!("unmounted {data_s}")),
                Err(e) => did.push(format!("umount {data_s}: {e}")),
            }
        }
    }
    (did, ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waits up to 5 s for `c` to exit; whether it did.
    fn exits(c: &mut Child) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = c.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    #[test]
    fn clean_stale_kills_a_stopped_leftover_and_spares_a_reused_pid() {
        let work = tempfile::tempdir().expect("temp dir");
        let run_dir = work.path().join("operator-abc123");
        fs::create_dir_all(run_dir.join("registry-primary")).expect("dirs");
        // A registry a killed run left, SIGSTOPped.
        let mut left = Command::new("bash")
            .args(["-c", "exec -a registry sleep 60"])
            .spawn()
            .expect("spawn");
        fs::write(
            run_dir.join("registry-primary/registry.pid"),
            format!("{}\n", left.id()),
        )
        .expect("pid file");
        // Wait for the exec, then stop it.
        let t0 = Instant::now();
        while !runs(left.id(), "registry") && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
        signal(left.id(), "STOP").expect("stop");
        // The operator's pid file names a pid now used by another program.
        let mut other = Command::new("sleep").arg("60").spawn().expect("spawn");
        fs::write(run_dir.join("operator.pid"), format!("{}\n", other.id())).expect("pid file");

        let (did, ids) = clean_stale(work.path());

        let left_killed = exits(&mut left);
        let other_alive = other.try_wait().expect("try_wait").is_none();
        // Nothing of the test outlives it, whatever failed.
        for c in [&mut left, &mut other] {
            let _ = signal(c.id(), "CONT");
            let _ = c.kill();
            let _ = c.wait();
        }
        assert_eq!(ids, vec!["abc123".to_owned()]);
        assert!(left_killed, "the stopped leftover was killed: {did:?}");
        assert!(
            other_alive,
            "another program on a recorded pid is left alone: {did:?}"
        );
        assert!(
            !run_dir.join("operator.pid").exists(),
            "pid files are consumed"
        );
        assert!(run_dir.exists(), "the directory (logs) stays");
    }
}
