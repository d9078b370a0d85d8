//! The upstream client: one pooled HTTP/1.1 + HTTP/2 client (rustls for HTTPS), connect and
//! request timeouts, and the account key. Upstream answers, errors included, are passed through
//! unchanged. Failures are told apart by whether the request went out ([`SentBody`]): before it
//! did (DNS, connect, TLS, proxy, a request handed back unsent, a timeout meanwhile) the call was
//! not placed: `upstream_unavailable` (502). After it did, it may have been:
//! `upstream_timeout` (504) or `upstream_connection_lost` (502).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tracing::Instrument;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::{ConfigError, Secret, UpstreamSettings};
use crate::error::{Body, GatewayError};

/// Largest upstream answer the gateway will relay.
const MAX_UPSTREAM_BODY: usize = 1024 * 1024;

/// The pooled HTTP client used for the upstream.
pub type HttpClient = Client<HttpsConnector<ProxyConnector<HttpConnector>>, SentBody>;

/// A request body that records when the client first asks for it: hyper does so once it has a
/// connection (TLS and proxy tunnel included) and is writing the request. Until then, the
/// request has certainly not gone out.
#[derive(Debug)]
pub struct SentBody {
    inner: Full<Bytes>,
    asked: Arc<std::sync::atomic::AtomicBool>,
}

impl SentBody {
    pub fn new(bytes: Bytes) -> Self {
        SentBody {
            inner: Full::new(bytes),
            asked: Arc::default(),
        }
    }

    /// The flag that says whether the request may have gone out.
    pub fn asked(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.asked.clone()
    }
}

impl hyper::body::Body for SentBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        this.asked.store(true, std::sync::atomic::Ordering::Release);
        Pin::new(&mut this.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        // A body-less request is written without its body being asked for: count it as asked
        // when the client checks, which it does as it writes the head.
        let end = self.inner.is_end_stream();
        if end {
            self.asked.store(true, std::sync::atomic::Ordering::Release);
        }
        end
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// TLS, proxy, pool and timeout settings for [`build_client`].
#[derive(Clone)]
pub struct ClientOptions {
    pub connect_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    /// Trust roots and protocol versions.
    pub tls: Arc<rustls::ClientConfig>,
    /// Which destinations go through an HTTP CONNECT proxy, and which proxy.
    pub proxy: Option<Arc<Matcher>>,
}

impl std::fmt::Debug for ClientOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientOptions")
            .field("connect_timeout", &self.connect_timeout)
            .field("proxy", &self.proxy.is_some())
            .finish()
    }
}

impl ClientOptions {
    /// From the upstream settings: `ca_file`, `proxy` / `no_proxy` (else `HTTPS_PROXY`,
    /// `HTTP_PROXY`, `ALL_PROXY` and `NO_PROXY` from the environment), pool and timeouts.
    pub fn from_settings(s: &UpstreamSettings) -> Result<Self, ConfigError> {
        Ok(ClientOptions {
            connect_timeout: s.connect_timeout(),
            pool_idle_timeout: Duration::from_millis(s.pool_idle_timeout_ms),
            pool_max_idle_per_host: s.pool_max_idle_per_host,
            tls: Arc::new(crate::tls::client_config(s.ca_file.as_deref())?),
            proxy: Some(Arc::new(proxy_matcher(s))),
        })
    }

    /// Platform roots, no proxy: for the simulator's own webhook deliveries.
    pub fn direct(connect_timeout: Duration) -> Self {
        ClientOptions {
            connect_timeout,
            pool_idle_timeout: Duration::from_secs(30),
            pool_max_idle_per_host: 8,
            tls: Arc::new(crate::tls::default_client_config()),
            proxy: None,
        }
    }
}

/// The proxy rules: explicit settings win over the environment.
pub fn proxy_matcher(s: &UpstreamSettings) -> Matcher {
    match &s.proxy {
        Some(proxy) => Matcher::builder()
            .all(proxy.clone())
            .no(s.no_proxy.clone().unwrap_or_default())
            .build(),
        None => Matcher::from_env(),
    }
}

/// A connector that tunnels through an HTTP CONNECT proxy where the rules say so, and connects
/// directly otherwise.
#[derive(Clone)]
pub struct ProxyConnector<C> {
    inner: C,
    proxy: Option<Arc<Matcher>>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<C> tower::Service<Uri> for ProxyConnector<C>
where
    C: tower::Service<Uri> + Clone + Send + 'static,
    C::Future: Send + 'static,
    C::Response: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    C::Error: Into<BoxError>,
{
    type Response = C::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<C::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let intercept = self.proxy.as_ref().and_then(|m| m.intercept(&dst));
        match intercept {
            Some(intercept) => {
                let mut tunnel = Tunnel::new(intercept.uri().clone(), self.inner.clone());
                if let Some(auth) = intercept.basic_auth() {
                    tunnel = tunnel.with_auth(auth.clone());
                }
                Box::pin(async move { tunnel.call(dst).await.map_err(Into::into) })
            }
            None => {
                let connecting = self.inner.call(dst);
                Box::pin(async move { connecting.await.map_err(Into::into) })
            }
        }
    }
}

/// A pooled client that speaks HTTP/1.1 and HTTP/2 (ALPN) over TLS with the configured trust
/// roots, and plain HTTP where a URL says `http://`; through the proxy where configured.
pub fn build_client<B>(
    options: &ClientOptions,
) -> Client<HttpsConnector<ProxyConnector<HttpConnector>>, B>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    build_client_with(options, HttpConnector::new())
}

