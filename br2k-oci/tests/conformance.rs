//! The core `ImageStore` conformance suite against real Distribution registries.

mod common;

use br2k_core::conformance::image_store::run_all;
use br2k_oci::{MirroredImageStore, OciImageStore};
use common::shared_registries;

#[tokio::test]
#[ignore = "needs stack"]
async fn conformance_on_each_registry() {
    let (addrs, _own) = shared_registries();
    for (i, addr) in addrs.iter().enumerate() {
        let store = OciImageStore::insecure(addr).unwrap();
        let other = OciImageStore::insecure(&addrs[(i + 1) % addrs.len()]).unwrap();
        run_all(&store, Some(&other), "br2k-conformance").await;
    }
}

#[tokio::test]
#[ignore = "needs stack"]
async fn conformance_on_mirrored_store() {
    let (addrs, _own) = shared_registries();
    let stores: Vec<OciImageStore> = addrs
        .iter()
        .map(|a| OciImageStore::insecure(a).unwrap())
        .collect();
    let mirrored = MirroredImageStore::new(stores[0].clone(), stores[1..].to_vec());
    // Copies go to a registry outside the mirror set.
    let third = common::Registry::spawn();
    run_all(&mirrored, Some(&third.store()), "br2k-conformance-mirrored").await;
}
