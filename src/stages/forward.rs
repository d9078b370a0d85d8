//! Stage 10: forward. The call, as the policy stages left it, is sent to the upstream with the
//! account's key (the tenant's key goes no further than `authenticate`). The upstream's answer is
//! relayed unchanged; failures to reach it are `upstream_unavailable` / `upstream_timeout`.
//! When the call holds a reservation, `webhook_url` is pointed at the gateway's relay with the
//! call's token, so its events come back through the gateway (which forwards them, signed, to
//! the tenant's own webhook).

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Response};

use super::CallRequest;
use crate::error::{Body, GatewayError};
use crate::state::Answered;
use crate::upstream::{Upstream, relay};

/// See the module docs.
/// The call the upstream accepted, read once from its answer: carried to the record stage (in
/// the response's extensions) so that it need not read the answer again.
#[derive(Clone, Debug)]
pub struct AcceptedCall {
    /// The upstream's call id.
    pub id: String,
    /// The call object as the upstream answered it, and its status.
    pub answered: Answered,
}

/// What the record stage needs of an answer: its call id and status; every other field is
/// checked as JSON and skipped, not built into a tree.
#[derive(serde::Deserialize)]
struct Head<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow, default)]
    status: Option<Status<'a>>,
}

/// An answer's `status`: a string, or anything else (then the call is `queued`).
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Status<'a> {
    Named(#[serde(borrow)] Cow<'a, str>),
    Other(serde::de::IgnoredAny),
}

impl AcceptedCall {
    /// The call in a successful answer (a JSON object); `None` if it has no call id.
    pub fn read(body: &[u8]) -> Option<AcceptedCall> {
        let text = std::str::from_utf8(body).ok()?;
        // An object, not an array a struct could also be read from.
        if !text.trim_start().starts_with('{') {
            return None;
        }
        let (id, status) = match serde_json::from_str::<Head>(text) {
            Ok(head) => (
                head.id.into_owned(),
                match head.status {
                    Some(Status::Named(status)) => status.into_owned(),
                    Some(Status::Other(_)) | None => crate::state::accounting::QUEUED.to_string(),
                },
            ),
            // Not what the head reads (no string id, or a key given twice, where a tree keeps
            // the last): read as a tree, as before.
            Err(_) => {
                let object: serde_json::Value = serde_json::from_str(text).ok()?;
                let id = object.get("id")?.as_str()?.to_string();
                (id, Answered::from(object).status)
            }
        };
        Some(AcceptedCall {
            id,
            answered: Answered {
                object: text.into(),
                status,
            },
        })
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

impl super::Next for Forward {
    fn call(
        self,
        mut req: CallRequest,
    ) -> impl Future<Output = Result<Response<Body>, GatewayError>> + Send {
        let Forward {
            upstream,
            relay_base,
        } = self;
        // Boxed: the upstream client's future is large, and every stage before this one would
        // otherwise copy it each time it moves.
        Box::pin(async move {
            // Taken, not copied: nothing after this stage reads the request's call.
            let mut call = req
                .call
                .take()
                .ok_or_else(|| GatewayError::Internal("forward ran before validate".into()))?;
            if let Some(reservation) = &req.reservation {
                // The call's trace rides along, so that its events' handling links to it.
                let traceparent = crate::telemetry::traceparent(&req.span);
                let query = if traceparent.is_some() {
                    "?traceparent="
                } else {
                    ""
                };
                // Joined, not `format!`ed: the formatting machinery costs more than the copy.
                call.webhook_url = Some(
                    [
                        relay_base.as_ref(),
                        "/v1/relay/",
                        &reservation.token,
                        query,
                        traceparent.as_deref().unwrap_or_default(),
                    ]
                    .concat(),
                );
            }
            // Sized once (`serde_json::to_vec` starts at 128 bytes and grew twice a call): the
            // call is the tenant's body (within the size limit) rewritten, plus the relay URL
            // and the tenant tag.
            let url = call.webhook_url.as_ref().map_or(0, String::len);
            let mut body = Vec::with_capacity(req.body.len() + url + 128);
            serde_json::to_writer(&mut body, &call)
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
        let body = br#"{"id":"call_1","status":"ringing","to":{"n":[1,2]}}"#;
        let call = AcceptedCall::read(body).unwrap();
        assert_eq!(call.id, "call_1");
        assert_eq!(call.answered.status, "ringing");
        // Kept as the upstream sent it.
        assert_eq!(call.answered.object.as_bytes(), body);
        // Read as a tree would read it: the status named, or `queued`.
        for body in [
            &br#"{"id":"call_\u0031","status":"ringing"}"#[..],
            br#"{"id":"c","status":7}"#,
            br#"{"id":"c","status":null}"#,
            br#" {"status":{"a":1},"id":"c"}"#,
            br#"{"id":"c"}"#,
            br#"{"id":"first","status":"ringing","id":"second"}"#,
        ] {
            let value: serde_json::Value = serde_json::from_slice(body).unwrap();
            let call = AcceptedCall::read(body).unwrap();
            assert_eq!(call.id, value["id"].as_str().unwrap());
            assert_eq!(call.answered.status, Answered::from(value).status);
            assert_eq!(call.answered.object.as_bytes(), body);
        }
        assert!(AcceptedCall::read(br#"{"status":"queued"}"#).is_none());
        assert!(AcceptedCall::read(br#"{"id":7}"#).is_none());
        assert!(AcceptedCall::read(br#"["call_1"]"#).is_none());
        assert!(AcceptedCall::read(br#"{"id":"c"} trailing"#).is_none());
        assert!(AcceptedCall::read(b"not json").is_none());
    }
}
