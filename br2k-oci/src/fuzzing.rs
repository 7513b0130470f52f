//! Entry points of the fuzz targets (`fuzz/`, cargo feature `fuzzing`): what br2k reads
//! from registries, token servers and image layouts without trusting it.
//!
//! - [`token_answer`]: a token server's JSON answer (`auth::parse_token_answer`).
//! - [`challenges`]: `WWW-Authenticate` values, parsed as a `401` answer's are
//!   ([`BearerChallenge::find`], [`parse_challenges`]).
//! - [`manifest`]: manifest and index documents ([`parse_manifest_doc`],
//!   [`ImageIndex::parse`], [`Manifest::parse`](br2k_core::Manifest::parse)).
//! - [`layout`]: an image layout tarball (plain or gzip), unpacked as
//!   `OciImageStore::push_layout` unpacks it, then its `index.json` and manifests
//!   parsed as the push reads them.

use std::path::Path;

use br2k_core::Manifest;
use br2k_core::artifact::MAX_MANIFEST_BYTES;

use crate::auth::{BearerChallenge, parse_challenges, parse_token_answer};
use crate::index::{ImageIndex, parse_manifest_doc};

/// The `oci_documents` target: `data[0] % 3` picks [`token_answer`], [`challenges`]
/// or [`manifest`] for the rest.
pub fn documents(data: &[u8]) {
    if let Some((&which, rest)) = data.split_first() {
        match which % 3 {
            0 => token_answer(rest),
            1 => challenges(rest),
            _ => manifest(rest),
        }
    }
}

/// Parses a token server's answer; a token found is never empty.
pub fn token_answer(data: &[u8]) {
    if let Ok((token, life)) = parse_token_answer(data) {
        assert!(!token.is_empty(), "an empty token is refused");
        assert!(!life.is_zero(), "a token lives");
    }
}

/// Parses header values (split at newlines, as several `WWW-Authenticate` headers)
/// as a `401` answer's; values that are not visible ASCII are skipped, as
/// `HeaderValue::to_str` skips them.
pub fn challenges(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let values: Vec<&str> = text
        .split('\n')
        .filter(|v| v.bytes().all(|b| b == b'\t' || (b' '..0x7f).contains(&b)))
        .collect();
    for v in &values {
        let _ = parse_challenges(v);
    }
    if let Ok(Some(c)) = BearerChallenge::find(values.iter().copied()) {
        assert!(
            c.realm.starts_with("http://") || c.realm.starts_with("https://"),
            "a realm is an http(s) URL: {}",
            c.realm
        );
    }
}

/// Parses a manifest document; `data[0]` picks the HTTP content type it came with.
pub fn manifest(data: &[u8]) {
    let Some((&which, doc)) = data.split_first() else {
        return;
    };
    let content_type = match which % 4 {
        0 => None,
        1 => Some(br2k_core::artifact::OCI_MANIFEST),
        2 => Some(br2k_core::artifact::OCI_INDEX),
        _ => Some(crate::index::DOCKER_MANIFEST_LIST),
    };
    let _ = parse_manifest_doc(doc, content_type);
    let _ = ImageIndex::parse(doc);
    let _ = Manifest::parse(doc);
}

/// Unpacks `data` as a layout tarball into a fresh directory, checks that nothing was
/// written outside it, then reads the layout as a push does (up to the uploads).
pub fn layout(data: &[u8]) {
    let base = tempfile::tempdir().expect("temporary directory");
    let src = base.path().join("layout.tar");
    let dst = base.path().join("out");
    std::fs::write(&src, data).expect("write the tarball");
    std::fs::create_dir(&dst).expect("create the target");
    let unpacked = crate::layout::unpack(&src, &dst);
    let mut names: Vec<_> = std::fs::read_dir(base.path())
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    names.sort();
    assert_eq!(names, ["layout.tar", "out"], "nothing escapes the target");
    if unpacked.is_ok() {
        read_layout(&dst);
    }
}

/// Reads `index.json` and the manifests it names, with the size bound of a push.
fn read_layout(dir: &Path) {
    let Some(index) = read_small(&dir.join("index.json")) else {
        return;
    };
    let Ok(index) = ImageIndex::parse(&index) else {
        return;
    };
    for e in &index.manifests {
        let p = dir.join("blobs").join("sha256").join(e.digest.hex());
        if let Some(bytes) = read_small(&p)
            && e.digest.verify("layout manifest", &bytes).is_ok()
        {
            let _ = parse_manifest_doc(&bytes, Some(&e.media_type));
        }
    }
}

fn read_small(path: &Path) -> Option<Vec<u8>> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    if !meta.is_file() || meta.len() > MAX_MANIFEST_BYTES as u64 {
        return None;
    }
    std::fs::read(path).ok()
}

/// Real inputs of [`documents`]: token answers of Distribution's and Docker Hub's
/// token servers, their challenges, and the manifest and index of a built image.
pub fn document_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let image = seed_image();
    let with = |tag: u8, v: &[u8]| {
        let mut out = vec![tag];
        out.extend_from_slice(v);
        out
    };
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": br2k_core::artifact::OCI_INDEX,
        "manifests": [{
            "mediaType": br2k_core::artifact::OCI_MANIFEST,
            "digest": image.digest.to_string(),
            "size": image.manifest_bytes.len(),
            "platform": {"architecture": "amd64", "os": "linux"}
        }]
    });
    vec![
        (
            "token",
            with(0, br#"{"token":"eyJhbGciOiJFUzI1NiJ9.e30.sig","expires_in":300,"issued_at":"2026-01-01T00:00:00Z"}"#),
        ),
        (
            "access_token",
            with(0, br#"{"access_token":"abc.def.ghi","expires_in":60}"#),
        ),
        (
            "challenge",
            with(1, br#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull,push""#),
        ),
        (
            "challenges",
            with(1, b"Basic realm=\"registry\"\nBearer realm=\"http://127.0.0.1:5001/token\",service=\"reg\",error=\"insufficient_scope\",scope=\"repository:a:pull repository:b:push\""),
        ),
        ("manifest", with(2, &image.manifest_bytes)),
        (
            "index",
            with(3, &serde_json::to_vec(&index).expect("json")),
        ),
    ]
}

fn seed_image() -> br2k_core::Image {
    crate::ImageBuilder::new()
        .file("app/run.sh", b"#!/bin/sh\necho ok\n".to_vec(), 0o755)
        .expect("valid path")
        .build()
        .expect("builds")
}

/// Real inputs of [`layout`]: a layout written by [`crate::write_layout`], as a tar
/// and as a tar.gz.
pub fn layout_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let dir = tempfile::tempdir().expect("temporary directory");
    crate::write_layout(&seed_image(), dir.path(), Some("v1")).expect("writes");
    let mut tar = tar::Builder::new(Vec::new());
    tar.append_dir_all(".", dir.path()).expect("tars");
    let tar = tar.into_inner().expect("tar");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    std::io::Write::write_all(&mut gz, &tar).expect("gzip");
    vec![
        ("layout.tar", tar),
        ("layout.tar.gz", gz.finish().expect("gzip")),
    ]
}
