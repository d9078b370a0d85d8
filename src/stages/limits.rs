//! Stage 2: request limits. Checks the content type, enforces the body size limit (on the
//! declared length and while reading) and the body read timeout, then hands the stack a
//! [`CallRequest`].

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, header};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tower::{Layer, Service};

use super::CallRequest;
use super::trace::{RequestFacts, RequestId, RequestSpan};
use crate::error::{Body, GatewayError};
use crate::policy::{Policies, PolicyHandle};

/// Body limits.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    pub max_bytes: usize,
    pub read_timeout: Duration,
}

/// Adds [`Limits`].
#[derive(Clone)]
pub struct LimitsLayer {
    limits: BodyLimits,
    policies: PolicyHandle,
}

impl LimitsLayer {
    pub fn new(limits: BodyLimits, policies: PolicyHandle) -> Self {
        LimitsLayer { limits, policies }
    }
}

impl<S> Layer<S> for LimitsLayer {
    type Service = Limits<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Limits {
            limits: self.limits,
            policies: self.policies.clone(),
            inner,
        }
    }
}

/// See the module docs.
#[derive(Clone)]
pub struct Limits<S> {
    limits: BodyLimits,
    policies: PolicyHandle,
    inner: S,
}

/// Whether the content type is JSON in UTF-8 (`application/json`, optionally `; charset=utf-8`).
pub fn check_content_type(headers: &http::HeaderMap) -> Result<(), GatewayError> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Err(GatewayError::UnsupportedMediaType(
            "Content-Type must be application/json (it is missing)".into(),
        ));
    };
    let value = value.to_str().unwrap_or("").to_ascii_lowercase();
    let mut parts = value.split(';').map(str::trim);
    let essence = parts.next().unwrap_or("");
    let params_ok = parts.all(|p| {
        matches!(
            p.split_once('=')
                .map(|(k, v)| (k.trim(), v.trim().trim_matches('"'))),
            Some(("charset", "utf-8"))
        )
    });
    if essence == "application/json" && params_ok {
        Ok(())
    } else {
        Err(GatewayError::UnsupportedMediaType(format!(
            "Content-Type must be application/json, not {value:?}"
        )))
    }
}

/// Read a body within `limits`.
pub async fn read_body<B>(body: B, limits: BodyLimits) -> Result<Bytes, GatewayError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let read = Limited::new(body, limits.max_bytes).collect();
    match tokio::time::timeout(limits.read_timeout, read).await {
        Err(_) => Err(GatewayError::InvalidRequest {
            message: "the request body was not received in time".into(),
            param: None,
        }),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
            Err(GatewayError::PayloadTooLarge {
                limit: limits.max_bytes,
            })
        }
        Ok(Err(_)) => Err(GatewayError::InvalidRequest {
            message: "the request body could not be read".into(),
            param: None,
        }),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
    }
}

impl<S, B> Service<Request<B>> for Limits<S>
where
    S: Service<CallRequest, Response = Response<Body>, Error = GatewayError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<Body>;
    type Error = GatewayError;
    type Future = crate::stages::StageFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let limits = self.limits;
        let policies: Arc<Policies> = self.policies.current();
        // Take the service that was driven to readiness; leave a fresh clone behind.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let id = parts
                .extensions
                .get::<RequestId>()
                .map(|r| r.0.clone())
                .unwrap_or_default();
            let span = parts
                .extensions
                .get::<RequestSpan>()
                .map(|s| s.0.clone())
                .unwrap_or_else(tracing::Span::current);
            let refuse = |e: GatewayError| {
                if let Some(facts) = parts.extensions.get::<Arc<RequestFacts>>() {
                    facts.note(&span, "stage", "limits");
                } else {
                    span.record("stage", "limits");
                }
                e
            };
            let declared = parts
                .headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|len| len > limits.max_bytes as u64) {
                return Err(refuse(GatewayError::PayloadTooLarge {
                    limit: limits.max_bytes,
                }));
            }
            check_content_type(&parts.headers).map_err(refuse)?;
            let bytes = read_body(body, limits).await.map_err(refuse)?;
            inner
                .call({
                    let mut req = CallRequest::new(id, span, parts.headers, bytes, policies);
                    if let Some(facts) = parts.extensions.get::<Arc<RequestFacts>>() {
                        req.facts = facts.clone();
                    }
                    req
                })
                .await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    fn ct(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, value.parse().unwrap());
        h
    }

    #[test]
    fn content_type_must_be_json_in_utf8() {
        assert!(check_content_type(&ct("application/json")).is_ok());
        assert!(check_content_type(&ct("Application/JSON; charset=UTF-8")).is_ok());
        assert!(check_content_type(&ct("application/json; charset=latin1")).is_err());
        assert!(check_content_type(&ct("text/plain")).is_err());
        assert!(check_content_type(&ct("application/jsonx")).is_err());
        assert!(check_content_type(&HeaderMap::new()).is_err());
    }

    #[tokio::test]
    async fn bodies_over_the_limit_are_refused() {
        let limits = BodyLimits {
            max_bytes: 10,
            read_timeout: Duration::from_secs(1),
        };
        let small = http_body_util::Full::new(Bytes::from_static(b"0123456789"));
        assert_eq!(read_body(small, limits).await.unwrap().len(), 10);
        let big = http_body_util::Full::new(Bytes::from_static(b"0123456789A"));
        assert!(matches!(
            read_body(big, limits).await,
            Err(GatewayError::PayloadTooLarge { limit: 10 })
        ));
    }
}
