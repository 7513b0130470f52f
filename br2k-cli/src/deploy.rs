//! `br2k deploy`: build, push and mirror, publish on chain, apply the resource, wait.
//! Resumable through a journal next to `br2k.toml`; `--dry-run`/`diff` print the plan.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use br2k_core::{Digest, Image, ImageStore, Registry, ServiceRecord, ServiceSpec, ServiceState};
use serde::{Deserialize, Serialize};

use crate::chain;
use crate::context::Context;
use crate::error::{CliError, CliResult, ForService};
use crate::kube::{self as k, CrChange};
use crate::project::{self, Project, Source};

/// The journal file name (next to `br2k.toml`).
pub const JOURNAL: &str = "br2k.journal.json";

/// The deployment journal: each finished step and its result. It is a record and a
/// cache: every rerun checks it against the chain, the registries and the cluster.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Journal {
    /// Service id.
    pub service: String,
    /// Registry contract the journal is about.
    pub contract: String,
    /// The image was built (directory sources).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<BuildStep>,
    /// Every registry holds the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push: Option<PushStep>,
    /// The record pins the spec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain: Option<ChainStep>,
    /// The resource is applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apply: Option<ApplyStep>,
    /// Every replica was Ready on the digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<ReadyStep>,
}

/// Result of the build step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildStep {
    /// Fingerprint of the source.
    pub fingerprint: String,
    /// Manifest digest of the built image.
    pub digest: String,
    /// Image size in bytes.
    pub bytes: u64,
}

/// Result of the push step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PushStep {
    /// The digest every registry holds.
    pub digest: String,
    /// The registries, primary first.
    pub registries: Vec<String>,
    /// Blobs uploaded by this step.
    pub blobs_pushed: u64,
}

/// Result of the chain step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChainStep {
    /// Spec hash now active.
    pub spec_hash: String,
    /// Active version.
    pub version: u64,
    /// Transaction that published it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx: Option<String>,
    /// Block of that transaction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<u64>,
}

/// Result of the apply step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApplyStep {
    /// `namespace/name` of the resource.
    pub resource: String,
    /// Record version the resource was applied for (the roll-out waited on).
    pub version: u64,
}

/// Result of the wait step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReadyStep {
    /// Version that was Ready.
    pub version: u64,
    /// Ready replicas.
    pub replicas: u32,
}

impl Journal {
    /// Reads the journal at `path` for `service` on `contract` (a fresh one when absent
    /// or about something else).
    pub fn load(path: &Path, service: &str, contract: &str) -> Self {
        let fresh = || Journal {
            service: service.to_owned(),
            contract: contract.to_owned(),
            ..Default::default()
        };
        match std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice::<Journal>(&b).ok())
        {
            Some(j) if j.service == service && j.contract == contract => j,
            _ => fresh(),
        }
    }

    /// Writes the journal atomically.
    pub fn save(&self, path: &Path) -> CliResult<()> {
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(self).expect("journal serializes");
        std::fs::write(&tmp, text)
            .and_then(|_| std::fs::rename(&tmp, path))
            .map_err(|e| CliError::fail(format!("write {}: {e}", path.display())))
    }
}

/// One field of the record that changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldChange {
    /// Field name.
    pub field: String,
    /// Old value (JSON), `None` when the service is not registered.
    pub old: Option<String>,
    /// New value (JSON).
    pub new: String,
}

/// The on-chain fields that differ between `old` and `new` (every field set in `new`
/// when `old` is `None`).
pub fn spec_changes(old: Option<&ServiceSpec>, new: &ServiceSpec) -> Vec<FieldChange> {
    let newv = serde_json::to_value(new).expect("spec serializes");
    let oldv = old.map(|o| serde_json::to_value(o).expect("spec serializes"));
    let mut out = Vec::new();
    if let serde_json::Value::Object(n) = &newv {
        for (k, v) in n {
            let o = oldv.as_ref().and_then(|o| o.get(k));
            let empty = v.is_null()
                || v.as_array().is_some_and(Vec::is_empty)
                || v.as_object()
                    .is_some_and(|m| m.values().all(serde_json::Value::is_null));
            // A new service lists only the fields it sets.
            if old.is_none() && empty {
                continue;
            }
            if o != Some(v) {
                out.push(FieldChange {
                    field: k.clone(),
                    old: o.map(|o| o.to_string()),
                    new: v.to_string(),
                });
            }
        }
    }
    out
}

