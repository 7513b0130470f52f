//! Several JSON-RPC endpoints of one chain: each request goes to the preferred
//! endpoint and fails over to the next one when it is down.

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use alloy::providers::RootProvider;
use alloy::transports::http::reqwest::Url;
use alloy::transports::{RpcError, TransportErrorKind};

use crate::config::{endpoint_label, scrub};
use crate::error::ChainError;

/// The endpoints, the preferred one, and a count of requests sent (round trips).
#[derive(Debug)]
pub(crate) struct Endpoints {
    /// Label (no secrets), the URL (to scrub error texts) and the provider.
    providers: Vec<(String, Url, RootProvider)>,
    preferred: AtomicUsize,
    timeout: Duration,
    requests: AtomicU64,
}

impl Endpoints {
    pub(crate) fn new(urls: &[Url], timeout: Duration) -> Result<Self, ChainError> {
        if urls.is_empty() {
            return Err(ChainError::Config("no RPC URL configured".into()));
        }
        Ok(Self {
            providers: urls
                .iter()
                .map(|u| {
                    (
                        endpoint_label(u),
                        u.clone(),
                        RootProvider::new_http(u.clone()),
                    )
                })
                .collect(),
            preferred: AtomicUsize::new(0),
            timeout,
            requests: AtomicU64::new(0),
        })
    }

    /// Requests sent so far (each attempt on each endpoint counts).
    pub(crate) fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Runs `f` on the preferred endpoint, then on the next ones while the transport
    /// fails (connection refused, reset, timeout, garbage answer). A JSON-RPC error
    /// answer is final: the endpoint is up and said no.
    pub(crate) async fn run<T, F, Fut>(&self, what: &str, f: F) -> Result<T, ChainError>
    where
        F: Fn(RootProvider) -> Fut,
        Fut: Future<Output = Result<T, RpcError<TransportErrorKind>>>,
    {
        let n = self.providers.len();
        let start = self.preferred.load(Ordering::Relaxed) % n;
        let mut last = String::new();
        for k in 0..n {
            let i = (start + k) % n;
            let (label, url, provider) = &self.providers[i];
            self.requests.fetch_add(1, Ordering::Relaxed);
            match tokio::time::timeout(self.timeout, f(provider.clone())).await {
                Ok(Ok(v)) => {
                    if k > 0 {
                        self.preferred.store(i, Ordering::Relaxed);
                    }
                    return Ok(v);
                }
                Ok(Err(RpcError::ErrorResp(payload))) => {
                    return Err(ChainError::from_payload(&payload));
                }
                Ok(Err(e)) => {
                    let e = scrub(&e.to_string(), url);
                    tracing::debug!(endpoint = %label, error = %e, "{what}: endpoint failed");
                    last = format!("{label}: {e}");
                }
                Err(_) => {
                    tracing::debug!(endpoint = %label, "{what}: endpoint timed out");
                    last = format!("{label}: timed out after {:?}", self.timeout);
                }
            }
        }
        Err(ChainError::Unavailable(format!(
            "{what}: all {n} RPC endpoints failed (last: {last})"
        )))
    }
}
