//! The commands that read: `br2k diff`, `status`, `history` and `recover`.

use std::io::IsTerminal;
use std::time::Duration;

use br2k_core::{Recoverer, Registry, ServiceId, ServiceRecord, ServiceState};
use serde_json::json;

use crate::args::*;
use crate::context::Context;
use crate::error::{CliError, CliResult, EXIT_OK, EXIT_USAGE, ForService};
use crate::{chain, current, deploy, kube, print_json, service_id, table};

pub(crate) async fn diff(
    cli: &Cli,
    ctx: &Context,
    opts: &deploy::Options,
    exit_code: bool,
) -> CliResult<u8> {
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

pub(crate) fn state_name(s: ServiceState) -> String {
    s.to_string()
}

/// The status of `id` as JSON: the record next to the live state and the operator's.
pub(crate) async fn snapshot(
    reg: &br2k_chain::ChainRegistry,
    client: &::kube::Client,
    ns: &str,
    id: &ServiceId,
) -> CliResult<serde_json::Value> {
    let rec = reg.active(id).await.for_service(id)?;
    let live = kube::live(client, ns, id).await?;
    let st = kube::cr_status(client, ns, id).await?;
    let pending = kube::pending(&rec, &live);
    let ready = kube::ready_on_digest(&rec, &live);
    let mut running: Vec<String> = live.pods.iter().filter_map(|p| p.digest.clone()).collect();
    running.sort();
    running.dedup();
    Ok(json!({
        "service": id.as_str(),
        "record": record_json(&rec),
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

/// The `record` part of a status: what the chain records of the service, its
/// placement (active cluster and epoch, `null` unless placed) among it.
pub(crate) fn record_json(rec: &ServiceRecord) -> serde_json::Value {
    let digest = rec
        .spec
        .image
        .digest()
        .map(|d| d.to_string())
        .unwrap_or_default();
    json!({
        "version": rec.version,
        "latest_version": rec.latest_version,
        "digest": digest,
        "image": rec.spec.image.to_string(),
        "replicas": rec.replicas,
        "state": state_name(rec.state),
        "owner": rec.owner.0,
        "location": rec.location,
        "checkpoint": rec.checkpoint,
        "placement": rec.placement,
        "block": rec.as_of,
        "stale": rec.stale,
    })
}

pub(crate) fn render_status(v: &serde_json::Value) {
    println!("service {}", s(&v["service"]));
    table(&["", "on chain", "live"], &status_rows(v));
}

/// A JSON value as a table cell (`-` for null).
fn s(p: &serde_json::Value) -> String {
    match p {
        serde_json::Value::String(x) => x.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// The rows of the human status table.
fn status_rows(v: &serde_json::Value) -> Vec<Vec<String>> {
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
                .map(|f| f.iter().map(s).collect::<Vec<_>>().join(","))
                .unwrap_or_default()
        )
    };
    let running = l["running_digests"]
        .as_array()
        .map(|d| d.iter().map(s).collect::<Vec<_>>().join(","))
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
        vec![
            "placement".into(),
            if r["placement"].is_null() {
                "-".into()
            } else {
                format!(
                    "{} (epoch {})",
                    s(&r["placement"]["cluster"]),
                    s(&r["placement"]["epoch"])
                )
            },
            placement_view(&op["placement"]),
        ],
        vec!["operator".into(), String::new(), s(&op["phase"])],
        vec!["conditions".into(), String::new(), cond],
        vec!["last recovery".into(), String::new(), last],
        vec![
            "last failover".into(),
            String::new(),
            failover_timeline(&op["placement"]["lastFailover"]),
        ],
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
    rows
}

/// What this cluster's operator sees of the placement (its resource status):
/// `eu-1: standby (active us-2, epoch 9)`, and why nothing happens when it says so.
fn placement_view(p: &serde_json::Value) -> String {
    if p.is_null() {
        return "-".into();
    }
    let mut out = format!("{}: {}", s(&p["cluster"]), s(&p["decision"]));
    if !p["activeCluster"].is_null() || !p["epoch"].is_null() {
        out.push_str(&format!(
            " (active {}, epoch {})",
            s(&p["activeCluster"]),
            s(&p["epoch"])
        ));
    }
    if !p["message"].is_null() {
        out.push_str(&format!(": {}", s(&p["message"])));
    }
    out
}

/// The steps of the last failover to this cluster, in order (`-` when none).
fn failover_timeline(t: &serde_json::Value) -> String {
    let steps: Vec<String> = [
        ("detected", "detected"),
        ("leaseAcquired", "lease acquired"),
        ("recorded", "recorded"),
        ("deployed", "deployed"),
        ("ready", "ready"),
    ]
    .iter()
    .filter(|(k, _)| !t[*k].is_null())
    .map(|(k, name)| format!("{name} {}", s(&t[*k])))
    .collect();
    if steps.is_empty() {
        "-".into()
    } else {
        steps.join(", ")
    }
}

/// The snapshot without what changes on every read (the block it was read at).
pub(crate) fn comparable(v: &serde_json::Value) -> serde_json::Value {
    let mut v = v.clone();
    v["record"]["block"] = serde_json::Value::Null;
    v
}

pub(crate) async fn status(
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

pub(crate) async fn history(cli: &Cli, service: &str) -> CliResult<u8> {
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

/// The core supervisor over the real backends of `ctx` (read-only chain connection,
/// the context's registries, the cluster): the operator's composition, run once.
pub(crate) async fn supervisor(
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

pub(crate) async fn recover(cli: &Cli, service: &str, dry_run: bool) -> CliResult<u8> {
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
pub(crate) fn utc(secs: u64) -> String {
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

    use br2k_core::memory::InMemoryRegistry;
    use br2k_core::{Placement, ServiceSpec};

    /// A status as `snapshot` builds it, around the record of a registered service.
    async fn status_of(placement: Option<&Placement>) -> serde_json::Value {
        let reg = InMemoryRegistry::new("0x1111111111111111111111111111111111111111");
        let id = ServiceId::new("ledger").expect("id");
        let spec = ServiceSpec::from_json_bytes(
            br#"{"image":"registry.example/ledger@sha256:1111111111111111111111111111111111111111111111111111111111111111","replicas":3,"clusters":["eu-1","us-2"]}"#,
        )
        .expect("spec");
        reg.register(&id, &spec).await.expect("register");
        if let Some(p) = placement {
            reg.set_placement(&id, p).await.expect("placement");
        }
        let rec = reg.active(&id).await.expect("active");
        json!({
            "service": id.as_str(),
            "record": record_json(&rec),
            "live": {"pods": []},
            "in_sync": true,
            "operator": null,
        })
    }

    fn row<'a>(rows: &'a [Vec<String>], name: &str) -> &'a [String] {
        rows.iter()
            .find(|r| r[0] == name)
            .unwrap_or_else(|| panic!("no {name} row in {rows:?}"))
    }

    #[tokio::test]
    async fn status_shows_the_placement_in_json_and_in_the_table() {
        let placed = Placement::new("us-2", 9).expect("placement");
        let v = status_of(Some(&placed)).await;
        assert_eq!(
            v["record"]["placement"],
            json!({"cluster": "us-2", "epoch": 9}),
            "{v}"
        );
        assert_eq!(row(&status_rows(&v), "placement")[1], "us-2 (epoch 9)");

        assert_eq!(
            row(&status_rows(&v), "placement")[2],
            "-",
            "no operator view"
        );

        // The operator's view (its resource status) in the live column.
        let mut v = v;
        v["operator"] = json!({
            "phase": "Healthy",
            "placement": {
                "cluster": "eu-1",
                "decision": "standby",
                "activeCluster": "us-2",
                "epoch": 9,
                "lastFailover": {
                    "detected": "2026-12-07T00:00:01.000Z",
                    "leaseAcquired": "2026-12-07T00:00:06.000Z",
                    "ready": "2026-12-07T00:00:09.000Z"
                }
            }
        });
        let rows = status_rows(&v);
        assert_eq!(
            row(&rows, "placement")[2],
            "eu-1: standby (active us-2, epoch 9)"
        );
        assert_eq!(
            row(&rows, "last failover")[2],
            "detected 2026-12-07T00:00:01.000Z, lease acquired 2026-12-07T00:00:06.000Z, \
             ready 2026-12-07T00:00:09.000Z"
        );
        v["operator"]["placement"] = json!({
            "cluster": "eu-1",
            "decision": "braked",
            "message": "2 of 3 clusters look lost"
        });
        assert_eq!(
            row(&status_rows(&v), "placement")[2],
            "eu-1: braked: 2 of 3 clusters look lost"
        );

        // An unplaced service: null in JSON, "-" in the table.
        let v = status_of(None).await;
        assert!(v["record"]["placement"].is_null(), "{v}");
        assert_eq!(row(&status_rows(&v), "placement")[1], "-");
        assert_eq!(row(&status_rows(&v), "last failover")[2], "-");
        assert_eq!(row(&status_rows(&v), "version")[1], "1 (latest 1)");
    }

    #[test]
    fn utc_formats_unix_seconds() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc(1_796_536_670), "2026-12-06 05:57:50");
    }
}
