//! Fuzzes the parsing of service spec bytes as they arrive from the chain (event data,
//! untrusted): no panics; whatever parses is valid, its canonical bytes parse back to
//! the same spec, and canonicalization is a fixed point (stable hash).
#![no_main]

use br2k_core::ServiceSpec;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(spec) = ServiceSpec::from_json_bytes(data) {
        let canonical = spec.canonical_bytes();
        let again = ServiceSpec::from_json_bytes(&canonical).expect("canonical bytes parse");
        assert_eq!(again, spec, "round trip via canonical bytes");
        assert_eq!(again.canonical_bytes(), canonical, "canonical form is stable");
        assert_eq!(again.spec_hash(), spec.spec_hash());
    }
});
