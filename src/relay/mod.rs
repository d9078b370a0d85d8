//! The webhook relay.
//!
//! Inbound: the upstream POSTs a call's events to `/v1/relay/{token}`, the URL the forward stage
//! gave it. The token (the reservation id and 256 random bits, stored only as their hash; see
//! [`RelayToken`]) identifies the call; an unknown token is refused and changes nothing. Fields
//! are read through the configured JSON pointers.
//! Each event updates the call's status; the final one settles it (actual duration, rounded up to
//! the billing increment), returns the rest of the hold and frees the slot.
//!
//! Outbound: the event body is forwarded unchanged to the tenant's own `webhook_url`, signed
//! `Callgate-Signature: t=<unix>,v1=<hex HMAC-SHA256 of "t.body">` with the tenant's secret,
//! retried with exponential backoff a bounded number of times. Deliveries never go to loopback,
//! private, link-local or cloud-metadata addresses (checked after DNS resolution, at connect
//! time) unless a tenant policy names that host explicitly.
//!
//! - inbound (here): events received, checked against their token, applied to the call;
//! - [`delivery`]: events relayed to the tenant's webhook, signed, retried;
//! - [`guard`]: the SSRF guard every delivery connects through.

mod delivery;
mod guard;

pub use delivery::{SIGNATURE, sign};
pub use guard::{GuardedResolver, is_public};

use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::proxy::matcher::Matcher;
use serde_json::{Value, json};

use crate::clock::SharedClock;
use crate::config::RelaySettings;
use crate::error::{Body, GatewayError, json_response};
use crate::policy::PolicyHandle;
use crate::state::{CallEvent, EventOutcome, RelayToken, StateStore};
use crate::upstream::{ClientOptions, ProxyConnector, build_client_with};

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
    audit: Arc<crate::audit::Audit>,
}

impl Relay {
    /// Write settlements by event to `audit`.
    pub fn with_audit(mut self, audit: Arc<crate::audit::Audit>) -> Self {
        self.audit = audit;
        self
    }

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
            audit: Arc::new(crate::audit::Audit::off()),
        }
    }

    /// Read an event's fields through the configured pointers.
    pub fn parse_event(&self, body: &[u8]) -> Result<CallEvent, GatewayError> {
        parse_event_with(&self.settings, body)
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
                    self.audit.settlement(&record, "event");
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
}

/// Read an event's fields through the configured pointers (the relay's parser, on its own for
/// the fuzz target).
pub fn parse_event_with(
    s: &crate::config::RelaySettings,
    body: &[u8],
) -> Result<CallEvent, GatewayError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| GatewayError::InvalidRequest {
        message: format!("event is not JSON: {e}"),
        param: None,
    })?;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;
    use crate::policy::Policies;
    use crate::policy::tests::tree;
    use crate::state::sqlite::{SqliteStore, Synchronous};
    use hmac::{Hmac, KeyInit, Mac};
    use hyper_util::client::legacy::connect::dns::Name;
    use sha2::Sha256;
    use std::net::SocketAddr;

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
                crate::hexstr::lower(mac.finalize().into_bytes())
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

    /// One relay for the property test (its store and client are costly to make per case).
    fn parsing_relay() -> &'static Relay {
        static RELAY: std::sync::OnceLock<(Relay, tempfile::TempDir)> = std::sync::OnceLock::new();
        &RELAY
            .get_or_init(|| {
                let state = tempfile::tempdir().unwrap();
                let store = Arc::new(
                    SqliteStore::open(&state.path().join("s.db"), Synchronous::Normal).unwrap(),
                );
                let relay = Relay::new(
                    store,
                    Arc::new(SystemClock),
                    PolicyHandle::new(crate::policy::tests::fixture_policies()),
                    RelaySettings::default(),
                    &ClientOptions::direct(Duration::from_secs(2)),
                );
                (relay, state)
            })
            .0
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 256,
            failure_persistence: None,
            ..Default::default()
        })]

        /// Any body is parsed or refused, never a panic; an event's fields are read exactly.
        #[test]
        fn events_are_parsed_or_refused(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
            id in "[a-z0-9_]{1,20}",
            status in "[a-z_]{1,12}",
            duration in proptest::option::of(-10i64..100_000),
            fractional in proptest::option::of(0.0f64..1e6),
        ) {
            let relay = parsing_relay();
            let _ = relay.parse_event(&bytes);
            let mut body = serde_json::json!({"call_id": id, "status": status});
            if let Some(d) = duration {
                body["duration"] = serde_json::json!(d);
            }
            let event = relay.parse_event(body.to_string().as_bytes()).unwrap();
            proptest::prop_assert_eq!(event.call_id.as_deref(), Some(id.as_str()));
            proptest::prop_assert_eq!(&event.status, &status);
            proptest::prop_assert_eq!(event.duration, duration);
            proptest::prop_assert_eq!(event.is_final, status == "completed" || status == "failed");
            if let Some(f) = fractional {
                let body = serde_json::json!({"status": "completed", "duration": f});
                let event = relay.parse_event(body.to_string().as_bytes()).unwrap();
                proptest::prop_assert_eq!(event.duration, Some(f.ceil() as i64));
            }
        }
    }
}
