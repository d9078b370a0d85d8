//! THE request path. Read top to bottom: one line and one "why" per stage.
//!
//! ```text
//! 1 trace ─ 2 limits ─ 3 authenticate ─ 4 validate ─ 5 phone ─ 6 fields ─ 7 redact
//!   ─ 8a detach ─ 8 idempotency ─ 9 admission ─ 11 record ─ 10 forward
//! ```
//!
//! Record (11) wraps forward (10): it acts on the upstream's answer.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use serde_json::json;
use tower::util::BoxCloneService;
use tower::{Service, ServiceBuilder, ServiceExt};

use crate::calls::CallReader;
use crate::clock::SharedClock;
use crate::error::{Body, GatewayError, json_response};
use crate::policy::PolicyHandle;
use crate::relay::Relay;
use crate::stages::admission::AdmissionContext;
use crate::stages::authenticate::Authenticate;
use crate::stages::detach::Detach;
use crate::stages::fields::FieldPolicy;
use crate::stages::forward::Forward;
use crate::stages::idempotency::IdempotencyContext;
use crate::stages::limits::{BodyLimits, LimitsLayer, read_body};
use crate::stages::phone::PhonePolicy;
use crate::stages::record::Record;
use crate::stages::redact::Redact;
use crate::stages::trace::{RequestFacts, RequestSpan, TraceLayer};
use crate::stages::validate::Validate;
use crate::stages::{StageFuture, StageLayer, Then};
use crate::upstream::Upstream;

/// What the request path needs.
#[derive(Clone)]
pub struct AppContext {
    pub policies: PolicyHandle,
    pub upstream: Arc<Upstream>,
    pub clock: SharedClock,
    pub body_limits: BodyLimits,
    pub max_json_depth: usize,
    pub admission: AdmissionContext,
    pub idempotency: IdempotencyContext,
    pub lease_grace: Duration,
    /// The gateway's base URL as the upstream reaches it, for relay URLs.
    pub relay_base: String,
    pub relay: Relay,
    pub reader: CallReader,
    /// Requests handled at once; past it, `503 gateway_overloaded` with `Retry-After`.
    pub max_requests_in_flight: usize,
    /// The audit trail decisions are written to.
    pub audit: Arc<crate::audit::Audit>,
    /// `POST /v1/do-not-call`.
    pub optouts: crate::optouts::OptOutApi,
    /// `/v1/consents`.
    pub consents: crate::consents::ConsentApi,
}

/// A request refused by the in-flight cap (tower's load shedding), as our error.
fn shed(e: tower::BoxError) -> GatewayError {
    match e.downcast::<GatewayError>() {
        Ok(e) => *e,
        Err(e) if e.is::<tower::load_shed::error::Overloaded>() => GatewayError::Overloaded {
            message: "the gateway is handling as many requests as it may; retry shortly".into(),
            retry_after: 1,
        },
        Err(e) => GatewayError::Internal(e.to_string()),
    }
}

/// The tenant-facing service: routing inside the trace layer, `POST /v1/calls` through the stages.
pub fn app<B>(ctx: AppContext) -> BoxCloneService<Request<B>, Response<Body>, Infallible>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let create_call = ServiceBuilder::new()
        // 2. Refuse what is not JSON or is too big before reading more than the limit.
        .layer(LimitsLayer::new(ctx.body_limits, ctx.policies.clone()))
        // 3. Know the tenant first: every later rule is the tenant's rule.
        .layer(StageLayer::new(Authenticate))
        // 4. Only well-formed, schema-valid bodies reach the policy stages.
        .layer(StageLayer::new(Validate {
            max_depth: ctx.max_json_depth,
        }))
        // 5. Numbers must be real, and the destination lawful to call now.
        .layer(StageLayer::new(PhonePolicy {
            clock: ctx.clock.clone(),
        }))
        // 6. The tenant may only use its own caller ids, agents, caps and webhook hosts.
        .layer(StageLayer::new(FieldPolicy))
        // 7. Personal data never leaves the gateway; the tenant tag always does.
        .layer(StageLayer::new(Redact))
        // 8a. From here a slot may be taken: a client leaving must not cut the accounting short.
        // The rest runs in a task of its own, as one future: the async stages are joined by
        // `Then`, not tower layers.
        .service(Detach::new(
            // 8. A retried request is answered once, and never places a second call.
            Then::new(
                ctx.idempotency.clone(),
                // 9. Rate limit, then one atomic step: a slot and the worst-case cost, or nothing.
                Then::new(
                    ctx.admission.clone(),
                    // 11. Bind slot and hold to the upstream's call id, or release them at once.
                    Then::new(
                        Record {
                            store: ctx.admission.store.clone(),
                            clock: ctx.clock.clone(),
                            grace: ctx.lease_grace,
                        },
                        // 10. Swap in the account key, point events at the relay, call the
                        // upstream.
                        Forward::new(ctx.upstream.clone(), &ctx.relay_base),
                    ),
                ),
            ),
        ));

    ServiceBuilder::new()
        // 1. Every request gets an id and a span; errors become the JSON envelope here only.
        .layer(TraceLayer::for_tenants(ctx.audit.clone()))
        // Past the in-flight cap a request is refused at once (503, Retry-After), not queued:
        // memory stays bounded and admitted requests keep their latency under overload.
        .map_err(shed)
        .load_shed()
        .concurrency_limit(ctx.max_requests_in_flight.max(1))
        .service(Router {
            create_call: BoxCloneService::new(create_call),
            reader: ctx.reader,
            relay: ctx.relay,
            body_limits: ctx.body_limits,
            optouts: ctx.optouts,
            consents: ctx.consents,
        })
        .boxed_clone()
}

