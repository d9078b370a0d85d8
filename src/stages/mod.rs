//! The stages of `POST /v1/calls`, one module each. `stack.rs` puts them in order.
//!
//! Stages 1 and 2 work on the raw HTTP request; from stage 3 on, the request is a [`CallRequest`]
//! and most stages are synchronous checks that either pass it on (possibly rewritten) or refuse it.
//! Such a check implements [`Stage`] and becomes a tower layer through [`StageLayer`]; a refusal
//! short-circuits with a ready error, so nothing after it runs. From stage 8 on, the stages
//! await the state store or the upstream and act on what the rest of the path answers: each
//! implements [`AsyncStage`], and [`Then`] joins it to the rest ([`Next`]), which
//! [`detach::Detach`] runs in a task of its own.

pub mod admission;
pub mod authenticate;
pub mod detach;
pub mod fields;
pub mod forward;
pub mod idempotency;
pub mod limits;
pub mod phone;
pub mod record;
pub mod redact;
pub mod trace;
pub mod validate;

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::future::{Either, Ready, ready};
use http::{HeaderMap, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::future::Future;
use std::pin::Pin;
use tower::{Layer, Service};

use crate::error::{Body, GatewayError};
use crate::policy::{Policies, Tenant};

/// The body of `POST /v1/calls`, as documented by the upstream. The schema has already rejected
/// unknown fields and wrong types by the time this is built.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateCall {
    pub phone_number: String,
    pub agent_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_number: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_duration: Option<u32>,
}

/// A call request on its way through the stages. Its `Debug` shows neither the headers (the
/// tenant's bearer key) nor the body and call (unredacted personal data).
pub struct CallRequest {
    /// The request id (`x-request-id`).
    pub request_id: String,
    /// The request's span; stages record the tenant and their verdict on it.
    pub span: tracing::Span,
    /// What the request's metrics need (the tenant, once authenticated).
    pub facts: Arc<trace::RequestFacts>,
    /// The request headers (the tenant's `Authorization` among them).
    pub headers: HeaderMap,
    /// The raw body, within the size limit.
    pub body: Bytes,
    /// The policy snapshot this request is judged by.
    pub policies: Arc<Policies>,
    /// Set by `authenticate`.
    pub tenant: Option<Arc<Tenant>>,
    /// Set by `validate`, rewritten by the policy stages.
    pub call: Option<CreateCall>,
    /// The destination, parsed by the phone stage.
    pub destination: Option<crate::phone::Number>,
    /// Set by `admission`: the slot and hold taken for this call.
    pub reservation: Option<admission::Reservation>,
    /// Releases the reservation if the request ends without binding or releasing it.
    pub reservation_guard: Option<admission::ReservationGuard>,
}

impl std::fmt::Debug for CallRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallRequest")
            .field("request_id", &self.request_id)
            .field("tenant", &self.tenant.as_ref().map(|t| t.id.as_str()))
            .field("body_bytes", &self.body.len())
            .field("validated", &self.call.is_some())
            .field(
                "reservation",
                &self.reservation.as_ref().map(|r| r.id.as_str()),
            )
            .finish_non_exhaustive()
    }
}

impl CallRequest {
    pub fn new(
        request_id: String,
        span: tracing::Span,
        headers: HeaderMap,
        body: Bytes,
        policies: Arc<Policies>,
    ) -> Self {
        CallRequest {
            request_id,
            span,
            facts: Arc::default(),
            headers,
            body,
            policies,
            tenant: None,
            call: None,
            destination: None,
            reservation: None,
            reservation_guard: None,
        }
    }

    /// The authenticated tenant; an internal error if a stage runs before `authenticate`.
    pub fn tenant(&self) -> Result<&Arc<Tenant>, GatewayError> {
        self.tenant
            .as_ref()
            .ok_or_else(|| GatewayError::Internal("stage ran before authenticate".into()))
    }

    /// The tenant and the validated body, for the policy stages.
    pub fn parts_mut(&mut self) -> Result<(&Arc<Tenant>, &mut CreateCall), GatewayError> {
        match (&self.tenant, &mut self.call) {
            (Some(t), Some(c)) => Ok((t, c)),
            _ => Err(GatewayError::Internal(
                "policy stage ran before authenticate/validate".into(),
            )),
        }
    }
}

