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

/// A short hex id of this run (the low 24 bits of the Unix time in milliseconds), for
/// the names of the objects a measurement creates.
pub fn run_id() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    format!("{:x}", ms & 0xffffff)
}

/// Creates the fake kwok nodes `names`, labelled `br2k.io/test=true`, `type=kwok`,
/// their hostname and `labels`, tainted with `taints` (a JSON array). They are created
/// without a status: kwok gives them a large capacity (the cluster's own nodes hold
/// 110 pods each).
pub async fn create_kwok_nodes(
    client: &kube::Client,
    names: &[String],
    labels: &serde_json::Map<String, serde_json::Value>,
    taints: serde_json::Value,
) -> Result<(), Box<dyn std::error::Error>> {
    use k8s_openapi::api::core::v1::Node;
    use kube::api::{Api, PostParams};
    let nodes: Api<Node> = Api::all(client.clone());
    for name in names {
        let mut all = serde_json::json!({
            "br2k.io/test": "true", "kubernetes.io/hostname": name, "type": "kwok"
        });
        if let Some(all) = all.as_object_mut() {
            all.extend(labels.clone());
        }
        nodes
            .create(
                &PostParams::default(),
                &serde_json::from_value(serde_json::json!({
                    "metadata": {
                        "name": name,
                        "labels": all,
                        "annotations": {"kwok.x-k8s.io/node": "fake"}
                    },
                    "spec": {"taints": taints}
                }))?,
            )
            .await?;
    }
    Ok(())
}
