//! The ledger workload's processes: the contracts deployed on the stack's anvil
//! (`ledger setup`), 3 `ledger serve` replicas (each reaching every etcd member through a
//! proxy of its own, so one replica can be partitioned from etcd), a snapshot registry
//! of our own (Distribution on a small tmpfs, behind a proxy that can refuse or answer
//! 5xx), and the HTTP client that follows redirects to the leader.
//!
//! Anvil accounts: the ledger uses the well-known dev accounts 5 (owner), 6-8
//! (replicas) and 9 (settler); 0-4 are left to the operator workload.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use alloy::primitives::{Address, B256};
use alloy::providers::{Provider, ProviderBuilder};
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::SolCall;
use br2k_ledger::settle::Settlement;
use serde_json::Value;

use crate::procs;
use crate::proxy::{Mode, Proxy};

mod client;
mod registry;
mod replica;

pub use client::{Client, Reply, passing};
pub use registry::SnapshotRegistry;
pub use replica::ReplicaProc;

use client::http;

/// Keys of anvil's dev accounts 5-9 (mnemonic `test test ... junk`).
const OWNER_KEY: &str = "8b3a350cf5c34c9194ca85829a2df0ec3153be0318b5e2d3348e872092edffba";
const REPLICA_KEYS: [&str; 3] = [
    "92db14e403b83dfe3df233f83dfa3a0d7096f21ca9b0d6d6b8d88b2b4ec1564e",
    "4bbbf85ce3377467afe5d46f804f221813b2bb87f24d81f60f1fcdbf7cbf4356",
    "dbda1821b80551c9d65939329250298aa3472ba22feea921c0cf5d620ea67b97",
];
const SETTLER_KEY: &str = "2a871d0798f97d79848a013d4936a73bf4cc922c825d33c1cf7073dff6d409c6";

/// Election timeout of the replicas (etcd lease TTL), seconds.
pub const LEASE_TTL_SECS: u64 = 2;
/// A snapshot every this many log entries (several per run, so registry faults hit
/// snapshot pushes).
pub const SNAPSHOT_EVERY: u64 = 100;
/// Size of the snapshot registry's tmpfs.
const REGISTRY_TMPFS: &str = "256m";

/// Where `libfaketime` is (Debian's `faketime` package).
pub const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

fn address_of(key: &str) -> Result<Address, String> {
    let s: PrivateKeySigner = key.parse().map_err(|e| format!("key: {e}"))?;
    Ok(s.address())
}

/// The private stack, from `$BR2K_STACK_DIR/env`.
#[derive(Debug, Clone)]
pub struct Stack {
    /// `BR2K_STACK_DIR`.
    pub dir: PathBuf,
    /// Every variable of the env file.
    pub vars: HashMap<String, String>,
}

impl Stack {
    /// Reads `<dir>/env`.
    pub fn open(dir: &Path) -> Result<Self, String> {
        let file = dir.join("env");
        let text =
            std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
        let vars = text
            .lines()
            .filter_map(|l| l.strip_prefix("export "))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.trim_matches('\'').to_owned()))
            .collect();
        Ok(Self {
            dir: dir.to_owned(),
            vars,
        })
    }

    /// A variable of the env file.
    pub fn var(&self, name: &str) -> Result<&str, String> {
        self.vars
            .get(name)
            .map(String::as_str)
            .ok_or_else(|| format!("{name} is not in {}/env", self.dir.display()))
    }

    /// The anvil RPC URL.
    pub fn rpc(&self) -> Result<String, String> {
        Ok(self
            .var("BR2K_RPC_URLS")?
            .split(',')
            .next()
            .unwrap_or("")
            .to_owned())
    }

    /// The etcd members' client addresses.
    pub fn etcd(&self) -> Result<Vec<SocketAddr>, String> {
        self.var("BR2K_ETCD_ENDPOINTS")?
            .split(',')
            .map(|u| {
                u.trim_start_matches("http://")
                    .parse()
                    .map_err(|e| format!("etcd endpoint {u}: {e}"))
            })
            .collect()
    }
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("free port: {e}"))
}

