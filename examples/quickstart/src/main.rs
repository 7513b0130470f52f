//! br2k quickstart on the in-memory backends (no services needed).
//!
//! Registers a service (3 replicas, image in a primary registry and a mirror), starts
//! it, runs the supervisor, injects each failure class in turn, waits for the
//! supervisor to recover, and prints a table (or JSON with `--output json`).
//! Exits non-zero when a failure was not recovered.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use br2k_core::artifact::{Blob, Image, OCI_CONFIG, OCI_LAYER_TAR};
use br2k_core::fault::{FaultHandle, Faulty};
use br2k_core::memory::{InMemoryImageStore, InMemoryRegistry, InMemoryReplicator};
use br2k_core::supervisor::{Supervisor, SupervisorEvent};
use br2k_core::{
    Digest, Error, ImageRef, ImageStore, Port, Recoverer, RecoveryAction, Registry, Replicator,
    Repository, ServiceId, ServiceSpec,
};
use tokio::sync::{broadcast, oneshot};

const PRIMARY: &str = "registry.primary.local";
const MIRROR: &str = "registry.mirror.local";
/// Longest wait for one recovery.
const TIMEOUT: Duration = Duration::from_secs(15);

/// The failure classes, in the order they are injected.
#[derive(Debug, Clone, Copy)]
enum Failure {
    DeleteWorkload,
    Scale,
    ChangeImage,
    TamperTemplate,
    FailReplica,
    DeleteImageFromPrimary,
    CorruptPrimaryBlob,
    PrimaryRegistryDown,
    ChainDown,
    StopService,
}

impl Failure {
    const ALL: [Failure; 10] = [
        Failure::DeleteWorkload,
        Failure::Scale,
        Failure::ChangeImage,
        Failure::TamperTemplate,
        Failure::FailReplica,
        Failure::DeleteImageFromPrimary,
        Failure::CorruptPrimaryBlob,
        Failure::PrimaryRegistryDown,
        Failure::ChainDown,
        Failure::StopService,
    ];

    fn label(self) -> &'static str {
        match self {
            Failure::DeleteWorkload => "delete workload",
            Failure::Scale => "scale to 7 replicas",
            Failure::ChangeImage => "change image",
            Failure::TamperTemplate => "tamper template (env)",
            Failure::FailReplica => "fail a replica",
            Failure::DeleteImageFromPrimary => "delete image from primary",
            Failure::CorruptPrimaryBlob => "corrupt primary blob",
            Failure::PrimaryRegistryDown => "primary down + workload lost",
            Failure::ChainDown => "chain down + workload lost",
            Failure::StopService => "stop service (must be removed)",
        }
    }

    /// The finding that shows the supervisor detected it.
    fn finding(self) -> &'static str {
        match self {
            Failure::DeleteWorkload | Failure::PrimaryRegistryDown | Failure::ChainDown => {
                "missing_workload"
            }
            Failure::Scale => "replicas_drifted",
            Failure::ChangeImage => "image_drifted",
            Failure::TamperTemplate => "template_tampered",
            Failure::FailReplica => "replicas_unhealthy",
            Failure::DeleteImageFromPrimary => "image_unavailable",
            Failure::CorruptPrimaryBlob => "image_tampered",
            Failure::StopService => "unexpected_workload",
        }
    }

    /// Findings that remain once recovered (the outage itself persists).
    fn residual(self) -> &'static [&'static str] {
        match self {
            Failure::PrimaryRegistryDown => &["registry_down"],
            Failure::ChainDown => &["chain_endpoint_down"],
            _ => &[],
        }
    }
}

/// The demo world: backends, their fault controls and the supervisor.
struct World {
    registry: InMemoryRegistry,
    chain: FaultHandle,
    replicator: InMemoryReplicator,
    primary: InMemoryImageStore,
    primary_faults: FaultHandle,
    mirror: InMemoryImageStore,
    supervisor: Arc<Supervisor>,
    id: ServiceId,
    repo: Repository,
    image: Image,
}

/// One row of the result table.
struct Row {
    failure: Failure,
    detected_after: Option<Duration>,
    recovered_after: Option<Duration>,
    actions: Vec<String>,
    error: Option<String>,
}

