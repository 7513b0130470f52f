//! Gathering what a diagnosis is computed from: the verified record (with the
//! last verified copy as a stale fallback) and the image health in each store.

use std::sync::Arc;
use tokio::time::Instant;

use super::decide::{ImageHealth, ImageStatus};
use super::engine::Supervisor;
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::id::ServiceId;
use crate::image::Repository;
use crate::observed::ObservedState;
use crate::record::ServiceRecord;
use crate::store::ImageStore;

/// What a diagnosis was computed from.
#[derive(Debug, Clone)]
pub(super) struct Context {
    pub(super) record: Option<ServiceRecord>,
    pub(super) observed: Option<ObservedState>,
    pub(super) images: Vec<ImageHealth>,
}

/// Whether `read` is older than `verified`, a record of the same service verified
/// before: fewer versions (versions are only ever appended), an older checkpoint, or
/// a different answer read at an earlier block.
fn regresses(read: &ServiceRecord, verified: &ServiceRecord) -> bool {
    let checkpoint = |r: &ServiceRecord| r.checkpoint.as_ref().map_or(0, |c| c.state_version);
    if read.latest_version < verified.latest_version || checkpoint(read) < checkpoint(verified) {
        return true;
    }
    let earlier = matches!((read.as_of, verified.as_of), (Some(a), Some(b)) if a < b);
    earlier
        && ServiceRecord {
            as_of: verified.as_of,
            stale: verified.stale,
            ..read.clone()
        } != *verified
}

fn classify(e: &Error) -> ImageStatus {
    match e {
        Error::NotFound { .. } => ImageStatus::Missing,
        Error::Tampered { .. } | Error::InvalidInput(_) => ImageStatus::Tampered(e.to_string()),
        _ => ImageStatus::Down,
    }
}

impl Supervisor {
    /// Reads the active record, falling back to the last verified copy (stale) when
    /// the registry is unavailable or serves a record that fails verification.
    /// `Ok(None)` when the service is not registered.
    pub(super) async fn read_record(&self, id: &ServiceId) -> Result<Option<ServiceRecord>> {
        let record = self.read_record_unchecked(id).await?;
        if let (Some(r), Some(allowed)) = (&record, &self.config.allowed_owners)
            && !allowed.iter().any(|a| a.0.eq_ignore_ascii_case(&r.owner.0))
        {
            return Err(Error::permission_denied(format!(
                "service {id} is owned by {}, which is not an allowed owner",
                r.owner
            )));
        }
        Ok(record)
    }

    /// [`Self::read_record`] without the owner check.
    async fn read_record_unchecked(&self, id: &ServiceId) -> Result<Option<ServiceRecord>> {
        let read = match self.registry.active(id).await {
            Ok(rec) => rec.verify().map(|()| rec),
            Err(e) => Err(e),
        };
        let verified = self.records.lock().get(id).cloned();
        match read {
            Ok(rec) => {
                if let Some(prev) = verified.filter(|prev| regresses(&rec, prev)) {
                    tracing::warn!(
                        %id,
                        read_version = rec.version,
                        read_latest = rec.latest_version,
                        read_as_of = ?rec.as_of,
                        verified_as_of = ?prev.as_of,
                        "the chain answered with an older record than one already verified (a lagging or lying endpoint, or a reorg); keeping the verified one"
                    );
                    return Ok(Some(ServiceRecord {
                        stale: true,
                        ..prev
                    }));
                }
                if !rec.stale {
                    self.records.lock().insert(id.clone(), rec.clone());
                }
                Ok(Some(rec))
            }
            Err(Error::NotFound { .. }) => match verified {
                // Services are never deregistered: a service verified before that a
                // read says does not exist is a lagging or lying answer, and must not
                // remove a running workload.
                Some(prev) => {
                    tracing::warn!(%id, verified_as_of = ?prev.as_of, "the chain says the service is not registered although its record was verified before; keeping the verified one");
                    Ok(Some(ServiceRecord {
                        stale: true,
                        ..prev
                    }))
                }
                None => Ok(None),
            },
            Err(e) if e.is_retryable() || matches!(e, Error::Tampered { .. }) => {
                let cached = self.records.lock().get(id).cloned();
                match cached {
                    Some(mut rec) => {
                        tracing::debug!(%id, error = %e, "registry unavailable; using the last verified record");
                        rec.stale = true;
                        Ok(Some(rec))
                    }
                    None => Err(e),
                }
            }
            Err(e) => Err(e),
        }
    }

