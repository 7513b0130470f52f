//! OCI images and artifacts as content-addressed values, verified on construction.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{Error, ValidationError};

/// Media type of an OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of an OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Media type of an OCI image config.
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Media type of a gzip-compressed OCI layer.
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Media type of an uncompressed OCI layer.
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
/// Media type of the empty config used by artifacts.
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
/// Artifact type of br2k state snapshots.
pub const SNAPSHOT_ARTIFACT: &str = "application/vnd.br2k.snapshot.v1";
/// Largest manifest accepted from a registry.
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

/// Refuses manifest or index bytes longer than [`MAX_MANIFEST_BYTES`], before any
/// parsing; `what` names the document in the error.
pub fn check_manifest_size(what: &str, bytes: &[u8]) -> Result<(), ValidationError> {
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(ValidationError::malformed(
            what,
            format!(
                "{} bytes exceed the {MAX_MANIFEST_BYTES}-byte limit",
                bytes.len()
            ),
        ));
    }
    Ok(())
}

/// A content descriptor inside a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the referenced content.
    pub media_type: String,
    /// Digest of the referenced content.
    pub digest: Digest,
    /// Size in bytes.
    pub size: u64,
    /// Optional annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

/// An OCI image manifest (also used for artifacts, with `artifact_type`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    /// Always 2.
    pub schema_version: u32,
    /// The manifest media type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// Artifact type, for non-image artifacts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    /// Config blob.
    pub config: Descriptor,
    /// Layer blobs.
    pub layers: Vec<Descriptor>,
    /// Optional annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
}

impl Manifest {
    /// Parses and checks a manifest from untrusted bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self, ValidationError> {
        check_manifest_size("manifest", bytes)?;
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| ValidationError::malformed("manifest", e))?;
        if m.schema_version != 2 {
            return Err(ValidationError::malformed(
                "manifest",
                format!("schemaVersion {} is not 2", m.schema_version),
            ));
        }
        if let Some(mt) = &m.media_type
            && mt != OCI_MANIFEST
            && mt != "application/vnd.docker.distribution.manifest.v2+json"
        {
            return Err(ValidationError::malformed(
                "manifest",
                format!("unsupported media type {mt:?}"),
            ));
        }
        if m.layers.len() > 1000 {
            return Err(ValidationError::malformed(
                "manifest",
                "more than 1000 layers",
            ));
        }
        Ok(m)
    }
}

/// A blob with its media type and digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    /// Media type.
    pub media_type: String,
    /// Digest of `data`.
    pub digest: Digest,
    /// The bytes.
    pub data: Bytes,
}

impl Blob {
    /// Wraps bytes, computing their digest.
    pub fn new(media_type: impl Into<String>, data: impl Into<Bytes>) -> Self {
        let data = data.into();
        Self {
            media_type: media_type.into(),
            digest: Digest::of(&data),
            data,
        }
    }

    /// Its descriptor.
    pub fn descriptor(&self) -> Descriptor {
        Descriptor {
            media_type: self.media_type.clone(),
            digest: self.digest,
            size: self.data.len() as u64,
            annotations: None,
        }
    }
}

/// A complete image or artifact: manifest, config and layers, all verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    /// Manifest bytes exactly as stored (their digest is the image digest).
    pub manifest_bytes: Bytes,
    /// The parsed manifest.
    pub manifest: Manifest,
    /// Digest of `manifest_bytes`.
    pub digest: Digest,
    /// Config blob.
    pub config: Blob,
    /// Layer blobs, in manifest order.
    pub layers: Vec<Blob>,
}

impl Image {
    /// Builds an image (or an artifact when `artifact_type` is set) from blobs.
    pub fn build(config: Blob, layers: Vec<Blob>, artifact_type: Option<&str>) -> Self {
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(OCI_MANIFEST.to_owned()),
            artifact_type: artifact_type.map(str::to_owned),
            config: config.descriptor(),
            layers: layers.iter().map(Blob::descriptor).collect(),
            annotations: None,
        };
        let value = serde_json::to_value(&manifest).expect("manifest serializes");
        let mut bytes = Vec::new();
        crate::spec::write_canonical(&value, &mut bytes);
        let manifest_bytes = Bytes::from(bytes);
        Self {
            digest: Digest::of(&manifest_bytes),
            manifest_bytes,
            manifest,
            config,
            layers,
        }
    }

    /// A snapshot artifact holding `data` as its one layer.
    pub fn snapshot(data: impl Into<Bytes>) -> Self {
        let config = Blob::new(OCI_EMPTY, Bytes::from_static(b"{}"));
        let layer = Blob::new("application/octet-stream", data);
        Self::build(config, vec![layer], Some(SNAPSHOT_ARTIFACT))
    }

    /// Assembles an image from untrusted parts, verifying every digest and size
    /// against the manifest and the manifest against `expected` when given.
    pub fn from_parts(
        manifest_bytes: Bytes,
        expected: Option<&Digest>,
        config: Bytes,
        layers: Vec<Bytes>,
    ) -> Result<Self, Error> {
        let digest = Digest::of(&manifest_bytes);
        if let Some(e) = expected
            && *e != digest
        {
            return Err(Error::tampered("manifest", e, digest));
        }
        let manifest = Manifest::parse(&manifest_bytes)?;
        if manifest.layers.len() != layers.len() {
            return Err(ValidationError::malformed(
                "image",
                format!(
                    "manifest lists {} layers, {} given",
                    manifest.layers.len(),
                    layers.len()
                ),
            )
            .into());
        }
        let check = |d: &Descriptor, data: &Bytes, what: &str| -> Result<Blob, Error> {
            d.digest.verify(what, data)?;
            if d.size != data.len() as u64 {
                return Err(Error::tampered(format!("{what} size"), d.size, data.len()));
            }
            Ok(Blob {
                media_type: d.media_type.clone(),
                digest: d.digest,
                data: data.clone(),
            })
        };
        let config = check(&manifest.config, &config, "config blob")?;
        let layers = manifest
            .layers
            .iter()
            .zip(&layers)
            .enumerate()
            .map(|(i, (d, data))| check(d, data, &format!("layer {i}")))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            manifest_bytes,
            manifest,
            digest,
            config,
            layers,
        })
    }

    /// Re-verifies every digest (manifest, config, layers).
    pub fn verify(&self) -> Result<(), Error> {
        let again = Self::from_parts(
            self.manifest_bytes.clone(),
            Some(&self.digest),
            self.config.data.clone(),
            self.layers.iter().map(|l| l.data.clone()).collect(),
        )?;
        drop(again);
        Ok(())
    }

    /// Total bytes of config and layers.
    pub fn size(&self) -> u64 {
        self.config.data.len() as u64 + self.layers.iter().map(|l| l.data.len() as u64).sum::<u64>()
    }
}
