//! `docs/openapi.yaml` stays in step with what the gateway does: the request schema
//! (`policies/schemas/create_call.json`), every error code, every header it documents.

mod support;

use serde_json::Value;
use support::repo;

fn openapi() -> String {
    std::fs::read_to_string(repo().join("docs/openapi.yaml")).unwrap()
}

/// The lines of the YAML block under `key:` (found after `after`), by indentation.
fn block<'a>(text: &'a str, after: &str, key: &str) -> Vec<&'a str> {
    let start = text.find(after).unwrap_or_else(|| panic!("no {after:?}"));
    let mut lines = text[start..].lines();
    let header = lines
        .find(|l| l.trim_start().starts_with(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key}: after {after:?}"));
    let indent = header.len() - header.trim_start().len();
    let mut out = vec![header];
    for line in lines {
        let i = line.len() - line.trim_start().len();
        if !line.trim().is_empty() && i <= indent {
            break;
        }
        out.push(line);
    }
    out
}

#[test]
fn the_error_codes_are_the_gateways() {
    let text = openapi();
    let enum_block = block(&text, "    ErrorCode:", "enum");
    let listed: Vec<&str> = enum_block[1..]
        .iter()
        .filter_map(|l| l.trim().strip_prefix("- "))
        .collect();
    assert_eq!(listed, callgate::error::GatewayError::CODES);
}

#[test]
fn the_create_call_schema_matches_the_one_enforced() {
    let text = openapi();
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("policies/schemas/create_call.json")).unwrap(),
    )
    .unwrap();
    let create = block(&text, "  schemas:", "CreateCall").join("\n");
    assert!(create.contains("additionalProperties: false"));
    let required: Vec<&str> = schema["required"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert!(
        create.contains(&format!("required: [{}]", required.join(", "))),
        "required {required:?}"
    );
    let properties = schema["properties"].as_object().unwrap();
    let documented: Vec<&str> = block(&create, "properties:", "properties")[1..]
        .iter()
        .filter(|l| l.len() - l.trim_start().len() == 8 && l.trim_end().ends_with(':'))
        .map(|l| l.trim().trim_end_matches(':'))
        .collect();
    let mut enforced: Vec<&str> = properties.keys().map(String::as_str).collect();
    let mut documented_sorted = documented.clone();
    enforced.sort_unstable();
    documented_sorted.sort_unstable();
    assert_eq!(documented_sorted, enforced, "the same fields");
    for (name, rules) in properties {
        let field = block(&create, "properties:", name).join("\n");
        if let Some(kind) = rules["type"].as_str() {
            assert!(
                field.contains(&format!("type: {kind}")),
                "{name}: type {kind}"
            );
        }
        for limit in [
            "minLength",
            "maxLength",
            "minimum",
            "maximum",
            "maxProperties",
        ] {
            if let Some(n) = rules[limit].as_i64() {
                assert!(
                    field.contains(&format!("{limit}: {n}")),
                    "{name}: {limit} {n} in\n{field}"
                );
            }
        }
        if let Some(pattern) = rules["pattern"].as_str() {
            assert!(field.contains(pattern), "{name}: pattern");
        }
    }
}

#[test]
fn the_headers_and_routes_are_documented() {
    let text = openapi();
    assert!(text.starts_with("openapi: 3.1."));
    for header in [
        "Idempotency-Key",
        "Idempotent-Replayed",
        "Retry-After",
        "Callgate-Signature",
        "X-Request-Id",
        "Allow",
        "traceparent",
    ] {
        assert!(text.contains(header), "{header}");
    }
    for route in [
        "/v1/calls:",
        "/v1/calls/{id}:",
        "/v1/relay/{token}:",
        "/healthz:",
        "/readyz:",
        "/metrics:",
        "/admin/tenants:",
        "/admin/tenants/{id}/usage:",
        "/admin/tenants/{id}/budget:",
        "/admin/calls/{id}/release:",
        "/admin/reload:",
    ] {
        assert!(text.contains(&format!("\n  {route}")), "{route}");
    }
}
