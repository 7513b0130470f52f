//! `br2k image`: build, push, list and verify the service image.

use std::time::Duration;

use br2k_core::Registry;
use serde_json::json;

use crate::args::*;
use crate::error::{CliError, CliResult, EXIT_OK, ForService};
use crate::{chain, context, current, deploy, print_json, progress, project, table};

pub(crate) async fn image_cmd(cli: &Cli, c: &ImageCmd) -> CliResult<u8> {
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
pub(crate) async fn tags(host: &str, repo: &str) -> Result<Vec<String>, String> {
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
