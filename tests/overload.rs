//! Overload: past the cap on requests in flight a request is refused at once (`503
//! gateway_overloaded`, `Retry-After`, the JSON envelope), taking nothing; past the cap on open
//! connections a new connection is told `503` and closed; the others are served as before.

mod support;

use std::time::Duration;

use http::{Method, StatusCode};
use serde_json::json;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KEY: &str = "key-overload";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_past_the_in_flight_cap_are_refused_at_once_and_take_nothing() {
    let upstream = broken_upstream(Broken::Hang).await;
    let text = config_text(
        &format!("url = \"http://{upstream}\"\napi_key = \"{ACCOUNT_KEY}\""),
        "",
    )
    .replace(
        "shutdown_grace_ms = 2000",
        "shutdown_grace_ms = 2000\nmax_requests_in_flight = 3",
    );
    let dir = tempfile::tempdir().unwrap();
    let policies = copy_policies(dir.path());
    std::fs::write(policies.join("tenants/t.toml"), tenant_file("t", KEY, "")).unwrap();
    let text = text.replace(
        &repo().join("policies").display().to_string(),
        &policies.display().to_string(),
    );
    let gw = TestGateway::start_with_config(&text).await;
    let started = std::time::Instant::now();
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let (client, addr) = (gw.client.clone(), gw.addr());
            tokio::spawn(async move {
                let body = json!({"phone_number": "+14155551234", "agent_id": "agent_abc123"});
                let answer = send(
                    &client,
                    addr,
                    Method::POST,
                    "/v1/calls",
                    &[
                        ("authorization", &format!("Bearer {KEY}")),
                        ("content-type", "application/json"),
                    ],
                    body.to_string(),
                )
                .await;
                (answer, std::time::Instant::now())
            })
        })
        .collect();
    let mut shed = 0;
    let mut timed_out = 0;
    for task in tasks {
        let (answer, at) = task.await.unwrap();
        match answer.status {
            StatusCode::SERVICE_UNAVAILABLE => {
                shed += 1;
                assert_eq!(answer.code(), "gateway_overloaded");
                assert_eq!(answer.headers["retry-after"], "1");
                assert!(answer.headers.contains_key("x-request-id"));
                // Refused at once, not after waiting for room.
                assert!(at - started < Duration::from_millis(1_500));
            }
            StatusCode::GATEWAY_TIMEOUT => timed_out += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((timed_out, shed), (3, 7));
    // The shed requests took nothing; the three that timed out keep their slots (the upstream
    // may have placed their calls) until their events or leases settle them.
    let usage = gw.usage("t").await;
    assert_eq!(usage.slots, 3);
    // And with room again, requests are served.
    assert_eq!(
        gw.send(Method::GET, "/healthz", &[], "").await.status,
        StatusCode::OK
    );
}

/// Two connections busy mid-body (neither idle nor in a head, so neither is closed to make
/// room) fill a cap of two. A third waits in the waiting room (a tenth of the cap, at least
/// one) and is told 503 when no place frees in time; a fourth, with the room full, is told at
/// once. When the cap is held by idle connections instead, a new one waits while an idle one
/// is closed to make room, and is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_wait_for_room_then_are_told_and_closed() {
    let text = config_text(&simulator_upstream(), fast_simulator()).replace(
        "shutdown_grace_ms = 2000",
        "shutdown_grace_ms = 2000\nmax_connections = 2",
    );
    let gw = TestGateway::start_with_config(&text).await;
    let mut busy = Vec::new();
    for _ in 0..2 {
        let mut c = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
        c.write_all(
            b"POST /v1/calls HTTP/1.1\r\nhost: x\r\nauthorization: Bearer demo-acme-key\r\n\
              content-type: application/json\r\ncontent-length: 100\r\n\r\n{\"phone",
        )
        .await
        .unwrap();
        busy.push(c);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let third = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let fourth = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    let read = |mut c: tokio::net::TcpStream| async move {
        let mut answer = String::new();
        tokio::time::timeout(Duration::from_secs(10), c.read_to_string(&mut answer))
            .await
            .unwrap()
            .unwrap();
        answer
    };
    let answer = read(fourth).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("retry-after: 1"));
    assert!(answer.contains("\"code\":\"gateway_overloaded\""));
    assert!(
        started.elapsed() < callgate::listen::ADMIT_WAIT,
        "the fourth is told at once"
    );
    let answer = read(third).await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(
        started.elapsed() >= callgate::listen::ADMIT_WAIT - Duration::from_millis(200),
        "the third waited for room first"
    );
    // The busy ones leave; two idle keep-alive connections hold the cap instead.
    drop(busy);
    let mut idle = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while idle.len() < 2 {
        let mut c = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = c.read(&mut buf).await.unwrap_or(0);
        if buf[..n].starts_with(b"HTTP/1.1 200") {
            idle.push(c);
        }
        assert!(std::time::Instant::now() < deadline);
    }
    // A new client waits while an idle connection is closed to make room, and is served.
    let started = std::time::Instant::now();
    let mut c = tokio::net::TcpStream::connect(gw.addr()).await.unwrap();
    c.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = read(c).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(started.elapsed() <= callgate::listen::ADMIT_WAIT + Duration::from_millis(500));
}

/// A connection waiting at the cap when the gateway stops is told so at once, not let in to a
/// draining listener or left waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_waiting_at_the_cap_is_told_when_the_gateway_stops() {
    let text = config_text(&simulator_upstream(), fast_simulator()).replace(
        "shutdown_grace_ms = 2000",
        "shutdown_grace_ms = 500\nmax_connections = 1",
    );
    let gw = TestGateway::start_with_config(&text).await;
    let addr = gw.addr();
    let mut busy = tokio::net::TcpStream::connect(addr).await.unwrap();
    busy.write_all(
        b"POST /v1/calls HTTP/1.1\r\nhost: x\r\nauthorization: Bearer demo-acme-key\r\n\
          content-type: application/json\r\ncontent-length: 100\r\n\r\n{\"phone",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut waiting = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    let TestGateway { gateway, .. } = gw;
    let stopping = tokio::spawn(gateway.shutdown());
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), waiting.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(started.elapsed() < callgate::listen::ADMIT_WAIT);
    stopping.await.unwrap();
    drop(busy);
}
