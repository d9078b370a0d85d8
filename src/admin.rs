//! The admin API, on its own listener with its own token (and, optionally, its own TLS
//! certificate): tenants, live usage, reload.
//!
//! ```text
//! GET  /admin/tenants              every tenant with its limits and budget terms
//! GET  /admin/tenants/{id}/usage   slots, holds, spend and what is left of the budget now
//! POST /admin/tenants/{id}/budget  {"top_up": N} or {"adjust_spent": D}, "reason": "..."
//!                                  the tenant's spend this period, adjusted; its usage after
//! POST /admin/calls/{id}/release   {"tenant": "...", "charge": N, "reason": "..."}
//!                                  a stuck call settled now at the stated charge
//! POST /admin/reload               reload the policies and TLS certificates
//! POST /admin/do-not-call          {"phone_number", "tenant"?, "reason"?}  an opt-out entry
//! GET  /admin/do-not-call/{number} a number's entries, and the tenants whose lists hold it
//! DELETE /admin/do-not-call/{number}[?tenant=ID]  an entry removed
//! POST /admin/suspensions         {"region", "until", "reason"}  calls to a region suspended
//! GET  /admin/suspensions          every suspension;  DELETE /admin/suspensions/{region}: lifted
//! POST /admin/check-request?tenant=ID[&at=RFC3339]  a create-call body's dry run (see
//!                                  `dryrun`): every stage's verdict; nothing consumed
//! ```
//!
//! Every change is written to the audit log (target `audit`) with its reason.
//!
//! Every request needs `Authorization: Bearer <admin token>`; the token is compared by its
//! SHA-256 digest in constant time. Except, at the root, what Prometheus and a load balancer
//! ask without credentials:
//!
//! ```text
//! GET  /metrics   Prometheus text format 0.0.4
//! GET  /healthz   the process is alive
//! GET  /readyz    policies loaded and the state store answering, else 503 with the reason
//! ```

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Method, Request, Response, StatusCode, header};
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tower::util::BoxCloneService;
use tower::{Service, ServiceBuilder, ServiceExt};

use crate::clock::SharedClock;
use crate::config::Secret;
use crate::error::{Body, GatewayError, json_response};
use crate::policy::Tenant;
use crate::reload::Reloader;
use crate::stages::trace::TraceLayer;
use crate::state::StateStore;

/// What the admin API needs.
#[derive(Clone)]
pub struct AdminContext {
    pub token: Secret,
    pub reloader: Arc<Reloader>,
    pub store: Arc<dyn StateStore>,
    pub clock: SharedClock,
    pub audit: Arc<crate::audit::Audit>,
    /// `/admin/do-not-call`.
    pub optouts: crate::optouts::OptOutApi,
    /// `server.max_json_depth`, for `/admin/check-request`.
    pub max_json_depth: usize,
    /// `/admin/suspensions`.
    pub suspensions: Arc<crate::suspensions::Suspensions>,
}

/// The admin service, with the same request ids and error envelope as the tenant API.
pub fn admin_app<B>(ctx: AdminContext) -> BoxCloneService<Request<B>, Response<Body>, Infallible>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    ServiceBuilder::new()
        .layer(TraceLayer::default())
        .service(AdminRouter(Arc::new(ctx)))
        .boxed_clone()
}

#[derive(Clone)]
struct AdminRouter(Arc<AdminContext>);

fn authorized(ctx: &AdminContext, headers: &http::HeaderMap) -> Result<(), GatewayError> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .ok_or(GatewayError::Unauthorized(
            "missing Authorization: Bearer <admin token>",
        ))?;
    let a = Sha256::digest(given.trim().as_bytes());
    let b = Sha256::digest(ctx.token.expose().as_bytes());
    if bool::from(a.as_slice().ct_eq(b.as_slice())) {
        Ok(())
    } else {
        Err(GatewayError::Unauthorized("invalid admin token"))
    }
}

fn tenant_view(t: &Tenant) -> serde_json::Value {
    json!({
        "id": t.id,
        "max_concurrent_calls": t.limits.max_concurrent_calls,
        "requests_per_minute": t.limits.requests_per_minute,
        "max_duration": t.max_duration,
        "budget": {
            "credits": t.budget.credits,
            "period": t.budget.period.as_str(),
            "timezone": t.budget.timezone,
            "price_per_increment": t.budget.price_per_increment,
            "increment_secs": t.budget.increment_secs,
        },
    })
}

