//! The per-service work queue and the per-service retry backoff of the supervisor.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

use parking_lot::Mutex;
use rand::Rng;
use tokio::sync::Notify;

use crate::id::ServiceId;

/// A work queue of service ids: an id is queued at most once, and never handed to two
/// workers at a time (an id pushed while it is being worked on runs again after).
#[derive(Debug, Default)]
pub(super) struct Queue {
    state: Mutex<QueueState>,
    notify: Notify,
}

#[derive(Debug, Default)]
struct QueueState {
    ready: VecDeque<ServiceId>,
    queued: HashSet<ServiceId>,
    running: HashSet<ServiceId>,
    again: HashSet<ServiceId>,
}

impl Queue {
    /// Queues `id` unless it is queued already.
    pub fn push(&self, id: ServiceId) {
        {
            let mut s = self.state.lock();
            if s.queued.contains(&id) {
                return;
            }
            if s.running.contains(&id) {
                s.again.insert(id);
                return;
            }
            s.queued.insert(id.clone());
            s.ready.push_back(id);
        }
        self.notify.notify_one();
    }

    /// Waits for the next id and marks it running.
    pub async fn pop(&self) -> ServiceId {
        loop {
            let notified = self.notify.notified();
            {
                let mut s = self.state.lock();
                if let Some(id) = s.ready.pop_front() {
                    s.queued.remove(&id);
                    s.running.insert(id.clone());
                    let more = !s.ready.is_empty();
                    drop(s);
                    if more {
                        // Wake another worker for the rest.
                        self.notify.notify_one();
                    }
                    return id;
                }
            }
            notified.await;
        }
    }

    /// Marks `id` done; requeues it when it was pushed meanwhile.
    pub fn done(&self, id: &ServiceId) {
        let again = {
            let mut s = self.state.lock();
            s.running.remove(id);
            s.again.remove(id)
        };
        if again {
            self.push(id.clone());
        }
    }

    /// Ids queued or running.
    pub fn len(&self) -> usize {
        let s = self.state.lock();
        s.ready.len() + s.running.len()
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    delay: Duration,
    until: Instant,
}

/// Per-service exponential backoff: `min`, doubled per consecutive failure, capped
/// at `max`; the wait actually used is jittered in `[delay/2, delay]`.
#[derive(Debug)]
pub(super) struct Backoffs {
    min: Duration,
    max: Duration,
    entries: Mutex<HashMap<ServiceId, Entry>>,
}

impl Backoffs {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            entries: Mutex::default(),
        }
    }

    /// Records a failure of `id`; returns the jittered wait before the retry.
    pub fn failed(&self, id: &ServiceId) -> Duration {
        let mut entries = self.entries.lock();
        let failures = entries.get(id).map_or(0, |e| e.failures) + 1;
        let factor = 1u32 << (failures - 1).min(20);
        let delay = self.min.saturating_mul(factor).min(self.max);
        let half = delay / 2;
        let jitter = Duration::from_nanos(
            rand::rng().random_range(0..=u64::try_from(half.as_nanos()).unwrap_or(u64::MAX)),
        );
        let wait = half + jitter;
        entries.insert(
            id.clone(),
            Entry {
                failures,
                delay,
                until: Instant::now() + wait,
            },
        );
        wait
    }

    /// Forgets the failures of `id`.
    pub fn reset(&self, id: &ServiceId) {
        self.entries.lock().remove(id);
    }

    /// Whether `id` waits for a scheduled retry now.
    pub fn waiting(&self, id: &ServiceId) -> bool {
        self.entries
            .lock()
            .get(id)
            .is_some_and(|e| e.until > Instant::now())
    }

    /// The current unjittered delay of `id`, if it has failures.
    pub fn current(&self, id: &ServiceId) -> Option<Duration> {
        self.entries.lock().get(id).map(|e| e.delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> ServiceId {
        ServiceId::new(s).unwrap()
    }

    #[tokio::test]
    async fn queue_deduplicates_and_never_runs_an_id_twice_at_once() {
        let q = Queue::default();
        q.push(id("a"));
        q.push(id("b"));
        q.push(id("a"));
        assert_eq!(q.len(), 2);
        let first = q.pop().await;
        assert_eq!(first, id("a"));
        // Pushed while running: not handed out again until done.
        q.push(id("a"));
        assert_eq!(q.pop().await, id("b"));
        q.done(&id("b"));
        assert_eq!(q.len(), 1);
        q.done(&id("a"));
        assert_eq!(q.pop().await, id("a"));
        q.done(&id("a"));
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn backoff_doubles_up_to_max_with_bounded_jitter_and_resets() {
        let b = Backoffs::new(Duration::from_millis(100), Duration::from_millis(1000));
        let s = id("svc");
        let mut delays = Vec::new();
        for _ in 0..6 {
            let wait = b.failed(&s);
            let delay = b.current(&s).unwrap();
            assert!(wait >= delay / 2 && wait <= delay, "{wait:?} vs {delay:?}");
            delays.push(delay.as_millis());
        }
        assert_eq!(delays, vec![100, 200, 400, 800, 1000, 1000]);
        assert!(b.waiting(&s));
        b.reset(&s);
        assert_eq!(b.current(&s), None);
        assert!(!b.waiting(&s));
    }
}
