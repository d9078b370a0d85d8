//! Stage 1: the request id, the request's span, and the edge where errors become responses.
//!
//! Every request gets an id: the client's `x-request-id` when it is a sane token (so a tenant can
//! correlate), otherwise a fresh UUIDv7. The id is returned in `x-request-id` on every answer. The
//! span carries the tenant, the decision and, when refused, the stage and the reason; stages record
//! those fields as they learn them. Inner services fail with [`GatewayError`]; this layer is the one
//! place that turns an error into the JSON envelope.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use http::{HeaderValue, Request, Response};
use tower::{Layer, Service};
use tracing::Instrument;

use crate::error::{Body, GatewayError};

/// The request id, as a request extension.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// The request's span, as a request extension.
#[derive(Debug, Clone)]
pub struct RequestSpan(pub tracing::Span);

/// What the request's stages learn that its metrics need, as a request extension: the tenant,
/// once authenticated (a tenant id from the policies, never a value from the request).
#[derive(Debug, Default)]
pub struct RequestFacts {
    tenant: std::sync::OnceLock<String>,
    /// Whether an audit line is written for this request (else notes go to the span only).
    audited: bool,
    /// What the stages noted for the audit line (stage, rule, destination, call id, hold).
    noted: std::sync::Mutex<serde_json::Map<String, serde_json::Value>>,
}

impl RequestFacts {
    /// Facts that keep every note (a dry run reports them).
    pub fn recording() -> Self {
        RequestFacts {
            audited: true,
            ..RequestFacts::default()
        }
    }

    /// The request is the tenant's: on the span and in the facts.
    pub fn tenant(&self, span: &tracing::Span, id: &str) {
        span.record("tenant", id);
        let _ = self.tenant.set(id.to_string());
    }

    /// Record `field` on the span and keep it for the audit line.
    pub fn note(
        &self,
        span: &tracing::Span,
        field: &'static str,
        value: impl Into<serde_json::Value>,
    ) {
        let value = value.into();
        match &value {
            serde_json::Value::String(s) => span.record(field, s.as_str()),
            other => span.record(field, other.to_string().as_str()),
        };
        if self.audited {
            self.noted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(field.to_string(), value);
        }
    }

