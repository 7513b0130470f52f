//! The `oci_layout` fuzz target's inputs on stable (so CI covers the target without
//! nightly): the seeds built from real inputs, every committed seed and crash
//! regression under `fuzz/seeds/oci_layout` and `fuzz/regressions/oci_layout`, each through the
//! entry point the fuzz target calls. `BR2K_FUZZ_WRITE_SEEDS=1` (re)writes the
//! seed files from the built seeds.

#[test]
fn seeds_and_regressions_replay_through_the_target() {
    br2k_core::conformance::fuzz::replay_fuzz_inputs(
        env!("CARGO_MANIFEST_DIR"),
        "oci_layout",
        &br2k_oci::fuzzing::layout_seeds(),
        br2k_oci::fuzzing::layout,
    );
}
