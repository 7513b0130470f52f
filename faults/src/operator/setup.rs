//! Set-up of the operator workload: the registries, the services, the chain records
//! and the operator process.

use super::*;

impl OperatorWorkload {
    /// Sets up two services and starts the operator; returns once both are healthy.
    /// Everything lives under `work_dir/operator-<unique>` (registry storage, logs).
    pub async fn start(operator_bin: PathBuf, work_dir: &Path) -> Result<Self, String> {
        let stack = StackEnv::read(&operator_bin)?;
        let control_plane = ControlPlaneSupervisor::start()?;
        let (cleaned, stale_runs) = infra::clean_stale(work_dir);
        for line in cleaned {
            eprintln!("[faults/operator] left by an earlier run: {line}");
        }
        let run = unique();
        let dir = work_dir.join(format!("operator-{run}"));
        fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let dir = dir.canonicalize().map_err(|e| e.to_string())?;

        // Registries: the primary behind a proxy, the mirror on a tmpfs.
        let primary =
            RegistryProc::spawn(&stack.registry_bin, &dir.join("registry-primary"), true).await?;
        let primary_proxy = TcpProxy::start(&primary.addr).await?;
        let mirror_fs = Tmpfs::mount(&dir.join("registry-mirror/data"), MIRROR_TMPFS)?;
        let mirror =
            RegistryProc::spawn(&stack.registry_bin, &dir.join("registry-mirror"), true).await?;

        // The operator's own way to the API server.
        let (kube_target, operator_kubeconfig) = {
            let kubeconfig = &stack.kubeconfig;
            let text = fs::read_to_string(kubeconfig).map_err(|e| format!("{kubeconfig}: {e}"))?;
            let server = text
                .lines()
                .find_map(|l| l.trim().strip_prefix("server:"))
                .map(|s| s.trim().trim_matches('\'').trim_matches('"').to_owned())
                .ok_or_else(|| format!("{kubeconfig}: no server"))?;
            let url = reqwest::Url::parse(&server).map_err(|e| format!("server {server}: {e}"))?;
            (host_port(&url, "server")?, (text, server))
        };
        let api_proxy = TcpProxy::start(&kube_target).await?;
        let op_kubeconfig = dir.join("operator.kubeconfig");
        fs::write(
            &op_kubeconfig,
            operator_kubeconfig.0.replace(
                &operator_kubeconfig.1,
                &format!("https://127.0.0.1:{}", api_proxy.port),
            ),
        )
        .map_err(|e| format!("{}: {e}", op_kubeconfig.display()))?;

        // The chain.
        let url = stack.rpc.clone();
        let chain =
            ChainRegistry::deploy(ChainConfig::new(vec![url.clone()]).with_private_key(ANVIL_KEY3))
                .await
                .map_err(|e| format!("deploy the registry contract: {e}"))?;

        // Two services.
        let seed = u64::from_str_radix(&run, 16).unwrap_or(7);
        let mut services = Vec::new();
        for (i, (tag, replicas)) in [("a", 3u32), ("b", 2u32)].into_iter().enumerate() {
            let repo = Repository::new(format!("br2k-faults/app-{run}-{tag}"))
                .map_err(|e| e.to_string())?;
            let image = build_image(mix(seed, i as u64 + 10), "faults")?;
            push_everywhere(&[&primary.addr, &mirror.addr], &repo, &image).await?;
            let image_ref = ImageRef::new(
                primary_proxy.addr(),
                repo.clone(),
                Some("1.0"),
                Some(image.digest),
            )
            .map_err(|e| e.to_string())?;
            let id = ServiceId::new(format!("fo-{run}-{tag}")).map_err(|e| e.to_string())?;
            let spec = service_spec(image_ref, replicas, &[("MODE", "faults")])?;
            register(&chain, &id, &spec).await?;
            services.push(Svc {
                tag: tag.to_owned(),
                names: Names::of(&id),
                id,
                cr: format!("svc-{tag}"),
                repo,
                digest: image.digest,
                blobs: blobs_of(&image),
            });
        }

        // Kubernetes.
        let client = install_and_connect("br2k-faults").await?;
        remove_stale_namespaces(&client, &stale_runs).await;
        let ns = format!("br2k-faults-op-{run}");
        create_namespaces(&client, &ns).await?;

        let operator = OperatorProc::new(operator_bin, dir.join("operator.log"), "faults", &run, {
            let mut a = trust_anchors(&chain, url.as_str(), &[&primary_proxy.addr(), &mirror.addr]);
            // Only its own resources: not those of another workload, nor the
            // ones a killed run left.
            a.extend(["--watch-namespace".into(), ns.clone()]);
            a
        })
        .with_kubeconfig(op_kubeconfig)
        .detached();
        let http = http_client()?;
        let mut w = Self {
            dir,
            kubectl: Kubectl {
                bin: stack.kubectl,
                kubeconfig: stack.kubeconfig,
                ns: ns.clone(),
            },
            client,
            http,
            chain,
            ns,
            services,
            primary,
            primary_proxy,
            mirror,
            mirror_fs,
            api_proxy,
            operator,
            control_plane,
            clk_tck: clock_ticks(),
            active: Vec::new(),
            healed_at: None,
            fault_cpu_start: None,
            fault_cpu_pct: None,
            injections: Vec::new(),
        };
        if let Err(e) = w.deploy().await {
            let tail = w.log_tail(40);
            w.shutdown().await;
            return Err(format!("{e}\n--- operator log (tail) ---\n{tail}"));
        }
        Ok(w)
    }