/// An operator's action: `/admin/tenants/{id}/budget` or `/admin/calls/{id}/release`.
enum Action<'a> {
    Budget(&'a str),
    Release(&'a str),
}

fn action_target(path: &str) -> Option<Action<'_>> {
    fn id(p: Option<&str>) -> Option<&str> {
        p.filter(|id| !id.is_empty() && !id.contains('/'))
    }
    if let Some(id) = id(path
        .strip_prefix("/admin/tenants/")
        .and_then(|p| p.strip_suffix("/budget")))
    {
        return Some(Action::Budget(id));
    }
    id(path
        .strip_prefix("/admin/calls/")
        .and_then(|p| p.strip_suffix("/release")))
    .map(Action::Release)
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BudgetChange {
    top_up: Option<i64>,
    adjust_spent: Option<i64>,
    reason: String,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StuckCall {
    tenant: String,
    charge: i64,
    reason: String,
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, GatewayError> {
    serde_json::from_slice(body).map_err(|e| GatewayError::InvalidRequest {
        message: format!("the body is not what this action takes: {e}"),
        param: None,
    })
}

/// The tenant id in `/admin/tenants/{id}/usage`, if `path` is one (a non-empty id, no `/`).
fn usage_tenant(path: &str) -> Option<&str> {
    path.strip_prefix("/admin/tenants/")?
        .strip_suffix("/usage")
        .filter(|id| !id.is_empty() && !id.contains('/'))
}

impl AdminContext {
    /// `POST /admin/check-request?tenant=ID&at=...`: the dry run's verdict (200 whatever it is).
    async fn check_request(
        &self,
        query: Option<&str>,
        body: bytes::Bytes,
    ) -> Result<Response<Body>, GatewayError> {
        let mut tenant = None;
        let mut at = None;
        for (key, value) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match &*key {
                "tenant" => tenant = Some(value.into_owned()),
                // An unencoded `+` of an offset arrives as a space.
                "at" => at = Some(value.replace(' ', "+")),
                _ => {}
            }
        }
        let policies = self.reloader.policies.current();
        let tenant =
            tenant.ok_or_else(|| GatewayError::invalid("tenant", "give the tenant: ?tenant=ID"))?;
        let tenant = policies
            .tenants
            .get(&tenant)
            .cloned()
            .ok_or(GatewayError::NotFound("no such tenant"))?;
        let at = match at {
            None => self.clock.now(),
            Some(text) => text.parse::<jiff::Timestamp>().map_err(|e| {
                GatewayError::invalid("at", format!("at {text:?} is not an RFC 3339 time: {e}"))
            })?,
        };
        let verdict = crate::dryrun::check_request(
            &policies,
            &self.store,
            &tenant,
            body,
            at,
            self.max_json_depth,
        )
        .await;
        Ok(json_response(StatusCode::OK, &verdict))
    }

    /// An operator's change, written to the audit log.
    async fn act(&self, path: &str, body: &[u8]) -> Result<Response<Body>, GatewayError> {
        let policies = self.reloader.policies.current();
        let now = self.clock.now().as_microsecond();
        match action_target(path) {
            Some(Action::Budget(id)) => {
                let tenant = policies
                    .tenants
                    .get(id)
                    .ok_or(GatewayError::NotFound("no such tenant"))?;
                let change: BudgetChange = parse(body)?;
                let delta = match (change.top_up, change.adjust_spent) {
                    (Some(n), None) if n > 0 => -n,
                    (None, Some(d)) if d != 0 => d,
                    _ => {
                        return Err(GatewayError::invalid(
                            "/top_up",
                            "give either a positive top_up or a non-zero adjust_spent",
                        ));
                    }
                };
                if change.reason.trim().is_empty() {
                    return Err(GatewayError::invalid("/reason", "a reason is required"));
                }
                let terms = tenant
                    .budget
                    .credits
                    .map(|credits| crate::state::BudgetTerms {
                        credits,
                        period: tenant.budget.period,
                        timezone: tenant.budget.timezone.clone(),
                    });
                let usage = self.store.adjust_spend(id, terms, delta, now).await?;
                let mut line = serde_json::Map::new();
                line.insert("tenant".into(), id.into());
                line.insert("spent_delta".into(), delta.into());
                line.insert("spent".into(), usage.spent.into());
                line.insert("reason".into(), change.reason.clone().into());
                self.audit.admin("budget_adjusted", line);
                tracing::warn!(
                    target: "audit",
                    tenant = %id,
                    spent_delta = delta,
                    spent = usage.spent,
                    reason = %change.reason,
                    "admin: budget adjusted for the current period"
                );
                Ok(json_response(
                    StatusCode::OK,
                    &json!({"tenant": id, "spent": usage.spent, "holds": usage.holds, "slots": usage.slots,
                            "available": tenant.budget.credits.map(|c| c - usage.spent - usage.holds)}),
                ))
            }
            Some(Action::Release(call_id)) => {
                let stuck: StuckCall = parse(body)?;
                if stuck.charge < 0 {
                    return Err(GatewayError::invalid(
                        "/charge",
                        "the charge cannot be negative",
                    ));
                }
                if stuck.reason.trim().is_empty() {
                    return Err(GatewayError::invalid("/reason", "a reason is required"));
                }
                if !policies.tenants.contains_key(&stuck.tenant) {
                    return Err(GatewayError::NotFound("no such tenant"));
                }
                let (record, settled) = self
                    .store
                    .settle_stated(&stuck.tenant, call_id, stuck.charge, now)
                    .await?
                    .ok_or(GatewayError::NotFound("no such call"))?;
                if settled {
                    crate::metrics::settled(&record);
                    self.audit.settlement(&record, "admin");
                }
                let mut line = serde_json::Map::new();
                line.insert("tenant".into(), stuck.tenant.clone().into());
                line.insert("call_id".into(), call_id.into());
                line.insert("charge".into(), record.charged.into());
                line.insert("settled".into(), settled.into());
                line.insert("reason".into(), stuck.reason.clone().into());
                self.audit.admin("call_released", line);
                tracing::warn!(
                    target: "audit",
                    tenant = %stuck.tenant,
                    call_id,
                    charged = record.charged,
                    settled,
                    reason = %stuck.reason,
                    "admin: stuck call released"
                );
                Ok(json_response(
                    StatusCode::OK,
                    &json!({"settled": settled, "call": record.public_view(), "charged": record.charged}),
                ))
            }
            None => Err(GatewayError::NotFound("no such route")),
        }
    }

    async fn route(&self, method: Method, path: &str) -> Result<Response<Body>, GatewayError> {
        let policies = self.reloader.policies.current();
        let usage_of = usage_tenant(path);
        match (method, path) {
            (Method::GET, "/metrics") => {
                let now = self.clock.now().as_microsecond();
                let text = crate::metrics::render(&policies, self.store.as_ref(), now).await?;
                let mut response = Response::new(Body::from(text));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                Ok(response)
            }
            (Method::GET, "/healthz") => {
                Ok(json_response(StatusCode::OK, &json!({"status": "ok"})))
            }
            (Method::GET, "/readyz") => Ok(match self.store.ready().await {
                Ok(()) => json_response(
                    StatusCode::OK,
                    &json!({"status": "ok", "tenants": policies.tenants.len()}),
                ),
                Err(e) => json_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    &json!({"status": "not_ready", "reason": e.to_string()}),
                ),
            }),
            (_, "/metrics" | "/healthz" | "/readyz") => {
                Err(GatewayError::MethodNotAllowed { allow: "GET" })
            }
            (Method::GET, "/admin/tenants") => {
                let data: Vec<_> = policies.tenants.values().map(|t| tenant_view(t)).collect();
                Ok(json_response(StatusCode::OK, &json!({ "data": data })))
            }
            (Method::GET, _) if usage_of.is_some() => {
                let id = usage_of.unwrap_or_default();
                let tenant = policies
                    .tenants
                    .get(id)
                    .ok_or(GatewayError::NotFound("no such tenant"))?;
                let usage = self
                    .store
                    .usage(id, self.clock.now().as_microsecond())
                    .await?;
                let available = tenant
                    .budget
                    .credits
                    .map(|c| (c - usage.spent - usage.holds).max(0));
                Ok(json_response(
                    StatusCode::OK,
                    &json!({
                        "tenant": id,
                        "slots": usage.slots,
                        "max_concurrent_calls": tenant.limits.max_concurrent_calls,
                        "holds": usage.holds,
                        "spent": usage.spent,
                        "credits": tenant.budget.credits,
                        "available": available,
                        "period_start": jiff::Timestamp::from_microsecond(usage.period_start).ok().map(|t| t.to_string()),
                    }),
                ))
            }
            (Method::POST, "/admin/reload") => {
                // In a task of its own: a client that stops waiting (the load can take seconds)
                // does not cut the reload's audit line and certificates short.
                let (reloader, audit) = (self.reloader.clone(), self.audit.clone());
                let reloaded = tokio::spawn(async move {
                    let tenants = reloader.reload_audited(&audit).await?;
                    Ok::<_, Vec<crate::config::ConfigError>>((tenants, reloader.reload_tls()))
                })
                .await
                .map_err(|e| GatewayError::Internal(format!("reload failed: {e}")))?;
                let (tenants, certificates) =
                    reloaded.map_err(|errors| GatewayError::InvalidRequest {
                        message: format!(
                            "policies not reloaded; the old ones stay in force: {}",
                            errors
                                .iter()
                                .map(|e| e.to_string())
                                .collect::<Vec<_>>()
                                .join("; ")
                        ),
                        param: None,
                    })?;
                let certificates = certificates.map_err(|e| GatewayError::InvalidRequest {
                    message: format!("TLS not reloaded; the old certificates stay in use: {e}"),
                    param: None,
                })?;
                Ok(json_response(
                    StatusCode::OK,
                    &json!({"tenants": tenants, "certificates": certificates}),
                ))
            }
            (_, "/admin/tenants") => Err(GatewayError::MethodNotAllowed { allow: "GET" }),
            (_, "/admin/reload") => Err(GatewayError::MethodNotAllowed { allow: "POST" }),
            (_, _) if usage_of.is_some() => Err(GatewayError::MethodNotAllowed { allow: "GET" }),
            (_, p) if action_target(p).is_some() => {
                Err(GatewayError::MethodNotAllowed { allow: "POST" })
            }
            _ => Err(GatewayError::NotFound("no such route")),
        }
    }
}

impl<B> Service<Request<B>> for AdminRouter
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = Response<Body>;
    type Error = GatewayError;
    type Future = crate::stages::StageFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), GatewayError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let ctx = self.0.clone();
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let open = matches!(path.as_str(), "/metrics" | "/healthz" | "/readyz");
        let auth = if open {
            Ok(())
        } else {
            authorized(&ctx, req.headers())
        };
        let query = req.uri().query().map(str::to_string);
        let request_id = req
            .extensions()
            .get::<crate::stages::trace::RequestId>()
            .map(|r| r.0.clone())
            .unwrap_or_default();
        Box::pin(async move {
            auth?;
            let limits = crate::stages::limits::BodyLimits {
                max_bytes: 16 * 1024,
                read_timeout: std::time::Duration::from_secs(10),
            };
            if path == "/admin/check-request" {
                if method != Method::POST {
                    return Err(GatewayError::MethodNotAllowed { allow: "POST" });
                }
                let limits = crate::stages::limits::BodyLimits {
                    max_bytes: 64 * 1024,
                    ..limits
                };
                let body = crate::stages::limits::read_body(req.into_body(), limits).await?;
                return ctx.check_request(query.as_deref(), body).await;
            }
            if path.starts_with("/admin/suspensions") {
                let body = match method {
                    Method::POST => {
                        crate::stages::limits::read_body(req.into_body(), limits).await?
                    }
                    _ => bytes::Bytes::new(),
                };
                if let Some(answer) = ctx
                    .suspensions
                    .admin(&method, &path, &request_id, &body)
                    .await
                {
                    return answer;
                }
                return Err(GatewayError::NotFound("no such route"));
            }
            if path.starts_with("/admin/do-not-call") {
                let body = match method {
                    Method::POST => {
                        crate::stages::limits::read_body(req.into_body(), limits).await?
                    }
                    _ => bytes::Bytes::new(),
                };
                return ctx
                    .optouts
                    .admin(&method, &path, query.as_deref(), &request_id, &body)
                    .await
                    .unwrap_or(Err(GatewayError::NotFound("no such route")));
            }
            if method == Method::POST && action_target(&path).is_some() {
                let body = crate::stages::limits::read_body(req.into_body(), limits).await?;
                return ctx.act(&path, &body).await;
            }
            ctx.route(method, &path).await
        })
    }
}
