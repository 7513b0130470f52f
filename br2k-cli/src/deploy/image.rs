//! The image of a deploy: resolved from the journal or built, pushed to the
//! primary registry and mirrored to the others, with progress on stderr.

use std::path::{Path, PathBuf};
use std::time::Duration;

use br2k_core::{Digest, Image, ImageStore};

use super::{BuildStep, Journal, say};
use crate::error::{CliError, CliResult};
use crate::project::{self, Project, Source};

/// The image of a project: digest, and the built image when it had to be built.
pub struct Resolved {
    /// Manifest digest.
    pub digest: Digest,
    /// The image, when built in this run.
    pub image: Option<Image>,
    /// Where the image is copied from (reference sources).
    pub source: Option<(br2k_oci::OciImageStore, br2k_core::Repository)>,
    /// The source files (directory sources), to build later if needed.
    pub files: Option<Vec<(String, PathBuf, u32)>>,
}

/// Resolves the project's image digest: from the journal when the source is
/// unchanged, by building otherwise (the builder is reproducible).
pub async fn resolve_image(
    project: &Project,
    base: &Path,
    journal: &mut Journal,
    progress: bool,
) -> CliResult<Resolved> {
    match project.source(base)? {
        Source::Files(files) => {
            let size = project::source_bytes(&files);
            let max = project.max_image_bytes();
            if size > max {
                return Err(CliError::usage(format!(
                    "image source is {} MiB, larger than the limit of {} MiB (image.max_size_mib)",
                    size.div_ceil(1 << 20),
                    max >> 20
                ))
                .hint("raise image.max_size_mib in br2k.toml or package less; nothing was pushed or published"));
            }
            let fp = project::fingerprint(&files, &project.image.entrypoint)?.to_string();
            if let Some(b) = &journal.build
                && b.fingerprint == fp
            {
                return Ok(Resolved {
                    digest: Digest::parse(&b.digest)?,
                    image: None,
                    source: None,
                    files: Some(files),
                });
            }
            say(
                progress,
                format!(
                    "building the image from {} files ({} KiB)",
                    files.len(),
                    size / 1024
                ),
            );
            let image = project::build_image(&files, &project.image.entrypoint)?;
            let total = image.size() + image.manifest_bytes.len() as u64;
            if total > max {
                return Err(CliError::usage(format!(
                    "image is {} MiB, larger than the limit of {} MiB (image.max_size_mib)",
                    total.div_ceil(1 << 20),
                    max >> 20
                )));
            }
            journal.build = Some(BuildStep {
                fingerprint: fp,
                digest: image.digest.to_string(),
                bytes: total,
            });
            Ok(Resolved {
                digest: image.digest,
                image: Some(image),
                source: None,
                files: Some(files),
            })
        }
        Source::Reference(r) => {
            let store = crate::context::store_for(r.registry())?;
            let digest = match r.digest() {
                Some(d) => *d,
                None => {
                    let tag = r.tag().unwrap_or("latest");
                    store
                        .resolve(r.repository(), tag)
                        .await
                        .map_err(|e| CliError::from(e).context(format!("resolve {r}")))?
                }
            };
            Ok(Resolved {
                digest,
                image: None,
                source: Some((store, r.repository().clone())),
                files: None,
            })
        }
    }
}

/// Which registries hold `digest` (`Err` per registry when it is down).
pub async fn presence(
    stores: &[br2k_oci::OciImageStore],
    repo: &br2k_core::Repository,
    digest: &Digest,
) -> Vec<Result<bool, br2k_core::Error>> {
    futures::future::join_all(stores.iter().map(|s| s.has(repo, digest))).await
}

/// A progress callback for the blobs a registry receives: a bar per blob (bytes) in
/// `multi`, or, when stderr is not a terminal, one line per started, finished or
/// present blob.
fn blob_reporter(
    multi: &indicatif::MultiProgress,
    registry: &str,
) -> std::sync::Arc<dyn Fn(br2k_oci::BlobProgress) + Send + Sync> {
    use br2k_oci::BlobProgress as P;
    use std::io::IsTerminal;
    let plain = !std::io::stderr().is_terminal();
    let multi = multi.clone();
    let registry = registry.to_owned();
    let bars: parking_lot::Mutex<std::collections::HashMap<Digest, indicatif::ProgressBar>> =
        Default::default();
    let style = indicatif::ProgressStyle::with_template(
        "  {prefix:<40} [{bar:20}] {bytes}/{total_bytes} {bytes_per_sec}",
    )
    .expect("template")
    .progress_chars("=> ");
    std::sync::Arc::new(move |e| {
        let mut bars = bars.lock();
        let short = |d: &Digest| format!("{}…", &d.to_string()[..19]);
        match e {
            P::Started { digest, size } => {
                if plain {
                    eprintln!("{registry}: blob {digest} ({size} bytes) started");
                }
                let bar = multi.add(indicatif::ProgressBar::new(size));
                bar.set_style(style.clone());
                bar.set_prefix(format!("{registry} {}", short(&digest)));
                bars.insert(digest, bar);
            }
            P::Bytes { digest, bytes } => {
                if let Some(b) = bars.get(&digest) {
                    b.inc(bytes);
                }
            }
            P::Done { digest, size } => {
                if plain {
                    eprintln!("{registry}: blob {digest} ({size} bytes) done");
                }
                if let Some(b) = bars.remove(&digest) {
                    b.set_position(size);
                    b.finish();
                }
            }
            P::Skipped { digest, size } => {
                if plain {
                    eprintln!("{registry}: blob {digest} ({size} bytes) already present");
                }
            }
        }
    })
}

