//! The operator's own image, built from its binary (no Docker), pushed to the stack's
//! registries, and read back independently (curl, sha256sum, tar) byte for byte; and
//! the Deployment of `deploy/operator.yaml` with that image accepted and rolled out by
//! the real API server.

use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use kube::{Api, Client};

fn sh(cmd: &str) -> String {
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", cmd])
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

#[tokio::test]
#[ignore = "needs stack"]
async fn operator_image_round_trips_and_its_deployment_rolls_out() {
    let registries: Vec<String> = std::env::var("BR2K_OCI_REGISTRIES")
        .expect("BR2K_OCI_REGISTRIES (source .stack/env)")
        .split(',')
        .map(str::to_owned)
        .collect();
    let bin = env!("CARGO_BIN_EXE_br2k-operator");
    let mut cmd = Command::new(bin);
    cmd.args(["push-image", "--insecure", "--tag", "test"]);
    for r in &registries {
        cmd.args(["--registry", r]);
    }
    let out = cmd.output().expect("run push-image");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reference = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    let (name, digest) = reference.split_once('@').expect("pinned by digest");
    assert!(name.ends_with("/br2k/operator"), "{reference}");

    // Every registry serves exactly those bytes: the manifest hashes to the digest,
    // and the layer unpacks to the binary itself.
    let want = sh(&format!("sha256sum < {bin} | cut -d' ' -f1"));
    for host in &registries {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display();
        let accept = "application/vnd.oci.image.manifest.v1+json";
        sh(&format!(
            "curl -fsS -H 'Accept: {accept}' http://{host}/v2/br2k/operator/manifests/{digest} -o {d}/manifest"
        ));
        let got = sh(&format!("sha256sum < {d}/manifest | cut -d' ' -f1"));
        assert_eq!(
            format!("sha256:{}", got.trim()),
            digest,
            "manifest on {host}"
        );
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("manifest")).unwrap()).unwrap();
        let layer = manifest["layers"][0]["digest"].as_str().expect("a layer");
        sh(&format!(
            "curl -fsS http://{host}/v2/br2k/operator/blobs/{layer} -o {d}/layer && \
             test \"sha256:$(sha256sum < {d}/layer | cut -d' ' -f1)\" = {layer} && \
             mkdir {d}/root && tar -xzf {d}/layer -C {d}/root"
        ));
        let unpacked = sh(&format!(
            "sha256sum < {d}/root/usr/local/bin/br2k-operator | cut -d' ' -f1"
        ));
        assert_eq!(unpacked, want, "binary in the image on {host}");
        assert!(sh(&format!("stat -c %a {d}/root/usr/local/bin/br2k-operator")).trim() == "755");
    }

    // The Deployment, with that image, is valid for the API server and rolls out.
    br2k_k8s::install_crypto_provider();
    let admin = Client::try_default().await.expect("KUBECONFIG");
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");
    for file in ["crd.yaml", "rbac.yaml"] {
        let text = std::fs::read_to_string(format!("{root}/{file}")).unwrap();
        br2k_operator::manifests::apply(&admin, &text, "br2k-test")
            .await
            .unwrap_or_else(|e| panic!("{file}: {e}"));
    }
    let text = std::fs::read_to_string(format!("{root}/operator.yaml"))
        .unwrap()
        .replace(
            "image: REPLACED-BY-scripts/operator-image",
            &format!("image: {reference}"),
        );
    br2k_operator::manifests::apply(&admin, &text, "br2k-test")
        .await
        .unwrap_or_else(|e| panic!("operator.yaml: {e}"));
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), "br2k-system");
    let start = Instant::now();
    loop {
        let d = deployments.get("br2k-operator").await.expect("deployment");
        let image = d
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .map(|s| s.containers[0].image.clone().unwrap_or_default());
        let ready = d
            .status
            .as_ref()
            .and_then(|s| s.ready_replicas)
            .unwrap_or(0);
        if image.as_deref() == Some(reference.as_str()) && ready == 2 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "deployment not rolled out: {:?}",
            d.status
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // kwok runs no containers; the Deployment goes again so later tests see none.
    deployments
        .delete("br2k-operator", &Default::default())
        .await
        .expect("delete deployment");
}
