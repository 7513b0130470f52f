//! The `br2k` binary as a process against the real stack (`source .stack/env`): the
//! stack's anvil, two Distribution registries of the test's own (killable), the API
//! server, and (for the lifecycle) the operator binary as its own process. Every end
//! state is checked independently: the chain through a read-only `ChainRegistry`, the
//! cluster with kubectl, the registries over HTTP.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use br2k_chain::{ChainConfig, ChainRegistry};
use br2k_core::{Registry, ServiceId, ServiceRecord};
use serde_json::Value;
use support::{ACCOUNT7, Br2k, OciRegistry, Operator, Stack, poll};

const ACCOUNT8: &str = "0x23618e81e3f5cdf7f54c3d65f7fbc0abf5b21e8f";
const ACCOUNT9: &str = "0xa0ee7a142d267c1f36714e4a8f75612f20a79720";

struct Chain {
    rt: tokio::runtime::Runtime,
    registry: ChainRegistry,
}

impl Chain {
    /// A read-only handle on the contract at `address` (independent of the CLI).
    fn connect(rpc: &str, address: &str) -> Self {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let config = ChainConfig::new(ChainConfig::parse_urls(rpc).expect("url"))
            .with_registry(address.parse().expect("address"));
        let registry = rt
            .block_on(ChainRegistry::connect(config))
            .expect("connect");
        Self { rt, registry }
    }

    fn active(&self, id: &ServiceId) -> ServiceRecord {
        self.rt
            .block_on(self.registry.active(id))
            .expect("active record")
    }

    fn registered(&self, id: &ServiceId) -> bool {
        match self.rt.block_on(self.registry.active(id)) {
            Ok(_) => true,
            Err(e) if e.kind() == br2k_core::ErrorKind::NotFound => false,
            Err(e) => panic!("read {id}: {e}"),
        }
    }
}

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

fn prepare_cluster(stack: &Stack, ns: &str) {
    support::prepare_cluster(stack, &deploy_dir(), ns);
}

use support::cleanup;

