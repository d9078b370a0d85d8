//! Stage 9: admission. First the tenant's request-rate limit (GCRA, via `governor`, on the
//! injected clock), then one atomic step in the state store that takes a concurrency slot (under
//! the tenant's limit and the account-wide cap) and holds the call's worst-case cost
//! (`max_duration` in started increments x price) against the tenant's budget. A refusal takes
//! nothing; a request refused by an earlier stage never got here, so it consumed no quota.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::Clock as _;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use http::Response;

use super::{AsyncStage, CallRequest, Next};
use crate::clock::SharedClock;
use crate::error::{Body, GatewayError};
use crate::policy::Tenant;
use crate::state::redis::SharedRateLimits;
use crate::state::{
    AdmitOutcome, AdmitRequest, AttemptOutcome, AttemptScope, BudgetTerms, OptOut, RelayToken,
    StateStore,
};

/// `governor`'s view of our clock.
#[derive(Debug, Clone)]
pub struct GovernorClock(pub SharedClock);

impl governor::clock::Clock for GovernorClock {
    type Instant = governor::nanos::Nanos;
    fn now(&self) -> Self::Instant {
        let micros = self.0.now().as_microsecond().max(0) as u64;
        governor::nanos::Nanos::from(micros.saturating_mul(1_000))
    }
}

type Limiter =
    RateLimiter<NotKeyed, InMemoryState, GovernorClock, NoOpMiddleware<governor::nanos::Nanos>>;

/// A tenant's limiter and the (rate, burst) it was made for.
type LimiterEntry = ((u32, u32), Arc<Limiter>);

/// Per-tenant request-rate limiters, made on first use and remade when the policy's rate changes.
#[derive(Debug)]
pub struct RateLimits {
    clock: GovernorClock,
    limiters: Mutex<HashMap<String, LimiterEntry>>,
}

impl RateLimits {
    pub fn new(clock: SharedClock) -> Self {
        RateLimits {
            clock: GovernorClock(clock),
            limiters: Mutex::new(HashMap::new()),
        }
    }

    /// Take one request from the tenant's allowance, or say how long until one is free.
    pub fn check(&self, tenant: &Tenant) -> Result<(), Duration> {
        let Some(rpm) = tenant.limits.requests_per_minute else {
            return Ok(());
        };
        let burst = tenant.limits.burst.unwrap_or((rpm / 6).max(1));
        let limiter = {
            let mut map = self.limiters.lock().unwrap_or_else(|p| p.into_inner());
            match map.get(&tenant.id) {
                Some((terms, l)) if *terms == (rpm, burst) => l.clone(),
                _ => {
                    let period = Duration::from_nanos(60_000_000_000 / u64::from(rpm.max(1)));
                    let quota = Quota::with_period(period)
                        .unwrap_or_else(|| Quota::per_minute(NonZeroU32::MIN))
                        .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
                    let l = Arc::new(RateLimiter::direct_with_clock(quota, self.clock.clone()));
                    map.insert(tenant.id.clone(), ((rpm, burst), l.clone()));
                    l
                }
            }
        };
        limiter
            .check()
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }
}

/// Where the request-rate limits are kept: in this process (`governor`, the embedded backend)
/// or in Redis, shared by every replica (GCRA in a Lua script).
pub enum RequestRates {
    Local(RateLimits),
    Shared(SharedRateLimits),
}

impl std::fmt::Debug for RequestRates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RequestRates::Local(_) => "RequestRates::Local",
            RequestRates::Shared(_) => "RequestRates::Shared",
        })
    }
}

impl RequestRates {
    /// Take one request from the tenant's allowance, or say how long until one is free.
    pub async fn check(&self, tenant: &Tenant) -> Result<Result<(), Duration>, GatewayError> {
        match self {
            RequestRates::Local(limits) => Ok(limits.check(tenant)),
            RequestRates::Shared(limits) => {
                let Some(rpm) = tenant.limits.requests_per_minute else {
                    return Ok(Ok(()));
                };
                let burst = tenant.limits.burst.unwrap_or((rpm / 6).max(1));
                Ok(limits.check(&tenant.id, rpm, burst).await?)
            }
        }
    }
}

