//! Helpers shared by the integration tests (real etcd of the local stack).
#![allow(dead_code)]

use std::time::Duration;

use br2k_etcd::{EtcdLog, EtcdLogConfig};

/// Endpoints of the stack's 3-member etcd (`BR2K_ETCD_ENDPOINTS`).
pub fn endpoints() -> Vec<String> {
    let raw = std::env::var("BR2K_ETCD_ENDPOINTS")
        .expect("BR2K_ETCD_ENDPOINTS (source .stack/env after scripts/stack up)");
    raw.split(',').map(|s| s.trim().to_owned()).collect()
}

/// A fresh random namespace.
pub fn namespace(test: &str) -> String {
    format!("br2k-test/{test}-{:016x}", rand::random::<u64>())
}

/// A config on the stack's etcd with a short lease (2 s).
pub fn config(ns: &str) -> EtcdLogConfig {
    let mut c = EtcdLogConfig::new(endpoints(), ns);
    c.lease_ttl = Duration::from_secs(2);
    c
}

/// A client of the log `ns` on the stack's etcd.
pub async fn client(ns: &str) -> EtcdLog {
    EtcdLog::connect_with(config(ns))
        .await
        .expect("connect to etcd")
}

/// A throwaway 3-member etcd cluster on free 127.0.0.1 ports, from `BR2K_ETCD_BIN`,
/// for destructive tests (never the stack's shared cluster). Killed on drop.
pub struct OwnCluster {
    dir: std::path::PathBuf,
    members: Vec<Member>,
    initial: String,
}

struct Member {
    name: String,
    client: u16,
    peer: u16,
    child: Option<std::process::Child>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

impl OwnCluster {
    /// Starts the three members and waits until the cluster is healthy.
    pub async fn start() -> Self {
        let dir =
            std::env::temp_dir().join(format!("br2k-etcd-test-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let members: Vec<Member> = (0..3)
            .map(|i| Member {
                name: format!("t{i}"),
                client: free_port(),
                peer: free_port(),
                child: None,
            })
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = Self {
            dir,
            members,
            initial,
        };
        for i in 0..3 {
            c.start_member(i, "new");
        }
        c.wait_healthy().await;
        c
    }

    /// Client endpoints of all members.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client))
            .collect()
    }

    fn start_member(&mut self, i: usize, state: &str) {
        let bin = std::env::var("BR2K_ETCD_BIN").expect("BR2K_ETCD_BIN");
        let m = &mut self.members[i];
        let log = std::fs::File::create(self.dir.join(format!("{}.log", m.name))).expect("log");
        let child = std::process::Command::new(bin)
            .args([
                "--name",
                &m.name,
                "--data-dir",
                &self.dir.join(&m.name).to_string_lossy(),
                "--listen-client-urls",
                &format!("http://127.0.0.1:{}", m.client),
                "--advertise-client-urls",
                &format!("http://127.0.0.1:{}", m.client),
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{}", m.peer),
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{}", m.peer),
                "--initial-cluster",
                &self.initial,
                "--initial-cluster-token",
                "br2k-etcd-test",
                "--initial-cluster-state",
                state,
                "--heartbeat-interval",
                "100",
                "--election-timeout",
                "1000",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn etcd");
        m.child = Some(child);
    }

    /// Kills member `i` (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Restarts member `i` with its data.
    pub async fn restart(&mut self, i: usize) {
        self.start_member(i, "existing");
        self.wait_healthy().await;
    }

    /// Waits until every running member answers a linearizable read.
    pub async fn wait_healthy(&self) {
        let eps: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| format!("http://127.0.0.1:{}", m.client))
            .collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        for ep in eps {
            loop {
                let ok = async {
                    let mut c = etcd_client::Client::connect([ep.as_str()], None)
                        .await
                        .ok()?;
                    tokio::time::timeout(Duration::from_secs(2), c.get("health", None))
                        .await
                        .ok()?
                        .ok()
                }
                .await
                .is_some();
                if ok {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "own etcd member {ep} not healthy"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
