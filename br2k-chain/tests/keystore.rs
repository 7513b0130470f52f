//! A signer from an encrypted JSON keystore whose password is read from a file: real
//! writes on a spawned anvil, and neither the key nor the password appears in `Debug`
//! output or in any log line (captured at TRACE, including alloy's own logs).

use std::io::Write;
use std::sync::{Arc, Mutex};

use alloy::node_bindings::Anvil;
use alloy::signers::local::PrivateKeySigner;
use br2k_chain::{ChainConfig, ChainRegistry, account_of};
use br2k_core::conformance::sample_spec;
use br2k_core::{Registry, ServiceId};
use tokio::net::TcpListener;

/// Collects every formatted log line in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
#[ignore = "needs stack"]
async fn keystore_signer_writes_and_never_shows_key_or_password() {
    let bin = std::env::var("BR2K_ANVIL_BIN")
        .expect("BR2K_ANVIL_BIN must name the anvil binary (source .stack/env)");
    let node = Anvil::at(bin)
        .arg("--host")
        .arg("127.0.0.1")
        .try_spawn()
        .expect("spawn anvil");
    // Installed after the spawn: alloy's anvil launcher traces anvil's banner, which
    // lists the test accounts' keys (the harness, not br2k, prints those).
    let logs = Captured::default();
    let sink = logs.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .init();
    let deployer = ChainRegistry::deploy(
        ChainConfig::new(vec![node.endpoint_url()])
            .with_private_key(hex::encode(node.keys()[0].to_bytes())),
    )
    .await
    .expect("deploy");

    // Account 3's key, encrypted into a keystore; the password lives in a file.
    let dir = std::env::temp_dir().join(format!(
        "br2k-keystore-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).expect("dir");
    let key_bytes = node.keys()[3].to_bytes();
    let key_hex = hex::encode(key_bytes);
    let password = format!("pw-{:016x}", rand::random::<u64>());
    let (expected, _) = PrivateKeySigner::encrypt_keystore(
        &dir,
        &mut rand08::thread_rng(),
        key_bytes,
        &password,
        Some("signer.json"),
    )
    .expect("encrypt keystore");
    let keystore = dir.join("signer.json");
    let ks_text = std::fs::read_to_string(&keystore).expect("keystore");
    assert!(
        !ks_text.contains(&key_hex),
        "keystore holds the key in clear"
    );
    let pw_file = dir.join("password");
    std::fs::write(&pw_file, format!("{password}\n")).expect("password file");

    // A closed first endpoint, so the failover path logs too.
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = l.local_addr().expect("addr").port();
        drop(l);
        format!("http://127.0.0.1:{port}").parse().expect("url")
    };
    let config = ChainConfig::new(vec![closed, node.endpoint_url()])
        .with_registry(deployer.address())
        .with_keystore_password_file(&keystore, &pw_file)
        .expect("config");
    let signer = ChainRegistry::connect(config.clone())
        .await
        .expect("connect");
    assert_eq!(signer.account(), account_of(expected.address()));

    // Real writes, signed by the keystore key: register makes it the owner.
    let id = ServiceId::new(format!("keystore-{:08x}", rand::random::<u32>())).expect("id");
    signer
        .register(&id, &sample_spec("ks.local"))
        .await
        .expect("register");
    let mut spec = sample_spec("ks.local");
    spec.replicas = 4;
    signer.publish(&id, &spec).await.expect("publish");
    let record = deployer.active(&id).await.expect("read back");
    assert_eq!(record.owner, account_of(expected.address()));
    assert_eq!((record.version, record.spec.replicas), (2, 4));
    let history = deployer.history(&id).await.expect("history");
    assert!(
        history
            .iter()
            .all(|v| v.publisher == account_of(expected.address()))
    );

    // A wrong password is a typed error at connect, naming no secret.
    let bad_pw = dir.join("bad-password");
    std::fs::write(&bad_pw, "not the password").expect("write");
    let err = ChainRegistry::connect(
        ChainConfig::new(vec![node.endpoint_url()])
            .with_registry(deployer.address())
            .with_keystore_password_file(&keystore, &bad_pw)
            .expect("config"),
    )
    .await
    .expect_err("wrong password");
    assert_eq!(err.kind(), br2k_core::ErrorKind::InvalidInput, "{err}");
    assert!(!err.to_string().contains("not the password"), "{err}");

    let debug = format!("{config:?} {signer:?} {err:?}");
    let logged = String::from_utf8(logs.0.lock().expect("lock").clone()).expect("utf8");
    assert!(
        logged.contains("endpoint failed"),
        "the failover was not logged: {logged:.2000}"
    );
    for (what, text) in [("Debug output", &debug), ("logs", &logged)] {
        for secret in [key_hex.as_str(), password.as_str()] {
            if let Some(i) = text.find(secret) {
                let line_start = text[..i].rfind('\n').map_or(0, |j| j + 1);
                let line: String = text[line_start..]
                    .lines()
                    .next()
                    .unwrap_or("")
                    .chars()
                    .take(300)
                    .collect();
                panic!(
                    "a secret appears in the {what}: {}",
                    line.replace(secret, "<SECRET>")
                );
            }
        }
        let upper = key_hex.to_uppercase();
        assert!(!text.contains(&upper), "the key appears in the {what}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
