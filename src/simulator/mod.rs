//! The Ringyo simulator: the upstream's documented `POST /v1/calls` and the usual
//! `GET /v1/calls/{id}`, its validation and error codes, a configurable account (agents, owned
//! numbers, concurrency, credits), the call lifecycle `queued -> ringing -> in_progress ->
//! completed` on configurable timings, and webhook events at each change.
//!
//! It runs in-process (`upstream.url = "simulator"`, and in tests) or standalone
//! (`callgate simulator --listen ADDR`). It places no real calls. It echoes the metadata it
//! received and keeps a log of every request, so tests can see exactly what left the gateway.
//!
//! Faults can be injected (`[simulator.faults]`, see [`SimFaults`]): errors, resets and hung
//! answers on `POST /v1/calls`, lost events, failing look-ups. Its ledger (`GET /_sim/ledger`,
//! [`Simulator::ledger`]) says what happened to every call and every dropped request, with the
//! gateway's reservation id read from the call's relay URL, so a soak run (`bench/soak.sh`) can
//! check the gateway's store call by call.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::config::{SimFaults, SimulatorSettings};
use crate::error::{Body, json_response};
use crate::phone;
use crate::upstream::{ClientOptions, ProxyConnector, build_client};

/// The client the simulator sends webhook events with.
type EventClient = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<
        ProxyConnector<hyper_util::client::legacy::connect::HttpConnector>,
    >,
    Full<Bytes>,
>;

/// A request the simulator received.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Received {
    /// The body as JSON (`Null` if it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

/// One simulated call.
#[derive(Debug, Clone)]
struct SimCall {
    object: Value,
    webhook_url: Option<String>,
    /// What happened to the call's answer and its events, for the ledger.
    trail: Trail,
}

/// What became of a call's answer and events.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct Trail {
    /// `sent`, or `withheld` (a hang fault: the answer went out only after `hang_ms`).
    answer: &'static str,
    /// Events the lifecycle produced, events dropped by the lost-event fault, and events the
    /// receiver accepted (a 2xx) after retries.
    events: u32,
    events_lost: u32,
    events_delivered: u32,
    /// Whether the final event was accepted.
    final_delivered: bool,
    /// Look-ups (`GET /v1/calls/{id}`) answered once the call had ended.
    final_lookups: u32,
    /// When (Unix ms) the final event was accepted, and when a look-up first answered that the
    /// call had ended: from then on the receiver could know.
    final_delivered_at: Option<i64>,
    first_final_lookup_at: Option<i64>,
}

fn unix_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

/// A `POST /v1/calls` the simulator dropped without placing a call (an error or reset fault).
#[derive(Debug, Clone, serde::Serialize)]
struct Dropped {
    fault: &'static str,
    reservation: Option<String>,
}

/// The gateway's reservation id in a relay URL (`.../v1/relay/<reservation>.<secret>?...`).
fn reservation_of(webhook_url: Option<&str>) -> Option<String> {
    let token = webhook_url?.split("/v1/relay/").nth(1)?;
    let token = token.split(['?', '#']).next()?;
    let (reservation, _secret) = token.split_once('.')?;
    Some(reservation.to_string())
}

struct State {
    settings: SimulatorSettings,
    api_key: String,
    calls: Mutex<Calls>,
    received: Mutex<std::collections::VecDeque<Received>>,
    credits_left: Mutex<Option<u64>>,
    client: EventClient,
    dropped: Mutex<std::collections::VecDeque<Dropped>>,
    counts: Mutex<FaultCounts>,
}

/// How many faults were injected, by kind.
#[derive(Debug, Clone, Default, serde::Serialize)]
struct FaultCounts {
    errors: u64,
    resets: u64,
    hangs: u64,
    events_lost: u64,
    lookup_errors: u64,
}

/// Whether a fault of this share happens now.
fn roll(share: f64) -> bool {
    share > 0.0 && rand::random::<f64>() < share
}

/// The connection is closed with no answer (a reset fault).
#[derive(Debug)]
struct Reset;

