//! `br2k-operator`: runs the br2k operator, or prints its CRD (`--print-crd`).
//! `br2k-operator --help` lists the options.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use br2k_core::Account;
use br2k_operator::backends::ChainOciBackends;
use br2k_operator::controller::{Context, Scope};
use br2k_operator::lease::LeaseConfig;
use br2k_operator::metrics::Metrics;
use clap::{Parser, Subcommand};
use tokio::sync::watch;

/// The br2k operator: supervises every `Br2kService` of the cluster against its
/// on-chain record (br2k-chain) and its mirrored OCI images (br2k-oci), and repairs
/// what differs. One replica leads (a Lease); the others wait.
///
/// The trust anchors (chain id, RPC endpoints, registry contract, OCI registries,
/// allowed owners) come from this configuration only, never from a resource.
// No `Debug`: the options hold RPC URLs that may carry credentials.
#[derive(Parser)]
#[command(name = "br2k-operator", version, subcommand_negates_reqs = true)]
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
    /// Trust anchor (required): the chain id every RPC endpoint must answer.
    #[arg(long, env = "BR2K_CHAIN_ID", required_unless_present = "print_crd")]
    chain_id: Option<u64>,
    /// Trust anchor (required): a JSON-RPC endpoint of the chain; repeat the option
    /// or separate with commas (tried in order). Never printed with its credentials.
    #[arg(
        long = "rpc-url",
        env = "BR2K_RPC_URLS",
        value_delimiter = ',',
        required_unless_present = "print_crd",
        hide_env_values = true
    )]
    rpc_urls: Vec<String>,
    /// Trust anchor (required): address of the ServiceRegistry contract.
    #[arg(
        long = "registry-contract",
        env = "BR2K_REGISTRY_CONTRACT",
        required_unless_present = "print_crd"
    )]
    registry_contract: Option<String>,
    /// Trust anchor (required): an OCI registry (`host:port`) holding the service
    /// images, primary first; repeat the option or separate with commas.
    #[arg(
        long = "oci-registry",
        env = "BR2K_OCI_REGISTRIES",
        value_delimiter = ',',
        required_unless_present = "print_crd"
    )]
    oci_registries: Vec<String>,
    /// Trust anchor: an account (0x address) whose services may be deployed; repeat
    /// the option or separate with commas. Without any, the operator refuses to
    /// start unless `--allow-any-owner` is given.
    #[arg(
        long = "allowed-owner",
        env = "BR2K_ALLOWED_OWNERS",
        value_delimiter = ','
    )]
    allowed_owners: Vec<String>,
    /// Deploy the services of any owner (whoever registers an id on the contract
    /// decides what runs for a resource naming it). Only for tests and demos.
    #[arg(long, env = "BR2K_ALLOW_ANY_OWNER")]
    allow_any_owner: bool,
    /// Block the records are read at: `latest`, `latest-N`, `safe` or `finalized`.
    #[arg(long, env = "BR2K_READ_DEPTH", default_value = "latest")]
    read_depth: String,
    /// RPC endpoints that must agree on a record read (block hash and answer).
    /// Default: a majority of the `--rpc-url` endpoints.
    #[arg(long, env = "BR2K_QUORUM")]
    quorum: Option<usize>,
    /// A namespace whose Br2kService resources (and workloads) the operator serves;
    /// repeat the option or separate with commas. Default: every namespace. With a
    /// list, every watch is namespaced (namespaced Roles suffice).
    #[arg(
        long = "watch-namespace",
        env = "BR2K_WATCH_NAMESPACES",
        value_delimiter = ','
    )]
    watch_namespaces: Vec<String>,
    /// A namespace other than its own that a resource may run its workload in
    /// (`spec.namespace`); repeat the option or separate with commas. Any other
    /// target is refused (`Valid=False`, reason `NamespaceNotAllowed`).
    #[arg(
        long = "allow-target-namespace",
        env = "BR2K_ALLOW_TARGET_NAMESPACES",
        value_delimiter = ','
    )]
    allowed_target_namespaces: Vec<String>,
    /// Whole-cluster failover: the name of this operator's cluster. Services whose
    /// record lists clusters run only in the one holding their placement lease; the
    /// others keep them paused. Needs `--failover-etcd` and an operator key.
    #[arg(long, env = "BR2K_CLUSTER")]
    cluster: Option<String>,
    /// etcd endpoints holding the placement leases and cluster heartbeats (the
    /// replicated log's cluster); repeat the option or separate with commas.
    #[arg(
        long = "failover-etcd",
        env = "BR2K_FAILOVER_ETCD",
        value_delimiter = ','
    )]
    failover_etcd: Vec<String>,
    /// TTL in seconds of the placement lease: how long a lost cluster blocks a
    /// takeover.
    #[arg(long, default_value_t = 5)]
    failover_lease_seconds: u64,
    /// Above this share of a service's clusters without a heartbeat, no failover
    /// happens (the brake).
    #[arg(long, default_value_t = 0.5)]
    failover_max_lost_share: f64,
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
    let mut opts = Options::parse();
    if opts.print_crd {
        print!("{}", br2k_operator::crd::crd_yaml());
        return Ok(());
    }
    if let Some(Command::PushImage {
        registries,
        tag,
        insecure,
    }) = opts.command.take()
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
    let (backends, scope) = settings(&opts)?;
    let failover_settings = match &opts.cluster {
        Some(cluster) => Some(failover_settings(cluster, &opts)?),
        None => None,
    };
    tracing::info!(backends = ?backends, scope = ?scope, "trust anchors and scope");
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
    let failover = match failover_settings {
        None => None,
        Some(settings) => {
            let cluster = settings.config.cluster.clone();
            // The key recording placements: from the environment or a file only.
            let key = operator_key()?;
            let signer =
                br2k_chain::ChainRegistry::connect(backends.chain.clone().with_private_key(key))
                    .await?;
            tracing::info!(%cluster, account = %br2k_core::Registry::account(&signer), "whole-cluster failover");
            Some(
                br2k_operator::failover::Failover::start(
                    settings,
                    client.clone(),
                    Arc::new(signer),
                )
                .await?,
            )
        }
    };
    let mut backends = backends;
    backends.placement = failover.as_ref().map(|f| f.decisions());
    let metrics = Metrics::default();
    let listener = tokio::net::TcpListener::bind(opts.metrics_addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "serving metrics");
    tokio::spawn(metrics.clone().serve(listener));
    let ctx = Context::scoped(
        client.clone(),
        Arc::new(backends),
        metrics,
        &identity,
        Duration::from_secs(opts.resync_seconds),
        scope,
    );
    if let Some(f) = failover {
        ctx.set_failover(f);
    }
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

