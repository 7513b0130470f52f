//! Failover on an own throwaway 3-member etcd (never the stack's): the log keeps
//! working with one member killed, reports `Unavailable` (retryable) without a
//! quorum, and recovers when the member returns.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use br2k_core::Error;
use br2k_core::log::{Leadership, ReplicatedLog};
use br2k_etcd::{EtcdLog, EtcdLogConfig};
use bytes::Bytes;
use futures::StreamExt;

async fn connect(eps: Vec<String>, ns: &str) -> EtcdLog {
    let mut cfg = EtcdLogConfig::new(eps, ns);
    cfg.lease_ttl = Duration::from_secs(3);
    cfg.request_timeout = Duration::from_secs(3);
    EtcdLog::connect_with(cfg).await.expect("connect")
}

/// Appends `tag`, retrying retryable errors (an unknown outcome may duplicate it) and
/// re-campaigning if the leadership was lost, for up to 60 s.
async fn append_retrying(log: &EtcdLog, lead: &mut Leadership, tag: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match log.append(lead, vec![Bytes::from(tag.to_owned())]).await {
            Ok(_) => return,
            Err(Error::Conflict { .. }) => {
                *lead = log.campaign("http://a").await.unwrap_or_else(|e| {
                    panic!("re-campaign failed: {e}");
                });
            }
            Err(e) if e.is_retryable() => {}
            Err(e) => panic!("append {tag}: {e:?}"),
        }
        assert!(Instant::now() < deadline, "append {tag} never succeeded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs stack"]
async fn survives_a_member_failure_and_a_lost_quorum() {
    let mut cluster = common::OwnCluster::start().await;
    let ns = common::namespace("failover");
    let a = connect(cluster.endpoints(), &ns).await;
    let b = connect(cluster.endpoints(), &ns).await;
    let mut lead = a.campaign("http://a").await.unwrap();
    // A follower that re-watches from its next index whenever its stream ends.
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let follower = {
        let (b, seen) = (b.clone(), seen.clone());
        tokio::spawn(async move {
            loop {
                let next = seen.lock().unwrap().len() as u64 + 1;
                let Ok(mut s) = b.watch(next).await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                while let Some(Ok(e)) = s.next().await {
                    let mut seen = seen.lock().unwrap();
                    assert_eq!(e.index, seen.len() as u64 + 1, "no gap, no repeat");
                    seen.push(String::from_utf8(e.data.to_vec()).unwrap());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let mut acked = Vec::new();
    for i in 0..20 {
        let tag = format!("before-{i}");
        append_retrying(&a, &mut lead, &tag).await;
        acked.push(tag);
    }
    cluster.kill(0);
    for i in 0..40 {
        let tag = format!("one-down-{i}");
        append_retrying(&a, &mut lead, &tag).await;
        acked.push(tag);
    }
    // Without a quorum: a retryable error, within the request timeout (plus slack).
    cluster.kill(1);
    let t = Instant::now();
    let r = a
        .append(&lead, vec![Bytes::from_static(b"no-quorum")])
        .await;
    match &r {
        Err(e) if e.is_retryable() => {}
        other => panic!("without a quorum an append must fail retryably, got {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    assert!(matches!(
        b.last_index().await,
        Err(Error::Unavailable { .. })
    ));
    cluster.restart(1).await;
    for i in 0..20 {
        let tag = format!("recovered-{i}");
        append_retrying(&a, &mut lead, &tag).await;
        acked.push(tag);
    }
    cluster.restart(0).await;
    append_retrying(&a, &mut lead, "all-up").await;
    acked.push("all-up".into());
    // Every acknowledged entry is in the log, in order; the follower saw the log.
    // A member just restarted may still refuse requests for a moment: retry reads.
    let mut read = b.read(1, 10_000).await;
    for _ in 0..50 {
        match &read {
            Err(e) if e.is_retryable() => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                read = b.read(1, 10_000).await;
            }
            _ => break,
        }
    }
    let log: Vec<String> = read
        .unwrap()
        .iter()
        .map(|e| String::from_utf8(e.data.to_vec()).unwrap())
        .collect();
    let mut pos = 0;
    for tag in &acked {
        pos += log[pos..]
            .iter()
            .position(|t| t == tag)
            .unwrap_or_else(|| panic!("acknowledged {tag} lost"));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.lock().unwrap().len() < log.len() {
        assert!(Instant::now() < deadline, "follower did not catch up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    follower.abort();
    assert_eq!(seen.lock().unwrap()[..log.len()], log[..]);
}
