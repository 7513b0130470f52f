//! Entry points of the fuzz targets (`fuzz/`, cargo feature `fuzzing`): the decoders
//! of what etcd answers, which br2k reads back without trusting (another client of
//! the etcd cluster may have written anything under the namespace).

use bytes::Bytes;

use crate::encoding::{Keys, decode_chunk, encode_chunk, parse_index};

/// Decodes one key/value pair of the log as a read does: the first byte of `data` is
/// the key's length, the key follows, the rest is the value. The key is parsed as an
/// entry key and the value as an index (`first`/`last`) and as an entry chunk; a
/// chunk that decodes must encode back to the same bytes.
pub fn chunk(data: &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let (key, value) = rest.split_at(usize::from(n).min(rest.len()));
    let _ = Keys::new("fuzz").entry_index(key);
    let _ = parse_index(key, value);
    if let Ok((term, entries)) = decode_chunk(key, value) {
        assert!(!entries.is_empty(), "a chunk holds at least one entry");
        let again: Vec<Bytes> = entries.clone();
        assert_eq!(encode_chunk(term, &again), value, "chunk round trip");
    }
}

/// Real inputs of [`chunk`]: an entry chunk of two entries under its key, as an
/// append writes it, and the `last` index.
pub fn seeds() -> Vec<(&'static str, Vec<u8>)> {
    let keys = Keys::new("fuzz");
    let with_key = |key: &str, value: &[u8]| {
        let mut out = vec![key.len() as u8];
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(value);
        out
    };
    let chunk = encode_chunk(
        3,
        &[
            Bytes::from_static(br#"{"op":"noop","id":"1-0"}"#),
            Bytes::from_static(br#"{"op":"cmd","id":"1-1","key":null,"cmd":1}"#),
        ],
    );
    vec![
        ("chunk", with_key(&keys.entry(7), &chunk)),
        ("last", with_key(&keys.last, b"8")),
    ]
}
