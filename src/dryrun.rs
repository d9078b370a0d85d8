//! Dry run: would this call be allowed, and if not, why and until when?
//!
//! `callgate check-request` and `POST /admin/check-request` run a create-call body through the
//! same stages as `POST /v1/calls` (validate, phone, fields, redact), as the named tenant, at a
//! chosen instant, then check admission against the state store without changing it: runtime
//! opt-outs, consent, attempt caps, the tenant's concurrency limit and its budget. Nothing is consumed: no
//! slot, no credit, no request-rate allowance, no attempt. The request-rate limit and the
//! account-wide cap depend on the moment the real request arrives and are reported as not
//! evaluated.
//!
//! The answer is one JSON object: `decision` (`allowed` or `denied`), and for a denial its
//! `code`, `stage`, `rule` and `message` (the same as the gateway's refusal), `next_allowed_at`
//! for calling hours, `retry_at` for attempt caps; then `stages`, the verdict of every stage in
//! order (`passed`, `denied`, or `not_evaluated` after a denial).

use std::sync::Arc;

use bytes::Bytes;
use serde_json::{Map, Value, json};

use crate::clock::ManualClock;
use crate::error::GatewayError;
use crate::phone;
use crate::policy::{Policies, Tenant};
use crate::stages::admission::{Refusal, admit_refusal, attempt_refusal, read_checks};
use crate::stages::fields::FieldPolicy;
use crate::stages::phone::PhonePolicy;
use crate::stages::redact::Redact;
use crate::stages::trace::RequestFacts;
use crate::stages::validate::Validate;
use crate::stages::{CallRequest, Stage};
use crate::state::{AdmitOutcome, AttemptOutcome, StateView};

/// The stages a dry run reports, in the order the gateway runs them.
pub const STAGES: &[&str] = &[
    "authenticate",
    "validate",
    "phone",
    "fields",
    "redact",
    "admission",
];

/// A stage's refusal: the error, the rule, and what else the verdict should say.
struct Denial {
    error: GatewayError,
    rule: Option<String>,
    extra: Map<String, Value>,
}

impl From<Refusal> for Denial {
    fn from(r: Refusal) -> Self {
        Denial {
            error: r.error,
            rule: Some(r.rule),
            extra: r
                .detail
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        }
    }
}

impl From<GatewayError> for Denial {
    fn from(error: GatewayError) -> Self {
        Denial {
            error,
            rule: None,
            extra: Map::new(),
        }
    }
}

/// Run one synchronous stage; its refusal carries the rule it noted.
fn run_stage<S: Stage>(stage: &S, req: &mut CallRequest) -> Result<(), Denial> {
    stage.apply(req).map_err(|error| Denial {
        error,
        rule: req
            .facts
            .noted()
            .get("rule")
            .and_then(Value::as_str)
            .map(str::to_string),
        extra: Map::new(),
    })
}

/// Admission, read-only: what the store holds now against what the call would take.
async fn admission(
    state: &(impl StateView + ?Sized),
    tenant: &Tenant,
    req: &CallRequest,
    at: i64,
    info: &mut Map<String, Value>,
) -> Result<(), Denial> {
    let internal = || GatewayError::Internal("admission checked before phone".into());
    let to = req.destination.as_ref().ok_or_else(internal)?;
    let call = req.call.as_ref().ok_or_else(internal)?;
    let suspended = state.suspensions().await.map_err(GatewayError::from)?;
    match read_checks(state, tenant, to, &req.body, &suspended, at).await? {
        Ok(Some(id)) => {
            info.insert("consent_id".into(), id.into());
        }
        Ok(None) => {}
        Err(r) => return Err(r.into()),
    }
    info.insert(
        "requests_per_minute".into(),
        "not_evaluated: a dry run takes nothing from the allowance".into(),
    );
    info.insert(
        "account_max_concurrent_calls".into(),
        "not_evaluated: it depends on every tenant's calls when the request arrives".into(),
    );
    for (cap, names) in tenant.attempt_caps(to, false) {
        let mut times = state
            .attempts(&cap.scope, &to.e164, at - cap.longest_window())
            .await
            .map_err(GatewayError::from)?;
        // At a past instant, the attempts made since do not count.
        times.retain(|&t| t <= at);
        info.insert("attempts_in_window".into(), times.len().into());
        if let AttemptOutcome::Exceeded { retry_at, limit } = cap.verdict(&times, at) {
            return Err(attempt_refusal(&cap, &names[limit], limit, retry_at, at).into());
        }
    }
    let usage = state
        .usage(&tenant.id, at)
        .await
        .map_err(GatewayError::from)?;
    info.insert("slots".into(), usage.slots.into());
    if let Some(limit) = tenant.limits.max_concurrent_calls
        && usage.slots >= i64::from(limit)
        && let Some(r) = admit_refusal(&AdmitOutcome::TenantSlotsFull { limit })
    {
        return Err(r.into());
    }
    let max_duration = call.max_duration.unwrap_or(tenant.default_max_duration);
    let hold = tenant.budget.hold_for(max_duration, to.region.as_deref());
    info.insert("hold".into(), hold.into());
    if let Some(credits) = tenant.budget.credits {
        let available = credits - usage.spent - usage.holds;
        info.insert("available".into(), available.into());
        if hold > available {
            let short = AdmitOutcome::InsufficientCredits {
                needed: hold,
                available,
            };
            if let Some(r) = admit_refusal(&short) {
                return Err(r.into());
            }
        }
    }
    Ok(())
}

