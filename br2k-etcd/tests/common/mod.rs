//! Helpers shared by the integration tests (real etcd of the local stack).
#![allow(dead_code)]

use std::time::Duration;

use br2k_etcd::{EtcdLog, EtcdLogConfig};

/// Endpoints of the stack's 3-member etcd (`BR2K_ETCD_ENDPOINTS`).
pub fn endpoints() -> Vec<String> {
    let raw = std::env::var("BR2K_ETCD_ENDPOINTS")
        .expect("BR2K_ETCD_ENDPOINTS (source .stack/env after scripts/stack up)");
    raw.split(',').map(|s| s.trim().to_owned()).collect()
}

/// A fresh random namespace.
pub fn namespace(test: &str) -> String {
    format!("br2k-test/{test}-{:016x}", rand::random::<u64>())
}

/// A config on the stack's etcd with a short lease (2 s).
pub fn config(ns: &str) -> EtcdLogConfig {
    let mut c = EtcdLogConfig::new(endpoints(), ns);
    c.lease_ttl = Duration::from_secs(2);
    c
}

/// A client of the log `ns` on the stack's etcd.
pub async fn client(ns: &str) -> EtcdLog {
    EtcdLog::connect_with(config(ns))
        .await
        .expect("connect to etcd")
}
