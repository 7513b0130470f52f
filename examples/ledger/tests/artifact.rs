//! The committed `Settlement` artifact equals a fresh compile with the pinned solc-js.

use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn contracts_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("contracts")
}

#[test]
#[ignore = "needs stack (node and npm for the pinned solc-js)"]
fn committed_artifact_equals_a_fresh_compile() {
    let out = std::env::temp_dir().join(format!("br2k-settlement-{}.json", std::process::id()));
    let status = Command::new(contracts_dir().join("build.sh"))
        .arg(&out)
        .status()
        .expect("run contracts/build.sh (needs node and npm)");
    assert!(status.success(), "build.sh failed: {status}");
    let fresh: Value =
        serde_json::from_str(&std::fs::read_to_string(&out).expect("fresh artifact"))
            .expect("JSON");
    let _ = std::fs::remove_file(&out);
    let committed: Value = serde_json::from_str(
        &std::fs::read_to_string(contracts_dir().join("out/Settlement.json"))
            .expect("committed artifact"),
    )
    .expect("JSON");
    assert_eq!(
        fresh["bytecode"]["object"], committed["bytecode"]["object"],
        "bytecode differs: run contracts/build.sh"
    );
    assert_eq!(fresh, committed, "artifact differs: run contracts/build.sh");
}
