//! The `k8s_live` fuzz target's inputs on stable (so CI covers the target without
//! nightly): the seeds built from real inputs, every committed seed and crash
//! regression under `fuzz/seeds/k8s_live` and `fuzz/regressions/k8s_live`, each through the
//! entry point the fuzz target calls. `BR2K_FUZZ_WRITE_SEEDS=1` (re)writes the
//! seed files from the built seeds.

use std::path::PathBuf;

fn files(dir: &str) -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz")
        .join(dir)
        .join("k8s_live");
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|d| d.map(|e| e.expect("entry").path()).collect())
        .unwrap_or_default();
    out.sort();
    out
}

#[test]
fn seeds_and_regressions_replay_through_the_target() {
    let seeds = br2k_k8s::fuzzing::seeds();
    assert!(!seeds.is_empty());
    if std::env::var_os("BR2K_FUZZ_WRITE_SEEDS").is_some() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/k8s_live");
        std::fs::create_dir_all(&dir).expect("seed directory");
        for (name, data) in &seeds {
            std::fs::write(dir.join(name), data).expect("write seed");
        }
    }
    for (name, data) in &seeds {
        eprintln!("seed {name}");
        br2k_k8s::fuzzing::live_object(data);
    }
    let committed = files("seeds");
    assert!(
        !committed.is_empty(),
        "fuzz/seeds/k8s_live holds the committed seeds"
    );
    for path in committed.iter().chain(&files("regressions")) {
        eprintln!("{}", path.display());
        br2k_k8s::fuzzing::live_object(&std::fs::read(path).expect("read input"));
    }
}