/// What a deploy would do.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// Service id.
    pub service: String,
    /// Image digest to pin.
    pub digest: String,
    /// Whether the service gets registered (else a new version, or nothing).
    pub register: bool,
    /// Record fields that change (old → new).
    pub chain: Vec<FieldChange>,
    /// State change (`old → new`), if any.
    pub state: Option<String>,
    /// Per registry: `present` or `copy`.
    pub images: Vec<ImagePlan>,
    /// Kubernetes objects that change.
    pub kubernetes: Vec<String>,
}

/// One registry in a plan.
#[derive(Debug, Clone, Serialize)]
pub struct ImagePlan {
    /// Registry host.
    pub registry: String,
    /// `present`, `push` or `copy`, or `down: …`.
    pub action: String,
}

impl Plan {
    /// Whether anything would change.
    pub fn has_changes(&self) -> bool {
        self.register
            || !self.chain.is_empty()
            || self.state.is_some()
            || self.images.iter().any(|i| i.action != "present")
            || !self.kubernetes.is_empty()
    }
}

/// Per-phase times of a deploy, in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Phases {
    /// Resolving or building the image.
    pub build_ms: u64,
    /// Pushing and mirroring.
    pub push_ms: u64,
    /// Chain reads and transactions.
    pub chain_ms: u64,
    /// Applying the resource.
    pub apply_ms: u64,
    /// Waiting for the roll-out.
    pub wait_ms: u64,
    /// The whole command.
    pub total_ms: u64,
}

/// What a deploy did.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Service id.
    pub service: String,
    /// Pinned digest.
    pub digest: String,
    /// Active version after the deploy.
    pub version: u64,
    /// Whether this run registered or published a version.
    pub published: bool,
    /// Transaction of the active version.
    pub tx: Option<String>,
    /// Blobs this run uploaded.
    pub blobs_pushed: u64,
    /// What this run did to the resource.
    pub resource: CrChange,
    /// Whether this run wrote anything (chain, registries, cluster).
    pub wrote: bool,
    /// Replicas Ready on the digest at the end.
    pub ready_replicas: u32,
    /// Phase times.
    pub phases: Phases,
}