fn wait_port(addr: &str, within: Duration) -> Result<(), String> {
    let start = Instant::now();
    while std::net::TcpStream::connect(addr).is_err() {
        if start.elapsed() > within {
            return Err(format!("{addr} does not accept connections"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// One ledger service: its contracts, etcd namespace, replicas.
pub struct World {
    /// Service id.
    pub service: String,
    namespace: String,
    registry_address: String,
    /// The `Settlement` contract.
    pub settlement: Address,
    /// First block of this world (settlements are scanned from there).
    pub first_block: u64,
    rpc: String,
    etcd_proxies: Vec<Vec<Proxy>>,
    oci: String,
    dir: PathBuf,
    ledger_bin: PathBuf,
    /// The replicas.
    pub replicas: Vec<ReplicaProc>,
    /// The replica that last gave a final answer.
    last: Arc<Mutex<usize>>,
    /// Replicas started so far (log file names).
    spawned: usize,
}

impl World {
    /// Deploys the contracts of a new service and starts 3 replicas.
    pub async fn start(
        stack: &Stack,
        ledger_bin: &Path,
        oci: &SnapshotRegistry,
        dir: &Path,
        name: &str,
    ) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let rpc = stack.rpc()?;
        let p = ProviderBuilder::new().connect_http(rpc.parse().map_err(|e| format!("{e}"))?);
        let first_block = p
            .get_block_number()
            .await
            .map_err(|e| format!("anvil: {e}"))?;
        let (registry_address, settlement) = setup_service(ledger_bin, &rpc, name)?;
        let mut etcd_proxies = Vec::new();
        for _ in 0..3 {
            etcd_proxies.push(Proxy::start_group(&stack.etcd()?).await?);
        }
        let mut w = Self {
            service: name.to_owned(),
            namespace: format!("faults-{name}"),
            registry_address,
            settlement,
            first_block,
            rpc,
            etcd_proxies,
            oci: oci.proxy.addr.to_string(),
            dir: dir.to_owned(),
            ledger_bin: ledger_bin.to_owned(),
            replicas: Vec::new(),
            last: Arc::new(Mutex::new(0)),
            spawned: 0,
        };
        for slot in 0..3 {
            let port = free_port()?;
            let r = w.spawn(slot, port, None)?;
            w.replicas.push(r);
        }
        Ok(w)
    }

    /// The etcd proxies' ports of replica `slot`.
    pub fn etcd_ports(&self, slot: usize) -> Vec<u16> {
        self.etcd_proxies[slot]
            .iter()
            .map(|p| p.addr.port())
            .collect()
    }

    /// Sets the mode of replica `slot`'s etcd proxies (one group).
    pub fn set_etcd_mode(&self, slot: usize, mode: Mode) {
        self.etcd_proxies[slot][0].set(mode);
    }

    /// Every etcd proxy that does not pass passes again (cutting its muted connections).
    pub fn pass_etcd(&self) {
        for p in self.etcd_proxies.iter().flatten() {
            if p.mode() != Mode::Pass {
                p.set(Mode::Pass);
            }
        }
    }

    fn spawn(&mut self, slot: usize, port: u16, skew: Option<&str>) -> Result<ReplicaProc, String> {
        self.spawned += 1;
        let log = self
            .dir
            .join(format!("replica-{slot}-{}.log", self.spawned));
        let mut cmd = serve_command(
            &self.ledger_bin,
            &Serve {
                rpc: &self.rpc,
                registry_address: &self.registry_address,
                slot,
                etcd: &self.etcd_proxies[slot],
                oci: &self.oci,
                settlement: self.settlement,
                service: &self.service,
                namespace: &self.namespace,
                port,
            },
            &log,
        )?;
        if let Some(offset) = skew {
            // libfaketime: every clock the process reads (realtime and monotonic) is
            // shifted by `offset`; the kernel, etcd and anvil keep the true time.
            cmd.env("LD_PRELOAD", LIBFAKETIME)
                .env("FAKETIME", offset)
                .env("FAKETIME_NO_CACHE", "1");
        }
        let child = cmd.spawn().map_err(|e| format!("spawn ledger: {e}"))?;
        Ok(ReplicaProc {
            slot,
            port,
            url: format!("http://127.0.0.1:{port}"),
            log,
            child: Some(child),
            stopped: false,
            skew: skew.map(str::to_owned),
        })
    }

    /// Starts replica `slot` again (same port), killing it first if it runs;
    /// `skew` runs it under libfaketime.
    pub fn restart(&mut self, slot: usize, skew: Option<&str>) -> Result<(), String> {
        self.replicas[slot].resume()?;
        self.replicas[slot].kill();
        let port = self.replicas[slot].port;
        let r = self.spawn(slot, port, skew)?;
        // The old value's drop is a no-op: it is already killed.
        self.replicas[slot] = r;
        Ok(())
    }

    /// The replicas' URLs.
    pub fn urls(&self) -> Vec<String> {
        self.replicas.iter().map(|r| r.url.clone()).collect()
    }

    /// A client of this world.
    pub fn client(&self) -> Client {
        Client {
            http: http(),
            urls: self.urls(),
            last: self.last.clone(),
        }
    }

    /// Settlement transactions on chain since the world started, by settlement key.
    pub async fn settlement_txs(&self) -> Result<BTreeMap<B256, u32>, String> {
        settlement_txs(&self.rpc, self.settlement, self.first_block).await
    }

    /// The contract's settlement counter.
    pub async fn settled_count(&self) -> Result<u64, String> {
        let p = ProviderBuilder::new().connect_http(self.rpc.parse().map_err(|e| format!("{e}"))?);
        let c = Settlement::new(self.settlement, &p);
        c.count()
            .call()
            .await
            .map(|n| n.saturating_to())
            .map_err(|e| e.to_string())
    }

    /// The replicas' log tails.
    pub fn logs(&self, n: usize) -> String {
        self.replicas
            .iter()
            .map(|r| format!("--- replica {} ({})\n{}", r.slot, r.url, r.tail(n)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Deploys the contracts of service `name` with `ledger setup` (owner: dev account 5,
/// replicas 6-8, settler 9); returns the ServiceRegistry and Settlement addresses.
pub fn setup_service(
    ledger_bin: &Path,
    rpc: &str,
    name: &str,
) -> Result<(String, Address), String> {
    let accounts: Vec<String> = REPLICA_KEYS
        .iter()
        .map(|k| address_of(k).map(|a| format!("{a:#x}")))
        .collect::<Result<_, _>>()?;
    let out = Command::new(ledger_bin)
        .args(["setup", "--service", name, "--replica-accounts"])
        .arg(accounts.join(","))
        .arg("--settler")
        .arg(format!("{:#x}", address_of(SETTLER_KEY)?))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("BR2K_RPC_URLS", rpc)
        .env("BR2K_PRIVATE_KEY", OWNER_KEY)
        .env("RUST_LOG", "warn")
        .output()
        .map_err(|e| format!("ledger setup: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ledger setup: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let vars: HashMap<String, String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let get = |k: &str| {
        vars.get(k)
            .cloned()
            .ok_or_else(|| format!("ledger setup printed no {k}"))
    };
    let settlement = get("LEDGER_SETTLEMENT_ADDRESS")?
        .parse()
        .map_err(|e| format!("settlement address: {e}"))?;
    Ok((get("BR2K_REGISTRY_ADDRESS")?, settlement))
}

/// Where one `ledger serve` replica runs and what it talks to.
pub struct Serve<'a> {
    /// The anvil RPC URL.
    pub rpc: &'a str,
    /// The ServiceRegistry contract.
    pub registry_address: &'a str,
    /// Which replica key (0-2) it signs checkpoints and its location with.
    pub slot: usize,
    /// The proxies it reaches the etcd members through.
    pub etcd: &'a [Proxy],
    /// The snapshot registry (`host:port`).
    pub oci: &'a str,
    /// The Settlement contract.
    pub settlement: Address,
    /// The service id.
    pub service: &'a str,
    /// The etcd namespace of its log.
    pub namespace: &'a str,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

/// The command starting a `ledger serve` replica (stderr to `log`); the caller may
/// add environment (libfaketime, `LEDGER_CLUSTER`).
pub fn serve_command(bin: &Path, s: &Serve<'_>, log: &Path) -> Result<Command, String> {
    let mut cmd = Command::new(bin);
    cmd.arg("serve")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env(
            "RUST_LOG",
            std::env::var("BR2K_FAULTS_LEDGER_LOG").unwrap_or_else(|_| "info".into()),
        )
        .env("BR2K_RPC_URLS", s.rpc)
        .env("BR2K_REGISTRY_ADDRESS", s.registry_address)
        .env(
            "BR2K_PRIVATE_KEY",
            REPLICA_KEYS[s.slot % REPLICA_KEYS.len()],
        )
        .env(
            "BR2K_ETCD_ENDPOINTS",
            s.etcd
                .iter()
                .map(|p| format!("http://{}", p.addr))
                .collect::<Vec<_>>()
                .join(","),
        )
        .env("LEDGER_OCI_REGISTRY", s.oci)
        .env("LEDGER_SETTLER_KEY", SETTLER_KEY)
        .env("LEDGER_SETTLEMENT_ADDRESS", format!("{:#x}", s.settlement))
        .env("LEDGER_SERVICE", s.service)
        .env("LEDGER_NAMESPACE", s.namespace)
        .env("LEDGER_LISTEN", format!("127.0.0.1:{}", s.port))
        .env("LEDGER_SNAPSHOT_EVERY", SNAPSHOT_EVERY.to_string())
        .env("LEDGER_LEASE_TTL_SECS", LEASE_TTL_SECS.to_string())
        .env("LEDGER_REQUEST_TIMEOUT_MS", "5000")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).map_err(|e| e.to_string())?);
    Ok(cmd)
}

/// Settlement transactions to `settlement` in blocks `first_block..=head`, counted
/// by settlement key (reverted ones included).
pub async fn settlement_txs(
    rpc: &str,
    settlement: Address,
    first_block: u64,
) -> Result<BTreeMap<B256, u32>, String> {
    let p = ProviderBuilder::new().connect_http(rpc.parse().map_err(|e| format!("{e}"))?);
    let head = p.get_block_number().await.map_err(|e| e.to_string())?;
    let mut seen = BTreeMap::new();
    for n in first_block..=head {
        let block = p
            .get_block_by_number(n.into())
            .full()
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("block {n} missing"))?;
        for tx in block.transactions.txns() {
            use alloy::consensus::Transaction as _;
            if tx.to() != Some(settlement) {
                continue;
            }
            let call = Settlement::settleCall::abi_decode(tx.input())
                .map_err(|e| format!("a transaction to Settlement that is no settle: {e}"))?;
            *seen.entry(call.key).or_insert(0) += 1;
        }
    }
    Ok(seen)
}
