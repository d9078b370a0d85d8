//! THE request path. Read top to bottom: one line and one "why" per stage.
//!
//! ```text
//! 1 trace ─ 2 limits ─ 3 authenticate ─ 4 validate ─ 5 phone ─ 6 fields ─ 7 redact ─ 10 forward
//! ```
//!
//! Stages 8 (idempotency), 9 (admission) and 11 (call record) join with the admission work.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use serde_json::json;
use tower::util::BoxCloneService;
use tower::{Service, ServiceBuilder, ServiceExt};

use crate::clock::SharedClock;
use crate::error::{Body, GatewayError, json_response};
use crate::policy::PolicyHandle;
use crate::stages::StageLayer;
use crate::stages::authenticate::Authenticate;
use crate::stages::fields::FieldPolicy;
use crate::stages::forward::Forward;
use crate::stages::limits::{BodyLimits, LimitsLayer};
use crate::stages::phone::PhonePolicy;
use crate::stages::redact::Redact;
use crate::stages::trace::TraceLayer;
use crate::stages::validate::Validate;
use crate::upstream::Upstream;

/// What the request path needs.
#[derive(Clone)]
pub struct AppContext {
    pub policies: PolicyHandle,
    pub upstream: Arc<Upstream>,
    pub clock: SharedClock,
    pub max_body_bytes: usize,
    pub max_json_depth: usize,
    pub body_read_timeout: Duration,
}

/// The tenant-facing service: routing inside the trace layer, `POST /v1/calls` through the stages.
pub fn app<B>(ctx: AppContext) -> BoxCloneService<Request<B>, Response<Body>, Infallible>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let create_call = ServiceBuilder::new()
        // 2. Refuse what is not JSON or is too big before reading more than the limit.
        .layer(LimitsLayer::new(
            BodyLimits {
                max_bytes: ctx.max_body_bytes,
                read_timeout: ctx.body_read_timeout,
            },
            ctx.policies.clone(),
        ))
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
        // 10. Swap in the account key and call the upstream.
        .service(Forward::new(ctx.upstream.clone()));

    ServiceBuilder::new()
        // 1. Every request gets an id and a span; errors become the JSON envelope here only.
        .layer(TraceLayer)
        .service(Router {
            create_call: BoxCloneService::new(create_call),
        })
        .boxed_clone()
}

/// Routes tenant requests.
struct Router<B> {
    create_call: BoxCloneService<Request<B>, Response<Body>, GatewayError>,
}

impl<B> Clone for Router<B> {
    fn clone(&self) -> Self {
        Router {
            create_call: self.create_call.clone(),
        }
    }
}

impl<B: Send + 'static> Service<Request<B>> for Router<B> {
    type Response = Response<Body>;
    type Error = GatewayError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, GatewayError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let path = req.uri().path();
        match (req.method(), path) {
            (&Method::POST, "/v1/calls") => Box::pin(self.create_call.clone().oneshot(req)),
            (&Method::GET, "/healthz") | (&Method::GET, "/readyz") => {
                Box::pin(async { Ok(json_response(StatusCode::OK, &json!({"status": "ok"}))) })
            }
            (_, "/v1/calls" | "/healthz" | "/readyz") => {
                Box::pin(async { Err(GatewayError::MethodNotAllowed) })
            }
            _ => Box::pin(async { Err(GatewayError::NotFound("no such route")) }),
        }
    }
}
