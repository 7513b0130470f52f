//! A replica started while etcd does not answer yet waits for it instead of exiting
//! (found by the fault matrix, #17: a replica restarted while an etcd member was down
//! exited with "etcd lease grant: transport error"). Needs the stack (`source
//! .stack/env`): its etcd and primary registry; spawns its own anvil.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use alloy::node_bindings::Anvil;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} unset: source .stack/env"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs stack"]
async fn a_replica_waits_for_etcd_at_start() {
    let anvil = Anvil::at(env("BR2K_ANVIL_BIN"))
        .arg("--host")
        .arg("127.0.0.1")
        .try_spawn()
        .expect("spawn anvil");
    let key = |i: usize| hex::encode(anvil.keys()[i].to_bytes());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let service = format!("startup-{}-{nanos:08x}", std::process::id());
    let out = Command::new(env!("CARGO_BIN_EXE_ledger"))
        .args(["setup", "--service", &service, "--replica-accounts"])
        .arg(format!("{:#x}", anvil.addresses()[1]))
        .arg("--settler")
        .arg(format!("{:#x}", anvil.addresses()[2]))
        .env_clear()
        .env("BR2K_RPC_URLS", anvil.endpoint())
        .env("BR2K_PRIVATE_KEY", key(0))
        .env("RUST_LOG", "warn")
        .output()
        .expect("ledger setup");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let vars: HashMap<String, String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    // etcd is reached through a port where nothing listens yet.
    let etcd_port = free_port();
    let upstream = env("BR2K_ETCD_ENDPOINTS")
        .split(',')
        .next()
        .unwrap()
        .trim_start_matches("http://")
        .to_owned();
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("replica.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ledger"))
        .arg("serve")
        .env_clear()
        .env("RUST_LOG", "info")
        .env("BR2K_RPC_URLS", anvil.endpoint())
        .env("BR2K_REGISTRY_ADDRESS", &vars["BR2K_REGISTRY_ADDRESS"])
        .env("BR2K_PRIVATE_KEY", key(1))
        .env(
            "BR2K_ETCD_ENDPOINTS",
            format!("http://127.0.0.1:{etcd_port}"),
        )
        .env(
            "LEDGER_OCI_REGISTRY",
            env("BR2K_OCI_REGISTRIES").split(',').next().unwrap(),
        )
        .env("LEDGER_SETTLER_KEY", key(2))
        .env(
            "LEDGER_SETTLEMENT_ADDRESS",
            &vars["LEDGER_SETTLEMENT_ADDRESS"],
        )
        .env("LEDGER_SERVICE", &service)
        .env("LEDGER_NAMESPACE", format!("ledger-test-{service}"))
        .env("LEDGER_LISTEN", format!("127.0.0.1:{port}"))
        .env("LEDGER_LEASE_TTL_SECS", "2")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn ledger");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let early = child.try_wait().unwrap();
    // Now etcd answers there (a TCP forwarder to the stack's first member).
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", etcd_port))
        .await
        .unwrap();
    let fwd = tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let upstream = upstream.clone();
            tokio::spawn(async move {
                if let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await {
                    let _ = tokio::io::copy_bidirectional(&mut conn, &mut up).await;
                }
            });
        }
    });
    let http = reqwest::Client::new();
    let start = Instant::now();
    let status = loop {
        if let Ok(r) = http
            .get(format!("http://127.0.0.1:{port}/status"))
            .send()
            .await
        {
            break r.json::<serde_json::Value>().await.unwrap();
        }
        let exited = child.try_wait().unwrap();
        assert!(
            early.is_none() && exited.is_none() && start.elapsed() < Duration::from_secs(60),
            "the replica exited ({early:?} {exited:?}) or never served:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(status["role"].is_string(), "{status}");
    let _ = child.kill();
    let _ = child.wait();
    fwd.abort();
}
