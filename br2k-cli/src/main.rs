//! `br2k`: takes a service from source to a supervised deployment. See `br2k --help`.

mod chain;
mod context;
mod deploy;
mod error;
mod kube;
mod project;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use br2k_core::{Account, Recoverer, Registry, Role, ServiceId, ServiceRecord, ServiceState};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use serde_json::json;

use crate::context::{Context, ContextFile};
use crate::error::{CliError, CliResult, EXIT_OK, EXIT_USAGE, ForService};

const EXIT_CODES: &str =
    "Exit codes: 0 ok, 1 failure, 2 usage error or (diff --exit-code) a difference.

Errors are one line on stderr: the cause, then a hint.";

/// br2k: deploy a service from source to a supervised, on-chain recorded deployment.
#[derive(Debug, Parser)]
#[command(name = "br2k", version, about, after_help = EXIT_CODES, propagate_version = true)]
struct Cli {
    /// Context to use (default: the current one; see `br2k context`).
    #[arg(long, global = true, env = "BR2K_CONTEXT")]
    context: Option<String>,
    /// Output format of commands that read.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// A human table.
    Table,
    /// JSON on stdout.
    Json,
}

#[derive(Debug, clap::Args)]
struct FileArg {
    /// The project file.
    #[arg(long, short, default_value = project::FILE)]
    file: PathBuf,
}