/// A slot and hold taken for a call. Its `Debug` does not show the relay token.
#[derive(Clone)]
pub struct Reservation {
    pub tenant: String,
    pub id: String,
    /// The relay token handed to the upstream in the webhook URL (only its hash is stored).
    pub token: String,
    pub max_duration: u32,
    /// The destination, and the scopes its attempt was counted in (given back if the upstream
    /// refuses the call).
    pub destination: String,
    pub attempts: Vec<AttemptScope>,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation")
            .field("tenant", &self.tenant)
            .field("id", &self.id)
            .field("token", &"[redacted]")
            .field("max_duration", &self.max_duration)
            .field("attempts", &self.attempts)
            .finish()
    }
}

/// Releases a reservation that was neither bound nor released (a panic, a cancelled task).
#[derive(Debug)]
pub struct ReservationGuard {
    id: String,
    store: Option<Arc<dyn StateStore>>,
}

impl ReservationGuard {
    /// The reservation was bound or released: stand down.
    pub fn disarm(&mut self) {
        self.store = None;
    }
}

impl Drop for ReservationGuard {
    fn drop(&mut self) {
        if let Some(store) = self.store.take() {
            tracing::warn!(reservation = %self.id, "reservation dropped unsettled; releasing");
            store.release_detached(&self.id);
        }
    }
}

impl std::fmt::Debug for dyn StateStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StateStore")
    }
}

/// The runtime opt-out that stops `tenant` calling `phone_number`, if any: a shared entry first,
/// then the tenant's own.
pub async fn opt_out_for(
    store: &(impl crate::state::StateView + ?Sized),
    tenant: &str,
    phone_number: &str,
) -> Result<Option<OptOut>, GatewayError> {
    let mut entries = crate::state::StateView::opt_outs(store, phone_number).await?;
    entries.sort_by_key(|e| e.tenant.is_some());
    Ok(entries
        .into_iter()
        .find(|e| e.tenant.as_deref().is_none_or(|t| t == tenant)))
}

