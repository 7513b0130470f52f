//! Read-your-writes of [`KubeReplicator`](super::KubeReplicator): right after an
//! `apply` or `remove` of a service, `observe` of that service waits until the watch
//! cache has seen what was written (by resource version; usually one watch delivery),
//! and reads the API server if that takes longer than [`READ_YOUR_WRITES_WAIT`].

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use br2k_core::ServiceId;
use kube::Resource;
use kube::runtime::reflector::Store;
use parking_lot::Mutex;

use crate::names::Names;
use crate::watch::{WatchHub, cached};

/// What `apply` or `remove` last wrote for a service.
#[derive(Debug)]
pub(super) enum Written {
    /// The objects `apply` wrote, with the resource versions the API server returned.
    Applied(Vec<(Kind, String, Option<String>)>),
    /// `remove` deleted the service's objects.
    Removed,
}

/// The kinds `apply` writes.
#[derive(Debug, Clone, Copy)]
pub(super) enum Kind {
    ConfigMap,
    StatefulSet,
    Service,
    PodDisruptionBudget,
}

/// How long `observe` waits for the watch cache to show this replicator's own last
/// write of a service before it reads the API server instead.
const READ_YOUR_WRITES_WAIT: Duration = Duration::from_secs(1);

/// After this long the watch cache is trusted again for a service even if it never
/// showed the write (someone else changed or deleted the object since).
const READ_YOUR_WRITES_WINDOW: Duration = Duration::from_secs(10);

/// The resource version of object `name` in `ns` as the watch cache holds it.
fn cached_version<K>(store: &Store<K>, name: &str, ns: &str) -> Option<String>
where
    K: Resource + Clone + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    cached(store, name, ns).and_then(|o| o.meta().resource_version.clone())
}

/// Whether cached resource version `cached` is at least `written`. Kubernetes
/// resource versions are etcd revisions (integers) in practice; anything else only
/// compares equal.
fn version_reached(cached: &str, written: &str) -> bool {
    match (cached.parse::<u64>(), written.parse::<u64>()) {
        (Ok(c), Ok(w)) => c >= w,
        _ => cached == written,
    }
}

/// The last write of each service that the watch cache may not show yet.
#[derive(Debug, Default)]
pub(super) struct Writes(Mutex<HashMap<ServiceId, (Written, Instant)>>);

impl Writes {
    /// Records `written` as the last write of `id`.
    pub(super) fn note(&self, id: &ServiceId, written: Written) {
        self.0.lock().insert(id.clone(), (written, Instant::now()));
    }

    /// Waits until the watch cache `hub` of namespace `ns` shows the last write of
    /// `id` (usually one watch delivery, milliseconds); `false` after
    /// [`READ_YOUR_WRITES_WAIT`].
    pub(super) async fn caught_up(&self, hub: &WatchHub, ns: &str, id: &ServiceId) -> bool {
        if self.shown(hub, ns, id) {
            return true;
        }
        let mut changes = hub.subscribe();
        let deadline = tokio::time::Instant::now() + READ_YOUR_WRITES_WAIT;
        loop {
            // Checked after subscribing, so no delivery between check and wait is lost;
            // deliveries for other services wake the loop too, and so does a short
            // tick (a watch may advance with objects no service owns).
            if self.shown(hub, ns, id) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            let tick = tokio::time::Instant::now() + Duration::from_millis(10);
            let _ = tokio::time::timeout_at(tick.min(deadline), changes.recv()).await;
        }
    }

    /// Whether the watch cache shows the last write of `id` (or there is none to wait
    /// for); forgets the write once it does. An applied object counts as shown once
    /// its kind's watch has delivered its written resource version (so also when it
    /// was changed or deleted again since); a removal once the StatefulSet is gone
    /// from the cache.
    fn shown(&self, hub: &WatchHub, ns: &str, id: &ServiceId) -> bool {
        let mut written = self.0.lock();
        let Some((w, at)) = written.get(id) else {
            return true;
        };
        let seen = at.elapsed() > READ_YOUR_WRITES_WINDOW
            || match w {
                Written::Applied(objects) => objects.iter().all(|(kind, name, rv)| {
                    let seen = match kind {
                        Kind::ConfigMap => &hub.seen_cms,
                        Kind::StatefulSet => &hub.seen_stss,
                        Kind::Service => &hub.seen_svcs,
                        Kind::PodDisruptionBudget => &hub.seen_pdbs,
                    };
                    // The cached object is looked up only when the written version is
                    // not a revision (this runs every few milliseconds while waiting).
                    let cached = || match kind {
                        Kind::ConfigMap => cached_version(&hub.cms, name, ns),
                        Kind::StatefulSet => cached_version(&hub.stss, name, ns),
                        Kind::Service => cached_version(&hub.svcs, name, ns),
                        Kind::PodDisruptionBudget => cached_version(&hub.pdbs, name, ns),
                    };
                    match rv {
                        Some(w) => match w.parse::<u64>() {
                            Ok(w) => seen.load(Ordering::Acquire) >= w,
                            // Not a revision: only the same version in the cache.
                            Err(_) => cached().is_some_and(|c| version_reached(&c, w)),
                        },
                        // No version returned: the object's presence must do.
                        None => cached().is_some(),
                    }
                }),
                Written::Removed => cached(&hub.stss, &Names::of(id).base, ns).is_none(),
            };
        if seen {
            written.remove(id);
        }
        seen
    }
}

#[cfg(test)]
mod tests {
    use super::version_reached;

    #[test]
    fn resource_versions_compare_as_revisions_when_they_are_numbers() {
        assert!(version_reached("120", "120"));
        assert!(version_reached("121", "120"));
        assert!(!version_reached("119", "120"));
        assert!(version_reached("1000", "999"), "numeric, not lexical");
        assert!(version_reached("opaque-a", "opaque-a"));
        assert!(!version_reached("opaque-b", "opaque-a"));
        assert!(!version_reached("12", "opaque"));
    }
}
