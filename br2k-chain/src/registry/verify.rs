//! Verification of what the registry's events carry against the hashes its storage
//! holds: spec bytes (sha256, canonical form, image digest and replica count) and
//! location endpoints (keccak256, matched by block and hash when read).

use alloy::primitives::B256;
use br2k_core::{Digest, Error, ServiceSpec};

use crate::bindings::ServiceRegistry as C;

/// A spec to fetch from the log and verify.
#[derive(Debug, Clone)]
pub(super) struct SpecWant {
    /// The service key.
    pub(super) key: B256,
    /// The service name (for messages).
    pub(super) name: String,
    /// The version.
    pub(super) version: u64,
    /// The block of the version's event.
    pub(super) block: u64,
    /// The stored sha256 of the spec bytes.
    pub(super) hash: B256,
    /// The stored image digest.
    pub(super) image: B256,
    /// The stored replica count of the version.
    pub(super) replicas: u32,
}

impl SpecWant {
    /// What to fetch for version `version` (stored as `v`) of the service `key`.
    pub(super) fn new(key: B256, name: String, version: u64, v: &C::Version) -> Self {
        Self {
            key,
            name,
            version,
            block: v.blockNumber,
            hash: v.specHash,
            image: v.imageDigest,
            replicas: v.replicas,
        }
    }

    /// The spec, for messages.
    fn what(&self) -> String {
        format!("spec of {} v{}", self.name, self.version)
    }

    /// Checks bytes from the log: sha256 equals the stored hash, they parse as a
    /// valid spec, and they are its canonical form.
    pub(super) fn verify_bytes(&self, bytes: &[u8]) -> Result<ServiceSpec, Error> {
        let expected = Digest::from_bytes(self.hash.0);
        let actual = Digest::of(bytes);
        if actual != expected {
            return Err(Error::tampered(
                self.what(),
                expected.to_string(),
                actual.to_string(),
            ));
        }
        let spec = ServiceSpec::from_json_bytes(bytes).map_err(Error::from)?;
        let canonical = spec.spec_hash();
        if canonical != expected {
            return Err(Error::tampered(
                format!("{} (not canonical)", self.what()),
                expected.to_string(),
                canonical.to_string(),
            ));
        }
        Ok(spec)
    }

    /// Checks that the stored image digest and replica count are the spec's.
    pub(super) fn consistent(&self, spec: ServiceSpec) -> Result<ServiceSpec, Error> {
        let image = spec
            .image
            .digest()
            .map(|d| *d.as_bytes())
            .unwrap_or_default();
        if image != self.image.0 {
            return Err(Error::tampered(
                format!("image digest of {} v{}", self.name, self.version),
                Digest::from_bytes(self.image.0).to_string(),
                Digest::from_bytes(image).to_string(),
            ));
        }
        if spec.replicas != self.replicas {
            return Err(Error::tampered(
                format!("replica count of {} v{}", self.name, self.version),
                self.replicas.to_string(),
                spec.replicas.to_string(),
            ));
        }
        Ok(spec)
    }
}

/// A location endpoint to fetch from the log.
#[derive(Debug, Clone)]
pub(super) struct LocationWant {
    /// The service key.
    pub(super) key: B256,
    /// The service name (for messages).
    pub(super) name: String,
    /// The block of the `Relocated` event.
    pub(super) block: u64,
    /// The stored keccak256 of the endpoint.
    pub(super) hash: B256,
}

#[cfg(test)]
mod tests {
    use br2k_core::conformance::sample_spec;

    use super::*;

    fn want(spec: &ServiceSpec) -> SpecWant {
        SpecWant {
            key: B256::ZERO,
            name: "svc".into(),
            version: 1,
            block: 1,
            hash: B256::from(*spec.spec_hash().as_bytes()),
            image: B256::from(*spec.image.require_digest().unwrap().as_bytes()),
            replicas: spec.replicas,
        }
    }

    #[test]
    fn event_bytes_are_checked_against_the_stored_hashes() {
        let spec = sample_spec("registry.example");
        let w = want(&spec);
        let bytes = spec.canonical_bytes();
        assert_eq!(w.verify_bytes(&bytes).unwrap(), spec);
        assert!(w.consistent(spec.clone()).is_ok());
        // Other bytes than the stored hash's.
        let mut other = bytes.clone();
        other.push(b'\n');
        assert!(matches!(
            w.verify_bytes(&other),
            Err(Error::Tampered { .. })
        ));
        // The stored hash's bytes, but not the canonical form of the spec.
        let loose = SpecWant {
            hash: B256::from(*Digest::of(&other).as_bytes()),
            ..w.clone()
        };
        assert!(matches!(
            loose.verify_bytes(&other),
            Err(Error::Tampered { .. })
        ));
        // A stored replica count or image digest that is not the spec's.
        let more = SpecWant {
            replicas: spec.replicas + 1,
            ..w.clone()
        };
        assert!(matches!(
            more.consistent(spec.clone()),
            Err(Error::Tampered { .. })
        ));
        let image = SpecWant {
            image: B256::ZERO,
            ..w
        };
        assert!(matches!(
            image.consistent(spec),
            Err(Error::Tampered { .. })
        ));
        // Bytes that are not a spec.
        let junk = SpecWant {
            hash: B256::from(*Digest::of(b"{}").as_bytes()),
            ..want(&sample_spec("registry.example"))
        };
        assert!(matches!(
            junk.verify_bytes(b"{}"),
            Err(Error::InvalidInput(_))
        ));
    }
}