    pub(super) async fn store_status(
        &self,
        index: usize,
        store: &dyn ImageStore,
        repository: &Repository,
        digest: &Digest,
    ) -> ImageStatus {
        match store.has(repository, digest).await {
            Ok(true) => {}
            Ok(false) => return ImageStatus::Missing,
            Err(e) => return classify(&e),
        }
        let key = (index, repository.clone(), *digest);
        let fresh = self
            .verified
            .lock()
            .get(&key)
            .is_some_and(|at| at.elapsed() < self.config.verify_ttl);
        if fresh {
            return ImageStatus::Ok;
        }
        match store.verify(repository, digest).await {
            Ok(()) => {
                // Whatever made a copy unrepairable is over once it verifies.
                self.unrepairable.lock().remove(&key);
                self.verified.lock().insert(key, Instant::now());
                ImageStatus::Ok
            }
            Err(e) => {
                self.verified.lock().remove(&key);
                classify(&e)
            }
        }
    }

    /// [`Self::store_status`] without the verification cache: the bytes are pulled
    /// and checked now.
    pub(super) async fn fresh_status(
        &self,
        index: usize,
        store: &dyn ImageStore,
        repository: &Repository,
        digest: &Digest,
    ) -> ImageStatus {
        self.verified
            .lock()
            .remove(&(index, repository.clone(), *digest));
        self.store_status(index, store, repository, digest).await
    }

    /// The registry to apply `record` from: `preferred` if its copy verifies now,
    /// else the first other store (in order) whose copy does.
    pub(super) async fn verified_source(
        &self,
        record: &ServiceRecord,
        preferred: &str,
    ) -> Result<String> {
        let Some(digest) = record.spec.image.digest() else {
            return Ok(preferred.to_owned());
        };
        if self.stores.is_empty() {
            return Ok(preferred.to_owned());
        }
        let repository = record.spec.image.repository();
        let mut order: Vec<(usize, &Arc<dyn ImageStore>)> =
            self.stores.iter().enumerate().collect();
        order.sort_by_key(|(_, s)| s.registry() != preferred);
        for (i, store) in order {
            let status = self
                .fresh_status(i, store.as_ref(), repository, digest)
                .await;
            if status == ImageStatus::Ok {
                return Ok(store.registry().to_owned());
            }
            tracing::warn!(registry = store.registry(), ?status, %digest, "not applying from this registry: its copy does not verify now");
        }
        Err(Error::unavailable(format!(
            "no registry serves a copy of {digest} that verifies now"
        )))
    }

    /// The health of the record's image in every store, in store order.
    pub(super) async fn image_health(&self, record: &ServiceRecord) -> Vec<ImageHealth> {
        let Some(digest) = record.spec.image.digest() else {
            return Vec::new();
        };
        let repository = record.spec.image.repository();
        let checks = self.stores.iter().enumerate().map(|(i, store)| async move {
            ImageHealth::new(
                store.registry(),
                self.store_status(i, store.as_ref(), repository, digest)
                    .await,
            )
        });
        futures::future::join_all(checks).await
    }

    pub(super) async fn gather(&self, id: &ServiceId) -> Result<Context> {
        let (record, observed) =
            futures::future::join(self.read_record(id), self.replicator.observe(id)).await;
        let record = record?;
        let observed = observed?;
        let images = match &record {
            Some(r) => self.image_health(r).await,
            None => Vec::new(),
        };
        Ok(Context {
            record,
            observed,
            images,
        })
    }
}