/// The verdict on `body` sent by `tenant` at `at`. See the module docs.
pub async fn check_request(
    policies: &Arc<Policies>,
    state: &(impl StateView + ?Sized),
    tenant: &Arc<Tenant>,
    body: Bytes,
    at: jiff::Timestamp,
    max_json_depth: usize,
) -> Value {
    let mut req = CallRequest::new(
        "dry-run".into(),
        tracing::Span::none(),
        http::HeaderMap::new(),
        body,
        policies.clone(),
    );
    req.facts = Arc::new(RequestFacts::recording());
    req.tenant = Some(tenant.clone());
    let at_us = at.as_microsecond();
    let clock = ManualClock::new(at);
    let mut stages = Vec::new();
    let mut denied: Option<(&str, Denial)> = None;
    for &name in STAGES {
        if denied.is_some() {
            stages.push(json!({"stage": name, "verdict": "not_evaluated"}));
            continue;
        }
        let mut info = Map::new();
        let outcome = match name {
            // The tenant is named, not authenticated by key.
            "authenticate" => Ok(()),
            "validate" => run_stage(
                &Validate {
                    max_depth: max_json_depth,
                },
                &mut req,
            ),
            "phone" => run_stage(
                &PhonePolicy {
                    clock: clock.clone(),
                },
                &mut req,
            ),
            "fields" => run_stage(&FieldPolicy, &mut req),
            "redact" => run_stage(&Redact, &mut req),
            _ => admission(state, tenant, &req, at_us, &mut info).await,
        };
        let mut verdict = Map::new();
        verdict.insert("stage".into(), name.into());
        match outcome {
            Ok(()) => {
                verdict.insert("verdict".into(), "passed".into());
                verdict.extend(info);
            }
            Err(mut denial) => {
                if denial.error.code() == "outside_calling_hours"
                    && let Some(call) = &req.call
                    && let Ok(to) = phone::parse_e164(&call.phone_number)
                {
                    let next = crate::stages::phone::next_allowed(tenant, &to, at);
                    denial.extra.insert(
                        "next_allowed_at".into(),
                        next.map_or(Value::Null, |t| t.to_string().into()),
                    );
                }
                verdict.insert("verdict".into(), "denied".into());
                verdict.insert("code".into(), denial.error.code().into());
                verdict.insert("rule".into(), denial.rule.clone().into());
                verdict.insert("message".into(), denial.error.public_message().into());
                verdict.extend(denial.extra.clone());
                verdict.extend(info);
                denied = Some((name, denial));
            }
        }
        stages.push(Value::Object(verdict));
    }
    let mut out = Map::new();
    match denied {
        None => {
            out.insert("decision".into(), "allowed".into());
        }
        Some((stage, denial)) => {
            out.insert("decision".into(), "denied".into());
            out.insert("code".into(), denial.error.code().into());
            out.insert("stage".into(), stage.into());
            out.insert("rule".into(), denial.rule.into());
            out.insert("message".into(), denial.error.public_message().into());
            out.extend(denial.extra);
        }
    }
    out.insert("tenant".into(), tenant.id.clone().into());
    out.insert("at".into(), at.to_string().into());
    out.insert("stages".into(), stages.into());
    Value::Object(out)
}
