//! The call path end to end: real HTTP to the gateway, the real simulator behind it.

mod support;

use http::{Method, StatusCode};
use serde_json::json;
use support::*;

fn seed() -> serde_json::Value {
    json!({
        "phone_number": "+14155551234",
        "agent_id": "agent_abc123",
        "metadata": {"customer_id": "cust_456", "campaign": "follow_up"}
    })
}

#[tokio::test]
async fn the_seed_request_is_forwarded_with_the_account_key() {
    let gw = TestGateway::start().await;
    let answer = gw.create_call(ACME_KEY, &seed()).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    let call = answer.json();
    assert_eq!(call["status"], "queued");
    assert!(call["id"].as_str().unwrap().starts_with("call_"));
    assert_eq!(call["phone_number"], "+14155551234");
    assert!(answer.headers.contains_key("x-request-id"));

    let received = gw.simulator().received_calls();
    assert_eq!(received.len(), 1);
    let auth = received[0].headers["authorization"].to_str().unwrap();
    assert_eq!(auth, format!("Bearer {ACCOUNT_KEY}"));
    assert!(
        !received[0]
            .body
            .windows(ACME_KEY.len())
            .any(|w| w == ACME_KEY.as_bytes())
    );
    let sent = received[0].json();
    // The tenant's defaults were filled in and its tag added.
    assert_eq!(sent["from_number"], "+18005551234");
    assert_eq!(sent["max_duration"], 600);
    assert_eq!(
        sent["metadata"],
        json!({"customer_id": "cust_456", "campaign": "follow_up", "callgate_tenant": "acme"})
    );
    // The request id travels to the upstream for correlation.
    assert_eq!(
        received[0].headers["x-request-id"],
        answer.headers["x-request-id"]
    );
}

#[tokio::test]
async fn personal_data_is_redacted_before_it_leaves() {
    let gw = TestGateway::start().await;
    let mut body = seed();
    body["metadata"] = json!({
        "customer_id": "cust_456",
        "ssn": "078-05-1120",
        "contact": "ann.lee@example.com",
        "note": "card 4111 1111 1111 1111, ssn 078-05-1120"
    });
    let answer = gw.create_call(ACME_KEY, &body).await;
    assert_eq!(answer.status, StatusCode::OK);
    let sent = gw.simulator().received_calls()[0].json();
    assert_eq!(
        sent["metadata"],
        json!({
            "customer_id": "cust_456",
            "contact": "[redacted:email]",
            "note": "card [redacted:card], ssn [redacted:us_ssn]",
            "callgate_tenant": "acme"
        })
    );
    let raw = String::from_utf8_lossy(&gw.simulator().received_calls()[0].body).to_string();
    for secret in ["078-05-1120", "ann.lee", "4111"] {
        assert!(!raw.contains(secret), "{secret} left the gateway: {raw}");
    }
}

#[tokio::test]
async fn globex_hashes_and_drops_by_its_own_rules() {
    let gw = TestGateway::start().await;
    let body = json!({
        "phone_number": "+12125550123",
        "agent_id": "agent_support",
        "metadata": {"ticket_id": "T-1", "email": "bob@example.com", "date_of_birth": "1990-01-02",
                     "card": "4111111111111111", "callback": "reach me on +1 212 555 0199"}
    });
    let answer = gw.create_call(GLOBEX_KEY, &body).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.json());
    let sent = gw.simulator().received_calls()[0].json();
    let meta = sent["metadata"].as_object().unwrap();
    assert_eq!(meta["ticket_id"], "T-1");
    assert!(meta["email"].as_str().unwrap().starts_with("h:"));
    assert!(!meta.contains_key("date_of_birth"));
    assert!(!meta.contains_key("card"));
    assert_eq!(meta["callback"], "reach me on [redacted:phone]");
    assert_eq!(sent["record"], false);
    assert_eq!(sent["max_duration"], 180);
}

/// One refused request: what it sends and what it must get back.
struct Refusal {
    name: &'static str,
    key: &'static str,
    content_type: &'static str,
    body: Vec<u8>,
    status: u16,
    code: &'static str,
    param: &'static str,
}

