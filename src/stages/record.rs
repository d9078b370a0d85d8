//! Stage 11: record. Wraps the forward stage: when the upstream accepts the call, the reservation's
//! slot and hold are bound to the upstream's call id with a lease ending at `max_duration` + grace;
//! when it answers a refusal (any non-2xx) or cannot be reached at all, they are released at once
//! and nothing is charged.
//!
//! When the request went out and no answer came back (a timeout, a reset, the connection closed
//! mid-answer) the upstream may have placed the call, and releasing would let it run with no slot
//! and no charge. The reservation is kept as it is, pending, with the lease admission gave it
//! (`max_duration` + upstream timeout + grace): the call's first event, which carries the
//! reservation's relay token, binds it to the upstream's call id and the call is settled as
//! any other; if no event ever comes, the lease ends it at the full hold (the rule for every
//! call the gateway cannot follow). The client is told so (`upstream_timeout`,
//! `upstream_unavailable`: "the call may have been placed").

use std::sync::Arc;
use std::time::Duration;

use http::Response;

use super::forward::AcceptedCall;
use super::{AsyncStage, CallRequest, Next};
use crate::clock::SharedClock;
use crate::error::{Body, GatewayError};
use crate::state::{StateStore, StoreError};
use crate::tasks::First;
use tracing::Instrument;

/// See the module docs.
#[derive(Clone)]
pub struct Record {
    pub store: Arc<dyn StateStore>,
    pub clock: SharedClock,
    /// Added to `max_duration` for a bound call's lease.
    pub grace: Duration,
}

impl AsyncStage for Record {
    const NAME: &'static str = "record";

    async fn run<N: Next>(
        self: Arc<Self>,
        req: CallRequest,
        next: N,
    ) -> Result<Response<Body>, GatewayError> {
        let Record {
            store,
            clock,
            grace,
        } = &*self;
        let Some((tenant, id, max_duration, destination, attempts)) =
            req.reservation.as_ref().map(|r| {
                (
                    r.tenant.clone(),
                    r.id.clone(),
                    r.max_duration,
                    r.destination.clone(),
                    r.attempts.clone(),
                )
            })
        else {
            return next.call(req).await;
        };
        let span = req.span.clone();
        // Hold the drop guard here: it stands down only once the reservation is bound or
        // released.
        let mut req = req;
        let mut guard = req.reservation_guard.take();
        let result = next.call(req).await;
        let accepted = matches!(&result, Ok(response) if response.status().is_success());
        if matches!(
            &result,
            Err(GatewayError::UpstreamTimeout | GatewayError::UpstreamLost)
        ) {
            tracing::info!(target: "audit", reservation = %id, "kept: the upstream's answer was lost and it may have placed the call; its events or its lease settle it");
            if let Some(g) = guard.as_mut() {
                g.disarm();
            }
            return result;
        }
        if !accepted {
            // The client gets the upstream's own answer whatever happens here; a release the
            // store cannot do now is retried in the background.
            if let Err(e) = store.release(&id).await {
                tracing::warn!(reservation = %id, error = %e, "release failed; retrying in the background");
                store.release_detached(&id);
            } else {
                tracing::info!(target: "audit", reservation = %id, "released: the upstream did not place the call");
            }
            if let Some(g) = guard.as_mut() {
                g.disarm();
            }
            // The upstream answered 4xx, a refusal: no call was made, so no attempt counts.
            // On a 5xx it may have placed the call: it counts.
            if matches!(&result, Ok(r) if r.status().is_client_error()) {
                super::admission::return_attempts(&**store, &attempts, &destination, &id).await;
            }
            return result;
        }
        let mut response = result?;
        match response.extensions_mut().remove::<AcceptedCall>() {
            Some(AcceptedCall {
                id: call_id,
                answered,
            }) => {
                let now = clock.now().as_microsecond();
                let lease = now + i64::from(max_duration) * 1_000_000 + grace.as_micros() as i64;
                // Queued (in order: later operations see it) before the answer goes out, and
                // committed with the next batch: the answer does not wait for the commit. A
                // crash before it is recovered from the call's first event or its lease
                // (see `state::sqlite`).
                // The call is placed: from here on nothing is released and the client gets
                // the upstream's answer. A bind the store cannot record now is retried in the
                // background (and, if it never lands, the call's first event binds it, or
                // its lease ends it).
                span.record("call_id", call_id.as_str());
                let bind = store
                    .bind(&tenant, &id, &call_id, answered.clone(), lease, now)
                    .await;
                let (store, reservation) = (store.clone(), id.clone());
                match bind {
                    Ok(bind) => {
                        // In the audit trail once it is durable (or refused).
                        crate::tasks::spawn(
                            async move {
                                let bound = bind.await;
                                if let Err(e) = bound_or_refused(bound, &reservation, &call_id) {
                                    tracing::error!(
                                        reservation = %reservation,
                                        call_id = %call_id,
                                        error = %e,
                                        "bind failed"
                                    );
                                }
                            }
                            .in_current_span(),
                        );
                    }
                    Err(refused @ StoreError::Refused(_)) => {
                        let _ = bound_or_refused(Err(refused), &id, &call_id);
                    }
                    Err(e) => {
                        tracing::warn!(reservation = %id, call_id = %call_id, error = %e, "bind failed; retrying in the background");
                        let gave_up = "bind failed; the call's events or its lease will settle it";
                        crate::tasks::spawn(
                            crate::tasks::retry(First::AfterWait, gave_up, move || {
                                let bound = store.bind(
                                    &tenant,
                                    &reservation,
                                    &call_id,
                                    answered.clone(),
                                    lease,
                                    now,
                                );
                                let (reservation, call_id) = (reservation.clone(), call_id.clone());
                                async move {
                                    let bound = async { bound.await?.await }.await;
                                    bound_or_refused(bound, &reservation, &call_id)
                                }
                            })
                            .in_current_span(),
                        );
                    }
                }
            }
            None => {
                // Accepted, but with no id we cannot follow the call: keep the slot and hold
                // until the lease ends rather than free what may be in use.
                tracing::error!(reservation = %id, "the upstream accepted the call without an id; holding until the lease ends");
            }
        }
        if let Some(g) = guard.as_mut() {
            g.disarm();
        }
        Ok(response)
    }
}

/// The end of a bind: in the audit trail once it is durable; refused (a rule of the records: an
/// upstream id that names another call), logged, since trying again cannot help (the call's
/// events or its lease settle it). Any other failure is the caller's to log or retry.
fn bound_or_refused(
    bound: Result<(), StoreError>,
    reservation: &str,
    call_id: &str,
) -> Result<(), StoreError> {
    match bound {
        Ok(()) => {
            tracing::info!(target: "audit", reservation = %reservation, call_id = %call_id, "bound");
            Ok(())
        }
        Err(e @ StoreError::Refused(_)) => {
            tracing::error!(reservation = %reservation, call_id = %call_id, error = %e, "bind refused; the call's events or its lease will settle it");
            Ok(())
        }
        Err(e) => Err(e),
    }
}
