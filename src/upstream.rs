//! The upstream client: one pooled HTTP/1.1 + HTTP/2 client (rustls for HTTPS), connect and
//! request timeouts, and the account key. Failures are mapped to `upstream_unavailable` (502) and
//! `upstream_timeout` (504); upstream answers, errors included, are passed through unchanged.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::{Secret, UpstreamSettings};
use crate::error::{Body, GatewayError};

/// Largest upstream answer the gateway will relay.
const MAX_UPSTREAM_BODY: usize = 1024 * 1024;

/// The pooled HTTP client used for the upstream (and, later, webhook deliveries).
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Pool and timeout settings for [`build_client`].
#[derive(Debug, Clone, Copy)]
pub struct ClientOptions {
    pub connect_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
}

impl From<&UpstreamSettings> for ClientOptions {
    fn from(s: &UpstreamSettings) -> Self {
        ClientOptions {
            connect_timeout: s.connect_timeout(),
            pool_idle_timeout: Duration::from_millis(s.pool_idle_timeout_ms),
            pool_max_idle_per_host: s.pool_max_idle_per_host,
        }
    }
}

/// A pooled client that speaks HTTP/1.1 and HTTP/2 (ALPN) over TLS with the platform's trust
/// roots (the bundled Mozilla roots where the platform has none), and plain HTTP.
pub fn build_client(options: ClientOptions) -> HttpClient {
    build_client_with(options, HttpConnector::new())
}

/// As [`build_client`], over a given TCP connector (e.g. one with a guarded resolver).
pub fn build_client_with<R>(
    options: ClientOptions,
    mut http: HttpConnector<R>,
) -> Client<HttpsConnector<HttpConnector<R>>, Full<Bytes>>
where
    R: tower::Service<hyper_util::client::legacy::connect::dns::Name>
        + Clone
        + Send
        + Sync
        + 'static,
    R::Response: Iterator<Item = std::net::SocketAddr>,
    R::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    R::Future: Send,
{
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = hyper_rustls::HttpsConnectorBuilder::new();
    let builder = match builder.with_provider_and_native_roots(provider.clone()) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "no platform trust roots; using the bundled Mozilla roots");
            hyper_rustls::HttpsConnectorBuilder::new()
                .with_provider_and_webpki_roots(provider)
                .unwrap_or_else(|_| unreachable_tls())
        }
    };
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(options.connect_timeout));
    let connector = builder
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(options.pool_idle_timeout)
        .pool_max_idle_per_host(options.pool_max_idle_per_host)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector)
}

fn unreachable_tls() -> ! {
    // ring supports every protocol version rustls offers; this cannot fail.
    panic!("the ring provider does not support the default TLS versions")
}

/// The upstream calls API, with the account key.
#[derive(Clone)]
pub struct Upstream {
    base: String,
    key: Secret,
    client: HttpClient,
    timeout: Duration,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("base", &self.base)
            .finish()
    }
}

impl Upstream {
    /// `base` is the API's base URL (`https://api.ringyo.ai`).
    pub fn new(base: &str, key: Secret, client: HttpClient, timeout: Duration) -> Self {
        Upstream {
            base: base.trim_end_matches('/').to_string(),
            key,
            client,
            timeout,
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// Send one request to the upstream with the account key, and read the whole answer.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        request_id: &str,
    ) -> Result<Response<Bytes>, GatewayError> {
        let mut builder = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header(
                header::AUTHORIZATION,
                format!("Bearer {}", self.key.expose()),
            )
            .header(
                header::USER_AGENT,
                concat!("callgate/", env!("CARGO_PKG_VERSION")),
            )
            .header(header::ACCEPT, "application/json");
        if let Ok(id) = HeaderValue::from_str(request_id) {
            builder = builder.header("x-request-id", id);
        }
        if body.is_some() {
            builder = builder.header(header::CONTENT_TYPE, "application/json");
        }
        let request = builder
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| GatewayError::Internal(format!("building upstream request: {e}")))?;
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| {
                tracing::warn!(error = %error_chain(&e), "upstream request failed");
                GatewayError::UpstreamUnavailable
            })?;
            let (parts, body) = response.into_parts();
            let bytes = Limited::new(body, MAX_UPSTREAM_BODY)
                .collect()
                .await
                .map_err(|e| {
                    tracing::warn!(error = %e, "upstream response could not be read");
                    GatewayError::UpstreamUnavailable
                })?
                .to_bytes();
            Ok(Response::from_parts(parts, bytes))
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => {
                tracing::warn!(
                    timeout_ms = self.timeout.as_millis() as u64,
                    "upstream timed out"
                );
                Err(GatewayError::UpstreamTimeout)
            }
        }
    }
}

/// An error and its causes on one line (hyper's own message is terse).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Relay an upstream answer to the tenant: status and body unchanged, only the content type kept.
pub fn relay(response: Response<Bytes>) -> Response<Body> {
    let (parts, body) = response.into_parts();
    let mut out = Response::new(Full::new(body));
    *out.status_mut() = parts.status;
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("application/json"));
    out.headers_mut().insert(header::CONTENT_TYPE, content_type);
    if parts.status == StatusCode::TOO_MANY_REQUESTS
        && let Some(v) = parts.headers.get(header::RETRY_AFTER)
    {
        out.headers_mut().insert(header::RETRY_AFTER, v.clone());
    }
    out
}