fn demo_image() -> Image {
    let config = Blob::new(
        OCI_CONFIG,
        r#"{"architecture":"amd64","os":"linux","config":{"Cmd":["/ledger"]},"rootfs":{"type":"layers","diff_ids":[]}}"#,
    );
    let layer = Blob::new(OCI_LAYER_TAR, vec![7u8; 64 * 1024]);
    Image::build(config, vec![layer], None)
}

async fn build_world() -> Result<World, Error> {
    let registry = InMemoryRegistry::new("operator");
    let faulty_registry = Faulty::new(registry.clone());
    let chain = faulty_registry.handle();
    let replicator = InMemoryReplicator::new();
    let primary = InMemoryImageStore::new(PRIMARY);
    let faulty_primary = Faulty::new(primary.clone());
    let primary_faults = faulty_primary.handle();
    let mirror = InMemoryImageStore::new(MIRROR);

    let repo = Repository::new("demo/ledger")?;
    let image = demo_image();
    primary.push(&repo, &image, Some("1.0")).await?;
    mirror.push(&repo, &image, Some("1.0")).await?;

    let mut spec = ServiceSpec::new(
        ImageRef::new(PRIMARY, repo.clone(), Some("1.0"), Some(image.digest))?,
        3,
    )?;
    spec.ports.push(Port {
        name: "http".into(),
        port: 8080,
    });
    spec.env.insert("LOG_LEVEL".into(), "info".into());
    spec.validate()?;

    let supervisor = Supervisor::builder()
        .registry(Arc::new(faulty_registry))
        .replicator(Arc::new(replicator.clone()))
        .image_store(Arc::new(faulty_primary))
        .image_store(Arc::new(mirror.clone()))
        .resync(Duration::from_millis(200))
        .backoff(Duration::from_millis(50), Duration::from_secs(2))
        .verify_ttl(Duration::from_millis(100))
        .build()?;
    let id = ServiceId::new("ledger")?;
    registry.register(&id, &spec).await?;
    Ok(World {
        registry,
        chain,
        replicator,
        primary,
        primary_faults,
        mirror,
        supervisor: Arc::new(supervisor),
        id,
        repo,
        image,
    })
}

impl World {
    async fn inject(&self, failure: Failure) -> Result<(), Error> {
        let id = &self.id;
        match failure {
            Failure::DeleteWorkload => self.replicator.delete_workload(id),
            Failure::Scale => self.replicator.set_live_replicas(id, 7),
            Failure::ChangeImage => {
                let other = ImageRef::new(
                    PRIMARY,
                    self.repo.clone(),
                    Some("evil"),
                    Some(Digest::of(b"not the recorded image")),
                )?;
                self.replicator.set_live_image(id, other)
            }
            Failure::TamperTemplate => self.replicator.tamper_template(id, |t| {
                t.env.insert("LOG_LEVEL".into(), "trace".into());
            }),
            Failure::FailReplica => self.replicator.fail_replica(id, "ledger-1"),
            Failure::DeleteImageFromPrimary => {
                self.primary.remove_image(&self.repo, &self.image.digest)
            }
            Failure::CorruptPrimaryBlob => self.primary.corrupt_blob(&self.image.layers[0].digest),
            Failure::PrimaryRegistryDown => {
                self.primary_faults.set_down(true);
                self.replicator.delete_workload(id)
            }
            Failure::ChainDown => {
                self.chain.set_down(true);
                self.replicator.delete_workload(id)
            }
            Failure::StopService => self.registry.stop(id).await.map(drop),
        }
    }

    /// Whether the service is back in its recorded state (apart from the outage the
    /// failure itself keeps going).
    async fn recovered(&self, failure: Failure) -> Result<bool, Error> {
        let live = self.replicator.observe(&self.id).await?;
        if matches!(failure, Failure::StopService) {
            return Ok(live.is_none());
        }
        let findings = self.supervisor.diagnose(&self.id).await?.findings;
        let names: Vec<&str> = findings.iter().map(|f| f.name()).collect();
        if names != failure.residual() {
            return Ok(false);
        }
        // Independent checks of the repaired images.
        Ok(match failure {
            Failure::DeleteImageFromPrimary | Failure::CorruptPrimaryBlob => self
                .primary
                .verify(&self.repo, &self.image.digest)
                .await
                .is_ok(),
            _ => true,
        })
    }

