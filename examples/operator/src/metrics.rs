//! Prometheus metrics of the operator, in the text exposition format, served on a
//! plain TCP listener (`GET /metrics`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Upper bounds (seconds) of the time-to-recover histogram buckets.
const BUCKETS: [f64; 10] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

#[derive(Debug, Default)]
struct State {
    recoveries: BTreeMap<String, u64>,
    recover_buckets: [u64; BUCKETS.len()],
    recover_count: u64,
    recover_sum: f64,
    reconcile_errors: u64,
    chain_up: BTreeMap<String, bool>,
    registry_up: BTreeMap<String, bool>,
    leader: bool,
}

/// The operator's counters and gauges; clones share them.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    state: Arc<Mutex<State>>,
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts one recovery acting on `finding`.
    pub fn recovery(&self, finding: &str) {
        *self
            .lock()
            .recoveries
            .entry(finding.to_owned())
            .or_default() += 1;
    }

    /// Records one time to recover.
    pub fn time_to_recover(&self, d: Duration) {
        let s = d.as_secs_f64();
        let mut st = self.lock();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                st.recover_buckets[i] += 1;
            }
        }
        st.recover_count += 1;
        st.recover_sum += s;
    }

    /// Counts a reconcile that failed.
    pub fn reconcile_error(&self) {
        self.lock().reconcile_errors += 1;
    }

    /// Whether the chain of `service` (namespace/name) was reachable.
    pub fn chain_available(&self, service: &str, up: bool) {
        self.lock().chain_up.insert(service.to_owned(), up);
    }

    /// Whether OCI registry `host` was reachable.
    pub fn registry_available(&self, host: &str, up: bool) {
        self.lock().registry_up.insert(host.to_owned(), up);
    }

    /// Forgets the gauges of a deleted resource.
    pub fn forget(&self, service: &str) {
        self.lock().chain_up.remove(service);
    }

    /// Whether this replica leads.
    pub fn leader(&self, leader: bool) {
        self.lock().leader = leader;
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let st = self.lock();
        let mut out = String::new();
        let _ = writeln!(out, "# HELP br2k_recoveries_total Recoveries by finding.");
        let _ = writeln!(out, "# TYPE br2k_recoveries_total counter");
        for (f, n) in &st.recoveries {
            let _ = writeln!(
                out,
                "br2k_recoveries_total{{finding=\"{}\"}} {n}",
                escape(f)
            );
        }
        let _ = writeln!(
            out,
            "# HELP br2k_time_to_recover_seconds Detection to end of recovery actions."
        );
        let _ = writeln!(out, "# TYPE br2k_time_to_recover_seconds histogram");
        for (i, b) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "br2k_time_to_recover_seconds_bucket{{le=\"{b}\"}} {}",
                st.recover_buckets[i]
            );
        }
        let _ = writeln!(
            out,
            "br2k_time_to_recover_seconds_bucket{{le=\"+Inf\"}} {}",
            st.recover_count
        );
        let _ = writeln!(out, "br2k_time_to_recover_seconds_sum {}", st.recover_sum);
        let _ = writeln!(
            out,
            "br2k_time_to_recover_seconds_count {}",
            st.recover_count
        );
        let _ = writeln!(
            out,
            "# HELP br2k_reconcile_errors_total Reconciles that failed."
        );
        let _ = writeln!(out, "# TYPE br2k_reconcile_errors_total counter");
        let _ = writeln!(out, "br2k_reconcile_errors_total {}", st.reconcile_errors);
        let _ = writeln!(
            out,
            "# HELP br2k_chain_available Whether the chain registry of a service answers."
        );
        let _ = writeln!(out, "# TYPE br2k_chain_available gauge");
        for (s, up) in &st.chain_up {
            let _ = writeln!(
                out,
                "br2k_chain_available{{service=\"{}\"}} {}",
                escape(s),
                u8::from(*up)
            );
        }
        let _ = writeln!(
            out,
            "# HELP br2k_registry_available Whether an OCI registry serves the recorded image."
        );
        let _ = writeln!(out, "# TYPE br2k_registry_available gauge");
        for (h, up) in &st.registry_up {
            let _ = writeln!(
                out,
                "br2k_registry_available{{registry=\"{}\"}} {}",
                escape(h),
                u8::from(*up)
            );
        }
        let _ = writeln!(
            out,
            "# HELP br2k_leader Whether this replica holds the leader lease."
        );
        let _ = writeln!(out, "# TYPE br2k_leader gauge");
        let _ = writeln!(out, "br2k_leader {}", u8::from(st.leader));
        out
    }

    /// Serves `GET /metrics` (any other path: 404) on `listener` forever.
    pub async fn serve(self, listener: TcpListener) {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                continue;
            };
            let m = self.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let n =
                    match tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf)).await {
                        Ok(Ok(n)) => n,
                        _ => return,
                    };
                let req = String::from_utf8_lossy(&buf[..n]);
                let path = req.split_whitespace().nth(1).unwrap_or("");
                let (status, body) = if path == "/metrics" {
                    ("200 OK", m.render())
                } else {
                    ("404 Not Found", "not found\n".to_owned())
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = sock.write_all(resp.as_bytes()).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_histogram_and_gauges() {
        let m = Metrics::default();
        m.recovery("missing_workload");
        m.recovery("missing_workload");
        m.time_to_recover(Duration::from_millis(200));
        m.chain_available("ns/a", true);
        m.registry_available("127.0.0.1:5000", false);
        let text = m.render();
        assert!(text.contains("br2k_recoveries_total{finding=\"missing_workload\"} 2"));
        assert!(text.contains("br2k_time_to_recover_seconds_bucket{le=\"0.1\"} 0"));
        assert!(text.contains("br2k_time_to_recover_seconds_bucket{le=\"0.25\"} 1"));
        assert!(text.contains("br2k_time_to_recover_seconds_count 1"));
        assert!(text.contains("br2k_chain_available{service=\"ns/a\"} 1"));
        assert!(text.contains("br2k_registry_available{registry=\"127.0.0.1:5000\"} 0"));
    }
}
