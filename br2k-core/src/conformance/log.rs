//! Conformance suite of [`ReplicatedLog`]: every behaviour takes two clients `a` and
//! `b` of one fresh, empty log (two replicas' connections).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::future::BoxFuture;

use crate::error::Error;
use crate::log::{MAX_ENTRY_BYTES, ReplicatedLog};

/// Makes two clients of one fresh, empty log.
pub type LogPair = (Arc<dyn ReplicatedLog>, Arc<dyn ReplicatedLog>);

const WAIT: Duration = Duration::from_secs(20);

fn data(n: u64) -> Bytes {
    Bytes::from(format!("entry-{n}"))
}

async fn next_entry(s: &mut crate::log::EntryStream) -> crate::log::Entry {
    tokio::time::timeout(WAIT, s.next())
        .await
        .expect("watch delivers within the timeout")
        .expect("watch stream does not end")
        .expect("watch yields entries")
}

/// An empty log: first index 1, last 0, no leader, nothing to read.
pub async fn empty_log(a: &dyn ReplicatedLog, _b: &dyn ReplicatedLog) {
    assert_eq!(a.first_index().await.expect("first_index"), 1);
    assert_eq!(a.last_index().await.expect("last_index"), 0);
    assert_eq!(a.leader().await.expect("leader"), None);
    assert!(a.read(1, 10).await.expect("read").is_empty());
}

/// The winner of a campaign appends; both clients read the same entries with its term.
pub async fn campaign_append_read(a: &dyn ReplicatedLog, b: &dyn ReplicatedLog) {
    let lead = a.campaign("http://a").await.expect("campaign");
    assert_eq!(lead.candidate, "http://a");
    let seen = b.leader().await.expect("leader").expect("a leader");
    assert_eq!(
        (seen.candidate.as_str(), seen.term),
        ("http://a", lead.term)
    );
    let again = a.campaign("http://a").await.expect("campaign again");
    assert_eq!(
        again.term, lead.term,
        "campaign while leading is idempotent"
    );
    let r = a
        .append(&lead, vec![data(1), data(2)])
        .await
        .expect("append");
    assert_eq!(r, 1..=2);
    let r = a.append(&lead, vec![data(3)]).await.expect("append");
    assert_eq!(r, 3..=3);
    assert_eq!(b.last_index().await.expect("last"), 3);
    let entries = b.read(1, 10).await.expect("read");
    assert_eq!(entries.len(), 3);
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e.index, i as u64 + 1);
        assert_eq!(e.term, lead.term);
        assert_eq!(e.data, data(i as u64 + 1));
    }
    assert_eq!(b.read(2, 1).await.expect("read").len(), 1);
    assert!(b.read(4, 10).await.expect("read past end").is_empty());
}

/// A second candidate waits while the first leads and wins after it resigns, with a
/// greater term; the first one's appends are then refused with `Conflict`.
pub async fn fencing(a: &dyn ReplicatedLog, b: &dyn ReplicatedLog) {
    let la = a.campaign("http://a").await.expect("campaign a");
    assert!(
        tokio::time::timeout(Duration::from_millis(500), b.campaign("http://b"))
            .await
            .is_err(),
        "b must not win while a leads"
    );
    a.append(&la, vec![data(1)]).await.expect("a appends");
    a.resign(&la).await.expect("resign");
    a.resign(&la).await.expect("resign is idempotent");
    let lb = tokio::time::timeout(WAIT, b.campaign("http://b"))
        .await
        .expect("b wins after a resigned")
        .expect("campaign b");
    assert!(
        lb.term > la.term,
        "terms increase: {} > {}",
        lb.term,
        la.term
    );
    match a.append(&la, vec![data(2)]).await {
        Err(Error::Conflict { .. }) => {}
        other => panic!("stale token must be Conflict, got {other:?}"),
    }
    assert_eq!(
        b.append(&lb, vec![data(2)]).await.expect("b appends"),
        2..=2
    );
    match b.append(&la, vec![data(3)]).await {
        Err(Error::Conflict { .. }) => {}
        other => panic!("a foreign token must be Conflict, got {other:?}"),
    }
    assert_eq!(a.last_index().await.expect("last"), 2);
}

