//! Prometheus metrics of the operator (the `prometheus-client` crate), served by axum
//! at `GET /metrics` in the OpenMetrics text format.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::header;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// Upper bounds (seconds) of the time-to-recover histogram buckets.
const BUCKETS: [f64; 10] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FindingLabel {
    finding: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RegistryLabel {
    registry: String,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    recoveries: Family<FindingLabel, Counter>,
    time_to_recover: Histogram,
    reconciles: Counter,
    reconcile_errors: Counter,
    chain_up: Family<ServiceLabel, Gauge>,
    registry_up: Family<RegistryLabel, Gauge>,
    registry_unrepairable: Family<RegistryLabel, Gauge>,
    leader: Gauge,
}

/// The operator's counters and gauges; clones share them.
#[derive(Debug, Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("br2k");
        let recoveries = Family::<FindingLabel, Counter>::default();
        registry.register("recoveries", "Recoveries by finding", recoveries.clone());
        let time_to_recover = Histogram::new(BUCKETS);
        registry.register(
            "time_to_recover_seconds",
            "Detection to the end of a recovery (live state observed again)",
            time_to_recover.clone(),
        );
        let reconciles = Counter::default();
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        let reconcile_errors = Counter::default();
        registry.register(
            "reconcile_errors",
            "Reconciles that failed",
            reconcile_errors.clone(),
        );
        let chain_up = Family::<ServiceLabel, Gauge>::default();
        registry.register(
            "chain_available",
            "Whether the chain registry of a service answers",
            chain_up.clone(),
        );
        let registry_up = Family::<RegistryLabel, Gauge>::default();
        registry.register(
            "registry_available",
            "Whether an OCI registry answers",
            registry_up.clone(),
        );
        let registry_unrepairable = Family::<RegistryLabel, Gauge>::default();
        registry.register(
            "registry_unrepairable",
            "Whether an OCI registry holds a copy of a recorded image that a repair could not fix (never used as a source)",
            registry_unrepairable.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "Whether this replica holds the leader lease",
            leader.clone(),
        );
        Self {
            inner: Arc::new(Inner {
                registry,
                recoveries,
                time_to_recover,
                reconciles,
                reconcile_errors,
                chain_up,
                registry_up,
                registry_unrepairable,
                leader,
            }),
        }
    }
}

impl Metrics {
    /// Counts one recovery acting on `finding`.
    pub fn recovery(&self, finding: &str) {
        self.inner
            .recoveries
            .get_or_create(&FindingLabel {
                finding: finding.to_owned(),
            })
            .inc();
    }

    /// Records one time to recover.
    pub fn time_to_recover(&self, d: Duration) {
        self.inner.time_to_recover.observe(d.as_secs_f64());
    }

    /// Counts one reconcile.
    pub fn reconcile(&self) {
        self.inner.reconciles.inc();
    }

    /// Counts a reconcile that failed.
    pub fn reconcile_error(&self) {
        self.inner.reconcile_errors.inc();
    }

    /// Whether the chain of `service` (namespace/name) was reachable.
    pub fn chain_available(&self, service: &str, up: bool) {
        self.inner
            .chain_up
            .get_or_create(&ServiceLabel {
                service: service.to_owned(),
            })
            .set(i64::from(up));
    }

    /// Whether OCI registry `host` was reachable.
    pub fn registry_available(&self, host: &str, up: bool) {
        self.inner
            .registry_up
            .get_or_create(&RegistryLabel {
                registry: host.to_owned(),
            })
            .set(i64::from(up));
    }

    /// Whether OCI registry `host` holds a copy a repair could not fix.
    pub fn registry_unrepairable(&self, host: &str, unrepairable: bool) {
        self.inner
            .registry_unrepairable
            .get_or_create(&RegistryLabel {
                registry: host.to_owned(),
            })
            .set(i64::from(unrepairable));
    }

    /// Forgets the gauges of a deleted resource.
    pub fn forget(&self, service: &str) {
        self.inner.chain_up.remove(&ServiceLabel {
            service: service.to_owned(),
        });
    }

    /// Whether this replica leads.
    pub fn leader(&self, leader: bool) {
        self.inner.leader.set(i64::from(leader));
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.inner.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Serves `GET /metrics` on `listener` until the process ends.
    pub async fn serve(self, listener: TcpListener) {
        let app = Router::new().route(
            "/metrics",
            get(move || {
                let m = self.clone();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.render(),
                    )
                }
            }),
        );
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "metrics server stopped");
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
        m.reconcile();
        m.time_to_recover(Duration::from_millis(200));
        m.chain_available("ns/a", true);
        m.registry_available("127.0.0.1:5000", false);
        m.registry_unrepairable("127.0.0.1:5000", true);
        m.leader(true);
        let text = m.render();
        assert!(
            text.contains("br2k_recoveries_total{finding=\"missing_workload\"} 2"),
            "{text}"
        );
        assert!(text.contains("br2k_time_to_recover_seconds_bucket{le=\"0.1\"} 0"));
        assert!(text.contains("br2k_time_to_recover_seconds_bucket{le=\"0.25\"} 1"));
        assert!(text.contains("br2k_time_to_recover_seconds_count 1"));
        assert!(text.contains("br2k_reconciles_total 1"));
        assert!(text.contains("br2k_chain_available{service=\"ns/a\"} 1"));
        assert!(text.contains("br2k_registry_available{registry=\"127.0.0.1:5000\"} 0"));
        assert!(text.contains("br2k_registry_unrepairable{registry=\"127.0.0.1:5000\"} 1"));
        assert!(text.contains("br2k_leader 1"));
        assert!(text.ends_with("# EOF\n"));
    }
}
