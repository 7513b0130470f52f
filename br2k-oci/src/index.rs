//! Image indexes (multi-platform images) and manifest kind detection.

use br2k_core::artifact::{MAX_MANIFEST_BYTES, OCI_INDEX, OCI_MANIFEST, check_manifest_size};
use br2k_core::{Digest, Manifest, ValidationError};
use serde::{Deserialize, Serialize};

use crate::config::PlatformSpec;

/// Media type of a Docker manifest list.
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Media type of a Docker image manifest (schema 2).
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Largest number of entries accepted in an index.
pub const MAX_INDEX_ENTRIES: usize = 1000;

/// The platform of an index entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// CPU architecture.
    pub architecture: String,
    /// Operating system.
    pub os: String,
    /// Optional variant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

/// One manifest listed in an index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IndexEntry {
    /// Media type of the child manifest.
    pub media_type: String,
    /// Digest of the child manifest.
    pub digest: Digest,
    /// Size of the child manifest in bytes.
    pub size: u64,
    /// Platform, when the child is a platform-specific image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Optional annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<std::collections::BTreeMap<String, String>>,
}

/// An OCI image index or Docker manifest list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    /// Always 2.
    pub schema_version: u32,
    /// The index media type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    /// Child manifests.
    pub manifests: Vec<IndexEntry>,
    /// Optional annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<std::collections::BTreeMap<String, String>>,
}

impl ImageIndex {
    /// Parses and checks an index from untrusted bytes.
    pub fn parse(bytes: &[u8]) -> Result<Self, ValidationError> {
        check_manifest_size("image index", bytes)?;
        let idx: ImageIndex = serde_json::from_slice(bytes)
            .map_err(|e| ValidationError::malformed("image index", e))?;
        if idx.schema_version != 2 {
            return Err(ValidationError::malformed(
                "image index",
                format!("schemaVersion {} is not 2", idx.schema_version),
            ));
        }
        if let Some(mt) = &idx.media_type
            && mt != OCI_INDEX
            && mt != DOCKER_MANIFEST_LIST
        {
            return Err(ValidationError::malformed(
                "image index",
                format!("unsupported media type {mt:?}"),
            ));
        }
        if idx.manifests.len() > MAX_INDEX_ENTRIES {
            return Err(ValidationError::malformed(
                "image index",
                format!("more than {MAX_INDEX_ENTRIES} manifests"),
            ));
        }
        for m in &idx.manifests {
            if !is_manifest_type(&m.media_type) && !is_index_type(&m.media_type) {
                return Err(ValidationError::malformed(
                    "image index",
                    format!(
                        "entry {} has unsupported media type {:?}",
                        m.digest, m.media_type
                    ),
                ));
            }
            if m.size > MAX_MANIFEST_BYTES as u64 {
                return Err(ValidationError::malformed(
                    "image index",
                    format!(
                        "entry {} is larger than {MAX_MANIFEST_BYTES} bytes",
                        m.digest
                    ),
                ));
            }
        }
        Ok(idx)
    }

    /// The entry for `platform` (variant only compared when requested).
    pub fn select(&self, platform: &PlatformSpec) -> Option<&IndexEntry> {
        self.manifests.iter().find(|m| {
            m.platform.as_ref().is_some_and(|p| {
                p.os == platform.os
                    && p.architecture == platform.architecture
                    && (platform.variant.is_none() || p.variant == platform.variant)
            })
        })
    }
}

/// Whether `media_type` names an image manifest.
pub fn is_manifest_type(media_type: &str) -> bool {
    media_type == OCI_MANIFEST || media_type == DOCKER_MANIFEST
}

/// Whether `media_type` names an index.
pub fn is_index_type(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST
}

/// A parsed manifest document of either kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestDoc {
    /// A single image or artifact manifest.
    Image(Manifest),
    /// A multi-platform index.
    Index(ImageIndex),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Probe {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<serde::de::IgnoredAny>,
}

/// Parses manifest bytes of either kind; `content_type` is the HTTP header when known.
/// The JSON `mediaType` wins over the header; without either, a `manifests` field
/// means an index.
pub fn parse_manifest_doc(
    bytes: &[u8],
    content_type: Option<&str>,
) -> Result<ManifestDoc, ValidationError> {
    check_manifest_size("manifest", bytes)?;
    let probe: Probe =
        serde_json::from_slice(bytes).map_err(|e| ValidationError::malformed("manifest", e))?;
    let media_type = probe
        .media_type
        .as_deref()
        .or(content_type.map(|c| c.split(';').next().unwrap_or(c).trim()));
    let index = match media_type {
        Some(mt) if is_index_type(mt) => true,
        Some(mt) if is_manifest_type(mt) => false,
        Some(mt) if probe.media_type.is_some() => {
            return Err(ValidationError::malformed(
                "manifest",
                format!("unsupported media type {mt:?}"),
            ));
        }
        _ => probe.manifests.is_some(),
    };
    if index {
        ImageIndex::parse(bytes).map(ManifestDoc::Index)
    } else {
        Manifest::parse(bytes).map(ManifestDoc::Image)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn index_json() -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[
            {{"mediaType":"{OCI_MANIFEST}","digest":"{D1}","size":10,"platform":{{"architecture":"arm64","os":"linux","variant":"v8"}}}},
            {{"mediaType":"{OCI_MANIFEST}","digest":"{D2}","size":10,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#
        )
    }

    #[test]
    fn selects_platform() {
        let doc = parse_manifest_doc(index_json().as_bytes(), None).unwrap();
        let ManifestDoc::Index(idx) = doc else {
            panic!("not an index")
        };
        assert_eq!(
            idx.select(&PlatformSpec::default())
                .unwrap()
                .digest
                .to_string(),
            D2
        );
        let arm = PlatformSpec::parse("linux/arm64").unwrap();
        assert_eq!(idx.select(&arm).unwrap().digest.to_string(), D1);
        assert!(
            idx.select(&PlatformSpec::parse("windows/amd64").unwrap())
                .is_none()
        );
    }

    #[test]
    fn rejects_bad_documents() {
        for bad in [
            "",
            "{",
            "[]",
            r#"{"schemaVersion":1,"manifests":[]}"#,
            r#"{"schemaVersion":2,"mediaType":"text/plain","manifests":[]}"#,
            r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"text/plain","digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","size":1}]}"#,
            r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"md5:00","size":1}]}"#,
        ] {
            assert!(parse_manifest_doc(bad.as_bytes(), None).is_err(), "{bad}");
        }
        let big = vec![b' '; MAX_MANIFEST_BYTES + 1];
        assert!(parse_manifest_doc(&big, None).is_err());
    }

    #[test]
    fn detects_kind_without_media_type() {
        let j = format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{D1}","size":3}}]}}"#
        );
        assert!(matches!(
            parse_manifest_doc(j.as_bytes(), None).unwrap(),
            ManifestDoc::Index(_)
        ));
    }
}