    /// Ends an outage injected by `failure`.
    async fn heal(&self, failure: Failure) -> Result<(), Error> {
        match failure {
            Failure::PrimaryRegistryDown => self.primary_faults.set_down(false),
            Failure::ChainDown => self.chain.set_down(false),
            _ => return Ok(()),
        }
        // Wait until the supervisor sees everything healthy again.
        let start = Instant::now();
        while !self.supervisor.diagnose(&self.id).await?.is_healthy() {
            if start.elapsed() > TIMEOUT {
                return Err(Error::unavailable("not healthy after the outage ended"));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }
}

fn describe(action: &RecoveryAction) -> String {
    match action {
        RecoveryAction::ApplyRecord { version, registry } => {
            format!("apply v{version} from {registry}")
        }
        RecoveryAction::ReplaceReplicas { replicas } => format!("replace {}", replicas.join(",")),
        RecoveryAction::RemoveWorkload => "remove workload".into(),
        RecoveryAction::RepairImage { from, to } => format!("copy image {from} -> {to}"),
        RecoveryAction::UseLastVerifiedRecord => "use last verified record".into(),
        RecoveryAction::Wait { reason } => format!("wait ({reason})"),
        other => format!("{other:?}"),
    }
}

async fn run_failure(
    world: &World,
    failure: Failure,
    events: &mut broadcast::Receiver<SupervisorEvent>,
) -> Row {
    // Forget events from before this injection.
    while events.try_recv().is_ok() {}
    let mut row = Row {
        failure,
        detected_after: None,
        recovered_after: None,
        actions: Vec::new(),
        error: None,
    };
    let injected = Instant::now();
    if let Err(e) = world.inject(failure).await {
        row.error = Some(format!("injection failed: {e}"));
        return row;
    }
    loop {
        while let Ok(event) = events.try_recv() {
            if event.id != world.id {
                continue;
            }
            let detected = event
                .report
                .diagnosis
                .findings
                .iter()
                .any(|f| f.name() == failure.finding());
            if detected && row.detected_after.is_none() {
                row.detected_after = Some(event.detected_at.saturating_duration_since(injected));
            }
            for a in &event.report.actions {
                let text = describe(&a.action);
                if !row.actions.contains(&text) {
                    row.actions.push(text);
                }
            }
        }
        if row.detected_after.is_some() {
            match world.recovered(failure).await {
                Ok(true) => {
                    row.recovered_after = Some(injected.elapsed());
                    break;
                }
                Ok(false) => {}
                Err(e) => row.error = Some(e.to_string()),
            }
        }
        if injected.elapsed() > TIMEOUT {
            row.error.get_or_insert_with(|| "timed out".into());
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    if row.recovered_after.is_some()
        && let Err(e) = world.heal(failure).await
    {
        row.error = Some(format!("after the outage: {e}"));
    }
    row
}

fn ms(d: Option<Duration>) -> String {
    d.map_or_else(
        || "-".into(),
        |d| format!("{:.1} ms", d.as_secs_f64() * 1000.0),
    )
}

fn print_table(rows: &[Row]) {
    let w = rows
        .iter()
        .map(|r| r.failure.label().len())
        .max()
        .unwrap_or(7)
        .max(7);
    println!(
        "{:<w$}  {:>14}  {:>15}  actions",
        "failure", "detected after", "recovered after"
    );
    println!("{}", "-".repeat(w + 2 + 14 + 2 + 15 + 2 + 40));
    for r in rows {
        let actions = match &r.error {
            Some(e) => format!("NOT RECOVERED: {e}; {}", r.actions.join("; ")),
            None => r.actions.join("; "),
        };
        println!(
            "{:<w$}  {:>14}  {:>15}  {}",
            r.failure.label(),
            ms(r.detected_after),
            ms(r.recovered_after),
            actions
        );
    }
}

fn print_json(rows: &[Row], metrics: &br2k_core::supervisor::SupervisorMetrics) {
    let rows: Vec<_> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "failure": r.failure.label(),
                "finding": r.failure.finding(),
                "detected_after_ms": r.detected_after.map(|d| d.as_secs_f64() * 1000.0),
                "recovered_after_ms": r.recovered_after.map(|d| d.as_secs_f64() * 1000.0),
                "recovered": r.error.is_none() && r.recovered_after.is_some(),
                "actions": r.actions,
                "error": r.error,
            })
        })
        .collect();
    let out = serde_json::json!({ "failures": rows, "metrics": metrics });
    println!(
        "{}",
        serde_json::to_string_pretty(&out).expect("JSON values serialize")
    );
}

