//! Test support: start the real gateway (and its in-process simulator) on loopback ephemeral
//! ports, send it real HTTP, look at what the simulator received.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use callgate::clock::{ManualClock, SharedClock};
use callgate::config::Settings;
use callgate::server::Gateway;
use callgate::simulator::Simulator;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

pub const ACME_KEY: &str = "demo-acme-key";
pub const GLOBEX_KEY: &str = "demo-globex-key";
pub const ACCOUNT_KEY: &str = "sk_test_account_key_0123456789";

/// Monday 2026-01-05 17:00 UTC: 12:00 in New York, 09:00 in Los Angeles.
pub const MONDAY_NOON_NY: &str = "2026-01-05T17:00:00Z";

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A config file for tests: the shipped policies, the simulator with fast timings, plus `extra`
/// TOML appended (later keys win inside `[section]` blocks given in full).
pub fn config_text(upstream: &str, extra: &str) -> String {
    // An `upstream` that sets its own request timeout keeps it.
    let timeout = match upstream.contains("request_timeout_ms") {
        true => "",
        false => "request_timeout_ms = 2000",
    };
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
shutdown_grace_ms = 2000

[upstream]
{upstream}
{timeout}
connect_timeout_ms = 1000

[policies]
dir = "{policies}"

[redaction]
hash_key = "test-hash-key"

[log]
level = "warn"
{extra}
"#,
        policies = repo().join("policies").display(),
    )
}

/// Copy the shipped `policies/` under `dir`, for tests that edit them; returns the copy's path.
pub fn copy_policies(dir: &std::path::Path) -> PathBuf {
    let copy = dir.join("policies");
    for sub in ["schemas", "tenants", "lists", "secrets", "packs"] {
        std::fs::create_dir_all(copy.join(sub)).unwrap();
        for entry in std::fs::read_dir(repo().join("policies").join(sub)).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), copy.join(sub).join(entry.file_name())).unwrap();
        }
    }
    copy
}

/// A loopback address no one listens on right now (for a process to bind).
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

pub fn simulator_upstream() -> String {
    format!("url = \"simulator\"\napi_key = \"{ACCOUNT_KEY}\"")
}

pub fn fast_simulator() -> &'static str {
    "[simulator]\nqueue_ms = 20\nring_ms = 20\ntalk_ms = 50\n"
}

pub struct TestGateway {
    pub gateway: Gateway,
    pub clock: Arc<ManualClock>,
    pub client: Client<HttpConnector, Full<Bytes>>,
    _dir: tempfile::TempDir,
    _extra_dir: Option<tempfile::TempDir>,
}

