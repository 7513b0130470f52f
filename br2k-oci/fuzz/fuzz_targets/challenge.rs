//! Fuzzes the `WWW-Authenticate` parser with untrusted registry headers: no panics,
//! what parses prints (canonical form, every value quoted) to a header that parses to
//! the same challenges, and the Bearer reading agrees between the two.
#![no_main]

use br2k_oci::auth::{BearerChallenge, parse_challenges};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let bearer = BearerChallenge::find([s]);
    match parse_challenges(s) {
        Ok(challenges) => {
            assert!(!challenges.is_empty());
            let printed: Vec<String> = challenges.iter().map(|c| c.to_string()).collect();
            let printed = printed.join(", ");
            let again = parse_challenges(&printed).expect("printed challenges parse");
            assert_eq!(again, challenges, "round trip of {s:?} via {printed:?}");
            assert_eq!(BearerChallenge::find([printed.as_str()]), bearer);
            if let Ok(Some(b)) = &bearer {
                assert!(b.realm.starts_with("http://") || b.realm.starts_with("https://"));
                assert!(b.scopes.iter().all(|x| !x.is_empty() && !x.contains(' ')));
            }
        }
        Err(e) => assert_eq!(bearer, Err(e)),
    }
});
