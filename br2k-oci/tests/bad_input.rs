//! Malformed registry answers (from a scripted fake registry) become typed errors.

use std::sync::Arc;

use br2k_core::artifact::{MAX_MANIFEST_BYTES, OCI_MANIFEST};
use br2k_core::conformance::sample_image;
use br2k_core::{Digest, ImageStore, Repository};
use br2k_oci::OciImageStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Serves every request with `status`, `content_type` and `body`.
async fn fake(status: u16, content_type: &'static str, body: Vec<u8>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let body = Arc::new(body);
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            let body = body.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let Ok(n) = sock.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                let is_head = head.starts_with(b"HEAD");
                let resp = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
                if !is_head {
                    let _ = sock.write_all(&body).await;
                }
            });
        }
    });
    addr
}

fn repo() -> Repository {
    Repository::new("team/app").unwrap()
}

#[tokio::test]
async fn malformed_manifest_is_invalid_input() {
    let addr = fake(200, OCI_MANIFEST, b"{not json".to_vec()).await;
    let store = OciImageStore::insecure(&addr).unwrap();
    assert_eq!(
        store.resolve(&repo(), "v1").await.unwrap_err().kind(),
        br2k_core::ErrorKind::InvalidInput
    );
}

#[tokio::test]
async fn wrong_media_type_is_invalid_input() {
    let body = br#"{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v1+prettyjws","config":{"mediaType":"x","digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","size":1},"layers":[]}"#;
    let addr = fake(
        200,
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
        body.to_vec(),
    )
    .await;
    let store = OciImageStore::insecure(&addr).unwrap();
    let err = store.resolve(&repo(), "v1").await.unwrap_err();
    assert_eq!(err.kind(), br2k_core::ErrorKind::InvalidInput, "{err}");
}

#[tokio::test]
async fn oversized_manifest_is_invalid_input() {
    let mut body = b"{\"schemaVersion\":2,\"x\":\"".to_vec();
    body.resize(MAX_MANIFEST_BYTES + 10, b'a');
    let addr = fake(200, OCI_MANIFEST, body).await;
    let store = OciImageStore::insecure(&addr).unwrap();
    let err = store.resolve(&repo(), "v1").await.unwrap_err();
    assert_eq!(err.kind(), br2k_core::ErrorKind::InvalidInput, "{err}");
}

#[tokio::test]
async fn manifest_with_wrong_digest_is_tampered() {
    let img = sample_image(9, 1, 100);
    let addr = fake(200, OCI_MANIFEST, img.manifest_bytes.to_vec()).await;
    let store = OciImageStore::insecure(&addr).unwrap();
    let other = Digest::of(b"something else");
    let err = store.pull(&repo(), &other).await.unwrap_err();
    assert_eq!(err.kind(), br2k_core::ErrorKind::Tampered, "{err}");
}

#[tokio::test]
async fn blob_with_wrong_bytes_is_tampered() {
    // Serves the manifest for every path: the config "blob" is then the manifest bytes.
    let img = sample_image(9, 1, 100);
    let addr = fake(200, OCI_MANIFEST, img.manifest_bytes.to_vec()).await;
    let store = OciImageStore::insecure(&addr).unwrap();
    let err = store.pull(&repo(), &img.digest).await.unwrap_err();
    assert_eq!(err.kind(), br2k_core::ErrorKind::Tampered, "{err}");
    assert_eq!(
        store.verify(&repo(), &img.digest).await.unwrap_err().kind(),
        br2k_core::ErrorKind::Tampered
    );
}

#[tokio::test]
async fn statuses_map_to_error_kinds() {
    for (status, kind) in [
        (404, br2k_core::ErrorKind::NotFound),
        (401, br2k_core::ErrorKind::PermissionDenied),
        (403, br2k_core::ErrorKind::PermissionDenied),
        (503, br2k_core::ErrorKind::Unavailable),
        (500, br2k_core::ErrorKind::Unavailable),
    ] {
        let addr = fake(status, "application/json", b"{\"errors\":[]}".to_vec()).await;
        let store = OciImageStore::insecure(&addr).unwrap();
        let err = store.pull(&repo(), &Digest::of(b"x")).await.unwrap_err();
        assert_eq!(err.kind(), kind, "HTTP {status}: {err}");
    }
}

#[tokio::test]
async fn connection_refused_is_unavailable() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let store = OciImageStore::insecure(&format!("127.0.0.1:{port}")).unwrap();
    let err = store.ping().await.unwrap_err();
    assert_eq!(err.kind(), br2k_core::ErrorKind::Unavailable, "{err}");
    assert!(err.is_retryable());
}
