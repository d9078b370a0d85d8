//! Stage 8: idempotency. A `POST /v1/calls` with an `Idempotency-Key` is answered once: a retry
//! with the same key and the same body gets the first answer again (`Idempotent-Replayed: true`)
//! and never places a second call, also while the first is still in flight (the retry waits for
//! it). The same key with another body is `409 idempotency_conflict`. Keys are per tenant and kept
//! `idempotency.ttl_secs`. Answers worth retrying (rate limits, credits, gateway-side failures)
//! are not kept: the key is freed so that a retry can succeed.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};

use super::{AsyncStage, CallRequest, Next};
use crate::clock::SharedClock;
use crate::error::{Body, GatewayError};
use crate::state::{IdempotencyBegin, IdempotencyClaim, StateStore, StoredResponse};
use crate::tasks::First;
use tracing::Instrument;

/// The request header.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Set on replayed answers.
pub const REPLAYED: &str = "idempotent-replayed";

/// What idempotency needs.
#[derive(Clone)]
pub struct IdempotencyContext {
    pub store: Arc<dyn StateStore>,
    pub clock: SharedClock,
    pub ttl: Duration,
    /// How long a retry waits for the first request with its key to finish.
    pub wait: Duration,
}

/// The key from the headers, checked: 1-255 visible ASCII characters.
fn key_of(req: &CallRequest) -> Result<Option<String>, GatewayError> {
    let Some(value) = req.headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let bad = || {
        GatewayError::invalid(
            "Idempotency-Key",
            "Idempotency-Key must be 1 to 255 visible ASCII characters",
        )
    };
    let key = value.to_str().map_err(|_| bad())?;
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad());
    }
    Ok(Some(key.to_string()))
}

/// Whether an answer is final for its key (a retry should see it again) or worth retrying.
fn is_final(status: StatusCode) -> bool {
    !(status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::PAYMENT_REQUIRED
        || status.is_server_error())
}

fn replay(stored: StoredResponse) -> Response<Body> {
    let mut response = Response::new(Body::from(stored.body));
    *response.status_mut() = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    if let Ok(ct) = HeaderValue::from_str(&stored.content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    response
        .headers_mut()
        .insert(REPLAYED, HeaderValue::from_static("true"));
    response
}

impl AsyncStage for IdempotencyContext {
    const NAME: &'static str = "idempotency";

    async fn run<N: Next>(
        self: Arc<Self>,
        req: CallRequest,
        next: N,
    ) -> Result<Response<Body>, GatewayError> {
        let ctx = self;
        let Some(key) = key_of(&req)? else {
            return next.call(req).await;
        };
        let tenant = req.tenant()?.id.clone();
        // The body as the tenant sent it, canonicalised (key order, whitespace).
        let canonical = serde_json::from_slice::<serde_json::Value>(&req.body)
            .map(|v| v.to_string().into_bytes())
            .unwrap_or_else(|_| req.body.to_vec());
        let body_hash = crate::hexstr::lower(Sha256::digest(&canonical));
        let deadline = tokio::time::Instant::now() + ctx.wait;
        let claim = loop {
            let now = ctx.clock.now().as_microsecond();
            let expires = now + ctx.ttl.as_micros() as i64;
            match ctx
                .store
                .idempotency_begin(&tenant, &key, &body_hash, now, expires)
                .await?
            {
                IdempotencyBegin::Proceed => {
                    break IdempotencyClaim {
                        body_hash,
                        created_at: now,
                        expires_at: expires,
                    };
                }
                IdempotencyBegin::Replay(stored) => {
                    req.span.record("decision", "replayed");
                    return Ok(replay(stored));
                }
                IdempotencyBegin::Conflict => {
                    req.facts.note(&req.span, "stage", "idempotency");
                    return Err(GatewayError::IdempotencyConflict(
                        "this Idempotency-Key was used with a different request body".into(),
                    ));
                }
                IdempotencyBegin::InFlight => {
                    if tokio::time::Instant::now() >= deadline {
                        req.facts.note(&req.span, "stage", "idempotency");
                        return Err(GatewayError::IdempotencyConflict(
                            "a request with this Idempotency-Key is still in progress".into(),
                        ));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        let request_id = req.request_id.clone();
        let result = next.call(req).await;
        let response = match result {
            Ok(response) if is_final(response.status()) => response,
            Err(e @ (GatewayError::UpstreamTimeout | GatewayError::UpstreamLost)) => {
                // No answer came back: the upstream may have placed the call. The key keeps
                // this answer, so a retry is told the same rather than placing a second
                // call (the call, if placed, shows in `GET /v1/calls` once its events come).
                let (parts, body) = e.response(&request_id).into_parts();
                let bytes = body
                    .collect()
                    .await
                    .map(|c| c.to_bytes())
                    .unwrap_or_default();
                let stored = StoredResponse {
                    status: parts.status.as_u16(),
                    body: bytes.to_vec(),
                    content_type: "application/json".into(),
                };
                keep_answer(ctx.store.clone(), tenant, key, claim, stored).await;
                return Err(e);
            }
            other => {
                // The client gets this answer whatever the store says; a key the store
                // cannot give up now is given up in the background.
                if ctx.store.idempotency_abandon(&tenant, &key).await.is_err() {
                    let store = ctx.store.clone();
                    let gave_up =
                        "giving up an idempotency key failed; it stays in flight until its TTL";
                    crate::tasks::spawn(
                        crate::tasks::retry(First::AfterWait, gave_up, move || {
                            store.idempotency_abandon(&tenant, &key)
                        })
                        .in_current_span(),
                    );
                }
                return other;
            }
        };
        let (parts, body) = response.into_parts();
        let bytes = body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json")
            .to_string();
        let stored = StoredResponse {
            status: parts.status.as_u16(),
            body: bytes.to_vec(),
            content_type,
        };
        keep_answer(ctx.store.clone(), tenant, key, claim, stored).await;
        Ok(Response::from_parts(parts, Body::from(bytes)))
    }
}

/// Keep a key's final answer. Queued before the answer goes out, committed with the next batch:
/// the answer does not wait for the commit (a retry meanwhile sees the key in flight and waits).
/// The client gets its answer even if the store cannot keep it now: it is kept in the background.
async fn keep_answer(
    store: Arc<dyn StateStore>,
    tenant: String,
    key: String,
    claim: IdempotencyClaim,
    stored: StoredResponse,
) {
    let complete = store
        .idempotency_complete(&tenant, &key, claim.clone(), stored.clone())
        .await;
    crate::tasks::spawn(
        async move {
            let first = match complete {
                Ok(queued) => queued.await,
                Err(e) => Err(e),
            };
            if let Err(e) = first {
                tracing::warn!(%tenant, error = %e, "storing the idempotent answer failed; retrying");
                let gave_up =
                    "storing the idempotent answer failed; the key stays in flight until its TTL";
                crate::tasks::retry(First::AfterWait, gave_up, || {
                    let queued =
                        store.idempotency_complete(&tenant, &key, claim.clone(), stored.clone());
                    async move { queued.await?.await }
                })
                .await;
            }
        }
        .in_current_span(),
    );
}