impl std::fmt::Display for Reset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("simulated reset")
    }
}

impl std::error::Error for Reset {}

/// Requests kept for [`Simulator::received`]: the most recent ones. A simulator serving a
/// gateway for days keeps bounded memory.
const RECEIVED_KEPT: usize = 10_000;

/// The simulated calls, and the order they were placed in (for forgetting the oldest).
#[derive(Default)]
struct Calls {
    by_id: HashMap<String, SimCall>,
    order: std::collections::VecDeque<String>,
}

impl Calls {
    fn insert(&mut self, id: String, call: SimCall, keep: usize) {
        self.order.push_back(id.clone());
        self.by_id.insert(id, call);
        // Forget the oldest finished calls while over the bound; stop at the first live one
        // (the next pass gets past it once it ends).
        while self.by_id.len() > keep {
            let Some(oldest) = self.order.front() else {
                break;
            };
            match self.by_id.get(oldest) {
                Some(call) if !call.finished() => break,
                _ => {
                    if let Some(id) = self.order.pop_front() {
                        self.by_id.remove(&id);
                    }
                }
            }
        }
    }
}

impl SimCall {
    fn finished(&self) -> bool {
        matches!(self.object["status"].as_str(), Some("completed" | "failed"))
    }
}

/// Keep `item`, and at most the `keep` most recent.
fn keep_last<T>(queue: &mut std::collections::VecDeque<T>, item: T, keep: usize) {
    queue.push_back(item);
    while queue.len() > keep {
        queue.pop_front();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A running simulator.
#[derive(Clone)]
pub struct Simulator {
    addr: SocketAddr,
    state: Arc<State>,
    tls: bool,
}

impl std::fmt::Debug for Simulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Simulator")
            .field("addr", &self.addr)
            .finish()
    }
}

impl Simulator {
    /// Serve on `listener` until the process ends; requests must carry `Bearer <api_key>`.
    pub fn spawn(listener: TcpListener, settings: SimulatorSettings, api_key: String) -> Simulator {
        Self::spawn_with_tls(listener, settings, api_key, None)
    }

    /// As [`Simulator::spawn`], serving HTTPS with `tls` when given (for tests of the TLS client).
    pub fn spawn_with_tls(
        listener: TcpListener,
        settings: SimulatorSettings,
        api_key: String,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Simulator {
        let addr = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)));
        let state = Arc::new(State {
            credits_left: Mutex::new(settings.credits),
            dropped: Mutex::new(std::collections::VecDeque::new()),
            counts: Mutex::new(FaultCounts::default()),
            settings,
            api_key,
            calls: Mutex::new(Calls::default()),
            received: Mutex::new(std::collections::VecDeque::new()),
            client: build_client(&ClientOptions::direct(Duration::from_secs(2))),
        });
        let serving = state.clone();
        let is_tls = tls.is_some();
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        tokio::spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of descriptors, say: wait rather than spin on the error.
                        tracing::warn!(error = %e, "simulator: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let state = serving.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| handle(state.clone(), req));
                    let builder = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    );
                    let _ = match acceptor {
                        None => {
                            builder
                                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                                .await
                        }
                        Some(acceptor) => match acceptor.accept(stream).await {
                            Ok(tls) => {
                                builder
                                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                                    .await
                            }
                            Err(e) => {
                                tracing::debug!(error = %e, "simulator TLS handshake failed");
                                Ok(())
                            }
                        },
                    };
                });
            }
        });
        Simulator {
            addr,
            state,
            tls: is_tls,
        }
    }

    /// The simulator's base URL (`http://127.0.0.1:PORT`, `https://` when serving TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The requests received so far (the most recent 10 000), in order.
    pub fn received(&self) -> Vec<Received> {
        lock(&self.state.received).iter().cloned().collect()
    }

    /// The `POST /v1/calls` requests received so far.
    pub fn received_calls(&self) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| r.method == Method::POST && r.path == "/v1/calls")
            .collect()
    }

    /// Calls not yet completed or failed.
    pub fn active_calls(&self) -> usize {
        active(&self.state)
    }

    /// What happened: every call kept, with its answer's and events' fate and the gateway's
    /// reservation id; every request dropped by a fault; the faults injected by kind.
    pub fn ledger(&self) -> Value {
        ledger(&self.state)
    }
}

