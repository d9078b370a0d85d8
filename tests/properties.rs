//! Property-based tests (proptest, a bounded number of cases each, so CI stays quick): the strict
//! JSON reader, E.164 parsing and masking, redaction and webhook signatures. No input panics;
//! redaction never lets a matched e-mail, card or SSN through and is idempotent.

use callgate::phone;
use callgate::policy::Redaction;
use callgate::policy::RedactionPolicy;
use callgate::stages::validate::parse_strict;
use proptest::prelude::*;
use serde_json::{Map, Value};

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn redaction() -> Redaction {
    let policy: RedactionPolicy = toml::from_str(
        r#"
        [[patterns]]
        kind = "email"
        [[patterns]]
        kind = "card"
        [[patterns]]
        kind = "us_ssn"
        "#,
    )
    .unwrap();
    Redaction::compile(&policy, b"property-test-key").unwrap()
}

/// A valid Luhn card number from 15 random digits (16 in all).
fn card(digits: &[u8]) -> String {
    let mut all: Vec<u8> = digits.to_vec();
    let sum: u32 = all
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            let d = u32::from(d);
            if i % 2 == 0 {
                if d * 2 > 9 { d * 2 - 9 } else { d * 2 }
            } else {
                d
            }
        })
        .sum();
    all.push(((10 - sum % 10) % 10) as u8);
    all.iter().map(|d| char::from(b'0' + d)).collect()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn the_strict_reader_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = parse_strict(&bytes, 8);
    }

    #[test]
    fn the_strict_reader_reads_what_serde_writes(value in json(4)) {
        let text = serde_json::to_vec(&value).unwrap();
        let read = parse_strict(&text, 16);
        // Objects with repeated keys cannot come out of serde; everything it writes is read back.
        prop_assert_eq!(read.ok(), Some(value));
    }

    #[test]
    fn e164_parsing_never_panics_and_masks_hide_the_middle(input in "\\PC{0,40}", digits in "[0-9]{8,15}") {
        let _ = phone::parse_e164(&input);
        let number = format!("+{digits}");
        if let Ok(parsed) = phone::parse_e164(&number) {
            prop_assert!(parsed.e164.starts_with('+'));
            let masked = phone::mask(&parsed.e164);
            prop_assert_ne!(&masked, &parsed.e164);
            prop_assert!(masked.contains('*'));
        }
        let _ = phone::mask(&input);
    }

    #[test]
    fn redaction_lets_no_match_through_and_is_idempotent(
        before in "[a-z ]{0,20}",
        after in "[a-z ]{0,20}",
        user in "[a-z][a-z0-9.]{0,10}",
        domain in "[a-z]{1,10}",
        card_digits in proptest::collection::vec(0u8..10, 15),
        ssn in (100u32..900, 10u32..99, 1000u32..9999),
        noise in "\\PC{0,30}",
    ) {
        let email = format!("{user}@{domain}.com");
        let card = card(&card_digits);
        let ssn = format!("{}-{}-{}", ssn.0, ssn.1, ssn.2);
        let mut metadata = Map::new();
        metadata.insert("note".into(), Value::String(format!("{before} {email} {after}")));
        metadata.insert("card".into(), Value::String(format!("{before} {card} {after}")));
        metadata.insert("ssn".into(), Value::String(format!("{before} {ssn} {after}")));
        metadata.insert("noise".into(), Value::String(noise));
        let r = redaction();
        r.apply(&mut metadata);
        let out = serde_json::to_string(&metadata).unwrap();
        prop_assert!(!out.contains(&email), "{}", out);
        prop_assert!(!out.contains(&card), "{}", out);
        prop_assert!(!out.contains(&ssn), "{}", out);
        let once = metadata.clone();
        r.apply(&mut metadata);
        prop_assert_eq!(metadata, once);
    }

    #[test]
    fn signatures_bind_time_and_body(secret in proptest::collection::vec(any::<u8>(), 1..64),
                                     unix in 0i64..4_000_000_000,
                                     body in proptest::collection::vec(any::<u8>(), 0..256),
                                     flip in any::<prop::sample::Index>()) {
        let signature = callgate::relay::sign(&secret, unix, &body);
        let prefix = format!("t={},v1=", unix);
        prop_assert!(signature.starts_with(&prefix));
        prop_assert_eq!(&signature, &callgate::relay::sign(&secret, unix, &body));
        prop_assert_ne!(&signature, &callgate::relay::sign(&secret, unix + 1, &body));
        if !body.is_empty() {
            let mut changed = body.clone();
            let i = flip.index(changed.len());
            changed[i] ^= 1;
            prop_assert_ne!(&signature, &callgate::relay::sign(&secret, unix, &changed));
        }
    }
}

/// Arbitrary JSON up to `depth` levels.
fn json(depth: u32) -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        "\\PC{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(depth, 32, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z]{1,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}
