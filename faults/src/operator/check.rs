//! The operator workload's check: both services back to their record, then a quiet
//! window.

use super::*;

impl OperatorWorkload {
    // -------------------------------------------------------------- check

    /// Waits at most `within` until both services match their record, then measures
    /// the operator over a quiet window.
    pub async fn check(&mut self, within: Duration) -> Result<OperatorCheck, String> {
        if !self.active.is_empty() {
            return Err("a fault is still in effect (heal first)".into());
        }
        let t0 = self.healed_at.unwrap_or_else(Instant::now);
        let deadline = Instant::now() + within;
        let mut out = OperatorCheck {
            fault_cpu_pct: self.fault_cpu_pct.take(),
            ..OperatorCheck::default()
        };
        out.hot_loop = out.fault_cpu_pct.is_some_and(|c| c > MAX_QUIET_CPU_PCT);
        let res = self.converge(t0, deadline, &mut out).await;
        out.notes = self.control_plane.take_restarts();
        res.map(|()| out)
    }

    /// The loop of [`OperatorWorkload::check`].
    pub(super) async fn converge(
        &mut self,
        t0: Instant,
        deadline: Instant,
        out: &mut OperatorCheck,
    ) -> Result<(), String> {
        loop {
            if let Some(st) = self.operator.exited() {
                out.problems = vec![format!("the operator exited: {st}")];
                out.converged_after = t0.elapsed();
                return Ok(());
            }
            let p = self.problems().await;
            if p.is_empty() {
                out.converged_after = t0.elapsed();
                break;
            }
            out.last_wrong = p.clone();
            if Instant::now() >= deadline {
                out.converged_after = t0.elapsed();
                out.problems = p;
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        match self.quiet_window().await {
            Ok((pct, n)) => {
                out.quiet_cpu_pct = Some(pct);
                out.quiet_reconciles = Some(n);
                out.hot_loop |= n > MAX_QUIET_RECONCILES || pct > MAX_QUIET_CPU_PCT;
            }
            Err(e) => out.problems.push(format!("quiet window: {e}")),
        }
        Ok(())
    }

    /// CPU of the operator in % of one core, and the reconciles it counted, over
    /// [`QUIET_WINDOW`].
    pub(super) async fn quiet_window(&self) -> Result<(f64, u64), String> {
        let pid = self.operator.pid().ok_or("operator not running")?;
        let r0 = self.reconciles().await?;
        let c0 = cpu_ticks(pid)?;
        let t0 = Instant::now();
        tokio::time::sleep(QUIET_WINDOW).await;
        let c1 = cpu_ticks(pid)?;
        let wall = t0.elapsed().as_secs_f64();
        let r1 = self.reconciles().await?;
        let pct = c1.saturating_sub(c0) as f64 / self.clk_tck / wall * 100.0;
        Ok((pct, r1.saturating_sub(r0)))
    }

    /// What differs from the records now, for both services (empty: converged).
    pub(super) async fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        for s in &self.services {
            if let Err(e) = self.service_matches(s).await {
                out.push(format!("{}: {e}", s.tag));
            }
        }
        out
    }

    /// Service `s` matches its record, read independently: the record from the
    /// chain, the StatefulSet and the resource from the API server, the image from
    /// both registries' storage on disk.
    pub(super) async fn service_matches(&self, s: &Svc) -> Result<(), String> {
        let record = self
            .chain
            .active(&s.id)
            .await
            .map_err(|e| format!("record: {e}"))?;
        let want = &record.spec.image;
        let digest = *want.digest().ok_or("record image without digest")?;
        if digest != s.digest {
            return Err(format!("record pins {digest}, pushed {}", s.digest));
        }
        let sts = self.live_sts(&s.names.base).await?;
        let image = template_image(&sts).ok_or("StatefulSet without an image")?;
        let live = ImageRef::parse(&image).map_err(|e| format!("image {image}: {e}"))?;
        let registry_ok = live.registry() == want.registry() || live.registry() == self.mirror.addr;
        if !registry_ok || live.repository() != want.repository() || live.digest() != Some(&digest)
        {
            return Err(format!("image {image}, record {want}"));
        }
        let replicas = i32::try_from(record.replicas).map_err(|e| e.to_string())?;
        let spec_replicas = sts.spec.as_ref().and_then(|s| s.replicas);
        let st = sts.status.clone().unwrap_or_default();
        if spec_replicas != Some(replicas)
            || st.ready_replicas.unwrap_or(0) != replicas
            || st.replicas != replicas
            || st.observed_generation != sts.metadata.generation
        {
            return Err(format!(
                "StatefulSet spec.replicas {spec_replicas:?} status replicas {} ready {:?} observedGeneration {:?}/{:?}, record {replicas}",
                st.replicas, st.ready_replicas, st.observed_generation, sts.metadata.generation,
            ));
        }
        // The pods themselves: as many as recorded, none terminating, each running the
        // recorded digest. (br2k freezes rollouts, `partition: replicas`, so a template
        // change that keeps the digest, e.g. the mirror instead of the primary, leaves
        // the pods on the older revision: revisions may differ, digests may not.)
        let selector = sts
            .spec
            .as_ref()
            .and_then(|s| s.selector.match_labels.as_ref())
            .map(|l| {
                l.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .filter(|l| !l.is_empty())
            .ok_or("StatefulSet without a label selector")?;
        let pods = Api::<Pod>::namespaced(self.client.clone(), &self.ns)
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(|e| format!("list pods: {e}"))?
            .items;
        let wrong: Vec<String> = pods
            .iter()
            .filter_map(|p| {
                let img = p.spec.as_ref()?.containers.first()?.image.clone()?;
                let ok = p.metadata.deletion_timestamp.is_none()
                    && ImageRef::parse(&img)
                        .ok()
                        .is_some_and(|i| i.digest() == Some(&digest));
                (!ok).then(|| format!("{} ({img})", p.name_any()))
            })
            .collect();
        if pods.len() != replicas as usize || !wrong.is_empty() {
            return Err(format!(
                "{} pod(s), record {replicas}; not on the recorded digest or terminating: {wrong:?}",
                pods.len()
            ));
        }
        let cr = self
            .crs()
            .get(&s.cr)
            .await
            .map_err(|e| format!("resource {}: {e}", s.cr))?;
        let status = cr.status.clone().unwrap_or_default();
        let ready = status
            .conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        if status.phase.as_deref() != Some("Healthy")
            || !ready
            || status.observed_version != Some(record.version)
            || status.observed_generation != cr.metadata.generation
        {
            return Err(format!(
                "resource phase {:?} Ready {ready} observedVersion {:?} (record {}) observedGeneration {:?}/{:?}",
                status.phase,
                status.observed_version,
                record.version,
                status.observed_generation,
                cr.metadata.generation
            ));
        }
        for (name, reg) in [("primary", &self.primary), ("mirror", &self.mirror)] {
            stored_image(reg, s).map_err(|e| format!("{name}: {e}"))?;
        }
        Ok(())
    }
}

/// Checks `reg`'s storage on disk: the repository links the manifest and every
/// blob of `s`, and each data file hashes to its digest.
pub(super) fn stored_image(reg: &RegistryProc, s: &Svc) -> Result<(), String> {
    let repo = reg.repo_dir(s.repo.as_str());
    let hashed = |d: &Digest| -> Result<(), String> {
        let path = reg.blob_data(d);
        let bytes = fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if Digest::of(&bytes) == *d {
            Ok(())
        } else {
            Err(format!(
                "{} ({} bytes) hashes to {}",
                path.display(),
                bytes.len(),
                Digest::of(&bytes)
            ))
        }
    };
    let link = |path: PathBuf, d: &Digest| -> Result<(), String> {
        let text = fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if text.trim() == d.to_string() {
            Ok(())
        } else {
            Err(format!("{} holds {text:?}", path.display()))
        }
    };
    link(
        repo.join("_manifests/revisions/sha256")
            .join(s.digest.hex())
            .join("link"),
        &s.digest,
    )?;
    hashed(&s.digest)?;
    for b in &s.blobs {
        link(repo.join("_layers/sha256").join(b.hex()).join("link"), b)?;
        hashed(b)?;
    }
    Ok(())
}
