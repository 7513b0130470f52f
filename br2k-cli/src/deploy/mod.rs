//! `br2k deploy`: build, push and mirror, publish on chain, apply the resource, wait.
//! Resumable through a journal next to `br2k.toml`; `--dry-run`/`diff` print the plan.

mod image;
mod journal;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use br2k_core::{ImageStore, Registry, ServiceRecord, ServiceState};
use serde::Serialize;

use crate::chain;
use crate::context::Context;
use crate::error::{CliError, CliResult, ForService};
use crate::kube::{self as k, CrChange};
use crate::project::Project;

pub use image::{presence, push_and_mirror, resolve_image};
pub use journal::{
    ApplyStep, BuildStep, ChainStep, FieldChange, JOURNAL, Journal, PushStep, ReadyStep,
    spec_changes,
};

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
