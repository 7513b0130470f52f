//! Fencing on the stack's etcd: a deposed leader (resigned, lease revoked or lease
//! expired) cannot append, and large appends stay atomic for readers.

mod common;

use std::time::{Duration, Instant};

use br2k_core::Error;
use br2k_core::log::ReplicatedLog;
use bytes::Bytes;
use futures::StreamExt;

fn data(s: &str) -> Vec<Bytes> {
    vec![Bytes::from(s.to_owned())]
}

fn assert_conflict<T: std::fmt::Debug>(r: br2k_core::Result<T>) {
    match r {
        Err(Error::Conflict { .. }) => {}
        other => panic!("a deposed leader's append must be Conflict, got {other:?}"),
    }
}

#[tokio::test]
#[ignore = "needs stack"]
async fn revoked_lease_deposes_the_leader() {
    let ns = common::namespace("fence-revoke");
    let (a, b) = (common::client(&ns).await, common::client(&ns).await);
    let la = a.campaign("http://a").await.unwrap();
    a.append(&la, data("a1")).await.unwrap();
    a.revoke_session().await.unwrap();
    let lb = tokio::time::timeout(Duration::from_secs(10), b.campaign("http://b"))
        .await
        .expect("b wins once a's lease is revoked")
        .unwrap();
    assert!(lb.term > la.term);
    assert_conflict(a.append(&la, data("a2")).await);
    assert_eq!(b.append(&lb, data("b1")).await.unwrap(), 2..=2);
    // a may campaign again with its fresh lease, and waits behind b.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), a.campaign("http://a"))
            .await
            .is_err()
    );
    let terms: Vec<u64> = b
        .read(1, 10)
        .await
        .unwrap()
        .iter()
        .map(|e| e.term)
        .collect();
    assert_eq!(terms, vec![la.term, lb.term]);
    a.purge().await.unwrap();
}

#[tokio::test]
#[ignore = "needs stack"]
async fn expired_lease_deposes_a_crashed_leader_within_the_ttl() {
    let ns = common::namespace("fence-expire");
    let (a, b) = (common::client(&ns).await, common::client(&ns).await);
    let la = a.campaign("http://a").await.unwrap();
    a.append(&la, data("a1")).await.unwrap();
    // b campaigns while a leads; then a "crashes" (no more keep-alives).
    let b2 = b.clone();
    let waiting = tokio::spawn(async move { b2.campaign("http://b").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "b must wait while a leads");
    let crashed = Instant::now();
    a.halt_keep_alive();
    // The crashed leader keeps trying to append: accepted only until its lease ends.
    let mut refused = false;
    while crashed.elapsed() < Duration::from_secs(30) {
        match a.append(&la, data("late")).await {
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(Error::Conflict { .. }) => {
                refused = true;
                break;
            }
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert!(refused, "appends of the crashed leader end up refused");
    let lb = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("b elected after a's lease expired")
        .unwrap()
        .unwrap();
    eprintln!("new leader after {:?} (lease TTL 2 s)", crashed.elapsed());
    assert!(lb.term > la.term);
    assert_conflict(a.append(&la, data("after")).await);
    let r = b.append(&lb, data("b1")).await.unwrap();
    // No entry of the old term after the new leader's first entry.
    let all = b.read(1, 1000).await.unwrap();
    assert_eq!(all.last().unwrap().index, *r.end());
    assert!(all.windows(2).all(|w| w[0].term <= w[1].term));
    assert_eq!(all.iter().filter(|e| e.term == lb.term).count(), 1);
    b.purge().await.unwrap();
}

#[tokio::test]
#[ignore = "needs stack"]
async fn resigned_and_foreign_tokens_are_refused() {
    let ns = common::namespace("fence-resign");
    let (a, b) = (common::client(&ns).await, common::client(&ns).await);
    let la = a.campaign("http://a").await.unwrap();
    // b holds no leadership: a's token is foreign to b even while it is current.
    assert_conflict(b.append(&la, data("x")).await);
    a.resign(&la).await.unwrap();
    assert_conflict(a.append(&la, data("x")).await);
    assert_eq!(a.leader().await.unwrap(), None);
    let lb = b.campaign("http://b").await.unwrap();
    let again = b.campaign("http://b").await.unwrap();
    assert_eq!(again.term, lb.term, "campaign while leading is idempotent");
    assert_eq!(b.append(&lb, data("b")).await.unwrap(), 1..=1);
    assert_eq!(a.last_index().await.unwrap(), 1);
    b.resign(&lb).await.unwrap();
    b.resign(&lb).await.unwrap();
    a.purge().await.unwrap();
}

#[tokio::test]
#[ignore = "needs stack"]
async fn large_appends_are_staged_and_committed_atomically() {
    let ns = common::namespace("fence-large");
    let mut cfg = common::config(&ns);
    cfg.max_txn_bytes = 256 * 1024;
    let a = br2k_etcd::EtcdLog::connect_with(cfg).await.unwrap();
    let b = common::client(&ns).await;
    let la = a.campaign("http://a").await.unwrap();
    let mut s = b.watch(1).await.unwrap();
    let big: Vec<Bytes> = (0..40u8).map(|i| Bytes::from(vec![i; 50_000])).collect();
    assert_eq!(a.append(&la, big.clone()).await.unwrap(), 1..=40);
    assert_eq!(a.append(&la, data("small")).await.unwrap(), 41..=41);
    for (i, want) in big.iter().enumerate() {
        let e = tokio::time::timeout(Duration::from_secs(20), s.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!((e.index, &e.data), (i as u64 + 1, want));
    }
    let read = b.read(1, 100).await.unwrap();
    assert_eq!(read.len(), 41);
    // Compaction through a chunk boundary keeps the straddling chunk readable.
    b.compact(7).await.unwrap();
    assert_eq!(b.first_index().await.unwrap(), 8);
    assert_eq!(b.read(8, 1).await.unwrap()[0].data, big[7]);
    assert!(matches!(b.read(7, 1).await, Err(Error::NotFound { .. })));
    // A deposed leader's staged append writes nothing visible.
    a.revoke_session().await.unwrap();
    assert_conflict(a.append(&la, big.clone()).await);
    assert_eq!(b.last_index().await.unwrap(), 41);
    let lb = b.campaign("http://b").await.unwrap();
    assert_eq!(b.append(&lb, data("b")).await.unwrap(), 42..=42);
    b.purge().await.unwrap();
}
