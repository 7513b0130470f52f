//! `br2k context` and `br2k contract`: named targets and the registry contract.

use serde_json::json;

use crate::args::*;
use crate::context::{Context, ContextFile};
use crate::error::{CliError, CliResult, EXIT_OK};
use crate::{chain, context, print_json, table};

pub(crate) fn context_cmd(cli: &Cli, c: &ContextCmd) -> CliResult<u8> {
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

pub(crate) async fn contract_deploy(cli: &Cli, new: bool) -> CliResult<u8> {
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
