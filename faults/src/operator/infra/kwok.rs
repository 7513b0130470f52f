//! The kwok cluster's control plane: its supervisor and a killed kube-apiserver.

use super::*;

// ------------------------------------------------------------------ kwok control plane

/// The pid file of component `name` of the kwok cluster `$BR2K_KWOK_CLUSTER` (under
/// `$KWOK_WORKDIR`).
pub(super) fn kwok_pid_file(name: &str) -> Result<PathBuf, String> {
    Ok(kwok_pid_file_in(
        &env("KWOK_WORKDIR")?,
        &env("BR2K_KWOK_CLUSTER")?,
        name,
    ))
}

/// The pid file of component `name` of kwok cluster `cluster` under `workdir`.
fn kwok_pid_file_in(workdir: &str, cluster: &str, name: &str) -> PathBuf {
    Path::new(workdir)
        .join("clusters")
        .join(cluster)
        .join("pids")
        .join(format!("{name}.pid"))
}

/// The pid in `pid_file`.
pub(super) fn read_pid(pid_file: &Path) -> Result<u32, String> {
    fs::read_to_string(pid_file)
        .map_err(|e| format!("{}: {e}", pid_file.display()))?
        .trim()
        .parse()
        .map_err(|e| format!("{}: {e}", pid_file.display()))
}

/// Whether process `pid` runs (a zombie does not).
pub(super) fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z'))
    })
}

/// What it takes to start a kwok component again as kwokctl started it: its
/// command line, working directory and log, read from `/proc`.
#[derive(Clone)]
pub(super) struct ProcImage {
    name: String,
    pid_file: PathBuf,
    argv: Vec<String>,
    cwd: PathBuf,
    log: PathBuf,
}

impl ProcImage {
    /// Reads component `name` (its pid file names a running process).
    fn capture(name: &str) -> Result<(Self, u32), String> {
        Self::capture_file(name, kwok_pid_file(name)?)
    }

    /// Reads component `name` whose pid is in `pid_file`.
    fn capture_file(name: &str, pid_file: PathBuf) -> Result<(Self, u32), String> {
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
        let (out, err) = log_pair(&self.log)?;
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
    pid_files: Vec<PathBuf>,
}

/// The components [`ControlPlaneSupervisor`] keeps running (the API server is the
/// fault's own business: see [`KilledApiserver`]).
pub(super) const SUPERVISED: [&str; 3] = [
    "kube-scheduler",
    "kube-controller-manager",
    "kwok-controller",
];

impl ControlPlaneSupervisor {
    /// Reads the components of `$BR2K_KWOK_CLUSTER` (each must run now) and starts
    /// watching them.
    pub fn start() -> Result<Self, String> {
        Self::start_in(&env("KWOK_WORKDIR")?, &env("BR2K_KWOK_CLUSTER")?)
    }

    /// Like [`ControlPlaneSupervisor::start`] for kwok cluster `cluster` under `workdir`.
    pub fn start_in(workdir: &str, cluster: &str) -> Result<Self, String> {
        let images: Vec<ProcImage> = SUPERVISED
            .iter()
            .map(|n| {
                ProcImage::capture_file(n, kwok_pid_file_in(workdir, cluster, n)).map(|(i, _)| i)
            })
            .collect::<Result<_, _>>()?;
        let restarts: Arc<Mutex<Vec<String>>> = Arc::default();
        let log = restarts.clone();
        let pid_files = images.iter().map(|i| i.pid_file.clone()).collect();
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
        Ok(Self {
            task,
            restarts,
            pid_files,
        })
    }

    /// Kills every supervised component (they start again within a second), as a
    /// control-plane node that comes back starts them afresh: after an API-server
    /// restart, a scheduler or controller manager may otherwise exit at any later
    /// moment (a corrupted cache, a lost leader election) or wait out its old lease.
    pub fn restart_all(&self) {
        for f in &self.pid_files {
            if let Ok(pid) = read_pid(f) {
                let _ = signal(pid, "KILL");
            }
        }
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
        Self::kill_image(ProcImage::capture("kube-apiserver")?).await
    }

    /// SIGKILLs the kube-apiserver of kwok cluster `cluster` under `workdir`.
    pub async fn kill_in(workdir: &str, cluster: &str) -> Result<Self, String> {
        let pid_file = kwok_pid_file_in(workdir, cluster, "kube-apiserver");
        Self::kill_image(ProcImage::capture_file("kube-apiserver", pid_file)?).await
    }

    async fn kill_image((image, pid): (ProcImage, u32)) -> Result<Self, String> {
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
