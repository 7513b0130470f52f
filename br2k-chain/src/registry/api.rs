//! The [`Registry`] operations of [`ChainRegistry`] and the owner's resets: each write
//! is one transaction of the configured signer, followed by a read of the record.

use alloy::primitives::{Address, B256, keccak256};
use alloy::sol_types::SolCall;
use async_trait::async_trait;
use br2k_core::{
    Account, ChangeStream, Checkpoint, Digest, Error, Location, Placement, Registry, Result, Role,
    ServiceId, ServiceRecord, ServiceSpec, ServiceState, VersionInfo,
};

use super::{
    ChainRegistry, account_of, check_replicas, cluster_word, insert_capped, parse_account,
    role_bits, service_key,
};
use crate::bindings::ServiceRegistry as C;
use crate::error::ChainError;

impl ChainRegistry {
    /// Sends `call` (named `what`) and returns the record of `id` after it.
    async fn update<K: SolCall>(
        &self,
        id: &ServiceId,
        what: &str,
        call: K,
    ) -> Result<ServiceRecord> {
        self.write(what, call).await?;
        self.active(id).await
    }

    /// Sends `call` (named `what`).
    async fn submit<K: SolCall>(&self, what: &str, call: K) -> Result<()> {
        Ok(self.write(what, call).await?)
    }

    /// Sends `call` (a `register` or `publish` of `spec`, whose sha256 is `hash`),
    /// caches the spec as verified and returns the record of `id` after it.
    async fn put_spec<K: SolCall>(
        &self,
        id: &ServiceId,
        what: &str,
        call: K,
        spec: &ServiceSpec,
        hash: B256,
    ) -> Result<ServiceRecord> {
        self.write(what, call).await?;
        insert_capped(&self.inner.specs, hash, spec.clone());
        self.active(id).await
    }

    /// Resets the checkpoint of `id` to `snapshot` at `log_index` and `term`, lower or
    /// higher than the recorded ones without the per-call bounds (recovery after a
    /// compromised replica account pushed them up); its state version is the
    /// recorded one plus one, so readers never see the checkpoint go back. Owner
    /// only ([`Error::PermissionDenied`] otherwise). Returns the record after it.
    pub async fn reset_checkpoint(
        &self,
        id: &ServiceId,
        snapshot: &Digest,
        log_index: u64,
        term: u64,
    ) -> Result<ServiceRecord> {
        let call = C::resetCheckpointCall {
            id: service_key(id),
            snapshot: B256::from(*snapshot.as_bytes()),
            logIndex: log_index,
            term,
        };
        self.update(id, "resetCheckpoint", call).await
    }

    /// Sets the leader location of `id`, at a term lower or higher than the recorded
    /// one without the per-call bound (recovery after a compromised replica account
    /// pushed the term up). Owner only ([`Error::PermissionDenied`] otherwise).
    /// Returns the record after it.
    pub async fn reset_location(
        &self,
        id: &ServiceId,
        location: &Location,
    ) -> Result<ServiceRecord> {
        let call = C::resetLocationCall {
            id: service_key(id),
            term: location.term,
            endpoint: location.endpoint.clone(),
        };
        self.relocate("resetLocation", location, call).await?;
        self.active(id).await
    }

    /// Writes `call` (a `setLocation` or `resetLocation` of `location`) after
    /// validating `location`, and caches its endpoint.
    async fn relocate<K: SolCall>(&self, what: &str, location: &Location, call: K) -> Result<()> {
        // The fields are public: validate what may not have come from `Location::new`.
        Location::new(location.endpoint.clone(), location.term)?;
        self.write(what, call).await?;
        insert_capped(
            &self.inner.endpoints,
            keccak256(location.endpoint.as_bytes()),
            location.endpoint.clone(),
        );
        Ok(())
    }
}

#[async_trait]
impl Registry for ChainRegistry {
    fn account(&self) -> Account {
        // A read-only connection acts as no account (the zero address holds no role).
        account_of(self.inner.sender.as_ref().map_or(Address::ZERO, |s| s.from))
    }

