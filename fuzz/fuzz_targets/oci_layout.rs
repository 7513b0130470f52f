//! Image layout tarballs (plain or gzip): unpacking, then the layout's index and
//! manifests.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| br2k_oci::fuzzing::layout(data));
