//! [`InMemoryLog`]: a replicated log in process memory, with test controls for
//! session expiry and partitions.

use std::collections::{HashSet, VecDeque};
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::watch;

use super::{
    Entry, EntryStream, LeaderInfo, LeaderStream, Leadership, MAX_ENTRY_BYTES, ReplicatedLog,
    check_entries,
};
use crate::error::{Error, Result, ValidationError};

/// A replicated log in memory. Clones are the same client; [`InMemoryLog::connect`]
/// makes another client (its own session) of the same log, as another replica would.
///
/// Test controls: [`InMemoryLog::expire_session`] (this client's lease ends, so it
/// loses leadership) and [`InMemoryLog::set_partitioned`] (this client's calls fail
/// with [`Error::Unavailable`], its open streams end).
#[derive(Debug, Clone)]
pub struct InMemoryLog {
    shared: Arc<Shared>,
    session: u64,
}

#[derive(Debug)]
struct Shared {
    inner: Mutex<Inner>,
    changed: watch::Sender<u64>,
    sessions: AtomicU64,
}

#[derive(Debug, Default)]
struct Inner {
    entries: VecDeque<Entry>,
    first: u64,
    last: u64,
    leader: Option<(LeaderInfo, u64)>,
    terms: u64,
    partitioned: HashSet<u64>,
    appends: u64,
}

impl Default for InMemoryLog {
    fn default() -> Self {
        Self::new()
    }
}

impl InMemoryLog {
    /// A new, empty log and a first client of it.
    pub fn new() -> Self {
        let inner = Inner {
            first: 1,
            ..Inner::default()
        };
        Self {
            shared: Arc::new(Shared {
                inner: Mutex::new(inner),
                changed: watch::Sender::new(0),
                sessions: AtomicU64::new(1),
            }),
            session: 0,
        }
    }

    /// Another client of the same log, with its own session.
    pub fn connect(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            session: self.shared.sessions.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Ends this client's session as a lease expiry would: if it leads, the log has
    /// no leader afterwards and its token is stale.
    pub fn expire_session(&self) {
        let mut inner = self.shared.inner.lock();
        if inner
            .leader
            .as_ref()
            .is_some_and(|(_, s)| *s == self.session)
        {
            inner.leader = None;
        }
        drop(inner);
        self.notify();
    }

    /// Cuts this client off (`true`) or reconnects it (`false`). A cut-off client's
    /// calls fail with [`Error::Unavailable`] and its streams end; its leadership
    /// stays until [`InMemoryLog::expire_session`], as a lease would until its TTL.
    pub fn set_partitioned(&self, partitioned: bool) {
        let mut inner = self.shared.inner.lock();
        if partitioned {
            inner.partitioned.insert(self.session);
        } else {
            inner.partitioned.remove(&self.session);
        }
        drop(inner);
        self.notify();
    }

    /// How many successful appends the log took (from every client).
    pub fn append_count(&self) -> u64 {
        self.shared.inner.lock().appends
    }

    fn notify(&self) {
        self.shared.changed.send_modify(|v| *v += 1);
    }

    fn reachable(&self) -> Result<MutexGuard<'_, Inner>> {
        let inner = self.shared.inner.lock();
        if inner.partitioned.contains(&self.session) {
            return Err(Error::unavailable("in-memory log: client is partitioned"));
        }
        Ok(inner)
    }
}

fn compacted(from: u64, first: u64) -> Error {
    Error::not_found(format!(
        "log entries from {from}: compacted, first index is {first}"
    ))
}

impl Inner {
    fn get(&self, index: u64) -> Option<&Entry> {
        let offset = index.checked_sub(self.first)?;
        self.entries.get(usize::try_from(offset).ok()?)
    }
}

#[async_trait]
impl ReplicatedLog for InMemoryLog {
    async fn campaign(&self, candidate: &str) -> Result<Leadership> {
        if candidate.is_empty() || candidate.len() > 256 {
            return Err(ValidationError::malformed("candidate", "must be 1-256 bytes").into());
        }
        let mut rx = self.shared.changed.subscribe();
        loop {
            {
                let mut inner = self.reachable()?;
                match &inner.leader {
                    Some((info, s)) if *s == self.session => {
                        return Ok(Leadership {
                            candidate: info.candidate.clone(),
                            term: info.term,
                            key: format!("session-{}", self.session),
                        });
                    }
                    Some(_) => {}
                    None => {
                        inner.terms += 1;
                        let info = LeaderInfo {
                            candidate: candidate.to_owned(),
                            term: inner.terms,
                        };
                        inner.leader = Some((info.clone(), self.session));
                        drop(inner);
                        self.notify();
                        return Ok(Leadership {
                            candidate: info.candidate,
                            term: info.term,
                            key: format!("session-{}", self.session),
                        });
                    }
                }
            }
            rx.changed()
                .await
                .map_err(|_| Error::unavailable("in-memory log closed"))?;
        }
    }