/// A refusal by admission: the rule that decided, the error, and what a dry run shows beside it.
#[derive(Debug)]
pub struct Refusal {
    pub rule: String,
    pub error: GatewayError,
    /// A field the dry run adds to its verdict (`opt_out`, `suspended_until`, `retry_at`).
    pub detail: Option<(&'static str, serde_json::Value)>,
}

impl Refusal {
    fn new(rule: impl Into<String>, error: GatewayError) -> Self {
        Refusal {
            rule: rule.into(),
            error,
            detail: None,
        }
    }
}

fn timestamp(us: i64) -> serde_json::Value {
    jiff::Timestamp::from_microsecond(us)
        .map(|t| serde_json::Value::String(t.to_string()))
        .unwrap_or(serde_json::Value::Null)
}

/// The checks of admission that only read state, for the gateway and the dry run alike: a
/// runtime opt-out, a suspended region, consent. Passed: the cited consent id, if any.
pub async fn read_checks(
    state: &(impl crate::state::StateView + ?Sized),
    tenant: &Tenant,
    to: &crate::phone::Number,
    body: &[u8],
    suspended: &[crate::state::Suspension],
    now: i64,
) -> Result<Result<Option<String>, Refusal>, GatewayError> {
    if let Some(entry) = opt_out_for(state, &tenant.id, &to.e164).await? {
        let rule = match entry.tenant {
            None => "do_not_call.opt_out",
            Some(_) => "do_not_call.tenant_entry",
        };
        return Ok(Err(Refusal {
            detail: Some(("opt_out", crate::optouts::view(&entry))),
            ..Refusal::new(rule, GatewayError::DoNotCall)
        }));
    }
    if !suspended.is_empty() {
        let jurisdiction = crate::policy::jurisdiction::Jurisdiction::of(to);
        if let Some(s) = crate::suspensions::stopping(suspended, &jurisdiction, now) {
            let (rule, error) = crate::suspensions::refusal(s);
            return Ok(Err(Refusal {
                detail: Some(("suspended_until", timestamp(s.until))),
                ..Refusal::new(rule, error)
            }));
        }
    }
    match crate::consents::check(state, tenant, body, &to.e164, now).await {
        Ok(id) => Ok(Ok(id)),
        Err(e @ GatewayError::ConsentRequired(_)) => Ok(Err(Refusal::new("consent.required", e))),
        Err(e @ GatewayError::ConsentInvalid(_)) => Ok(Err(Refusal::new("consent.invalid", e))),
        Err(e) => Err(e),
    }
}

/// The refusal of an attempt cap's `limit` (named `name`), free again at `retry_at`.
pub fn attempt_refusal(
    cap: &crate::state::AttemptCap,
    name: &str,
    limit: usize,
    retry_at: i64,
    now: i64,
) -> Refusal {
    let error = GatewayError::AttemptLimitExceeded {
        message: format!(
            "the cap on calls to this number is reached ({} in {} s, {name}); retry after {}",
            cap.limits[limit].max,
            cap.limits[limit].window / 1_000_000,
            timestamp(retry_at).as_str().unwrap_or_default()
        ),
        retry_after: secs_until(retry_at, now),
    };
    Refusal {
        detail: Some(("retry_at", timestamp(retry_at))),
        ..Refusal::new(name, error)
    }
}

/// The refusal an admission outcome means; `None` for `Admitted`.
pub fn admit_refusal(outcome: &AdmitOutcome) -> Option<Refusal> {
    Some(match *outcome {
        AdmitOutcome::Admitted => return None,
        AdmitOutcome::TenantSlotsFull { limit } => Refusal::new(
            "limits.max_concurrent_calls",
            GatewayError::RateLimitExceeded {
                message: format!("concurrency limit of {limit} calls in flight reached"),
                retry_after: None,
            },
        ),
        AdmitOutcome::AccountSlotsFull { limit } => Refusal::new(
            "admission.account_max_concurrent_calls",
            GatewayError::RateLimitExceeded {
                message: format!(
                    "the shared account's limit of {limit} calls in flight is reached"
                ),
                retry_after: None,
            },
        ),
        AdmitOutcome::InsufficientCredits { needed, available } => Refusal::new(
            "budget.credits",
            GatewayError::InsufficientCredits(format!(
                "the call may cost up to {needed} credits; {available} are available"
            )),
        ),
    })
}

/// Give back attempts counted for a call that was not placed; a failure is logged (the attempt
/// then counts until it leaves the window: the safe side).
pub async fn return_attempts(
    store: &dyn StateStore,
    scopes: &[AttemptScope],
    phone_number: &str,
    attempt_id: &str,
) {
    for scope in scopes {
        if let Err(e) = store.return_attempt(scope, phone_number, attempt_id).await {
            tracing::warn!(error = %e, scope = scope.key(), "attempt not given back; it counts until it leaves its window");
        }
    }
}

/// Seconds from `now` until `at` (microseconds), rounded up, at least 1.
pub fn secs_until(at: i64, now: i64) -> u64 {
    let us = (at - now).max(1) as u64;
    us.div_ceil(1_000_000).max(1)
}

/// What admission needs besides the request.
#[derive(Clone)]
pub struct AdmissionContext {
    pub store: Arc<dyn StateStore>,
    pub clock: SharedClock,
    pub rate_limits: Arc<RequestRates>,
    pub account_max_concurrent: u32,
    /// Suspended regions (declared emergencies).
    pub suspensions: Arc<crate::suspensions::Suspensions>,
    /// Lease of a reservation not yet bound: the upstream's timeout plus `max_duration` + grace,
    /// since the upstream may place the call even if its answer never arrives.
    pub pending_lease_extra: Duration,
}

impl AsyncStage for AdmissionContext {
    const NAME: &'static str = "admission";