/// A synchronous check or rewrite of a call request.
pub trait Stage: Send + Sync + 'static {
    /// The stage's name in logs and traces (`stage` field) when it refuses a request.
    const NAME: &'static str;
    /// Check (and possibly rewrite) the request; an error refuses it.
    fn apply(&self, req: &mut CallRequest) -> Result<(), GatewayError>;
}

/// Turns a [`Stage`] into a tower layer.
#[derive(Debug)]
pub struct StageLayer<S>(Arc<S>);

impl<S> StageLayer<S> {
    pub fn new(stage: S) -> Self {
        StageLayer(Arc::new(stage))
    }
}

impl<S> Clone for StageLayer<S> {
    fn clone(&self) -> Self {
        StageLayer(self.0.clone())
    }
}

impl<S, I> Layer<I> for StageLayer<S> {
    type Service = StageService<S, I>;
    fn layer(&self, inner: I) -> Self::Service {
        StageService {
            stage: self.0.clone(),
            inner,
        }
    }
}

/// The service a [`StageLayer`] makes: runs the stage, then the rest of the stack.
#[derive(Debug)]
pub struct StageService<S, I> {
    stage: Arc<S>,
    inner: I,
}

impl<S, I: Clone> Clone for StageService<S, I> {
    fn clone(&self) -> Self {
        StageService {
            stage: self.stage.clone(),
            inner: self.inner.clone(),
        }
    }
}

impl<S, I> Service<CallRequest> for StageService<S, I>
where
    S: Stage,
    I: Service<CallRequest, Response = Response<Body>, Error = GatewayError>,
{
    type Response = Response<Body>;
    type Error = GatewayError;
    type Future = Either<I::Future, Ready<Result<Response<Body>, GatewayError>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: CallRequest) -> Self::Future {
        // A span per stage that ran (a child of the request's; debug level: traces only).
        let span = tracing::debug_span!(parent: &req.span, "stage", "otel.name" = S::NAME);
        let _entered = span.enter();
        match self.stage.apply(&mut req) {
            Ok(()) => Either::Left(self.inner.call(req)),
            Err(error) => {
                req.facts.note(&req.span, "stage", S::NAME);
                Either::Right(ready(Err(error)))
            }
        }
    }
}

/// The future every call-path service returns.
pub type StageFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, GatewayError>> + Send>>;

/// The rest of the call path after an [`AsyncStage`]: called once, with the request.
///
/// The async stages and [`forward`] are joined by this trait rather than as tower layers: the
/// chain is one type ([`Then`]), cloned once per request, and a stage calls the next one
/// directly, without a service clone, a readiness poll or a `Oneshot` at each stage (see
/// docs/benchmarks.md, "The async stages joined without tower").
pub trait Next: Send + 'static {
    fn call(
        self,
        req: CallRequest,
    ) -> impl Future<Output = Result<Response<Body>, GatewayError>> + Send;
}

/// A stage that must await something (the state store, the upstream's answer) and may act on
/// what the rest of the path answers. `next` is the rest of the path.
pub trait AsyncStage: Send + Sync + 'static {
    /// The stage's name in traces.
    const NAME: &'static str;
    fn run<N: Next>(
        self: Arc<Self>,
        req: CallRequest,
        next: N,
    ) -> impl Future<Output = Result<Response<Body>, GatewayError>> + Send;
}

/// An [`AsyncStage`], then the rest of the path.
#[derive(Debug)]
pub struct Then<S, N> {
    stage: Arc<S>,
    next: N,
}

impl<S, N> Then<S, N> {
    pub fn new(stage: S, next: N) -> Self {
        Then {
            stage: Arc::new(stage),
            next,
        }
    }
}

impl<S, N: Clone> Clone for Then<S, N> {
    fn clone(&self) -> Self {
        Then {
            stage: self.stage.clone(),
            next: self.next.clone(),
        }
    }
}

impl<S: AsyncStage, N: Next> Next for Then<S, N> {
    fn call(
        self,
        req: CallRequest,
    ) -> impl Future<Output = Result<Response<Body>, GatewayError>> + Send {
        // A span per stage that ran (a child of the request's; debug level: traces only).
        let span = tracing::debug_span!(parent: &req.span, "stage", "otel.name" = S::NAME);
        // Boxed, so that a stage's future holds the next one's as a pointer: unboxed, the chain
        // is one future of several kilobytes, copied whole each time it moves (measured: more
        // instructions per request than the boxes cost).
        Box::pin(tracing::Instrument::instrument(
            self.stage.run(req, self.next),
            span,
        ))
    }
}
