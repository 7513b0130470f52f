//! Several JSON-RPC endpoints of one chain: each request goes to the preferred
//! endpoint and fails over to the next one when it is down; every endpoint is checked
//! to serve the pinned chain id before it is used; reads that need it are made at one
//! pinned block and accepted only when a quorum of endpoints agrees.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use alloy::eips::{BlockId, BlockNumberOrTag};
use alloy::primitives::{B256, Bytes};
use alloy::providers::{Provider, RootProvider};
use alloy::rpc::types::TransactionRequest;
use alloy::transports::http::reqwest::Url;
use alloy::transports::{RpcError, TransportErrorKind};

use crate::config::{ReadDepth, endpoint_label, scrub};
use crate::error::ChainError;

/// One block that every call of one read is made at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pin {
    /// Its height.
    pub(crate) number: u64,
    /// Its hash (calls name the block by hash, EIP-1898).
    pub(crate) hash: B256,
}

#[derive(Debug)]
struct Endpoint {
    /// Label without secrets.
    label: String,
    /// The URL (to scrub error texts).
    url: Url,
    provider: RootProvider,
    /// Whether the endpoint reported the pinned chain id.
    checked: AtomicBool,
}

/// The endpoints, the pinned chain id, the preferred endpoint, and a count of
/// requests sent (round trips).
#[derive(Debug)]
pub(crate) struct Endpoints {
    endpoints: Vec<Endpoint>,
    chain_id: u64,
    preferred: AtomicUsize,
    timeout: Duration,
    requests: AtomicU64,
}

/// The outcome of one request on one endpoint.
enum Outcome<T> {
    Ok(T),
    /// A JSON-RPC error answer: the endpoint is up and said no.
    Refused(ChainError),
    /// Down, timed out, garbage, or another chain (a description without secrets).
    Failed(String),
}

/// A block (header only) or a "no such block" transport error.
async fn block_at(
    p: &RootProvider,
    at: BlockNumberOrTag,
) -> Result<(u64, B256), RpcError<TransportErrorKind>> {
    let block = p.get_block_by_number(at).await?.ok_or(RpcError::NullResp)?;
    Ok((block.header.inner.number, block.header.hash))
}

/// The height `depth` names on `p`.
async fn height_of(
    p: &RootProvider,
    depth: ReadDepth,
) -> Result<u64, RpcError<TransportErrorKind>> {
    match depth {
        ReadDepth::Latest => p.get_block_number().await,
        ReadDepth::Behind(n) => Ok(p.get_block_number().await?.saturating_sub(n)),
        ReadDepth::Safe => Ok(block_at(p, BlockNumberOrTag::Safe).await?.0),
        ReadDepth::Finalized => Ok(block_at(p, BlockNumberOrTag::Finalized).await?.0),
    }
}

/// The block `depth` names on `p`, in as few requests as it allows.
async fn pin_on(p: RootProvider, depth: ReadDepth) -> Result<Pin, RpcError<TransportErrorKind>> {
    let (number, hash) = match depth {
        ReadDepth::Latest => block_at(&p, BlockNumberOrTag::Latest).await?,
        ReadDepth::Safe => block_at(&p, BlockNumberOrTag::Safe).await?,
        ReadDepth::Finalized => block_at(&p, BlockNumberOrTag::Finalized).await?,
        ReadDepth::Behind(_) => {
            let n = height_of(&p, depth).await?;
            block_at(&p, BlockNumberOrTag::Number(n)).await?
        }
    };
    Ok(Pin { number, hash })
}

/// The value at least `quorum` of `answers` are equal to (by `key`), or a description
/// of the disagreement.
fn agreed<T, K: PartialEq>(
    answers: Vec<(String, T)>,
    quorum: usize,
    key: impl Fn(&T) -> K,
) -> Result<T, String> {
    // (key, endpoints agreeing, the first value).
    let mut groups: Vec<(K, Vec<String>, T)> = Vec::new();
    for (label, v) in answers {
        let k = key(&v);
        match groups.iter_mut().find(|g| g.0 == k) {
            Some(g) => g.1.push(label),
            None => groups.push((k, vec![label], v)),
        }
    }
    if let Some(i) = groups.iter().position(|g| g.1.len() >= quorum) {
        return Ok(groups.swap_remove(i).2);
    }
    let parts: Vec<String> = groups
        .iter()
        .map(|g| format!("{} ({})", g.1.len(), g.1.join(", ")))
        .collect();
    Err(format!(
        "{} distinct answers agreed by [{}], {quorum} needed",
        groups.len(),
        parts.join("; ")
    ))
}

