//! Decoding of etcd keys and values of the replicated log: entry chunks, indexes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| br2k_etcd::fuzzing::chunk(data));