#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    /// The error code of an error envelope.
    pub fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
    pub fn param(&self) -> String {
        self.json()["error"]["param"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

pub fn http_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

impl TestGateway {
    /// Start from a full config text.
    pub async fn start_with_config(text: &str) -> TestGateway {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("callgate.toml");
        std::fs::write(&path, text).unwrap();
        let settings = Settings::load_with_env(&path, Vec::new()).unwrap();
        let clock = ManualClock::new(MONDAY_NOON_NY.parse().unwrap());
        let shared: SharedClock = clock.clone();
        let gateway = Gateway::start_with(settings, shared, None).await.unwrap();
        TestGateway {
            gateway,
            clock,
            client: http_client(),
            _dir: dir,
            _extra_dir: None,
        }
    }

    /// The gateway on the shipped policies with the in-process simulator.
    pub async fn start() -> TestGateway {
        Self::start_with_config(&config_text(&simulator_upstream(), fast_simulator())).await
    }

    pub fn addr(&self) -> SocketAddr {
        self.gateway.addr()
    }

    pub fn simulator(&self) -> &Simulator {
        self.gateway.simulator().expect("simulator upstream")
    }

    /// Send a request with full control over headers and body.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Answer {
        send(&self.client, self.addr(), method, path, headers, body).await
    }

    /// `POST /v1/calls` as a tenant with an `Idempotency-Key`.
    pub async fn create_call_keyed(
        &self,
        key: &str,
        idempotency_key: &str,
        body: &Value,
    ) -> Answer {
        let auth = format!("Bearer {key}");
        let headers = [
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
            ("idempotency-key", idempotency_key),
        ];
        self.send(Method::POST, "/v1/calls", &headers, body.to_string())
            .await
    }

    /// `POST /v1/calls` as a tenant with a JSON body.
    pub async fn create_call(&self, key: &str, body: &Value) -> Answer {
        let auth = format!("Bearer {key}");
        self.send(
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
}

pub async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Answer {
    let mut builder = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let request = builder.body(Full::new(body.into())).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), client.request(request))
        .await
        .expect("gateway answered in time")
        .expect("request sent");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// A webhook receiver on loopback that records every POST body it gets.
pub struct Receiver {
    pub addr: SocketAddr,
    pub events: Arc<std::sync::Mutex<Vec<(HeaderMap, Bytes)>>>,
}

impl Receiver {
    pub async fn start() -> Receiver {
        Self::start_answering(StatusCode::OK).await
    }

    /// A receiver answering every delivery with `status`.
    pub async fn start_answering(status: StatusCode) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let events: Arc<std::sync::Mutex<Vec<(HeaderMap, Bytes)>>> = Arc::default();
        let sink = events.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let sink = sink.clone();
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let sink = sink.clone();
                            async move {
                                let (parts, body) = req.into_parts();
                                let body = body
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                sink.lock().unwrap().push((parts.headers, body));
                                let mut response = http::Response::new(Full::new(Bytes::new()));
                                *response.status_mut() = status;
                                Ok::<_, std::convert::Infallible>(response)
                            }
                        });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Receiver { addr, events }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn bodies(&self) -> Vec<Value> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .map(|(_, b)| serde_json::from_slice(b).unwrap_or(Value::Null))
            .collect()
    }

    /// Wait (bounded) until at least `n` events arrived.
    pub async fn wait_for(&self, n: usize, within: Duration) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let bodies = self.bodies();
            if bodies.len() >= n || tokio::time::Instant::now() >= deadline {
                return bodies;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A tenant policy file for tests: key `key`, agent `agent_abc123`, caller id `+18005551234`,
/// no rate limit, plus `extra` TOML sections.
pub fn tenant_file(id: &str, key: &str, extra: &str) -> String {
    use sha2::Digest;
    format!(
        r#"id = "{id}"
key_sha256 = ["{hash}"]
[numbers]
from_allow = ["+18005551234"]
from_default = "+18005551234"
[agents]
allow = ["agent_abc123"]
{extra}
"#,
        hash = hex::encode(sha2::Sha256::digest(key.as_bytes()))
    )
}

impl TestGateway {
    /// The gateway on a private copy of the shipped policies plus `tenants` (file name, text),
    /// with `extra` config appended.
    pub async fn start_custom(tenants: &[(&str, String)], extra: &str) -> TestGateway {
        Self::start_custom_upstream(tenants, &simulator_upstream(), extra).await
    }

    pub async fn start_custom_upstream(
        tenants: &[(&str, String)],
        upstream: &str,
        extra: &str,
    ) -> TestGateway {
        let dir = tempfile::tempdir().unwrap();
        let policies = copy_policies(dir.path());
        for (name, text) in tenants {
            std::fs::write(policies.join("tenants").join(name), text).unwrap();
        }
        let text = config_text(upstream, extra).replace(
            &repo().join("policies").display().to_string(),
            &policies.display().to_string(),
        );
        let mut gw = Self::start_with_config(&text).await;
        gw._extra_dir = Some(dir);
        gw
    }

    pub async fn usage(&self, tenant: &str) -> callgate::state::Usage {
        self.gateway.usage(tenant).await.unwrap()
    }

    /// Poll `usage` until `done` holds, within a bound.
    pub async fn wait_usage(
        &self,
        tenant: &str,
        done: impl Fn(&callgate::state::Usage) -> bool,
    ) -> callgate::state::Usage {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let usage = self.usage(tenant).await;
            if done(&usage) || tokio::time::Instant::now() >= deadline {
                return usage;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// How a deliberately broken upstream misbehaves.
#[derive(Debug, Clone, Copy)]
pub enum Broken {
    /// Accepts and never answers.
    Hang,
    /// Answers 500 with an error body.
    Status500,
    /// Reads the request, starts an answer, then drops the connection mid-response.
    ResetMidResponse,
    /// Answers 500, a second after the request.
    SlowStatus500,
    /// Starts a 500 answer, then drops the connection mid-body.
    Status500CutShort,
}

/// Start a broken upstream on loopback; returns its address.
pub async fn broken_upstream(mode: Broken) -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((mut stream, _)) = listener.accept().await {
            match mode {
                Broken::Hang => held.push(stream),
                Broken::Status500
                | Broken::ResetMidResponse
                | Broken::SlowStatus500
                | Broken::Status500CutShort => {
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 65536];
                        let _ =
                            tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf))
                                .await;
                        if let Broken::SlowStatus500 = mode {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                        if let Broken::Status500 | Broken::SlowStatus500 = mode {
                            let body = r#"{"error":{"code":"internal","message":"boom"}}"#;
                            let answer = format!(
                                "HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            let _ = stream.write_all(answer.as_bytes()).await;
                        } else if let Broken::Status500CutShort = mode {
                            let _ = stream
                                .write_all(b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n{\"error\": ")
                                .await;
                            drop(stream);
                        } else {
                            let _ = stream
                                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 500\r\n\r\n{\"id\": \"call_")
                                .await;
                            drop(stream);
                        }
                    });
                }
            }
        }
    });
    addr
}
