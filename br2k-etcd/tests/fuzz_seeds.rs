//! The `etcd_chunk` fuzz target's inputs on stable (so CI covers the target without
//! nightly): the seeds built from real inputs, every committed seed and crash
//! regression under `fuzz/seeds/etcd_chunk` and `fuzz/regressions/etcd_chunk`, each through the
//! entry point the fuzz target calls. `BR2K_FUZZ_WRITE_SEEDS=1` (re)writes the
//! seed files from the built seeds.

#[test]
fn seeds_and_regressions_replay_through_the_target() {
    br2k_core::conformance::fuzz::replay_fuzz_inputs(
        env!("CARGO_MANIFEST_DIR"),
        "etcd_chunk",
        &br2k_etcd::fuzzing::seeds(),
        br2k_etcd::fuzzing::chunk,
    );
}