/// The backends and scope the options configure; errors name the option, never an
/// RPC URL.
fn settings(opts: &Options) -> Result<(ChainOciBackends, Scope), Box<dyn std::error::Error>> {
    let chain_id = opts.chain_id.ok_or("--chain-id is required")?;
    let urls = br2k_chain::ChainConfig::parse_urls(&opts.rpc_urls.join(","))
        .map_err(|_| "--rpc-url: not a URL")?;
    let contract: alloy::primitives::Address = opts
        .registry_contract
        .as_deref()
        .ok_or("--registry-contract is required")?
        .trim()
        .parse()
        .map_err(|_| "--registry-contract: not a 0x-prefixed 20-byte address")?;
    let depth: br2k_chain::ReadDepth = opts
        .read_depth
        .parse()
        .map_err(|e| format!("--read-depth: {e}"))?;
    let quorum = opts.quorum.unwrap_or(urls.len() / 2 + 1);
    let chain = br2k_chain::ChainConfig::new(urls)
        .with_registry(contract)
        .with_chain_id(chain_id)
        .with_read_depth(depth)
        .with_quorum(quorum)
        .with_request_timeout(Duration::from_secs(5));
    let registries = opts
        .oci_registries
        .iter()
        .map(|r| r.trim().to_owned())
        .filter(|r| !r.is_empty())
        .collect();
    let mut backends = ChainOciBackends::new(chain, registries)?;
    backends.insecure_loopback = opts.insecure_loopback_registries;
    backends.verify_ttl = Some(Duration::from_secs(opts.verify_seconds));
    backends.allowed_owners = parse_owners(&opts.allowed_owners)?;
    match (&backends.allowed_owners, opts.allow_any_owner) {
        (None, false) => {
            return Err(
                "no --allowed-owner: give the accounts whose services may run \
                        (or --allow-any-owner to deploy every registered service)"
                    .into(),
            );
        }
        (Some(_), true) => {
            return Err("--allowed-owner and --allow-any-owner exclude each other".into());
        }
        _ => {}
    }
    let names = |flag: &str, list: &[String]| -> Result<Vec<String>, String> {
        list.iter()
            .map(|n| n.trim())
            .filter(|n| !n.is_empty())
            .map(|n| {
                let ok = n.len() <= 63
                    && n.bytes()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
                    && !n.starts_with('-')
                    && !n.ends_with('-');
                if ok {
                    Ok(n.to_owned())
                } else {
                    Err(format!("{flag} {n:?}: not a namespace name"))
                }
            })
            .collect()
    };
    let scope = Scope {
        watch_namespaces: names("--watch-namespace", &opts.watch_namespaces)?,
        allowed_target_namespaces: names(
            "--allow-target-namespace",
            &opts.allowed_target_namespaces,
        )?,
    };
    Ok((backends, scope))
}