fn ledger(state: &State) -> Value {
    let calls: Vec<Value> = {
        let calls = lock(&state.calls);
        calls
            .order
            .iter()
            .filter_map(|id| calls.by_id.get(id))
            .map(|call| {
                let o = &call.object;
                json!({
                    "id": o["id"],
                    "status": o["status"],
                    "duration": o.get("duration"),
                    "max_duration": o["max_duration"],
                    "metadata": o["metadata"],
                    "reservation": reservation_of(call.webhook_url.as_deref()),
                    "trail": call.trail,
                })
            })
            .collect()
    };
    let dropped: Vec<Dropped> = lock(&state.dropped).iter().cloned().collect();
    let counts = lock(&state.counts).clone();
    json!({"calls": calls, "dropped": dropped, "faults": counts})
}

fn active(state: &State) -> usize {
    lock(&state.calls)
        .by_id
        .values()
        .filter(|c| !c.finished())
        .count()
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    json_response(
        status,
        &json!({"error": {"code": code, "message": message}}),
    )
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Response<Body>, Reset> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    keep_last(
        &mut lock(&state.received),
        Received {
            method: parts.method.clone(),
            path: parts.uri.path().to_string(),
            headers: parts.headers.clone(),
            body: body.clone(),
        },
        RECEIVED_KEPT,
    );
    let authorized = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {}", state.api_key));
    if !authorized {
        return Ok(error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "invalid API key",
        ));
    }
    let path = parts.uri.path();
    let faults = &state.settings.faults;
    let response = match (&parts.method, path) {
        (&Method::POST, "/v1/calls") => return create_call(&state, &parts.headers, &body).await,
        (&Method::GET, "/_sim/ledger") => json_response(StatusCode::OK, &ledger(&state)),
        (&Method::GET, p) if p.starts_with("/v1/calls/") && roll(faults.lookup_error_rate) => {
            lock(&state.counts).lookup_errors += 1;
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "simulated fault",
            )
        }
        (&Method::GET, p) if p.starts_with("/v1/calls/") => {
            let id = &p["/v1/calls/".len()..];
            match lock(&state.calls).by_id.get_mut(id) {
                Some(call) => {
                    if call.finished() {
                        call.trail.final_lookups += 1;
                        call.trail.first_final_lookup_at.get_or_insert_with(unix_ms);
                    }
                    json_response(StatusCode::OK, &call.object)
                }
                None => error(StatusCode::NOT_FOUND, "not_found", "no such call"),
            }
        }
        _ => error(StatusCode::NOT_FOUND, "not_found", "no such route"),
    };
    Ok(response)
}

/// `POST /v1/calls`, with the faults configured: an error or a reset drops the request before
/// anything is placed; a hang places the call and holds its answer back.
async fn create_call(
    state: &Arc<State>,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Response<Body>, Reset> {
    let faults: &SimFaults = &state.settings.faults;
    let drop_as = |fault: &'static str| {
        let reservation = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| reservation_of(v.get("webhook_url").and_then(Value::as_str)));
        keep_last(
            &mut lock(&state.dropped),
            Dropped { fault, reservation },
            state.settings.keep_calls,
        );
    };
    if roll(faults.error_rate) {
        drop_as("error");
        lock(&state.counts).errors += 1;
        return Ok(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "simulated fault",
        ));
    }
    if roll(faults.reset_rate) {
        drop_as("reset");
        lock(&state.counts).resets += 1;
        return Err(Reset);
    }
    let hang = roll(faults.hang_rate);
    let response = place_call(state, headers, body, hang);
    if hang && response.status().is_success() {
        lock(&state.counts).hangs += 1;
        tokio::time::sleep(Duration::from_millis(faults.hang_ms)).await;
    }
    Ok(response)
}

