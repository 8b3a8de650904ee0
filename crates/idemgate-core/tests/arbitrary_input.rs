//! Arbitrary bytes into every parser and constructor of the core: a typed error or a value,
//! never a panic.

use idemgate_core::backend::RecordRow;
use idemgate_core::{EventId, Fingerprint, Key, MAX_KEY_LEN, Outcome};
use proptest::prelude::*;

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ -~]{0,300}",
        any::<String>(),
        proptest::collection::vec(any::<char>(), 0..600).prop_map(|c| c.into_iter().collect()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn keys_from_any_text(scope in text(), id in text()) {
        if let Ok(key) = Key::new(&scope, &id) {
            prop_assert_eq!(key.scope(), scope.as_str());
            prop_assert_eq!(key.id(), id.as_str());
            let derived = key.derive(&id);
            prop_assert!(derived.id().len() <= MAX_KEY_LEN);
        }
    }

    #[test]
    fn composed_keys_from_any_parts(
        scope in text(),
        parts in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..400), 0..6),
    ) {
        match Key::compose(&scope, &parts) {
            Ok(key) => {
                prop_assert!(!key.id().is_empty() && key.id().len() <= MAX_KEY_LEN);
                prop_assert!(key.id().bytes().all(|b| b.is_ascii_graphic()));
                // the same parts give the same key
                prop_assert_eq!(Key::compose(&scope, &parts).unwrap(), key);
            }
            Err(e) => prop_assert!(matches!(e, idemgate_core::Error::InvalidKey { .. }), "{:?}", e),
        }
    }

    #[test]
    fn outcomes_from_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(outcome) = Outcome::decode(&bytes) {
            // what decodes encodes back to the same bytes
            prop_assert_eq!(outcome.encode(), bytes);
        }
    }

    #[test]
    fn outcomes_round_trip(
        status in any::<u16>(),
        meta in proptest::collection::vec(("[a-z-]{1,20}", proptest::collection::vec(any::<u8>(), 0..40)), 0..5),
        body in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut outcome = Outcome::new(status, body);
        for (name, value) in &meta {
            outcome = outcome.with_meta(name, value);
        }
        let bytes = outcome.encode();
        prop_assert_eq!(bytes.len(), outcome.encoded_len());
        prop_assert_eq!(Outcome::decode(&bytes).unwrap(), outcome);
        // every truncation is refused, not misread
        for cut in 0..bytes.len() {
            prop_assert!(Outcome::decode(&bytes[..cut]).is_err());
        }
    }

    #[test]
    fn records_from_any_row(
        fingerprint in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
        state in any::<i64>(),
        token in any::<i64>(),
        lease_until in proptest::option::of(any::<i64>()),
        outcome in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..64)),
        completed_at in proptest::option::of(any::<i64>()),
        created_at in any::<i64>(),
        expires_at in any::<i64>(),
        attempts in any::<i64>(),
    ) {
        let row = RecordRow {
            fingerprint, state, token, lease_until, outcome, completed_at, created_at,
            expires_at, attempts,
        };
        let key = Key::new("rows", "k").unwrap();
        let _ = row.clone().is_held_at(created_at);
        if let Err(e) = row.into_record(&key, "test") {
            prop_assert!(matches!(e, idemgate_core::Error::Corrupt { .. }), "{:?}", e);
        }
    }

    #[test]
    fn fingerprints_and_event_ids_from_any_text(s in text()) {
        if let Ok(fp) = s.parse::<Fingerprint>() {
            prop_assert_eq!(fp.to_hex(), s.to_ascii_lowercase());
        }
        let _ = s.parse::<EventId>();
    }
}