impl Endpoints {
    /// The endpoints of `urls`, after checking the chain id: every endpoint that
    /// answers must report `expected` (or, when `None`, the same id as the others).
    /// Endpoints that do not answer now are checked before their first use.
    pub(crate) async fn connect(
        urls: &[Url],
        timeout: Duration,
        expected: Option<u64>,
    ) -> Result<Self, ChainError> {
        if urls.is_empty() {
            return Err(ChainError::Config("no RPC URL configured".into()));
        }
        let endpoints: Vec<Endpoint> = urls
            .iter()
            .map(|u| Endpoint {
                label: endpoint_label(u),
                url: u.clone(),
                provider: RootProvider::new_http(u.clone()),
                checked: AtomicBool::new(false),
            })
            .collect();
        let requests = AtomicU64::new(endpoints.len() as u64);
        let ids = futures::future::join_all(endpoints.iter().map(|e| async move {
            tokio::time::timeout(timeout, e.provider.get_chain_id()).await
        }))
        .await;
        let mut chain_id = expected;
        let mut last = String::new();
        for (e, id) in endpoints.iter().zip(ids) {
            match id {
                Ok(Ok(actual)) => {
                    let expected = *chain_id.get_or_insert(actual);
                    if actual != expected {
                        return Err(ChainError::WrongChain { expected, actual });
                    }
                    e.checked.store(true, Ordering::Relaxed);
                }
                Ok(Err(err)) => {
                    let err = scrub(&err.to_string(), &e.url);
                    tracing::debug!(endpoint = %e.label, error = %err, "chain id: endpoint failed");
                    last = format!("{}: {err}", e.label);
                }
                Err(_) => {
                    tracing::debug!(endpoint = %e.label, "chain id: endpoint timed out");
                    last = format!("{}: timed out after {timeout:?}", e.label);
                }
            }
        }
        let Some(chain_id) = chain_id else {
            return Err(ChainError::Unavailable(format!(
                "chain id: all {} RPC endpoints failed (last: {last})",
                endpoints.len()
            )));
        };
        let preferred = endpoints
            .iter()
            .position(|e| e.checked.load(Ordering::Relaxed))
            .unwrap_or(0);
        Ok(Self {
            endpoints,
            chain_id,
            preferred: AtomicUsize::new(preferred),
            timeout,
            requests,
        })
    }

    /// The chain id every endpoint is held to.
    pub(crate) fn chain_id(&self) -> u64 {
        self.chain_id
    }

