//! What every measurement binary needs: its numeric flags and the process's own
//! memory and CPU time.

use std::str::FromStr;

/// The value after flag `name` on the command line (`--name VALUE`), else `default`.
pub fn arg<T: FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// This process's resident memory (KiB, `VmRSS`) and CPU time so far (user + system,
/// seconds), from `/proc/self`; zeros where it cannot be read.
pub fn rss_and_cpu() -> (u64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    (rss_kb, ticks as f64 / 100.0)
}

/// Creates namespace `ns` on the cluster of `client`, labelled as a test namespace
/// (`br2k.io/test=true`, what the stack's clean-up removes).
pub async fn create_test_namespace(
    client: &kube::Client,
    ns: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    use k8s_openapi::api::core::v1::Namespace;
    use kube::api::{Api, PostParams};
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(serde_json::json!({
                "metadata": {"name": ns, "labels": {"br2k.io/test": "true"}}
            }))?,
        )
        .await?;
    Ok(())
}
