//! The replicator trait: runs a record as a replicated workload.

use std::fmt::Debug;

use async_trait::async_trait;
use futures::stream::BoxStream;

use crate::error::Result;
use crate::id::ServiceId;
use crate::observed::ObservedState;
use crate::record::ServiceRecord;

/// Runs service records as replicated workloads and reports what is live.
#[async_trait]
pub trait Replicator: Send + Sync + Debug {
    /// Makes the live workload match `record` (image, template, replicas =
    /// [`ServiceRecord::desired_replicas`]). Idempotent: applying the same record twice
    /// changes nothing. The record's spec is assumed validated.
    async fn apply(&self, record: &ServiceRecord) -> Result<()>;

    /// Reads the live workload of `id`, rebuilt from the live objects.
    /// `Ok(None)` when no workload exists.
    async fn observe(&self, id: &ServiceId) -> Result<Option<ObservedState>>;

    /// Removes the workload and everything it owns. Idempotent: removing a missing
    /// workload succeeds.
    async fn remove(&self, id: &ServiceId) -> Result<()>;

    /// Deletes the named replicas so they are recreated. Unknown names are ignored.
    async fn replace_replicas(&self, id: &ServiceId, replicas: &[String]) -> Result<()>;

    /// Ids of every workload this replicator manages.
    async fn managed(&self) -> Result<Vec<ServiceId>>;

    /// Ids of services whose live workload changed, from now on. Several changes may
    /// be reported once; callers observe to learn what changed.
    async fn changes(&self) -> Result<BoxStream<'static, ServiceId>>;
}
