//! Suspensions: an operator stops calls to a region until a time (a declared emergency: Louisiana
//! bans telephone solicitation during one).
//!
//! ```text
//! POST   /admin/suspensions           {"region": "US-LA", "until": RFC 3339, "reason": "..."}
//! GET    /admin/suspensions           every suspension, lapsed ones marked
//! DELETE /admin/suspensions/{region}  lifted
//! ```
//!
//! Suspensions live in the state store, so every replica applies them. Admission reads them
//! through a cache of [`REFRESH`]: a suspension made on this replica applies at once, on others
//! within that time. A call to a number in a suspended region ([`Jurisdiction::is_in`]: a
//! number whose state is unknown is in every state of its country) is refused
//! `destination_not_allowed`, the rule `suspension <region>`. Every change is an audit line.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::StatusCode;
use serde_json::{Map, Value, json};

use crate::audit::Audit;
use crate::clock::SharedClock;
use crate::error::{Body, GatewayError, json_response};
use crate::policy::jurisdiction::Jurisdiction;
use crate::state::{StateStore, StoreError, Suspension};

/// How long admission trusts the suspensions it read.
pub const REFRESH: Duration = Duration::from_secs(1);

/// The list read last, when, and whether a request is reading it again.
#[derive(Default)]
struct Cached {
    list: Option<(Instant, Arc<Vec<Suspension>>)>,
    /// Since when a request has been reading the list again (a read cut short leaves this set:
    /// past [`REFRESH`] another request reads it).
    refreshing: Option<Instant>,
}

/// The suspensions, cached for admission, and the admin API.
pub struct Suspensions {
    store: Arc<dyn StateStore>,
    clock: SharedClock,
    audit: Arc<Audit>,
    cache: Mutex<Cached>,
}

impl std::fmt::Debug for Suspensions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Suspensions")
    }
}

/// The suspension that stops a call to a number of jurisdiction `j` at `now`, if any.
pub fn stopping<'a>(list: &'a [Suspension], j: &Jurisdiction, now: i64) -> Option<&'a Suspension> {
    list.iter().find(|s| s.until > now && j.is_in(&s.region))
}