fn place_call(state: &Arc<State>, headers: &HeaderMap, body: &Bytes, hang: bool) -> Response<Body> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !is_json {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request",
            "Content-Type must be application/json",
        );
    }
    let Ok(Value::Object(req)) = serde_json::from_slice::<Value>(body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "body must be a JSON object",
        );
    };
    let s = &state.settings;
    let Some(to) = req.get("phone_number").and_then(Value::as_str) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_phone_number",
            "phone_number is required",
        );
    };
    if phone::parse_e164(to).is_err() {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_phone_number",
            "phone number is not valid E.164",
        );
    }
    let agent = req.get("agent_id").and_then(Value::as_str).unwrap_or("");
    if !s.agents.iter().any(|a| a == agent) {
        return error(
            StatusCode::NOT_FOUND,
            "agent_not_found",
            "the agent_id does not exist",
        );
    }
    let from = match req.get("from_number") {
        None => s.owned_numbers.first().cloned().unwrap_or_default(),
        Some(Value::String(f)) if s.owned_numbers.contains(f) => f.clone(),
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_from_number",
                "from_number is not owned by the account",
            );
        }
    };
    let max_duration = match req.get("max_duration") {
        None => 3600,
        Some(v) => match v.as_u64() {
            Some(d @ 1..=3600) => d,
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "max_duration must be 1..3600",
                );
            }
        },
    };
    if active(state) >= s.max_concurrent_calls {
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_exceeded",
            "too many concurrent calls",
        );
    }
    {
        let mut credits = lock(&state.credits_left);
        if let Some(left) = credits.as_mut() {
            let cost = max_duration.div_ceil(60);
            if *left < cost {
                return error(
                    StatusCode::PAYMENT_REQUIRED,
                    "insufficient_credits",
                    "the account has not enough credits",
                );
            }
            *left -= cost;
        }
    }
    let id = format!("call_{}", uuid::Uuid::new_v4().simple());
    let object = json!({
        "id": id,
        "status": "queued",
        "phone_number": to,
        "from_number": from,
        "agent_id": agent,
        "metadata": req.get("metadata").cloned().unwrap_or(json!({})),
        "record": req.get("record").and_then(Value::as_bool).unwrap_or(true),
        "max_duration": max_duration,
        "created_at": jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
    });
    let webhook_url = req
        .get("webhook_url")
        .and_then(Value::as_str)
        .map(str::to_string);
    lock(&state.calls).insert(
        id.clone(),
        SimCall {
            object: object.clone(),
            webhook_url,
            trail: Trail {
                answer: if hang { "withheld" } else { "sent" },
                ..Trail::default()
            },
        },
        s.keep_calls,
    );
    tokio::spawn(lifecycle(state.clone(), id, max_duration));
    json_response(StatusCode::OK, &object)
}

async fn lifecycle(state: Arc<State>, id: String, max_duration: u64) {
    let s = state.settings.clone();
    let jitter = match s.talk_jitter_ms {
        0 => 0,
        j => rand::random::<u64>() % (j + 1),
    };
    let talk = Duration::from_millis(s.talk_ms + jitter).min(Duration::from_secs(max_duration));
    let steps = [
        (Duration::from_millis(s.queue_ms), "ringing"),
        (Duration::from_millis(s.ring_ms), "in_progress"),
        (talk, "completed"),
    ];
    // The call's events go out in order from a task of their own: retries delay the events
    // after them, never the call.
    let (events, mut queue) = tokio::sync::mpsc::unbounded_channel::<(String, Value)>();
    let client = state.client.clone();
    let sender = state.clone();
    let call_id = id.clone();
    tokio::spawn(async move {
        while let Some((url, event)) = queue.recv().await {
            let delivered = deliver(&client, &url, &event).await;
            let last = event["status"] == "completed";
            if let Some(call) = lock(&sender.calls).by_id.get_mut(&call_id) {
                call.trail.events_delivered += u32::from(delivered);
                if delivered && last {
                    call.trail.final_delivered = true;
                    call.trail.final_delivered_at.get_or_insert_with(unix_ms);
                }
            }
        }
    });
    for (wait, status) in steps {
        tokio::time::sleep(wait).await;
        let (event, hook, lost) = {
            let mut calls = lock(&state.calls);
            let Some(call) = calls.by_id.get_mut(&id) else {
                return;
            };
            call.object["status"] = json!(status);
            let mut event = json!({
                "event": "call.status_changed",
                // Stable across retries: a receiver that sees it twice can tell.
                "event_id": uuid::Uuid::new_v4().to_string(),
                "call_id": id,
                "status": status,
                "timestamp": jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
            });
            if status == "completed" {
                let secs = talk.as_secs_f64().ceil() as u64;
                call.object["duration"] = json!(secs);
                event["duration"] = json!(secs);
            }
            call.trail.events += 1;
            let hook = call.webhook_url.clone();
            let lost = hook.is_some() && roll(s.faults.lost_event_rate);
            if lost {
                call.trail.events_lost += 1;
            }
            (event, hook, lost)
        };
        if lost {
            lock(&state.counts).events_lost += 1;
        } else if let Some(url) = hook {
            let _ = events.send((url, event));
        }
    }
}

