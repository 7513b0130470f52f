//! Batched reads: many records in few round trips (one `getRecords` view call per
//! [`RECORDS_PER_CALL`] ids at one pinned block, one `eth_getLogs` per
//! [`IDS_PER_LOG_QUERY`] specs or endpoints not yet verified), and the last verified
//! record served stale when no endpoint answers.

use std::collections::HashMap;

use alloy::primitives::B256;
use br2k_core::{
    Checkpoint, Digest, Error, Location, Result, ServiceId, ServiceRecord, ServiceSpec,
    ServiceState, VersionInfo,
};

#[cfg(doc)]
use super::IDS_PER_LOG_QUERY;
use super::verify::{LocationWant, SpecWant};
use super::{
    ChainRegistry, READ_ATTEMPTS, RECORDS_PER_CALL, account_of, decode_placement, insert_capped,
    service_key,
};
use crate::bindings::ServiceRegistry as C;
use crate::error::ChainError;

impl ChainRegistry {
    /// The raw records of `keys`, all read at one pinned block. An answer for another
    /// block than the pinned one is never used: the batch is read again at a fresh pin,
    /// at most [`READ_ATTEMPTS`] times (anvil executed a call at the head block in the
    /// next block's environment when a block was mined meanwhile: the fault matrix saw a
    /// ledger replica fail to start on it).
    async fn raw_records(&self, keys: &[B256]) -> Result<Vec<(u64, C::Record)>, ChainError> {
        let mut attempts = 0;
        'read: loop {
            attempts += 1;
            let mut raws: Vec<(u64, C::Record)> = Vec::with_capacity(keys.len());
            let pin = self.pin().await?;
            for chunk in keys.chunks(RECORDS_PER_CALL) {
                let r = self
                    .call_at(
                        pin,
                        "getRecords",
                        C::getRecordsCall {
                            keys: chunk.to_vec(),
                        },
                    )
                    .await?;
                if r.blockNumber != pin.number {
                    if attempts < READ_ATTEMPTS {
                        continue 'read;
                    }
                    return Err(ChainError::Decode(format!(
                        "getRecords: answered for block {} when asked at block {}",
                        r.blockNumber, pin.number
                    )));
                }
                // An endpoint that answers fewer records, or another service's record,
                // is not trusted.
                if r.records.len() != chunk.len() {
                    return Err(ChainError::Decode(format!(
                        "getRecords: {} records for {} ids",
                        r.records.len(),
                        chunk.len()
                    )));
                }
                if let Some((want, got)) = chunk
                    .iter()
                    .zip(&r.records)
                    .find(|(want, got)| got.exists && got.id != **want)
                {
                    return Err(ChainError::Decode(format!(
                        "getRecords: the record of {} answered for {want}",
                        got.id
                    )));
                }
                raws.extend(r.records.into_iter().map(|rec| (r.blockNumber, rec)));
            }
            return Ok(raws);
        }
    }

    /// Reads and verifies the records of `ids`; the outer error is an RPC failure.
    pub(super) async fn read_many(
        &self,
        ids: &[ServiceId],
    ) -> Result<Vec<Result<ServiceRecord, ChainError>>, ChainError> {
        let keys: Vec<B256> = ids.iter().map(service_key).collect();
        let raws = self.raw_records(&keys).await?;
        let mut spec_wants = Vec::new();
        let mut loc_wants = Vec::new();
        for (id, (_, r)) in ids.iter().zip(&raws) {
            if !r.exists {
                continue;
            }
            spec_wants.push(SpecWant::new(
                r.id,
                id.to_string(),
                r.active,
                &r.activeVersion,
            ));
            if r.location.blockNumber != 0 {
                loc_wants.push(LocationWant {
                    key: r.id,
                    name: id.to_string(),
                    block: r.location.blockNumber,
                    hash: r.location.endpointHash,
                });
            }
        }
        let specs = self.specs(&spec_wants).await?;
        let locations = self.locations(&loc_wants).await?;
        Ok(ids
            .iter()
            .zip(raws)
            .map(|(id, (block, r))| self.record(id, block, r, &specs, &locations))
            .collect())
    }

    /// The record of `id` read at `block` (`r`), with its spec and location fetched
    /// and verified in `specs` and `locations`.
    fn record(
        &self,
        id: &ServiceId,
        block: u64,
        r: C::Record,
        specs: &HashMap<(B256, u64), Result<ServiceSpec>>,
        locations: &HashMap<B256, Result<String>>,
    ) -> Result<ServiceRecord, ChainError> {
        if !r.exists {
            return Err(Error::not_found(format!("service {id}")).into());
        }
        // A verified item, the reason it failed verification, or a missing event.
        fn found<T: Clone>(item: Option<&Result<T>>, what: String) -> Result<T, ChainError> {
            match item {
                Some(Ok(v)) => Ok(v.clone()),
                Some(Err(e)) => Err(e.clone().into()),
                None => Err(ChainError::MissingLog(what)),
            }
        }
        let spec = found(specs.get(&(r.id, r.active)), format!("spec of {id}"))?;
        let location = if r.location.blockNumber == 0 {
            None
        } else {
            Some(Location {
                endpoint: found(locations.get(&r.id), format!("location of {id}"))?,
                term: r.location.term,
            })
        };
        let state = ServiceState::from_code(r.state).map_err(Error::from)?;
        let placement = decode_placement(&format!("getRecords: the record of {id}"), &r.placement)?;
        insert_capped(&self.inner.names, r.id, id.clone());
        let c = &r.checkpoint;
        Ok(ServiceRecord {
            id: id.clone(),
            version: r.active,
            latest_version: r.latest,
            spec,
            spec_hash: Digest::from_bytes(r.activeVersion.specHash.0),
            replicas: r.replicas,
            state,
            owner: account_of(r.owner),
            checkpoint: (c.stateVersion != 0).then(|| Checkpoint {
                snapshot: Digest::from_bytes(c.snapshot.0),
                log_index: c.logIndex,
                term: c.term,
                state_version: c.stateVersion,
            }),
            location,
            placement,
            as_of: Some(block),
            stale: false,
        })
    }

    /// The last verified record of `id` flagged stale, or Unavailable.
    pub(super) fn stale(&self, id: &ServiceId, reason: &str) -> Result<ServiceRecord> {
        match self.inner.last.lock().get(id) {
            Some(r) => {
                tracing::warn!(service = %id, as_of = ?r.as_of, "{reason}; serving the last verified record");
                Ok(ServiceRecord {
                    stale: true,
                    ..r.clone()
                })
            }
            None => Err(Error::unavailable(reason)),
        }
    }

    pub(super) fn remember(&self, r: &ServiceRecord) {
        insert_capped(&self.inner.last, r.id.clone(), r.clone());
    }

    /// Active records of many services in few round trips: one `getRecords` view call
    /// per 200 ids and one `eth_getLogs` per 500 specs not yet verified by this
    /// handle. Each result is what [`br2k_core::Registry::active`] would return for that id.
    pub async fn active_many(&self, ids: &[ServiceId]) -> Vec<Result<ServiceRecord>> {
        match self.read_many(ids).await {
            Ok(results) => results
                .into_iter()
                .map(|r| r.inspect(|rec| self.remember(rec)).map_err(Error::from))
                .collect(),
            Err(ChainError::Unavailable(reason)) => {
                ids.iter().map(|id| self.stale(id, &reason)).collect()
            }
            Err(e) => {
                let e = Error::from(e);
                ids.iter().map(|_| Err(e.clone())).collect()
            }
        }
    }

    pub(super) async fn versions(
        &self,
        id: &ServiceId,
        raw: Vec<(u64, C::Version)>,
    ) -> Result<Vec<VersionInfo>, ChainError> {
        let key = service_key(id);
        let wants: Vec<SpecWant> = raw
            .iter()
            .map(|(n, v)| SpecWant::new(key, id.to_string(), *n, v))
            .collect();
        let mut specs = self.specs(&wants).await?;
        let mut out = Vec::with_capacity(raw.len());
        for (n, v) in raw {
            let spec = specs.remove(&(key, n)).unwrap_or_else(|| {
                Err(ChainError::MissingLog(format!("spec of {id} v{n}")).into())
            })?;
            out.push(VersionInfo {
                version: n,
                spec,
                spec_hash: Digest::from_bytes(v.specHash.0),
                publisher: account_of(v.publisher),
                published_at: Some(v.publishedAt),
            });
        }
        Ok(out)
    }
}
