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

/// A webhook endpoint that refuses each event's first delivery with a 503 and accepts the
/// next: the simulator retries, with the same `event_id`, and every event arrives.
#[tokio::test]
async fn events_are_retried_with_their_id() {
    use std::sync::{Arc, Mutex};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let log = log.clone();
                        async move {
                            use http_body_util::BodyExt;
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let event: serde_json::Value = serde_json::from_slice(&body).unwrap();
                            let mut log = log.lock().unwrap();
                            let first = !log.iter().any(|e| e["event_id"] == event["event_id"]);
                            log.push(event);
                            let status = if first {
                                StatusCode::SERVICE_UNAVAILABLE
                            } else {
                                StatusCode::OK
                            };
                            let mut response =
                                http::Response::new(http_body_util::Full::new(bytes::Bytes::new()));
                            *response.status_mut() = status;
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    let sim = simulator(SimulatorSettings {
        queue_ms: 10,
        ring_ms: 10,
        talk_ms: 1_000,
        ..Default::default()
    })
    .await;
    let answer = post(
        &sim,
        ACCOUNT_KEY,
        json!({"phone_number": "+14155551234", "agent_id": "agent_abc123", "max_duration": 1,
               "webhook_url": format!("http://{addr}/hook")}),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let events = seen.lock().unwrap().clone();
        if events.len() >= 6 {
            // ringing, in_progress, completed: each refused once, then accepted.
            let statuses: Vec<_> = events
                .iter()
                .map(|e| e["status"].as_str().unwrap().to_string())
                .collect();
            assert_eq!(
                statuses,
                [
                    "ringing",
                    "ringing",
                    "in_progress",
                    "in_progress",
                    "completed",
                    "completed"
                ]
            );
            for pair in events.chunks(2) {
                assert_eq!(pair[0]["event_id"], pair[1]["event_id"]);
                assert!(
                    pair[0]["event_id"]
                        .as_str()
                        .is_some_and(|id| id.len() == 36)
                );
            }
            assert_ne!(events[0]["event_id"], events[2]["event_id"]);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "events: {events:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn faults(f: callgate::config::SimFaults) -> SimulatorSettings {
    SimulatorSettings {
        faults: f,
        ..fast()
    }
}

fn relayed(hook: &Receiver, reservation: &str) -> serde_json::Value {
    json!({"phone_number": "+14155551234", "agent_id": "agent_abc123",
           "webhook_url": hook.url(&format!("/v1/relay/{reservation}.secret"))})
}

/// Errors and resets drop the request before anything is placed; the ledger names the
/// reservation of each (read from the relay URL), so a soak run can account for it.
#[tokio::test]
async fn injected_errors_and_resets_place_nothing_and_are_in_the_ledger() {
    use callgate::config::SimFaults;
    let hook = Receiver::start().await;
    let sim = simulator(faults(SimFaults {
        error_rate: 1.0,
        ..Default::default()
    }))
    .await;
    let answer = post(&sim, ACCOUNT_KEY, relayed(&hook, "res_1")).await;
    assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(sim.active_calls(), 0);
    let ledger = sim.ledger();
    assert_eq!(
        ledger["dropped"],
        json!([{"fault": "error", "reservation": "res_1"}])
    );
    assert_eq!(ledger["faults"]["errors"], 1);
    assert_eq!(ledger["calls"], json!([]));

    let sim = simulator(faults(SimFaults {
        reset_rate: 1.0,
        ..Default::default()
    }))
    .await;
    let request = http::Request::post(format!("http://{}/v1/calls", sim.addr()))
        .header("authorization", format!("Bearer {ACCOUNT_KEY}"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            relayed(&hook, "res_2").to_string(),
        )))
        .unwrap();
    let reset = tokio::time::timeout(Duration::from_secs(5), http_client().request(request))
        .await
        .expect("the simulator closed the connection in time");
    assert!(reset.is_err(), "a reset gets no answer: {reset:?}");
    assert_eq!(sim.active_calls(), 0);
    assert_eq!(
        sim.ledger()["dropped"],
        json!([{"fault": "reset", "reservation": "res_2"}])
    );
}

/// A hang places the call and holds its answer back; lost events are never sent; failing
/// look-ups answer 500. The ledger says which.
#[tokio::test]
async fn hangs_lost_events_and_failing_lookups() {
    use callgate::config::SimFaults;
    let hook = Receiver::start().await;
    let sim = simulator(faults(SimFaults {
        hang_rate: 1.0,
        hang_ms: 600,
        lost_event_rate: 1.0,
        lookup_error_rate: 1.0,
        ..Default::default()
    }))
    .await;
    let started = std::time::Instant::now();
    let answer = post(&sim, ACCOUNT_KEY, relayed(&hook, "res_3")).await;
    assert!(started.elapsed() >= Duration::from_millis(600));
    let id = answer.json()["id"].as_str().unwrap().to_string();
    let auth = format!("Bearer {ACCOUNT_KEY}");
    let looked_up = send(
        &http_client(),
        sim.addr(),
        Method::GET,
        &format!("/v1/calls/{id}"),
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(looked_up.status, StatusCode::INTERNAL_SERVER_ERROR);
    // The call runs its course (1.1 s talk); none of its three events is sent.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while sim.active_calls() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(hook.bodies().is_empty());
    let ledger = sim.ledger();
    let call = &ledger["calls"][0];
    assert_eq!(call["id"], id.as_str());
    assert_eq!(call["reservation"], "res_3");
    assert_eq!(call["status"], "completed");
    assert_eq!(call["duration"], 2);
    assert_eq!(
        call["trail"],
        json!({"answer": "withheld", "events": 3, "events_lost": 3,
               "events_delivered": 0, "final_delivered": false, "final_lookups": 0,
               "final_delivered_at": null, "first_final_lookup_at": null})
    );
    assert_eq!(ledger["faults"]["hangs"], 1);
    assert_eq!(ledger["faults"]["events_lost"], 3);
    assert_eq!(ledger["faults"]["lookup_errors"], 1);
}

/// Delivered events are counted in the ledger, the final one named.
#[tokio::test]
async fn delivered_events_are_in_the_ledger() {
    let hook = Receiver::start().await;
    let sim = simulator(fast()).await;
    let answer = post(&sim, ACCOUNT_KEY, relayed(&hook, "res_4")).await;
    assert_eq!(answer.status, StatusCode::OK);
    hook.wait_for(3, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let id = answer.json()["id"].as_str().unwrap().to_string();
    let auth = format!("Bearer {ACCOUNT_KEY}");
    let looked_up = send(
        &http_client(),
        sim.addr(),
        Method::GET,
        &format!("/v1/calls/{id}"),
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(looked_up.json()["status"], "completed");
    let mut trail = sim.ledger()["calls"][0]["trail"].clone();
    let now = jiff::Timestamp::now().as_millisecond();
    for at in ["final_delivered_at", "first_final_lookup_at"] {
        let when = trail[at].as_i64().unwrap();
        assert!(when <= now && when > now - 10_000, "{at}: {when}");
        trail[at] = json!("seen");
    }
    assert_eq!(
        trail,
        json!({"answer": "sent", "events": 3, "events_lost": 0,
               "events_delivered": 3, "final_delivered": true, "final_lookups": 1,
               "final_delivered_at": "seen", "first_final_lookup_at": "seen"})
    );
}
