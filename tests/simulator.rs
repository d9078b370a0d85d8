//! The Ringyo simulator on its own: the documented validation and error codes, the lifecycle,
//! webhook events, and `GET /v1/calls/{id}`.

mod support;

use std::time::Duration;

use callgate::config::SimulatorSettings;
use callgate::simulator::Simulator;
use http::{Method, StatusCode};
use serde_json::json;
use support::*;

async fn simulator(settings: SimulatorSettings) -> Simulator {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    Simulator::spawn(listener, settings, ACCOUNT_KEY.to_string())
}

fn fast() -> SimulatorSettings {
    SimulatorSettings {
        queue_ms: 10,
        ring_ms: 20,
        talk_ms: 1_100,
        ..Default::default()
    }
}

async fn post(sim: &Simulator, key: &str, body: serde_json::Value) -> Answer {
    let auth = format!("Bearer {key}");
    send(
        &http_client(),
        sim.addr(),
        Method::POST,
        "/v1/calls",
        &[
            ("authorization", &auth),
            ("content-type", "application/json"),
        ],
        body.to_string(),
    )
    .await
}

#[tokio::test]
async fn documented_errors() {
    let sim = simulator(SimulatorSettings {
        max_concurrent_calls: 1,
        credits: Some(15),
        ..fast()
    })
    .await;
    let ok =
        json!({"phone_number": "+14155551234", "agent_id": "agent_abc123", "max_duration": 600});
    let cases = [
        (
            json!({"phone_number": "+1415", "agent_id": "agent_abc123"}),
            400,
            "invalid_phone_number",
        ),
        (
            json!({"phone_number": "+14155551234", "agent_id": "agent_nope"}),
            404,
            "agent_not_found",
        ),
        (
            json!({"phone_number": "+14155551234", "agent_id": "agent_abc123", "from_number": "+12125550123"}),
            400,
            "invalid_from_number",
        ),
        (
            json!({"phone_number": "+14155551234", "agent_id": "agent_abc123", "max_duration": 3601}),
            400,
            "invalid_request",
        ),
    ];
    for (body, status, code) in cases {
        let answer = post(&sim, ACCOUNT_KEY, body).await;
        assert_eq!(
            (answer.status.as_u16(), answer.code()),
            (status, code.to_string())
        );
    }
    assert_eq!(
        post(&sim, "other-key", ok.clone()).await.code(),
        "unauthorized"
    );
    // 10 credits for 600 s; 5 left.
    assert_eq!(
        post(&sim, ACCOUNT_KEY, ok.clone()).await.status,
        StatusCode::OK
    );
    // One call is active: the account's concurrency is exhausted.
    assert_eq!(
        post(&sim, ACCOUNT_KEY, ok.clone()).await.code(),
        "rate_limit_exceeded"
    );
    assert_eq!(sim.active_calls(), 1);
}

#[tokio::test]
async fn insufficient_credits() {
    let sim = simulator(SimulatorSettings {
        credits: Some(5),
        ..fast()
    })
    .await;
    let answer = post(
        &sim,
        ACCOUNT_KEY,
        json!({"phone_number": "+14155551234", "agent_id": "agent_abc123", "max_duration": 600}),
    )
    .await;
    assert_eq!(
        (answer.status, answer.code().as_str()),
        (StatusCode::PAYMENT_REQUIRED, "insufficient_credits")
    );
}

#[tokio::test]
async fn lifecycle_and_webhooks() {
    let sim = simulator(fast()).await;
    let hook = Receiver::start().await;
    let answer = post(
        &sim,
        ACCOUNT_KEY,
        json!({"phone_number": "+14155551234", "agent_id": "agent_abc123",
               "metadata": {"a": "b"}, "webhook_url": hook.url("/events")}),
    )
    .await;
    let call = answer.json();
    assert_eq!(call["status"], "queued");
    assert_eq!(call["metadata"], json!({"a": "b"}));
    assert_eq!(call["from_number"], "+18005551234");
    assert_eq!(call["record"], true);
    let id = call["id"].as_str().unwrap().to_string();

    let events = hook.wait_for(3, Duration::from_secs(10)).await;
    let statuses: Vec<_> = events
        .iter()
        .map(|e| e["status"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(statuses, ["ringing", "in_progress", "completed"]);
    assert!(events.iter().all(|e| e["call_id"] == id.as_str()));
    assert_eq!(events[2]["duration"], 2);

    let auth = format!("Bearer {ACCOUNT_KEY}");
    let fetched = send(
        &http_client(),
        sim.addr(),
        Method::GET,
        &format!("/v1/calls/{id}"),
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(fetched.json()["status"], "completed");
    assert_eq!(fetched.json()["duration"], 2);
    let missing = send(
        &http_client(),
        sim.addr(),
        Method::GET,
        "/v1/calls/call_nope",
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert_eq!(sim.active_calls(), 0);
}

#[tokio::test]
async fn talk_time_is_capped_by_max_duration() {
    let sim = simulator(SimulatorSettings {
        talk_ms: 60_000,
        ..fast()
    })
    .await;
    let hook = Receiver::start().await;
    post(
        &sim,
        ACCOUNT_KEY,
        json!({"phone_number": "+14155551234", "agent_id": "agent_abc123", "max_duration": 1,
               "webhook_url": hook.url("/e")}),
    )
    .await;
    let events = hook.wait_for(3, Duration::from_secs(10)).await;
    assert_eq!(events.last().unwrap()["status"], "completed");
    assert_eq!(events.last().unwrap()["duration"], 1);
}
