//! Fuzzes image reference and repository parsing: no panics, and whatever parses
//! prints back to a string that parses to the same value.
#![no_main]

use br2k_core::{ImageRef, Repository};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(r) = ImageRef::parse(s) {
        let printed = r.to_string();
        let again = ImageRef::parse(&printed).expect("printed reference parses");
        assert_eq!(again, r, "round trip of {s:?} via {printed:?}");
    }
    if let Ok(repo) = Repository::new(s) {
        assert_eq!(Repository::new(repo.as_str()).expect("reparse"), repo);
    }
    if let Ok(p) = br2k_oci::PlatformSpec::parse(s) {
        assert_eq!(br2k_oci::PlatformSpec::parse(&p.to_string()).expect("reparse"), p);
    }
});
