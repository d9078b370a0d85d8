//! The CPU cost of the request path's policy stages, without the network: what every admitted
//! call pays in the gateway before the upstream sees it.

use std::path::PathBuf;

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;

use callgate::phone;
use callgate::policy::Policies;
use callgate::stages::CreateCall;
use callgate::stages::fields::apply_field_policy;
use callgate::stages::phone::check_destination;
use callgate::stages::validate::{check_schema, parse_strict};

const SEED: &str = r#"{"phone_number": "+14155551234", "agent_id": "agent_abc123",
  "metadata": {"customer_id": "cust_456", "campaign": "follow_up", "email": "ann@example.com",
               "note": "card 4111 1111 1111 1111"}}"#;

fn bench(c: &mut Criterion) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policies");
    let policies = Policies::load(&dir, b"bench").expect("shipped policies load");
    let acme = policies.tenants["acme"].clone();
    let now: jiff::Timestamp = "2026-01-05T17:00:00Z".parse().unwrap();

    c.bench_function("phone::parse_e164 (US)", |b| {
        b.iter(|| phone::parse_e164(black_box("+14155551234")))
    });
    c.bench_function("validate: strict parse + schema", |b| {
        b.iter(|| {
            let v = parse_strict(black_box(SEED.as_bytes()), 16).unwrap();
            check_schema(&policies.schema, &v).unwrap();
        })
    });
    c.bench_function("stages 4-7 on the seed request", |b| {
        b.iter(|| {
            let v = parse_strict(black_box(SEED.as_bytes()), 16).unwrap();
            check_schema(&policies.schema, &v).unwrap();
            let mut call: CreateCall = serde_json::from_value(v).unwrap();
            let to = phone::parse_e164(&call.phone_number).unwrap();
            check_destination(&acme, &to, now).unwrap();
            apply_field_policy(&acme, &mut call).unwrap();
            let meta = call.metadata.get_or_insert_with(Default::default);
            acme.redaction.apply(meta);
            serde_json::to_vec(&call).unwrap()
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
