//! The webhook relay.
//!
//! Inbound: the upstream POSTs a call's events to `/v1/relay/{token}`, the URL the forward stage
//! gave it. The token (the reservation id and 256 random bits, stored only as their hash; see
//! [`RelayToken`]) identifies the call; an unknown token is refused and changes nothing. Fields are read through the configured JSON pointers.
//! Each event updates the call's status; the final one settles it (actual duration, rounded up to
//! the billing increment), returns the rest of the hold and frees the slot.
//!
//! Outbound: the event body is forwarded unchanged to the tenant's own `webhook_url`, signed
//! `Callgate-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "t.body">` with the tenant's secret,
//! retried with exponential backoff a bounded number of times. Deliveries never go to loopback,
//! private, link-local or cloud-metadata addresses (checked after DNS resolution, at connect
//! time) unless a tenant policy names that host explicitly.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tracing::Instrument;

use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use http::{Request, StatusCode, header};
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::proxy::matcher::Matcher;
use serde_json::{Value, json};
use sha2::Sha256;

use crate::clock::SharedClock;
use crate::config::RelaySettings;
use crate::error::{Body, GatewayError, json_response};
use crate::policy::{PolicyHandle, Tenant};
use crate::state::{CallEvent, EventOutcome, RelayToken, StateStore};
use crate::upstream::{ClientOptions, ProxyConnector, build_client_with, error_chain};

/// The signature header on relayed events.
pub const SIGNATURE: &str = "callgate-signature";

/// `t=<unix>,v1=<hex HMAC-SHA256(secret, "<unix>.<body>")>`.
pub fn sign(secret: &[u8], unix: i64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret)
        .unwrap_or_else(|_| <Hmac<Sha256> as KeyInit>::new_from_slice(b"-").expect("static key"));
    mac.update(unix.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={unix},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// Whether an address is one a webhook may reach without the tenant naming its host explicitly.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local() // 169.254/16, cloud metadata included
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1])) // carrier-grade NAT
                || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF protocol assignments
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local, AWS fd00:ec2::254 included
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] == 0x64 && s[1] == 0xff9b) // NAT64 may reach private IPv4
                || (s[0] == 0x2001 && s[1] == 0xdb8))
        }
    }
}

/// Whether some tenant names `host` explicitly (not through a `*.` pattern) in its webhook hosts.
fn named_explicitly(policies: &PolicyHandle, host: &str) -> bool {
    policies.current().tenants.values().any(|t| {
        t.webhooks
            .allowed_hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(host))
    })
}

/// A resolver that drops non-public addresses unless the host is named explicitly by a policy
/// (or is the configured egress proxy, which deliveries must reach).
#[derive(Clone)]
pub struct GuardedResolver {
    policies: PolicyHandle,
    proxy_hosts: Arc<Vec<String>>,
}

/// Resolve `host`, keeping only public addresses unless `explicit`; refuse if none is left.
async fn check_resolved(host: &str, explicit: bool) -> Result<Vec<SocketAddr>, std::io::Error> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, 0)).await?.collect();
    let allowed: Vec<SocketAddr> = addrs
        .into_iter()
        .filter(|a| explicit || is_public(a.ip()))
        .collect();
    if allowed.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("{host} resolves only to non-public addresses"),
        ));
    }
    Ok(allowed)
}

impl tower::Service<Name> for GuardedResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, std::io::Error>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), std::io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let host = name.as_str().to_string();
        let explicit = named_explicitly(&self.policies, &host)
            || self
                .proxy_hosts
                .iter()
                .any(|p| p.eq_ignore_ascii_case(&host));
        Box::pin(async move { Ok(check_resolved(&host, explicit).await?.into_iter()) })
    }
}

type DeliveryClient =
    Client<HttpsConnector<ProxyConnector<HttpConnector<GuardedResolver>>>, Full<Bytes>>;