/// Attempts per event, as real providers do: a connection closed under it, a timeout, a 5xx or
/// 429 is retried with backoff (100 ms, doubling), the same `event_id` each time.
const DELIVERY_ATTEMPTS: u32 = 6;

/// Whether the receiver accepted the event (a 2xx, or another answer that is not retried).
async fn deliver(client: &EventClient, url: &str, event: &Value) -> bool {
    let body = Bytes::from(event.to_string());
    let mut backoff = Duration::from_millis(100);
    for attempt in 1..=DELIVERY_ATTEMPTS {
        let Ok(request) = Request::post(url)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(body.clone()))
        else {
            return false;
        };
        let retry =
            match tokio::time::timeout(Duration::from_secs(5), client.request(request)).await {
                Ok(Ok(response)) => {
                    let status = response.status();
                    if status.is_success() {
                        return true;
                    }
                    status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS
                }
                Ok(Err(e)) => {
                    tracing::debug!(%url, attempt, error = %e, "simulator webhook delivery failed");
                    true
                }
                Err(_) => {
                    tracing::debug!(%url, attempt, "simulator webhook delivery timed out");
                    true
                }
            };
        if !retry {
            return false;
        }
        tokio::time::sleep(backoff).await;
        backoff *= 2;
    }
    tracing::debug!(%url, "simulator webhook event dropped after retries");
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(status: &str) -> SimCall {
        SimCall {
            object: json!({"status": status}),
            webhook_url: None,
            trail: Trail::default(),
        }
    }

    #[test]
    fn requests_kept_are_the_most_recent_and_bounded() {
        let mut queue = std::collections::VecDeque::new();
        for i in 0..25 {
            keep_last(&mut queue, i, 10);
        }
        assert_eq!(queue.len(), 10);
        assert_eq!(queue.front(), Some(&15));
        assert_eq!(queue.back(), Some(&24));
    }

    #[test]
    fn finished_calls_are_forgotten_oldest_first_and_live_ones_never() {
        let mut calls = Calls::default();
        calls.insert("live-0".into(), call("in_progress"), 3);
        for i in 1..=5 {
            calls.insert(format!("done-{i}"), call("completed"), 3);
        }
        // The oldest call is live: nothing behind it is forgotten yet.
        assert_eq!(calls.by_id.len(), 6);
        calls.by_id.get_mut("live-0").unwrap().object["status"] = json!("failed");
        calls.insert("done-6".into(), call("completed"), 3);
        assert_eq!(calls.by_id.len(), 3);
        let kept: Vec<_> = calls.order.iter().cloned().collect();
        assert_eq!(kept, ["done-4", "done-5", "done-6"]);
        // A live call is kept however far over the bound.
        for i in 0..5 {
            calls.insert(format!("live-{i}"), call("queued"), 3);
        }
        assert!(calls.by_id.values().filter(|c| !c.finished()).count() == 5);
    }
}
