//! Unit tests of the domain types: ids, digests, image references, specs, states,
//! locations, manifests and images.

use br2k_core::artifact::{OCI_INDEX, OCI_MANIFEST};
use br2k_core::conformance::{sample_image, sample_spec};
use br2k_core::spec::looks_secret;
use br2k_core::{
    Autoscaling, Blob, Digest, Error, Image, ImageRef, Location, Manifest, Port, Probe, ProbeCheck,
    Repository, SecretEnv, ServiceId, ServiceSpec, ServiceState, ValidationError,
};
use bytes::Bytes;

const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

#[test]
fn service_id_accepts_dns_labels_only() {
    for ok in ["a", "ledger", "ledger-1", "0", "a-b-c", &"x".repeat(63)] {
        assert_eq!(ServiceId::new(ok).unwrap().as_str(), ok);
        assert_eq!(ok.parse::<ServiceId>().unwrap().to_string(), ok);
    }
    for bad in [
        "",
        "-a",
        "a-",
        "A",
        "a_b",
        "a.b",
        "a b",
        "é",
        &"x".repeat(64),
    ] {
        match ServiceId::new(bad) {
            Err(ValidationError::ServiceId { value, .. }) => {
                assert_eq!(value, bad.chars().take(100).collect::<String>())
            }
            other => panic!("{bad:?}: {other:?}"),
        }
    }
}

#[test]
fn service_id_serde_validates() {
    let id: ServiceId = serde_json::from_str("\"ledger\"").unwrap();
    assert_eq!(serde_json::to_string(&id).unwrap(), "\"ledger\"");
    assert!(serde_json::from_str::<ServiceId>("\"Bad!\"").is_err());
}

