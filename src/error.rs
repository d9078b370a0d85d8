//! The gateway's error type and its JSON envelope.
//!
//! Every rejection the gateway makes is one variant of [`GatewayError`]; [`GatewayError::into_response`]
//! is the only place an error becomes an HTTP response:
//!
//! ```json
//! {"error": {"code": "invalid_request", "message": "...", "request_id": "...", "param": "/max_duration"}}
//! ```
//!
//! Internal failures are answered generically (`internal_error`) and their detail goes to the log,
//! never to the client.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use serde_json::json;

/// The body type of every response the gateway builds.
pub type Body = Full<Bytes>;

/// Why a request was refused, or what went wrong while serving it.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The body exceeds `server.max_body_bytes`.
    #[error("request body exceeds the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// The request is not `application/json`.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// No, malformed or unknown credentials.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// The body is not acceptable: malformed JSON, a schema violation, a policy conflict.
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
    },
    /// `phone_number` is not a valid E.164 number in its numbering plan.
    #[error("{message}")]
    InvalidPhoneNumber { message: String, param: String },
    /// `from_number` is not a number this tenant may call from.
    #[error("{0}")]
    InvalidFromNumber(String),
    /// `agent_id` is not an agent this tenant may use.
    #[error("{0}")]
    AgentNotFound(String),
    /// The destination (country, number type, prefix) is not allowed for this tenant.
    #[error("{0}")]
    DestinationNotAllowed(String),
    /// The destination is on a do-not-call list.
    #[error("the destination is on a do-not-call list")]
    DoNotCall,
    /// The tenant requires consent for its calls and the call cites no consent record.
    #[error("{0}")]
    ConsentRequired(String),
    /// The cited consent record does not serve for this call (another tenant's, another
    /// number's, revoked, of another scope, too old).
    #[error("{0}")]
    ConsentInvalid(String),
    /// The recipient's local time is outside the tenant's calling hours.
    #[error("{0}")]
    OutsideCallingHours(String),
    /// The tenant's request rate, its concurrency limit or the account's is exhausted.
    #[error("{message}")]
    RateLimitExceeded {
        message: String,
        /// Seconds until a retry can succeed, when known (`Retry-After`).
        retry_after: Option<u64>,
    },
    /// An attempt cap on calls to this destination is reached: retry after `retry_after`
    /// seconds, when the oldest counted attempt leaves the window.
    #[error("{message}")]
    AttemptLimitExceeded { message: String, retry_after: u64 },
    /// The tenant's budget cannot hold the call's worst-case cost.
    #[error("{0}")]
    InsufficientCredits(String),
    /// The `Idempotency-Key` was used with another body, or its first request is still running.
    #[error("{0}")]
    IdempotencyConflict(String),
    /// The path exists but not for this method; `allow` lists the methods it has.
    #[error("method not allowed")]
    MethodNotAllowed { allow: &'static str },
    /// No such route or resource.
    #[error("{0}")]
    NotFound(&'static str),
    /// The upstream could not be reached (DNS, connect, TLS, proxy; or no connection within the
    /// request timeout): the request never went out, the call was not placed.
    #[error("the upstream is unavailable; the call was not placed")]
    UpstreamUnavailable,
    /// The exchange broke after the request went out (a reset, the connection closed before
    /// the whole answer, an acceptance whose body could not be read): the upstream may have
    /// placed the call.
    #[error(
        "the connection to the upstream was lost before its answer; the call may have been placed"
    )]
    UpstreamLost,
    /// The upstream did not answer in time: it may have placed the call.
    #[error("the upstream did not answer in time; the call may have been placed")]
    UpstreamTimeout,
    /// The gateway is saturated (its state store's queue is full): nothing was taken; retry
    /// after `retry_after` seconds.
    #[error("{message}")]
    Overloaded { message: String, retry_after: u64 },
    /// The shared state store (Redis) cannot be reached or did not answer in time: the gateway
    /// fails closed, nothing was admitted; retry after `retry_after` seconds.
    #[error("{message}")]
    StateUnavailable { message: String, retry_after: u64 },
    /// A bug or an environment failure; the detail is logged, not returned.
    #[error("internal error: {0}")]
    Internal(String),
}

