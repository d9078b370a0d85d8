//! Stage 8a: detach. From here on a request may take a slot and a hold, and the upstream may place
//! a call; so the rest of the path runs in its own task, and a client that goes away (dropping
//! its request future) cannot cut it short between "admitted" and "bound or released". The
//! client still gets the answer if it waits; the accounting is right either way.

use std::task::{Context, Poll};

use http::Response;
use tower::{Layer, Service};
use tracing::Instrument;

use super::CallRequest;
use crate::error::{Body, GatewayError};

/// Adds [`Detach`].
#[derive(Debug, Clone, Default)]
pub struct DetachLayer;

impl<S> Layer<S> for DetachLayer {
    type Service = Detach<S>;
    fn layer(&self, inner: S) -> Self::Service {
        Detach { inner }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct Detach<S> {
    inner: S,
}

impl<S> Service<CallRequest> for Detach<S>
where
    S: Service<CallRequest, Response = Response<Body>, Error = GatewayError>,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = GatewayError;
    type Future = crate::stages::StageFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: CallRequest) -> Self::Future {
        // The detached part runs in the request's span: its log lines (admitted, bound,
        // released) carry the request id and tenant.
        let span = req.span.clone();
        let task = crate::tasks::spawn(self.inner.call(req).instrument(span));
        Box::pin(async move {
            task.await
                .map_err(|e| GatewayError::Internal(format!("request task failed: {e}")))?
        })
    }
}
