//! ABI decoding of what an RPC endpoint answers: view-call return data (`getRecords`
//! and the others) and registry event logs.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| br2k_chain::fuzzing::abi(data));