#[test]
fn digest_parses_and_displays() {
    let s = format!("sha256:{HEX}");
    let d = Digest::parse(&s).unwrap();
    assert_eq!(d.to_string(), s);
    assert_eq!(d.hex(), HEX);
    assert_eq!(Digest::from_bytes(*d.as_bytes()), d);
    assert_eq!(
        Digest::of(b"").to_string(),
        "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    let json = serde_json::to_string(&d).unwrap();
    assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
    for bad in [
        "",
        HEX,
        "sha256:",
        "sha512:0123",
        &format!("sha256:{}", &HEX[1..]),
        &format!("sha256:{HEX}0"),
        &format!("sha256:{}", HEX.to_uppercase()),
        &format!("sha256:{}g", &HEX[1..]),
        &format!("SHA256:{HEX}"),
    ] {
        assert!(
            matches!(Digest::parse(bad), Err(ValidationError::Digest { .. })),
            "{bad:?}"
        );
    }
}

#[test]
fn digest_verify_reports_tampering() {
    let d = Digest::of(b"hello");
    d.verify("blob", b"hello").unwrap();
    match d.verify("blob", b"hellO") {
        Err(Error::Tampered {
            what,
            expected,
            actual,
        }) => {
            assert_eq!(what, "blob");
            assert_eq!(expected, d.to_string());
            assert_eq!(actual, Digest::of(b"hellO").to_string());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn image_ref_parses_docker_forms() {
    let digest = format!("sha256:{HEX}");
    let r = ImageRef::parse("ubuntu").unwrap();
    assert_eq!(
        (r.registry(), r.repository().as_str(), r.tag(), r.digest()),
        ("docker.io", "library/ubuntu", None, None)
    );
    let r = ImageRef::parse("team/app:1.2").unwrap();
    assert_eq!(
        (r.registry(), r.repository().as_str(), r.tag()),
        ("docker.io", "team/app", Some("1.2"))
    );
    let r = ImageRef::parse(&format!("localhost:5000/team/app:v1@{digest}")).unwrap();
    assert_eq!(r.registry(), "localhost:5000");
    assert_eq!(r.repository().as_str(), "team/app");
    assert_eq!(r.tag(), Some("v1"));
    assert_eq!(r.digest().unwrap().to_string(), digest);
    assert_eq!(
        r.to_string(),
        format!("localhost:5000/team/app:v1@{digest}")
    );
    let r = ImageRef::parse(&format!("registry.example.com/a/b/c@{digest}")).unwrap();
    assert_eq!((r.registry(), r.tag()), ("registry.example.com", None));
    assert_eq!(r.require_digest().unwrap().to_string(), digest);
    let r = ImageRef::parse("localhost/app").unwrap();
    assert_eq!(r.registry(), "localhost");
    // A port-like suffix without a slash is a tag, as with Docker.
    let r = ImageRef::parse("host:5000").unwrap();
    assert_eq!(
        (r.registry(), r.repository().as_str(), r.tag()),
        ("docker.io", "library/host", Some("5000"))
    );
}

#[test]
fn image_ref_rejects_bad_forms_with_typed_errors() {
    let digest = format!("sha256:{HEX}");
    for bad in [
        "".to_owned(),
        "Team/App".to_owned(),
        "app:".to_owned(),
        "app:-tag".to_owned(),
        format!("app:{}", "t".repeat(129)),
        "app@".to_owned(),
        "app@sha256:1234".to_owned(),
        format!("app@{digest}@{digest}"),
        "reg.io:99999/app".to_owned(),
        "reg..io/app".to_owned(),
        "-reg.io/app".to_owned(),
        "reg.io/".to_owned(),
        "reg.io//app".to_owned(),
        "reg.io/app/".to_owned(),
        "a--".to_owned(),
        "a..b".to_owned(),
        "a___b".to_owned(),
        "a b".to_owned(),
        "x".repeat(513),
        format!("reg.io/{}", "a".repeat(256)),
    ] {
        assert!(
            matches!(ImageRef::parse(&bad), Err(ValidationError::ImageRef { .. })),
            "{bad:?} should be rejected"
        );
    }
    let unpinned = ImageRef::parse("reg.io/app:1").unwrap();
    assert!(matches!(
        unpinned.require_digest(),
        Err(ValidationError::ImageRef { .. })
    ));
}

#[test]
fn image_ref_builders_round_trip() {
    let repo = Repository::new("team/app").unwrap();
    let d = Digest::of(b"x");
    let r = ImageRef::new("mirror.local:5001", repo.clone(), Some("v1"), Some(d)).unwrap();
    assert_eq!(ImageRef::parse(&r.to_string()).unwrap(), r);
    let m = r.with_registry("127.0.0.1:5002").unwrap();
    assert_eq!(m.registry(), "127.0.0.1:5002");
    assert_eq!((m.repository(), m.digest()), (&repo, Some(&d)));
    let p = ImageRef::parse("reg.io/app:1").unwrap().with_digest(d);
    assert_eq!(p.digest(), Some(&d));
    // A bare host name would read back as a repository path: refused.
    assert!(ImageRef::new("mirror", repo.clone(), None, Some(d)).is_err());
    assert!(ImageRef::new("localhost", repo.clone(), None, Some(d)).is_ok());
    assert!(ImageRef::new("reg.io", repo, Some("bad tag"), None).is_err());
    assert!(r.with_registry("bad host!").is_err());
    let json = serde_json::to_string(&r).unwrap();
    assert_eq!(serde_json::from_str::<ImageRef>(&json).unwrap(), r);
}

fn spec_err(spec: &ServiceSpec) -> String {
    match spec.validate() {
        Err(ValidationError::Spec { field, .. }) => field,
        other => panic!("expected a spec error, got {other:?}"),
    }
}

#[test]
fn spec_validation_names_the_field() {
    let ok = sample_spec("reg.io");
    ok.validate().unwrap();

    let mut s = ok.clone();
    s.replicas = 1001;
    assert_eq!(spec_err(&s), "replicas");

    let mut s = ok.clone();
    s.ports.push(Port {
        name: "http".into(),
        port: 9090,
    });
    assert_eq!(spec_err(&s), "ports[1].name");
    let mut s = ok.clone();
    s.ports[0].port = 0;
    assert_eq!(spec_err(&s), "ports[0].port");
    let mut s = ok.clone();
    s.ports[0].name = "a-very-long-port-name".into();
    assert_eq!(spec_err(&s), "ports[0].name");
    // What the API server would refuse: a name without a letter or with "--", and a
    // port number used twice.
    for bad in ["8080", "a--b"] {
        let mut s = ok.clone();
        s.ports[0].name = bad.into();
        assert_eq!(spec_err(&s), "ports[0].name", "{bad}");
    }
    let mut s = ok.clone();
    let dup = s.ports[0].port;
    s.ports.push(Port {
        name: "other".into(),
        port: dup,
    });
    assert_eq!(spec_err(&s), "ports[1].port");

    let mut s = ok.clone();
    s.env.insert("1BAD".into(), "x".into());
    assert_eq!(spec_err(&s), "env.1BAD");

    let mut s = ok.clone();
    s.secret_env.push(SecretEnv {
        name: "LOG_LEVEL".into(),
        secret: "s".into(),
        key: "k".into(),
    });
    assert_eq!(spec_err(&s), "secret_env[1].name");
    let mut s = ok.clone();
    s.secret_env[0].secret = "Not_A_Label".into();
    assert_eq!(spec_err(&s), "secret_env[0].secret");
    let mut s = ok.clone();
    s.secret_env[0].key = "".into();
    assert_eq!(spec_err(&s), "secret_env[0].key");

    let mut s = ok.clone();
    s.probes.liveness = Some(Probe {
        check: ProbeCheck::Http {
            path: "health".into(),
            port: 8080,
        },
        period_seconds: 5,
        failure_threshold: 3,
    });
    assert_eq!(spec_err(&s), "probes.liveness.check.path");
    let mut s = ok.clone();
    s.probes.startup = Some(Probe {
        check: ProbeCheck::Exec { command: vec![] },
        period_seconds: 5,
        failure_threshold: 3,
    });
    assert_eq!(spec_err(&s), "probes.startup.check.command");
    let mut s = ok.clone();
    s.probes.readiness.as_mut().unwrap().period_seconds = 0;
    assert_eq!(spec_err(&s), "probes.readiness.period_seconds");
    let mut s = ok.clone();
    s.probes.readiness.as_mut().unwrap().failure_threshold = 101;
    assert_eq!(spec_err(&s), "probes.readiness.failure_threshold");
    let mut s = ok.clone();
    s.probes.readiness = Some(Probe {
        check: ProbeCheck::Tcp { port: 0 },
        period_seconds: 5,
        failure_threshold: 3,
    });
    assert_eq!(spec_err(&s), "probes.readiness.check.port");

    let mut s = ok.clone();
    s.autoscaling = Some(Autoscaling {
        min_replicas: 5,
        max_replicas: 2,
    });
    assert_eq!(spec_err(&s), "autoscaling");
    let mut s = ok.clone();
    s.autoscaling = Some(Autoscaling {
        min_replicas: 4,
        max_replicas: 8,
    });
    assert_eq!(spec_err(&s), "replicas", "3 replicas outside 4..=8");
    s.replicas = 6;
    s.validate().unwrap();
    assert!(s.allows_replicas(8, 6) && !s.allows_replicas(9, 6));
    assert!(ok.allows_replicas(3, 3) && !ok.allows_replicas(4, 3));

    let mut s = ok.clone();
    s.args = vec!["x".repeat(4000); 20];
    assert_eq!(spec_err(&s), "", "canonical form over 64 KiB");

    let mut s = ok.clone();
    s.image = ImageRef::parse("reg.io/app:1").unwrap();
    assert!(matches!(
        s.validate(),
        Err(ValidationError::ImageRef { .. })
    ));
    assert!(ServiceSpec::new(s.image.clone(), 1).is_err());
}

#[test]
fn spec_validation_detects_secrets() {
    let ok = sample_spec("reg.io");
    for name in [
        "DB_PASSWORD",
        "passwd",
        "CLIENT_SECRET",
        "GITHUB_TOKEN",
        "SIGNER_PRIVATE_KEY",
        "API_KEY",
    ] {
        let mut s = ok.clone();
        s.env.insert(name.into(), "x".into());
        assert_eq!(spec_err(&s), format!("env.{name}"), "{name}");
    }
    for value in [
        HEX.to_owned(),
        format!("0x{HEX}"),
        "https://user:pw@rpc.example.com/v1".to_owned(),
        "Bearer abc.def".to_owned(),
        "-----BEGIN EC PRIVATE KEY-----".to_owned(),
    ] {
        assert!(looks_secret(&value), "{value}");
        let mut s = ok.clone();
        s.env.insert("UPSTREAM".into(), value.clone());
        assert_eq!(spec_err(&s), "env.UPSTREAM", "{value}");
        let mut s = ok.clone();
        s.args.push(value.clone());
        assert_eq!(spec_err(&s), "args[2]", "{value}");
    }
    for value in [
        "https://rpc.example.com/v1?x=@y",
        "info",
        "0x1234",
        "http://10.0.0.1:8545",
    ] {
        assert!(!looks_secret(value), "{value}");
    }
}

#[test]
fn canonical_hash_is_stable_across_json_field_order() {
    let spec = sample_spec("reg.io");
    let json = serde_json::to_value(&spec).unwrap();
    let obj = json.as_object().unwrap();
    // The same object written with its keys in reverse order, at the top level.
    let mut reversed = String::from("{");
    for (i, (k, v)) in obj.iter().rev().enumerate() {
        if i > 0 {
            reversed.push(',');
        }
        reversed.push_str(&format!("{}:{}", serde_json::to_string(k).unwrap(), v));
    }
    reversed.push('}');
    let a = ServiceSpec::from_json_bytes(serde_json::to_string(&json).unwrap().as_bytes()).unwrap();
    let b = ServiceSpec::from_json_bytes(reversed.as_bytes()).unwrap();
    assert_eq!(a, b);
    assert_eq!(a.spec_hash(), b.spec_hash());
    assert_eq!(a.spec_hash(), spec.spec_hash());
    assert_eq!(a.canonical_bytes(), b.canonical_bytes());
    // Canonical bytes have sorted keys and no whitespace.
    let text = String::from_utf8(spec.canonical_bytes()).unwrap();
    assert!(text.starts_with("{\"args\":"), "{text}");
    assert!(!text.contains(": ") && !text.contains('\n'));
    // Omitted defaulted fields equal explicit empty ones.
    let minimal = format!(r#"{{"replicas":1,"image":"reg.io/app@sha256:{HEX}"}}"#);
    let explicit = format!(
        r#"{{"image":"reg.io/app@sha256:{HEX}","replicas":1,"args":[],"env":{{}},"ports":[],"secret_env":[],"autoscaling":null}}"#
    );
    let m = ServiceSpec::from_json_bytes(minimal.as_bytes()).unwrap();
    let e = ServiceSpec::from_json_bytes(explicit.as_bytes()).unwrap();
    assert_eq!(m.spec_hash(), e.spec_hash());
    // Any change changes the hash.
    let mut other = spec.clone();
    other.replicas += 1;
    assert_ne!(other.spec_hash(), spec.spec_hash());
}

#[test]
fn spec_json_rejects_unknown_fields_and_oversize() {
    let unknown = format!(r#"{{"image":"reg.io/app@sha256:{HEX}","replicas":1,"extra":1}}"#);
    assert!(matches!(
        ServiceSpec::from_json_bytes(unknown.as_bytes()),
        Err(ValidationError::Malformed { .. })
    ));
    let big = vec![b' '; 64 * 1024 + 1];
    assert!(matches!(
        ServiceSpec::from_json_bytes(&big),
        Err(ValidationError::Malformed { .. })
    ));
    let unpinned = r#"{"image":"reg.io/app:1","replicas":1}"#;
    assert!(matches!(
        ServiceSpec::from_json_bytes(unpinned.as_bytes()),
        Err(ValidationError::ImageRef { .. })
    ));
}

#[test]
fn service_state_transitions_and_codes() {
    use ServiceState::*;
    let all = [Ready, Running, Paused, Stopped];
    let allowed = [
        (Ready, Running),
        (Ready, Stopped),
        (Running, Paused),
        (Running, Stopped),
        (Paused, Running),
        (Paused, Stopped),
        (Stopped, Running),
    ];
    for from in all {
        for to in all {
            assert_eq!(
                from.can_become(to),
                allowed.contains(&(from, to)),
                "{from} -> {to}"
            );
        }
        assert_eq!(ServiceState::from_code(from.code()).unwrap(), from);
    }
    assert!(ServiceState::from_code(4).is_err());
    assert_eq!(Paused.to_string(), "paused");
}

#[test]
fn location_rejects_credentials_and_junk() {
    let l = Location::new("http://10.0.0.7:8080", 3).unwrap();
    assert_eq!((l.endpoint.as_str(), l.term), ("http://10.0.0.7:8080", 3));
    for bad in [
        "".to_owned(),
        "x".repeat(257),
        "http://a b".to_owned(),
        "http://a\n".to_owned(),
        "http://user:pw@host".to_owned(),
        "http://host/?token=1".to_owned(),
        HEX.to_owned(),
    ] {
        assert!(
            matches!(
                Location::new(bad.clone(), 1),
                Err(ValidationError::Malformed { .. })
            ),
            "{bad:?}"
        );
    }
}

#[test]
fn manifest_parse_rejects_bad_inputs() {
    let good = sample_image(1, 1, 8);
    Manifest::parse(&good.manifest_bytes).unwrap();
    let d = format!("sha256:{HEX}");
    let cases = [
        b"not json".to_vec(),
        b"{}".to_vec(),
        br#"{"schemaVersion":1,"config":{"mediaType":"x","digest":"DIGEST","size":1},"layers":[]}"#
            .to_vec(),
        br#"{"schemaVersion":2,"mediaType":"MT","config":{"mediaType":"x","digest":"DIGEST","size":1},"layers":[]}"#
            .to_vec(),
        br#"{"schemaVersion":2,"config":{"mediaType":"x","digest":"sha256:00","size":1},"layers":[]}"#
            .to_vec(),
        br#"{"schemaVersion":2,"config":{"mediaType":"x","digest":"DIGEST","size":-1},"layers":[]}"#
            .to_vec(),
        vec![b' '; 4 * 1024 * 1024 + 1],
    ];
    for case in cases {
        let text = String::from_utf8(case)
            .unwrap()
            .replace("DIGEST", &d)
            .replace("MT", OCI_INDEX);
        assert!(
            matches!(
                Manifest::parse(text.as_bytes()),
                Err(ValidationError::Malformed { .. })
            ),
            "{}",
            &text[..text.len().min(120)]
        );
    }
    let layers: Vec<String> = (0..1001)
        .map(|_| format!(r#"{{"mediaType":"x","digest":"{d}","size":1}}"#))
        .collect();
    let many = format!(
        r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"x","digest":"{d}","size":1}},"layers":[{}]}}"#,
        layers.join(",")
    );
    assert!(Manifest::parse(many.as_bytes()).is_err());
}

fn parts(image: &Image) -> (Bytes, Bytes, Vec<Bytes>) {
    (
        image.manifest_bytes.clone(),
        image.config.data.clone(),
        image.layers.iter().map(|l| l.data.clone()).collect(),
    )
}

#[test]
fn image_from_parts_verifies_everything() {
    let image = sample_image(9, 2, 100);
    image.verify().unwrap();
    let (m, c, l) = parts(&image);
    assert_eq!(
        Image::from_parts(m.clone(), Some(&image.digest), c.clone(), l.clone()).unwrap(),
        image
    );

    // Wrong expected digest.
    let other = Digest::of(b"other");
    assert!(matches!(
        Image::from_parts(m.clone(), Some(&other), c.clone(), l.clone()),
        Err(Error::Tampered { ref what, .. }) if what == "manifest"
    ));
    // A flipped layer byte.
    let mut bad = l.clone();
    let mut v = bad[1].to_vec();
    v[50] ^= 1;
    bad[1] = Bytes::from(v);
    assert!(matches!(
        Image::from_parts(m.clone(), Some(&image.digest), c.clone(), bad),
        Err(Error::Tampered { ref what, .. }) if what == "layer 1"
    ));
    // A wrong config.
    assert!(matches!(
        Image::from_parts(m.clone(), None, Bytes::from_static(b"{}"), l.clone()),
        Err(Error::Tampered { ref what, .. }) if what == "config blob"
    ));
    // A missing layer.
    assert!(matches!(
        Image::from_parts(m.clone(), None, c.clone(), l[..1].to_vec()),
        Err(Error::InvalidInput(_))
    ));
    // A manifest that lies about a size (the digest matches).
    let mut manifest = image.manifest.clone();
    manifest.layers[0].size += 1;
    let lying = Bytes::from(serde_json::to_vec(&manifest).unwrap());
    assert!(matches!(
        Image::from_parts(lying, None, c.clone(), l.clone()),
        Err(Error::Tampered { ref what, .. }) if what == "layer 0 size"
    ));
    // A changed public field is caught by verify.
    let mut forged = image.clone();
    forged.layers[0] = Blob::new("x", Bytes::from_static(b"forged"));
    assert!(forged.verify().is_err());
}

#[test]
fn images_are_deterministic_and_snapshots_are_artifacts() {
    assert_eq!(sample_image(5, 2, 33), sample_image(5, 2, 33));
    assert_ne!(sample_image(5, 2, 33).digest, sample_image(6, 2, 33).digest);
    let img = sample_image(5, 3, 33);
    assert_eq!(img.layers.len(), 3);
    assert!(img.layers.iter().all(|l| l.data.len() == 33));
    assert_eq!(img.size(), img.config.data.len() as u64 + 99);
    let snap = Image::snapshot(Bytes::from_static(b"state"));
    snap.verify().unwrap();
    assert_eq!(
        snap.manifest.artifact_type.as_deref(),
        Some(br2k_core::artifact::SNAPSHOT_ARTIFACT)
    );
    assert_eq!(snap.layers[0].data, Bytes::from_static(b"state"));
}

#[test]
fn error_kinds_and_retryability() {
    assert!(Error::unavailable("x").is_retryable());
    assert!(!Error::not_found("x").is_retryable());
    assert!(!Error::tampered("a", "b", "c").is_retryable());
    assert!(Error::backend("oci", "boom", true).is_retryable());
    assert!(!Error::backend("oci", "boom", false).is_retryable());
    let e: Error = ValidationError::malformed("x", "y").into();
    assert_eq!(e.kind(), br2k_core::ErrorKind::InvalidInput);
    assert_eq!(Error::conflict("c").kind(), br2k_core::ErrorKind::Conflict);
}

#[test]
fn credential_assignments_tokens_and_cloud_keys_are_secrets_in_env_args_and_probes() {
    let jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlLWJ5dGVz";
    let secrets = [
        "postgres://db:5432/app?sslmode=require&password=hunter2".to_owned(),
        "--api-key=abc123".to_owned(),
        format!("Authorization: {jwt}"),
        jwt.to_owned(),
        "AKIAIOSFODNN7EXAMPLE".to_owned(),
        "ghp_0123456789abcdefghijklmnopqrstuvwxyzAB".to_owned(),
        "glpat-0123456789abcdefghij".to_owned(),
        "xoxb-1234567890-abcdefghij".to_owned(),
        "AIzaSyA-0123456789abcdefghijklmnopqrstu".to_owned(),
        "sk_live_0123456789abcdefghijklmn".to_owned(),
    ];
    let ok = sample_spec("reg.io");
    for value in &secrets {
        assert!(looks_secret(value), "{value}");
        let mut s = ok.clone();
        s.env.insert("UPSTREAM".into(), value.clone());
        assert_eq!(spec_err(&s), "env.UPSTREAM", "{value}");
        let mut s = ok.clone();
        s.args.push(value.clone());
        assert_eq!(spec_err(&s), "args[2]", "{value}");
        let mut s = ok.clone();
        s.probes.liveness = Some(Probe {
            check: ProbeCheck::Exec {
                command: vec!["check".into(), value.clone()],
            },
            period_seconds: 10,
            failure_threshold: 3,
        });
        assert_eq!(spec_err(&s), "probes.liveness.check.command[1]", "{value}");
    }
    let mut s = ok.clone();
    s.probes.readiness = Some(Probe {
        check: ProbeCheck::Http {
            path: "/health?token=abc".into(),
            port: 8080,
        },
        period_seconds: 10,
        failure_threshold: 3,
    });
    assert_eq!(spec_err(&s), "probes.readiness.check.path");
    // Ordinary values stay accepted.
    for value in [
        "AKIA",
        "eyJ",
        "a.b.c",
        "token=",
        "tokens=3",
        "--max-tokens=5",
        "sk-1",
        "https://example.com/path?page=2",
        "/health",
        "ghp_short",
    ] {
        assert!(!looks_secret(value), "{value}");
    }
}