fn parse_args() -> Result<bool, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut json = false;
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--output" | "-o" => {
                match args.get(i + 1).map(String::as_str) {
                    Some("json") => json = true,
                    Some("table") => json = false,
                    other => return Err(format!("--output takes table or json, not {other:?}")),
                }
                i += 1;
            }
            "--help" | "-h" => {
                return Err("usage: quickstart [--output table|json]".into());
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
        i += 1;
    }
    Ok(json)
}

#[tokio::main]
async fn main() -> ExitCode {
    let json = match parse_args() {
        Ok(j) => j,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let world = match build_world().await {
        Ok(w) => w,
        Err(e) => {
            eprintln!("setup failed: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut events = world.supervisor.subscribe();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let runner = tokio::spawn(Arc::clone(&world.supervisor).run(async {
        let _ = stop_rx.await;
    }));

    eprintln!(
        "registered {} (3 replicas of {}), image in {PRIMARY} and {MIRROR}",
        world.id, world.image.digest
    );
    let started = Instant::now();
    if let Err(e) = world.registry.resume(&world.id).await {
        eprintln!("resume failed: {e}");
        return ExitCode::FAILURE;
    }
    // Deployment: the supervisor applies the record on its own.
    let deployed = loop {
        match world.supervisor.diagnose(&world.id).await {
            Ok(d) if d.is_healthy() => break true,
            _ if started.elapsed() > TIMEOUT => break false,
            _ => tokio::time::sleep(Duration::from_millis(2)).await,
        }
    };
    if !deployed {
        eprintln!("the service was not deployed within {TIMEOUT:?}");
        return ExitCode::FAILURE;
    }
    eprintln!(
        "deployed 3 replicas in {:.1} ms; injecting {} failures",
        started.elapsed().as_secs_f64() * 1000.0,
        Failure::ALL.len()
    );

    let mut rows = Vec::new();
    for (i, failure) in Failure::ALL.into_iter().enumerate() {
        eprint!(
            "[{}/{}] {} ... ",
            i + 1,
            Failure::ALL.len(),
            failure.label()
        );
        let row = run_failure(&world, failure, &mut events).await;
        match (&row.error, row.recovered_after) {
            (None, Some(d)) => eprintln!("recovered in {}", ms(Some(d))),
            (e, _) => eprintln!("NOT recovered: {}", e.as_deref().unwrap_or("unknown")),
        }
        rows.push(row);
    }
    let _ = stop_tx.send(());
    let _ = runner.await;

    let metrics = world.supervisor.metrics();
    if json {
        print_json(&rows, &metrics);
    } else {
        print_table(&rows);
        let by: BTreeMap<_, _> = metrics.recoveries_by_finding.iter().collect();
        println!(
            "\nsupervisor: {} reconciles, {} recoveries, {} change events; recoveries by finding: {:?}",
            metrics.reconciles, metrics.recoveries, metrics.change_events, by
        );
        println!(
            "image copies: primary has the image again: {}; mirror intact: {}",
            world
                .primary
                .verify(&world.repo, &world.image.digest)
                .await
                .is_ok(),
            world
                .mirror
                .verify(&world.repo, &world.image.digest)
                .await
                .is_ok()
        );
    }
    let failed = rows
        .iter()
        .filter(|r| r.error.is_some() || r.recovered_after.is_none())
        .count();
    if failed > 0 {
        eprintln!("{failed} failure(s) not recovered");
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