/// Everything the relay needs.
#[derive(Clone)]
pub struct Relay {
    store: Arc<dyn StateStore>,
    clock: SharedClock,
    policies: PolicyHandle,
    settings: Arc<RelaySettings>,
    client: DeliveryClient,
    proxy: Option<Arc<Matcher>>,
}

impl Relay {
    /// `options` are the upstream client's (trust roots, proxy); deliveries share them.
    pub fn new(
        store: Arc<dyn StateStore>,
        clock: SharedClock,
        policies: PolicyHandle,
        settings: RelaySettings,
        options: &ClientOptions,
    ) -> Self {
        // A proxied delivery connects to the proxy: its host must resolve whatever it is.
        let proxy_hosts: Vec<String> = options
            .proxy
            .iter()
            .flat_map(|m| {
                ["http://probe.invalid/", "https://probe.invalid/"]
                    .iter()
                    .filter_map(|u| m.intercept(&u.parse().ok()?))
                    .filter_map(|i| i.uri().host().map(str::to_string))
                    .collect::<Vec<_>>()
            })
            .collect();
        let connector = HttpConnector::new_with_resolver(GuardedResolver {
            policies: policies.clone(),
            proxy_hosts: Arc::new(proxy_hosts),
        });
        let options = ClientOptions {
            connect_timeout: Duration::from_millis(settings.delivery_timeout_ms),
            ..options.clone()
        };
        let client = build_client_with(&options, connector);
        Relay {
            store,
            clock,
            policies,
            settings: Arc::new(settings),
            client,
            proxy: options.proxy.clone(),
        }
    }

    /// Read an event's fields through the configured pointers.
    pub fn parse_event(&self, body: &[u8]) -> Result<CallEvent, GatewayError> {
        let value: Value =
            serde_json::from_slice(body).map_err(|e| GatewayError::InvalidRequest {
                message: format!("event is not JSON: {e}"),
                param: None,
            })?;
        let s = &self.settings;
        let status = value
            .pointer(&s.status_pointer)
            .and_then(Value::as_str)
            .ok_or_else(|| GatewayError::invalid(s.status_pointer.clone(), "event has no status"))?
            .to_string();
        Ok(CallEvent {
            call_id: value
                .pointer(&s.call_id_pointer)
                .and_then(Value::as_str)
                .map(str::to_string),
            is_final: s.final_statuses.iter().any(|f| f == &status),
            duration: value
                .pointer(&s.duration_pointer)
                .and_then(|d| d.as_i64().or_else(|| d.as_f64().map(|f| f.ceil() as i64))),
            status,
        })
    }