fn refusal(
    name: &'static str,
    body: serde_json::Value,
    status: u16,
    code: &'static str,
    param: &'static str,
) -> Refusal {
    Refusal {
        name,
        key: ACME_KEY,
        content_type: "application/json",
        body: body.to_string().into_bytes(),
        status,
        code,
        param,
    }
}

fn with(field: &str, value: serde_json::Value) -> serde_json::Value {
    let mut body = seed();
    body[field] = value;
    body
}

#[tokio::test]
async fn every_stage_refuses_with_its_code_and_nothing_reaches_the_upstream() {
    let gw = TestGateway::start().await;
    let raw = |name, content_type, body: &[u8], status, code, param| Refusal {
        name,
        key: ACME_KEY,
        content_type,
        body: body.to_vec(),
        status,
        code,
        param,
    };
    let deep = format!("{{\"metadata\": {}{}}}", "[".repeat(40), "]".repeat(40));
    let big = format!(
        "{{\"phone_number\": \"+14155551234\", \"agent_id\": \"{}\"}}",
        "a".repeat(70_000)
    );
    let cases = vec![
        Refusal { key: "wrong-key", ..refusal("unknown key", seed(), 401, "unauthorized", "") },
        Refusal { key: "", ..refusal("no key", seed(), 401, "unauthorized", "") },
        raw("text/plain", "text/plain", b"{}", 415, "unsupported_media_type", ""),
        raw("no content type", "", b"{}", 415, "unsupported_media_type", ""),
        raw("too big", "application/json", big.as_bytes(), 413, "payload_too_large", ""),
        raw("not json", "application/json", b"phone_number=+14155551234", 400, "invalid_request", ""),
        raw("invalid utf-8", "application/json", b"{\"phone_number\": \"\xff\xfe\"}", 400, "invalid_request", ""),
        raw("duplicate keys", "application/json",
            br#"{"phone_number": "+14155551234", "agent_id": "agent_abc123", "agent_id": "agent_x"}"#,
            400, "invalid_request", ""),
        raw("deep nesting", "application/json", deep.as_bytes(), 400, "invalid_request", ""),
        raw("empty body", "application/json", b"", 400, "invalid_request", ""),
        refusal("unknown field", with("colour", json!("red")), 400, "invalid_request", "/colour"),
        refusal("missing agent", json!({"phone_number": "+14155551234"}), 400, "invalid_request", "/agent_id"),
        refusal("wrong type", with("record", json!("yes")), 400, "invalid_request", "/record"),
        refusal("duration range", with("max_duration", json!(0)), 400, "invalid_request", "/max_duration"),
        refusal("metadata too big", with("metadata", json!({"k": "x".repeat(2000)})), 400, "invalid_request", "/metadata/k"),
        refusal("not e164", with("phone_number", json!("(415) 555-1234")), 400, "invalid_phone_number", "/phone_number"),
        refusal("invalid in plan", with("phone_number", json!("+10115550123")), 400, "invalid_phone_number", "/phone_number"),
        refusal("bad from syntax", with("from_number", json!("18005551234")), 400, "invalid_from_number", "/from_number"),
        // Every unusable number is one code, whether the schema or the numbering plan finds it.
        refusal("empty number", with("phone_number", json!("")), 400, "invalid_phone_number", "/phone_number"),
        refusal("number not a string", with("phone_number", json!(14155551234u64)), 400, "invalid_phone_number", "/phone_number"),
        refusal("short number", with("phone_number", json!("+1415")), 400, "invalid_phone_number", "/phone_number"),
        refusal("empty from", with("from_number", json!("")), 400, "invalid_from_number", "/from_number"),
        refusal("from not a string", with("from_number", json!(5)), 400, "invalid_from_number", "/from_number"),
        refusal("missing number", json!({"agent_id": "agent_abc123"}), 400, "invalid_request", "/phone_number"),
        refusal("premium rate", with("phone_number", json!("+19005550123")), 403, "destination_not_allowed", "/phone_number"),
        refusal("other country", with("phone_number", json!("+447400123456")), 403, "destination_not_allowed", "/phone_number"),
        refusal("do not call", with("phone_number", json!("+12125550100")), 403, "do_not_call", "/phone_number"),
        refusal("from not allowed", with("from_number", json!("+18005556789")), 400, "invalid_from_number", "/from_number"),
        refusal("agent not allowed", with("agent_id", json!("agent_support")), 404, "agent_not_found", "/agent_id"),
        refusal("over duration cap", with("max_duration", json!(601)), 400, "invalid_request", "/max_duration"),
        refusal("webhook host", with("webhook_url", json!("https://attacker.example/hook")), 400, "invalid_request", "/webhook_url"),
        refusal("reserved tag", with("metadata", json!({"callgate_tenant": "globex"})), 400, "invalid_request", "/metadata/callgate_tenant"),
        Refusal { key: GLOBEX_KEY, ..refusal("required metadata",
            json!({"phone_number": "+12125550123", "agent_id": "agent_support"}), 400, "invalid_request", "/metadata/ticket_id") },
        Refusal { key: GLOBEX_KEY, ..refusal("record forbidden",
            json!({"phone_number": "+12125550123", "agent_id": "agent_support", "record": true, "metadata": {"ticket_id": "1"}}),
            400, "invalid_request", "/record") },
        Refusal { key: GLOBEX_KEY, ..refusal("number type",
            json!({"phone_number": "+18005550199", "agent_id": "agent_support", "metadata": {"ticket_id": "1"}}),
            403, "destination_not_allowed", "/phone_number") },
    ];
    for case in &cases {
        let auth = format!("Bearer {}", case.key);
        let mut headers = vec![];
        if !case.key.is_empty() {
            headers.push(("authorization", auth.as_str()));
        }
        if !case.content_type.is_empty() {
            headers.push(("content-type", case.content_type));
        }
        let answer = gw
            .send(Method::POST, "/v1/calls", &headers, case.body.clone())
            .await;
        assert_eq!(
            answer.status.as_u16(),
            case.status,
            "{}: {:?}",
            case.name,
            answer.json()
        );
        assert_eq!(answer.code(), case.code, "{}", case.name);
        assert_eq!(answer.param(), case.param, "{}", case.name);
        let envelope = answer.json();
        assert!(
            !envelope["error"]["message"].as_str().unwrap().is_empty(),
            "{}",
            case.name
        );
        assert_eq!(
            envelope["error"]["request_id"].as_str().unwrap(),
            answer.headers["x-request-id"].to_str().unwrap(),
            "{}",
            case.name
        );
    }
    assert!(
        gw.simulator().received().is_empty(),
        "a refused request reached the upstream"
    );
}

