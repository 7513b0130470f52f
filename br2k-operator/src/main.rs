//! `br2k-operator`: runs the br2k operator, or prints its CRD (`--print-crd`).
//! `br2k-operator --help` lists the options.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use br2k_core::Account;
use br2k_operator::backends::ChainOciBackends;
use br2k_operator::controller::Context;
use br2k_operator::lease::LeaseConfig;
use br2k_operator::metrics::Metrics;
use clap::{Parser, Subcommand};
use tokio::sync::watch;

/// The br2k operator: supervises every `Br2kService` of the cluster against its
/// on-chain record (br2k-chain) and its mirrored OCI images (br2k-oci), and repairs
/// what differs. One replica leads (a Lease); the others wait.
#[derive(Debug, Parser)]
#[command(name = "br2k-operator", version)]
struct Options {
    /// Something else than running the operator.
    #[command(subcommand)]
    command: Option<Command>,
    /// Print the Br2kService CustomResourceDefinition as YAML and exit.
    #[arg(long)]
    print_crd: bool,
    /// Where to serve Prometheus metrics (`GET /metrics`).
    #[arg(long, env = "BR2K_METRICS_ADDR", default_value = "127.0.0.1:9464")]
    metrics_addr: SocketAddr,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "BR2K_LEASE_NAMESPACE", default_value = "br2k-system")]
    lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(long, default_value = "br2k-operator")]
    lease_name: String,
    /// This replica's identity in the Lease (default: $POD_NAME, else the host name).
    #[arg(long)]
    identity: Option<String>,
    /// Lease duration in seconds: how long a lost leader blocks a takeover.
    #[arg(long, default_value_t = 15)]
    lease_seconds: u64,
    /// Period in seconds of the check of healthy services (watch events wake a
    /// service at once in any case).
    #[arg(long, default_value_t = 10)]
    resync_seconds: u64,
    /// How long, in seconds, a verification of an image's bytes in a registry is
    /// trusted before the next check pulls and hashes them again (applies always
    /// verify anew).
    #[arg(long, default_value_t = 300)]
    verify_seconds: u64,
    /// Talk plain HTTP to OCI registries on 127.0.0.1/localhost (local stacks).
    #[arg(long)]
    insecure_loopback_registries: bool,
    /// The chain id every RPC endpoint must answer (a resource whose endpoints serve
    /// another chain is not served). Strongly recommended.
    #[arg(long, env = "BR2K_CHAIN_ID")]
    chain_id: Option<u64>,
    /// An account (0x address) whose services may be deployed; repeat the option or
    /// separate with commas. Without it, whoever registers a service id on the
    /// contract decides what runs for a resource naming that id.
    #[arg(
        long = "allowed-owner",
        env = "BR2K_ALLOWED_OWNERS",
        value_delimiter = ','
    )]
    allowed_owners: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build the operator's OCI image from this executable (no Docker) and push it
    /// to each registry; prints the digest-pinned reference for the primary.
    PushImage {
        /// A registry host to push to, primary first (repeat the option).
        #[arg(long = "registry", required = true)]
        registries: Vec<String>,
        /// Tag to push.
        #[arg(long, default_value = "dev")]
        tag: String,
        /// Plain HTTP (registries on a local stack).
        #[arg(long)]
        insecure: bool,
    },
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let opts = Options::parse();
    if opts.print_crd {
        print!("{}", br2k_operator::crd::crd_yaml());
        return Ok(());
    }
    if let Some(Command::PushImage {
        registries,
        tag,
        insecure,
    }) = opts.command
    {
        let exe = std::env::current_exe()?;
        eprintln!("building the image from {} ...", exe.display());
        let digest = br2k_operator::image::push(&exe, &registries, &tag, insecure).await?;
        for host in &registries {
            eprintln!(
                "pushed and verified {host}/{}:{tag}",
                br2k_operator::image::REPOSITORY
            );
        }
        println!(
            "{}/{}@{digest}",
            registries[0],
            br2k_operator::image::REPOSITORY
        );
        return Ok(());
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    br2k_k8s::install_crypto_provider();
    let client = kube::Client::try_default().await?;
    let identity = opts
        .identity
        .or_else(|| std::env::var("POD_NAME").ok())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| format!("operator-{}", std::process::id()));
    let lease = LeaseConfig {
        name: opts.lease_name,
        namespace: opts.lease_namespace,
        identity: identity.clone(),
        duration: Duration::from_secs(opts.lease_seconds),
    };
    let metrics = Metrics::default();
    let listener = tokio::net::TcpListener::bind(opts.metrics_addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "serving metrics");
    tokio::spawn(metrics.clone().serve(listener));
    let backends = Arc::new(ChainOciBackends {
        insecure_loopback: opts.insecure_loopback_registries,
        replicators: Default::default(),
        verify_ttl: Some(Duration::from_secs(opts.verify_seconds)),
        chain_id: opts.chain_id,
        allowed_owners: parse_owners(&opts.allowed_owners)?,
    });
    let ctx = Context::new(
        client.clone(),
        backends,
        metrics,
        &identity,
        Duration::from_secs(opts.resync_seconds),
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

/// The `--allowed-owner` accounts, each a 0x-prefixed 20-byte hex address.
fn parse_owners(values: &[String]) -> Result<Option<Vec<Account>>, Box<dyn std::error::Error>> {
    if values.is_empty() {
        return Ok(None);
    }
    values
        .iter()
        .map(|v| {
            let v = v.trim();
            let hex = v.strip_prefix("0x").unwrap_or("");
            if hex.len() == 40 && hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                Ok(Account(v.to_owned()))
            } else {
                Err(format!("--allowed-owner {v:?}: not a 0x-prefixed 20-byte address").into())
            }
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}