/// Options of a deploy.
#[derive(Debug, Clone)]
pub struct Options {
    /// Path of `br2k.toml`.
    pub file: PathBuf,
    /// Do not wait for the roll-out.
    pub no_wait: bool,
    /// Roll-out timeout.
    pub timeout: Duration,
    /// Show progress on stderr.
    pub progress: bool,
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

fn say(progress: bool, line: impl AsRef<str>) {
    if progress {
        eprintln!("{}", line.as_ref());
    }
}

/// The project, its directory and the journal path.
pub fn open(file: &Path) -> CliResult<(Project, PathBuf, PathBuf)> {
    let project = Project::load(file)?;
    let base = file
        .parent()
        .map(Path::to_path_buf)
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("."));
    let journal = base.join(JOURNAL);
    Ok((project, base, journal))
}

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
    let bars: std::sync::Mutex<std::collections::HashMap<Digest, indicatif::ProgressBar>> =
        Default::default();
    let style = indicatif::ProgressStyle::with_template(
        "  {prefix:<40} [{bar:20}] {bytes}/{total_bytes} {bytes_per_sec}",
    )
    .expect("template")
    .progress_chars("=> ");
    std::sync::Arc::new(move |e| {
        let mut bars = bars.lock().unwrap_or_else(|p| p.into_inner());
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

/// Reads the active record; `None` when the service is not registered.
pub async fn active_opt(
    registry: &br2k_chain::ChainRegistry,
    id: &br2k_core::ServiceId,
) -> CliResult<Option<ServiceRecord>> {
    match registry.active(id).await {
        Ok(r) if r.stale => Err(CliError::fail(
            "chain RPC is down (only a stale record could be read)",
        )
        .hint("start the node or fix the context's rpc_urls; nothing was changed")),
        Ok(r) => Ok(Some(r)),
        Err(e) if e.kind() == br2k_core::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(CliError::from_core(&e, Some(id))),
    }
}

/// The plan of a deploy, touching nothing (reads only; builds in memory when the
/// source changed since the journal).
pub async fn plan(ctx: &Context, opts: &Options) -> CliResult<Plan> {
    let (project, base, jpath) = open(&opts.file)?;
    let id = project.id();
    let contract = format!("{:#x}", ctx.contract()?);
    let mut journal = Journal::load(&jpath, &project.service, &contract);
    let stores = ctx.stores()?;
    let resolved = resolve_image(&project, &base, &mut journal, false).await?;
    let repo = project.repository();
    let have = presence(&stores, &repo, &resolved.digest).await;
    let mut images = Vec::new();
    for (i, (s, h)) in stores.iter().zip(&have).enumerate() {
        images.push(ImagePlan {
            registry: s.registry().to_owned(),
            action: match h {
                Ok(true) => "present".into(),
                Ok(false) if i == 0 => "push".into(),
                Ok(false) => "copy".into(),
                Err(e) => format!("down: {e}"),
            },
        });
    }
    let registry = chain::connect(ctx, false).await?;
    let spec = project.spec(ctx.primary()?, resolved.digest)?;
    let active = active_opt(&registry, &id).await?;
    let chain_changes = match &active {
        Some(a) if a.spec_hash == spec.spec_hash() => Vec::new(),
        Some(a) => spec_changes(Some(&a.spec), &spec),
        None => spec_changes(None, &spec),
    };
    let state = match active.as_ref().map(|a| a.state) {
        None => Some("none → running".to_owned()),
        Some(ServiceState::Ready) => Some("ready → running".to_owned()),
        _ => None,
    };
    let client = ctx.kube().await?;
    let ns = &ctx.namespace;
    let mut kubernetes = Vec::new();
    match k::plan_cr(&client, ns, &id, &k::cr_spec(ctx, &id)?).await? {
        CrChange::Create => kubernetes.push(format!("Br2kService {ns}/{id}: create")),
        CrChange::Update => kubernetes.push(format!("Br2kService {ns}/{id}: update")),
        CrChange::Unchanged => {}
    }
    let live = k::live(&client, ns, &id).await?;
    let base_name = br2k_k8s::Names::of(&id).base;
    let will_run = matches!(
        active.as_ref().map(|a| a.state),
        None | Some(ServiceState::Ready | ServiceState::Running)
    );
    if will_run {
        if !live.statefulset {
            kubernetes.push(format!(
                "StatefulSet {ns}/{base_name}: create with {} replicas on {}",
                spec.replicas, resolved.digest
            ));
        } else {
            if live.template_digest.as_deref() != Some(resolved.digest.to_string().as_str()) {
                kubernetes.push(format!(
                    "StatefulSet {ns}/{base_name}: roll out {} → {}",
                    live.template_digest.as_deref().unwrap_or("-"),
                    resolved.digest
                ));
            }
            let new_replicas =
                if chain_changes.iter().any(|c| c.field == "replicas") || active.is_none() {
                    spec.replicas
                } else {
                    active.as_ref().map_or(spec.replicas, |a| a.replicas)
                };
            if live.replicas != Some(new_replicas as i32) {
                kubernetes.push(format!(
                    "StatefulSet {ns}/{base_name}: replicas {} → {new_replicas}",
                    live.replicas.map_or("-".into(), |r| r.to_string())
                ));
            }
        }
    }
    Ok(Plan {
        service: id.to_string(),
        digest: resolved.digest.to_string(),
        register: active.is_none(),
        chain: chain_changes,
        state,
        images,
        kubernetes,
    })
}

/// A seam for the crash tests: with `BR2K_DEPLOY_PAUSE_AFTER=STEP` (push, chain or
/// apply) the deploy sleeps 5 s after recording that step, so that a test kills it at
/// exactly that point. Unset, it does nothing.
async fn pause_after(step: &str) {
    if std::env::var("BR2K_DEPLOY_PAUSE_AFTER").is_ok_and(|s| s == step) {
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
}

/// Runs a deploy (see the module docs).
pub async fn run(ctx: &Context, opts: &Options) -> CliResult<Report> {
    let t0 = Instant::now();
    let mut phases = Phases::default();
    let (project, base, jpath) = open(&opts.file)?;
    let id = project.id();
    let contract = format!("{:#x}", ctx.contract()?);
    let mut journal = Journal::load(&jpath, &project.service, &contract);
    let original = journal.clone();
    let stores = ctx.stores()?;
    let p = opts.progress;

    // 1. The image digest (built only when the source changed).
    let t = Instant::now();
    let mut resolved = resolve_image(&project, &base, &mut journal, p).await?;
    let digest = resolved.digest;
    phases.build_ms = ms(t.elapsed());
    if journal != original {
        journal.save(&jpath)?;
    }

    // Reach the chain and the cluster before pushing: a node or an API server that is
    // down fails here, with nothing pushed or published.
    let t = Instant::now();
    let registry = chain::connect(ctx, true).await?;
    phases.chain_ms += ms(t.elapsed());
    let t = Instant::now();
    let client = ctx.kube().await?;
    let ns = ctx.namespace.clone();
    k::get_cr(&client, &ns, &id).await?;
    phases.apply_ms += ms(t.elapsed());

    // 2. Push and mirror.
    let t = Instant::now();
    let blobs_pushed = push_and_mirror(&project, &stores, &mut resolved, p).await?;
    let push = PushStep {
        digest: digest.to_string(),
        registries: ctx.oci_registries.clone(),
        blobs_pushed,
    };
    if journal.push.as_ref().map(|s| (&s.digest, &s.registries))
        != Some((&push.digest, &push.registries))
    {
        journal.push = Some(push);
        journal.save(&jpath)?;
    }
    pause_after("push").await;
    phases.push_ms = ms(t.elapsed());
    say(p, format!("image {digest} in {} registries", stores.len()));

    // 3. The record.
    let t = Instant::now();
    let spec = project.spec(ctx.primary()?, digest)?;
    let hash = spec.spec_hash();
    let mut published = false;
    let mut record = match active_opt(&registry, &id).await? {
        None => {
            say(p, format!("registering {id} on chain"));
            published = true;
            registry.register(&id, &spec).await.for_service(&id)?
        }
        Some(a) if a.spec_hash != hash => {
            say(
                p,
                format!("publishing version {} of {id}", a.latest_version + 1),
            );
            published = true;
            registry.publish(&id, &spec).await.for_service(&id)?
        }
        Some(a) => a,
    };
    if record.state == ServiceState::Ready {
        // A registered service starts once (also after a crash between the two).
        record = registry
            .set_state(&id, ServiceState::Running)
            .await
            .for_service(&id)?;
        published = true;
    }
    let step_is_current = journal
        .chain
        .as_ref()
        .is_some_and(|c| c.spec_hash == hash.to_string() && c.version == record.version);
    let (tx, block) = if step_is_current {
        let c = journal.chain.as_ref().expect("checked");
        (c.tx.clone(), c.block)
    } else {
        let events = chain::version_events(ctx, &id, registry.deploy_block()).await?;
        let ev = events.into_iter().find(|e| e.version == record.version);
        journal.chain = Some(ChainStep {
            spec_hash: hash.to_string(),
            version: record.version,
            tx: ev.as_ref().map(|e| e.tx.clone()),
            block: ev.as_ref().map(|e| e.block),
        });
        journal.save(&jpath)?;
        pause_after("chain").await;
        (ev.as_ref().map(|e| e.tx.clone()), ev.map(|e| e.block))
    };
    let _ = block;
    phases.chain_ms += ms(t.elapsed());
    say(
        p,
        format!(
            "record: {id} v{} {} ({} replicas){}",
            record.version,
            record.state,
            record.replicas,
            tx.as_deref()
                .map(|t| format!(", tx {t}"))
                .unwrap_or_default()
        ),
    );

    if matches!(record.state, ServiceState::Paused | ServiceState::Stopped) {
        // Deploy never changes a state the owner chose; say what runs.
        eprintln!(
            "note: {id} is {}: version {} is recorded but runs no replica (`br2k resume {id}` starts it)",
            record.state, record.version
        );
    }

    // 4. The resource.
    let t = Instant::now();
    let change = k::apply_cr(&client, &ns, &id, &k::cr_spec(ctx, &id)?).await?;
    let apply = ApplyStep {
        resource: format!("{ns}/{id}"),
        version: record.version,
    };
    if journal.apply.as_ref() != Some(&apply) {
        journal.apply = Some(apply);
        journal.save(&jpath)?;
        pause_after("apply").await;
    }
    phases.apply_ms += ms(t.elapsed());

    // 5. The roll-out.
    let mut ready_replicas = 0;
    if !opts.no_wait {
        let t = Instant::now();
        k::wait(&client, &ns, &record, opts.timeout, p).await?;
        phases.wait_ms = ms(t.elapsed());
        ready_replicas = record.desired_replicas();
        let ready = ReadyStep {
            version: record.version,
            replicas: ready_replicas,
        };
        if journal.ready.as_ref() != Some(&ready) {
            journal.ready = Some(ready);
            journal.save(&jpath)?;
        }
    }
    phases.total_ms = ms(t0.elapsed());
    Ok(Report {
        service: id.to_string(),
        digest: digest.to_string(),
        version: record.version,
        published,
        tx,
        blobs_pushed,
        resource: change,
        wrote: published || blobs_pushed > 0 || change != CrChange::Unchanged,
        ready_replicas,
        phases,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use br2k_core::{ImageRef, Repository};

    fn spec(d: &[u8], replicas: u32) -> ServiceSpec {
        let image = ImageRef::new(
            "127.0.0.1:5000",
            Repository::new("br2k/x").expect("repo"),
            None,
            Some(Digest::of(d)),
        )
        .expect("ref");
        ServiceSpec::new(image, replicas).expect("spec")
    }

    #[test]
    fn spec_changes_lists_changed_fields_old_to_new() {
        let a = spec(b"a", 3);
        assert!(spec_changes(Some(&a), &a).is_empty());
        let b = spec(b"b", 5);
        let c = spec_changes(Some(&a), &b);
        let fields: Vec<&str> = c.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(fields, vec!["image", "replicas"]);
        assert_eq!(c[1].old.as_deref(), Some("3"));
        assert_eq!(c[1].new, "5");
        let all = spec_changes(None, &a);
        assert!(all.iter().all(|c| c.old.is_none()));
        let fields: Vec<&str> = all.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(
            fields,
            vec!["image", "replicas"],
            "empty fields of a new service are left out"
        );
    }

    #[test]
    fn the_journal_is_reset_for_another_service_or_contract() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join(JOURNAL);
        let mut j = Journal::load(&path, "a", "0x1");
        j.chain = Some(ChainStep {
            spec_hash: "h".into(),
            version: 2,
            tx: None,
            block: None,
        });
        j.save(&path).expect("save");
        assert_eq!(Journal::load(&path, "a", "0x1"), j);
        assert!(Journal::load(&path, "b", "0x1").chain.is_none());
        assert!(Journal::load(&path, "a", "0x2").chain.is_none());
    }

    #[test]
    fn a_plan_without_changes_says_so() {
        let mut p = Plan {
            service: "x".into(),
            digest: "d".into(),
            register: false,
            chain: vec![],
            state: None,
            images: vec![ImagePlan {
                registry: "r".into(),
                action: "present".into(),
            }],
            kubernetes: vec![],
        };
        assert!(!p.has_changes());
        p.images[0].action = "copy".into();
        assert!(p.has_changes());
    }
}
