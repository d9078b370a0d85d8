//! Stage 6: field policy. Caller id and agent allowlists, the duration cap, the recording rule,
//! the webhook host allowlist and required metadata keys. Missing values the tenant's policy
//! supplies (default caller id, default duration, forced recording flag) are filled in here, so
//! what leaves the gateway is exactly what the policy allowed.

use super::{CallRequest, Stage};
use crate::error::GatewayError;
use crate::policy::{RecordRule, Tenant};
use crate::stages::CreateCall;

/// See the module docs.
#[derive(Debug, Default)]
pub struct FieldPolicy;

/// Check and complete `call` under `tenant`'s policy.
pub fn apply_field_policy(tenant: &Tenant, call: &mut CreateCall) -> Result<(), GatewayError> {
    match &call.from_number {
        Some(from) if !tenant.from_allow.iter().any(|a| a == from) => {
            return Err(GatewayError::InvalidFromNumber(format!(
                "from_number {} is not allowed for this tenant",
                crate::phone::mask(from)
            )));
        }
        Some(_) => {}
        None => call.from_number = tenant.from_default.clone(),
    }
    if !tenant.agents.contains(&call.agent_id) {
        return Err(GatewayError::AgentNotFound(format!(
            "agent {:?} does not exist",
            call.agent_id
        )));
    }
    match call.max_duration {
        Some(d) if d > tenant.max_duration => {
            return Err(GatewayError::invalid(
                "/max_duration",
                format!(
                    "max_duration {d} exceeds this tenant's cap of {} seconds",
                    tenant.max_duration
                ),
            ));
        }
        Some(_) => {}
        None => call.max_duration = Some(tenant.default_max_duration),
    }
    match (tenant.record, call.record) {
        (RecordRule::Always, Some(false)) => {
            return Err(GatewayError::invalid(
                "/record",
                "this tenant's calls are always recorded; record must not be false",
            ));
        }
        (RecordRule::Never, Some(true)) => {
            return Err(GatewayError::invalid(
                "/record",
                "this tenant's calls may not be recorded; record must not be true",
            ));
        }
        (RecordRule::Always, None) => call.record = Some(true),
        (RecordRule::Never, None) => call.record = Some(false),
        _ => {}
    }
    if let Some(hook) = &call.webhook_url {
        check_webhook(tenant, hook)?;
    }
    let tag_key = tenant.metadata.tag_key();
    let metadata = call.metadata.as_ref();
    if metadata.is_some_and(|m| m.contains_key(tag_key)) {
        return Err(GatewayError::invalid(
            format!("/metadata/{tag_key}"),
            format!("metadata key {tag_key:?} is reserved for the gateway"),
        ));
    }
    for key in &tenant.metadata.required {
        if !metadata.is_some_and(|m| m.contains_key(key)) {
            return Err(GatewayError::invalid(
                format!("/metadata/{key}"),
                format!("metadata must include {key:?}"),
            ));
        }
    }
    Ok(())
}

fn check_webhook(tenant: &Tenant, hook: &str) -> Result<(), GatewayError> {
    let bad = |why: String| GatewayError::invalid("/webhook_url", why);
    let url = url::Url::parse(hook).map_err(|e| bad(format!("webhook_url is not a URL: {e}")))?;
    match url.scheme() {
        "https" => {}
        "http" if tenant.webhooks.allow_http => {}
        other => {
            return Err(bad(format!(
                "webhook_url scheme {other:?} is not allowed; use https"
            )));
        }
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("webhook_url must not carry credentials".into()));
    }
    let host = url.host_str().unwrap_or("");
    if !tenant.webhooks.allows_host(host) {
        return Err(bad(format!(
            "webhook host {host:?} is not allowed for this tenant"
        )));
    }
    Ok(())
}

impl Stage for FieldPolicy {
    const NAME: &'static str = "fields";

