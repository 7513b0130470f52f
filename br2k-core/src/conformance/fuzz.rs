//! Replays a fuzz target's inputs on stable, so the test suites cover every target
//! without nightly: the seeds built from real inputs, then every committed seed and
//! crash regression under `fuzz/seeds/<target>` and `fuzz/regressions/<target>`.

use std::path::{Path, PathBuf};

/// Runs `run` on each of `seeds` and on every file under `fuzz/seeds/<target>` and
/// `fuzz/regressions/<target>` of the workspace holding `manifest_dir` (a crate's
/// `CARGO_MANIFEST_DIR`). With `BR2K_FUZZ_WRITE_SEEDS` set, first (re)writes the seed
/// files from `seeds`. Panics if there are no seeds, built or committed.
pub fn replay_fuzz_inputs(
    manifest_dir: &str,
    target: &str,
    seeds: &[(&str, Vec<u8>)],
    run: impl Fn(&[u8]),
) {
    assert!(!seeds.is_empty(), "{target}: no built seeds");
    let fuzz = Path::new(manifest_dir).join("../fuzz");
    if std::env::var_os("BR2K_FUZZ_WRITE_SEEDS").is_some() {
        let dir = fuzz.join("seeds").join(target);
        std::fs::create_dir_all(&dir).expect("seed directory");
        for (name, data) in seeds {
            std::fs::write(dir.join(name), data).expect("write seed");
        }
    }
    for (name, data) in seeds {
        eprintln!("seed {name}");
        run(data);
    }
    let files = |kind: &str| {
        let mut out: Vec<PathBuf> = std::fs::read_dir(fuzz.join(kind).join(target))
            .map(|d| d.map(|e| e.expect("entry").path()).collect())
            .unwrap_or_default();
        out.sort();
        out
    };
    let committed = files("seeds");
    assert!(
        !committed.is_empty(),
        "fuzz/seeds/{target} holds the committed seeds"
    );
    for path in committed.iter().chain(&files("regressions")) {
        eprintln!("{}", path.display());
        run(&std::fs::read(path).expect("read input"));
    }
}
