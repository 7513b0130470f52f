//! Shared pieces of the CLI's tests: the `br2k` binary run as a process with its own
//! config directory, registries and an operator process of their own, and independent
//! reads of the chain, the registries and the cluster.
//!
//! Tests against the stack need its environment (`source .stack/env`): `KUBECONFIG`,
//! `BR2K_RPC_URLS`, `BR2K_REGISTRY_BIN`, `BR2K_KUBECTL_BIN`.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Anvil dev accounts 7, 8 and 9 (no other test of the workspace signs with them).
pub const KEY7: &str = "0x4bbbf85ce3377467afe5d46f804f221813b2bb87f24d81f60f1fcdbf7cbf4356";
/// The address of [`KEY7`] (anvil's dev account 7).
pub const ACCOUNT7: &str = "0x14dc79964da2c08b23698b3d3cc7ca32193d9955";
/// Anvil dev account 8.
pub const KEY8: &str = "0xdbda1821b80551c9d65939329250298aa3472ba22feea921c0cf5d620ea67b97";
/// Anvil dev account 9.
pub const KEY9: &str = "0x2a871d0798f97d79848a013d4936a73bf4cc922c825d33c1cf7073dff6d409c6";

/// A short unique suffix.
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

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// The stack's environment.
#[derive(Debug, Clone)]
pub struct Stack {
    /// First RPC URL.
    pub rpc: String,
    /// Kubeconfig path.
    pub kubeconfig: String,
    /// kubectl binary.
    pub kubectl: String,
    /// Distribution registry binary.
    pub registry_bin: String,
}

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run `source .stack/env` (scripts/stack up) first")
    })
}

impl Stack {
    /// Reads the stack's environment.
    pub fn from_env() -> Self {
        Self {
            rpc: env("BR2K_RPC_URLS")
                .split(',')
                .next()
                .unwrap_or_default()
                .trim()
                .to_owned(),
            kubeconfig: env("KUBECONFIG"),
            kubectl: env("BR2K_KUBECTL_BIN"),
            registry_bin: env("BR2K_REGISTRY_BIN"),
        }
    }

    /// `kubectl ARGS` (exit status and stdout+stderr).
    pub fn kubectl(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .expect("run kubectl");
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    /// `kubectl ... -o json` of one object; `None` when it does not exist.
    pub fn get_json(&self, ns: &str, kind: &str, name: &str) -> Option<Value> {
        let (ok, text) = self.kubectl(&[
            "-n",
            ns,
            "get",
            kind,
            name,
            "-o",
            "json",
            "--ignore-not-found",
        ]);
        assert!(ok, "kubectl get {kind} {name}: {text}");
        if text.trim().is_empty() {
            None
        } else {
            Some(serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}")))
        }
    }

    /// Names of every object of `kind` in `ns` with their resourceVersion.
    pub fn objects(&self, ns: &str, kind: &str) -> Vec<(String, String)> {
        let (ok, text) = self.kubectl(&["-n", ns, "get", kind, "-o", "json"]);
        assert!(ok, "kubectl get {kind}: {text}");
        let v: Value = serde_json::from_str(&text).expect("json");
        let mut out: Vec<(String, String)> = v["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|o| {
                (
                    o["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    o["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                )
            })
            .collect();
        out.sort();
        out
    }

    /// The transaction count of `address`.
    pub fn nonce(&self, address: &str) -> u64 {
        self.rpc_number(&format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"eth_getTransactionCount","params":["{address}","latest"]}}"#
        ))
    }

    /// The chain id the stack's RPC endpoint serves.
    pub fn chain_id(&self) -> u64 {
        self.rpc_number(r#"{"jsonrpc":"2.0","id":1,"method":"eth_chainId","params":[]}"#)
    }

    /// The hex number a JSON-RPC request with `body` answers.
    fn rpc_number(&self, body: &str) -> u64 {
        let out = Command::new("curl")
            .args([
                "-s",
                "-H",
                "content-type: application/json",
                "-d",
                body,
                &self.rpc,
            ])
            .output()
            .expect("curl");
        let v: Value = serde_json::from_slice(&out.stdout).expect("rpc answer");
        u64::from_str_radix(
            v["result"]
                .as_str()
                .expect("result")
                .trim_start_matches("0x"),
            16,
        )
        .expect("hex")
    }
}

