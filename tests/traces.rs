//! Traces end to end: the gateway (a `callgate serve` process) exports OTLP/HTTP protobuf to a
//! receiver on loopback, set by `OTEL_EXPORTER_OTLP_ENDPOINT` alone. Every call request is one
//! trace (server span, a span per stage, the upstream client span); a client's `traceparent` is
//! continued and the upstream gets one naming callgate's client span; the relay's handling of the
//! call's events links to the call's trace; nothing in any span holds a full number or a key.

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use callgate::config::SimulatorSettings;
use callgate::simulator::Simulator;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message;
use serde_json::json;
use support::*;

/// Spans received, with their resource's `service.name`.
type Received = Arc<Mutex<Vec<(String, Span)>>>;

/// An OTLP/HTTP receiver: `POST /v1/traces` with `application/x-protobuf`.
async fn otlp_receiver() -> (SocketAddr, Received) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received: Received = Arc::default();
    let store = received.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let store = store.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let store = store.clone();
                        async move {
                            assert_eq!(req.uri().path(), "/v1/traces");
                            assert_eq!(req.headers()["content-type"], "application/x-protobuf");
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let export = ExportTraceServiceRequest::decode(body).unwrap();
                            let mut spans = store.lock().unwrap();
                            for resource in export.resource_spans {
                                let service = resource
                                    .resource
                                    .iter()
                                    .flat_map(|r| r.attributes.iter())
                                    .find(|a| a.key == "service.name")
                                    .and_then(|a| a.value.as_ref())
                                    .map(|v| format!("{:?}", v.value))
                                    .unwrap_or_default();
                                for scope in resource.scope_spans {
                                    for span in scope.spans {
                                        spans.push((service.clone(), span));
                                    }
                                }
                            }
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                Bytes::new(),
                            )))
                        }
                    });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
    });
    (addr, received)
}

fn attr(span: &Span, key: &str) -> Option<String> {
    let value = span
        .attributes
        .iter()
        .find(|a| a.key == key)?
        .value
        .as_ref()?;
    Some(match value.value.as_ref()? {
        Any::StringValue(s) => s.clone(),
        Any::IntValue(i) => i.to_string(),
        Any::BoolValue(b) => b.to_string(),
        Any::DoubleValue(d) => d.to_string(),
        other => format!("{other:?}"),
    })
}

