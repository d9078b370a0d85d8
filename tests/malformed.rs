//! Malformed HTTP never reaches a stage: each is answered 4xx (or the connection is closed) by
//! the HTTP layer, and nothing is admitted or forwarded.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Send raw bytes on a fresh connection; the status code answered (0: closed without one).
async fn raw(addr: std::net::SocketAddr, request: &[u8]) -> u16 {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
    let text = String::from_utf8_lossy(&answer);
    text.strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

fn post(headers: &str, body: &str) -> Vec<u8> {
    format!(
        "POST /v1/calls HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ACME_KEY}\r\ncontent-type: application/json\r\n{headers}connection: close\r\n\r\n{body}"
    )
    .into_bytes()
}

const BODY: &str = r#"{"phone_number": "+14155551234", "agent_id": "agent_abc123"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_refused_before_any_stage() {
    let gw = TestGateway::start().await;
    let addr = gw.addr();
    // A well-formed one is placed (so the refusals below are the framing's doing).
    let ok = post(&format!("content-length: {}\r\n", BODY.len()), BODY);
    assert_eq!(raw(addr, &ok).await, 200);
    let placed = gw.simulator().received_calls().len();

    let chunked = format!("{:x}\r\n{BODY}\r\n0\r\n\r\n", BODY.len());
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "Content-Length with Transfer-Encoding",
            post(
                "content-length: 5\r\ntransfer-encoding: chunked\r\n",
                &chunked,
            ),
        ),
        (
            "two different Content-Lengths",
            post(
                &format!("content-length: {}\r\ncontent-length: 7\r\n", BODY.len()),
                BODY,
            ),
        ),
        (
            "obsolete line folding",
            post(
                &format!("content-length: {}\r\nx-folded: a\r\n b\r\n", BODY.len()),
                BODY,
            ),
        ),
        (
            "oversized headers",
            post(
                &format!(
                    "content-length: {}\r\nx-big: {}\r\n",
                    BODY.len(),
                    "a".repeat(512 * 1024)
                ),
                BODY,
            ),
        ),
        (
            "an invalid method",
            format!(
                "PO(ST /v1/calls HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{BODY}",
                BODY.len()
            )
            .into_bytes(),
        ),
        (
            "a bad chunk size",
            post("transfer-encoding: chunked\r\n", "zz\r\nabc\r\n0\r\n\r\n"),
        ),
    ];
    for (what, request) in cases {
        let status = raw(addr, &request).await;
        assert!((400..500).contains(&status), "{what}: answered {status}");
    }
    // Nothing of them reached the upstream or took a slot.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(gw.simulator().received_calls().len(), placed);
}