/// What one run of `br2k` gave.
#[derive(Debug)]
pub struct Out {
    /// Exit code.
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Out {
    /// The stdout as JSON; panics (with stderr) unless the exit code is 0.
    pub fn json(&self) -> Value {
        assert_eq!(
            self.code, 0,
            "stdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("{e}: {}\nstderr: {}", self.stdout, self.stderr))
    }

    /// Panics unless the exit code is 0.
    pub fn ok(&self) -> &Self {
        assert_eq!(
            self.code, 0,
            "stdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }
}

/// The `br2k` binary with a config directory of its own.
#[derive(Debug, Clone)]
pub struct Br2k {
    /// Config directory (`BR2K_CONFIG_DIR`).
    pub config_dir: PathBuf,
    /// Extra environment.
    pub env: Vec<(String, String)>,
}

impl Br2k {
    /// A fresh config directory under `dir`.
    pub fn new(dir: &Path) -> Self {
        let config_dir = dir.join("config");
        fs::create_dir_all(&config_dir).expect("config dir");
        Self {
            config_dir,
            env: Vec::new(),
        }
    }

    /// Adds an environment variable to every run.
    pub fn with_env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    fn command(&self, cwd: &Path, args: &[&str]) -> Command {
        let mut c = Command::new(br2k_bin());
        c.args(args)
            .current_dir(cwd)
            .env("BR2K_CONFIG_DIR", &self.config_dir)
            .env_remove("BR2K_PRIVATE_KEY")
            .env_remove("BR2K_CONTEXT")
            .env_remove("BR2K_PROGRESS")
            .stdin(Stdio::null());
        for (k, v) in &self.env {
            c.env(k, v);
        }
        c
    }

    /// Runs `br2k ARGS` in `cwd`.
    pub fn run(&self, cwd: &Path, args: &[&str]) -> Out {
        let out = self.command(cwd, args).output().expect("run br2k");
        Out {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Starts `br2k ARGS` in `cwd`; its stdout lines are collected into the returned
    /// list by a thread (stderr discarded).
    pub fn spawn_lines(
        &self,
        cwd: &Path,
        args: &[&str],
    ) -> (Child, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
        use std::io::BufRead;
        let mut child = self
            .command(cwd, args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn br2k");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let out = child.stdout.take().expect("stdout");
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        });
        (child, lines)
    }

    /// Starts `br2k ARGS` in `cwd` (output discarded).
    pub fn spawn(&self, cwd: &Path, args: &[&str]) -> Child {
        self.command(cwd, args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn br2k")
    }
}

/// Polls `check` every 50 ms until it returns `Some`, up to `timeout`.
pub fn poll<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Result<T, String>) -> T {
    let start = Instant::now();
    loop {
        match check() {
            Ok(v) => return v,
            Err(e) if start.elapsed() > timeout => panic!("{what}: not within {timeout:?}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// A Distribution registry process of its own on a loopback port.
pub struct OciRegistry {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    root: PathBuf,
    config: PathBuf,
    log: PathBuf,
    bin: String,
    child: Option<Child>,
}

impl OciRegistry {
    /// Writes a config under `dir` and starts the registry.
    pub fn spawn(bin: &str, dir: &Path, name: &str) -> Self {
        let root = dir.join(format!("registry-{name}"));
        fs::create_dir_all(&root).expect("registry dir");
        let addr = format!("127.0.0.1:{}", free_port());
        let config = root.join("config.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                root.join("data").display()
            ),
        )
        .expect("registry config");
        let mut r = Self {
            addr,
            root: root.clone(),
            log: root.join("registry.log"),
            config,
            bin: bin.to_owned(),
            child: None,
        };
        r.start();
        r
    }

    /// Starts the process and waits for its port.
    pub fn start(&mut self) {
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("registry log");
        let err = out.try_clone().expect("log");
        self.child = Some(
            Command::new(&self.bin)
                .arg("serve")
                .arg(&self.config)
                .stdin(Stdio::null())
                .stdout(Stdio::from(out))
                .stderr(Stdio::from(err))
                .spawn()
                .expect("spawn registry"),
        );
        let addr = self.addr.clone();
        poll(Duration::from_secs(15), "registry listening", || {
            std::net::TcpStream::connect(&addr)
                .map(drop)
                .map_err(|e| e.to_string())
        });
    }

    /// Kills the process.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Blob uploads started on this registry so far, read from its own access log
    /// (`POST /v2/<repo>/blobs/uploads/`; cross-repository mounts not counted).
    pub fn uploads_started(&self) -> usize {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                l.contains("\"POST /v2/") && l.contains("/blobs/uploads/") && !l.contains("mount=")
            })
            .count()
    }

    /// Tags of `repo` (empty when the repository does not exist).
    pub fn tags(&self, repo: &str) -> Vec<String> {
        let out = Command::new("curl")
            .args(["-s", &format!("http://{}/v2/{repo}/tags/list", self.addr)])
            .output()
            .expect("curl");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let mut t: Vec<String> = v["tags"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t.as_str().map(str::to_owned))
            .collect();
        t.sort();
        t
    }

    /// The repositories of the registry.
    pub fn catalog(&self) -> Vec<String> {
        let out = Command::new("curl")
            .args(["-s", &format!("http://{}/v2/_catalog", self.addr)])
            .output()
            .expect("curl");
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        v["repositories"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t.as_str().map(str::to_owned))
            .collect()
    }

    /// The data file of blob `digest` (`sha256:…`) in this registry's storage.
    pub fn blob_data(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.root
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// The manifest `digest` of `repo`, as JSON.
    pub fn manifest(&self, repo: &str, digest: &str) -> Value {
        let out = Command::new("curl")
            .args([
                "-s",
                "-H",
                "Accept: application/vnd.oci.image.manifest.v1+json",
                &format!("http://{}/v2/{repo}/manifests/{digest}", self.addr),
            ])
            .output()
            .expect("curl");
        serde_json::from_slice(&out.stdout).expect("manifest JSON")
    }

    /// Whether the manifest `digest` of `repo` is served (HTTP 200 on HEAD).
    pub fn has_manifest(&self, repo: &str, digest: &str) -> bool {
        let out = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-I",
                "-H",
                "Accept: application/vnd.oci.image.manifest.v1+json",
                &format!("http://{}/v2/{repo}/manifests/{digest}", self.addr),
            ])
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).trim() == "200"
    }
}

impl Drop for OciRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `br2k` binary: cargo's for this package's tests, else `BR2K_BIN`, else the
/// `br2k` beside the running executable (a bench binary).
pub fn br2k_bin() -> PathBuf {
    if let Some(p) = option_env!("CARGO_BIN_EXE_br2k") {
        return p.into();
    }
    if let Ok(p) = std::env::var("BR2K_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    exe.with_file_name("br2k")
}

/// The operator binary: `BR2K_OPERATOR_BIN`, else the one beside `br2k` (built on
/// demand when `cargo test -p br2k-cli` did not build it).
pub fn operator_bin() -> PathBuf {
    if let Ok(p) = std::env::var("BR2K_OPERATOR_BIN") {
        return p.into();
    }
    let bin = br2k_bin().with_file_name("br2k-operator");
    if !bin.is_file() {
        let status = Command::new(option_env!("CARGO").unwrap_or("cargo"))
            .args(["build", "-p", "br2k-operator", "--bin", "br2k-operator"])
            .status()
            .expect("cargo build br2k-operator");
        assert!(status.success(), "cargo build -p br2k-operator failed");
    }
    assert!(bin.is_file(), "{} not found", bin.display());
    bin
}

/// The operator as its own process, killed on drop.
pub struct Operator {
    child: Option<Child>,
    stack: Stack,
    /// Its lease name.
    pub lease: String,
    /// Its log file.
    pub log: PathBuf,
}

impl Operator {
    /// Deploys a new registry contract with `cli`'s context (account 7), then starts an
    /// operator whose trust anchors are that context's: the stack's chain and RPC URL,
    /// the new contract, `registries`, and account 7 as the one allowed owner (the
    /// resource `br2k deploy` writes names only the service). Also returns the
    /// `contract deploy` answer.
    pub fn start_for_context(
        stack: &Stack,
        dir: &Path,
        run: &str,
        cli: &Br2k,
        registries: &[&str],
    ) -> (Self, serde_json::Value) {
        let c = cli
            .run(dir, &["contract", "deploy", "--new", "-o", "json"])
            .json();
        let address = c["address"].as_str().expect("address").to_owned();
        let chain_id = stack.chain_id().to_string();
        let mut anchors = vec![
            "--chain-id",
            &chain_id,
            "--rpc-url",
            &stack.rpc,
            "--registry-contract",
            &address,
            "--allowed-owner",
            ACCOUNT7,
        ];
        for r in registries {
            anchors.extend(["--oci-registry", r]);
        }
        let operator = Self::start(stack, dir, run, &anchors);
        (operator, c)
    }

    /// Waits until no other operator holds a lease in `br2k-system` (every operator
    /// acts on every Br2kService of the cluster), then starts one with `anchors`
    /// (its trust anchors: chain id, RPC URL, contract, registries, owners).
    pub fn start(stack: &Stack, dir: &Path, run: &str, anchors: &[&str]) -> Self {
        no_other_operator(stack);
        let lease = format!("br2k-cli-test-{run}");
        let log = dir.join("operator.log");
        let out = fs::File::create(&log).expect("operator log");
        let err = out.try_clone().expect("log");
        let child = Command::new(operator_bin())
            .args([
                "--metrics-addr",
                &format!("127.0.0.1:{}", free_port()),
                "--lease-namespace",
                "br2k-system",
                "--lease-name",
                &lease,
                "--identity",
                &format!("cli-test-{run}"),
                "--insecure-loopback-registries",
                "--resync-seconds",
                "2",
                "--verify-seconds",
                "2",
                "--lease-seconds",
                "4",
            ])
            .args(anchors)
            .env("KUBECONFIG", &stack.kubeconfig)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("spawn operator");
        Self {
            child: Some(child),
            stack: stack.clone(),
            lease,
            log,
        }
    }

    /// SIGTERM (it releases its lease), then SIGKILL after 10 s; deletes the lease.
    pub fn terminate(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let lease = self.lease.clone();
        let stack = self.stack.clone();
        let _guard = Defer(move || {
            let _ = stack.kubectl(&[
                "-n",
                "br2k-system",
                "delete",
                "lease",
                &lease,
                "--ignore-not-found",
            ]);
        });
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }

    /// The last lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// Runs a closure when dropped.
struct Defer<F: FnMut()>(F);

impl<F: FnMut()> Drop for Defer<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits (up to 120 s) until no lease in `br2k-system` is held and fresh.
pub fn no_other_operator(stack: &Stack) {
    poll(
        Duration::from_secs(120),
        "no other operator active on the cluster",
        || {
            let (ok, text) = stack.kubectl(&["-n", "br2k-system", "get", "lease", "-o", "json"]);
            if !ok {
                return Err(text);
            }
            let v: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as i64;
            let mut active = Vec::new();
            for l in v["items"].as_array().into_iter().flatten() {
                let spec = &l["spec"];
                let holder = spec["holderIdentity"].as_str().unwrap_or_default();
                let Some(renew) = spec["renewTime"].as_str() else {
                    continue;
                };
                if holder.is_empty() {
                    continue;
                }
                let renewed = parse_rfc3339_ms(renew).unwrap_or(0);
                let ttl = spec["leaseDurationSeconds"].as_i64().unwrap_or(15) * 1000;
                if now - renewed <= ttl + 2000 {
                    active.push(format!("{} held by {holder}", l["metadata"]["name"]));
                }
            }
            if active.is_empty() {
                Ok(())
            } else {
                Err(active.join("; "))
            }
        },
    );
}

/// Milliseconds since the epoch of an RFC 3339 UTC time (`2026-12-06T05:41:13.785Z`).
fn parse_rfc3339_ms(s: &str) -> Option<i64> {
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let time = time.trim_end_matches('Z');
    let time = time.split(['+']).next()?;
    let mut t = time.split(':');
    let (hh, mm) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let sec: f64 = t.next()?.parse().ok()?;
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = if y2 >= 0 { y2 } else { y2 - 399 } / 400;
    let yoe = y2 - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + hh * 3600 + mm * 60) as f64 * 1000.0 + sec * 1000.0) as i64)
}

/// Writes a context `t` for the stack's chain, the given registries and namespace,
/// signing with the key in environment variable `key_var`.
pub fn context(cli: &Br2k, dir: &Path, rpc: &str, registries: &[&str], ns: &str, key_var: &str) {
    let mut args = vec![
        "context",
        "set",
        "t",
        "--rpc",
        rpc,
        "--namespace",
        ns,
        "--key-env",
        key_var,
        "--use",
    ];
    for r in registries {
        args.push("--oci");
        args.push(r);
    }
    cli.run(dir, &args).ok();
}

/// Installs the CRD and RBAC of `deploy/` (idempotent) and creates namespace `ns`
/// (labelled `br2k.io/test=true`).
pub fn prepare_cluster(stack: &Stack, deploy_dir: &Path, ns: &str) {
    for f in ["crd.yaml", "rbac.yaml"] {
        let (ok, text) = stack.kubectl(&[
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager",
            "br2k-cli-test",
            "-f",
            &deploy_dir.join(f).to_string_lossy(),
        ]);
        assert!(ok, "apply {f}: {text}");
    }
    for n in ["br2k-system", ns] {
        let (ok, text) = stack.kubectl(&["create", "namespace", n]);
        assert!(ok || text.contains("AlreadyExists"), "{text}");
    }
    let (ok, text) = stack.kubectl(&["label", "namespace", ns, "br2k.io/test=true", "--overwrite"]);
    assert!(ok, "{text}");
    poll(Duration::from_secs(30), "CRD served", || {
        let (ok, text) = stack.kubectl(&["get", "br2kservices", "-A"]);
        if ok { Ok(()) } else { Err(text) }
    });
}

/// Removes resource `name` (finalizers dropped: the operator may be gone) and
/// namespace `ns`.
pub fn cleanup(stack: &Stack, ns: &str, name: &str) {
    let _ = stack.kubectl(&[
        "-n",
        ns,
        "patch",
        "br2kservice",
        name,
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ]);
    let _ = stack.kubectl(&[
        "-n",
        ns,
        "delete",
        "br2kservice",
        name,
        "--wait=false",
        "--ignore-not-found",
    ]);
    let _ = stack.kubectl(&[
        "delete",
        "namespace",
        ns,
        "--wait=false",
        "--ignore-not-found",
    ]);
}