/// The live StatefulSet summary: (spec replicas, ready replicas, template image).
fn sts(stack: &Stack, ns: &str, name: &str) -> Option<(i64, i64, String)> {
    let s = stack.get_json(ns, "statefulset", name)?;
    Some((
        s["spec"]["replicas"].as_i64().unwrap_or(-1),
        s["status"]["readyReplicas"].as_i64().unwrap_or(0),
        s["spec"]["template"]["spec"]["containers"][0]["image"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    ))
}

/// Pods of service `id` that are Ready and run `digest`, and all pods.
fn pods_on(stack: &Stack, ns: &str, id: &str, digest: &str) -> (usize, usize) {
    let (ok, text) = stack.kubectl(&["-n", ns, "get", "pods", "-o", "json"]);
    assert!(ok, "{text}");
    let v: Value = serde_json::from_str(&text).expect("json");
    let mut ready = 0;
    let mut all = 0;
    for p in v["items"].as_array().into_iter().flatten() {
        let name = p["metadata"]["name"].as_str().unwrap_or_default();
        if !name.starts_with(&format!("{id}-")) || !p["metadata"]["deletionTimestamp"].is_null() {
            continue;
        }
        all += 1;
        let is_ready = p["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        let image = p["spec"]["containers"][0]["image"]
            .as_str()
            .unwrap_or_default();
        if is_ready && image.ends_with(&format!("@{digest}")) {
            ready += 1;
        }
    }
    (ready, all)
}

/// Asserts the live workload runs `replicas` Ready replicas on `digest`: the pods at
/// once (what the CLI waited for), the StatefulSet's own status once its controller
/// has counted them (it lags the pods, by seconds on a loaded machine).
fn assert_running(stack: &Stack, ns: &str, id: &str, replicas: i64, digest: &str) {
    assert_eq!(
        pods_on(stack, ns, id, digest),
        (replicas as usize, replicas as usize),
        "pods"
    );
    let counted = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let (spec, ready, image) = loop {
        let now = sts(stack, ns, id).expect("StatefulSet");
        if (now.0, now.1) == (replicas, replicas) || std::time::Instant::now() > counted {
            break now;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(
        (spec, ready),
        (replicas, replicas),
        "StatefulSet replicas/ready"
    );
    assert!(
        image.ends_with(&format!("@{digest}")),
        "template image {image}, want {digest}"
    );
}

/// Asserts the StatefulSet was applied from `rec` (its spec-hash annotation) and every
/// pod started with the template's environment values (config-hash annotation).
fn assert_applied(stack: &Stack, ns: &str, id: &str, rec: &ServiceRecord) {
    let s = stack.get_json(ns, "statefulset", id).expect("StatefulSet");
    assert_eq!(
        s["metadata"]["annotations"]["br2k.io/spec-hash"],
        rec.spec_hash.to_string().as_str()
    );
    let config = s["spec"]["template"]["metadata"]["annotations"]["br2k.io/config-hash"].clone();
    let (ok, text) = stack.kubectl(&["-n", ns, "get", "pods", "-o", "json"]);
    assert!(ok, "{text}");
    let v: Value = serde_json::from_str(&text).expect("json");
    for p in v["items"].as_array().into_iter().flatten() {
        if p["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .starts_with(&format!("{id}-"))
            && p["metadata"]["deletionTimestamp"].is_null()
        {
            assert_eq!(
                p["metadata"]["annotations"]["br2k.io/config-hash"], config,
                "pod {}",
                p["metadata"]["name"]
            );
        }
    }
}

fn journal(dir: &Path) -> Value {
    std::fs::read(dir.join("br2k.journal.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null)
}

/// From an empty chain and namespace to a supervised service and through its
/// lifecycle, with the operator as its own process: contract deploy, init, dry-run
/// (changes nothing), deploy, status, an unchanged re-deploy (writes nothing), kills
/// of `deploy` after the push, after the chain transaction and during the wait (one
/// version each), scale, rollback, pause, resume, stop, and `recover` without an
/// operator.
#[test]
#[ignore = "needs stack"]
fn lifecycle_with_the_operator() {
    let stack = Stack::from_env();
    let run = support::unique();
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let ns = format!("br2k-cli-{run}");
    let service = format!("cli-{run}");
    let id = ServiceId::new(&service).expect("id");
    let mut primary = OciRegistry::spawn(&stack.registry_bin, dir, "primary");
    let mirror = OciRegistry::spawn(&stack.registry_bin, dir, "mirror");
    let _ = &mut primary;
    // Wait for the cluster to be free before creating anything that would be left
    // behind should the wait time out.
    support::no_other_operator(&stack);
    prepare_cluster(&stack, &ns);
    let cli = Br2k::new(dir).with_env("BR2K_TEST_KEY", support::KEY7);
    support::context(
        &cli,
        dir,
        &stack.rpc,
        &[&primary.addr, &mirror.addr],
        &ns,
        "BR2K_TEST_KEY",
    );
    // The operator's trust anchors are the context's: the contract comes first.
    let (mut operator, c) =
        Operator::start_for_context(&stack, dir, &run, &cli, &[&primary.addr, &mirror.addr]);
    let address = c["address"].as_str().expect("address").to_owned();

    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // Contract: deployed once, then reused.
        assert_eq!(c["deployed"], true);
        let again = cli.run(dir, &["contract", "deploy", "-o", "json"]).json();
        assert_eq!(
            (again["deployed"].clone(), again["address"].clone()),
            (Value::Bool(false), Value::String(address.clone()))
        );
        let chain = Chain::connect(&stack.rpc, &address);

        cli.run(dir, &["init", "proj", "--service", &service]).ok();
        let proj = dir.join("proj");
        std::fs::write(proj.join("app/data.txt"), "v1").expect("write");

        // Dry run: the plan, and nothing changed anywhere.
        let nonce0 = stack.nonce(ACCOUNT7);
        let objects0 = (
            stack.objects(&ns, "br2kservices"),
            stack.objects(&ns, "statefulsets"),
        );
        let out = cli.run(&proj, &["deploy", "--dry-run", "--exit-code"]);
        assert_eq!(out.code, 2, "a difference exits 2: {}", out.stderr);
        assert!(
            out.stdout.contains(&format!("chain: register {service}")),
            "{}",
            out.stdout
        );
        assert!(
            out.stdout
                .contains(&format!("image: {} push", primary.addr)),
            "{}",
            out.stdout
        );
        assert!(
            out.stdout.contains(&format!("image: {} copy", mirror.addr)),
            "{}",
            out.stdout
        );
        assert!(
            out.stdout
                .contains(&format!("kubernetes: Br2kService {ns}/{service}: create")),
            "{}",
            out.stdout
        );
        assert_eq!(stack.nonce(ACCOUNT7), nonce0, "dry run sent a transaction");
        assert!(
            primary.catalog().is_empty() && mirror.catalog().is_empty(),
            "dry run pushed"
        );
        assert_eq!(
            (
                stack.objects(&ns, "br2kservices"),
                stack.objects(&ns, "statefulsets")
            ),
            objects0
        );
        assert!(!chain.registered(&id));

        // Deploy: every replica Ready on the recorded digest.
        let d = cli
            .run(&proj, &["deploy", "-o", "json", "--timeout", "120"])
            .json();
        assert_eq!(
            (
                d["version"].as_u64(),
                d["published"].as_bool(),
                d["ready_replicas"].as_u64()
            ),
            (Some(1), Some(true), Some(3))
        );
        let digest = d["digest"].as_str().expect("digest").to_owned();
        let rec = chain.active(&id);
        assert_eq!(
            rec.spec.image.digest().map(|d| d.to_string()),
            Some(digest.clone())
        );
        assert_eq!(
            (rec.version, rec.replicas, rec.state.to_string()),
            (1, 3, "running".into())
        );
        assert_running(&stack, &ns, &service, 3, &digest);
        for r in [&primary, &mirror] {
            assert!(
                r.has_manifest(&format!("br2k/{service}"), &digest),
                "{} lacks the image",
                r.addr
            );
            // The upload counter used below sees this first push (or copy).
            assert!(
                r.uploads_started() > 0,
                "{}: no upload in its access log",
                r.addr
            );
        }
        let s = cli.run(&proj, &["status", "-o", "json"]).json();
        assert_eq!(s["record"]["digest"], digest.as_str());
        assert_eq!(s["live"]["ready_on_digest"], 3);
        assert_eq!(s["live"]["running_digests"], serde_json::json!([digest]));
        assert_eq!(s["in_sync"], true);
        let s = cli
            .run(&proj, &["status", "--diagnose", "-o", "json"])
            .json();
        assert_eq!(s["findings"], serde_json::json!([]), "{s}");
        let tx = d["tx"].as_str().expect("tx");
        let h = cli.run(&proj, &["history", &service, "-o", "json"]).json();
        assert_eq!(h[0]["tx"], tx);
        assert_eq!(h[0]["publisher"], ACCOUNT7);

        // Nothing changed: no write anywhere, and diff agrees.
        let nonce1 = stack.nonce(ACCOUNT7);
        let objects1 = (
            stack.objects(&ns, "br2kservices"),
            stack.objects(&ns, "statefulsets"),
        );
        let tags1 = (
            primary.tags(&format!("br2k/{service}")),
            mirror.tags(&format!("br2k/{service}")),
        );
        let again = cli.run(&proj, &["deploy", "-o", "json"]).json();
        assert_eq!(
            (
                again["published"].as_bool(),
                again["blobs_pushed"].as_u64(),
                again["wrote"].as_bool()
            ),
            (Some(false), Some(0), Some(false))
        );
        assert_eq!(again["resource"], "unchanged");
        let out = cli.run(&proj, &["diff", "--exit-code"]);
        assert_eq!(out.code, 0, "{}{}", out.stdout, out.stderr);
        assert!(out.stdout.contains("no changes"), "{}", out.stdout);
        assert_eq!(stack.nonce(ACCOUNT7), nonce1);
        assert_eq!(
            (
                stack.objects(&ns, "br2kservices"),
                stack.objects(&ns, "statefulsets")
            ),
            objects1
        );
        assert_eq!(
            (
                primary.tags(&format!("br2k/{service}")),
                mirror.tags(&format!("br2k/{service}"))
            ),
            tags1
        );

        // Kill deploy after the push, after the chain transaction, during the wait:
        // each rerun publishes exactly one version in all.
        for (round, phase) in ["push", "chain", "wait"].into_iter().enumerate() {
            let before = chain.active(&id);
            std::fs::write(proj.join("app/data.txt"), format!("kill-{phase}")).expect("write");
            let old_digest = before
                .spec
                .image
                .digest()
                .map(|d| d.to_string())
                .unwrap_or_default();
            let old_hash = before.spec_hash.to_string();
            // After the push and after the chain step the deploy pauses (a test seam),
            // so the kill lands exactly there; the wait is killed while it polls.
            let runner = if phase == "wait" {
                cli.clone()
            } else {
                cli.clone().with_env("BR2K_DEPLOY_PAUSE_AFTER", phase)
            };
            let mut child = runner.spawn(&proj, &["deploy", "--timeout", "120"]);
            poll(
                Duration::from_secs(60),
                &format!("deploy reaches {phase}"),
                || {
                    let j = journal(&proj);
                    let pushed = j["push"]["digest"]
                        .as_str()
                        .is_some_and(|d| d != old_digest);
                    let published = j["chain"]["spec_hash"]
                        .as_str()
                        .is_some_and(|h| h != old_hash);
                    let applied = published && j["apply"]["version"] == j["chain"]["version"];
                    let hit = match phase {
                        "push" => pushed,
                        "chain" => published,
                        _ => applied,
                    };
                    if hit {
                        Ok(())
                    } else if let Ok(Some(s)) = child.try_wait() {
                        panic!("deploy ended before {phase}: {s}")
                    } else {
                        Err(j.to_string())
                    }
                },
            );
            let _ = child.kill();
            let _ = child.wait();
            // Where it died, read independently.
            let at_kill = chain.active(&id);
            let j = journal(&proj);
            match phase {
                "push" => assert_eq!(
                    at_kill.latest_version, before.latest_version,
                    "killed after the push: no transaction yet"
                ),
                "chain" => {
                    assert_eq!(at_kill.latest_version, before.latest_version + 1);
                    assert_ne!(
                        j["apply"]["version"], j["chain"]["version"],
                        "not applied yet"
                    );
                }
                _ => assert_ne!(
                    j["ready"]["version"], j["chain"]["version"],
                    "killed before Ready"
                ),
            }
            let uploads = (primary.uploads_started(), mirror.uploads_started());
            let r = cli
                .run(&proj, &["deploy", "-o", "json", "--timeout", "120"])
                .json();
            assert_eq!(
                r["blobs_pushed"], 0,
                "round {round} ({phase}): the rerun pushed blobs again"
            );
            // The registries' own access logs agree: no upload started by the rerun.
            assert_eq!(
                (primary.uploads_started(), mirror.uploads_started()),
                uploads,
                "round {round} ({phase}): uploads started on the registries by the rerun"
            );
            let after = chain.active(&id);
            assert_eq!(
                after.latest_version,
                before.latest_version + 1,
                "kill at {phase}: versions {} → {}",
                before.latest_version,
                after.latest_version
            );
            let new_digest = after
                .spec
                .image
                .digest()
                .map(|d| d.to_string())
                .expect("digest");
            assert_ne!(new_digest, old_digest);
            assert_eq!(r["digest"], new_digest.as_str());
            assert_running(&stack, &ns, &service, 3, &new_digest);
        }

        // A change of environment values only (same digest): deploy waits until every
        // pod runs with the new values.
        let text = std::fs::read_to_string(proj.join("br2k.toml")).expect("toml");
        std::fs::write(
            proj.join("br2k.toml"),
            text.replace("LOG_LEVEL = \"info\"", "LOG_LEVEL = \"debug\""),
        )
        .expect("write");
        let r = cli
            .run(&proj, &["deploy", "-o", "json", "--timeout", "120"])
            .json();
        assert_eq!(r["published"], true);
        let rec = chain.active(&id);
        assert_eq!(
            rec.spec.env.get("LOG_LEVEL").map(String::as_str),
            Some("debug")
        );
        assert_applied(&stack, &ns, &service, &rec);
        assert_running(
            &stack,
            &ns,
            &service,
            3,
            r["digest"].as_str().expect("digest"),
        );

        // scale, rollback, pause, resume, stop: each ends in the recorded state.
        let latest = chain.active(&id).version;
        // `status --watch` prints a line on each change: it sees the scale through.
        let (mut watcher, lines) =
            cli.spawn_lines(dir, &["status", &service, "--watch", "-o", "json"]);
        poll(Duration::from_secs(30), "first status line", || {
            let n = lines.lock().expect("lines").len();
            if n > 0 {
                Ok(())
            } else {
                Err("no line".to_owned())
            }
        });
        cli.run(dir, &["scale", &service, "2", "--wait", "--timeout", "60"])
            .ok();
        poll(
            Duration::from_secs(30),
            "status --watch shows 2 replicas in sync",
            || {
                let l = lines.lock().expect("lines");
                let seen: Vec<Value> = l
                    .iter()
                    .filter_map(|x| serde_json::from_str(x).ok())
                    .collect();
                if seen.iter().any(|v| {
                    v["record"]["replicas"] == 2
                        && v["live"]["ready_on_digest"] == 2
                        && v["in_sync"] == true
                }) {
                    Ok(())
                } else {
                    Err(format!("{} lines, last {:?}", seen.len(), l.last()))
                }
            },
        );
        assert!(
            lines.lock().expect("lines").len() >= 2,
            "at least the first state and the scaled one"
        );
        let _ = watcher.kill();
        let _ = watcher.wait();
        let rec = chain.active(&id);
        assert_eq!(rec.replicas, 2);
        let cur = rec
            .spec
            .image
            .digest()
            .map(|d| d.to_string())
            .expect("digest");
        assert_running(&stack, &ns, &service, 2, &cur);

        let r = cli
            .run(
                dir,
                &[
                    "rollback",
                    &service,
                    "--to",
                    "1",
                    "--wait",
                    "--timeout",
                    "60",
                    "-o",
                    "json",
                ],
            )
            .json();
        assert_eq!(r["version"], 1);
        let rec = chain.active(&id);
        assert_eq!(
            (rec.version, rec.latest_version, rec.replicas),
            (1, latest, 3)
        );
        assert_running(&stack, &ns, &service, 3, &digest);
        assert_applied(&stack, &ns, &service, &rec);

        cli.run(dir, &["pause", &service, "--wait", "--timeout", "60"])
            .ok();
        assert_eq!(chain.active(&id).state.to_string(), "paused");
        let (spec, _, _) =
            sts(&stack, &ns, &service).expect("a paused service keeps its StatefulSet");
        assert_eq!(spec, 0);
        assert_eq!(pods_on(&stack, &ns, &service, &digest).1, 0);

        cli.run(dir, &["resume", &service, "--wait", "--timeout", "60"])
            .ok();
        assert_eq!(chain.active(&id).state.to_string(), "running");
        assert_running(&stack, &ns, &service, 3, &digest);

        cli.run(dir, &["stop", &service, "--wait", "--timeout", "60"])
            .ok();
        assert_eq!(chain.active(&id).state.to_string(), "stopped");
        assert!(
            sts(&stack, &ns, &service).is_none(),
            "a stopped service has no StatefulSet"
        );
        assert_eq!(pods_on(&stack, &ns, &service, &digest).1, 0);
        // deploy publishes the file's spec (the active record is the rolled-back v1)
        // but leaves a stopped service stopped, and says so.
        let out = cli.run(&proj, &["deploy", "-o", "json", "--timeout", "30"]);
        let r = out.json();
        assert_eq!(r["published"], true, "{r}");
        assert!(
            out.stderr.contains(&format!("note: {service} is stopped")),
            "{}",
            out.stderr
        );
        let rec = chain.active(&id);
        assert_eq!(
            (rec.state.to_string(), rec.version),
            ("stopped".to_owned(), latest + 1)
        );
        assert!(sts(&stack, &ns, &service).is_none());
        let digest = r["digest"].as_str().expect("digest").to_owned();

        cli.run(dir, &["resume", &service, "--wait", "--timeout", "60"])
            .ok();
        assert_running(&stack, &ns, &service, 3, &digest);

        // recover without an operator: the StatefulSet deleted, found and restored.
        operator.terminate();
        let (ok, text) = stack.kubectl(&[
            "-n",
            &ns,
            "delete",
            "statefulset",
            &service,
            "--cascade=orphan",
        ]);
        assert!(ok, "{text}");
        let s = cli
            .run(dir, &["status", &service, "--diagnose", "-o", "json"])
            .json();
        assert_eq!(s["in_sync"], false, "{s}");
        assert!(
            s["findings"]
                .as_array()
                .expect("findings")
                .iter()
                .any(|f| f["finding"] == "missing_workload"),
            "{s}"
        );
        let diag = cli
            .run(dir, &["recover", &service, "--dry-run", "-o", "json"])
            .json();
        let findings = diag["diagnosis"]["findings"]
            .as_array()
            .expect("findings")
            .clone();
        assert!(
            findings.iter().any(|f| f["finding"] == "missing_workload"),
            "{findings:?}"
        );
        assert!(diag["report"].is_null());
        assert!(
            sts(&stack, &ns, &service).is_none(),
            "recover --dry-run changed the cluster"
        );
        let rep = cli.run(dir, &["recover", &service, "-o", "json"]).json();
        assert!(
            !rep["report"]["actions"]
                .as_array()
                .expect("actions")
                .is_empty(),
            "{rep}"
        );
        poll(Duration::from_secs(60), "recovered workload", || {
            let (spec, ready, image) = sts(&stack, &ns, &service).ok_or("no StatefulSet")?;
            if spec == 3 && ready == 3 && image.ends_with(&digest) {
                Ok(())
            } else {
                Err(format!("{spec} {ready} {image}"))
            }
        });
        // Then a read-only diagnosis finds nothing (the adopted pods settle first).
        poll(Duration::from_secs(30), "healthy after recover", || {
            let d = cli
                .run(dir, &["recover", &service, "--dry-run", "-o", "json"])
                .json();
            if d["diagnosis"]["findings"] == serde_json::json!([]) {
                Ok(())
            } else {
                Err(d["diagnosis"]["findings"].to_string())
            }
        });
    }));
    let tail = operator.log_tail(40);
    operator.terminate();
    cleanup(&stack, &ns, &service);
    if let Err(e) = result {
        eprintln!("--- operator log (tail) ---\n{tail}");
        std::panic::resume_unwind(e);
    }
}

/// Failures that must change nothing on chain, each with its one-line error: unknown
/// service, RPC down, primary or mirror registry down at push, cluster unreachable, a
/// key without the role (revert decoded); then roles granted and revoked, `image
/// verify` and `image ls`. No operator runs here.
#[test]
#[ignore = "needs stack"]
fn failures_change_nothing_on_chain() {
    let stack = Stack::from_env();
    let run = support::unique();
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let ns = format!("br2k-cli-f-{run}");
    let service = format!("f-{run}");
    let id = ServiceId::new(&service).expect("id");
    let mut primary = OciRegistry::spawn(&stack.registry_bin, dir, "primary");
    let mut mirror = OciRegistry::spawn(&stack.registry_bin, dir, "mirror");
    prepare_cluster(&stack, &ns);
    let cli = Br2k::new(dir).with_env("OWNER_KEY", support::KEY8);
    support::context(
        &cli,
        dir,
        &stack.rpc,
        &[&primary.addr, &mirror.addr],
        &ns,
        "OWNER_KEY",
    );
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let c = cli
            .run(dir, &["contract", "deploy", "--new", "-o", "json"])
            .json();
        let address = c["address"].as_str().expect("address").to_owned();
        let chain = Chain::connect(&stack.rpc, &address);
        cli.run(dir, &["init", "proj", "--service", &service]).ok();
        let proj = dir.join("proj");
        let repo = format!("br2k/{service}");
        let one_line = |s: &str| {
            assert!(
                s.starts_with("error: ")
                    && s.trim_end().lines().count() == 1
                    && s.contains("(hint: "),
                "one line with a hint: {s}"
            );
        };

        // Unknown service.
        let out = cli.run(dir, &["status", "nope-service"]);
        assert_eq!(out.code, 1);
        assert!(
            out.stderr.contains("not found: service nope-service"),
            "{}",
            out.stderr
        );
        one_line(&out.stderr);

        // RPC down: nothing pushed, nothing sent.
        let dead = format!("http://127.0.0.1:{}", support::free_port());
        cli.run(
            dir,
            &[
                "context",
                "set",
                "rpc-down",
                "--rpc",
                &dead,
                "--registry-contract",
                &address,
                "--oci",
                &primary.addr,
                "--oci",
                &mirror.addr,
                "--namespace",
                &ns,
                "--key-env",
                "OWNER_KEY",
            ],
        )
        .ok();
        let nonce = stack.nonce(ACCOUNT8);
        let out = cli.run(&proj, &["--context", "rpc-down", "deploy"]);
        assert_eq!(out.code, 1, "{}", out.stderr);
        assert!(
            out.stderr.contains(&format!("chain RPC {dead} is down")),
            "{}",
            out.stderr
        );
        one_line(&out.stderr);
        assert!(primary.catalog().is_empty() && mirror.catalog().is_empty());

        // Cluster unreachable: nothing pushed, nothing sent.
        let kubeconfig = dir.join("dead-kubeconfig");
        std::fs::write(&kubeconfig, format!("apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:{}\n    insecure-skip-tls-verify: true\nusers:\n- name: u\n  user:\n    token: x\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\n", support::free_port())).expect("write");
        cli.run(
            dir,
            &[
                "context",
                "set",
                "kube-down",
                "--rpc",
                &stack.rpc,
                "--registry-contract",
                &address,
                "--oci",
                &primary.addr,
                "--oci",
                &mirror.addr,
                "--namespace",
                &ns,
                "--key-env",
                "OWNER_KEY",
                "--kubeconfig",
                &kubeconfig.to_string_lossy(),
            ],
        )
        .ok();
        let out = cli.run(&proj, &["--context", "kube-down", "deploy"]);
        assert_eq!(out.code, 1, "{}", out.stderr);
        assert!(out.stderr.contains("cluster unreachable"), "{}", out.stderr);
        one_line(&out.stderr);
        assert!(primary.catalog().is_empty());

        // Primary down at push.
        primary.stop();
        let out = cli.run(&proj, &["deploy", "--no-wait"]);
        assert_eq!(out.code, 1, "{}", out.stderr);
        assert!(out.stderr.contains(&format!("registry {} is down: image pushed to 0 of 2 registries, nothing published on chain", primary.addr)), "{}", out.stderr);
        one_line(&out.stderr);
        primary.start();
        assert!(mirror.catalog().is_empty());

        // Mirror down at push: the primary has it, the chain has nothing.
        mirror.stop();
        let out = cli.run(&proj, &["deploy", "--no-wait"]);
        assert_eq!(out.code, 1, "{}", out.stderr);
        assert!(out.stderr.contains(&format!("registry {} is down: image pushed to 1 of 2 registries, nothing published on chain", mirror.addr)), "{}", out.stderr);
        mirror.start();
        assert_eq!(
            stack.nonce(ACCOUNT8),
            nonce,
            "a failed deploy sent a transaction"
        );
        assert!(!chain.registered(&id));

        // `image push` completes the copies (only the mirror's two blobs are missing),
        // then a real deploy (no operator: no wait) pushes nothing.
        let out = cli
            .clone()
            .with_env("BR2K_PROGRESS", "1")
            .run(&proj, &["image", "push", "-o", "json"]);
        let p = out.json();
        assert_eq!(p["blobs_pushed"], 2, "{p}");
        // Progress per blob (plain lines: stderr is not a terminal): both blobs of the
        // image streamed into the mirror, none into the primary (it has them).
        let done: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| {
                l.starts_with(&format!("{}: blob sha256:", mirror.addr)) && l.ends_with(" done")
            })
            .collect();
        assert_eq!(done.len(), 2, "{}", out.stderr);
        assert!(
            !out.stderr.contains(&format!("{}: blob", primary.addr)),
            "{}",
            out.stderr
        );
        let out = cli
            .clone()
            .with_env("BR2K_PROGRESS", "1")
            .run(&proj, &["deploy", "--no-wait", "-o", "json"]);
        // The key never shows, not even with progress on.
        for text in [&out.stdout, &out.stderr] {
            assert!(
                !text.contains(&support::KEY8[2..]),
                "the key was printed: {text}"
            );
        }
        let d = out.json();
        let digest = d["digest"].as_str().expect("digest").to_owned();
        assert_eq!(d["digest"], p["digest"]);
        assert_eq!(d["blobs_pushed"], 0, "{d}");
        assert_eq!(chain.active(&id).replicas, 3);

        // A project whose image is an existing reference: copied into its own
        // repository in both registries and pinned by digest.
        let other = format!("{service}-ref");
        cli.run(dir, &["init", "ref", "--service", &other]).ok();
        let ref_proj = dir.join("ref");
        let text = std::fs::read_to_string(ref_proj.join("br2k.toml")).expect("toml");
        let text = text
            .replace("dir = \"app\"\n", "")
            .replace("entrypoint = [\"/app/run.sh\"]\n", "")
            .replace(
                "tag = \"latest\"",
                &format!("reference = \"{}/{repo}:latest\"", primary.addr),
            );
        std::fs::write(ref_proj.join("br2k.toml"), text).expect("write");
        let r = cli
            .run(&ref_proj, &["deploy", "--no-wait", "-o", "json"])
            .json();
        assert_eq!(
            r["digest"],
            digest.as_str(),
            "the tag resolves to the same digest"
        );
        let other_id = ServiceId::new(&other).expect("id");
        let rec = chain.active(&other_id);
        assert_eq!(
            rec.spec.image.to_string(),
            format!("{}/br2k/{other}@{digest}", primary.addr)
        );
        for reg in [&primary, &mirror] {
            assert!(
                reg.has_manifest(&format!("br2k/{other}"), &digest),
                "{} lacks the copy",
                reg.addr
            );
        }
        let _ = stack.kubectl(&[
            "-n",
            &ns,
            "patch",
            "br2kservice",
            &other,
            "--type=merge",
            "-p",
            r#"{"metadata":{"finalizers":null}}"#,
        ]);
        let _ = stack.kubectl(&["-n", &ns, "delete", "br2kservice", &other, "--wait=false"]);
        let v = cli.run(&proj, &["image", "verify", "-o", "json"]).json();
        assert_eq!(
            v.as_array()
                .expect("rows")
                .iter()
                .filter(|r| r["ok"] == true)
                .count(),
            2,
            "{v}"
        );
        let ls = cli.run(&proj, &["image", "ls", "-o", "json"]).json();
        assert!(
            ls.as_array()
                .expect("rows")
                .iter()
                .any(|r| r["registry"] == primary.addr.as_str()
                    && r["tag"] == "latest"
                    && r["digest"] == digest.as_str()),
            "{ls}"
        );
        assert!(primary.has_manifest(&repo, &digest) && mirror.has_manifest(&repo, &digest));

        // A layer corrupted on the mirror's disk: verify names that registry, exit 1.
        let layer = mirror.manifest(&repo, &digest)["layers"][0]["digest"]
            .as_str()
            .expect("layer digest")
            .to_owned();
        let file = mirror.blob_data(&layer);
        let good = std::fs::read(&file).expect("layer data");
        std::fs::write(&file, vec![0u8; good.len()]).expect("corrupt");
        let out = cli.run(&proj, &["image", "verify", "-o", "json"]);
        assert_eq!(out.code, 1, "{}", out.stderr);
        let rows: Value = serde_json::from_str(&out.stdout).expect("rows");
        let ok: Vec<(String, bool)> = rows
            .as_array()
            .expect("rows")
            .iter()
            .map(|r| {
                (
                    r["registry"].as_str().unwrap_or_default().to_owned(),
                    r["ok"] == true,
                )
            })
            .collect();
        assert_eq!(
            ok,
            vec![(primary.addr.clone(), true), (mirror.addr.clone(), false)]
        );
        assert!(
            out.stderr.contains("1 of 2 registries do not serve"),
            "{}",
            out.stderr
        );
        std::fs::write(&file, good).expect("restore");

        // A key without the role: the revert in words, nothing changed.
        let out = cli.run(dir, &["scale", &service, "5", "--context", "stranger"]);
        assert_eq!(out.code, 2, "no such context yet: {}", out.stderr);
        // This context signs with a key file (its path is stored, not the key).
        let key_file = dir.join("stranger.key");
        std::fs::write(&key_file, format!("{}\n", support::KEY9)).expect("key file");
        cli.run(
            dir,
            &[
                "context",
                "set",
                "stranger",
                "--rpc",
                &stack.rpc,
                "--registry-contract",
                &address,
                "--oci",
                &primary.addr,
                "--namespace",
                &ns,
                "--key-file",
                &key_file.to_string_lossy(),
            ],
        )
        .ok();
        let config = std::fs::read_to_string(cli.config_dir.join("config.toml")).expect("config");
        assert!(
            !config.contains(&support::KEY9[2..]) && config.contains("stranger.key"),
            "{config}"
        );
        let out = cli.run(dir, &["--context", "stranger", "scale", &service, "5"]);
        assert_eq!(out.code, 1, "{}", out.stderr);
        assert!(
            out.stderr.contains(&format!(
                "{ACCOUNT9} has no operator role for service {service}"
            )),
            "{}",
            out.stderr
        );
        one_line(&out.stderr);
        assert_eq!(chain.active(&id).replicas, 3);

        // Granted, the same key may scale; revoked, it may not.
        cli.run(
            dir,
            &[
                "--context",
                "t",
                "grant",
                &service,
                ACCOUNT9,
                "--role",
                "operator",
            ],
        )
        .ok();
        cli.run(dir, &["--context", "stranger", "scale", &service, "5"])
            .ok();
        assert_eq!(chain.active(&id).replicas, 5);
        cli.run(
            dir,
            &[
                "--context",
                "t",
                "revoke",
                &service,
                ACCOUNT9,
                "--role",
                "operator",
            ],
        )
        .ok();
        let out = cli.run(dir, &["--context", "stranger", "scale", &service, "4"]);
        assert_eq!(out.code, 1, "{}", out.stderr);
        assert_eq!(chain.active(&id).replicas, 5);

        // history names the publisher, block and transaction of each version.
        let h = cli
            .run(dir, &["--context", "t", "history", &service, "-o", "json"])
            .json();
        assert_eq!(h.as_array().expect("versions").len(), 1);
        assert_eq!(h[0]["publisher"], ACCOUNT8);
        assert_eq!(h[0]["tx"], d["tx"]);
        assert!(h[0]["block"].as_u64().expect("block") > 0);
        let _ = ACCOUNT7;
    }));
    cleanup(&stack, &ns, &service);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
