//! Checkpoints: the leader snapshots a clone of the applied state off the apply path,
//! pushes it as an OCI artifact, records the [`Checkpoint`] and compacts the log behind
//! the previous one; a starting (or lagging) replica restores the newest checkpoint,
//! digest verified.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::apply::Applied;
use super::{ReplicaRole, Shared, StateMachine, snapshot};
use crate::artifact::Image;
use crate::digest::Digest;
use crate::error::{Error, Result, ValidationError};
use crate::record::Checkpoint;

impl<S: StateMachine> Shared<S> {
    /// A checkpoint fell due: takes it off the apply path, or, while one is being
    /// taken, takes one more after it.
    pub(super) fn checkpoint_due(self: &Arc<Self>) {
        if self.snapshotting.swap(true, Ordering::AcqRel) {
            // One is being taken: a due checkpoint must not be lost (entries can be
            // applied faster than a snapshot is pushed and recorded).
            self.snapshot_pending.store(true, Ordering::Release);
        } else {
            let me = self.clone();
            tokio::spawn(async move {
                loop {
                    let copy = me.applied.lock().clone();
                    if let Err(e) = me.checkpoint(copy).await {
                        tracing::warn!(error = %e, "checkpoint failed");
                    }
                    if me.snapshot_pending.swap(false, Ordering::AcqRel)
                        && *me.role.borrow() == ReplicaRole::Leader
                    {
                        continue;
                    }
                    me.snapshotting.store(false, Ordering::Release);
                    // One that fell due between the check and the release is taken
                    // here, unless another task has started meanwhile.
                    if !(me.snapshot_pending.load(Ordering::Acquire)
                        && *me.role.borrow() == ReplicaRole::Leader
                        && !me.snapshotting.swap(true, Ordering::AcqRel))
                    {
                        break;
                    }
                    me.snapshot_pending.store(false, Ordering::Release);
                }
            });
        }
    }

    /// Snapshots `copy` off the apply path, pushes it, records the checkpoint and
    /// compacts the log behind the previous checkpoint.
    async fn checkpoint(self: &Arc<Self>, copy: Applied<S>) -> Result<Checkpoint> {
        let (index, term) = (copy.index, copy.term);
        let bytes = tokio::task::spawn_blocking(move || snapshot::encode(&copy))
            .await
            .map_err(|e| Error::backend("replica", e, false))??;
        let image = Image::snapshot(bytes);
        let digest: Digest = self
            .store
            .push(&self.cfg.snapshot_repository, &image, None)
            .await?;
        let prev = self.registry.active(&self.cfg.service).await?.checkpoint;
        if prev.as_ref().is_some_and(|p| p.log_index >= index) {
            return Err(Error::conflict("a newer checkpoint is recorded"));
        }
        let cp = Checkpoint {
            snapshot: digest,
            log_index: index,
            term,
            state_version: prev.map_or(0, |p| p.state_version) + 1,
        };
        self.registry
            .record_checkpoint(&self.cfg.service, &cp)
            .await?;
        self.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(index, version = cp.state_version, snapshot = %cp.snapshot, "recorded checkpoint");
        let compact_to = {
            let mut cps = self.checkpoints.lock();
            cps.push_back(index);
            while cps.len() > 2 {
                cps.pop_front();
            }
            (cps.len() == 2).then(|| cps[0])
        };
        if let Some(up_to) = compact_to {
            self.log.compact(up_to).await?;
        }
        Ok(cp)
    }

    /// Restores the newest recorded checkpoint if it is ahead of the applied state
    /// (always when `needed`, i.e. the log behind it is compacted).
    pub(super) async fn restore_newest(&self, needed: bool) -> Result<bool> {
        let record = match self.registry.active(&self.cfg.service).await {
            Ok(r) => r,
            Err(Error::NotFound { .. }) if !needed => return Ok(false),
            Err(e) => return Err(e),
        };
        let Some(cp) = record.checkpoint else {
            return if needed {
                Err(Error::not_found(
                    "a checkpoint: the log is compacted and none is recorded",
                ))
            } else {
                Ok(false)
            };
        };
        if cp.log_index <= self.applied.lock().index {
            return Ok(false);
        }
        self.trace_fingerprint("before restore");
        let image = self
            .store
            .pull(&self.cfg.snapshot_repository, &cp.snapshot)
            .await?;
        if image.digest != cp.snapshot {
            return Err(Error::tampered("snapshot", cp.snapshot, image.digest));
        }
        let layer = image
            .layers
            .first()
            .ok_or_else(|| ValidationError::malformed("snapshot", "no layer"))?;
        let mut fresh = self.applied.lock().clone();
        let data = layer.data.clone();
        let restored = tokio::task::spawn_blocking(move || {
            snapshot::decode(&mut fresh, &data).map(|()| fresh)
        })
        .await
        .map_err(|e| Error::backend("replica", e, false))??;
        if restored.index != cp.log_index {
            return Err(Error::tampered(
                "snapshot log index",
                cp.log_index,
                restored.index,
            ));
        }
        let index = restored.index;
        *self.applied.lock() = restored;
        self.applied_tx.send_replace(index);
        tracing::info!(index, version = cp.state_version, snapshot = %cp.snapshot, "restored checkpoint");
        self.trace_fingerprint("restored");
        Ok(true)
    }
}
