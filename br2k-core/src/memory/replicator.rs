//! [`InMemoryReplicator`]: replicated workloads simulated in process memory.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use async_trait::async_trait;
use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;

use crate::error::{Error, Result};
use crate::id::ServiceId;
use crate::image::ImageRef;
use crate::observed::{ObservedReplica, ObservedState, WorkloadTemplate};
use crate::record::ServiceRecord;
use crate::replicator::Replicator;

/// Change notifications buffered per subscriber; a slower one loses the oldest (its
/// owner is expected to resync periodically, as with any watch).
const CHANGE_BUFFER: usize = 8192;

/// A replicator whose workloads live in memory: replicas `<id>-0..n-1` become ready
/// as soon as they are created and run the template's image digest.
///
/// Clones share the same workloads. Besides the [`Replicator`] methods it offers
/// failure injection (each notifies [`Replicator::changes`]), so tests can break the
/// live state the way a cluster would: [`InMemoryReplicator::delete_workload`],
/// [`InMemoryReplicator::set_live_image`], [`InMemoryReplicator::set_live_replicas`],
/// [`InMemoryReplicator::tamper_template`], [`InMemoryReplicator::fail_replica`] and
/// [`InMemoryReplicator::delete_part`]. They return [`Error::NotFound`] for a service
/// without a workload.
#[derive(Debug, Clone, Default)]
pub struct InMemoryReplicator {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    workloads: Mutex<BTreeMap<ServiceId, Workload>>,
    changes: broadcast::Sender<ServiceId>,
    applies: AtomicU64,
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            workloads: Mutex::default(),
            changes: broadcast::channel(CHANGE_BUFFER).0,
            applies: AtomicU64::new(0),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Workload {
    applied_version: Option<u64>,
    desired: u32,
    template: WorkloadTemplate,
    replicas: Vec<ObservedReplica>,
    missing_parts: BTreeSet<String>,
    foreign_fields: BTreeSet<String>,
}

fn fresh_replica(id: &ServiceId, index: u32, template: &WorkloadTemplate) -> ObservedReplica {
    ObservedReplica {
        name: format!("{id}-{index}"),
        image_digest: template.image.digest().copied(),
        ready: true,
        failed: false,
    }
}

impl Workload {
    /// Makes the replica list `<id>-0..desired-1`, keeping existing replicas.
    fn resize(&mut self, id: &ServiceId) {
        let mut old: BTreeMap<String, ObservedReplica> = self
            .replicas
            .drain(..)
            .map(|r| (r.name.clone(), r))
            .collect();
        self.replicas = (0..self.desired)
            .map(|i| {
                old.remove(&format!("{id}-{i}"))
                    .unwrap_or_else(|| fresh_replica(id, i, &self.template))
            })
            .collect();
    }

    fn observed(&self, id: &ServiceId) -> ObservedState {
        ObservedState {
            id: id.clone(),
            applied_version: self.applied_version,
            desired_replicas: self.desired,
            ready_replicas: self
                .replicas
                .iter()
                .filter(|r| r.ready && !r.failed)
                .count() as u32,
            template: self.template.clone(),
            replicas: self.replicas.clone(),
            missing_parts: self.missing_parts.iter().cloned().collect(),
            foreign_fields: self.foreign_fields.iter().cloned().collect(),
        }
    }
}

impl InMemoryReplicator {
    /// A replicator with no workloads.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many times [`Replicator::apply`] was called (including no-op applies).
    pub fn apply_count(&self) -> u64 {
        self.shared.applies.load(Ordering::Relaxed)
    }

    fn notify(&self, id: &ServiceId) {
        // No subscriber is not an error.
        let _ = self.shared.changes.send(id.clone());
    }

    /// Runs `f` on the live workload of `id` and notifies a change.
    fn mutate(&self, id: &ServiceId, f: impl FnOnce(&mut Workload)) -> Result<()> {
        {
            let mut workloads = self.shared.workloads.lock();
            let w = workloads
                .get_mut(id)
                .ok_or_else(|| Error::not_found(format!("workload {id}")))?;
            f(w);
        }
        self.notify(id);
        Ok(())
    }

    /// Deletes the whole workload, as if someone removed it from the cluster.
    pub fn delete_workload(&self, id: &ServiceId) -> Result<()> {
        let removed = self.shared.workloads.lock().remove(id);
        if removed.is_none() {
            return Err(Error::not_found(format!("workload {id}")));
        }
        self.notify(id);
        Ok(())
    }

