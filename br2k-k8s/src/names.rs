//! Object names and the labels and annotations br2k puts on every object it manages.

use std::collections::BTreeMap;

use br2k_core::{Digest, ServiceId};

/// `app.kubernetes.io/managed-by`: set to [`MANAGER`] on every managed object.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// `app.kubernetes.io/name`: the object base name.
pub const LABEL_NAME: &str = "app.kubernetes.io/name";
/// `br2k.io/service-id`: the service id (a DNS-1123 label fits a label value).
pub const LABEL_SERVICE_ID: &str = "br2k.io/service-id";
/// `br2k.io/record-version`: the record version the object was applied from.
pub const LABEL_RECORD_VERSION: &str = "br2k.io/record-version";
/// `br2k.io/spec-hash`: the canonical spec hash (an annotation: `:` is not allowed in
/// label values). Informational only: `observe` never trusts it.
pub const ANNOTATION_SPEC_HASH: &str = "br2k.io/spec-hash";
/// `br2k.io/config-hash`: on the pod template, the hash of the environment values the
/// ConfigMap holds. The pods read those values when they start, so a change of values
/// alone must change the template for the replicas to restart with them.
pub const ANNOTATION_CONFIG_HASH: &str = "br2k.io/config-hash";
/// The value of [`LABEL_MANAGED_BY`] and the one server-side-apply field manager.
pub const MANAGER: &str = "br2k";
/// Label selector matching every object br2k manages.
pub const MANAGED_SELECTOR: &str = "app.kubernetes.io/managed-by=br2k";
/// Name of the one container in each pod.
pub const CONTAINER: &str = "app";

/// Longest base name used as is. A StatefulSet name must leave room in the
/// `controller-revision-hash` label value (63) for `-` and a ~10 character hash.
const MAX_PLAIN: usize = 40;

/// The object names of one service's workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    /// Base name: StatefulSet, client Service, PodDisruptionBudget, autoscaler.
    pub base: String,
    /// Headless Service giving pods stable DNS identities.
    pub headless: String,
    /// ConfigMap holding the non-secret config; owner of every other object.
    pub config: String,
}

impl Names {
    /// Names for `id`. The id itself is used when it is short enough and starts with a
    /// letter (Service names must); otherwise a stable `b-<prefix>-<hash>` form.
    ///
    /// Names never collide between services: an id that could equal another's
    /// derived name (one ending in `-peers`, the headless Service's suffix, or
    /// starting with `b-`, the hashed form's prefix) takes the hashed form, which
    /// ends in hex digits and so never in `-peers`.
    pub fn of(id: &ServiceId) -> Self {
        let s = id.as_str();
        let plain = s.len() <= MAX_PLAIN
            && s.as_bytes()[0].is_ascii_lowercase()
            && !s.starts_with("b-")
            && !s.ends_with("-peers");
        let base = if plain {
            s.to_owned()
        } else {
            let hash = Digest::of(s.as_bytes()).hex();
            let prefix: String = s.chars().take(24).collect();
            let prefix = prefix.trim_end_matches('-');
            format!("b-{prefix}-{}", &hash[..10])
        };
        Self {
            headless: format!("{base}-peers"),
            config: format!("{base}-config"),
            base,
        }
    }
}

/// Labels selecting the pods of `id` (the StatefulSet selector; immutable).
pub fn selector_labels(id: &ServiceId) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_MANAGED_BY.to_owned(), MANAGER.to_owned()),
        (LABEL_SERVICE_ID.to_owned(), id.to_string()),
    ])
}

/// The label selector string for the pods of `id`.
pub fn selector_string(id: &ServiceId) -> String {
    format!("{MANAGED_SELECTOR},{LABEL_SERVICE_ID}={id}")
}

/// Labels of every managed object of `id` applied from record `version`.
pub fn object_labels(id: &ServiceId, names: &Names, version: u64) -> BTreeMap<String, String> {
    let mut l = selector_labels(id);
    l.insert(LABEL_NAME.to_owned(), names.base.clone());
    l.insert(LABEL_RECORD_VERSION.to_owned(), version.to_string());
    l
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_of_different_services_never_collide() {
        let ids = [
            "a",
            "a-peers",
            "b-a",
            "b-a-peers",
            "peers",
            "a-config",
            "a-peers-peers",
        ];
        let mut seen = std::collections::BTreeMap::new();
        for raw in ids {
            let n = Names::of(&ServiceId::new(raw).unwrap());
            // Services: the base (client) and the headless one share a namespace.
            for svc in [&n.base, &n.headless] {
                if let Some(other) = seen.insert(svc.clone(), raw) {
                    assert_eq!(other, raw, "service {svc} of {raw} and {other}");
                }
            }
        }
        assert!(
            Names::of(&ServiceId::new("a-peers").unwrap())
                .base
                .starts_with("b-")
        );
    }

    #[test]
    fn short_ids_are_used_as_is() {
        let n = Names::of(&ServiceId::new("ledger").unwrap());
        assert_eq!(n.base, "ledger");
        assert_eq!(n.headless, "ledger-peers");
        assert_eq!(n.config, "ledger-config");
    }

    #[test]
    fn long_or_digit_ids_are_hashed_stably_and_fit() {
        for raw in [
            "7ledger",
            &"a".repeat(63),
            "abc-defghijklmnopqrstuvwx-yz0123456789-abcdef",
        ] {
            let id = ServiceId::new(raw).unwrap();
            let n = Names::of(&id);
            assert_eq!(n, Names::of(&id));
            assert!(n.base.starts_with("b-"), "{}", n.base);
            assert!(n.base.len() <= 52, "{}", n.base);
            assert!(!n.base.contains("--"), "{}", n.base);
            assert!(n.config.len() <= 63);
        }
        assert_ne!(
            Names::of(&ServiceId::new("7a").unwrap()).base,
            Names::of(&ServiceId::new("7b").unwrap()).base
        );
    }
}
