//! The committed `deploy/crd.yaml` is exactly what `operator --print-crd` generates.

#[test]
fn committed_crd_matches_the_rust_types() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/crd.yaml");
    let committed = std::fs::read_to_string(path).expect("deploy/crd.yaml exists");
    assert!(
        committed == br2k_operator::crd::crd_yaml(),
        "deploy/crd.yaml is stale: run `cargo run -p br2k-operator -- --print-crd > deploy/crd.yaml`"
    );
}

#[test]
fn crd_has_status_subresource_and_spec_fields() {
    use kube::CustomResourceExt;
    let crd = br2k_operator::crd::Br2kService::crd();
    let v = serde_json::to_value(&crd).unwrap();
    let version = &v["spec"]["versions"][0];
    assert_eq!(v["spec"]["group"], "br2k.io");
    assert!(version["subresources"]["status"].is_object());
    let props = &version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    for field in ["serviceId", "credentials", "namespace"] {
        assert!(props[field].is_object(), "spec.{field} in the schema");
    }
    // The trust anchors are the operator's configuration, not the resource's.
    for field in ["registryContract", "rpcEndpoints", "ociRegistries"] {
        assert!(
            props[field].is_null(),
            "spec.{field} must not be in the schema"
        );
    }
}
