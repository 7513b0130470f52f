//! The recoverer trait: diagnose a service and repair it from the record.

use std::fmt::Debug;

use async_trait::async_trait;

use crate::diagnosis::{Diagnosis, RecoveryReport};
use crate::error::Result;
use crate::id::ServiceId;

/// Detects what is wrong with a service and restores the recorded state.
#[async_trait]
pub trait Recoverer: Send + Sync + Debug {
    /// Compares the record with the live workload and the image stores. Read-only.
    async fn diagnose(&self, id: &ServiceId) -> Result<Diagnosis>;

    /// Acts on `diagnosis`. Never writes to the registry. Idempotent: recovering a
    /// healthy diagnosis does nothing.
    async fn recover(&self, diagnosis: &Diagnosis) -> Result<RecoveryReport>;
}