/// Routes tenant and upstream requests.
/// The methods a tenant-listener path has (`Allow`), or `None` for no such route.
fn allowed_methods(path: &str) -> Option<&'static str> {
    match path {
        "/v1/calls" => Some("GET, POST"),
        "/v1/do-not-call" | "/v1/consents" => Some("POST"),
        p if p.starts_with("/v1/consents/") => Some("GET, DELETE"),
        "/healthz" | "/readyz" => Some("GET"),
        p if p.starts_with("/v1/calls/") => Some("GET"),
        p if p.starts_with("/v1/relay/") => Some("POST"),
        _ => None,
    }
}

/// The request id the trace layer gave a request.
fn request_id_of<B>(req: &Request<B>) -> String {
    req.extensions()
        .get::<crate::stages::trace::RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_default()
}

struct Router<B> {
    create_call: BoxCloneService<Request<B>, Response<Body>, GatewayError>,
    reader: CallReader,
    relay: Relay,
    body_limits: BodyLimits,
    optouts: crate::optouts::OptOutApi,
    consents: crate::consents::ConsentApi,
}

impl<B> Clone for Router<B> {
    fn clone(&self) -> Self {
        Router {
            create_call: self.create_call.clone(),
            reader: self.reader.clone(),
            relay: self.relay.clone(),
            body_limits: self.body_limits,
            optouts: self.optouts.clone(),
            consents: self.consents.clone(),
        }
    }
}

impl<B> Service<Request<B>> for Router<B>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<Body>;
    type Error = GatewayError;
    type Future = StageFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let path = req.uri().path().to_string();
        let span = req
            .extensions()
            .get::<RequestSpan>()
            .map(|s| s.0.clone())
            .unwrap_or_else(tracing::Span::none);
        let facts = req
            .extensions()
            .get::<Arc<RequestFacts>>()
            .cloned()
            .unwrap_or_default();
        match (req.method().clone(), path.as_str()) {
            (Method::POST, "/v1/calls") => Box::pin(self.create_call.clone().oneshot(req)),
            (Method::GET, "/v1/calls") => {
                let reader = self.reader.clone();
                Box::pin(async move {
                    reader
                        .list(req.headers(), &span, &facts, req.uri().query())
                        .await
                })
            }
            (Method::GET, p) if p.starts_with("/v1/calls/") => {
                let reader = self.reader.clone();
                let id = p["/v1/calls/".len()..].to_string();
                Box::pin(async move { reader.get(req.headers(), &span, &facts, &id).await })
            }
            (Method::POST, p) if p.starts_with("/v1/relay/") => {
                let relay = self.relay.clone();
                let limits = self.body_limits;
                let token = p["/v1/relay/".len()..].to_string();
                // The event's handling links to the call's trace (carried in the relay URL).
                if let Some(tp) = req
                    .uri()
                    .query()
                    .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("traceparent=")))
                {
                    crate::telemetry::link(&span, tp);
                }
                Box::pin(async move {
                    let body = read_body(req.into_body(), limits).await?;
                    relay.receive(&token, body).await
                })
            }
            (Method::POST, "/v1/do-not-call") => {
                let optouts = self.optouts.clone();
                let limits = self.body_limits;
                let request_id = request_id_of(&req);
                Box::pin(async move {
                    let tenant = crate::stages::authenticate::authenticate(
                        req.headers(),
                        &optouts.policies.current(),
                    )?;
                    facts.tenant(&span, &tenant.id);
                    let body = read_body(req.into_body(), limits).await?;
                    optouts.tenant_add(&tenant, &request_id, &body).await
                })
            }
            (Method::POST, "/v1/consents") => {
                let (consents, policies) = (self.consents.clone(), self.optouts.policies.clone());
                let limits = self.body_limits;
                let request_id = request_id_of(&req);
                Box::pin(async move {
                    let tenant = crate::stages::authenticate::authenticate(
                        req.headers(),
                        &policies.current(),
                    )?;
                    facts.tenant(&span, &tenant.id);
                    let body = read_body(req.into_body(), limits).await?;
                    consents.register(&tenant, &request_id, &body).await
                })
            }
            (method @ (Method::GET | Method::DELETE), p) if p.starts_with("/v1/consents/") => {
                let (consents, policies) = (self.consents.clone(), self.optouts.policies.clone());
                let id = p["/v1/consents/".len()..].to_string();
                let request_id = request_id_of(&req);
                Box::pin(async move {
                    let tenant = crate::stages::authenticate::authenticate(
                        req.headers(),
                        &policies.current(),
                    )?;
                    facts.tenant(&span, &tenant.id);
                    match method {
                        Method::GET => consents.get(&tenant, &id).await,
                        _ => consents.revoke(&tenant, &request_id, &id).await,
                    }
                })
            }
            (Method::GET, "/healthz") => {
                Box::pin(async { Ok(json_response(StatusCode::OK, &json!({"status": "ok"}))) })
            }
            (Method::GET, "/readyz") => {
                // Policies are loaded before the listener opens; the state store must answer.
                let ready = self.reader.lifecycle.store.ready();
                Box::pin(async move {
                    Ok(match ready.await {
                        Ok(()) => json_response(StatusCode::OK, &json!({"status": "ok"})),
                        Err(e) => json_response(
                            StatusCode::SERVICE_UNAVAILABLE,
                            &json!({"status": "not_ready", "reason": e.to_string()}),
                        ),
                    })
                })
            }
            (_, p) => {
                let error = match allowed_methods(p) {
                    Some(allow) => GatewayError::MethodNotAllowed { allow },
                    None => GatewayError::NotFound("no such route"),
                };
                Box::pin(async { Err(error) })
            }
        }
    }
}
