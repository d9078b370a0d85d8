//! Stage 8a: detach. From here on a request may take a slot and a hold, and the upstream may place
//! a call; so the rest of the path runs in its own task, and a client that goes away (dropping
//! its request future) cannot cut it short between "admitted" and "bound or released". The
//! client still gets the answer if it waits; the accounting is right either way.

use std::task::{Context, Poll};

use http::Response;
use tower::Service;
use tracing::Instrument;

use super::{CallRequest, Next};
use crate::error::{Body, GatewayError};

/// See the module docs. `C`: the rest of the path, the async stages and forward.
#[derive(Debug, Clone)]
pub struct Detach<C> {
    rest: C,
}

impl<C> Detach<C> {
    pub fn new(rest: C) -> Self {
        Detach { rest }
    }
}

impl<C> Service<CallRequest> for Detach<C>
where
    C: Next + Clone,
{
    type Response = Response<Body>;
    type Error = GatewayError;
    type Future = crate::stages::StageFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: CallRequest) -> Self::Future {
        // The detached part runs in the request's span: its log lines (admitted, bound,
        // released) carry the request id and tenant.
        let span = req.span.clone();
        let task = crate::tasks::spawn(self.rest.clone().call(req).instrument(span));
        Box::pin(async move {
            task.await
                .map_err(|e| GatewayError::Internal(format!("request task failed: {e}")))?
        })
    }
}
