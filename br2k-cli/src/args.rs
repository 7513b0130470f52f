//! The command line: every command, subcommand and flag of `br2k`.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

use crate::project;

pub(crate) const EXIT_CODES: &str =
    "Exit codes: 0 ok, 1 failure, 2 usage error or (diff --exit-code) a difference.

Errors are one line on stderr: the cause, then a hint.";

/// br2k: deploy a service from source to a supervised, on-chain recorded deployment.
#[derive(Debug, Parser)]
#[command(name = "br2k", version, about, after_help = EXIT_CODES, propagate_version = true)]
pub(crate) struct Cli {
    /// Context to use (default: the current one; see `br2k context`).
    #[arg(long, global = true, env = "BR2K_CONTEXT")]
    pub(crate) context: Option<String>,
    /// Output format of commands that read.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Table)]
    pub(crate) output: Output,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
    /// A human table.
    Table,
    /// JSON on stdout.
    Json,
}

#[derive(Debug, clap::Args)]
pub(crate) struct FileArg {
    /// The project file.
    #[arg(long, short, default_value = project::FILE)]
    pub(crate) file: PathBuf,
}

#[derive(Debug, clap::Args)]
pub(crate) struct WaitArgs {
    /// Wait until the live workload matches the new record.
    #[arg(long)]
    pub(crate) wait: bool,
    /// Longest wait, in seconds.
    #[arg(long, default_value_t = 300)]
    pub(crate) timeout: u64,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
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
pub(crate) enum RoleArg {
    /// May publish, scale, pause/resume/stop and roll back.
    Operator,
    /// May record checkpoints and the location.
    Replica,
}

#[derive(Debug, Subcommand)]
pub(crate) enum ContextCmd {
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
pub(crate) enum ContractCmd {
    /// Deploy the ServiceRegistry (reuses the context's address when it holds the
    /// code) and record the address in the context.
    Deploy {
        /// Deploy a new contract even when the context's address holds one.
        #[arg(long)]
        new: bool,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum ImageCmd {
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