/// The failover settings of `--cluster` and the `--failover-*` options.
fn failover_settings(
    cluster: &str,
    opts: &Options,
) -> Result<br2k_operator::failover::FailoverSettings, Box<dyn std::error::Error>> {
    let mut config =
        br2k_core::failover::FailoverConfig::new(cluster).map_err(|e| format!("--cluster: {e}"))?;
    if !(0.0..=1.0).contains(&opts.failover_max_lost_share) {
        return Err("--failover-max-lost-share: must lie in 0..=1".into());
    }
    config.max_lost_share = opts.failover_max_lost_share;
    let etcd: Vec<String> = opts
        .failover_etcd
        .iter()
        .map(|e| e.trim().to_owned())
        .filter(|e| !e.is_empty())
        .collect();
    if etcd.is_empty() {
        return Err("--cluster needs --failover-etcd (the etcd holding the leases)".into());
    }
    if opts.failover_lease_seconds == 0 {
        return Err("--failover-lease-seconds: must be at least 1".into());
    }
    Ok(br2k_operator::failover::FailoverSettings {
        config,
        etcd,
        lease_ttl: Duration::from_secs(opts.failover_lease_seconds),
    })
}

/// The key that records placements on chain (an account with the operator role on
/// the services): `BR2K_PRIVATE_KEY`, else the file named by `BR2K_PRIVATE_KEY_FILE`.
/// Never an option: command lines are visible to every user of the host.
fn operator_key() -> Result<String, Box<dyn std::error::Error>> {
    if let Ok(k) = std::env::var("BR2K_PRIVATE_KEY")
        && !k.trim().is_empty()
    {
        return Ok(k.trim().to_owned());
    }
    let path = std::env::var("BR2K_PRIVATE_KEY_FILE").map_err(
        |_| "--cluster needs the operator's key in BR2K_PRIVATE_KEY or BR2K_PRIVATE_KEY_FILE",
    )?;
    let key =
        std::fs::read_to_string(&path).map_err(|e| format!("BR2K_PRIVATE_KEY_FILE {path}: {e}"))?;
    Ok(key.trim().to_owned())
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

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &[&str] = &[
        "br2k-operator",
        "--chain-id",
        "31337",
        "--rpc-url",
        "https://user:hunter2secret@rpc.example:8545/v3/apikey123456?token=qwerty789",
        "--registry-contract",
        "0x5FbDB2315678afecb367f032d93F642f64180aa3",
        "--oci-registry",
        "127.0.0.1:5000",
    ];

    fn parse(extra: &[&str]) -> Result<Options, clap::Error> {
        Options::try_parse_from(BASE.iter().chain(extra))
    }

    #[test]
    fn no_secret_of_an_rpc_url_is_printed() {
        let opts = parse(&[
            "--allowed-owner",
            "0x70997970C51812dc3A010C7d01b50e0d17dc79C8",
        ])
        .expect("options");
        let (backends, scope) = settings(&opts).expect("settings");
        let printed = format!("{backends:?} {scope:?}");
        assert!(printed.contains("rpc.example"), "{printed}");
        for secret in ["hunter2secret", "apikey123456", "qwerty789", "user:"] {
            assert!(!printed.contains(secret), "{secret} in {printed}");
        }
    }

    #[test]
    fn several_endpoints_need_a_majority_unless_a_quorum_is_given() {
        let owner = [
            "--allowed-owner",
            "0x70997970C51812dc3A010C7d01b50e0d17dc79C8",
        ];
        let one = parse(&owner).expect("options");
        assert_eq!(settings(&one).expect("settings").0.chain.quorum, 1);
        let rpc = [
            "--rpc-url",
            "http://127.0.0.1:1",
            "--rpc-url",
            "http://127.0.0.1:2",
        ];
        let three = parse(&[&owner[..], &rpc[..]].concat()).expect("options");
        assert_eq!(settings(&three).expect("settings").0.chain.quorum, 2);
        let given =
            parse(&[&owner[..], &rpc[..], &["--quorum", "3"][..]].concat()).expect("options");
        assert_eq!(settings(&given).expect("settings").0.chain.quorum, 3);
    }

    #[test]
    fn no_allowed_owner_refuses_to_start_unless_any_owner_is_allowed() {
        let err = settings(&parse(&[]).expect("options")).expect_err("no owner");
        assert!(err.to_string().contains("--allowed-owner"), "{err}");
        assert!(settings(&parse(&["--allow-any-owner"]).expect("options")).is_ok());
        let both = parse(&[
            "--allow-any-owner",
            "--allowed-owner",
            "0x70997970C51812dc3A010C7d01b50e0d17dc79C8",
        ])
        .expect("options");
        assert!(settings(&both).is_err());
    }

    #[test]
    fn the_anchors_are_required_and_print_crd_needs_none() {
        assert!(Options::try_parse_from(["br2k-operator", "--allow-any-owner"]).is_err());
        assert!(Options::try_parse_from(["br2k-operator", "--print-crd"]).is_ok());
        let opts = parse(&[
            "--allow-any-owner",
            "--watch-namespace",
            "a,b",
            "--allow-target-namespace",
            "c",
        ])
        .expect("options");
        let (_, scope) = settings(&opts).expect("settings");
        assert_eq!(scope.watch_namespaces, ["a", "b"]);
        assert!(scope.allows_target("a", "c") && scope.allows_target("a", "a"));
        assert!(!scope.allows_target("a", "b"));
        let bad =
            parse(&["--allow-any-owner", "--watch-namespace", "Not_A_Namespace"]).expect("options");
        assert!(settings(&bad).is_err());
    }
}