impl GatewayError {
    /// Shorthand for a schema or policy violation on one field.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        GatewayError::InvalidRequest {
            message: message.into(),
            param: Some(param.into()),
        }
    }

    /// The HTTP status this error is answered with.
    pub fn status(&self) -> StatusCode {
        use GatewayError::*;
        match self {
            PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Unauthorized(_) => StatusCode::UNAUTHORIZED,
            InvalidRequest { .. } | InvalidPhoneNumber { .. } | InvalidFromNumber(_) => {
                StatusCode::BAD_REQUEST
            }
            AgentNotFound(_) | NotFound(_) => StatusCode::NOT_FOUND,
            DestinationNotAllowed(_)
            | DoNotCall
            | OutsideCallingHours(_)
            | ConsentRequired(_)
            | ConsentInvalid(_) => StatusCode::FORBIDDEN,
            MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            RateLimitExceeded { .. } | AttemptLimitExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            InsufficientCredits(_) => StatusCode::PAYMENT_REQUIRED,
            IdempotencyConflict(_) => StatusCode::CONFLICT,
            UpstreamUnavailable | UpstreamLost => StatusCode::BAD_GATEWAY,
            UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Overloaded { .. } | StateUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Every code [`GatewayError::code`] can answer (`docs/openapi.yaml` lists the same).
    pub const CODES: &'static [&'static str] = &[
        "payload_too_large",
        "unsupported_media_type",
        "unauthorized",
        "invalid_request",
        "invalid_phone_number",
        "invalid_from_number",
        "agent_not_found",
        "destination_not_allowed",
        "do_not_call",
        "outside_calling_hours",
        "consent_required",
        "consent_invalid",
        "method_not_allowed",
        "rate_limit_exceeded",
        "attempt_limit_exceeded",
        "insufficient_credits",
        "idempotency_conflict",
        "not_found",
        "upstream_unavailable",
        "upstream_connection_lost",
        "upstream_timeout",
        "gateway_overloaded",
        "state_unavailable",
        "internal_error",
    ];

    /// The stable machine-readable code in the envelope.
    pub fn code(&self) -> &'static str {
        use GatewayError::*;
        match self {
            PayloadTooLarge { .. } => "payload_too_large",
            UnsupportedMediaType(_) => "unsupported_media_type",
            Unauthorized(_) => "unauthorized",
            InvalidRequest { .. } => "invalid_request",
            InvalidPhoneNumber { .. } => "invalid_phone_number",
            InvalidFromNumber(_) => "invalid_from_number",
            AgentNotFound(_) => "agent_not_found",
            DestinationNotAllowed(_) => "destination_not_allowed",
            DoNotCall => "do_not_call",
            OutsideCallingHours(_) => "outside_calling_hours",
            ConsentRequired(_) => "consent_required",
            ConsentInvalid(_) => "consent_invalid",
            MethodNotAllowed { .. } => "method_not_allowed",
            RateLimitExceeded { .. } => "rate_limit_exceeded",
            AttemptLimitExceeded { .. } => "attempt_limit_exceeded",
            InsufficientCredits(_) => "insufficient_credits",
            IdempotencyConflict(_) => "idempotency_conflict",
            NotFound(_) => "not_found",
            UpstreamUnavailable => "upstream_unavailable",
            UpstreamLost => "upstream_connection_lost",
            UpstreamTimeout => "upstream_timeout",
            Overloaded { .. } => "gateway_overloaded",
            StateUnavailable { .. } => "state_unavailable",
            Internal(_) => "internal_error",
        }
    }

    /// The JSON pointer of the offending field, where there is one.
    pub fn param(&self) -> Option<&str> {
        match self {
            GatewayError::InvalidRequest { param, .. } => param.as_deref(),
            GatewayError::InvalidPhoneNumber { param, .. } => Some(param),
            GatewayError::InvalidFromNumber(_) => Some("/from_number"),
            GatewayError::AgentNotFound(_) => Some("/agent_id"),
            GatewayError::DestinationNotAllowed(_)
            | GatewayError::DoNotCall
            | GatewayError::OutsideCallingHours(_)
            | GatewayError::AttemptLimitExceeded { .. } => Some("/phone_number"),
            _ => None,
        }
    }

    /// The message shown to the client. Internal detail is never shown.
    pub fn public_message(&self) -> String {
        match self {
            GatewayError::Internal(_) => "internal error".to_string(),
            other => other.to_string(),
        }
    }

    /// Build the JSON envelope. The only place an error becomes a response.
    pub fn into_response(self, request_id: &str) -> Response<Body> {
        self.response(request_id)
    }

    /// [`GatewayError::into_response`], keeping the error (to store its answer and still pass
    /// it on).
    pub fn response(&self, request_id: &str) -> Response<Body> {
        if let GatewayError::Internal(detail) = self {
            tracing::error!(request_id, %detail, "internal error");
        }
        let mut error = json!({
            "code": self.code(),
            "message": self.public_message(),
            "request_id": request_id,
        });
        if let Some(param) = self.param() {
            error["param"] = json!(param);
        }
        let body = serde_json::to_vec(&json!({ "error": error })).unwrap_or_default();
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = self.status();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let retry_after = match self {
            GatewayError::RateLimitExceeded {
                retry_after: Some(secs),
                ..
            }
            | GatewayError::Overloaded {
                retry_after: secs, ..
            }
            | GatewayError::AttemptLimitExceeded {
                retry_after: secs, ..
            }
            | GatewayError::StateUnavailable {
                retry_after: secs, ..
            } => Some(*secs),
            _ => None,
        };
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if let GatewayError::MethodNotAllowed { allow } = self {
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        response
    }
}