#[tokio::test]
async fn calling_hours_follow_the_recipients_clock() {
    let gw = TestGateway::start().await;
    let body = json!({"phone_number": "+14155550123", "agent_id": "agent_support", "metadata": {"ticket_id": "1"}});
    // Monday 08:30 in Los Angeles (11:30 in New York): too early for a 415 number.
    gw.clock.set("2026-01-05T16:30:00Z".parse().unwrap());
    let early = gw.create_call(GLOBEX_KEY, &body).await;
    assert_eq!(early.status, StatusCode::FORBIDDEN);
    assert_eq!(early.code(), "outside_calling_hours");
    assert!(gw.simulator().received().is_empty());
    // The same instant is fine for a New York number.
    let ny = json!({"phone_number": "+12125550123", "agent_id": "agent_support", "metadata": {"ticket_id": "1"}});
    assert_eq!(gw.create_call(GLOBEX_KEY, &ny).await.status, StatusCode::OK);
    // 09:00 in Los Angeles opens the window.
    gw.clock.set("2026-01-05T17:00:00Z".parse().unwrap());
    assert_eq!(
        gw.create_call(GLOBEX_KEY, &body).await.status,
        StatusCode::OK
    );
    // Saturday: closed everywhere.
    gw.clock.set("2026-01-10T18:00:00Z".parse().unwrap());
    assert_eq!(
        gw.create_call(GLOBEX_KEY, &ny).await.code(),
        "outside_calling_hours"
    );
    assert_eq!(gw.simulator().received_calls().len(), 2);
}