    async fn resign(&self, leadership: &Leadership) -> Result<()> {
        let mut inner = self.reachable()?;
        if inner
            .leader
            .as_ref()
            .is_some_and(|(i, s)| *s == self.session && i.term == leadership.term)
        {
            inner.leader = None;
            drop(inner);
            self.notify();
        }
        Ok(())
    }

    async fn leader(&self) -> Result<Option<LeaderInfo>> {
        Ok(self.reachable()?.leader.as_ref().map(|(i, _)| i.clone()))
    }

    async fn observe(&self) -> Result<LeaderStream> {
        drop(self.reachable()?);
        let rx = self.shared.changed.subscribe();
        let me = self.clone();
        let state = (me, rx, None::<Option<LeaderInfo>>, false);
        Ok(
            futures::stream::unfold(state, |(me, mut rx, seen, done)| async move {
                if done {
                    return None;
                }
                loop {
                    let now = me
                        .reachable()
                        .map(|inner| inner.leader.as_ref().map(|(i, _)| i.clone()));
                    let now = match now {
                        Ok(now) => now,
                        Err(e) => return Some((Err(e), (me, rx, seen, true))),
                    };
                    if seen.as_ref() != Some(&now) {
                        return Some((Ok(now.clone()), (me, rx, Some(now), false)));
                    }
                    if rx.changed().await.is_err() {
                        return None;
                    }
                }
            })
            .boxed(),
        )
    }

    async fn append(
        &self,
        leadership: &Leadership,
        entries: Vec<Bytes>,
    ) -> Result<RangeInclusive<u64>> {
        check_entries(&entries, MAX_ENTRY_BYTES)?;
        let mut inner = self.reachable()?;
        match &inner.leader {
            Some((info, s)) if *s == self.session && info.term == leadership.term => {}
            _ => {
                return Err(Error::conflict(format!(
                    "stale fencing token {}: not the current leadership",
                    leadership.term
                )));
            }
        }
        let start = inner.last + 1;
        for data in entries {
            inner.last += 1;
            let entry = Entry {
                index: inner.last,
                term: leadership.term,
                data,
            };
            inner.entries.push_back(entry);
        }
        inner.appends += 1;
        let end = inner.last;
        drop(inner);
        self.notify();
        Ok(start..=end)
    }

    async fn read(&self, from: u64, max: usize) -> Result<Vec<Entry>> {
        let inner = self.reachable()?;
        let from = from.max(1);
        if from < inner.first {
            return Err(compacted(from, inner.first));
        }
        Ok((from..=inner.last)
            .take(max)
            .filter_map(|i| inner.get(i).cloned())
            .collect())
    }

    async fn watch(&self, from: u64) -> Result<EntryStream> {
        let from = from.max(1);
        {
            let inner = self.reachable()?;
            if from < inner.first {
                return Err(compacted(from, inner.first));
            }
        }
        let rx = self.shared.changed.subscribe();
        let state = (self.clone(), rx, from, false);
        Ok(
            futures::stream::unfold(state, |(me, mut rx, next, done)| async move {
                if done {
                    return None;
                }
                loop {
                    let step = me.reachable().and_then(|inner| {
                        if next < inner.first {
                            Err(compacted(next, inner.first))
                        } else {
                            Ok(inner.get(next).cloned())
                        }
                    });
                    match step {
                        Err(e) => return Some((Err(e), (me, rx, next, true))),
                        Ok(Some(entry)) => return Some((Ok(entry), (me, rx, next + 1, false))),
                        Ok(None) => {}
                    }
                    if rx.changed().await.is_err() {
                        return None;
                    }
                }
            })
            .boxed(),
        )
    }

    async fn compact(&self, up_to: u64) -> Result<()> {
        let mut inner = self.reachable()?;
        if up_to > inner.last {
            return Err(ValidationError::malformed(
                "compaction index",
                format!("{up_to} is past the last index {}", inner.last),
            )
            .into());
        }
        while inner.first <= up_to {
            inner.entries.pop_front();
            inner.first += 1;
        }
        drop(inner);
        self.notify();
        Ok(())
    }

    async fn first_index(&self) -> Result<u64> {
        Ok(self.reachable()?.first)
    }

    async fn last_index(&self) -> Result<u64> {
        Ok(self.reachable()?.last)
    }
}
