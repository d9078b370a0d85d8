//! Stage 5: phone policy. `phone_number` and `from_number` must be E.164 and valid in their
//! numbering plan; the destination must pass the tenant's country, number-type and prefix rules,
//! its do-not-call lists, and its calling hours in the recipient's local time.

use std::borrow::Cow;

use super::{CallRequest, Stage};
use crate::clock::SharedClock;
use crate::error::GatewayError;
use crate::phone::{self, Number, PhoneError};
use crate::policy::Tenant;
use crate::policy::jurisdiction::Jurisdiction;
use crate::policy::packs::ExtraHolidays;

/// See the module docs.
#[derive(Debug)]
pub struct PhonePolicy {
    pub clock: SharedClock,
}

fn parse(value: &str, param: &str) -> Result<Number, GatewayError> {
    phone::parse_e164(value).map_err(|e: PhoneError| GatewayError::InvalidPhoneNumber {
        message: format!("{} {e}", &param[1..]),
        param: param.to_string(),
    })
}

/// Whether the tenant may call `to` at `now`; a refusal names the policy rule that refused.
pub fn check_destination(
    tenant: &Tenant,
    to: &Number,
    now: jiff::Timestamp,
) -> Result<(), (Cow<'static, str>, GatewayError)> {
    let d = &tenant.destinations;
    let region = to.region.as_deref().unwrap_or("001");
    if let Some(allow) = &d.countries_allow
        && !allow.contains(region)
    {
        return Err((
            "destinations.countries_allow".into(),
            GatewayError::DestinationNotAllowed(format!(
                "calls to region {region} are not allowed"
            )),
        ));
    }
    if d.countries_deny.contains(region) {
        return Err((
            "destinations.countries_deny".into(),
            GatewayError::DestinationNotAllowed(format!(
                "calls to region {region} are not allowed"
            )),
        ));
    }
    let kind = to.number_type;
    let type_allowed = d
        .number_types_allow
        .as_ref()
        .is_none_or(|allow| allow.contains(&kind))
        && !d.number_types_deny.contains(&kind);
    if !type_allowed {
        return Err((
            "destinations.number_types".into(),
            GatewayError::DestinationNotAllowed(format!(
                "calls to {} numbers are not allowed",
                kind.as_str()
            )),
        ));
    }
    if let Some(prefix) = d
        .prefixes_deny
        .iter()
        .find(|p| to.e164.starts_with(p.as_str()))
    {
        return Err((
            "destinations.prefixes_deny".into(),
            GatewayError::DestinationNotAllowed(format!(
                "calls to numbers starting {prefix} are not allowed"
            )),
        ));
    }
    if d.do_not_call
        .iter()
        .any(|list| list.contains_e164(&to.e164))
    {
        return Err(("destinations.do_not_call".into(), GatewayError::DoNotCall));
    }
    check_times(tenant, to, now)
}

/// The rules that depend on the time: the tenant's calling hours, then every rule of its
/// jurisdiction packs that applies to the number (days, holidays, hours).
pub fn check_times(
    tenant: &Tenant,
    to: &Number,
    now: jiff::Timestamp,
) -> Result<(), (Cow<'static, str>, GatewayError)> {
    if tenant.hours.is_none() && tenant.packs.is_empty() {
        return Ok(());
    }
    let zones = phone::time_zones(&to.e164);
    if let Some(hours) = &tenant.hours {
        hours
            .check(now, zones)
            .map_err(|e| ("hours".into(), GatewayError::OutsideCallingHours(e)))?;
    }
    if tenant.packs.is_empty() {
        return Ok(());
    }
    let jurisdiction = Jurisdiction::of(to);
    let extra: Vec<&ExtraHolidays> = tenant.extra_holidays.iter().map(|h| &**h).collect();
    for pack in &tenant.packs {
        for rule in pack.rules.iter().filter(|r| r.applies(&jurisdiction)) {
            rule.check(now, zones, &jurisdiction, &extra)
                .map_err(|reason| {
                    (
                        Cow::Owned(rule.name.clone()),
                        GatewayError::OutsideCallingHours(format!("{reason} ({})", rule.name)),
                    )
                })?;
        }
    }
    Ok(())
}