    /// Handle `POST /v1/relay/{token}`.
    pub async fn receive(
        &self,
        token: &str,
        body: Bytes,
    ) -> Result<http::Response<Body>, GatewayError> {
        let token =
            RelayToken::parse(token).ok_or(GatewayError::NotFound("unknown relay token"))?;
        let event = self.parse_event(&body)?;
        let now = self.clock.now().as_microsecond();
        match self.store.record_event(&token, event.clone(), now).await? {
            EventOutcome::UnknownToken => Err(GatewayError::NotFound("unknown relay token")),
            EventOutcome::CallMismatch => Err(GatewayError::invalid(
                self.settings.call_id_pointer.clone(),
                "the event names another call than its relay URL",
            )),
            EventOutcome::Applied { record, settled } => {
                if settled {
                    crate::metrics::settled(&record);
                    tracing::info!(
                        target: "audit",
                        tenant = %record.tenant,
                        call_id = record.call_id.as_deref().unwrap_or(""),
                        status = %record.status,
                        duration = record.duration.unwrap_or(0),
                        charged = record.charged,
                        "settled by event"
                    );
                }
                if let Some(url) = record.tenant_webhook.clone()
                    && let Some(tenant) =
                        self.policies.current().tenants.get(&record.tenant).cloned()
                {
                    let relay = self.clone();
                    let span = tracing::info_span!(
                        "webhook delivery",
                        "otel.kind" = "client",
                        tenant = %tenant.id,
                        call_id = record.call_id.as_deref().unwrap_or(""),
                        "http.request.method" = "POST",
                    );
                    crate::tasks::spawn(
                        async move { relay.deliver(&tenant, &url, body).await }.instrument(span),
                    );
                }
                Ok(json_response(StatusCode::OK, &json!({"received": true})))
            }
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use crate::policy::Policies;
    use crate::policy::tests::tree;
    use crate::state::sqlite::{SqliteStore, Synchronous};

    const TENANT: &str = r#"key_sha256 = ["a2fb8545fcd457204e9fee11be92013aa3240b1b146fe262ba608fdfc159041c"]
[agents]
allow = ["agent_abc123"]
"#;

    /// A receiver on loopback that counts what it gets.
    async fn receiver() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = hits.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let counter = counter.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        async {
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                Bytes::new(),
                            )))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
                });
            }
        });
        (addr, hits)
    }

    #[tokio::test]
    async fn deliveries_to_private_addresses_need_the_host_named_explicitly() {
        let guarded_toml = format!(
            "id = \"guarded\"\n{TENANT}[webhooks]\nallowed_hosts = [\"*.0.0.1\", \"*.localhost\"]\nsecret = \"s\"\n"
        );
        let named_toml = format!(
            "id = \"named\"\n{}[webhooks]\nallowed_hosts = [\"127.0.0.1\", \"localhost\"]\nsecret = \"s\"\n",
            TENANT.replace("a2fb", "b2fb")
        );
        let dir = tree(&[
            ("guarded.toml", guarded_toml.as_str()),
            ("named.toml", named_toml.as_str()),
        ]);
        let policies = PolicyHandle::new(Policies::load(dir.path(), b"k").unwrap());
        let state = tempfile::tempdir().unwrap();
        let store =
            Arc::new(SqliteStore::open(&state.path().join("s.db"), Synchronous::Normal).unwrap());
        let settings = RelaySettings {
            delivery_attempts: 1,
            ..Default::default()
        };
        let options = ClientOptions::direct(Duration::from_secs(2));
        let relay = Relay::new(
            store,
            Arc::new(SystemClock),
            policies.clone(),
            settings,
            &options,
        );
        let (addr, hits) = receiver().await;
        let current = policies.current();
        let (guarded, named) = (&current.tenants["guarded"], &current.tenants["named"]);
        let by_ip = format!("http://127.0.0.1:{}/hook", addr.port());
        assert!(
            !relay
                .deliver(guarded, &by_ip, Bytes::from_static(b"{}"))
                .await
        );
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0);
        assert!(
            relay
                .deliver(named, &by_ip, Bytes::from_static(b"{}"))
                .await
        );
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);

        // By name: the resolver drops loopback answers unless a policy names the host.
        let mut resolver = GuardedResolver {
            policies: policies.clone(),
            proxy_hosts: Arc::default(),
        };
        let name: Name = "localhost".parse().unwrap();
        assert!(tower::Service::call(&mut resolver, name).await.is_ok());
        let unnamed = PolicyHandle::new(
            Policies::load(
                tree(&[("guarded.toml", guarded_toml.as_str())]).path(),
                b"k",
            )
            .unwrap(),
        );
        let mut resolver = GuardedResolver {
            policies: unnamed,
            proxy_hosts: Arc::default(),
        };
        let name: Name = "localhost".parse().unwrap();
        let err = tower::Service::call(&mut resolver, name).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied);
    }

    #[test]
    fn signatures_are_stripe_style() {
        let sig = sign(b"whsec", 1_700_000_000, b"{\"a\":1}");
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(b"whsec").unwrap();
        mac.update(b"1700000000.{\"a\":1}");
        assert_eq!(
            sig,
            format!(
                "t=1700000000,v1={}",
                hex::encode(mac.finalize().into_bytes())
            )
        );
    }

    #[test]
    fn private_and_metadata_addresses_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fe80::1",
            "fd00:ec2::254",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in ["93.184.216.34", "8.8.8.8", "2606:4700::1111"] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
    }
}
