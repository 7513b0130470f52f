//! The replica's decoders: snapshot artifacts and log entries (applied in order).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| br2k_core::replica::fuzzing::target(data));
