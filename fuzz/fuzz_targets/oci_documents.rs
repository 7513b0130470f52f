//! Registry documents: token answers, `WWW-Authenticate` challenges, manifests and
//! indexes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| br2k_oci::fuzzing::documents(data));