/// The refusal for a suspended region, and its rule.
pub fn refusal(s: &Suspension) -> (String, GatewayError) {
    let until = jiff::Timestamp::from_microsecond(s.until)
        .map(|t| t.to_string())
        .unwrap_or_default();
    (
        format!("suspension {}", s.region),
        GatewayError::DestinationNotAllowed(format!(
            "calls to {} are suspended until {until}: {}",
            s.region, s.reason
        )),
    )
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NewSuspension {
    region: String,
    until: String,
    reason: String,
}

fn view(s: &Suspension, now: i64) -> Value {
    let at = |us: i64| {
        jiff::Timestamp::from_microsecond(us)
            .map(|t| Value::String(t.to_string()))
            .unwrap_or(Value::Null)
    };
    json!({
        "region": s.region,
        "until": at(s.until),
        "reason": s.reason,
        "created_at": at(s.created_at),
        "active": s.until > now,
    })
}

impl Suspensions {
    pub fn new(store: Arc<dyn StateStore>, clock: SharedClock, audit: Arc<Audit>) -> Self {
        Suspensions {
            store,
            clock,
            audit,
            cache: Mutex::new(Cached::default()),
        }
    }

    /// The suspensions as of at most [`REFRESH`] ago (a little more while one request reads
    /// them again: the others go on with the list they have).
    pub async fn current(&self) -> Result<Arc<Vec<Suspension>>, StoreError> {
        {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            match &cache.list {
                Some((at, list))
                    if at.elapsed() < REFRESH
                        || cache.refreshing.is_some_and(|t| t.elapsed() < REFRESH) =>
                {
                    return Ok(list.clone());
                }
                _ => cache.refreshing = Some(Instant::now()),
            }
        }
        let read = StateStore::suspensions(&*self.store).await;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.refreshing = None;
        let list = Arc::new(read?);
        cache.list = Some((Instant::now(), list.clone()));
        Ok(list)
    }

    fn invalidate(&self) {
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).list = None;
    }

    fn audit_line(&self, request_id: &str, action: &str, region: &str, fields: Map<String, Value>) {
        let mut line = fields;
        line.insert("request_id".into(), request_id.into());
        line.insert("action".into(), action.into());
        line.insert("region".into(), region.into());
        self.audit.record("suspension", line);
    }

    /// The admin routes under `/admin/suspensions`; `None` if `path` is not one.
    pub async fn admin(
        &self,
        method: &http::Method,
        path: &str,
        request_id: &str,
        bytes: &[u8],
    ) -> Option<Result<http::Response<Body>, GatewayError>> {
        use http::Method;
        let rest = path
            .strip_prefix("/admin/suspensions")
            .filter(|r| r.is_empty() || r.starts_with('/'))?;
        let now = self.clock.now().as_microsecond();
        Some(match (method, rest) {
            (&Method::GET, "") => match StateStore::suspensions(&*self.store).await {
                Ok(list) => Ok(json_response(
                    StatusCode::OK,
                    &json!({"data": list.iter().map(|s| view(s, now)).collect::<Vec<_>>()}),
                )),
                Err(e) => Err(e.into()),
            },
            (&Method::POST, "") => self.add(request_id, bytes, now).await,
            (_, "") => Err(GatewayError::MethodNotAllowed { allow: "GET, POST" }),
            (&Method::DELETE, r) if r.len() > 1 => {
                let region = &r[1..];
                match self.store.lift_suspension(region).await {
                    Ok(true) => {
                        self.invalidate();
                        self.audit_line(request_id, "lifted", region, Map::new());
                        tracing::warn!(target: "audit", region, "admin: suspension lifted");
                        Ok(json_response(
                            StatusCode::OK,
                            &json!({"lifted": true, "region": region}),
                        ))
                    }
                    Ok(false) => Err(GatewayError::NotFound("no such suspension")),
                    Err(e) => Err(e.into()),
                }
            }
            _ => Err(GatewayError::MethodNotAllowed { allow: "DELETE" }),
        })
    }

    async fn add(
        &self,
        request_id: &str,
        bytes: &[u8],
        now: i64,
    ) -> Result<http::Response<Body>, GatewayError> {
        let new: NewSuspension =
            serde_json::from_slice(bytes).map_err(|e| GatewayError::InvalidRequest {
                message: format!("the body must be {{\"region\", \"until\", \"reason\"}}: {e}"),
                param: None,
            })?;
        crate::policy::packs::check_region(&new.region)
            .map_err(|reason| GatewayError::invalid("/region", reason))?;
        let until: jiff::Timestamp = new.until.parse().map_err(|e| {
            GatewayError::invalid("/until", format!("until is not an RFC 3339 time: {e}"))
        })?;
        if until.as_microsecond() <= now {
            return Err(GatewayError::invalid(
                "/until",
                "until is not in the future",
            ));
        }
        if new.reason.trim().is_empty() {
            return Err(GatewayError::invalid("/reason", "a reason is required"));
        }
        let suspension = Suspension {
            region: new.region,
            until: until.as_microsecond(),
            reason: new.reason.trim().to_string(),
            created_at: now,
        };
        self.store.suspend(suspension.clone()).await?;
        self.invalidate();
        let mut fields = Map::new();
        fields.insert("until".into(), until.to_string().into());
        fields.insert("reason".into(), suspension.reason.clone().into());
        self.audit_line(request_id, "suspended", &suspension.region, fields);
        tracing::warn!(target: "audit", region = %suspension.region, until = %until, reason = %suspension.reason, "admin: calls suspended");
        Ok(json_response(StatusCode::CREATED, &view(&suspension, now)))
    }
}
