//! Runtime opt-outs: numbers that must not be called, recorded while the gateway runs.
//!
//! ```text
//! POST   /v1/do-not-call                  {"phone_number"}  a tenant records an opt-out captured
//!                                         during a call: a shared entry, for every tenant at once
//! POST   /admin/do-not-call               {"phone_number", "tenant"?, "reason"?}  an operator's
//!                                         entry: shared, or with "tenant" that tenant's only
//! GET    /admin/do-not-call/{number}      every entry for the number: runtime ones, and the
//!                                         policy lists that hold it
//! DELETE /admin/do-not-call/{number}      the shared entry removed (`?tenant=ID`: that tenant's)
//! ```
//!
//! Entries live in the state store: they survive restarts and every replica sees them at once.
//! Tenants cannot remove entries. Every change is an audit line (`"type": "opt_out"`), with the
//! number masked.

use std::sync::Arc;

use http::StatusCode;
use serde_json::{Map, Value, json};

use crate::audit::Audit;
use crate::clock::SharedClock;
use crate::error::{Body, GatewayError, json_response};
use crate::phone;
use crate::policy::{PolicyHandle, Tenant};
use crate::state::{OptOut, StateStore};

/// See the module docs.
#[derive(Clone)]
pub struct OptOutApi {
    pub store: Arc<dyn StateStore>,
    pub policies: PolicyHandle,
    pub clock: SharedClock,
    pub audit: Arc<Audit>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TenantEntry {
    phone_number: Value,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AdminEntry {
    phone_number: Value,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

/// The number as E.164, valid in its plan; anything else is `invalid_phone_number`.
/// A request body's `phone_number`, as E.164, or `invalid_phone_number` at `/phone_number`.
pub(crate) fn number(value: &Value) -> Result<String, GatewayError> {
    let invalid = |message: String| GatewayError::InvalidPhoneNumber {
        message,
        param: "/phone_number".into(),
    };
    let text = value
        .as_str()
        .ok_or_else(|| invalid("phone_number must be an E.164 string".into()))?;
    phone::parse_e164(text)
        .map(|n| n.e164)
        .map_err(|e| invalid(format!("phone_number {e}")))
}

fn body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, GatewayError> {
    serde_json::from_slice(bytes).map_err(|e| GatewayError::InvalidRequest {
        message: format!("the body must be a JSON object with phone_number: {e}"),
        param: None,
    })
}

/// An entry as the API shows it.
pub fn view(entry: &OptOut) -> Value {
    json!({
        "phone_number": entry.phone_number,
        "scope": entry.tenant.as_deref().map_or("shared", |_| "tenant"),
        "tenant": entry.tenant,
        "source": entry.source,
        "created_at": jiff::Timestamp::from_microsecond(entry.created_at)
            .map(|t| t.to_string())
            .unwrap_or_default(),
    })
}

impl OptOutApi {
    fn audit_line(&self, request_id: &str, action: &str, entry: &OptOut, changed: bool) {
        let mut line = Map::new();
        line.insert("request_id".into(), request_id.into());
        line.insert("action".into(), action.into());
        line.insert(
            "destination".into(),
            phone::mask(&entry.phone_number).into(),
        );
        line.insert(
            "scope".into(),
            entry
                .tenant
                .as_deref()
                .map_or("shared", |_| "tenant")
                .into(),
        );
        line.insert(
            "tenant".into(),
            entry.tenant.clone().map_or(Value::Null, Into::into),
        );
        line.insert("source".into(), entry.source.clone().into());
        line.insert("changed".into(), changed.into());
        self.audit.record("opt_out", line);
    }

    /// `POST /v1/do-not-call` by an authenticated tenant: a shared entry.
    pub async fn tenant_add(
        &self,
        tenant: &Tenant,
        request_id: &str,
        bytes: &[u8],
    ) -> Result<http::Response<Body>, GatewayError> {
        let entry: TenantEntry = body(bytes)?;
        let source = format!("tenant:{}", tenant.id);
        let entry = OptOut {
            phone_number: number(&entry.phone_number)?,
            tenant: None,
            source: source.clone(),
            created_at: self.clock.now().as_microsecond(),
        };
        let (status, entry) = self.add(request_id, entry).await?;
        let mut shown = view(&entry);
        // An entry recorded before by someone else: its source is not this tenant's business.
        if entry.source != source {
            shown["source"] = Value::Null;
        }
        Ok(json_response(status, &shown))
    }

    /// Record an entry (audited, revoking the number's consents): `201` and the entry, or `200`
    /// and the entry of its scope that was there.
    async fn add(
        &self,
        request_id: &str,
        entry: OptOut,
    ) -> Result<(StatusCode, OptOut), GatewayError> {
        let added = self.store.add_opt_out(entry.clone()).await?;
        self.audit_line(request_id, "add", &entry, added);
        // The person asked not to be called: their consents (to every tenant, or to the
        // entry's tenant) no longer serve.
        let revoked = self
            .store
            .revoke_consents_for(
                &entry.phone_number,
                entry.tenant.as_deref(),
                self.clock.now().as_microsecond(),
                "opt_out",
            )
            .await?;
        for record in &revoked {
            crate::consents::audit_line(&self.audit, request_id, "revoked", record);
        }
        tracing::info!(
            target: "audit",
            destination = %phone::mask(&entry.phone_number),
            source = %entry.source,
            added,
            "opt-out recorded"
        );
        // An entry already there stands as it was recorded.
        let shown = match added {
            true => entry,
            false => self
                .store
                .opt_outs(&entry.phone_number)
                .await?
                .into_iter()
                .find(|e| e.tenant == entry.tenant)
                .unwrap_or(entry),
        };
        let status = if added {
            StatusCode::CREATED
        } else {
            StatusCode::OK
        };
        Ok((status, shown))
    }

    /// The admin routes under `/admin/do-not-call`; `None` if `path` is not one.
    pub async fn admin(
        &self,
        method: &http::Method,
        path: &str,
        query: Option<&str>,
        request_id: &str,
        bytes: &[u8],
    ) -> Option<Result<http::Response<Body>, GatewayError>> {
        use http::Method;
        let rest = path
            .strip_prefix("/admin/do-not-call")
            .filter(|r| r.is_empty() || r.starts_with('/'))?;
        Some(match (method, rest) {
            (&Method::POST, "") => self.admin_add(request_id, bytes).await,
            (_, "") => Err(GatewayError::MethodNotAllowed { allow: "POST" }),
            (&Method::GET, n) if n.len() > 1 => self.lookup(&n[1..]).await,
            (&Method::DELETE, n) if n.len() > 1 => {
                let tenant = url::form_urlencoded::parse(query.unwrap_or("").as_bytes())
                    .find(|(k, _)| k == "tenant")
                    .map(|(_, v)| v.into_owned());
                if let Some(t) = &tenant
                    && !self.policies.current().tenants.contains_key(t)
                {
                    return Some(Err(GatewayError::NotFound("no such tenant")));
                }
                self.remove(request_id, &n[1..], tenant).await
            }
            _ => Err(GatewayError::MethodNotAllowed {
                allow: "GET, DELETE",
            }),
        })
    }

    async fn admin_add(
        &self,
        request_id: &str,
        bytes: &[u8],
    ) -> Result<http::Response<Body>, GatewayError> {
        let entry: AdminEntry = body(bytes)?;
        let phone_number = number(&entry.phone_number)?;
        if let Some(t) = &entry.tenant
            && !self.policies.current().tenants.contains_key(t)
        {
            return Err(GatewayError::NotFound("no such tenant"));
        }
        let source = match entry.reason.as_deref().map(str::trim) {
            Some(reason) if !reason.is_empty() => format!("admin: {reason}"),
            _ => "admin".to_string(),
        };
        let entry = OptOut {
            phone_number,
            tenant: entry.tenant,
            source,
            created_at: self.clock.now().as_microsecond(),
        };
        let (status, entry) = self.add(request_id, entry).await?;
        Ok(json_response(status, &view(&entry)))
    }

    async fn lookup(&self, raw: &str) -> Result<http::Response<Body>, GatewayError> {
        let phone_number = number(&Value::String(raw.to_string()))?;
        let entries = self.store.opt_outs(&phone_number).await?;
        let policies = self.policies.current();
        // The tenants whose policy lists hold the number.
        let listed: Vec<&str> = policies
            .tenants
            .values()
            .filter(|t| {
                t.destinations
                    .do_not_call
                    .iter()
                    .any(|l| l.contains_e164(&phone_number))
            })
            .map(|t| t.id.as_str())
            .collect();
        Ok(json_response(
            StatusCode::OK,
            &json!({
                "phone_number": phone_number,
                "entries": entries.iter().map(view).collect::<Vec<_>>(),
                "listed_for_tenants": listed,
            }),
        ))
    }

    async fn remove(
        &self,
        request_id: &str,
        raw: &str,
        tenant: Option<String>,
    ) -> Result<http::Response<Body>, GatewayError> {
        let phone_number = number(&Value::String(raw.to_string()))?;
        let removed = self
            .store
            .remove_opt_out(&phone_number, tenant.as_deref())
            .await?;
        let entry = OptOut {
            phone_number,
            tenant,
            source: "admin".into(),
            created_at: self.clock.now().as_microsecond(),
        };
        self.audit_line(request_id, "remove", &entry, removed);
        if !removed {
            return Err(GatewayError::NotFound("no such entry"));
        }
        tracing::warn!(
            target: "audit",
            destination = %phone::mask(&entry.phone_number),
            tenant = entry.tenant.as_deref().unwrap_or("*"),
            "admin: opt-out removed"
        );
        Ok(json_response(
            StatusCode::OK,
            &json!({"removed": true, "phone_number": entry.phone_number, "tenant": entry.tenant}),
        ))
    }
}
