//! Outbound: a call's events relayed to the tenant's own webhook, signed
//! `Callgate-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "t.body">` with the tenant's secret, and
//! retried with exponential backoff a bounded number of times.

use std::net::IpAddr;
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use http::{Request, StatusCode, header};
use http_body_util::Full;
use sha2::Sha256;

use crate::policy::Tenant;
use crate::upstream::error_chain;

use super::Relay;
use super::guard::{check_resolved, is_public};

/// The signature header on relayed events.
pub const SIGNATURE: &str = "callgate-signature";

/// `t=<unix>,v1=<hex HMAC-SHA256(secret, "<unix>.<body>")>`.
pub fn sign(secret: &[u8], unix: i64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret)
        .unwrap_or_else(|_| <Hmac<Sha256> as KeyInit>::new_from_slice(b"-").expect("static key"));
    mac.update(unix.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!(
        "t={unix},v1={}",
        crate::hexstr::lower(mac.finalize().into_bytes())
    )
}

impl Relay {
    /// Deliver one event to a tenant's webhook, signed, with bounded retries. Returns whether it
    /// was accepted.
    pub async fn deliver(&self, tenant: &Tenant, url: &str, body: Bytes) -> bool {
        let Some(secret) = tenant.webhook_secret.as_ref() else {
            tracing::warn!(tenant = %tenant.id, "no webhook secret; event not relayed");
            return false;
        };
        let Ok(parsed) = url::Url::parse(url) else {
            return false;
        };
        // IP literals never reach the resolver: check them here.
        if let Some(url::Host::Ipv4(_) | url::Host::Ipv6(_)) = parsed.host() {
            let host = parsed.host_str().unwrap_or("").trim_matches(['[', ']']);
            let ip: Option<IpAddr> = host.parse().ok();
            let explicit = tenant
                .webhooks
                .allowed_hosts
                .iter()
                .any(|h| h.trim_matches(['[', ']']) == host);
            if ip.is_some_and(|ip| !is_public(ip)) && !explicit {
                tracing::warn!(tenant = %tenant.id, %host, "webhook address is not public; event not relayed");
                return false;
            }
        }
        // Through a proxy, the proxy resolves the name: check what it will find first.
        let proxied = self.proxy.as_ref().is_some_and(|m| {
            url.parse::<http::Uri>()
                .ok()
                .and_then(|u| m.intercept(&u))
                .is_some()
        });
        if proxied && let Some(url::Host::Domain(host)) = parsed.host() {
            let explicit = tenant
                .webhooks
                .allowed_hosts
                .iter()
                .any(|h| h.eq_ignore_ascii_case(host));
            if let Err(e) = check_resolved(host, explicit).await {
                tracing::warn!(tenant = %tenant.id, error = %e, "webhook host refused; event not relayed");
                crate::metrics::delivery(&tenant.id, "refused");
                return false;
            }
        }
        let s = &self.settings;
        let mut backoff = Duration::from_millis(s.delivery_backoff_ms);
        for attempt in 1..=s.delivery_attempts.max(1) {
            let unix = self.clock.now().as_second();
            let request = Request::post(url)
                .header(header::CONTENT_TYPE, "application/json")
                .header(
                    header::USER_AGENT,
                    concat!("callgate/", env!("CARGO_PKG_VERSION")),
                )
                .header(SIGNATURE, sign(secret.expose().as_bytes(), unix, &body))
                .body(Full::new(body.clone()));
            let Ok(request) = request else { return false };
            let outcome = tokio::time::timeout(
                Duration::from_millis(s.delivery_timeout_ms),
                self.client.request(request),
            )
            .await;
            let retry = match outcome {
                Ok(Ok(response)) if response.status().is_success() => {
                    crate::metrics::delivery(&tenant.id, "delivered");
                    return true;
                }
                Ok(Ok(response)) => {
                    let status = response.status();
                    tracing::warn!(tenant = %tenant.id, attempt, %status, "webhook delivery refused");
                    status.is_server_error()
                        || status == StatusCode::TOO_MANY_REQUESTS
                        || status == StatusCode::REQUEST_TIMEOUT
                }
                Ok(Err(e)) => {
                    tracing::warn!(tenant = %tenant.id, attempt, error = %error_chain(&e), "webhook delivery failed");
                    true
                }
                Err(_) => {
                    tracing::warn!(tenant = %tenant.id, attempt, "webhook delivery timed out");
                    true
                }
            };
            if !retry || attempt == s.delivery_attempts {
                break;
            }
            tokio::time::sleep(backoff).await;
            backoff = backoff.saturating_mul(2);
        }
        tracing::error!(tenant = %tenant.id, "webhook event dropped after retries");
        crate::metrics::delivery(&tenant.id, "failed");
        false
    }
}