/// `watch` delivers committed entries from an index, then new ones, in order.
pub async fn watch_from_index(a: &dyn ReplicatedLog, b: &dyn ReplicatedLog) {
    let lead = a.campaign("http://a").await.expect("campaign");
    a.append(&lead, vec![data(1), data(2), data(3)])
        .await
        .expect("append");
    let mut s = b.watch(2).await.expect("watch");
    assert_eq!(next_entry(&mut s).await.index, 2);
    assert_eq!(next_entry(&mut s).await.index, 3);
    a.append(&lead, vec![data(4), data(5)])
        .await
        .expect("append");
    let e = next_entry(&mut s).await;
    assert_eq!((e.index, e.data.clone()), (4, data(4)));
    assert_eq!(next_entry(&mut s).await.index, 5);
    let mut from_end = b.watch(6).await.expect("watch past end");
    a.append(&lead, vec![data(6)]).await.expect("append");
    assert_eq!(next_entry(&mut from_end).await.index, 6);
}

/// Compaction discards a prefix: reads and watches below it are `NotFound`, it is
/// idempotent, and compacting past the end is `InvalidInput`.
pub async fn compaction(a: &dyn ReplicatedLog, b: &dyn ReplicatedLog) {
    let lead = a.campaign("http://a").await.expect("campaign");
    a.append(&lead, (1..=5).map(data).collect())
        .await
        .expect("append");
    b.compact(3).await.expect("compact");
    assert_eq!(a.first_index().await.expect("first"), 4);
    assert_eq!(a.last_index().await.expect("last"), 5);
    assert!(matches!(a.read(2, 10).await, Err(Error::NotFound { .. })));
    assert!(matches!(
        a.watch(1).await.map(drop),
        Err(Error::NotFound { .. })
    ));
    let rest = a.read(4, 10).await.expect("read");
    assert_eq!(rest.iter().map(|e| e.index).collect::<Vec<_>>(), vec![4, 5]);
    b.compact(2)
        .await
        .expect("compacting below first is a no-op");
    assert_eq!(a.first_index().await.expect("first"), 4);
    assert!(matches!(b.compact(9).await, Err(Error::InvalidInput(_))));
    assert_eq!(a.append(&lead, vec![data(6)]).await.expect("append"), 6..=6);
}

/// Empty and oversized appends are `InvalidInput` and write nothing.
pub async fn bad_appends(a: &dyn ReplicatedLog, _b: &dyn ReplicatedLog) {
    let lead = a.campaign("http://a").await.expect("campaign");
    assert!(matches!(
        a.append(&lead, vec![]).await,
        Err(Error::InvalidInput(_))
    ));
    let big = Bytes::from(vec![7u8; MAX_ENTRY_BYTES + 1]);
    assert!(matches!(
        a.append(&lead, vec![data(1), big]).await,
        Err(Error::InvalidInput(_))
    ));
    assert!(matches!(
        a.campaign("").await.map(drop),
        Err(Error::InvalidInput(_))
    ));
    assert_eq!(a.last_index().await.expect("last"), 0);
}

/// `observe` yields the current leader, then each change.
pub async fn observe_changes(a: &dyn ReplicatedLog, b: &dyn ReplicatedLog) {
    let la = a.campaign("http://a").await.expect("campaign");
    let mut s = b.observe().await.expect("observe");
    let mut next = async || {
        tokio::time::timeout(WAIT, s.next())
            .await
            .expect("observe delivers")
            .expect("stream open")
            .expect("no error")
    };
    let first = next().await.expect("a leads");
    assert_eq!(first.candidate, "http://a");
    a.resign(&la).await.expect("resign");
    let lb = b.campaign("http://b").await.expect("campaign b");
    loop {
        match next().await {
            None => continue,
            Some(info) if info.candidate == "http://b" => {
                assert_eq!(info.term, lb.term);
                break;
            }
            Some(other) => panic!("unexpected leader {other:?}"),
        }
    }
}

/// Runs every behaviour, each on a fresh log from `make`.
pub async fn run_all(make: &dyn Fn() -> BoxFuture<'static, LogPair>) {
    macro_rules! run {
        ($($f:ident),*) => {$(
            let (a, b) = make().await;
            $f(a.as_ref(), b.as_ref()).await;
        )*};
    }
    run!(
        empty_log,
        campaign_append_read,
        fencing,
        watch_from_index,
        compaction,
        bad_appends,
        observe_changes
    );
}
