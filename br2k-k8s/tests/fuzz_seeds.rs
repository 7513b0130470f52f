//! The `k8s_live` fuzz target's inputs on stable (so CI covers the target without
//! nightly): the seeds built from real inputs, every committed seed and crash
//! regression under `fuzz/seeds/k8s_live` and `fuzz/regressions/k8s_live`, each through the
//! entry point the fuzz target calls. `BR2K_FUZZ_WRITE_SEEDS=1` (re)writes the
//! seed files from the built seeds.

#[test]
fn seeds_and_regressions_replay_through_the_target() {
    br2k_core::conformance::fuzz::replay_fuzz_inputs(
        env!("CARGO_MANIFEST_DIR"),
        "k8s_live",
        &br2k_k8s::fuzzing::seeds(),
        br2k_k8s::fuzzing::live_object,
    );
}