    fn apply(&self, req: &mut CallRequest) -> Result<(), GatewayError> {
        let (tenant, call) = req.parts_mut()?;
        let refused = apply_field_policy(tenant, call);
        if let Err(e) = &refused {
            // Each field has one rule of the tenant's policy.
            let rule = match e.param().unwrap_or("") {
                "/from_number" => "numbers.from_allow",
                "/agent_id" => "agents.allow",
                "/max_duration" => "max_duration",
                "/record" => "record",
                "/webhook_url" => "webhooks",
                p if p.starts_with("/metadata") => "metadata",
                _ => "fields",
            };
            req.facts.note(&req.span, "rule", rule);
        }
        refused
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::tests::{fixture_policies, globex_tenant};

    fn call(json: serde_json::Value) -> CreateCall {
        serde_json::from_value(json).unwrap()
    }

    fn err(tenant: &Tenant, json: serde_json::Value) -> (String, String) {
        let e = apply_field_policy(tenant, &mut call(json)).unwrap_err();
        (e.code().to_string(), e.param().unwrap_or("").to_string())
    }

    #[test]
    fn defaults_are_filled_in() {
        let p = fixture_policies();
        let mut c =
            call(serde_json::json!({"phone_number": "+14155551234", "agent_id": "agent_abc123"}));
        apply_field_policy(&p.tenants["acme"], &mut c).unwrap();
        assert_eq!(c.from_number.as_deref(), Some("+18005551234"));
        assert_eq!(c.max_duration, Some(600));
    }

    #[test]
    fn allowlists_and_caps_are_enforced() {
        let p = fixture_policies();
        let acme = &p.tenants["acme"];
        let base = |extra: serde_json::Value| {
            let mut v =
                serde_json::json!({"phone_number": "+14155551234", "agent_id": "agent_abc123"});
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            v
        };
        assert_eq!(
            err(
                acme,
                base(serde_json::json!({"from_number": "+18005556789"}))
            )
            .0,
            "invalid_from_number"
        );
        assert_eq!(
            err(acme, base(serde_json::json!({"agent_id": "agent_other"}))),
            ("agent_not_found".into(), "/agent_id".into())
        );
        assert_eq!(
            err(acme, base(serde_json::json!({"max_duration": 601}))),
            ("invalid_request".into(), "/max_duration".into())
        );
        assert_eq!(
            err(
                acme,
                base(serde_json::json!({"webhook_url": "https://evil.example/x"}))
            )
            .1,
            "/webhook_url"
        );
        assert_eq!(
            err(
                acme,
                base(serde_json::json!({"webhook_url": "http://hooks.acme.example/x"}))
            )
            .1,
            "/webhook_url"
        );
        assert_eq!(
            err(
                acme,
                base(serde_json::json!({"webhook_url": "https://u:p@hooks.acme.example/x"}))
            )
            .1,
            "/webhook_url"
        );
        assert_eq!(
            err(
                acme,
                base(serde_json::json!({"metadata": {"callgate_tenant": "globex"}}))
            )
            .1,
            "/metadata/callgate_tenant"
        );
        let mut ok = call(base(
            serde_json::json!({"webhook_url": "https://hooks.acme.example/calls"}),
        ));
        apply_field_policy(acme, &mut ok).unwrap();
    }

    #[test]
    fn record_rule_and_required_metadata() {
        let globex = globex_tenant();
        let base = serde_json::json!({"phone_number": "+12125550123", "agent_id": "agent_support",
                                      "metadata": {"ticket_id": "T-1"}});
        let mut c = call(base.clone());
        apply_field_policy(&globex, &mut c).unwrap();
        assert_eq!(c.record, Some(false));
        let mut recorded = base.clone();
        recorded["record"] = true.into();
        assert_eq!(err(&globex, recorded).1, "/record");
        let mut no_ticket = base;
        no_ticket["metadata"] = serde_json::json!({});
        assert_eq!(err(&globex, no_ticket).1, "/metadata/ticket_id");
    }
}