    /// What the stages noted (kept when the facts record notes).
    pub fn noted(&self) -> serde_json::Map<String, serde_json::Value> {
        self.noted.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// Header carrying the request id both ways.
pub const REQUEST_ID: &str = "x-request-id";

fn client_request_id<B>(req: &Request<B>) -> Option<String> {
    let value = req.headers().get(REQUEST_ID)?.to_str().ok()?;
    let ok = !value.is_empty()
        && value.len() <= 128
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    ok.then(|| value.to_string())
}

/// Adds [`Trace`].
#[derive(Debug, Clone, Default)]
pub struct TraceLayer {
    metrics: bool,
    audit: Option<Arc<crate::audit::Audit>>,
}

impl TraceLayer {
    /// The tenant API's: every answer also counted in the request metrics, and every decision
    /// on `POST /v1/calls` written to the audit trail before the answer leaves.
    pub fn for_tenants(audit: Arc<crate::audit::Audit>) -> Self {
        TraceLayer {
            metrics: true,
            audit: audit.is_on().then_some(audit),
        }
    }
}

impl<S> Layer<S> for TraceLayer {
    type Service = Trace<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Trace {
            inner,
            metrics: self.metrics,
            audit: self.audit.clone(),
        }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct Trace<S> {
    inner: S,
    metrics: bool,
    audit: Option<Arc<crate::audit::Audit>>,
}

impl<S, B> Service<Request<B>> for Trace<S>
where
    S: Service<Request<B>, Response = Response<Body>, Error = GatewayError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The inner services are always ready (they hold no capacity of their own).
        match self.inner.poll_ready(cx) {
            Poll::Ready(_) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let id = client_request_id(&req).unwrap_or_else(crate::hexstr::uuid_v7);
        // Relay URLs carry a call's secret token: it never goes into a log line.
        let path = match req.uri().path() {
            p if p.starts_with("/v1/relay/") => "/v1/relay/***",
            p => p,
        }
        .to_string();
        // The server span of the request's trace (OpenTelemetry HTTP semantic conventions; the
        // `otel.*` fields name and kind it), continuing the client's `traceparent` if it sent one.
        let route = match path.as_str() {
            p if p.starts_with("/v1/calls/") => "/v1/calls/{id}",
            p if p.starts_with("/v1/relay/") => "/v1/relay/{token}",
            p => p,
        };
        let span = tracing::info_span!(
            "request",
            "otel.name" = %format_args!("{} {route}", req.method()),
            "otel.kind" = "server",
            "otel.status_code" = tracing::field::Empty,
            "http.request.method" = %req.method(),
            "url.path" = %path,
            "http.route" = %route,
            "http.response.status_code" = tracing::field::Empty,
            request_id = %id,
            method = %req.method(),
            path = %path,
            tenant = tracing::field::Empty,
            destination = tracing::field::Empty,
            decision = tracing::field::Empty,
            stage = tracing::field::Empty,
            rule = tracing::field::Empty,
            reason = tracing::field::Empty,
            call_id = tracing::field::Empty,
            status = tracing::field::Empty,
            code = tracing::field::Empty,
            "upstream.status_code" = tracing::field::Empty,
        );
        crate::telemetry::continue_trace(&span, req.headers());
        req.extensions_mut().insert(RequestId(id.clone()));
        req.extensions_mut().insert(RequestSpan(span.clone()));
        let metrics = self.metrics;
        let audit = self
            .audit
            .clone()
            .filter(|_| req.method() == http::Method::POST && req.uri().path() == "/v1/calls");
        let facts = Arc::new(RequestFacts {
            audited: audit.is_some(),
            ..RequestFacts::default()
        });
        req.extensions_mut().insert(facts.clone());
        let started = Instant::now();
        let future = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        let outer = span.clone();
        Box::pin(
            async move {
                let mut code = "ok";
                let mut response = match future.await {
                    Ok(response) => response,
                    Err(error) => {
                        code = error.code();
                        let decision = if error.status().is_server_error() {
                            "failed"
                        } else {
                            "denied"
                        };
                        outer.record("decision", decision);
                        outer.record("reason", error.public_message().as_str());
                        outer.record("status", error.code());
                        outer.record("code", error.code());
                        error.into_response(&id)
                    }
                };
                if let Ok(value) = HeaderValue::from_str(&id) {
                    response.headers_mut().insert(REQUEST_ID, value);
                }
                let elapsed = started.elapsed();
                if let Some(audit) = &audit {
                    let status = response.status().as_u16();
                    let mut line = facts.noted();
                    line.insert("request_id".into(), id.clone().into());
                    if let Some(tp) = crate::telemetry::traceparent(&outer) {
                        let trace_id = tp.split('-').nth(1).unwrap_or("").to_string();
                        line.insert("trace_id".into(), trace_id.into());
                    }
                    line.insert(
                        "tenant".into(),
                        facts
                            .tenant
                            .get()
                            .cloned()
                            .map_or(serde_json::Value::Null, Into::into),
                    );
                    let decision = match status {
                        200..=299 => "allowed",
                        500.. => "failed",
                        _ => "denied",
                    };
                    line.insert("decision".into(), decision.into());
                    line.insert("http_status".into(), status.into());
                    line.insert("code".into(), code.into());
                    audit.record("decision", line);
                }
                outer.record("http.response.status_code", response.status().as_u16());
                if response.status().is_server_error() {
                    outer.record("otel.status_code", "ERROR");
                }
                if metrics {
                    let tenant = facts.tenant.get().map_or("none", String::as_str);
                    crate::metrics::request(tenant, response.status().as_u16(), code, elapsed);
                }
                tracing::info!(
                    http_status = response.status().as_u16(),
                    latency_us = elapsed.as_micros() as u64,
                    "request finished"
                );
                Ok(response)
            }
            .instrument(span),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;
    use tower::ServiceExt;

    #[tokio::test]
    async fn errors_become_envelopes_with_the_request_id() {
        let svc = TraceLayer::default().layer(tower::service_fn(|_req: Request<()>| async {
            Err::<Response<Body>, _>(GatewayError::Unauthorized("missing bearer token"))
        }));
        let req = Request::builder()
            .header(REQUEST_ID, "abc-123")
            .body(())
            .unwrap();
        let response = svc.oneshot(req).await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(response.headers()[REQUEST_ID], "abc-123");
    }

    #[tokio::test]
    async fn a_request_id_is_made_when_the_clients_is_unusable() {
        let svc = TraceLayer::default().layer(tower::service_fn(|req: Request<()>| async move {
            let id = req.extensions().get::<RequestId>().unwrap().0.clone();
            Ok::<_, GatewayError>(Response::new(Body::from(id)))
        }));
        let req = Request::builder()
            .header(REQUEST_ID, "bad id with spaces")
            .body(())
            .unwrap();
        let response = svc.oneshot(req).await.unwrap();
        let id = response.headers()[REQUEST_ID].to_str().unwrap();
        assert_eq!(id.len(), 36, "{id}");
    }
}