#[tokio::test]
async fn upstream_errors_pass_through_unchanged() {
    // The simulator's account does not have agent_abc123, though acme's policy allows it.
    let config = config_text(
        &simulator_upstream(),
        "[simulator]\nagents = [\"agent_support\"]\n",
    );
    let gw = TestGateway::start_with_config(&config).await;
    let answer = gw.create_call(ACME_KEY, &seed()).await;
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    assert_eq!(
        answer.json(),
        json!({"error": {"code": "agent_not_found", "message": "the agent_id does not exist"}})
    );
    assert_eq!(gw.simulator().received_calls().len(), 1);
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_502() {
    // Bind, then drop: nothing listens on that port any more.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let upstream = format!("url = \"http://127.0.0.1:{port}\"\napi_key = \"{ACCOUNT_KEY}\"");
    let gw = TestGateway::start_with_config(&config_text(&upstream, "")).await;
    let answer = gw.create_call(ACME_KEY, &seed()).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert_eq!(answer.code(), "upstream_unavailable");
    assert!(!String::from_utf8_lossy(&answer.body).contains(ACCOUNT_KEY));
}

#[tokio::test]
async fn a_hanging_upstream_is_a_504() {
    // Accepts connections and never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let upstream = format!("url = \"http://{addr}\"\napi_key = \"{ACCOUNT_KEY}\"");
    let text =
        config_text(&upstream, "").replace("request_timeout_ms = 2000", "request_timeout_ms = 300");
    let gw = TestGateway::start_with_config(&text).await;
    let answer = gw.create_call(ACME_KEY, &seed()).await;
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(answer.code(), "upstream_timeout");
}

#[tokio::test]
async fn routes_health_and_methods() {
    let gw = TestGateway::start().await;
    let health = gw.send(Method::GET, "/healthz", &[], "").await;
    assert_eq!(health.status, StatusCode::OK);
    let missing = gw.send(Method::GET, "/v2/nothing", &[], "").await;
    assert_eq!(
        (missing.status, missing.code().as_str()),
        (StatusCode::NOT_FOUND, "not_found")
    );
    let method = gw.send(Method::PUT, "/v1/calls", &[], "").await;
    assert_eq!(method.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(method.headers.contains_key("x-request-id"));
    // Each route lists its own methods.
    for (verb, path, allow) in [
        (Method::PUT, "/v1/calls", "GET, POST"),
        (Method::OPTIONS, "/v1/calls/call_123", "GET"),
        (Method::DELETE, "/v1/calls/call_123", "GET"),
        (Method::GET, "/v1/relay/some-token", "POST"),
        (Method::POST, "/healthz", "GET"),
    ] {
        let answer = gw.send(verb.clone(), path, &[], "").await;
        assert_eq!(
            answer.status,
            StatusCode::METHOD_NOT_ALLOWED,
            "{verb} {path}"
        );
        assert_eq!(answer.code(), "method_not_allowed");
        assert_eq!(answer.headers["allow"], allow, "{verb} {path}");
    }
}

#[tokio::test]
async fn a_policy_reload_takes_effect_and_a_bad_one_is_refused() {
    // A private copy of the policies, so the test can edit them.
    let dir = tempfile::tempdir().unwrap();
    let copy = copy_policies(dir.path());
    let text = config_text(&simulator_upstream(), fast_simulator()).replace(
        &repo().join("policies").display().to_string(),
        &copy.display().to_string(),
    );
    let gw = TestGateway::start_with_config(&text).await;
    assert_eq!(
        gw.create_call(ACME_KEY, &seed()).await.status,
        StatusCode::OK
    );

    let acme = copy.join("tenants/acme.toml");
    let original = std::fs::read_to_string(&acme).unwrap();
    std::fs::write(
        &acme,
        original.replace("allow = [\"agent_abc123\"]", "allow = [\"agent_support\"]"),
    )
    .unwrap();
    assert_eq!(gw.gateway.reload_policies().await.unwrap(), 2);
    assert_eq!(
        gw.create_call(ACME_KEY, &seed()).await.code(),
        "agent_not_found"
    );

    std::fs::write(&acme, "id = \"acme\"\nthis is not toml").unwrap();
    let errors = gw.gateway.reload_policies().await.unwrap_err();
    assert!(
        errors[0].to_string().contains("acme.toml:2"),
        "{}",
        errors[0]
    );
    // The last good policies stay in force.
    assert_eq!(
        gw.create_call(ACME_KEY, &seed()).await.code(),
        "agent_not_found"
    );
}