struct Gateway {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const KEY: &str = "key-traced";

async fn start(upstream: &str, otlp: SocketAddr) -> Gateway {
    let dir = tempfile::tempdir().unwrap();
    let policies = copy_policies(dir.path());
    let tenant = tenant_file(
        "traced",
        KEY,
        "[webhooks]\nallowed_hosts = [\"127.0.0.1\"]\nallow_http = true\nsecret = \"whsec_test_traces\"\n\
         [limits]\nrequests_per_minute = 2\nburst = 2\n",
    );
    std::fs::write(policies.join("tenants").join("traced.toml"), tenant).unwrap();
    let addr = free_addr();
    let extra = format!(
        "[state]\npath = \"{}\"\n[relay]\npublic_url = \"http://{addr}\"\n",
        dir.path().join("state.db").display()
    );
    let upstream = format!("url = \"{upstream}\"\napi_key = \"{ACCOUNT_KEY}\"");
    let text = config_text(&upstream, &extra).replace(
        &repo().join("policies").display().to_string(),
        &policies.display().to_string(),
    );
    let config = dir.path().join("callgate.toml");
    std::fs::write(&config, text).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_callgate"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("CALLGATE__SERVER__LISTEN", addr.to_string())
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{otlp}"))
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env("OTEL_SERVICE_NAME", "callgate-under-test")
        .env("RUST_LOG", "error")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let gateway = Gateway {
        child,
        addr,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "the gateway did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    gateway
}

async fn post(
    addr: SocketAddr,
    key: &str,
    body: serde_json::Value,
    extra: &[(&str, &str)],
) -> Answer {
    let auth = format!("Bearer {key}");
    let mut headers = vec![
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
    ];
    headers.extend_from_slice(extra);
    send(
        &http_client(),
        addr,
        Method::POST,
        "/v1/calls",
        &headers,
        body.to_string(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_request_is_one_trace_and_nothing_personal_is_in_it() {
    let (otlp, received) = otlp_receiver().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sim = Simulator::spawn(
        listener,
        SimulatorSettings {
            queue_ms: 20,
            ring_ms: 20,
            talk_ms: 200,
            ..SimulatorSettings::default()
        },
        ACCOUNT_KEY.to_string(),
    );
    let hook = Receiver::start().await;
    let mut gw = start(&sim.url(), otlp).await;
    let number = "+14155551234";

    // Admitted, with the tenant's webhook (the relay delivers its events there).
    let admitted = post(
        gw.addr,
        KEY,
        json!({"phone_number": number, "agent_id": "agent_abc123", "webhook_url": hook.url("/hook")}),
        &[],
    )
    .await;
    assert_eq!(admitted.status, StatusCode::OK, "{:?}", admitted.body);
    let call_id = admitted.json()["id"].as_str().unwrap().to_string();
    // Denied at authentication, validation, the phone stage and the field policy.
    let denials = [
        (
            "not-a-key",
            json!({"phone_number": number, "agent_id": "agent_abc123"}),
            "unauthorized",
        ),
        (KEY, json!({"phone_number": number}), "invalid_request"),
        (
            KEY,
            json!({"phone_number": "+1415", "agent_id": "agent_abc123"}),
            "invalid_phone_number",
        ),
        (
            KEY,
            json!({"phone_number": number, "agent_id": "agent_other"}),
            "agent_not_found",
        ),
    ];
    for (key, body, code) in &denials {
        let answer = post(gw.addr, key, body.clone(), &[]).await;
        assert_eq!(answer.code(), *code, "{:?}", answer.body);
    }
    // A client's trace is continued.
    let parent_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_span = "00f067aa0ba902b7";
    let traceparent = format!("00-{parent_trace}-{parent_span}-01");
    let continued = post(
        gw.addr,
        KEY,
        json!({"phone_number": number, "agent_id": "agent_abc123"}),
        &[("traceparent", &traceparent)],
    )
    .await;
    assert_eq!(continued.status, StatusCode::OK);
    // Denied at admission: the two admitted calls used the burst (the denials above never
    // reached it).
    let limited = post(
        gw.addr,
        KEY,
        json!({"phone_number": number, "agent_id": "agent_abc123"}),
        &[],
    )
    .await;
    assert_eq!(limited.code(), "rate_limit_exceeded");

    // The first call's events reach the relay (and the tenant's webhook) once it ends.
    hook.wait_for(1, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // SIGTERM: the gateway drains and flushes its spans before it exits.
    let pid = gw.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = gw.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the gateway did not stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");

    let spans: Vec<Span> = received
        .lock()
        .unwrap()
        .iter()
        .map(|(_, s)| s.clone())
        .collect();
    assert!(
        received
            .lock()
            .unwrap()
            .iter()
            .all(|(service, _)| service.contains("callgate-under-test")),
        "OTEL_SERVICE_NAME names the service"
    );
    let hex = hex::encode;
    let server: Vec<&Span> = spans
        .iter()
        .filter(|s| s.kind == SpanKind::Server as i32 && s.name == "POST /v1/calls")
        .collect();
    assert_eq!(
        server.len(),
        3 + denials.len(),
        "one server span per call request"
    );

    // The admitted call: server span, its stages, the admission and the upstream client span.
    let call = server
        .iter()
        .find(|s| attr(s, "call_id").as_deref() == Some(call_id.as_str()))
        .expect("the admitted call's server span");
    let trace = call.trace_id.clone();
    assert_eq!(attr(call, "http.request.method").as_deref(), Some("POST"));
    assert_eq!(attr(call, "url.path").as_deref(), Some("/v1/calls"));
    assert_eq!(
        attr(call, "http.response.status_code").as_deref(),
        Some("200")
    );
    assert_eq!(attr(call, "tenant").as_deref(), Some("traced"));
    assert_eq!(attr(call, "decision").as_deref(), Some("forwarded"));
    assert_eq!(attr(call, "upstream.status_code").as_deref(), Some("200"));
    assert_eq!(attr(call, "destination").as_deref(), Some("+1415***1234"));
    let in_trace: Vec<&Span> = spans.iter().filter(|s| s.trace_id == trace).collect();
    let by_id: HashMap<Vec<u8>, &Span> = in_trace.iter().map(|s| (s.span_id.clone(), *s)).collect();
    let descends_from_call = |s: &Span| {
        let mut parent = s.parent_span_id.clone();
        while let Some(p) = by_id.get(&parent) {
            if p.span_id == call.span_id {
                return true;
            }
            parent = p.parent_span_id.clone();
        }
        false
    };
    for stage in [
        "authenticate",
        "validate",
        "phone",
        "fields",
        "redact",
        "idempotency",
        "admission",
        "record",
    ] {
        let span = in_trace
            .iter()
            .find(|s| s.name == stage)
            .unwrap_or_else(|| {
                panic!(
                    "no {stage} span in {:?}",
                    in_trace.iter().map(|s| &s.name).collect::<Vec<_>>()
                )
            });
        assert!(
            descends_from_call(span),
            "{stage} is in the call's span tree"
        );
    }
    let client = in_trace
        .iter()
        .find(|s| s.kind == SpanKind::Client as i32 && s.name == "POST")
        .expect("the upstream client span");
    assert!(descends_from_call(client));
    assert_eq!(
        attr(client, "http.response.status_code").as_deref(),
        Some("200")
    );
    // The upstream got a traceparent naming that client span.
    let forwarded = sim
        .received_calls()
        .into_iter()
        .find(|r| r.json()["phone_number"] == number && r.headers.contains_key("traceparent"))
        .expect("the upstream request carried traceparent");
    let sent = forwarded.headers["traceparent"]
        .to_str()
        .unwrap()
        .to_string();
    let first = sim.received_calls().into_iter().next().unwrap();
    let sent_first = first.headers["traceparent"].to_str().unwrap().to_string();
    assert_eq!(
        sent_first,
        format!("00-{}-{}-01", hex(&trace), hex(&client.span_id))
    );
    assert!(sent.starts_with("00-"));

    // Denials: a server span each, with the code and the stage that refused.
    for (_, _, code) in &denials {
        let span = server
            .iter()
            .find(|s| attr(s, "code").as_deref() == Some(*code))
            .unwrap_or_else(|| panic!("no server span with code {code}"));
        assert!(
            attr(span, "stage").is_some(),
            "{code}: the stage that refused"
        );
        assert_eq!(attr(span, "decision").as_deref(), Some("denied"));
    }

    let limited = server
        .iter()
        .find(|s| attr(s, "code").as_deref() == Some("rate_limit_exceeded"))
        .expect("the rate-limited request's server span");
    assert_eq!(attr(limited, "stage").as_deref(), Some("admission"));
    assert_eq!(
        attr(limited, "rule").as_deref(),
        Some("limits.requests_per_minute")
    );
    let agent = server
        .iter()
        .find(|s| attr(s, "code").as_deref() == Some("agent_not_found"))
        .unwrap();
    assert_eq!(attr(agent, "rule").as_deref(), Some("agents.allow"));
    assert!(
        spans
            .iter()
            .any(|s| s.trace_id == limited.trace_id && s.name == "admission"),
        "its admission span"
    );

    // The client's trace was continued: same trace id, its span as the parent.
    let continued = server
        .iter()
        .find(|s| hex(&s.trace_id) == parent_trace)
        .expect("a server span in the client's trace");
    assert_eq!(hex(&continued.parent_span_id), parent_span);

    // The relay's handling of the call's events links to the call's trace; the delivery to the
    // tenant's webhook is traced under it.
    let relays: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == "POST /v1/relay/{token}")
        .collect();
    assert!(!relays.is_empty(), "relay spans");
    assert!(
        relays
            .iter()
            .any(|s| s.links.iter().any(|l| l.trace_id == trace)),
        "a relay span links to the call's trace"
    );
    let delivery = spans
        .iter()
        .find(|s| s.name == "webhook delivery")
        .expect("a webhook delivery span");
    assert!(relays.iter().any(|r| r.trace_id == delivery.trace_id));

    // Nothing personal or secret in any span.
    let everything = format!("{spans:?}");
    for secret in [number, KEY, ACCOUNT_KEY, "whsec_test_traces"] {
        assert!(!everything.contains(secret), "{secret} in a span");
    }
}
