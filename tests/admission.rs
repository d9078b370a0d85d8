//! Admission, accounting and the call lifecycle: exact under bursts, nothing leaks on faults.

mod support;

use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::json;
use support::*;

const KEY: &str = "test-tenant-key";

fn call(max_duration: u32) -> serde_json::Value {
    json!({"phone_number": "+14155551234", "agent_id": "agent_abc123", "max_duration": max_duration})
}

/// A simulator whose calls stay up for a minute, so slots stay taken during a test.
const LONG_CALLS: &str = "[simulator]\nqueue_ms = 20\nring_ms = 20\ntalk_ms = 60000\n";

async fn burst(gw: &TestGateway, key: &str, n: usize, body: serde_json::Value) -> Vec<Answer> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let client = gw.client.clone();
        let addr = gw.addr();
        let body = body.to_string();
        let auth = format!("Bearer {key}");
        tasks.push(tokio::spawn(async move {
            send(
                &client,
                addr,
                Method::POST,
                "/v1/calls",
                &[
                    ("authorization", &auth),
                    ("content-type", "application/json"),
                ],
                body,
            )
            .await
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

fn count(answers: &[Answer], status: StatusCode) -> usize {
    answers.iter().filter(|a| a.status == status).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_admits_exactly_the_concurrency_limit() {
    let tenant = tenant_file("burst", KEY, "[limits]\nmax_concurrent_calls = 7\n");
    let gw = TestGateway::start_custom(&[("burst.toml", tenant)], LONG_CALLS).await;
    let answers = burst(&gw, KEY, 200, call(120)).await;
    assert_eq!(count(&answers, StatusCode::OK), 7);
    assert_eq!(count(&answers, StatusCode::TOO_MANY_REQUESTS), 193);
    assert!(
        answers
            .iter()
            .filter(|a| a.status == StatusCode::TOO_MANY_REQUESTS)
            .all(|a| a.code() == "rate_limit_exceeded")
    );
    assert_eq!(gw.simulator().received_calls().len(), 7);
    let usage = gw.usage("burst").await;
    assert_eq!((usage.slots, usage.holds, usage.spent), (7, 14, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_admits_exactly_what_the_budget_affords() {
    // Each 120 s call holds 2 credits; 19 credits afford 9 holds.
    let tenant = tenant_file("budget", KEY, "[budget]\ncredits = 19\nperiod = \"none\"\n");
    let gw = TestGateway::start_custom(&[("budget.toml", tenant)], LONG_CALLS).await;
    let answers = burst(&gw, KEY, 200, call(120)).await;
    assert_eq!(count(&answers, StatusCode::OK), 9);
    assert_eq!(count(&answers, StatusCode::PAYMENT_REQUIRED), 191);
    assert!(
        answers
            .iter()
            .filter(|a| a.status == StatusCode::PAYMENT_REQUIRED)
            .all(|a| a.code() == "insufficient_credits")
    );
    let usage = gw.usage("budget").await;
    assert_eq!((usage.slots, usage.holds), (9, 18));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_account_wide_cap_is_shared_by_all_tenants() {
    let a = tenant_file("a", "key-a", "");
    let b = tenant_file("b", "key-b", "");
    let extra = format!("{LONG_CALLS}[admission]\naccount_max_concurrent_calls = 4\n");
    let gw = TestGateway::start_custom(&[("a.toml", a), ("b.toml", b)], &extra).await;
    let (ra, rb) = tokio::join!(
        burst(&gw, "key-a", 30, call(60)),
        burst(&gw, "key-b", 30, call(60))
    );
    assert_eq!(count(&ra, StatusCode::OK) + count(&rb, StatusCode::OK), 4);
    let refused = ra
        .iter()
        .chain(&rb)
        .find(|a| a.status == StatusCode::TOO_MANY_REQUESTS)
        .unwrap();
    assert!(
        refused.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("shared account")
    );
}

#[tokio::test]
async fn the_rate_limit_counts_only_admissible_requests_and_says_when_to_retry() {
    let tenant = tenant_file("rl", KEY, "[limits]\nrequests_per_minute = 60\nburst = 2\n");
    let gw = TestGateway::start_custom(&[("rl.toml", tenant)], fast_simulator()).await;
    // Refused by earlier stages: they must not use the allowance.
    for _ in 0..5 {
        let bad = gw
            .create_call(
                KEY,
                &json!({"phone_number": "+1415", "agent_id": "agent_abc123"}),
            )
            .await;
        assert_eq!(bad.code(), "invalid_phone_number");
    }
    assert_eq!(gw.create_call(KEY, &call(60)).await.status, StatusCode::OK);
    assert_eq!(gw.create_call(KEY, &call(60)).await.status, StatusCode::OK);
    let limited = gw.create_call(KEY, &call(60)).await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(limited.code(), "rate_limit_exceeded");
    assert_eq!(limited.headers["retry-after"], "1");
    // A rate-limited request took no slot and no hold.
    assert_eq!(gw.usage("rl").await.slots, 2);
    gw.clock.advance(Duration::from_secs(1));
    assert_eq!(gw.create_call(KEY, &call(60)).await.status, StatusCode::OK);
}

#[tokio::test]
async fn refused_requests_take_nothing() {
    let tenant = tenant_file(
        "t",
        KEY,
        "[limits]\nmax_concurrent_calls = 1\n[budget]\ncredits = 100\n",
    );
    let gw = TestGateway::start_custom(&[("t.toml", tenant)], LONG_CALLS).await;
    for body in [
        json!({"phone_number": "+10115550123", "agent_id": "agent_abc123"}),
        json!({"phone_number": "+14155551234", "agent_id": "agent_nope"}),
        json!({"phone_number": "+14155551234", "agent_id": "agent_abc123", "max_duration": 0}),
    ] {
        assert!(gw.create_call(KEY, &body).await.status.is_client_error());
    }
    assert_eq!(gw.usage("t").await, callgate::state::Usage::default());
    assert!(gw.simulator().received().is_empty());
}

#[tokio::test]
async fn the_final_event_settles_the_actual_duration() {
    // Talks 1.1 s: 2 s billed per started second at 3 credits = 6; the hold was 60 x 3 = 180.
    let tenant = tenant_file(
        "t",
        KEY,
        "[budget]\ncredits = 1000\nprice_per_increment = 3\nincrement_secs = 1\n",
    );
    let sim = "[simulator]\nqueue_ms = 10\nring_ms = 10\ntalk_ms = 1100\n";
    let gw = TestGateway::start_custom(&[("t.toml", tenant)], sim).await;
    let answer = gw.create_call(KEY, &call(60)).await;
    assert_eq!(answer.status, StatusCode::OK);
    let id = answer.json()["id"].as_str().unwrap().to_string();
    assert_eq!(gw.usage("t").await.holds, 180);
    let usage = gw.wait_usage("t", |u| u.slots == 0).await;
    assert_eq!((usage.slots, usage.holds, usage.spent), (0, 0, 6));
    let read = gw
        .send(
            Method::GET,
            &format!("/v1/calls/{id}"),
            &[("authorization", &format!("Bearer {KEY}"))],
            "",
        )
        .await;
    assert_eq!(read.json()["status"], "completed");
    assert_eq!(read.json()["duration"], 2);
}

#[tokio::test]
async fn events_are_relayed_signed_to_the_tenants_webhook() {
    let hook = Receiver::start().await;
    let tenant = tenant_file(
        "t",
        KEY,
        "[webhooks]\nallowed_hosts = [\"127.0.0.1\"]\nallow_http = true\nsecret = \"whsec_test\"\n",
    );
    let gw = TestGateway::start_custom(&[("t.toml", tenant)], fast_simulator()).await;
    let mut body = call(60);
    body["webhook_url"] = json!(hook.url("/hooks/calls"));
    let answer = gw.create_call(KEY, &body).await;
    assert_eq!(answer.status, StatusCode::OK);
    // The upstream was given the relay, not the tenant's URL.
    let sent = gw.simulator().received_calls()[0].json();
    let relay_url = sent["webhook_url"].as_str().unwrap();
    assert!(
        relay_url.starts_with(&format!("http://{}/v1/relay/", gw.addr())),
        "{relay_url}"
    );
    assert!(!relay_url.contains("hooks/calls"));

    let events = hook.wait_for(3, Duration::from_secs(10)).await;
    let statuses: Vec<_> = events
        .iter()
        .map(|e| e["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["ringing", "in_progress", "completed"]);
    for (headers, body) in hook.events.lock().unwrap().iter() {
        let signature = headers["callgate-signature"].to_str().unwrap();
        let t: i64 = signature
            .split(',')
            .next()
            .unwrap()
            .trim_start_matches("t=")
            .parse()
            .unwrap();
        assert_eq!(signature, callgate::relay::sign(b"whsec_test", t, body));
    }
}

#[tokio::test]
async fn events_with_a_bad_token_change_nothing() {
    let gw = TestGateway::start_custom(&[("t.toml", tenant_file("t", KEY, ""))], LONG_CALLS).await;
    let answer = gw.create_call(KEY, &call(60)).await;
    let call_id = answer.json()["id"].as_str().unwrap().to_string();
    let before = gw.usage("t").await;
    let forged = json!({"call_id": call_id, "status": "completed", "duration": 1}).to_string();
    for token in ["0".repeat(64), "nope".into(), String::new()] {
        let path = format!("/v1/relay/{token}");
        let r = gw
            .send(
                Method::POST,
                &path,
                &[("content-type", "application/json")],
                forged.clone(),
            )
            .await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{token}");
    }
    assert_eq!(gw.usage("t").await, before);
    // Another call's token cannot end this call.
    let other = gw.create_call(KEY, &call(60)).await;
    assert_eq!(other.status, StatusCode::OK);
    let relay = gw.simulator().received_calls()[1].json()["webhook_url"]
        .as_str()
        .unwrap()
        .to_string();
    let path = relay
        .split_once(&gw.addr().to_string())
        .unwrap()
        .1
        .to_string();
    let r = gw
        .send(
            Method::POST,
            &path,
            &[("content-type", "application/json")],
            forged,
        )
        .await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(gw.usage("t").await.slots, 2);
}

#[tokio::test]
async fn an_expired_lease_frees_the_slot_and_charges_the_full_hold() {
    // Events go to a closed port: the gateway never hears from the call.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let extra = format!(
        "{LONG_CALLS}[relay]\npublic_url = \"http://{closed}\"\n[admission]\nlease_grace_secs = 30\n"
    );
    let tenant = tenant_file("t", KEY, "[budget]\ncredits = 100\n");
    let gw = TestGateway::start_custom(&[("t.toml", tenant)], &extra).await;
    assert_eq!(gw.create_call(KEY, &call(120)).await.status, StatusCode::OK);
    gw.clock.advance(Duration::from_secs(149));
    assert_eq!(gw.gateway.sweep_now().await.unwrap(), 0);
    assert_eq!(gw.usage("t").await.slots, 1);
    gw.clock.advance(Duration::from_secs(2));
    assert_eq!(gw.gateway.sweep_now().await.unwrap(), 1);
    let usage = gw.usage("t").await;
    assert_eq!((usage.slots, usage.holds, usage.spent), (0, 0, 2));
}

#[tokio::test]
async fn the_reconciler_settles_quiet_calls_from_the_upstream() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let extra = format!(
        "[simulator]\nqueue_ms = 10\nring_ms = 10\ntalk_ms = 300\n[relay]\npublic_url = \"http://{closed}\"\n\
         [reconcile]\nenabled = true\nquiet_after_secs = 60\ninterval_ms = 3600000\nrefresh_on_read = false\n"
    );
    let tenant = tenant_file("t", KEY, "[budget]\ncredits = 100\n");
    let gw = TestGateway::start_custom(&[("t.toml", tenant)], &extra).await;
    assert_eq!(gw.create_call(KEY, &call(600)).await.status, StatusCode::OK);
    // Not quiet yet by the gateway's clock: nothing is asked.
    assert_eq!(gw.gateway.reconcile_now().await.unwrap(), 0);
    // The simulated call ends (real time); by the gateway's clock it has been quiet for a minute.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while gw.simulator().active_calls() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw.clock.advance(Duration::from_secs(61));
    assert_eq!(gw.gateway.reconcile_now().await.unwrap(), 1);
    let usage = gw.usage("t").await;
    // Settled from the upstream's duration (1 s: one started minute), not the 10-credit hold.
    assert_eq!((usage.slots, usage.holds, usage.spent), (0, 0, 1));
}

/// Every event of the call is lost, and it is not quiet long enough to be asked about; but its
/// lease is about to end, which would charge the full hold: the reconciler asks first, and the
/// call is charged what it used.
#[tokio::test]
async fn a_call_about_to_lapse_is_reconciled_before_its_lease_ends() {
    let extra = "[simulator]\nqueue_ms = 10\nring_ms = 10\ntalk_ms = 300\n\
         [simulator.faults]\nlost_event_rate = 1.0\n\
         [admission]\nlease_grace_secs = 30\n\
         [reconcile]\nenabled = true\nquiet_after_secs = 100000\ninterval_ms = 10000\nrefresh_on_read = false\n";
    let tenant = tenant_file("t", KEY, "[budget]\ncredits = 100\n");
    let gw = TestGateway::start_custom(&[("t.toml", tenant)], extra).await;
    assert_eq!(gw.create_call(KEY, &call(60)).await.status, StatusCode::OK);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while gw.simulator().active_calls() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Its lease ends at 60 s + 30 s of grace; the look-ahead is two rounds (20 s).
    assert_eq!(gw.gateway.reconcile_now().await.unwrap(), 0);
    gw.clock.advance(Duration::from_secs(75));
    assert_eq!(gw.gateway.reconcile_now().await.unwrap(), 1);
    let usage = gw.usage("t").await;
    // One started minute, not the hold (also one minute here, so check the status too).
    assert_eq!((usage.slots, usage.holds, usage.spent), (0, 0, 1));
    let listed = gw
        .send(
            Method::GET,
            "/v1/calls",
            &[("authorization", &format!("Bearer {KEY}"))],
            "",
        )
        .await;
    assert_eq!(listed.json()["data"][0]["status"], "completed");
}

#[tokio::test]
async fn upstream_refusals_release_the_slot_and_the_hold() {
    let refused = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    // The request never went out, or the upstream answered: no call was placed.
    let hang = broken_upstream(Broken::Hang).await;
    let cases = [
        (
            "refuses connections",
            format!("http://{refused}"),
            "upstream_unavailable",
        ),
        // Connected, but the TLS handshake never completes: nothing went out by the timeout.
        (
            "stalls in the TLS handshake",
            format!("https://{hang}"),
            "upstream_unavailable",
        ),
        (
            "answers 500",
            format!("http://{}", broken_upstream(Broken::Status500).await),
            "internal",
        ),
        // A refusal whose body is cut short is still a refusal: its status is relayed.
        (
            "answers 500 and resets mid-body",
            format!(
                "http://{}",
                broken_upstream(Broken::Status500CutShort).await
            ),
            "",
        ),
    ];
    for (name, url, code) in cases {
        let upstream = format!("url = \"{url}\"\napi_key = \"{ACCOUNT_KEY}\"");
        let tenant = tenant_file(
            "t",
            KEY,
            "[limits]\nmax_concurrent_calls = 1\n[budget]\ncredits = 100\n",
        );
        let text_tenants = [("t.toml", tenant)];
        let gw = TestGateway::start_custom_upstream(&text_tenants, &upstream, "").await;
        let answer = gw.create_call(KEY, &call(60)).await;
        assert!(answer.status.is_server_error(), "{name}: {}", answer.status);
        if !code.is_empty() {
            assert_eq!(answer.code(), code, "{name}");
        }
        let usage = gw.usage("t").await;
        assert_eq!((usage.slots, usage.holds, usage.spent), (0, 0, 0), "{name}");
        // And the slot really is free again.
        let again = gw.create_call(KEY, &call(60)).await;
        assert_ne!(again.status, StatusCode::TOO_MANY_REQUESTS, "{name}");
    }
}

/// The request went out and no answer came back: the upstream may have placed the call, so
/// the slot and the hold stay until its events or its lease settle it (a call running with no
/// slot and no charge would be a credit slipped).
#[tokio::test]
async fn a_lost_answer_keeps_the_slot_and_the_hold_until_the_lease() {
    let cases = [
        ("hangs past the timeout", Broken::Hang, "upstream_timeout"),
        (
            "resets mid-response",
            Broken::ResetMidResponse,
            "upstream_connection_lost",
        ),
    ];
    for (name, mode, code) in cases {
        let addr = broken_upstream(mode).await;
        let upstream = format!("url = \"http://{addr}\"\napi_key = \"{ACCOUNT_KEY}\"");
        let tenant = tenant_file(
            "t",
            KEY,
            "[limits]\nmax_concurrent_calls = 1\n[budget]\ncredits = 100\n",
        );
        let extra = "[admission]\nlease_grace_secs = 5\n";
        let gw = TestGateway::start_custom_upstream(&[("t.toml", tenant)], &upstream, extra).await;
        let answer = gw.create_call(KEY, &call(60)).await;
        assert_eq!(answer.code(), code, "{name}");
        assert!(
            answer.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("may have been placed"),
            "{name}: {}",
            answer.json()
        );
        let usage = gw.usage("t").await;
        assert_eq!((usage.slots, usage.holds, usage.spent), (1, 1, 0), "{name}");
        let again = gw.create_call(KEY, &call(60)).await;
        assert_eq!(again.status, StatusCode::TOO_MANY_REQUESTS, "{name}");
        // No event ever comes: the lease (max_duration + upstream timeout + grace) ends it at
        // the full hold, the rule for a call the gateway cannot follow.
        gw.clock.advance(Duration::from_secs(60 + 2 + 5 + 1));
        assert_eq!(gw.gateway.sweep_now().await.unwrap(), 1, "{name}");
        let usage = gw.usage("t").await;
        assert_eq!((usage.slots, usage.holds, usage.spent), (0, 0, 1), "{name}");
    }
}

/// The simulator places the call and holds its answer back past the gateway's timeout: the
/// client is told `upstream_timeout`, the call's events (they carry the reservation's relay
/// token) bind it, and it is settled at its real duration. A retry with the same
/// Idempotency-Key is told the same, and places nothing.
#[tokio::test]
async fn a_call_whose_answer_was_lost_is_found_by_its_events_and_charged_once() {
    let tenant = tenant_file(
        "t",
        KEY,
        "[limits]\nmax_concurrent_calls = 1\n[budget]\ncredits = 1000\nprice_per_increment = 3\nincrement_secs = 1\n",
    );
    let sim = "[simulator]\nqueue_ms = 10\nring_ms = 10\ntalk_ms = 1100\n\
               [simulator.faults]\nhang_rate = 1.0\nhang_ms = 1500\n";
    let gw = TestGateway::start_custom_upstream(
        &[("t.toml", tenant)],
        &format!("{}\nrequest_timeout_ms = 400", simulator_upstream()),
        sim,
    )
    .await;
    let answer = gw.create_call_keyed(KEY, "order-7", &call(60)).await;
    assert_eq!(answer.code(), "upstream_timeout");
    let retry = gw.create_call_keyed(KEY, "order-7", &call(60)).await;
    assert_eq!(retry.code(), "upstream_timeout");
    assert_eq!(retry.headers["idempotent-replayed"], "true");
    assert_eq!(gw.simulator().received_calls().len(), 1);
    // Talks 1.1 s: 2 started seconds at 3 credits, not the hold of 180.
    let usage = gw.wait_usage("t", |u| u.slots == 0).await;
    assert_eq!((usage.slots, usage.holds, usage.spent), (0, 0, 6));
    let ledger = gw.simulator().ledger();
    let placed = &ledger["calls"][0];
    assert_eq!(placed["trail"]["answer"], "withheld");
    let listed = gw
        .send(
            Method::GET,
            "/v1/calls",
            &[("authorization", &format!("Bearer {KEY}"))],
            "",
        )
        .await;
    let calls = listed.json()["data"].clone();
    assert_eq!(calls.as_array().map(Vec::len), Some(1), "{listed:?}");
    assert_eq!(calls[0]["id"], placed["id"]);
    assert_eq!(calls[0]["status"], "completed");
}

#[tokio::test]
async fn a_client_that_disconnects_mid_request_leaves_nothing_behind() {
    let addr = broken_upstream(Broken::SlowStatus500).await;
    let upstream = format!("url = \"http://{addr}\"\napi_key = \"{ACCOUNT_KEY}\"");
    let tenant = tenant_file("t", KEY, "[budget]\ncredits = 100\n");
    let gw = TestGateway::start_custom_upstream(&[("t.toml", tenant)], &upstream, "").await;
    // Mid-body: the client sends half its body and goes away.
    {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
        s.write_all(format!("POST /v1/calls HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEY}\r\ncontent-type: application/json\r\ncontent-length: 200\r\n\r\n{{\"phone_number\":").as_bytes()).await.unwrap();
    }
    // After admission, while the upstream is slow: the client gives up.
    let gave_up =
        tokio::time::timeout(Duration::from_millis(300), gw.create_call(KEY, &call(60))).await;
    assert!(gave_up.is_err());
    // The exchange goes on without the client; the upstream's refusal (a 500 after 1 s) frees
    // the slot and the hold.
    let usage = gw.wait_usage("t", |u| u.slots == 0).await;
    assert_eq!((usage.slots, usage.holds, usage.spent), (0, 0, 0));
}

#[tokio::test]
async fn idempotent_retries_place_one_call() {
    let gw = TestGateway::start_custom(&[("t.toml", tenant_file("t", KEY, ""))], LONG_CALLS).await;
    let send_with = |key: &'static str, body: serde_json::Value| {
        let gw = &gw;
        async move { gw.create_call_keyed(KEY, key, &body).await }
    };
    let first = send_with("order-1", call(60)).await;
    assert_eq!(first.status, StatusCode::OK);
    assert!(!first.headers.contains_key("idempotent-replayed"));
    // The same body with other whitespace and key order is the same request.
    let retry = send_with(
        "order-1",
        json!({"max_duration": 60, "agent_id": "agent_abc123", "phone_number": "+14155551234"}),
    )
    .await;
    assert_eq!(retry.status, StatusCode::OK);
    assert_eq!(retry.headers["idempotent-replayed"], "true");
    assert_eq!(retry.json()["id"], first.json()["id"]);
    let conflict = send_with("order-1", call(61)).await;
    assert_eq!(
        (conflict.status, conflict.code().as_str()),
        (StatusCode::CONFLICT, "idempotency_conflict")
    );
    assert_eq!(gw.simulator().received_calls().len(), 1);

    // Ten at once with a new key: one call, ten identical answers.
    let answers =
        futures_util::future::join_all((0..10).map(|_| send_with("order-2", call(60)))).await;
    let ids: std::collections::HashSet<_> = answers
        .iter()
        .map(|a| a.json()["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    assert_eq!(gw.simulator().received_calls().len(), 2);
    assert_eq!(gw.usage("t").await.slots, 2);
    let bad = send_with("", call(60)).await;
    assert_eq!(bad.code(), "invalid_request");
}

#[tokio::test]
async fn idempotency_keys_are_per_tenant_and_retryable_failures_free_them() {
    let a = tenant_file("a", "key-a", "[limits]\nmax_concurrent_calls = 1\n");
    let b = tenant_file("b", "key-b", "");
    let gw = TestGateway::start_custom(&[("a.toml", a), ("b.toml", b)], LONG_CALLS).await;
    let with_key = |key: &'static str, tenant_key: &'static str| {
        let gw = &gw;
        async move { gw.create_call_keyed(tenant_key, key, &call(60)).await }
    };
    let a1 = with_key("same", "key-a").await;
    let b1 = with_key("same", "key-b").await;
    assert_ne!(a1.json()["id"], b1.json()["id"]);
    // Tenant a is at its limit: 429, and the key is not burnt.
    let limited = with_key("next", "key-a").await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(gw.usage("a").await.slots, 1);
    // Free a's slot by ending its call through the lease, then retry the same key.
    gw.clock.advance(Duration::from_secs(60 + 121));
    gw.gateway.sweep_now().await.unwrap();
    let retried = with_key("next", "key-a").await;
    assert_eq!(retried.status, StatusCode::OK);
    assert!(!retried.headers.contains_key("idempotent-replayed"));
}

#[tokio::test]
async fn tenants_read_only_their_own_calls() {
    let a = tenant_file("a", "key-a", "");
    let b = tenant_file("b", "key-b", "");
    let gw = TestGateway::start_custom(&[("a.toml", a), ("b.toml", b)], LONG_CALLS).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            gw.create_call("key-a", &call(60)).await.json()["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    let b_id = gw.create_call("key-b", &call(60)).await.json()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let get = |key: &str, path: String| {
        let auth = format!("Bearer {key}");
        let gw = &gw;
        async move {
            gw.send(Method::GET, &path, &[("authorization", &auth)], "")
                .await
        }
    };
    let own = get("key-a", format!("/v1/calls/{}", ids[0])).await;
    assert_eq!(own.status, StatusCode::OK);
    assert_eq!(own.json()["id"], ids[0].as_str());
    let foreign = get("key-a", format!("/v1/calls/{b_id}")).await;
    let missing = get("key-a", "/v1/calls/call_does_not_exist".into()).await;
    assert_eq!(foreign.status, StatusCode::NOT_FOUND);
    assert_eq!(
        foreign.json()["error"]["message"],
        missing.json()["error"]["message"]
    );
    assert_eq!(foreign.code(), missing.code());
    assert_eq!(
        get("nobody", format!("/v1/calls/{b_id}")).await.status,
        StatusCode::UNAUTHORIZED
    );

    let page1 = get("key-a", "/v1/calls?limit=2".into()).await.json();
    assert_eq!(page1["data"].as_array().unwrap().len(), 2);
    assert_eq!(page1["has_more"], true);
    assert_eq!(page1["data"][0]["id"], ids[2].as_str());
    let cursor = page1["next_cursor"].as_str().unwrap();
    let page2 = get("key-a", format!("/v1/calls?limit=2&cursor={cursor}"))
        .await
        .json();
    assert_eq!(page2["data"].as_array().unwrap().len(), 1);
    assert_eq!(page2["data"][0]["id"], ids[0].as_str());
    assert_eq!(page2["has_more"], false);
    let listed_b = get("key-b", "/v1/calls".into()).await.json();
    assert_eq!(listed_b["data"].as_array().unwrap().len(), 1);
    assert_eq!(
        get("key-a", "/v1/calls?limit=1000".into()).await.code(),
        "invalid_request"
    );
}

#[tokio::test]
async fn the_example_acme_tenant_allows_five_concurrent_calls() {
    let gw = TestGateway::start_with_config(&config_text(&simulator_upstream(), LONG_CALLS)).await;
    let answers = burst(
        &gw,
        ACME_KEY,
        8,
        json!({"phone_number": "+14155551234", "agent_id": "agent_abc123"}),
    )
    .await;
    assert_eq!(count(&answers, StatusCode::OK), 5);
    let usage = gw.usage("acme").await;
    // Five 600 s holds of 10 credits; the monthly 1000 afford at least 20 such calls.
    assert_eq!((usage.slots, usage.holds), (5, 50));
    let policies = callgate::policy::Policies::load(&repo().join("policies"), b"k").unwrap();
    let acme = &policies.tenants["acme"];
    let hold = acme.budget.hold_for(acme.default_max_duration, Some("US"));
    assert!(acme.budget.credits.unwrap() / hold >= 20);
}

/// A saturated store (its writer held up by another process's write lock, its queue full) turns
/// new calls away with `503 gateway_overloaded` and `Retry-After`, and takes nothing for them:
/// every call answered 200 reached the simulator and holds a slot; no other did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_store_answers_503_and_takes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("state.db");
    let tenant = tenant_file("t", KEY, "");
    let extra = format!(
        "{LONG_CALLS}\n[state]\npath = \"{}\"\nqueue_capacity = 2\n",
        db.display()
    );
    let gw = TestGateway::start_custom(&[("t.toml", tenant)], &extra).await;
    let blocker = rusqlite::Connection::open(&db).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let (answers, ()) = tokio::join!(burst(&gw, KEY, 30, call(120)), async {
        tokio::time::sleep(Duration::from_millis(700)).await;
        blocker.execute_batch("COMMIT").unwrap();
    });
    let ok = count(&answers, StatusCode::OK);
    let overloaded: Vec<_> = answers
        .iter()
        .filter(|a| a.status == StatusCode::SERVICE_UNAVAILABLE)
        .collect();
    let others: Vec<_> = answers
        .iter()
        .filter(|a| a.status != StatusCode::OK && a.status != StatusCode::SERVICE_UNAVAILABLE)
        .map(|a| (a.status, a.code()))
        .collect();
    assert!(others.is_empty(), "{others:?}");
    assert!(!overloaded.is_empty() && ok > 0, "{ok} admitted");
    for answer in &overloaded {
        assert_eq!(answer.code(), "gateway_overloaded");
        assert_eq!(answer.headers["retry-after"], "1");
    }
    assert_eq!(gw.simulator().received_calls().len(), ok);
    assert_eq!(gw.usage("t").await.slots, ok as i64);
    // Every call answered 200 can be read back at once (its bind is queued before the answer).
    for answer in answers.iter().filter(|a| a.status == StatusCode::OK) {
        let id = answer.json()["id"].as_str().unwrap().to_string();
        let auth = format!("Bearer {KEY}");
        let path = format!("/v1/calls/{id}");
        let read = gw
            .send(Method::GET, &path, &[("authorization", &auth)], "")
            .await;
        assert_eq!(read.status, StatusCode::OK, "{id}");
    }
}

/// What [`upstream_hanging_on_lookups`] has seen.
#[derive(Default)]
struct Seen {
    calls: std::sync::atomic::AtomicU64,
    lookups: std::sync::atomic::AtomicU64,
}

/// An upstream that places every call (`POST /v1/calls`) but never answers a look-up
/// (`GET /v1/calls/{id}`).
async fn upstream_hanging_on_lookups() -> (std::net::SocketAddr, std::sync::Arc<Seen>) {
    use http_body_util::Full;
    use std::sync::atomic::Ordering::Relaxed;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(Seen::default());
    let counts = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let counts = counts.clone();
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let counts = counts.clone();
                    async move {
                        if req.method() == Method::GET {
                            counts.lookups.fetch_add(1, Relaxed);
                            tokio::time::sleep(Duration::from_secs(3600)).await;
                        }
                        let n = counts.calls.fetch_add(1, Relaxed);
                        let body = json!({"id": format!("call_hang_{n}"), "status": "queued"});
                        let mut response =
                            http::Response::new(Full::new(bytes::Bytes::from(body.to_string())));
                        response.headers_mut().insert(
                            "content-type",
                            http::HeaderValue::from_static("application/json"),
                        );
                        Ok::<_, std::convert::Infallible>(response)
                    }
                });
            tokio::spawn(
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(stream), svc)
                    .into_owned(),
            );
        }
    });
    (addr, seen)
}

/// The lease sweeper does not wait for the reconciler: with every upstream look-up hanging (for
/// up to the upstream timeout, here a minute), lapsed leases are still settled. And the
/// reconciler asks about several calls at once, never more than its bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_upstream_does_not_hold_up_lease_expiry() {
    let (upstream, seen) = upstream_hanging_on_lookups().await;
    let dir = tempfile::tempdir().unwrap();
    let policies = copy_policies(dir.path());
    std::fs::write(policies.join("tenants/t.toml"), tenant_file("t", KEY, "")).unwrap();
    let extra = "[reconcile]\nenabled = true\ninterval_ms = 100\nquiet_after_secs = 5\nrefresh_on_read = false\n\
                 [state]\nsweep_interval_ms = 50\n";
    let text = config_text(
        &format!("url = \"http://{upstream}\"\napi_key = \"{ACCOUNT_KEY}\""),
        extra,
    )
    .replace(
        &repo().join("policies").display().to_string(),
        &policies.display().to_string(),
    )
    .replace("request_timeout_ms = 2000", "request_timeout_ms = 60000");
    let gw = TestGateway::start_with_config(&text).await;
    let answers = burst(&gw, KEY, 12, call(60)).await;
    assert_eq!(count(&answers, StatusCode::OK), 12);
    assert_eq!(gw.usage("t").await.slots, 12);
    // Ten seconds on, all twelve calls are quiet: the reconciler asks about them, 8 at a time,
    // and is stuck on those look-ups (a minute each).
    gw.clock.advance(Duration::from_secs(10));
    let lookups = || seen.lookups.load(std::sync::atomic::Ordering::Relaxed);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let bound = callgate::lifecycle::RECONCILE_CONCURRENCY as u64;
    while lookups() < bound && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(lookups(), bound, "look-ups in flight");
    // Then every lease ends: the sweeper settles them all the same.
    gw.clock.advance(Duration::from_secs(3_600));
    let usage = gw.wait_usage("t", |u| u.slots == 0).await;
    assert_eq!((usage.slots, usage.holds), (0, 0));
}
