//! The committed contract artifact: equal to a fresh compile, and its storage layout
//! holds no string or bytes (nothing free-form, hence nothing secret, is stored).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use serde_json::Value;

fn contracts_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("contracts")
}

fn committed() -> Value {
    let text = std::fs::read_to_string(contracts_dir().join("out/ServiceRegistry.json"))
        .expect("committed artifact");
    serde_json::from_str(&text).expect("artifact is JSON")
}

#[test]
#[ignore = "needs stack (node and npm for the pinned solc-js)"]
fn committed_artifact_equals_a_fresh_compile() {
    let out = std::env::temp_dir().join(format!("br2k-artifact-{}.json", std::process::id()));
    let status = Command::new(contracts_dir().join("build.sh"))
        .arg(&out)
        .status()
        .expect("run contracts/build.sh (needs node and npm)");
    assert!(status.success(), "build.sh failed: {status}");
    let fresh: Value =
        serde_json::from_str(&std::fs::read_to_string(&out).expect("fresh artifact"))
            .expect("JSON");
    let _ = std::fs::remove_file(&out);
    let committed = committed();
    assert_eq!(
        fresh["abi"], committed["abi"],
        "ABI differs: run contracts/build.sh"
    );
    assert_eq!(
        fresh["bytecode"]["object"], committed["bytecode"]["object"],
        "bytecode differs: run contracts/build.sh"
    );
    assert_eq!(fresh, committed, "artifact differs: run contracts/build.sh");
}

/// Walks every storage type reachable from the contract's state variables.
fn reachable(types: &Value, ty: &str, seen: &mut BTreeSet<String>) {
    if !seen.insert(ty.to_owned()) {
        return;
    }
    let t = &types[ty];
    for key in ["base", "key", "value"] {
        if let Some(inner) = t[key].as_str() {
            reachable(types, inner, seen);
        }
    }
    if let Some(members) = t["members"].as_array() {
        for m in members {
            reachable(types, m["type"].as_str().expect("member type"), seen);
        }
    }
}

#[test]
fn storage_holds_no_string_or_bytes() {
    let artifact = committed();
    let layout = &artifact["storageLayout"];
    let types = &layout["types"];
    let mut seen = BTreeSet::new();
    let vars = layout["storage"].as_array().expect("storage variables");
    assert!(!vars.is_empty(), "layout lists the state variables");
    for var in vars {
        reachable(types, var["type"].as_str().expect("type"), &mut seen);
    }
    // The mapping of services, its struct, the version array and the role mapping.
    assert!(seen.len() >= 8, "walked the layout: {seen:?}");
    for ty in &seen {
        let t = &types[ty.as_str()];
        let label = t["label"].as_str().unwrap_or_default();
        assert_ne!(
            t["encoding"], "bytes",
            "{ty} ({label}) is a dynamic string or bytes"
        );
        assert!(
            !label.starts_with("string") && label != "bytes",
            "{ty} ({label}) stores free-form data"
        );
    }
    let labels: BTreeSet<&str> = seen
        .iter()
        .filter_map(|t| types[t.as_str()]["label"].as_str())
        .collect();
    assert!(labels.contains("bytes32"), "hashes are stored: {labels:?}");
}
