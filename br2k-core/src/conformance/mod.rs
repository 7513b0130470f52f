//! Conformance suites every backend runs against its real server (feature
//! `conformance`), in the style of object_store's `integration` module: flat lists of
//! `pub async fn` behaviours taking `&dyn Trait`, and one `run_all` per trait.
//!
//! Behaviours panic (with a message) when the backend does not conform, so they are
//! meant to be called from tests. They use fresh ids and repositories so they can run
//! again and again against a persistent backend (a chain, a registry).

pub mod fuzz;
pub mod image_store;
pub mod log;
pub mod registry;
pub mod replicator;

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::future::Future;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::artifact::{Blob, Image, OCI_CONFIG, OCI_LAYER_TAR};
use crate::digest::Digest;
use crate::error::Result;
use crate::id::ServiceId;
use crate::image::{ImageRef, Repository};
use crate::record::{Account, ServiceRecord, ServiceState};
use crate::spec::{Port, Probe, ProbeCheck, Probes, Resources, ServiceSpec};

/// How long [`eventually`] waits in the suites by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// A valid spec with every kind of field set: 3 replicas of
/// `<registry>/br2k/sample:1.0@sha256:...`, one port, plain and secret env,
/// resources and a readiness probe.
pub fn sample_spec(registry: &str) -> ServiceSpec {
    let image = ImageRef::new(
        registry,
        Repository::new("br2k/sample").expect("valid repository"),
        Some("1.0"),
        Some(Digest::of(b"br2k sample image")),
    )
    .expect("sample_spec needs a valid registry host");
    let mut spec = ServiceSpec::new(image, 3).expect("valid spec");
    spec.args = vec!["--listen".into(), "0.0.0.0:8080".into()];
    spec.ports = vec![Port {
        name: "http".into(),
        port: 8080,
    }];
    spec.env = BTreeMap::from([
        ("LOG_LEVEL".to_owned(), "info".to_owned()),
        ("CHAIN_ID".to_owned(), "31337".to_owned()),
    ]);
    spec.secret_env = vec![crate::spec::SecretEnv {
        name: "SIGNER_KEY".into(),
        secret: "sample-signer".into(),
        key: "key".into(),
    }];
    spec.resources = Resources {
        cpu_millis: Some(100),
        memory_mib: Some(64),
    };
    spec.probes = Probes {
        readiness: Some(Probe {
            check: ProbeCheck::Http {
                path: "/health".into(),
                port: 8080,
            },
            period_seconds: 5,
            failure_threshold: 3,
        }),
        ..Probes::default()
    };
    spec.validate().expect("sample spec is valid");
    spec
}

/// A Running version-1 record of `spec` for `id`, owned by account `conformance`.
pub fn sample_record(id: &ServiceId, spec: ServiceSpec) -> ServiceRecord {
    ServiceRecord {
        id: id.clone(),
        version: 1,
        latest_version: 1,
        spec_hash: spec.spec_hash(),
        replicas: spec.replicas,
        spec,
        state: ServiceState::Running,
        owner: Account("conformance".into()),
        checkpoint: None,
        location: None,
        placement: None,
        as_of: None,
        stale: false,
    }
}

/// splitmix64: a small deterministic generator for test bytes.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A deterministic image: a config naming `seed`, and `layers` layers of
/// `layer_size` pseudo-random bytes derived from `seed`. Equal arguments give equal
/// digests; different seeds give different ones.
pub fn sample_image(seed: u64, layers: usize, layer_size: usize) -> Image {
    let mut state = seed;
    let config = Blob::new(
        OCI_CONFIG,
        Bytes::from(format!(
            r#"{{"architecture":"amd64","os":"linux","config":{{"Labels":{{"br2k.seed":"{seed}"}}}},"rootfs":{{"type":"layers","diff_ids":[]}}}}"#
        )),
    );
    let layers = (0..layers)
        .map(|_| {
            let mut data = Vec::with_capacity(layer_size + 8);
            while data.len() < layer_size {
                data.extend_from_slice(&splitmix(&mut state).to_le_bytes());
            }
            data.truncate(layer_size);
            Blob::new(OCI_LAYER_TAR, data)
        })
        .collect();
    Image::build(config, layers, None)
}

/// Retries `check` every 100 ms until it returns `Ok`, and panics with its last
/// error after `timeout`. Real backends converge asynchronously (pods become ready,
/// deletions finish), so the suites poll instead of asserting at once.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        match check().await {
            Ok(v) => return v,
            Err(e) if start.elapsed() >= timeout => {
                panic!("{what}: not reached after {timeout:?}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Asserts that `result` is an error of [`crate::Error::kind`] `kind`; panics naming
/// `ctx` and what came instead.
#[track_caller]
pub fn expect_kind<T: Debug>(result: Result<T>, kind: crate::ErrorKind, ctx: &str) {
    match result {
        Err(e) if e.kind() == kind => {}
        other => panic!("{ctx}: expected {kind}, got {other:?}"),
    }
}