/// Pushes to the primary and mirrors to every registry that lacks the image, with a
/// progress bar per registry and per blob on stderr. Returns the blobs uploaded.
pub async fn push_and_mirror(
    project: &Project,
    stores: &[br2k_oci::OciImageStore],
    resolved: &mut Resolved,
    progress: bool,
) -> CliResult<u64> {
    let repo = project.repository();
    let digest = resolved.digest;
    let have = presence(stores, &repo, &digest).await;
    let n = stores.len();
    let down = |i: usize, e: &br2k_core::Error, done: usize| {
        CliError::fail(format!(
            "registry {} is down: image pushed to {done} of {n} registries, nothing published on chain ({e})",
            stores[i].registry()
        ))
        .hint("start the registry or remove it from the context (`br2k context set NAME --oci …`), then rerun `br2k deploy`")
    };
    let present: Vec<bool> = have.iter().map(|h| matches!(h, Ok(true))).collect();
    if present.iter().all(|p| *p) {
        return Ok(0);
    }
    let multi = if progress {
        indicatif::MultiProgress::new()
    } else {
        indicatif::MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::hidden())
    };
    let style = indicatif::ProgressStyle::with_template("{spinner} {prefix:<22} {msg} ({elapsed})")
        .expect("template");
    // With progress, the stores report every blob they receive.
    let reporting: Vec<br2k_oci::OciImageStore>;
    let stores: &[br2k_oci::OciImageStore] = if progress {
        reporting = stores
            .iter()
            .map(|s| {
                crate::context::store_with_progress(
                    s.registry(),
                    Some(blob_reporter(&multi, s.registry())),
                )
            })
            .collect::<CliResult<_>>()?;
        &reporting
    } else {
        stores
    };
    let mut blobs = 0;
    let mut done = present.iter().filter(|p| **p).count();
    // The primary first.
    if let Err(e) = &have[0] {
        return Err(down(0, e, 0));
    }
    if !present[0] {
        let bar = multi.add(indicatif::ProgressBar::new_spinner());
        bar.set_style(style.clone());
        bar.set_prefix(stores[0].registry().to_owned());
        bar.enable_steady_tick(Duration::from_millis(120));
        let primary = &stores[0];
        let result = if let Some((src, src_repo)) = &resolved.source {
            bar.set_message(format!("copying {digest} from {}", src.registry()));
            src.copy_image_to(src_repo, &digest, primary, &repo)
                .await
                .map(|r| r.blobs_copied)
        } else {
            if resolved.image.is_none() {
                bar.set_message("building the image");
                let files = resolved.files.as_ref().expect("directory source");
                resolved.image = Some(project::build_image(files, &project.image.entrypoint)?);
            }
            let image = resolved.image.as_ref().expect("built");
            bar.set_message(format!(
                "pushing {} blobs ({} KiB)",
                1 + image.layers.len(),
                image.size() / 1024
            ));
            let before = primary.request_counts();
            primary
                .push(&repo, image, project.image.tag.as_deref())
                .await
                .map(|_| {
                    let c = primary.request_counts().since(&before);
                    // One upload is one POST and one PUT; the manifest is one PUT.
                    c.post
                })
        };
        match result {
            Ok(b) => {
                blobs += b;
                done += 1;
                bar.finish_with_message(format!("pushed {digest} ({b} blobs uploaded)"));
            }
            Err(e) => {
                bar.abandon_with_message("failed");
                return Err(down(0, &e, done.saturating_sub(1).min(done)));
            }
        }
    }
    // Then every mirror, streamed from the primary, in parallel.
    let mut jobs = Vec::new();
    for (i, s) in stores.iter().enumerate().skip(1) {
        if present[i] {
            continue;
        }
        let bar = multi.add(indicatif::ProgressBar::new_spinner());
        bar.set_style(style.clone());
        bar.set_prefix(s.registry().to_owned());
        bar.enable_steady_tick(Duration::from_millis(120));
        bar.set_message(format!("mirroring from {}", stores[0].registry()));
        let repo = repo.clone();
        jobs.push(async move {
            let r = stores[0].copy_image(&repo, &digest, s).await;
            match &r {
                Ok(rep) => bar.finish_with_message(format!(
                    "mirrored ({} blobs copied, {} skipped, {} KiB)",
                    rep.blobs_copied,
                    rep.blobs_skipped,
                    rep.bytes_copied / 1024
                )),
                Err(_) => bar.abandon_with_message("failed"),
            }
            (i, r)
        });
    }
    let results = futures::future::join_all(jobs).await;
    let mut first_err = None;
    for (i, r) in results {
        match r {
            Ok(rep) => {
                blobs += rep.blobs_copied;
                done += 1;
            }
            Err(e) => {
                if first_err.is_none() {
                    first_err = Some((i, e));
                }
            }
        }
    }
    if let Some((i, e)) = first_err {
        return Err(down(i, &e, done));
    }
    Ok(blobs)
}
