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
/// The call the upstream accepted, read once from its answer: carried to the record stage (in
/// the response's extensions) so that it need not read the answer again.
#[derive(Clone, Debug)]
pub struct AcceptedCall {
    /// The upstream's call id.
    pub id: String,
    /// The call object as the upstream answered it.
    pub object: serde_json::Value,
}

impl AcceptedCall {
    /// The call in a successful answer; `None` if the answer has no call id.
    pub fn read(body: &[u8]) -> Option<AcceptedCall> {
        let object: serde_json::Value = serde_json::from_slice(body).ok()?;
        let id = object.get("id")?.as_str()?.to_string();
        Some(AcceptedCall { id, object })
    }
}

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
                // The call's trace rides along, so that its events' handling links to it.
                let trace = crate::telemetry::traceparent(&req.span)
                    .map(|tp| format!("?traceparent={tp}"))
                    .unwrap_or_default();
                call.webhook_url = Some(format!(
                    "{relay_base}/v1/relay/{}{trace}",
                    reservation.token
                ));
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
                req.facts.note(&req.span, "stage", "forward");
            })?;
            req.span
                .record("upstream.status_code", response.status().as_u16());
            let accepted = if response.status().is_success() {
                req.span.record("decision", "forwarded");
                let accepted = AcceptedCall::read(response.body());
                if let Some(call) = &accepted {
                    req.facts.note(&req.span, "call_id", call.id.as_str());
                }
                accepted
            } else {
                req.span.record("decision", "upstream_refused");
                req.span.record("status", response.status().as_u16());
                None
            };
            let mut response = relay(response);
            if let Some(call) = accepted {
                response.extensions_mut().insert(call);
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_accepted_call_is_read_once_from_the_answer() {
        let call = AcceptedCall::read(br#"{"id":"call_1","status":"queued"}"#).unwrap();
        assert_eq!(call.id, "call_1");
        assert_eq!(call.object["status"], "queued");
        assert!(AcceptedCall::read(br#"{"status":"queued"}"#).is_none());
        assert!(AcceptedCall::read(br#"{"id":7}"#).is_none());
        assert!(AcceptedCall::read(b"not json").is_none());
    }
}
