//! Property tests of the parsers: they never panic on arbitrary input, and valid
//! generated inputs round-trip through `Display`.

use br2k_core::conformance::sample_spec;
use br2k_core::{Digest, ImageRef, Manifest, Repository, ServiceId, ServiceSpec};
use proptest::prelude::*;

fn registry_host() -> impl Strategy<Value = String> {
    prop_oneof![
        (
            "[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?",
            "[a-z0-9]{1,6}",
            proptest::option::of(0u32..=65535)
        )
            .prop_map(|(a, b, port)| match port {
                Some(p) => format!("{a}.{b}:{p}"),
                None => format!("{a}.{b}"),
            }),
        proptest::option::of(1u32..=65535).prop_map(|port| match port {
            Some(p) => format!("localhost:{p}"),
            None => "localhost".to_owned(),
        }),
        (1u8..=254, 0u8..=255, 1u32..=65535).prop_map(|(a, b, p)| format!("10.{a}.{b}.1:{p}")),
    ]
}

fn path_component() -> impl Strategy<Value = String> {
    let alnum = "[a-z0-9]{1,6}";
    let sep = prop_oneof![
        Just(".".to_owned()),
        Just("_".to_owned()),
        Just("__".to_owned()),
        "-{1,3}"
    ];
    (alnum, proptest::collection::vec((sep, alnum), 0..3)).prop_map(|(first, rest)| {
        let mut s = first;
        for (sep, part) in rest {
            s.push_str(&sep);
            s.push_str(&part);
        }
        s
    })
}

fn repository() -> impl Strategy<Value = String> {
    proptest::collection::vec(path_component(), 1..4).prop_map(|c| c.join("/"))
}

fn tag() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}"
}

fn digest() -> impl Strategy<Value = Digest> {
    any::<[u8; 32]>().prop_map(Digest::from_bytes)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn service_id_never_panics(s in ".*") {
        let _ = ServiceId::new(&s);
    }

    #[test]
    fn service_id_valid_round_trips(s in "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?") {
        let id = ServiceId::new(&s).unwrap();
        prop_assert_eq!(id.to_string(), s.clone());
        prop_assert_eq!(id.to_string().parse::<ServiceId>().unwrap(), id);
    }

    #[test]
    fn service_id_rejects_any_invalid_byte(
        prefix in "[a-z0-9]{1,10}",
        bad in "[^a-z0-9-]",
        suffix in "[a-z0-9]{1,10}",
    ) {
        let bad_id = format!("{prefix}{bad}{suffix}");
        prop_assert!(ServiceId::new(&bad_id).is_err());
    }

    #[test]
    fn digest_never_panics(s in ".*", hexish in "sha256:[0-9a-fA-Fx]{60,68}") {
        let _ = Digest::parse(&s);
        let _ = Digest::parse(&hexish);
    }

    #[test]
    fn digest_round_trips(d in digest()) {
        let text = d.to_string();
        prop_assert_eq!(Digest::parse(&text).unwrap(), d);
        prop_assert_eq!(text.len(), 71);
    }

    #[test]
    fn image_ref_never_panics(s in ".*", structured in "[a-zA-Z0-9.:/@_-]{0,80}") {
        let _ = ImageRef::parse(&s);
        let _ = ImageRef::parse(&structured);
    }

    #[test]
    fn image_ref_valid_round_trips(
        host in registry_host(),
        repo in repository(),
        tag in proptest::option::of(tag()),
        digest in proptest::option::of(digest()),
    ) {
        let mut text = format!("{host}/{repo}");
        if let Some(t) = &tag {
            text.push(':');
            text.push_str(t);
        }
        if let Some(d) = &digest {
            text.push('@');
            text.push_str(&d.to_string());
        }
        let r = ImageRef::parse(&text).unwrap();
        prop_assert_eq!(r.registry(), host.as_str());
        prop_assert_eq!(r.repository().as_str(), repo.as_str());
        prop_assert_eq!(r.tag(), tag.as_deref());
        prop_assert_eq!(r.digest(), digest.as_ref());
        prop_assert_eq!(r.to_string(), text.clone());
        prop_assert_eq!(ImageRef::parse(&r.to_string()).unwrap(), r.clone());
        // Built from parts, it writes the same text.
        let built = ImageRef::new(&host, Repository::new(&repo).unwrap(), tag.as_deref(), digest)
            .unwrap();
        prop_assert_eq!(built, r);
    }

    #[test]
    fn image_ref_short_names_round_trip_through_display(
        repo in repository(),
        tag in proptest::option::of(tag()),
    ) {
        // Short names get the default registry; the written form is stable.
        let first = repo.split('/').next().unwrap();
        prop_assume!(!first.contains('.') && first != "localhost");
        let text = match &tag {
            Some(t) => format!("{repo}:{t}"),
            None => repo.clone(),
        };
        let r = ImageRef::parse(&text).unwrap();
        prop_assert_eq!(r.registry(), "docker.io");
        prop_assert_eq!(ImageRef::parse(&r.to_string()).unwrap(), r);
    }

    #[test]
    fn spec_json_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = ServiceSpec::from_json_bytes(&bytes);
    }

    #[test]
    fn spec_json_mutations_never_panic(
        key in prop_oneof![
            Just("replicas"), Just("image"), Just("args"), Just("ports"), Just("env"),
            Just("secret_env"), Just("resources"), Just("probes"), Just("autoscaling"),
        ],
        value in prop_oneof![
            Just(serde_json::Value::Null),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_map(serde_json::Value::from),
            ".{0,40}".prop_map(serde_json::Value::from),
            proptest::collection::vec(".{0,10}", 0..4).prop_map(serde_json::Value::from),
            (".{0,10}", ".{0,20}").prop_map(|(k, v)| serde_json::json!({ k: v })),
            (any::<u16>(), ".{0,8}").prop_map(|(p, n)| serde_json::json!([{ "name": n, "port": p }])),
            (any::<u32>(), any::<u32>())
                .prop_map(|(a, b)| serde_json::json!({ "min_replicas": a, "max_replicas": b })),
        ],
    ) {
        let mut json = serde_json::to_value(sample_spec("reg.io")).unwrap();
        json[key] = value;
        let bytes = serde_json::to_vec(&json).unwrap();
        if let Ok(spec) = ServiceSpec::from_json_bytes(&bytes) {
            // Whatever is accepted is valid and hashes canonically.
            spec.validate().unwrap();
            let again = ServiceSpec::from_json_bytes(&spec.canonical_bytes()).unwrap();
            prop_assert_eq!(again.spec_hash(), spec.spec_hash());
        }
    }

    #[test]
    fn manifest_parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Manifest::parse(&bytes);
    }
}