/// As [`build_client`], over a given TCP connector (e.g. one with a guarded resolver).
pub fn build_client_with<R, B>(
    options: &ClientOptions,
    mut http: HttpConnector<R>,
) -> Client<HttpsConnector<ProxyConnector<HttpConnector<R>>>, B>
where
    B: hyper::body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    R: tower::Service<hyper_util::client::legacy::connect::dns::Name>
        + Clone
        + Send
        + Sync
        + 'static,
    R::Response: Iterator<Item = std::net::SocketAddr>,
    R::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    R::Future: Send,
{
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(options.connect_timeout));
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config((*options.tls).clone())
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(ProxyConnector {
            inner: http,
            proxy: options.proxy.clone(),
        });
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(options.pool_idle_timeout)
        .pool_max_idle_per_host(options.pool_max_idle_per_host)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector)
}

/// The upstream calls API, with the account key.
#[derive(Clone)]
pub struct Upstream {
    base: String,
    /// `Bearer <account key>`, built once and marked sensitive (never indexed by HTTP/2's
    /// header compression).
    authorization: HeaderValue,
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

/// The `Authorization` value that carries the account key, marked sensitive. A key that cannot
/// be sent in a header (a control character such as a line break inside it, or a byte outside
/// visible ASCII) is a configuration error, found when the gateway starts and by
/// `callgate check`, never per request. The error does not repeat the key.
pub fn bearer(key: &Secret) -> Result<HeaderValue, ConfigError> {
    let mut value = HeaderValue::from_str(&format!("Bearer {}", key.expose())).map_err(|_| {
        ConfigError::new(
            "upstream",
            None,
            "the upstream account key cannot be sent in an HTTP header: it holds a control \
             character or a byte outside visible ASCII (a line break inside the key, or a stray \
             byte in its file?)",
        )
    })?;
    value.set_sensitive(true);
    Ok(value)
}

impl Upstream {
    /// `base` is the API's base URL (`https://api.ringyo.ai`); `authorization` the account
    /// key's header value, from [`bearer`].
    pub fn new(
        base: &str,
        authorization: HeaderValue,
        client: HttpClient,
        timeout: Duration,
    ) -> Self {
        Upstream {
            base: base.trim_end_matches('/').to_string(),
            authorization,
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
            .uri([self.base.as_str(), path].concat())
            .header(header::AUTHORIZATION, self.authorization.clone())
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
        let body = SentBody::new(body.unwrap_or_default());
        let sent = body.asked();
        let went_out = {
            let sent = sent.clone();
            move || sent.load(std::sync::atomic::Ordering::Acquire)
        };
        let went_out_after = move || sent.load(std::sync::atomic::Ordering::Acquire);
        let mut request = builder
            .body(body)
            .map_err(|e| GatewayError::Internal(format!("building upstream request: {e}")))?;
        // The client span of the call's trace; the upstream gets it as the parent in
        // `traceparent`. The URL holds no secret (the key is in a header).
        let span = tracing::info_span!(
            "upstream",
            "otel.name" = %request.method(),
            "otel.kind" = "client",
            "otel.status_code" = tracing::field::Empty,
            "http.request.method" = %request.method(),
            "url.full" = %request.uri(),
            "server.address" = request.uri().host().unwrap_or(""),
            "http.response.status_code" = tracing::field::Empty,
        );
        crate::telemetry::inject(&span, request.headers_mut());
        let exchange = async {
            let response = self.client.request(request).await.map_err(|e| {
                tracing::warn!(error = %error_chain(&e), "upstream request failed");
                // Before the request went out (connect, TLS, a request handed back unsent) the
                // call was not placed; after, it may have been.
                if went_out() && !e.is_connect() {
                    GatewayError::UpstreamLost
                } else {
                    GatewayError::UpstreamUnavailable
                }
            })?;
            let (parts, body) = response.into_parts();
            let bytes = match Limited::new(body, MAX_UPSTREAM_BODY).collect().await {
                Ok(collected) => collected.to_bytes(),
                // A refusal is a refusal, whatever became of its body: its status is relayed.
                Err(e) if !parts.status.is_success() => {
                    tracing::warn!(error = %e, status = %parts.status, "upstream error body could not be read");
                    Bytes::new()
                }
                // An acceptance whose body (and so the call's id) is lost: the call was placed.
                Err(e) => {
                    tracing::warn!(error = %e, "upstream response could not be read");
                    return Err(GatewayError::UpstreamLost);
                }
            };
            Ok(Response::from_parts(parts, bytes))
        };
        let started = std::time::Instant::now();
        let outcome = tokio::time::timeout(self.timeout, exchange)
            .instrument(span.clone())
            .await;
        crate::metrics::upstream(started.elapsed());
        match &outcome {
            Ok(Ok(response)) => {
                span.record("http.response.status_code", response.status().as_u16());
                if response.status().is_server_error() {
                    span.record("otel.status_code", "ERROR");
                }
            }
            _ => {
                span.record("otel.status_code", "ERROR");
            }
        }
        match outcome {
            Ok(result) => result,
            Err(_) => {
                let sent = went_out_after();
                tracing::warn!(
                    timeout_ms = self.timeout.as_millis() as u64,
                    sent,
                    "upstream timed out"
                );
                // Still connecting (a DNS, TLS or proxy stall): nothing went out.
                Err(match sent {
                    true => GatewayError::UpstreamTimeout,
                    false => GatewayError::UpstreamUnavailable,
                })
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
