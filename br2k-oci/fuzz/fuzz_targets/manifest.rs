//! Fuzzes manifest and index parsing from untrusted registry bytes: no panics, and
//! what parses serializes to JSON that parses to the same value.
#![no_main]

use br2k_core::Manifest;
use br2k_oci::{ImageIndex, ManifestDoc, PlatformSpec, parse_manifest_doc};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Manifest::parse(data) {
        let bytes = serde_json::to_vec(&m).expect("serializes");
        assert_eq!(Manifest::parse(&bytes).expect("reparse"), m);
    }
    if let Ok(i) = ImageIndex::parse(data) {
        let bytes = serde_json::to_vec(&i).expect("serializes");
        assert_eq!(ImageIndex::parse(&bytes).expect("reparse"), i);
        let _ = i.select(&PlatformSpec::default());
    }
    for ct in [None, Some("application/vnd.oci.image.index.v1+json"), Some("text/plain; x")] {
        match parse_manifest_doc(data, ct) {
            Ok(ManifestDoc::Image(m)) => assert!(m.schema_version == 2),
            Ok(ManifestDoc::Index(i)) => assert!(i.schema_version == 2),
            Err(_) => {}
        }
    }
});