/// A JSON response with the given status.
pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn body_json(response: Response<Body>) -> serde_json::Value {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn envelope_carries_code_message_request_id_and_param() {
        let response = GatewayError::invalid("/max_duration", "too long").into_response("req-1");
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let body = body_json(response).await;
        assert_eq!(body["error"]["code"], "invalid_request");
        assert_eq!(body["error"]["message"], "too long");
        assert_eq!(body["error"]["request_id"], "req-1");
        assert_eq!(body["error"]["param"], "/max_duration");
    }

    #[tokio::test]
    async fn rate_limits_carry_retry_after() {
        let response = GatewayError::RateLimitExceeded {
            message: "slow down".into(),
            retry_after: Some(3),
        }
        .into_response("r");
        assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(response.headers()[header::RETRY_AFTER], "3");
    }

    #[tokio::test]
    async fn a_saturated_store_is_503_with_retry_after() {
        let error: GatewayError = crate::state::StoreError::Busy.into();
        let response = error.into_response("r");
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()[header::RETRY_AFTER], "1");
        let body = body_json(response).await;
        assert_eq!(body["error"]["code"], "gateway_overloaded");
        // Any other store failure stays an internal error, its detail not shown.
        let error: GatewayError = crate::state::StoreError::Backend("disk I/O".into()).into();
        let body = body_json(error.into_response("r")).await;
        assert_eq!(body["error"]["code"], "internal_error");
        assert_eq!(body["error"]["message"], "internal error");
    }

    #[tokio::test]
    async fn internal_detail_is_not_shown() {
        let response = GatewayError::Internal("db path /secret".into()).into_response("r");
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = body_json(response).await;
        assert_eq!(body["error"]["message"], "internal error");
        assert!(body["error"].get("param").is_none());
    }
}