    async fn register(&self, id: &ServiceId, spec: &ServiceSpec) -> Result<ServiceRecord> {
        let (hash, image) = stored_hashes(spec)?;
        let call = C::registerCall {
            name: id.to_string(),
            specHash: hash,
            imageDigest: image,
            replicas: spec.replicas,
            spec: spec.canonical_bytes().into(),
        };
        insert_capped(&self.inner.names, service_key(id), id.clone());
        self.put_spec(id, "register", call, spec, hash).await
    }

    async fn publish(&self, id: &ServiceId, spec: &ServiceSpec) -> Result<ServiceRecord> {
        let (hash, image) = stored_hashes(spec)?;
        let call = C::publishCall {
            id: service_key(id),
            specHash: hash,
            imageDigest: image,
            replicas: spec.replicas,
            spec: spec.canonical_bytes().into(),
        };
        self.put_spec(id, "publish", call, spec, hash).await
    }

    async fn active(&self, id: &ServiceId) -> Result<ServiceRecord> {
        match self.read_many(std::slice::from_ref(id)).await {
            Ok(mut v) => {
                let rec = v
                    .pop()
                    .ok_or_else(|| ChainError::Decode("getRecords: no record".into()))??;
                self.remember(&rec);
                Ok(rec)
            }
            Err(ChainError::Unavailable(reason)) => self.stale(id, &reason),
            Err(e) => Err(e.into()),
        }
    }

    async fn version(&self, id: &ServiceId, version: u64) -> Result<VersionInfo> {
        let v = self
            .call(
                "getVersion",
                C::getVersionCall {
                    id: service_key(id),
                    version,
                },
            )
            .await
            .map_err(|e| match e {
                ChainError::Revert(C::ServiceRegistryErrors::UnknownVersion(_)) => {
                    ChainError::Core(Error::not_found(format!("version {version} of {id}")))
                }
                e => named(id, e),
            })?;
        let mut out = self.versions(id, vec![(version, v)]).await?;
        Ok(out
            .pop()
            .ok_or_else(|| ChainError::Decode(format!("version {version} of {id}")))?)
    }

    async fn history(&self, id: &ServiceId) -> Result<Vec<VersionInfo>> {
        const PAGE: u64 = 256;
        let key = service_key(id);
        let mut raw = Vec::new();
        let mut start = 1u64;
        // One block for every page.
        let pin = self.pin().await?;
        loop {
            let page = self
                .call_at(
                    pin,
                    "getVersions",
                    C::getVersionsCall {
                        id: key,
                        start,
                        count: PAGE,
                    },
                )
                .await
                .map_err(|e| named(id, e))?;
            let n = page.len() as u64;
            raw.extend(
                page.into_iter()
                    .enumerate()
                    .map(|(i, v)| (start + i as u64, v)),
            );
            if n < PAGE {
                break;
            }
            start += PAGE;
        }
        Ok(self.versions(id, raw).await?)
    }

    async fn services(&self) -> Result<Vec<ServiceId>> {
        const PAGE: usize = 1000;
        // One block for the count and every page.
        let pin = self.pin().await?;
        let count = self
            .call_at(pin, "serviceCount", C::serviceCountCall {})
            .await?;
        let count: usize = count.try_into().unwrap_or(usize::MAX);
        // The count comes from an endpoint: never allocate by it.
        let mut keys = Vec::with_capacity(count.min(PAGE));
        while keys.len() < count {
            let page = self
                .call_at(
                    pin,
                    "serviceIds",
                    C::serviceIdsCall {
                        start: alloy::primitives::U256::from(keys.len()),
                        count: alloy::primitives::U256::from(PAGE),
                    },
                )
                .await?;
            if page.is_empty() {
                break;
            }
            if page.len() > PAGE {
                return Err(ChainError::Decode(format!(
                    "serviceIds: {} ids for a page of {PAGE}",
                    page.len()
                ))
                .into());
            }
            keys.extend(page);
        }
        let names = self.names(&keys).await?;
        keys.iter()
            .map(|k| {
                names
                    .get(k)
                    .cloned()
                    .ok_or_else(|| ChainError::MissingLog(format!("registration of {k}")).into())
            })
            .collect()
    }

    async fn set_replicas(&self, id: &ServiceId, replicas: u32) -> Result<ServiceRecord> {
        let current = self.active(id).await?;
        if current.stale {
            return Err(Error::unavailable("no RPC endpoint answers"));
        }
        check_replicas(&current.spec, replicas)?;
        let call = C::setReplicasCall {
            id: service_key(id),
            replicas,
        };
        self.update(id, "setReplicas", call).await
    }

