//! Consent for AI-voice calls (FCC 24-17 treats AI-generated voices as "artificial": such calls
//! need the called party's prior express consent).
//!
//! ```text
//! POST   /v1/consents        {"phone_number", "scope", "captured_at", "source", "seller",
//!                             "text" or "text_sha256"}  -> 201, the record with its "id"
//! GET    /v1/consents/{id}   the tenant's own record (revoked ones too)
//! DELETE /v1/consents/{id}   revoked; the record is kept as evidence
//! ```
//!
//! With `[consent] required = true` in a tenant's policy, each call must cite a record in
//! `metadata.consent_id` (the key is `metadata_key`): `consent_required` (403) without one,
//! `consent_invalid` (403, with the reason) when the record is another tenant's, another
//! number's, revoked, of a scope the policy does not list, or older than `max_age_days`. An
//! opt-out for the number revokes its records. Records live in the state store; every change
//! is an audit line (`"type": "consent"`), and the cited id goes into the call's decision line.

use std::sync::Arc;

use http::StatusCode;
use serde_json::{Map, Value, json};
use sha2::Digest;

use crate::audit::Audit;
use crate::clock::SharedClock;
use crate::error::{Body, GatewayError, json_response};
use crate::phone;
use crate::policy::Tenant;
use crate::state::{ConsentRecord, StateStore, StateView};

/// The longest consent text kept.
const MAX_TEXT: usize = 16 * 1024;
/// The longest scope, source or seller.
const MAX_FIELD: usize = 256;

/// The tenant API. See the module docs.
#[derive(Clone)]
pub struct ConsentApi {
    pub store: Arc<dyn StateStore>,
    pub clock: SharedClock,
    pub audit: Arc<Audit>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NewConsent {
    phone_number: Value,
    scope: String,
    captured_at: String,
    source: String,
    seller: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    text_sha256: Option<String>,
}

fn timestamp(us: i64) -> Value {
    jiff::Timestamp::from_microsecond(us)
        .map(|t| Value::String(t.to_string()))
        .unwrap_or(Value::Null)
}

/// A record as the API shows it.
pub fn view(r: &ConsentRecord) -> Value {
    json!({
        "id": r.id,
        "object": "consent",
        "phone_number": r.phone_number,
        "scope": r.scope,
        "captured_at": timestamp(r.captured_at),
        "source": r.source,
        "seller": r.seller,
        "text_sha256": r.text_sha256,
        "status": if r.revoked_at.is_some() { "revoked" } else { "active" },
        "created_at": timestamp(r.created_at),
        "revoked_at": r.revoked_at.map_or(Value::Null, timestamp),
        "revoked_by": r.revoked_by,
    })
}

/// One audit line for a consent's registration or revocation.
pub fn audit_line(audit: &Audit, request_id: &str, action: &str, r: &ConsentRecord) {
    let mut line = Map::new();
    line.insert("request_id".into(), request_id.into());
    line.insert("action".into(), action.into());
    line.insert("consent_id".into(), r.id.clone().into());
    line.insert("tenant".into(), r.tenant.clone().into());
    line.insert("destination".into(), phone::mask(&r.phone_number).into());
    line.insert("scope".into(), r.scope.clone().into());
    if let Some(by) = &r.revoked_by {
        line.insert("by".into(), by.clone().into());
    }
    audit.record("consent", line);
}

fn invalid(param: &str, message: impl Into<String>) -> GatewayError {
    GatewayError::invalid(param, message)
}

fn field(value: &str, param: &str) -> Result<String, GatewayError> {
    let value = value.trim();
    if value.is_empty() || value.len() > MAX_FIELD {
        return Err(invalid(
            param,
            format!("{} must be 1 to {MAX_FIELD} characters", &param[1..]),
        ));
    }
    Ok(value.to_string())
}

impl ConsentApi {
    /// `POST /v1/consents`.
    pub async fn register(
        &self,
        tenant: &Tenant,
        request_id: &str,
        bytes: &[u8],
    ) -> Result<http::Response<Body>, GatewayError> {
        let new: NewConsent =
            serde_json::from_slice(bytes).map_err(|e| GatewayError::InvalidRequest {
                message: format!("the body is not a consent record: {e}"),
                param: None,
            })?;
        let phone_number = crate::optouts::number(&new.phone_number)?;
        let now = self.clock.now();
        let captured_at: jiff::Timestamp = new.captured_at.parse().map_err(|e| {
            invalid(
                "/captured_at",
                format!("captured_at is not an RFC 3339 time: {e}"),
            )
        })?;
        if captured_at > now + jiff::SignedDuration::from_mins(5) {
            return Err(invalid("/captured_at", "captured_at is in the future"));
        }
        let (text, text_sha256) = match (new.text, new.text_sha256) {
            (Some(text), None) if !text.is_empty() && text.len() <= MAX_TEXT => {
                let hash = crate::hexstr::lower(sha2::Sha256::digest(text.as_bytes()));
                (Some(text), hash)
            }
            (None, Some(hash))
                if hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()) =>
            {
                (None, hash.to_ascii_lowercase())
            }
            _ => {
                return Err(invalid(
                    "/text",
                    format!(
                        "give the consent's text (1 to {MAX_TEXT} bytes) or its text_sha256 (64 hex digits), one of them"
                    ),
                ));
            }
        };
        let record = ConsentRecord {
            id: format!("cns_{}", uuid::Uuid::now_v7().simple()),
            tenant: tenant.id.clone(),
            phone_number,
            scope: field(&new.scope, "/scope")?,
            captured_at: captured_at.as_microsecond(),
            source: field(&new.source, "/source")?,
            seller: field(&new.seller, "/seller")?,
            text,
            text_sha256,
            created_at: now.as_microsecond(),
            revoked_at: None,
            revoked_by: None,
        };
        self.store.add_consent(record.clone()).await?;
        audit_line(&self.audit, request_id, "registered", &record);
        Ok(json_response(StatusCode::CREATED, &view(&record)))
    }

