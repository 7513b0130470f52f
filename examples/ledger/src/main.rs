//! `ledger`: one replica of the example ledger service, or the one-time setup of a
//! ledger service on chain. See the crate README.

use std::process::ExitCode;
use std::sync::Arc;

use alloy::primitives::Address;
use br2k_chain::{ChainConfig, ChainRegistry, account_of};
use br2k_core::replica::{Replica, ReplicaConfig};
use br2k_core::{
    Digest, Error, ImageRef, Registry, Repository, Result, Role, ServiceId, ServiceSpec,
};
use br2k_etcd::{EtcdLog, EtcdLogConfig};
use br2k_ledger::config::{Args, ServeConfig};
use br2k_ledger::startup::{START_RETRY, retry_start};
use br2k_ledger::{App, Ledger, SettleEffect, router};
use br2k_oci::{OciConfig, OciImageStore};

const USAGE: &str = "usage:
  ledger serve [--listen ADDR] [--endpoint URL] [--service ID] [--etcd URLS]
               [--namespace NS] [--oci-registry HOST] [--settlement ADDR]
               [--snapshot-every N] [--max-body BYTES] [--request-timeout-ms MS]
               [--lease-ttl-secs S] [--cluster NAME]
  ledger setup [--service ID] [--replica-accounts 0xA,0xB,...] [--replicas N] [--settler 0xS]
Keys only from the environment: BR2K_PRIVATE_KEY[_FILE] (registry writes),
LEDGER_SETTLER_KEY[_FILE] (settlements). See examples/ledger/README.md.";

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let mut argv = std::env::args().skip(1);
    let cmd = argv.next();
    let result = match Args::parse(argv, std::env::vars()) {
        Err(e) => Err(e),
        Ok(args) => match cmd.as_deref() {
            Some("serve") => serve(&args).await,
            Some("setup") => setup(&args).await,
            _ => {
                eprintln!("{USAGE}");
                return ExitCode::from(2);
            }
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ledger: {} error: {e}", e.kind());
            ExitCode::FAILURE
        }
    }
}

fn io(e: std::io::Error) -> Error {
    Error::unavailable(format!("I/O: {e}"))
}

async fn serve(args: &Args) -> Result<()> {
    let cfg = ServeConfig::from_args(args)?;
    let chain = ChainConfig::from_env()?;
    let rpc = chain
        .rpc_urls
        .first()
        .cloned()
        .ok_or_else(|| Error::unavailable("no RPC URL"))?;
    // An etcd member restarting or the chain node busy at start is waited for (a
    // bounded time), not a reason to exit.
    let registry = retry_start("chain", START_RETRY, || {
        ChainRegistry::connect(chain.clone())
    })
    .await?;
    let store = OciImageStore::new(
        OciConfig::new(&cfg.oci_registry)?
            .with_insecure(cfg.oci_insecure)
            .with_auth_from_env("LEDGER_OCI")?,
    )?;
    let effect = SettleEffect::new(rpc, cfg.settlement, cfg.settler_key.expose())?
        .with_confirmations(cfg.settlement_confirmations);
    let mut log_cfg = EtcdLogConfig::new(cfg.etcd.clone(), cfg.namespace.clone());
    log_cfg.lease_ttl = cfg.lease_ttl;
    let log = Arc::new(
        retry_start("etcd", START_RETRY, || {
            EtcdLog::connect_with(log_cfg.clone())
        })
        .await?,
    );
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(io)?;
    let mut rc = ReplicaConfig::new(cfg.service.clone(), cfg.endpoint.clone())?;
    rc.snapshot_every = cfg.snapshot_every;
    rc.request_timeout = cfg.request_timeout;
    rc.max_command_bytes = cfg.max_body;
    if let Some(cluster) = &cfg.cluster {
        let ns = br2k_core::failover::placement_namespace(&cfg.service);
        let fence_log =
            retry_start("etcd", START_RETRY, || EtcdLog::connect(&cfg.etcd, &ns)).await?;
        rc.placement = Some(br2k_core::failover::PlacementFence {
            log: Arc::new(fence_log),
            cluster: cluster.clone(),
        });
    }
    tracing::info!(
        endpoint = %cfg.endpoint,
        service = %cfg.service.as_str(),
        registry = ?registry,
        settler = ?effect,
        "starting replica"
    );
    let (registry, store, effect) = (Arc::new(registry), Arc::new(store), Arc::new(effect));
    let replica = retry_start("replica start", START_RETRY, || {
        Replica::start(
            rc.clone(),
            Ledger::default(),
            log.clone(),
            registry.clone(),
            store.clone(),
            Some(effect.clone()),
        )
    })
    .await?;
    let replica = Arc::new(replica);
    tracing::info!(applied = replica.applied_index(), "replica joined; serving");
    let app = App {
        replica: replica.clone(),
    };
    axum::serve(listener, router(app, cfg.max_body))
        .with_graceful_shutdown(shutdown_signal())
        .await
        .map_err(io)?;
    if let Ok(r) = Arc::try_unwrap(replica) {
        r.shutdown().await;
    }
    Ok(())
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutting down");
}