#[derive(Debug, clap::Args)]
struct WaitArgs {
    /// Wait until the live workload matches the new record.
    #[arg(long)]
    wait: bool,
    /// Longest wait, in seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write a commented br2k.toml (and an example app/ directory) into DIR.
    #[command(after_help = EXIT_CODES)]
    Init {
        /// Directory (default: the current one).
        dir: Option<PathBuf>,
        /// Service id (default: the directory's name).
        #[arg(long)]
        service: Option<String>,
        /// Overwrite an existing br2k.toml.
        #[arg(long)]
        force: bool,
    },
    /// Named targets: chain endpoints, registry contract, OCI registries, cluster.
    #[command(subcommand, after_help = EXIT_CODES)]
    Context(ContextCmd),
    /// The ServiceRegistry contract.
    #[command(subcommand, after_help = EXIT_CODES)]
    Contract(ContractCmd),
    /// Build, push, list and verify the service image.
    #[command(subcommand, after_help = EXIT_CODES)]
    Image(ImageCmd),
    /// Build if changed, push and mirror, publish on chain, apply the Br2kService, wait
    /// until every replica is Ready on the recorded digest. Resumable (br2k.journal.json).
    #[command(after_help = EXIT_CODES)]
    Deploy {
        #[command(flatten)]
        file: FileArg,
        /// Print the plan, touching nothing.
        #[arg(long)]
        dry_run: bool,
        /// With --dry-run: exit 2 when there is a difference.
        #[arg(long)]
        exit_code: bool,
        /// Do not wait for the roll-out.
        #[arg(long)]
        no_wait: bool,
        /// Longest wait for the roll-out, in seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Print what `deploy` would change (chain fields old → new, images to copy,
    /// Kubernetes objects), touching nothing.
    #[command(after_help = EXIT_CODES)]
    Diff {
        #[command(flatten)]
        file: FileArg,
        /// Exit 2 when there is a difference.
        #[arg(long)]
        exit_code: bool,
    },
    /// The on-chain record next to the live state.
    #[command(after_help = EXIT_CODES)]
    Status {
        /// Service (default: the one of ./br2k.toml).
        service: Option<String>,
        #[command(flatten)]
        file: FileArg,
        /// Keep running: print again on every change (watch events of the StatefulSet,
        /// its pods and the resource; registry changes). With `-o json`, one line each.
        #[arg(long)]
        watch: bool,
        /// Also diagnose once (the supervisor's read-only check: record, workload and
        /// every registry's image bytes) and list the findings.
        #[arg(long, conflicts_with = "watch")]
        diagnose: bool,
    },
    /// Every version with publisher, block, transaction and time.
    #[command(after_help = EXIT_CODES)]
    History {
        /// Service.
        service: String,
    },
    /// Set the recorded replica count.
    #[command(after_help = EXIT_CODES)]
    Scale {
        /// Service.
        service: String,
        /// Replica count.
        replicas: u32,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Pause a running service (replicas go to zero, the workload stays).
    #[command(after_help = EXIT_CODES)]
    Pause {
        /// Service.
        service: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Resume (or start) a service.
    #[command(after_help = EXIT_CODES)]
    Resume {
        /// Service.
        service: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Stop a service (its workload is removed).
    #[command(after_help = EXIT_CODES)]
    Stop {
        /// Service.
        service: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Make an earlier version active again.
    #[command(after_help = EXIT_CODES)]
    Rollback {
        /// Service.
        service: String,
        /// Version (default: the one before the active one).
        #[arg(long)]
        to: Option<u64>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Grant an on-chain role on a service to an account.
    #[command(after_help = EXIT_CODES)]
    Grant {
        /// Service.
        service: String,
        /// Account (0x + 40 hex digits).
        account: String,
        /// Role.
        #[arg(long, value_enum, default_value_t = RoleArg::Operator)]
        role: RoleArg,
    },
    /// Revoke an on-chain role.
    #[command(after_help = EXIT_CODES)]
    Revoke {
        /// Service.
        service: String,
        /// Account (0x + 40 hex digits).
        account: String,
        /// Role.
        #[arg(long, value_enum, default_value_t = RoleArg::Operator)]
        role: RoleArg,
    },
    /// Diagnose a service once and recover it from the record, without an operator.
    #[command(after_help = EXIT_CODES)]
    Recover {
        /// Service.
        service: String,
        /// Only diagnose.
        #[arg(long)]
        dry_run: bool,
    },
    /// Print a shell completion script.
    #[command(after_help = EXIT_CODES)]
    Completions {
        /// Shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum RoleArg {
    /// May publish, scale, pause/resume/stop and roll back.
    Operator,
    /// May record checkpoints and the location.
    Replica,
}

#[derive(Debug, Subcommand)]
enum ContextCmd {
    /// List contexts.
    List,
    /// Make a context the current one.
    Use {
        /// Context name.
        name: String,
    },
    /// Show a context (default: the current one).
    Show {
        /// Context name.
        name: Option<String>,
    },
    /// Create or change a context (only the given fields change).
    Set {
        /// Context name.
        name: String,
        /// JSON-RPC endpoint (repeat for several; replaces the list).
        #[arg(long = "rpc")]
        rpc: Vec<String>,
        /// Registry contract address.
        #[arg(long)]
        registry_contract: Option<String>,
        /// OCI registry, primary first (repeat; replaces the list).
        #[arg(long = "oci")]
        oci: Vec<String>,
        /// Kubeconfig file.
        #[arg(long)]
        kubeconfig: Option<String>,
        /// Context inside the kubeconfig.
        #[arg(long)]
        kube_context: Option<String>,
        /// Namespace of the resources and workloads.
        #[arg(long)]
        namespace: Option<String>,
        /// Environment variable holding the signing key (its name, never the key).
        #[arg(long)]
        key_env: Option<String>,
        /// File holding the signing key (its path, never the key).
        #[arg(long)]
        key_file: Option<String>,
        /// Also make it the current context.
        #[arg(long = "use")]
        use_it: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ContractCmd {
    /// Deploy the ServiceRegistry (reuses the context's address when it holds the
    /// code) and record the address in the context.
    Deploy {
        /// Deploy a new contract even when the context's address holds one.
        #[arg(long)]
        new: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ImageCmd {
    /// Build the image of br2k.toml's directory (no Docker) into an OCI layout and
    /// print its digest.
    Build {
        #[command(flatten)]
        file: FileArg,
        /// Layout directory (default: .br2k/image next to br2k.toml).
        #[arg(long)]
        layout: Option<PathBuf>,
    },
    /// Push to the primary registry and mirror to every other, then print the digest.
    Push {
        #[command(flatten)]
        file: FileArg,
    },
    /// List the project's repository in every registry: tags and digests.
    Ls {
        #[command(flatten)]
        file: FileArg,
    },
    /// Check that every registry serves the digest with verified bytes (default: the
    /// digest recorded on chain).
    Verify {
        #[command(flatten)]
        file: FileArg,
        /// Digest to verify instead of the recorded one.
        #[arg(long)]
        digest: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { EXIT_OK };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(e.code)
        }
    }
}

fn current(cli: &Cli) -> CliResult<(String, Context)> {
    ContextFile::load()?.resolve(cli.context.as_deref())
}

fn service_id(s: &str) -> CliResult<ServiceId> {
    ServiceId::new(s).map_err(|e| {
        CliError::usage(e).hint("a service id is a DNS label: lowercase letters, digits, '-'")
    })
}

fn progress() -> bool {
    std::io::stderr().is_terminal() || std::env::var_os("BR2K_PROGRESS").is_some()
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).expect("json"));
}

/// Prints rows as an aligned table.
fn table(header: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_uppercase()).collect());
    for r in rows {
        line(r.clone());
    }
}

async fn run(cli: Cli) -> CliResult<u8> {
    match &cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(*shell, &mut Cli::command(), "br2k", &mut std::io::stdout());
            Ok(EXIT_OK)
        }
        Command::Init {
            dir,
            service,
            force,
        } => init(dir.clone(), service.clone(), *force),
        Command::Context(c) => context_cmd(&cli, c),
        Command::Contract(ContractCmd::Deploy { new }) => contract_deploy(&cli, *new).await,
        Command::Image(c) => image_cmd(&cli, c).await,
        Command::Deploy {
            file,
            dry_run,
            exit_code,
            no_wait,
            timeout,
        } => {
            // The project first: a malformed br2k.toml is reported before anything else.
            deploy::open(&file.file)?;
            let (_, ctx) = current(&cli)?;
            let opts = deploy::Options {
                file: file.file.clone(),
                no_wait: *no_wait,
                timeout: Duration::from_secs(*timeout),
                progress: progress(),
            };
            if *dry_run {
                return diff(&cli, &ctx, &opts, *exit_code).await;
            }
            let r = deploy::run(&ctx, &opts).await?;
            if cli.output == Output::Json {
                print_json(&serde_json::to_value(&r).expect("json"));
            } else {
                println!(
                    "{} v{} {} — {}; {} blobs pushed; resource {:?}; {} replicas ready in {} ms{}",
                    r.service,
                    r.version,
                    r.digest,
                    if r.published {
                        "published"
                    } else {
                        "record unchanged"
                    },
                    r.blobs_pushed,
                    r.resource,
                    r.ready_replicas,
                    r.phases.total_ms,
                    r.tx.as_deref()
                        .map(|t| format!(" (tx {t})"))
                        .unwrap_or_default()
                );
            }
            Ok(EXIT_OK)
        }
        Command::Diff { file, exit_code } => {
            deploy::open(&file.file)?;
            let (_, ctx) = current(&cli)?;
            let opts = deploy::Options {
                file: file.file.clone(),
                no_wait: true,
                timeout: Duration::from_secs(0),
                progress: false,
            };
            diff(&cli, &ctx, &opts, *exit_code).await
        }
        Command::Status {
            service,
            file,
            watch,
            diagnose,
        } => status(&cli, service.as_deref(), &file.file, *watch, *diagnose).await,
        Command::History { service } => history(&cli, service).await,
        Command::Scale {
            service,
            replicas,
            wait,
        } => {
            let id = service_id(service)?;
            change(&cli, &id, wait, |r| {
                let id = id.clone();
                let n = *replicas;
                Box::pin(async move { r.set_replicas(&id, n).await })
            })
            .await
        }
        Command::Pause { service, wait } => {
            state_cmd(&cli, service, ServiceState::Paused, wait).await
        }
        Command::Resume { service, wait } => {
            state_cmd(&cli, service, ServiceState::Running, wait).await
        }
        Command::Stop { service, wait } => {
            state_cmd(&cli, service, ServiceState::Stopped, wait).await
        }
        Command::Rollback { service, to, wait } => {
            let id = service_id(service)?;
            let (_, ctx) = current(&cli)?;
            let to = match to {
                Some(v) => *v,
                None => {
                    let reg = chain::connect(&ctx, false).await?;
                    let a = reg.active(&id).await.for_service(&id)?;
                    if a.version <= 1 {
                        return Err(CliError::usage(format!(
                            "{id} is at version {}: nothing to roll back to",
                            a.version
                        )));
                    }
                    a.version - 1
                }
            };
            change(&cli, &id, wait, |r| {
                let id = id.clone();
                Box::pin(async move { r.rollback(&id, to).await })
            })
            .await
        }
        Command::Grant {
            service,
            account,
            role,
        } => roles(&cli, service, account, *role, true).await,
        Command::Revoke {
            service,
            account,
            role,
        } => roles(&cli, service, account, *role, false).await,
        Command::Recover { service, dry_run } => recover(&cli, service, *dry_run).await,
    }
}

fn init(dir: Option<PathBuf>, service: Option<String>, force: bool) -> CliResult<u8> {
    let dir = dir.unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&dir).map_err(|e| CliError::fail(format!("{}: {e}", dir.display())))?;
    let file = dir.join(project::FILE);
    if file.exists() && !force {
        return Err(CliError::usage(format!("{} exists", file.display()))
            .hint("pass --force to overwrite it"));
    }
    let name = match service {
        Some(s) => s,
        None => {
            let abs = std::fs::canonicalize(&dir).unwrap_or(dir.clone());
            abs.file_name()
                .map(|n| {
                    n.to_string_lossy()
                        .to_lowercase()
                        .replace(['_', '.', ' '], "-")
                })
                .unwrap_or_else(|| "service".into())
        }
    };
    service_id(&name)?;
    std::fs::write(&file, project::template(&name))
        .map_err(|e| CliError::fail(format!("{}: {e}", file.display())))?;
    let app = dir.join("app");
    let run = app.join("run.sh");
    if !run.exists() {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(&app)
            .map_err(|e| CliError::fail(format!("{}: {e}", app.display())))?;
        std::fs::write(
            &run,
            "#!/bin/sh\n# The service's entrypoint: replace with your own.\nexec sleep infinity\n",
        )
        .map_err(|e| CliError::fail(format!("{}: {e}", run.display())))?;
        std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| CliError::fail(format!("{}: {e}", run.display())))?;
    }
    println!(
        "wrote {} (service {name}) and {}",
        file.display(),
        run.display()
    );
    Ok(EXIT_OK)
}

fn context_cmd(cli: &Cli, c: &ContextCmd) -> CliResult<u8> {
    let mut f = ContextFile::load()?;
    match c {
        ContextCmd::List => {
            if cli.output == Output::Json {
                print_json(&json!({"current": f.current, "contexts": f.contexts}));
            } else {
                let rows: Vec<Vec<String>> = f
                    .contexts
                    .iter()
                    .map(|(n, c)| {
                        vec![
                            if f.current.as_deref() == Some(n) {
                                "*".into()
                            } else {
                                String::new()
                            },
                            n.clone(),
                            c.rpc_urls.join(","),
                            c.registry_contract.clone().unwrap_or_else(|| "-".into()),
                            c.oci_registries.join(","),
                            c.namespace.clone(),
                        ]
                    })
                    .collect();
                table(
                    &["", "name", "rpc", "contract", "oci registries", "namespace"],
                    &rows,
                );
            }
        }
        ContextCmd::Use { name } => {
            if !f.contexts.contains_key(name) {
                return Err(CliError::usage(format!("no context named {name:?}"))
                    .hint("list them with `br2k context list`"));
            }
            f.current = Some(name.clone());
            f.save()?;
            println!("current context: {name}");
        }
        ContextCmd::Show { name } => {
            let (name, ctx) = f.resolve(name.as_deref().or(cli.context.as_deref()))?;
            let key = match (&ctx.key_file, &ctx.key_env) {
                (Some(p), _) => format!("file {p}"),
                (None, Some(v)) => format!("env {v}"),
                (None, None) => "env BR2K_PRIVATE_KEY".into(),
            };
            let account = chain::account(&ctx)
                .unwrap_or(None)
                .unwrap_or_else(|| "-".into());
            if cli.output == Output::Json {
                print_json(&json!({"name": name, "context": ctx, "key": key, "account": account}));
            } else {
                let rows = vec![
                    vec!["name".into(), name],
                    vec!["rpc".into(), ctx.rpc_urls.join(", ")],
                    vec![
                        "registry contract".into(),
                        ctx.registry_contract.clone().unwrap_or_else(|| "-".into()),
                    ],
                    vec!["oci registries".into(), ctx.oci_registries.join(", ")],
                    vec![
                        "kubeconfig".into(),
                        ctx.kubeconfig
                            .clone()
                            .unwrap_or_else(|| "$KUBECONFIG".into()),
                    ],
                    vec![
                        "kube context".into(),
                        ctx.kube_context
                            .clone()
                            .unwrap_or_else(|| "(current)".into()),
                    ],
                    vec!["namespace".into(), ctx.namespace.clone()],
                    vec!["key".into(), key],
                    vec!["account".into(), account],
                ];
                table(&["field", "value"], &rows);
            }
        }
        ContextCmd::Set {
            name,
            rpc,
            registry_contract,
            oci,
            kubeconfig,
            kube_context,
            namespace,
            key_env,
            key_file,
            use_it,
        } => {
            let mut ctx = f.contexts.get(name).cloned().unwrap_or_else(|| Context {
                namespace: "default".into(),
                ..Default::default()
            });
            if !rpc.is_empty() {
                br2k_chain::ChainConfig::parse_urls(&rpc.join(","))?;
                ctx.rpc_urls = rpc.clone();
            }
            if let Some(a) = registry_contract {
                a.parse::<alloy::primitives::Address>()
                    .map_err(|_| CliError::usage(format!("{a:?} is not an address")))?;
                ctx.registry_contract = Some(a.clone());
            }
            if !oci.is_empty() {
                for h in oci {
                    br2k_oci::OciConfig::new(h.clone())
                        .map_err(|e| CliError::usage(format!("--oci {h}: {e}")))?;
                }
                ctx.oci_registries = oci.clone();
            }
            if let Some(k) = kubeconfig {
                ctx.kubeconfig = Some(k.clone());
            }
            if let Some(k) = kube_context {
                ctx.kube_context = Some(k.clone());
            }
            if let Some(n) = namespace {
                ctx.namespace = n.clone();
            }
            if let Some(k) = key_env {
                if k.len() == 64 || k.starts_with("0x") {
                    return Err(CliError::usage(
                        "--key-env takes the name of an environment variable, not a key",
                    ));
                }
                ctx.key_env = Some(k.clone());
            }
            if let Some(k) = key_file {
                ctx.key_file = Some(k.clone());
            }
            f.contexts.insert(name.clone(), ctx);
            if *use_it || f.current.is_none() {
                f.current = Some(name.clone());
            }
            f.save()?;
            println!(
                "context {name} saved in {}",
                context::config_path().display()
            );
        }
    }
    Ok(EXIT_OK)
}

async fn contract_deploy(cli: &Cli, new: bool) -> CliResult<u8> {
    let mut f = ContextFile::load()?;
    let (name, mut ctx) = f.resolve(cli.context.as_deref())?;
    if !new && ctx.registry_contract.is_some() {
        match chain::connect(&ctx, false).await {
            Ok(r) => {
                let out = json!({"address": format!("{:#x}", r.address()), "deployed": false, "context": name});
                if cli.output == Output::Json {
                    print_json(&out);
                } else {
                    println!(
                        "registry contract {:#x} already deployed (context {name})",
                        r.address()
                    );
                }
                return Ok(EXIT_OK);
            }
            Err(e) if e.cause.contains("has no code") || e.cause.contains("no code") => {}
            Err(e) => return Err(e),
        }
    }
    ctx.registry_contract = None;
    let config = ctx.chain_config(true)?;
    let r = br2k_chain::ChainRegistry::deploy(config)
        .await
        .map_err(|e| {
            let c = CliError::from(e);
            if c.cause.contains("unavailable") {
                c.context(format!("chain RPC {} is down", ctx.rpc_urls.join(", ")))
            } else {
                c
            }
        })?;
    let address = format!("{:#x}", r.address());
    ctx.registry_contract = Some(address.clone());
    f.contexts.insert(name.clone(), ctx);
    f.save()?;
    if cli.output == Output::Json {
        print_json(
            &json!({"address": address, "deployed": true, "context": name, "block": r.deploy_block()}),
        );
    } else {
        println!(
            "deployed the registry contract at {address} (block {}); recorded in context {name}",
            r.deploy_block()
        );
    }
    Ok(EXIT_OK)
}

async fn image_cmd(cli: &Cli, c: &ImageCmd) -> CliResult<u8> {
    match c {
        ImageCmd::Build { file, layout } => {
            let (project, base, jpath) = deploy::open(&file.file)?;
            let files = match project.source(&base)? {
                project::Source::Files(f) => f,
                project::Source::Reference(r) => {
                    return Err(CliError::usage(format!(
                        "image.reference {r} is an existing image: nothing to build"
                    )));
                }
            };
            let size = project::source_bytes(&files);
            if size > project.max_image_bytes() {
                return Err(CliError::usage(format!(
                    "image source is {} MiB, larger than the limit of {} MiB (image.max_size_mib)",
                    size.div_ceil(1 << 20),
                    project.max_image_bytes() >> 20
                )));
            }
            let image = project::build_image(&files, &project.image.entrypoint)?;
            let dir = layout.clone().unwrap_or_else(|| base.join(".br2k/image"));
            br2k_oci::write_layout(&image, &dir, project.image.tag.as_deref())?;
            // The journal learns the digest of this source (deploy skips the build).
            let contract = current(cli)
                .ok()
                .and_then(|(_, c)| c.registry_contract)
                .unwrap_or_default();
            let mut j = deploy::Journal::load(&jpath, &project.service, &contract);
            j.build = Some(deploy::BuildStep {
                fingerprint: project::fingerprint(&files, &project.image.entrypoint)?.to_string(),
                digest: image.digest.to_string(),
                bytes: image.size(),
            });
            j.save(&jpath)?;
            if cli.output == Output::Json {
                print_json(
                    &json!({"digest": image.digest.to_string(), "bytes": image.size(), "layout": dir}),
                );
            } else {
                println!(
                    "{} ({} KiB) in {}",
                    image.digest,
                    image.size() / 1024,
                    dir.display()
                );
            }
        }
        ImageCmd::Push { file } => {
            let (_, ctx) = current(cli)?;
            let (project, base, jpath) = deploy::open(&file.file)?;
            let contract = ctx.registry_contract.clone().unwrap_or_default();
            let mut j = deploy::Journal::load(&jpath, &project.service, &contract);
            let mut resolved = deploy::resolve_image(&project, &base, &mut j, progress()).await?;
            let stores = ctx.stores()?;
            let blobs =
                deploy::push_and_mirror(&project, &stores, &mut resolved, progress()).await?;
            j.save(&jpath)?;
            let d = resolved.digest.to_string();
            if cli.output == Output::Json {
                print_json(
                    &json!({"digest": d, "registries": ctx.oci_registries, "blobs_pushed": blobs}),
                );
            } else {
                println!(
                    "{d} in {} ({blobs} blobs uploaded)",
                    ctx.oci_registries.join(", ")
                );
            }
        }
        ImageCmd::Ls { file } => {
            let (_, ctx) = current(cli)?;
            let (project, _, _) = deploy::open(&file.file)?;
            let repo = project.repository();
            let mut rows = Vec::new();
            let mut out = Vec::new();
            for host in &ctx.oci_registries {
                let store = context::store_for(host)?;
                match tags(host, repo.as_str()).await {
                    Ok(tags) => {
                        for t in tags {
                            let d = br2k_core::ImageStore::resolve(&store, &repo, &t)
                                .await
                                .map(|d| d.to_string())
                                .unwrap_or_else(|e| format!("error: {e}"));
                            rows.push(vec![host.clone(), repo.to_string(), t.clone(), d.clone()]);
                            out.push(json!({"registry": host, "repository": repo.as_str(), "tag": t, "digest": d}));
                        }
                    }
                    Err(e) => {
                        rows.push(vec![
                            host.clone(),
                            repo.to_string(),
                            "-".into(),
                            format!("error: {e}"),
                        ]);
                        out.push(
                            json!({"registry": host, "repository": repo.as_str(), "error": e}),
                        );
                    }
                }
            }
            if cli.output == Output::Json {
                print_json(&json!(out));
            } else {
                table(&["registry", "repository", "tag", "digest"], &rows);
            }
        }
        ImageCmd::Verify { file, digest } => {
            let (_, ctx) = current(cli)?;
            let (project, _, _) = deploy::open(&file.file)?;
            let id = project.id();
            let (repo, digest) = match digest {
                Some(d) => (project.repository(), br2k_core::Digest::parse(d)?),
                None => {
                    let reg = chain::connect(&ctx, false).await?;
                    let r = reg.active(&id).await.for_service(&id)?;
                    let d = *r.spec.image.require_digest()?;
                    (r.spec.image.repository().clone(), d)
                }
            };
            let mut rows = Vec::new();
            let mut out = Vec::new();
            let mut bad = 0;
            for host in &ctx.oci_registries {
                let store = context::store_for(host)?;
                let r = br2k_core::ImageStore::verify(&store, &repo, &digest).await;
                let verdict = match &r {
                    Ok(()) => "verified".to_owned(),
                    Err(e) => {
                        bad += 1;
                        format!("FAILED: {e}")
                    }
                };
                rows.push(vec![
                    host.clone(),
                    format!("{repo}@{digest}"),
                    verdict.clone(),
                ]);
                out.push(json!({"registry": host, "image": format!("{repo}@{digest}"), "ok": r.is_ok(), "result": verdict}));
            }
            if cli.output == Output::Json {
                print_json(&json!(out));
            } else {
                table(&["registry", "image", "result"], &rows);
            }
            if bad > 0 {
                return Err(CliError::fail(format!("{bad} of {} registries do not serve {digest} intact", ctx.oci_registries.len()))
                    .hint("`br2k deploy` or `br2k image push` copies it again; `br2k recover SERVICE` repairs from a verified copy"));
            }
        }
    }
    Ok(EXIT_OK)
}

/// Tags of `repo` in registry `host` (`GET /v2/<repo>/tags/list`).
async fn tags(host: &str, repo: &str) -> Result<Vec<String>, String> {
    let scheme = if host.starts_with("127.") || host.starts_with("localhost") {
        "http"
    } else {
        "https"
    };
    let url = format!("{scheme}://{host}/v2/{repo}/tags/list");
    let client = alloy::transports::http::reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| e.to_string())?;
    let resp = client
        .get(&url)
        .send()
        .await
        .map_err(|e| format!("registry down: {e}"))?;
    if resp.status().as_u16() == 404 {
        return Ok(Vec::new());
    }
    let v: serde_json::Value = resp.json().await.map_err(|e| e.to_string())?;
    Ok(v.get("tags")
        .and_then(|t| t.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default())
}

async fn diff(cli: &Cli, ctx: &Context, opts: &deploy::Options, exit_code: bool) -> CliResult<u8> {
    let plan = deploy::plan(ctx, opts).await?;
    if cli.output == Output::Json {
        print_json(&json!({"plan": plan, "changes": plan.has_changes()}));
    } else {
        println!("service {} → image {}", plan.service, plan.digest);
        if plan.register {
            println!("chain: register {} (version 1)", plan.service);
        }
        for c in &plan.chain {
            println!(
                "chain: {}: {} → {}",
                c.field,
                c.old.as_deref().unwrap_or("-"),
                c.new
            );
        }
        if let Some(s) = &plan.state {
            println!("chain: state {s}");
        }
        for i in &plan.images {
            if i.action != "present" {
                println!("image: {} {}", i.registry, i.action);
            }
        }
        for k in &plan.kubernetes {
            println!("kubernetes: {k}");
        }
        if !plan.has_changes() {
            println!("no changes");
        }
    }
    Ok(if exit_code && plan.has_changes() {
        EXIT_USAGE
    } else {
        EXIT_OK
    })
}

fn state_name(s: ServiceState) -> String {
    s.to_string()
}

/// The status of `id` as JSON: the record next to the live state and the operator's.
async fn snapshot(
    reg: &br2k_chain::ChainRegistry,
    client: &::kube::Client,
    ns: &str,
    id: &ServiceId,
) -> CliResult<serde_json::Value> {
    let rec = reg.active(id).await.for_service(id)?;
    let live = kube::live(client, ns, id).await?;
    let st = kube::cr_status(client, ns, id).await?;
    let pending = kube::pending(&rec, &live);
    let digest = rec
        .spec
        .image
        .digest()
        .map(|d| d.to_string())
        .unwrap_or_default();
    let ready = kube::ready_on_digest(&rec, &live);
    let mut running: Vec<String> = live.pods.iter().filter_map(|p| p.digest.clone()).collect();
    running.sort();
    running.dedup();
    Ok(json!({
        "service": id.as_str(),
        "record": {
            "version": rec.version,
            "latest_version": rec.latest_version,
            "digest": digest,
            "image": rec.spec.image.to_string(),
            "replicas": rec.replicas,
            "state": state_name(rec.state),
            "owner": rec.owner.0,
            "location": rec.location,
            "checkpoint": rec.checkpoint,
            "block": rec.as_of,
            "stale": rec.stale,
        },
        "live": {
            "statefulset": live.statefulset,
            "replicas": live.replicas,
            "ready_replicas": live.ready_replicas,
            "ready_on_digest": ready,
            "running_digests": running,
            "pods": live.pods,
        },
        "in_sync": pending.is_none(),
        "pending": pending,
        "operator": st,
    }))
}

fn render_status(v: &serde_json::Value) {
    let s = |p: &serde_json::Value| match p {
        serde_json::Value::String(x) => x.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    let r = &v["record"];
    let l = &v["live"];
    let op = &v["operator"];
    let cond = op["conditions"]
        .as_array()
        .map(|cs| {
            cs.iter()
                .map(|c| format!("{}={}", s(&c["type"]), s(&c["status"])))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|| "-".into());
    let last = &op["lastRecovery"];
    let last = if last.is_null() {
        "-".into()
    } else {
        format!(
            "{} {} ({} ms, {})",
            s(&last["time"]),
            s(&last["outcome"]),
            s(&last["durationMs"]),
            last["findings"]
                .as_array()
                .map(|f| f.iter().map(&s).collect::<Vec<_>>().join(","))
                .unwrap_or_default()
        )
    };
    let running = l["running_digests"]
        .as_array()
        .map(|d| d.iter().map(&s).collect::<Vec<_>>().join(","))
        .unwrap_or_default();
    let checkpoint = if r["checkpoint"].is_null() {
        "-".into()
    } else {
        format!(
            "v{} @{}",
            s(&r["checkpoint"]["state_version"]),
            s(&r["checkpoint"]["log_index"])
        )
    };
    let rows = vec![
        vec![
            "version".into(),
            format!("{} (latest {})", s(&r["version"]), s(&r["latest_version"])),
            String::new(),
        ],
        vec!["state".into(), s(&r["state"]), String::new()],
        vec!["digest".into(), s(&r["digest"]), running],
        vec![
            "replicas".into(),
            s(&r["replicas"]),
            format!(
                "{} ready on the digest ({} pods)",
                s(&l["ready_on_digest"]),
                l["pods"].as_array().map_or(0, Vec::len)
            ),
        ],
        vec![
            "location".into(),
            if r["location"].is_null() {
                "-".into()
            } else {
                s(&r["location"]["endpoint"])
            },
            String::new(),
        ],
        vec!["checkpoint".into(), checkpoint, String::new()],
        vec!["operator".into(), String::new(), s(&op["phase"])],
        vec!["conditions".into(), String::new(), cond],
        vec!["last recovery".into(), String::new(), last],
        vec![
            "in sync".into(),
            String::new(),
            if v["in_sync"] == true {
                "yes".into()
            } else {
                format!("no: {}", s(&v["pending"]))
            },
        ],
    ];
    let mut rows = rows;
    if let Some(f) = v["findings"].as_array() {
        let names: Vec<String> = f.iter().map(|x| s(&x["finding"])).collect();
        rows.push(vec![
            "findings".into(),
            String::new(),
            if names.is_empty() {
                "none".into()
            } else {
                names.join(", ")
            },
        ]);
    }
    println!("service {}", s(&v["service"]));
    table(&["", "on chain", "live"], &rows);
}

/// The snapshot without what changes on every read (the block it was read at).
fn comparable(v: &serde_json::Value) -> serde_json::Value {
    let mut v = v.clone();
    v["record"]["block"] = serde_json::Value::Null;
    v
}

async fn status(
    cli: &Cli,
    service: Option<&str>,
    file: &std::path::Path,
    watch: bool,
    diagnose: bool,
) -> CliResult<u8> {
    let (_, ctx) = current(cli)?;
    let id = match service {
        Some(s) => service_id(s)?,
        None => deploy::open(file)?.0.id(),
    };
    let reg = chain::connect(&ctx, false).await?;
    let client = ctx.kube().await?;
    let ns = ctx.namespace.clone();
    let mut v = snapshot(&reg, &client, &ns, &id).await?;
    if diagnose {
        let sup = supervisor(&ctx, &client, &id).await?;
        let d = sup.diagnose(&id).await.for_service(&id)?;
        v["findings"] = serde_json::to_value(&d.findings).expect("findings serialize");
    }
    let show = |v: &serde_json::Value| {
        if cli.output == Output::Json {
            if watch {
                // One line per change.
                println!("{v}");
            } else {
                print_json(v);
            }
        } else {
            if watch && std::io::stdout().is_terminal() {
                print!("\x1b[2J\x1b[H");
            }
            render_status(v);
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
    };
    show(&v);
    if !watch {
        return Ok(EXIT_OK);
    }
    // Refresh on every watch event of the StatefulSet, the pods and the resource, and
    // on every registry change of the service (the chain is polled every second).
    use ::kube::runtime::watcher;
    use futures::StreamExt;
    let names = br2k_k8s::Names::of(&id);
    let sts = watcher(
        ::kube::Api::<k8s_openapi::api::apps::v1::StatefulSet>::namespaced(client.clone(), &ns),
        watcher::Config::default().fields(&format!("metadata.name={}", names.base)),
    )
    .map(|_| ());
    let pods = watcher(
        ::kube::Api::<k8s_openapi::api::core::v1::Pod>::namespaced(client.clone(), &ns),
        watcher::Config::default().labels(&br2k_k8s::names::selector_string(&id)),
    )
    .map(|_| ());
    let crs = watcher(
        ::kube::Api::<br2k_operator::crd::Br2kService>::namespaced(client.clone(), &ns),
        watcher::Config::default().fields(&format!("metadata.name={id}")),
    )
    .map(|_| ());
    let changes = reg
        .changes()
        .await
        .for_service(&id)?
        .filter(|c| {
            let ours = c.as_ref().map(|c| c.id == id).unwrap_or(true);
            async move { ours }
        })
        .map(|_| ());
    let mut events = futures::stream::select_all(vec![
        sts.boxed(),
        pods.boxed(),
        crs.boxed(),
        changes.boxed(),
    ]);
    let mut last = comparable(&v);
    while events.next().await.is_some() {
        // Coalesce a burst of events into one read.
        tokio::time::sleep(Duration::from_millis(100)).await;
        while let Some(Some(())) = futures::FutureExt::now_or_never(events.next()) {}
        match snapshot(&reg, &client, &ns, &id).await {
            Ok(v) => {
                let c = comparable(&v);
                if c != last {
                    last = c;
                    show(&v);
                }
            }
            Err(e) => eprintln!("{e}"),
        }
    }
    Ok(EXIT_OK)
}

async fn history(cli: &Cli, service: &str) -> CliResult<u8> {
    let id = service_id(service)?;
    let (_, ctx) = current(cli)?;
    let reg = chain::connect(&ctx, false).await?;
    let versions = reg.history(&id).await.for_service(&id)?;
    let active = reg.active(&id).await.for_service(&id)?.version;
    let events = chain::version_events(&ctx, &id, reg.deploy_block()).await?;
    let mut out = Vec::new();
    let mut rows = Vec::new();
    for v in &versions {
        let ev = events.iter().find(|e| e.version == v.version);
        let digest = v
            .spec
            .image
            .digest()
            .map(|d| d.to_string())
            .unwrap_or_default();
        out.push(json!({
            "version": v.version,
            "active": v.version == active,
            "digest": digest,
            "replicas": v.spec.replicas,
            "publisher": v.publisher.0,
            "block": ev.map(|e| e.block),
            "tx": ev.map(|e| e.tx.clone()),
            "time": v.published_at,
        }));
        rows.push(vec![
            format!(
                "{}{}",
                v.version,
                if v.version == active { "*" } else { "" }
            ),
            digest,
            v.spec.replicas.to_string(),
            v.publisher.0.clone(),
            ev.map_or("-".into(), |e| e.block.to_string()),
            ev.map_or("-".into(), |e| e.tx.clone()),
            v.published_at.map_or("-".into(), utc),
        ]);
    }
    if cli.output == Output::Json {
        print_json(&json!(out));
    } else {
        table(
            &[
                "version",
                "digest",
                "replicas",
                "publisher",
                "block",
                "tx",
                "time (utc)",
            ],
            &rows,
        );
    }
    Ok(EXIT_OK)
}

type ChangeFut<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = br2k_core::Result<ServiceRecord>> + Send + 'a>,
>;

async fn change<F>(cli: &Cli, id: &ServiceId, wait: &WaitArgs, f: F) -> CliResult<u8>
where
    F: for<'a> FnOnce(&'a br2k_chain::ChainRegistry) -> ChangeFut<'a>,
{
    let (_, ctx) = current(cli)?;
    let reg = chain::connect(&ctx, true).await?;
    let rec = f(&reg).await.for_service(id)?;
    let mut waited = None;
    if wait.wait {
        let client = ctx.kube().await?;
        waited = Some(
            kube::wait(
                &client,
                &ctx.namespace,
                &rec,
                Duration::from_secs(wait.timeout),
                progress(),
            )
            .await?,
        );
    }
    if cli.output == Output::Json {
        print_json(&json!({
            "service": id.as_str(),
            "version": rec.version,
            "state": state_name(rec.state),
            "replicas": rec.replicas,
            "block": rec.as_of,
            "waited_ms": waited.map(|d| d.as_millis() as u64),
        }));
    } else {
        println!(
            "{id}: v{} {} with {} replicas{}",
            rec.version,
            rec.state,
            rec.replicas,
            waited
                .map(|d| format!("; live in {} ms", d.as_millis()))
                .unwrap_or_default()
        );
    }
    Ok(EXIT_OK)
}

async fn state_cmd(cli: &Cli, service: &str, to: ServiceState, wait: &WaitArgs) -> CliResult<u8> {
    let id = service_id(service)?;
    change(cli, &id, wait, |r| {
        let id = id.clone();
        Box::pin(async move { r.set_state(&id, to).await })
    })
    .await
}

async fn roles(
    cli: &Cli,
    service: &str,
    account: &str,
    role: RoleArg,
    grant: bool,
) -> CliResult<u8> {
    let id = service_id(service)?;
    let (_, ctx) = current(cli)?;
    let reg = chain::connect(&ctx, true).await?;
    let role = match role {
        RoleArg::Operator => Role::Operator,
        RoleArg::Replica => Role::Replica,
    };
    let acc = Account(account.to_lowercase());
    if grant {
        reg.grant(&id, &acc, role).await.for_service(&id)?;
    } else {
        reg.revoke(&id, &acc, role).await.for_service(&id)?;
    }
    let verb = if grant { "granted" } else { "revoked" };
    if cli.output == Output::Json {
        print_json(
            &json!({"service": id.as_str(), "account": acc.0, "role": format!("{role:?}").to_lowercase(), "result": verb}),
        );
    } else {
        println!("{verb} {:?} on {id} for {}", role, acc.0);
    }
    Ok(EXIT_OK)
}

/// The core supervisor over the real backends of `ctx` (read-only chain connection,
/// the context's registries, the cluster): the operator's composition, run once.
async fn supervisor(
    ctx: &Context,
    client: &::kube::Client,
    id: &ServiceId,
) -> CliResult<br2k_core::supervisor::Supervisor> {
    use br2k_operator::backends::Backends;
    let spec = kube::cr_spec(ctx, id)?;
    // The context's chain, contract and registries in the operator's place; the chain
    // id is the one its endpoints serve (checked again by every read).
    let chain = ctx.chain_config(false)?;
    let chain_id = br2k_chain::ChainRegistry::connect(chain.clone())
        .await
        .for_service(id)?
        .chain_id();
    let mut backends = br2k_operator::backends::ChainOciBackends::new(
        chain.with_chain_id(chain_id),
        ctx.oci_registries.clone(),
    )
    .for_service(id)?;
    backends.insecure_loopback = true;
    backends
        .supervisor(client, &ctx.namespace, &ctx.namespace, &spec)
        .await
        .for_service(id)
}

async fn recover(cli: &Cli, service: &str, dry_run: bool) -> CliResult<u8> {
    let id = service_id(service)?;
    let (_, ctx) = current(cli)?;
    let client = ctx.kube().await?;
    let sup = supervisor(&ctx, &client, &id).await?;
    let diagnosis = sup.diagnose(&id).await.for_service(&id)?;
    let report = if dry_run || diagnosis.is_healthy() {
        None
    } else {
        Some(sup.recover(&diagnosis).await.for_service(&id)?)
    };
    if cli.output == Output::Json {
        print_json(&json!({"diagnosis": diagnosis, "report": report, "dry_run": dry_run}));
    } else {
        if diagnosis.findings.is_empty() {
            println!(
                "{id}: healthy (record v{})",
                diagnosis.record_version.unwrap_or(0)
            );
        }
        for f in &diagnosis.findings {
            println!(
                "finding: {} {}",
                f.name(),
                serde_json::to_string(f).unwrap_or_default()
            );
        }
        if let Some(r) = &report {
            for a in &r.actions {
                println!(
                    "action: {} in {} ms{}",
                    serde_json::to_string(&a.action).unwrap_or_default(),
                    a.duration.as_millis(),
                    a.error
                        .as_deref()
                        .map(|e| format!(" FAILED: {e}"))
                        .unwrap_or_default()
                );
            }
            println!(
                "outcome: {:?} in {} ms (converged: {})",
                r.outcome,
                r.duration.as_millis(),
                r.converged
            );
        } else if dry_run && !diagnosis.findings.is_empty() {
            println!("dry run: nothing changed");
        }
    }
    if let Some(r) = &report
        && !r.remaining.is_empty()
    {
        return Err(CliError::fail(format!(
            "{} finding(s) remain after recovery",
            r.remaining.len()
        )));
    }
    Ok(EXIT_OK)
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS` (UTC).
fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_unix_seconds() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc(1_796_536_670), "2026-12-06 05:57:50");
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
