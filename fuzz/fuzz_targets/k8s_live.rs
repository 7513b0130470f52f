//! The live-object parser of br2k-k8s: StatefulSets, ConfigMaps, Pods, Nodes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| br2k_k8s::fuzzing::live_object(data));