    /// Changes the live image: the template's image and every replica's digest.
    pub fn set_live_image(&self, id: &ServiceId, image: ImageRef) -> Result<()> {
        self.mutate(id, |w| {
            for r in &mut w.replicas {
                r.image_digest = image.digest().copied();
            }
            w.template.image = image;
        })
    }

    /// Changes the live replica count; replicas are added (ready) or removed.
    pub fn set_live_replicas(&self, id: &ServiceId, replicas: u32) -> Result<()> {
        self.mutate(id, |w| {
            w.desired = replicas;
            w.resize(id);
        })
    }

    /// Edits the live template (not the image digests replicas run).
    pub fn tamper_template(
        &self,
        id: &ServiceId,
        edit: impl FnOnce(&mut WorkloadTemplate),
    ) -> Result<()> {
        self.mutate(id, |w| edit(&mut w.template))
    }

    /// Marks replica `name` failed and not ready; [`Error::NotFound`] if no such replica.
    pub fn fail_replica(&self, id: &ServiceId, name: &str) -> Result<()> {
        {
            let mut workloads = self.shared.workloads.lock();
            let r = workloads
                .get_mut(id)
                .and_then(|w| w.replicas.iter_mut().find(|r| r.name == name))
                .ok_or_else(|| Error::not_found(format!("replica {name} of {id}")))?;
            r.failed = true;
            r.ready = false;
        }
        self.notify(id);
        Ok(())
    }

    /// Deletes a supporting part of the workload (e.g. `"service"`); the next apply
    /// restores it.
    pub fn delete_part(&self, id: &ServiceId, part: &str) -> Result<()> {
        self.mutate(id, |w| {
            w.missing_parts.insert(part.to_owned());
        })
    }

    /// Sets a field as another writer would (e.g. `"statefulset: spec.template.
    /// metadata.labels.x (by kubectl-patch)"`); the next apply removes it.
    pub fn set_foreign_field(&self, id: &ServiceId, field: &str) -> Result<()> {
        self.mutate(id, |w| {
            w.foreign_fields.insert(field.to_owned());
        })
    }
}

#[async_trait]
impl Replicator for InMemoryReplicator {
    async fn apply(&self, record: &ServiceRecord) -> Result<()> {
        self.shared.applies.fetch_add(1, Ordering::Relaxed);
        let id = &record.id;
        let template = WorkloadTemplate::from_spec(&record.spec);
        let changed = {
            let mut workloads = self.shared.workloads.lock();
            match workloads.get_mut(id) {
                Some(w) => {
                    let before = w.clone();
                    if w.template != template {
                        // A new template rolls every replica.
                        w.template = template;
                        w.replicas.clear();
                    }
                    w.desired = record.desired_replicas();
                    w.applied_version = Some(record.version);
                    w.missing_parts.clear();
                    w.foreign_fields.clear();
                    w.resize(id);
                    *w != before
                }
                None => {
                    let mut w = Workload {
                        applied_version: Some(record.version),
                        desired: record.desired_replicas(),
                        template,
                        replicas: Vec::new(),
                        missing_parts: BTreeSet::new(),
                        foreign_fields: BTreeSet::new(),
                    };
                    w.resize(id);
                    workloads.insert(id.clone(), w);
                    true
                }
            }
        };
        if changed {
            self.notify(id);
        }
        Ok(())
    }

    async fn observe(&self, id: &ServiceId) -> Result<Option<ObservedState>> {
        Ok(self.shared.workloads.lock().get(id).map(|w| w.observed(id)))
    }

    async fn remove(&self, id: &ServiceId) -> Result<()> {
        let removed = self.shared.workloads.lock().remove(id);
        if removed.is_some() {
            self.notify(id);
        }
        Ok(())
    }

    async fn replace_replicas(&self, id: &ServiceId, replicas: &[String]) -> Result<()> {
        let changed = {
            let mut workloads = self.shared.workloads.lock();
            let Some(w) = workloads.get_mut(id) else {
                return Ok(());
            };
            let mut changed = false;
            for (i, r) in w.replicas.iter_mut().enumerate() {
                if replicas.contains(&r.name) {
                    *r = fresh_replica(id, i as u32, &w.template);
                    changed = true;
                }
            }
            changed
        };
        if changed {
            self.notify(id);
        }
        Ok(())
    }

    async fn managed(&self) -> Result<Vec<ServiceId>> {
        Ok(self.shared.workloads.lock().keys().cloned().collect())
    }

    async fn changes(&self) -> Result<BoxStream<'static, ServiceId>> {
        let rx = self.shared.changes.subscribe();
        Ok(BroadcastStream::new(rx)
            .filter_map(|item| async move { item.ok() })
            .boxed())
    }
}
