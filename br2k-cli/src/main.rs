//! `br2k`: takes a service from source to a supervised deployment. See `br2k --help`.

mod args;
mod chain;
mod cmd;
mod context;
mod deploy;
mod error;
mod kube;
mod project;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use br2k_core::{Registry, ServiceId, ServiceState};
use clap::{CommandFactory, Parser};

use crate::args::*;
use crate::cmd::*;
use crate::context::{Context, ContextFile};
use crate::error::{CliError, CliResult, EXIT_OK, EXIT_USAGE, ForService};

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }
}