    async fn run<N: Next>(
        self: Arc<Self>,
        mut req: CallRequest,
        next: N,
    ) -> Result<Response<Body>, GatewayError> {
        let ctx = self;
        let facts = req.facts.clone();
        let refuse = |span: &tracing::Span, rule: String, e: GatewayError| {
            facts.note(span, "stage", "admission");
            facts.note(span, "rule", rule);
            e
        };
        let tenant = req.tenant()?.clone();
        let call = req
            .call
            .as_ref()
            .ok_or_else(|| GatewayError::Internal("admission ran before validate".into()))?;
        let destination = req
            .destination
            .clone()
            .ok_or_else(|| GatewayError::Internal("admission ran before phone".into()))?;
        let to = destination.e164.clone();
        // Runtime opt-outs, suspended regions, consent: look-ups, so a refusal consumes
        // nothing.
        let now_us = ctx.clock.now().as_microsecond();
        let suspended = ctx.suspensions.current().await?;
        match read_checks(
            &*ctx.store,
            &tenant,
            &destination,
            &req.body,
            &suspended,
            now_us,
        )
        .await?
        {
            Ok(Some(consent_id)) => req.facts.note(&req.span, "consent_id", consent_id),
            Ok(None) => {}
            Err(r) => return Err(refuse(&req.span, r.rule, r.error)),
        }
        if let Err(wait) = ctx.rate_limits.check(&tenant).await? {
            let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            return Err(refuse(
                &req.span,
                "limits.requests_per_minute".into(),
                GatewayError::RateLimitExceeded {
                    message: format!(
                        "request rate limit of {} per minute exceeded",
                        tenant.limits.requests_per_minute.unwrap_or(0)
                    ),
                    retry_after: Some(secs.max(1)),
                },
            ));
        }
        let max_duration = call.max_duration.unwrap_or(tenant.default_max_duration);
        let region = destination.region.as_deref();
        let budget = &tenant.budget;
        let hold = budget.hold_for(max_duration, region);
        let now = ctx.clock.now().as_microsecond();
        let lease =
            now + i64::from(max_duration) * 1_000_000 + ctx.pending_lease_extra.as_micros() as i64;
        let reservation_id = crate::hexstr::uuid_v7();
        // Attempt caps: each counted atomically, or refused with nothing counted; the ones
        // counted are given back if a later cap or admission refuses.
        let mut attempts = Vec::new();
        let record_account = req.policies.account_attempts;
        for (cap, names) in tenant.attempt_caps(&destination, record_account) {
            let taken = ctx.store.take_attempt(&cap, &reservation_id, now).await;
            let refusal = match taken {
                Ok(AttemptOutcome::Taken) => {
                    attempts.push(cap.scope);
                    continue;
                }
                Ok(AttemptOutcome::Exceeded { retry_at, limit }) => {
                    let r = attempt_refusal(&cap, &names[limit], limit, retry_at, now);
                    refuse(&req.span, r.rule, r.error)
                }
                Err(e) => {
                    // The take may have run before the store's answer was lost.
                    attempts.push(cap.scope.clone());
                    e.into()
                }
            };
            return_attempts(&*ctx.store, &attempts, &to, &reservation_id).await;
            return Err(refusal);
        }
        let (token, token_hash) = RelayToken::issue(&reservation_id);
        let outcome = ctx
            .store
            .admit(AdmitRequest {
                reservation_id: reservation_id.clone(),
                tenant: tenant.id.clone(),
                token_hash,
                tenant_max_concurrent: tenant.limits.max_concurrent_calls,
                account_max_concurrent: ctx.account_max_concurrent,
                budget: budget.credits.map(|credits| BudgetTerms {
                    credits,
                    period: budget.period,
                    timezone: budget.timezone.clone(),
                }),
                hold,
                price: budget.price_for(region),
                increment_secs: budget.increment_secs,
                max_duration,
                lease_expires_at: lease,
                now,
                tenant_webhook: call.webhook_url.clone(),
            })
            .await;
        if !matches!(outcome, Ok(AdmitOutcome::Admitted)) {
            return_attempts(&*ctx.store, &attempts, &to, &reservation_id).await;
        }
        if let Some(r) = admit_refusal(&outcome?) {
            return Err(refuse(&req.span, r.rule, r.error));
        }
        tracing::info!(
            target: "audit",
            tenant = %tenant.id,
            reservation = %reservation_id,
            hold,
            max_duration,
            "admitted"
        );
        req.facts.note(&req.span, "hold", hold);
        req.reservation_guard = Some(ReservationGuard {
            id: reservation_id.clone(),
            store: Some(ctx.store.clone()),
        });
        req.reservation = Some(Reservation {
            tenant: tenant.id.clone(),
            id: reservation_id,
            token,
            max_duration,
            destination: to,
            attempts,
        });
        next.call(req).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::policy::tests::fixture_policies;

    #[test]
    fn the_rate_limit_follows_the_injected_clock() {
        let clock = ManualClock::new("2026-01-05T17:00:00Z".parse().unwrap());
        let limits = RateLimits::new(clock.clone());
        let p = fixture_policies();
        let acme = &p.tenants["acme"];
        let rpm = acme.limits.requests_per_minute.unwrap();
        let burst = acme.limits.burst.unwrap();
        for _ in 0..burst {
            limits.check(acme).unwrap();
        }
        let wait = limits.check(acme).unwrap_err();
        assert!(
            wait <= Duration::from_secs(60 / u64::from(rpm) + 1),
            "{wait:?}"
        );
        clock.advance(wait);
        limits.check(acme).unwrap();
        assert!(limits.check(acme).is_err());
    }

    #[test]
    fn holds_are_the_worst_case_in_started_increments() {
        let p = fixture_policies();
        let budget = &p.tenants["acme"].budget;
        assert_eq!(budget.hold_for(600, Some("US")), 10);
        assert_eq!(budget.hold_for(61, Some("US")), 2);
        assert_eq!(budget.hold_for(60, Some("CA")), 2);
    }
}
