//! `operator`: runs the br2k operator, or prints its CRD (`--print-crd`).
//!
//! Options (all optional): `--metrics-addr 127.0.0.1:9464`, `--lease-namespace NS`
//! (default `br2k-system`), `--lease-name NAME` (default `br2k-operator`),
//! `--identity ID` (default `$POD_NAME` or the host name), `--lease-seconds N`
//! (default 15), `--resync-seconds N` (default 10), `--insecure-loopback-registries`.
//! Backends: the on-chain registry (`br2k-chain`) and OCI registries (`br2k-oci`)
//! named by each `Br2kService`.

use std::sync::Arc;
use std::time::Duration;

use br2k_operator::backends::ChainOciBackends;
use br2k_operator::controller::Context;
use br2k_operator::lease::LeaseConfig;
use br2k_operator::metrics::Metrics;
use tokio::sync::watch;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--print-crd") {
        print!("{}", br2k_operator::crd::crd_yaml());
        return Ok(());
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    br2k_k8s::install_crypto_provider();
    let client = kube::Client::try_default().await?;
    let identity = arg(&args, "--identity")
        .or_else(|| std::env::var("POD_NAME").ok())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("operator-{}", std::process::id()));
    let secs = |name: &str, default: u64| -> Result<Duration, Box<dyn std::error::Error>> {
        Ok(Duration::from_secs(match arg(&args, name) {
            Some(v) => v.parse()?,
            None => default,
        }))
    };
    let lease = LeaseConfig {
        name: arg(&args, "--lease-name").unwrap_or_else(|| "br2k-operator".into()),
        namespace: arg(&args, "--lease-namespace").unwrap_or_else(|| "br2k-system".into()),
        identity: identity.clone(),
        duration: secs("--lease-seconds", 15)?,
    };
    let metrics = Metrics::default();
    let addr = arg(&args, "--metrics-addr").unwrap_or_else(|| "127.0.0.1:9464".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    tracing::info!(%addr, "serving metrics");
    tokio::spawn(metrics.clone().serve(listener));
    let backends = Arc::new(ChainOciBackends {
        insecure_loopback: args.iter().any(|a| a == "--insecure-loopback-registries"),
        replicators: Default::default(),
    });
    let ctx = Context::new(
        client.clone(),
        backends,
        metrics,
        &identity,
        secs("--resync-seconds", 10)?,
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {},
            _ = term.recv() => {},
        }
        let _ = stop_tx.send(true);
    });
    br2k_operator::run_with_leader_election(ctx, client, lease, stop_rx).await;
    Ok(())
}