    /// The tenant's own record; another tenant's is answered like a missing one.
    async fn own(&self, tenant: &Tenant, id: &str) -> Result<ConsentRecord, GatewayError> {
        StateStore::get_consent(&*self.store, id)
            .await?
            .filter(|r| r.tenant == tenant.id)
            .ok_or(GatewayError::NotFound("no such consent record"))
    }

    /// `GET /v1/consents/{id}`.
    pub async fn get(
        &self,
        tenant: &Tenant,
        id: &str,
    ) -> Result<http::Response<Body>, GatewayError> {
        let record = self.own(tenant, id).await?;
        Ok(json_response(StatusCode::OK, &view(&record)))
    }

    /// `DELETE /v1/consents/{id}`: revoked, kept.
    pub async fn revoke(
        &self,
        tenant: &Tenant,
        request_id: &str,
        id: &str,
    ) -> Result<http::Response<Body>, GatewayError> {
        let record = self.own(tenant, id).await?;
        let now = self.clock.now().as_microsecond();
        let after = self
            .store
            .revoke_consent(&record.id, now, "tenant")
            .await?
            .ok_or(GatewayError::NotFound("no such consent record"))?;
        if record.revoked_at.is_none() {
            audit_line(&self.audit, request_id, "revoked", &after);
        }
        Ok(json_response(StatusCode::OK, &view(&after)))
    }
}

/// Whether a call by `tenant` to `to`, with this raw create-call body, cites a consent record
/// that serves at `now`: the record's id when consent is required and it serves; `None` when
/// the tenant does not require consent.
pub async fn check(
    state: &(impl StateView + ?Sized),
    tenant: &Tenant,
    body: &[u8],
    to: &str,
    now: i64,
) -> Result<Option<String>, GatewayError> {
    let Some(policy) = &tenant.consent else {
        return Ok(None);
    };
    let key = &policy.metadata_key;
    // From the body as sent: redaction may have rewritten the metadata since.
    let cited = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|b| b.get("metadata")?.get(key)?.as_str().map(str::to_string));
    let Some(id) = cited else {
        return Err(GatewayError::ConsentRequired(format!(
            "this tenant's calls must cite a consent record in metadata.{key}"
        )));
    };
    let bad = |reason: String| Err(GatewayError::ConsentInvalid(reason));
    // The id is the tenant's metadata: it is never repeated in an answer or a log.
    let plausible = id
        .strip_prefix("cns_")
        .is_some_and(|hex| hex.len() == 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()));
    if !plausible {
        return bad(format!("metadata.{key} is not a consent record id"));
    }
    let Some(record) = state.get_consent(&id).await? else {
        return bad("no such consent record".into());
    };
    if record.tenant != tenant.id {
        return bad("the consent record is another tenant's".into());
    }
    if record.phone_number != to {
        return bad("the consent record is for another number".into());
    }
    if let Some(at) = record.revoked_at {
        return bad(format!(
            "the consent record was revoked at {} ({})",
            timestamp(at).as_str().unwrap_or(""),
            record.revoked_by.as_deref().unwrap_or("")
        ));
    }
    if !policy.scopes.is_empty() && !policy.scopes.contains(&record.scope) {
        return bad(format!(
            "the consent record has scope {:?}, not one of {:?}",
            record.scope, policy.scopes
        ));
    }
    if let Some(days) = policy.max_age_days
        && record.captured_at < now - i64::from(days) * 86_400 * 1_000_000
    {
        return bad(format!(
            "the consent record was captured more than {days} days ago"
        ));
    }
    Ok(Some(id))
}
