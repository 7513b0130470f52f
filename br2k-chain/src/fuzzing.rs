//! Entry points of the fuzz targets (`fuzz/`, cargo feature `fuzzing`): the ABI
//! decoders of what an RPC endpoint answers, which may be lagging or lying.
//!
//! - [`answers`]: the return data of the registry's view calls (`getRecords`,
//!   `getVersion(s)`, `serviceCount`, `serviceIds`, `deployBlock`), decoded with the
//!   generated bindings the registry uses (`SolCall::abi_decode_returns`), then what
//!   the registry reads from a record: the state code, the owner and the placement.
//! - [`events`]: log topics and data decoded as the registry's events
//!   (`SolEventInterface::decode_raw_log`, and each event's own `decode_raw_log`), then
//!   what the registry reads from them: the spec JSON, the service name, the state
//!   code, the location endpoint and the placement's cluster name.

use alloy::primitives::B256;
use alloy::sol_types::{SolCall, SolEvent, SolEventInterface};
use br2k_core::{Location, Placement, ServiceId, ServiceSpec, ServiceState};

use crate::bindings::ServiceRegistry as C;
use crate::registry::{account_of, cluster_name, decode_placement, service_key};

/// The `chain_abi` target: `data[0]` even feeds the rest to [`answers`], odd to
/// [`events`].
pub fn abi(data: &[u8]) {
    if let Some((&which, rest)) = data.split_first() {
        if which & 1 == 0 {
            answers(rest);
        } else {
            events(rest);
        }
    }
}

/// Decodes `data[1..]` as the return data of the view call chosen by `data[0]`.
pub fn answers(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 6 {
        0 => {
            if let Ok(r) = C::getRecordsCall::abi_decode_returns(rest) {
                for rec in &r.records {
                    let _ = ServiceState::from_code(rec.state);
                    let _ = account_of(rec.owner);
                    placement(&rec.placement);
                }
            }
        }
        1 => {
            let _ = C::getVersionCall::abi_decode_returns(rest);
        }
        2 => {
            if let Ok(vs) = C::getVersionsCall::abi_decode_returns(rest) {
                for v in &vs {
                    let _ = account_of(v.publisher);
                }
            }
        }
        3 => {
            let _ = C::serviceCountCall::abi_decode_returns(rest);
        }
        4 => {
            let _ = C::serviceIdsCall::abi_decode_returns(rest);
        }
        _ => {
            let _ = C::deployBlockCall::abi_decode_returns(rest);
        }
    }
}

/// Decodes a log: `data[0] % 5` topics of 32 bytes follow, then the log data.
pub fn events(data: &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 5).min(rest.len() / 32);
    let (t, body) = rest.split_at(n * 32);
    let topics: Vec<B256> = t.chunks_exact(32).map(B256::from_slice).collect();
    if let Ok(ev) = C::ServiceRegistryEvents::decode_raw_log(&topics, body) {
        use C::ServiceRegistryEvents as Ev;
        match ev {
            Ev::Registered(e) => name(&e.name, e.id),
            Ev::StateChanged(e) => {
                let _ = ServiceState::from_code(e.state);
            }
            Ev::Relocated(e) => {
                let _ = Location::new(e.endpoint, e.term);
            }
            Ev::Placed(e) => {
                if let Ok(name) = cluster_name(&e.cluster) {
                    let p = Placement::new(name, e.epoch).expect("a decoded cluster name is valid");
                    assert_eq!(
                        crate::cluster_word(&p.cluster).expect("valid"),
                        e.cluster,
                        "a cluster name decodes from its own word only"
                    );
                }
            }
            _ => {}
        }
    }
    if let Ok(e) = C::Registered::decode_raw_log(topics.iter().copied(), body) {
        name(&e.name, e.id);
        spec(&e.spec);
    }
    if let Ok(e) = C::Published::decode_raw_log(topics.iter().copied(), body) {
        spec(&e.spec);
    }
    let _ = C::Relocated::decode_raw_log(topics.iter().copied(), body);
    let _ = C::Placed::decode_raw_log(topics.iter().copied(), body);
}