    async fn set_state(&self, id: &ServiceId, state: ServiceState) -> Result<ServiceRecord> {
        let call = C::setStateCall {
            id: service_key(id),
            to: state.code(),
        };
        self.update(id, "setState", call).await
    }

    async fn rollback(&self, id: &ServiceId, version: u64) -> Result<ServiceRecord> {
        let call = C::rollbackCall {
            id: service_key(id),
            version,
        };
        self.update(id, "rollback", call).await
    }

    async fn record_checkpoint(&self, id: &ServiceId, checkpoint: &Checkpoint) -> Result<()> {
        self.submit(
            "recordCheckpoint",
            C::recordCheckpointCall {
                id: service_key(id),
                snapshot: B256::from(*checkpoint.snapshot.as_bytes()),
                logIndex: checkpoint.log_index,
                term: checkpoint.term,
                stateVersion: checkpoint.state_version,
            },
        )
        .await
    }

    async fn set_placement(&self, id: &ServiceId, placement: &Placement) -> Result<()> {
        // The fields are public: validate what may not have come from `Placement::new`;
        // an invalid name sends nothing.
        let cluster = cluster_word(&placement.cluster)?;
        self.submit(
            "setPlacement",
            C::setPlacementCall {
                id: service_key(id),
                epoch: placement.epoch,
                cluster,
            },
        )
        .await
    }

    async fn set_location(&self, id: &ServiceId, location: &Location) -> Result<()> {
        let call = C::setLocationCall {
            id: service_key(id),
            term: location.term,
            endpoint: location.endpoint.clone(),
        };
        self.relocate("setLocation", location, call).await
    }

    async fn grant(&self, id: &ServiceId, account: &Account, role: Role) -> Result<()> {
        let account = parse_account(account)?;
        self.submit(
            "grant",
            C::grantCall {
                id: service_key(id),
                account,
                role: role_bits(role),
            },
        )
        .await
    }

    async fn revoke(&self, id: &ServiceId, account: &Account, role: Role) -> Result<()> {
        let account = parse_account(account)?;
        self.submit(
            "revoke",
            C::revokeCall {
                id: service_key(id),
                account,
                role: role_bits(role),
            },
        )
        .await
    }

    async fn transfer_ownership(&self, id: &ServiceId, new_owner: &Account) -> Result<()> {
        let new_owner = parse_account(new_owner)?;
        self.submit(
            "transferOwnership",
            C::transferOwnershipCall {
                id: service_key(id),
                newOwner: new_owner,
            },
        )
        .await
    }

    async fn accept_ownership(&self, id: &ServiceId) -> Result<()> {
        self.submit(
            "acceptOwnership",
            C::acceptOwnershipCall {
                id: service_key(id),
            },
        )
        .await
    }

    async fn cancel_ownership_transfer(&self, id: &ServiceId) -> Result<()> {
        self.submit(
            "cancelOwnershipTransfer",
            C::cancelOwnershipTransferCall {
                id: service_key(id),
            },
        )
        .await
    }

    async fn pending_owner(&self, id: &ServiceId) -> Result<Option<Account>> {
        let pending = self
            .call(
                "pendingOwnerOf",
                C::pendingOwnerOfCall {
                    id: service_key(id),
                },
            )
            .await
            .map_err(|e| named(id, e))?;
        Ok((pending != Address::ZERO).then(|| account_of(pending)))
    }

    async fn changes(&self) -> Result<ChangeStream> {
        self.change_stream().await
    }
}

/// Validates `spec` and returns the hashes the registry stores of it: its sha256 and
/// its image digest.
fn stored_hashes(spec: &ServiceSpec) -> Result<(B256, B256)> {
    spec.validate()?;
    let hash = spec.spec_hash();
    let image = *spec.image.require_digest()?;
    Ok((B256::from(*hash.as_bytes()), B256::from(*image.as_bytes())))
}

/// Names the service in a `NotRegistered` refusal (the contract knows its key only).
fn named(id: &ServiceId, e: ChainError) -> ChainError {
    match e {
        ChainError::Revert(C::ServiceRegistryErrors::NotRegistered(_)) => {
            Error::not_found(format!("service {id}")).into()
        }
        e => e,
    }
}
