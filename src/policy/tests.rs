use std::path::PathBuf;
use std::sync::Arc;

use super::*;

/// The shipped `policies/`, loaded with a fixed hash key.
pub(crate) fn fixture_policies() -> Policies {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policies");
    Policies::load(&dir, b"test-hash-key").unwrap_or_else(|e| {
        panic!("shipped policies do not load: {e:?}");
    })
}

pub(crate) fn globex_tenant() -> Arc<Tenant> {
    fixture_policies().tenants["globex"].clone()
}

/// A policy tree with the shipped schema and the given tenant files.
pub(crate) fn tree(tenants: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let shipped = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policies");
    std::fs::create_dir_all(dir.path().join("schemas")).unwrap();
    std::fs::create_dir_all(dir.path().join("tenants")).unwrap();
    std::fs::create_dir_all(dir.path().join("lists")).unwrap();
    std::fs::copy(
        shipped.join("schemas/create_call.json"),
        dir.path().join("schemas/create_call.json"),
    )
    .unwrap();
    for (name, text) in tenants {
        std::fs::write(dir.path().join("tenants").join(name), text).unwrap();
    }
    dir
}

const MINIMAL: &str = r#"id = "t"
key_sha256 = ["a2fb8545fcd457204e9fee11be92013aa3240b1b146fe262ba608fdfc159041c"]
[agents]
allow = ["agent_abc123"]
"#;

fn errors(tenants: &[(&str, &str)]) -> Vec<String> {
    let dir = tree(tenants);
    Policies::load(dir.path(), b"k")
        .map(|_| Vec::new())
        .unwrap_or_else(|e| e.iter().map(|e| e.to_string()).collect())
}

#[test]
fn shipped_policies_load() {
    let p = fixture_policies();
    assert_eq!(p.tenants.keys().collect::<Vec<_>>(), ["acme", "globex"]);
    assert_eq!(p.tenant_for_key("demo-acme-key").unwrap().id, "acme");
    assert!(p.tenant_for_key("demo-acme-key ").is_none());
}

#[test]
fn a_minimal_tenant_loads() {
    assert!(errors(&[("t.toml", MINIMAL)]).is_empty());
}

#[test]
fn errors_name_file_line_and_reason() {
    let bad = MINIMAL.replace("[agents]", "[numbers]\nfrom_allow = [\"+1800\"]\n[agents]");
    let errs = errors(&[("t.toml", &bad)]);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].contains("t.toml:4:"), "{errs:?}");
    assert!(errs[0].contains("from_allow"), "{errs:?}");

    let typo = format!("{MINIMAL}[calls]\nmax_durration = 5\n");
    let errs = errors(&[("t.toml", &typo)]);
    assert!(
        errs[0].contains("t.toml:6:") && errs[0].contains("max_durration"),
        "{errs:?}"
    );

    let syntax = format!("{MINIMAL}[calls\n");
    assert!(errors(&[("t.toml", &syntax)])[0].contains("t.toml:5:"));
}

#[test]
fn semantic_mistakes_are_caught() {
    let cases = [
        MINIMAL.replace("a2fb", "zzzz"),
        MINIMAL.replace("\"agent_abc123\"", ""),
        format!("{MINIMAL}[calls]\nmax_duration = 7200\n"),
        format!("{MINIMAL}[destinations]\ncountries_allow = [\"USA\"]\n"),
        format!("{MINIMAL}[destinations]\nnumber_types_deny = [\"premium\"]\n"),
        format!("{MINIMAL}[destinations]\ndo_not_call = [\"lists/missing.txt\"]\n"),
        format!("{MINIMAL}[hours]\nstart = \"9am\"\nend = \"20:00\"\n"),
        format!("{MINIMAL}[webhooks]\nallowed_hosts = [\"https://x.example/\"]\nsecret = \"s\"\n"),
        format!("{MINIMAL}[webhooks]\nallowed_hosts = [\"x.example\"]\n"),
        format!("{MINIMAL}[limits]\nmax_concurrent_calls = 0\n"),
        format!("{MINIMAL}[budget]\ntimezone = \"Mars/Olympus\"\n"),
        format!("{MINIMAL}[[redaction.patterns]]\nkind = \"regex\"\npattern = \"(\"\n"),
        format!("{MINIMAL}[numbers]\nfrom_default = \"+18005551234\"\n"),
    ];
    for case in cases {
        assert_eq!(errors(&[("t.toml", &case)]).len(), 1, "{case}");
    }
}