    /// Requests sent so far (each attempt on each endpoint counts).
    pub(crate) fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Runs `f` on endpoint `i`, after checking its chain id if not done yet.
    async fn on<T, F, Fut>(&self, i: usize, what: &str, f: &F) -> Outcome<T>
    where
        F: Fn(RootProvider) -> Fut,
        Fut: Future<Output = Result<T, RpcError<TransportErrorKind>>>,
    {
        let e = &self.endpoints[i];
        let fail = |err: RpcError<TransportErrorKind>| {
            let err = scrub(&err.to_string(), &e.url);
            tracing::debug!(endpoint = %e.label, error = %err, "{what}: endpoint failed");
            Outcome::Failed(format!("{}: {err}", e.label))
        };
        let timed_out = || {
            tracing::debug!(endpoint = %e.label, "{what}: endpoint timed out");
            Outcome::Failed(format!("{}: timed out after {:?}", e.label, self.timeout))
        };
        if !e.checked.load(Ordering::Relaxed) {
            self.requests.fetch_add(1, Ordering::Relaxed);
            match tokio::time::timeout(self.timeout, e.provider.get_chain_id()).await {
                Ok(Ok(id)) if id == self.chain_id => e.checked.store(true, Ordering::Relaxed),
                Ok(Ok(id)) => {
                    tracing::warn!(endpoint = %e.label, chain_id = id, expected = self.chain_id,
                        "endpoint serves another chain; not used");
                    return Outcome::Failed(format!(
                        "{}: {}",
                        e.label,
                        ChainError::WrongChain {
                            expected: self.chain_id,
                            actual: id
                        }
                    ));
                }
                Ok(Err(err)) => return fail(err),
                Err(_) => return timed_out(),
            }
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(self.timeout, f(e.provider.clone())).await {
            Ok(Ok(v)) => Outcome::Ok(v),
            Ok(Err(RpcError::ErrorResp(payload))) => {
                Outcome::Refused(ChainError::from_payload(&payload))
            }
            Ok(Err(err)) => fail(err),
            Err(_) => timed_out(),
        }
    }

    /// Runs `f` on the preferred endpoint, then on the next ones while the transport
    /// fails (connection refused, reset, timeout, garbage answer, another chain). A
    /// JSON-RPC error answer is final: the endpoint is up and said no.
    pub(crate) async fn run<T, F, Fut>(&self, what: &str, f: F) -> Result<T, ChainError>
    where
        F: Fn(RootProvider) -> Fut,
        Fut: Future<Output = Result<T, RpcError<TransportErrorKind>>>,
    {
        let n = self.endpoints.len();
        let start = self.preferred.load(Ordering::Relaxed) % n;
        let mut last = String::new();
        for k in 0..n {
            let i = (start + k) % n;
            match self.on(i, what, &f).await {
                Outcome::Ok(v) => {
                    if k > 0 {
                        self.preferred.store(i, Ordering::Relaxed);
                    }
                    return Ok(v);
                }
                Outcome::Refused(e) => return Err(e),
                Outcome::Failed(reason) => last = reason,
            }
        }
        Err(ChainError::Unavailable(format!(
            "{what}: all {n} RPC endpoints failed (last: {last})"
        )))
    }

    /// Runs `f` on every endpoint at once; the labels and outcomes of those that
    /// answered (a value or a JSON-RPC error), and a description of those that failed.
    async fn all<T, F, Fut>(
        &self,
        what: &str,
        f: F,
    ) -> (Vec<(String, Result<T, ChainError>)>, Vec<String>)
    where
        F: Fn(RootProvider) -> Fut,
        Fut: Future<Output = Result<T, RpcError<TransportErrorKind>>>,
    {
        let f = &f;
        let outcomes =
            futures::future::join_all((0..self.endpoints.len()).map(|i| self.on(i, what, f))).await;
        let mut answered = Vec::new();
        let mut failed = Vec::new();
        for (e, o) in self.endpoints.iter().zip(outcomes) {
            match o {
                Outcome::Ok(v) => answered.push((e.label.clone(), Ok(v))),
                Outcome::Refused(err) => answered.push((e.label.clone(), Err(err))),
                Outcome::Failed(reason) => failed.push(reason),
            }
        }
        (answered, failed)
    }

    /// The block reads are made at: with a quorum of 1 the preferred endpoint's block
    /// at `depth`; otherwise the highest block at `depth` that `quorum` endpoints have
    /// reached and agree on (same hash at that height). Unavailable without agreement.
    pub(crate) async fn pin(&self, depth: ReadDepth, quorum: usize) -> Result<Pin, ChainError> {
        if quorum <= 1 {
            return self.run("read block", |p| pin_on(p, depth)).await;
        }
        let no_quorum = |detail: String| {
            ChainError::Unavailable(format!(
                "no quorum of {quorum} RPC endpoints on the read block: {detail}"
            ))
        };
        let (answered, failed) = self
            .all("read height", |p| async move { height_of(&p, depth).await })
            .await;
        let mut heights: Vec<u64> = answered.into_iter().filter_map(|(_, h)| h.ok()).collect();
        if heights.len() < quorum {
            return Err(no_quorum(format!(
                "{} answered (failed: {})",
                heights.len(),
                failed.join("; ")
            )));
        }
        heights.sort_unstable_by(|a, b| b.cmp(a));
        let number = heights[quorum - 1];
        let (answered, _) = self
            .all("read block", |p| async move {
                block_at(&p, BlockNumberOrTag::Number(number)).await
            })
            .await;
        let hashes: Vec<(String, B256)> = answered
            .into_iter()
            .filter_map(|(label, r)| Some((label, r.ok()?.1)))
            .collect();
        let hash = agreed(hashes, quorum, |h| *h)
            .map_err(|d| no_quorum(format!("block {number} hashes: {d}")))?;
        Ok(Pin { number, hash })
    }

    /// `eth_call` of `tx` at `pin`: with a quorum of 1 on the preferred endpoint,
    /// otherwise accepted only when `quorum` endpoints answer the same bytes (or the
    /// same error).
    pub(crate) async fn call_at(
        &self,
        what: &str,
        pin: Pin,
        quorum: usize,
        tx: TransactionRequest,
    ) -> Result<Bytes, ChainError> {
        let call = |p: RootProvider| {
            let tx = tx.clone();
            async move { p.call(tx).block(BlockId::hash(pin.hash)).await }
        };
        if quorum <= 1 {
            return self.run(what, call).await;
        }
        let (answered, failed) = self.all(what, call).await;
        agreed(answered, quorum, |r| match r {
            Ok(bytes) => Ok(bytes.clone()),
            Err(e) => Err(e.to_string()),
        })
        .map_err(|d| {
            ChainError::Unavailable(format!(
                "no quorum of {quorum} RPC endpoints on {what} at block {} ({}): {d}{}",
                pin.number,
                pin.hash,
                if failed.is_empty() {
                    String::new()
                } else {
                    format!(" (failed: {})", failed.join("; "))
                }
            ))
        })?
    }

    /// Whether the canonical block at `number` still has `hash` (with a quorum of 1,
    /// on the preferred endpoint; otherwise `quorum` endpoints must say so). `None`
    /// when no endpoint knows the block yet.
    pub(crate) async fn canonical_hash(
        &self,
        number: u64,
        quorum: usize,
    ) -> Result<Option<B256>, ChainError> {
        let get = |p: RootProvider| async move {
            Ok(p.get_block_by_number(BlockNumberOrTag::Number(number))
                .await?
                .map(|b| b.header.hash))
        };
        if quorum <= 1 {
            return self.run("block hash", get).await;
        }
        let (answered, failed) = self.all("block hash", get).await;
        let hashes: Vec<(String, Option<B256>)> = answered
            .into_iter()
            .filter_map(|(label, r)| Some((label, r.ok()?)))
            .collect();
        agreed(hashes, quorum, |h| *h).map_err(|d| {
            ChainError::Unavailable(format!(
                "no quorum of {quorum} RPC endpoints on the hash of block {number}: {d} (failed: {})",
                failed.join("; ")
            ))
        })
    }
}
