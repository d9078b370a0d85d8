//! Reading calls: `GET /v1/calls/{id}` and `GET /v1/calls`, each tenant seeing only its own.
//! Another tenant's call id is answered exactly like a missing one. Served from the gateway's
//! records; a live call is refreshed from the upstream first where that is configured.

use std::sync::Arc;

use http::{HeaderMap, StatusCode};
use serde_json::json;

use crate::error::{Body, GatewayError, json_response};
use crate::lifecycle::Lifecycle;
use crate::policy::PolicyHandle;
use crate::stages::authenticate::authenticate;
use crate::stages::trace::RequestFacts;

/// Page size bounds for `GET /v1/calls`.
const DEFAULT_LIMIT: usize = 20;
const MAX_LIMIT: usize = 100;

/// The read API.
#[derive(Clone)]
pub struct CallReader {
    pub policies: PolicyHandle,
    pub lifecycle: Arc<Lifecycle>,
}

impl CallReader {
    /// `GET /v1/calls/{id}`.
    pub async fn get(
        &self,
        headers: &HeaderMap,
        span: &tracing::Span,
        facts: &RequestFacts,
        id: &str,
    ) -> Result<http::Response<Body>, GatewayError> {
        let tenant = authenticate(headers, &self.policies.current())?;
        facts.tenant(span, &tenant.id);
        let missing = || GatewayError::NotFound("no such call");
        let store = &self.lifecycle.store;
        let mut record = store.get_call(&tenant.id, id).await?.ok_or_else(missing)?;
        let refresh = self.lifecycle.reconcile.enabled && self.lifecycle.reconcile.refresh_on_read;
        if record.live && refresh {
            match self.lifecycle.refresh(&tenant.id, id).await {
                Ok(Some((updated, _))) => record = updated,
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(call_id = id, error = %e, "refresh from the upstream failed; serving the record")
                }
            }
        }
        Ok(json_response(StatusCode::OK, &record.public_view()))
    }

    /// `GET /v1/calls?limit=N&cursor=C`.
    pub async fn list(
        &self,
        headers: &HeaderMap,
        span: &tracing::Span,
        facts: &RequestFacts,
        query: Option<&str>,
    ) -> Result<http::Response<Body>, GatewayError> {
        let tenant = authenticate(headers, &self.policies.current())?;
        facts.tenant(span, &tenant.id);
        let mut limit = DEFAULT_LIMIT;
        let mut before = None;
        for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "limit" => {
                    limit = v
                        .parse::<usize>()
                        .ok()
                        .filter(|l| (1..=MAX_LIMIT).contains(l))
                        .ok_or_else(|| {
                            GatewayError::invalid("limit", format!("limit must be 1..{MAX_LIMIT}"))
                        })?;
                }
                "cursor" => {
                    if v.is_empty() || v.len() > 64 {
                        return Err(GatewayError::invalid(
                            "cursor",
                            "cursor is not one this API gave",
                        ));
                    }
                    before = Some(v.to_string());
                }
                _ => {
                    return Err(GatewayError::invalid(
                        k.to_string(),
                        format!("unknown query parameter {k:?}"),
                    ));
                }
            }
        }
        let mut records = self
            .lifecycle
            .store
            .list_calls(&tenant.id, limit + 1, before)
            .await?;
        let has_more = records.len() > limit;
        records.truncate(limit);
        let next = if has_more {
            records.last().map(|r| r.reservation_id.clone())
        } else {
            None
        };
        let data: Vec<_> = records.iter().map(|r| r.public_view()).collect();
        Ok(json_response(
            StatusCode::OK,
            &json!({"data": data, "has_more": has_more, "next_cursor": next}),
        ))
    }
}
