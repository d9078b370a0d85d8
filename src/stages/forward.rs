//! Stage 10: forward. The call, as the policy stages left it, is sent to the upstream with the
//! account's key (the tenant's key goes no further than `authenticate`). The upstream's answer is
//! relayed unchanged; failures to reach it are `upstream_unavailable` / `upstream_timeout`.
//! When the call holds a reservation, `webhook_url` is pointed at the gateway's relay with the
//! call's token, so its events come back through the gateway (which forwards them, signed, to
//! the tenant's own webhook).

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Response};
use tower::Service;

use super::CallRequest;
use crate::error::{Body, GatewayError};
use crate::upstream::{Upstream, relay};

/// See the module docs.
#[derive(Clone, Debug)]
pub struct Forward {
    upstream: Arc<Upstream>,
    relay_base: Arc<str>,
}

impl Forward {
    /// `relay_base` is the gateway's public base URL (`https://callgate.example.com`).
    pub fn new(upstream: Arc<Upstream>, relay_base: &str) -> Self {
        Forward {
            upstream,
            relay_base: relay_base.trim_end_matches('/').into(),
        }
    }
}

impl Service<CallRequest> for Forward {
    type Response = Response<Body>;
    type Error = GatewayError;
    type Future = crate::stages::StageFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: CallRequest) -> Self::Future {
        let upstream = self.upstream.clone();
        let relay_base = self.relay_base.clone();
        Box::pin(async move {
            let mut call = req
                .call
                .clone()
                .ok_or_else(|| GatewayError::Internal("forward ran before validate".into()))?;
            if let Some(reservation) = &req.reservation {
                call.webhook_url = Some(format!("{relay_base}/v1/relay/{}", reservation.token));
            }
            let body = serde_json::to_vec(&call)
                .map_err(|e| GatewayError::Internal(format!("serializing the call: {e}")))?;
            let result = upstream
                .send(
                    Method::POST,
                    "/v1/calls",
                    Some(Bytes::from(body)),
                    &req.request_id,
                )
                .await;
            let response = result.inspect_err(|_| {
                req.span.record("stage", "forward");
            })?;
            if response.status().is_success() {
                req.span.record("decision", "forwarded");
                if let Some(id) = serde_json::from_slice::<serde_json::Value>(response.body())
                    .ok()
                    .and_then(|v| v.get("id").and_then(|id| id.as_str()).map(str::to_string))
                {
                    req.span.record("call_id", id.as_str());
                }
            } else {
                req.span.record("decision", "upstream_refused");
                req.span.record("status", response.status().as_u16());
            }
            Ok(relay(response))
        })
    }
}