    /// Starts the operator, creates both resources and waits until both converged.
    pub(super) async fn deploy(&mut self) -> Result<(), String> {
        self.start_operator().await?;
        for s in &self.services {
            let spec = Br2kServiceSpec {
                namespace: Some(self.ns.clone()),
                ..Br2kServiceSpec::for_service(s.id.as_str())
            };
            self.crs()
                .create(&PostParams::default(), &Br2kService::new(&s.cr, spec))
                .await
                .map_err(|e| format!("create Br2kService {}: {e}", s.cr))?;
        }
        let t0 = Instant::now();
        poll(
            SETUP_TIMEOUT,
            "first deployment of both services",
            async || {
                let p = self.problems().await;
                if p.is_empty() {
                    Ok(())
                } else {
                    Err(p.join("; "))
                }
            },
        )
        .await?;
        eprintln!(
            "[faults/operator] services {} and {} deployed and Healthy in {} ms (namespace {}, primary {} via {}, mirror {}, API server via {}, work dir {})",
            self.services[0].id,
            self.services[1].id,
            t0.elapsed().as_millis(),
            self.ns,
            self.primary.addr,
            self.primary_proxy.addr(),
            self.mirror.addr,
            self.api_proxy.addr(),
            self.dir.display(),
        );
        Ok(())
    }

    /// Starts the operator process and waits until it leads.
    pub(super) async fn start_operator(&mut self) -> Result<(), String> {
        self.operator.start()?;
        poll(Duration::from_secs(30), "operator leads", async || {
            self.operator.leads(&self.http).await
        })
        .await
    }
}

/// Deletes the namespaces (and leases) of earlier runs `runs` that are still there
/// (their process was killed before its shutdown): their resources' finalizers are
/// dropped first, since no operator serves them any more.
pub(super) async fn remove_stale_namespaces(client: &Client, runs: &[String]) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for run in runs {
        let ns = format!("br2k-faults-op-{run}");
        if !matches!(namespaces.get_opt(&ns).await, Ok(Some(_))) {
            continue;
        }
        let crs: Api<Br2kService> = Api::namespaced(client.clone(), &ns);
        if let Ok(list) = crs.list(&ListParams::default()).await {
            for o in list.items {
                let _ = crs
                    .patch(
                        &o.name_any(),
                        &PatchParams::default(),
                        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
                    )
                    .await;
            }
        }
        let _ = namespaces.delete(&ns, &DeleteParams::background()).await;
        let _ = Api::<Lease>::namespaced(client.clone(), "br2k-system")
            .delete(&format!("br2k-faults-{run}"), &DeleteParams::default())
            .await;
        eprintln!("[faults/operator] left by an earlier run: deleted namespace {ns}");
    }
}