/// A record's placement as the registry decodes it: a placement it accepts has a
/// valid cluster name that encodes back to the stored word, and an epoch above 0.
fn placement(p: &C::Placement) {
    if let Ok(Some(got)) = decode_placement("getRecords", p) {
        assert!(got.epoch > 0, "epoch 0 accepted");
        assert_eq!(
            crate::cluster_word(&got.cluster).expect("a decoded cluster name is valid"),
            p.cluster,
            "a cluster name decodes from its own word only"
        );
    }
}

/// A name read from a `Registered` event counts only for its own key.
fn name(name: &str, id: B256) {
    if let Ok(sid) = ServiceId::new(name) {
        let _ = service_key(&sid) == id;
    }
}

/// Spec bytes from an event: parsed as the registry parses them (after their hash
/// matched); a spec that parses has a canonical form that parses to the same spec.
fn spec(bytes: &[u8]) {
    if let Ok(s) = ServiceSpec::from_json_bytes(bytes) {
        let again =
            ServiceSpec::from_json_bytes(&s.canonical_bytes()).expect("a canonical spec parses");
        assert_eq!(again.spec_hash(), s.spec_hash(), "canonical form is stable");
    }
}

/// Real inputs of [`abi`] (a `getRecords` answer for two ids, one
/// registered and placed, and the events of a registration, a publication, a
/// relocation and a placement),
/// encoded with the generated bindings: the fuzz corpus's seeds.
// `..Default::default()` everywhere: the contract's structs and events gain fields.
#[allow(clippy::needless_update)]
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    use alloy::primitives::{Address, Bytes};

    let id = ServiceId::new("ledger").expect("valid id");
    let key = service_key(&id);
    let owner = Address::repeat_byte(0x11);
    let spec = br#"{"image":"registry.example/ledger@sha256:1111111111111111111111111111111111111111111111111111111111111111","replicas":3}"#;
    let version = C::Version {
        specHash: B256::repeat_byte(0x22),
        imageDigest: B256::repeat_byte(0x11),
        publisher: owner,
        blockNumber: 7,
        ..Default::default()
    };
    let record = C::Record {
        exists: true,
        id: key,
        owner,
        state: 1,
        replicas: 3,
        active: 1,
        latest: 1,
        registeredBlock: 7,
        activeVersion: version.clone(),
        placement: C::Placement {
            cluster: crate::cluster_word("eu-1").expect("valid cluster"),
            epoch: 5,
            blockNumber: 8,
        },
        ..Default::default()
    };
    let records = C::getRecordsCall::abi_encode_returns(&C::getRecordsReturn {
        blockNumber: 9,
        records: vec![record, C::Record::default()],
    });
    let versions = C::getVersionsCall::abi_encode_returns(&vec![version]);
    let ids = C::serviceIdsCall::abi_encode_returns(&vec![key]);
    let log = |d: alloy::primitives::LogData| {
        let mut out = vec![d.topics().len() as u8];
        for t in d.topics() {
            out.extend_from_slice(t.as_slice());
        }
        out.extend_from_slice(&d.data);
        out
    };
    let registered = log(C::Registered {
        id: key,
        owner,
        name: "ledger".into(),
        spec: Bytes::from_static(spec),
        ..Default::default()
    }
    .encode_log_data());
    let published = log(C::Published {
        id: key,
        version: 2,
        publisher: owner,
        spec: Bytes::from_static(spec),
        replicas: 3,
        ..Default::default()
    }
    .encode_log_data());
    let relocated = log(C::Relocated {
        id: key,
        term: 4,
        endpoint: "http://ledger-0.ledger:8080".into(),
        ..Default::default()
    }
    .encode_log_data());
    let placed = log(C::Placed {
        id: key,
        by: owner,
        epoch: 5,
        cluster: crate::cluster_word("eu-1").expect("valid cluster"),
    }
    .encode_log_data());
    let with = |tag: u8, mut v: Vec<u8>| {
        v.insert(0, tag);
        v
    };
    let answer = |tag: u8, v: Vec<u8>| with(0, with(tag, v));
    vec![
        ("getRecords", answer(0, records)),
        ("getVersions", answer(2, versions)),
        ("serviceIds", answer(4, ids)),
        ("Registered", with(1, registered)),
        ("Published", with(1, published)),
        ("Relocated", with(1, relocated)),
        ("Placed", with(1, placed)),
    ]
}