#[test]
fn duplicate_ids_and_keys_are_refused() {
    let errs = errors(&[("a.toml", MINIMAL), ("b.toml", MINIMAL)]);
    assert!(
        errs.iter().any(|e| e.contains("used by another file")),
        "{errs:?}"
    );
    let other = MINIMAL.replace("id = \"t\"", "id = \"u\"");
    let errs = errors(&[("a.toml", MINIMAL), ("b.toml", &other)]);
    assert!(
        errs.iter().any(|e| e.contains("key hash is shared")),
        "{errs:?}"
    );
}

#[test]
fn do_not_call_lists_report_bad_lines() {
    let dir = tree(&[(
        "t.toml",
        &format!("{MINIMAL}[destinations]\ndo_not_call = [\"lists/dnc.txt\"]\n"),
    )]);
    std::fs::write(
        dir.path().join("lists/dnc.txt"),
        "# c\n+12125550100\n212-555-0100\n",
    )
    .unwrap();
    let errs = Policies::load(dir.path(), b"k").unwrap_err();
    assert!(errs[0].to_string().contains("dnc.txt:3"), "{}", errs[0]);
}

#[test]
fn webhook_host_patterns() {
    let p = WebhookPolicy {
        allowed_hosts: vec!["hooks.acme.example".into(), "*.globex.example".into()],
        ..Default::default()
    };
    assert!(p.allows_host("hooks.acme.example"));
    assert!(p.allows_host("HOOKS.acme.example"));
    assert!(p.allows_host("a.globex.example"));
    assert!(!p.allows_host("globex.example"));
    assert!(!p.allows_host("evilglobex.example"));
    assert!(!p.allows_host("hooks.acme.example.evil"));
}

#[test]
fn debug_output_shows_no_key_secret_or_personal_data() {
    let policies = Arc::new(fixture_policies());
    let acme = policies.tenants["acme"].clone();
    let shown = format!("{acme:?}");
    assert!(
        shown.contains("acme") && shown.contains("[redacted]"),
        "{shown}"
    );
    // Neither the webhook secret, nor the key hash, nor the redaction hash key (b"test...").
    for secret in [
        "whsec_demo_acme_not_for_production",
        "a2fb8545",
        "116, 101, 115, 116",
    ] {
        assert!(!shown.contains(secret), "{secret} in {shown}");
    }
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::AUTHORIZATION,
        http::HeaderValue::from_static("Bearer demo-acme-key"),
    );
    let body = bytes::Bytes::from_static(
        br#"{"phone_number":"+14155551234","metadata":{"email":"ann@example.com"}}"#,
    );
    let mut request = crate::stages::CallRequest::new(
        "req-1".into(),
        tracing::Span::none(),
        headers,
        body,
        policies,
    );
    request.tenant = Some(acme);
    request.reservation = Some(crate::stages::admission::Reservation {
        tenant: "acme".into(),
        id: "res-1".into(),
        token: "res-1.relay-secret".into(),
        max_duration: 60,
        destination: "+14155551234".into(),
        attempts: Vec::new(),
    });
    let shown = format!("{request:?}");
    assert!(
        shown.contains("req-1") && shown.contains("res-1"),
        "{shown}"
    );
    for secret in [
        "demo-acme-key",
        "ann@example.com",
        "+14155551234",
        "relay-secret",
    ] {
        assert!(!shown.contains(secret), "{secret} in {shown}");
    }
}