/// Registers the service (idempotent), grants the replica role to the replica
/// accounts, deploys the registry and the `Settlement` contract when no address is
/// configured, and prints the addresses as environment lines.
async fn setup(args: &Args) -> Result<()> {
    let chain = ChainConfig::from_env()?;
    let rpc = chain
        .rpc_urls
        .first()
        .cloned()
        .ok_or_else(|| Error::unavailable("no RPC URL"))?;
    let registry = match chain.registry_address {
        Some(_) => ChainRegistry::connect(chain).await?,
        None => ChainRegistry::deploy(chain).await?,
    };
    let service = ServiceId::new(
        args.get("service", "LEDGER_SERVICE")
            .unwrap_or_else(|| "ledger".into()),
    )?;
    let replicas: u32 = args
        .get("replicas", "LEDGER_REPLICAS")
        .map_or(Ok(3), |v| v.parse())
        .map_err(|e| br2k_core::ValidationError::malformed("replicas", e))?;
    // The recorded image is this very binary, pinned by its sha256.
    let exe = std::env::current_exe().map_err(io)?;
    let digest = Digest::of(&std::fs::read(&exe).map_err(io)?);
    let host = args
        .env("BR2K_OCI_REGISTRIES")
        .and_then(|v| v.split(',').next().map(str::to_owned))
        .unwrap_or_else(|| "127.0.0.1:5000".into());
    let image = ImageRef::new(
        &host,
        Repository::new("br2k/ledger")?,
        Some(env!("CARGO_PKG_VERSION")),
        Some(digest),
    )?;
    let spec = ServiceSpec::new(image, replicas)?;
    match registry.register(&service, &spec).await {
        Ok(_) | Err(Error::AlreadyExists { .. }) => {}
        Err(e) => return Err(e),
    }
    if let Some(list) = args.get("replica-accounts", "LEDGER_REPLICA_ACCOUNTS") {
        for a in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let addr: Address = a
                .parse()
                .map_err(|e| br2k_core::ValidationError::malformed("replica account", e))?;
            registry
                .grant(&service, &account_of(addr), Role::Replica)
                .await?;
        }
    }
    let settlement = match args.get("settlement", "LEDGER_SETTLEMENT_ADDRESS") {
        Some(a) => a
            .parse()
            .map_err(|e| br2k_core::ValidationError::malformed("settlement address", e))?,
        None => {
            let key = args.secret("BR2K_PRIVATE_KEY")?.ok_or_else(|| {
                br2k_core::ValidationError::malformed(
                    "owner key",
                    "set BR2K_PRIVATE_KEY or BR2K_PRIVATE_KEY_FILE",
                )
            })?;
            // Only the settler's account may settle (default: the owner's).
            let settler = match args.get("settler", "LEDGER_SETTLER_ACCOUNT") {
                Some(a) => Some(
                    a.parse()
                        .map_err(|e| br2k_core::ValidationError::malformed("settler account", e))?,
                ),
                None => None,
            };
            SettleEffect::deploy(rpc, key.expose(), settler).await?
        }
    };
    println!("BR2K_REGISTRY_ADDRESS={:#x}", registry.address());
    println!("LEDGER_SETTLEMENT_ADDRESS={settlement:#x}");
    println!("LEDGER_SERVICE={}", service.as_str());
    Ok(())
}