/// The first instant at or after `now`, within 9 days, when the time rules allow a call to
/// `to` (the other rules do not depend on the time); `None` if there is none.
pub fn next_allowed(tenant: &Tenant, to: &Number, now: jiff::Timestamp) -> Option<jiff::Timestamp> {
    if check_times(tenant, to, now).is_ok() {
        return Some(now);
    }
    // A call becomes possible when some rule's window opens or a day starts, in some zone.
    let mut openings = vec![jiff::civil::Time::midnight()];
    if let Some(h) = &tenant.hours {
        openings.push(h.start());
    }
    for pack in &tenant.packs {
        for rule in &pack.rules {
            openings.extend(rule.openings());
        }
    }
    let mut candidates = Vec::new();
    for tz in phone::time_zones(&to.e164) {
        let today = now.to_zoned_datetime(tz.clone()).date();
        for days in 0..9 {
            let Ok(date) = today.checked_add(jiff::Span::new().days(days)) else {
                continue;
            };
            for time in &openings {
                if let Ok(at) = date.to_datetime(*time).to_zoned_datetime(tz.clone())
                    && at.timestamp() > now
                {
                    candidates.push(at.timestamp());
                }
            }
        }
    }
    candidates.sort();
    candidates.dedup();
    candidates
        .into_iter()
        .find(|t| check_times(tenant, to, *t).is_ok())
}

impl Stage for PhonePolicy {
    const NAME: &'static str = "phone";

    fn apply(&self, req: &mut CallRequest) -> Result<(), GatewayError> {
        let (tenant, call) = match (&req.tenant, &req.call) {
            (Some(t), Some(c)) => (t, c),
            _ => return Err(GatewayError::Internal("phone ran before validate".into())),
        };
        let to = parse(&call.phone_number, "/phone_number")?;
        req.facts
            .note(&req.span, "destination", phone::mask(&to.e164));
        if let Some(from) = &call.from_number {
            // An unusable caller id is `invalid_from_number`, whatever is wrong with it.
            parse(from, "/from_number").map_err(|e| match e {
                GatewayError::InvalidPhoneNumber { message, .. } => {
                    GatewayError::InvalidFromNumber(message)
                }
                other => other,
            })?;
        }
        check_destination(tenant, &to, self.clock.now()).map_err(|(rule, e)| {
            req.facts.note(&req.span, "rule", rule.into_owned());
            e
        })?;
        req.destination = Some(to);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::tests::{fixture_policies, globex_tenant};

    fn monday_noon_in_new_york() -> jiff::Timestamp {
        "2026-01-05T17:00:00Z".parse().unwrap()
    }

    fn code(tenant: &Tenant, number: &str, now: jiff::Timestamp) -> Result<(), &'static str> {
        let n = phone::parse_e164(number).unwrap();
        check_destination(tenant, &n, now).map_err(|(_, e)| e.code())
    }

    #[test]
    fn acme_may_call_valid_us_numbers_any_time() {
        let p = fixture_policies();
        let acme = &p.tenants["acme"];
        let sunday_night: jiff::Timestamp = "2026-01-11T05:00:00Z".parse().unwrap();
        assert_eq!(code(acme, "+14155551234", sunday_night), Ok(()));
        assert_eq!(
            code(acme, "+19005550123", sunday_night),
            Err("destination_not_allowed")
        );
    }

    #[test]
    fn globex_rules_apply() {
        let globex = globex_tenant();
        let now = monday_noon_in_new_york();
        assert_eq!(code(&globex, "+12125550123", now), Ok(()));
        // Country not allowed.
        assert_eq!(
            code(&globex, "+447911123456", now),
            Err("destination_not_allowed")
        );
        // Toll-free is not an allowed number type for globex.
        assert_eq!(
            code(&globex, "+18005550199", now),
            Err("destination_not_allowed")
        );
        // On the shared do-not-call list.
        assert_eq!(code(&globex, "+12125550100", now), Err("do_not_call"));
        // 09:00 in Los Angeles opens at 17:00 UTC; 16:59 is too early there, not in New York.
        let early: jiff::Timestamp = "2026-01-05T16:59:00Z".parse().unwrap();
        assert_eq!(
            code(&globex, "+14155550123", early),
            Err("outside_calling_hours")
        );
        assert_eq!(code(&globex, "+12125550123", early), Ok(()));
    }
}
