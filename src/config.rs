//! Settings: the gateway's own configuration file, layered with environment overrides.
//!
//! Load order: the TOML file given with `--config`, then `CALLGATE__SECTION__KEY` environment
//! variables (`CALLGATE__SERVER__LISTEN=0.0.0.0:8080`, `CALLGATE__UPSTREAM__API_KEY=...`). Relative
//! paths in the file are resolved against the file's own directory. Secrets are never required
//! inline: each has an environment override and a `*_file` variant.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// A secret string: never printed, never logged.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The secret itself; call only where it is used.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The tenant-facing listener.
    #[serde(default)]
    pub server: ServerSettings,
    /// Where calls are forwarded, and with which account key.
    pub upstream: UpstreamSettings,
    /// The built-in simulator, used when `upstream.url = "simulator"`.
    #[serde(default)]
    pub simulator: SimulatorSettings,
    /// Where tenant policies and schemas live.
    #[serde(default)]
    pub policies: PolicySettings,
    /// Redaction settings shared by all tenants.
    #[serde(default)]
    pub redaction: RedactionSettings,
    /// Logging.
    #[serde(default)]
    pub log: LogSettings,
    /// Trace export (OpenTelemetry, OTLP/HTTP).
    #[serde(default)]
    pub telemetry: TelemetrySettings,
    /// The audit trail (off unless `path` is set).
    #[serde(default)]
    pub audit: crate::audit::AuditSettings,
    /// Account-wide admission settings.
    #[serde(default)]
    pub admission: AdmissionSettings,
    /// The state store.
    #[serde(default)]
    pub state: StateSettings,
    /// The webhook relay.
    #[serde(default)]
    pub relay: RelaySettings,
    /// Asking the upstream about calls that went quiet.
    #[serde(default)]
    pub reconcile: ReconcileSettings,
    /// `Idempotency-Key` records.
    #[serde(default)]
    pub idempotency: IdempotencySettings,
    /// The admin API's own listener.
    #[serde(default)]
    pub admin: AdminSettings,
}

/// The admin API: off unless `listen` is set.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSettings {
    /// Address of the admin listener (keep it private: `127.0.0.1:9091`).
    pub listen: Option<SocketAddr>,
    /// The admin bearer token. Prefer `CALLGATE__ADMIN__TOKEN` or `token_file`.
    pub token: Option<Secret>,
    /// A file holding the admin token.
    pub token_file: Option<PathBuf>,
    /// HTTPS on the admin listener, with its own certificate (reloaded with the tenant one).
    pub tls: Option<TlsSettings>,
}

/// Account-wide admission.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdmissionSettings {
    /// Calls in flight at once across all tenants: the upstream account's concurrency limit.
    pub account_max_concurrent_calls: u32,
    /// Added to `max_duration` for a call's lease: how long after a call must have ended its slot
    /// and hold are kept waiting for the final event.
    pub lease_grace_secs: u64,
}

impl Default for AdmissionSettings {
    fn default() -> Self {
        AdmissionSettings {
            account_max_concurrent_calls: 100,
            lease_grace_secs: 120,
        }
    }
}

/// Which state backend, and where.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateSettings {
    /// `sqlite` (embedded, one file; one gateway process) or `redis` (shared by every replica).
    pub backend: StateBackend,
    /// The Redis URL when `backend = "redis"`: `redis://[user:password@]host:port[/db]` or
    /// `redis+unix:///path/to/socket`.
    pub redis_url: Option<String>,
    /// `redis_url` names the seed nodes of a Redis Cluster, separated by commas.
    pub redis_cluster: bool,
    /// Prefix of every Redis key (fleets of gateways may share one Redis under different
    /// prefixes).
    pub redis_prefix: String,
    /// Longest wait for Redis on any operation; past it the request is answered
    /// `503 state_unavailable` and nothing is admitted.
    pub redis_timeout_ms: u64,
    /// The SQLite file.
    pub path: PathBuf,
    /// `full` (fsync each commit; survives power loss) or `normal` (survives a crash).
    pub synchronous: crate::state::sqlite::Synchronous,
    /// How often lapsed leases and idempotency records are swept.
    pub sweep_interval_ms: u64,
    /// Operations that may wait for the store's writer. When that many wait, new calls are
    /// answered `503 gateway_overloaded` with `Retry-After` (nothing taken) rather than queued.
    pub queue_capacity: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StateBackend {
    Sqlite,
    Redis,
}

impl Default for StateSettings {
    fn default() -> Self {
        StateSettings {
            backend: StateBackend::Sqlite,
            redis_url: None,
            redis_cluster: false,
            redis_prefix: "callgate".into(),
            redis_timeout_ms: 2_000,
            path: PathBuf::from("state/callgate.db"),
            synchronous: Default::default(),
            sweep_interval_ms: 1_000,
            queue_capacity: 4_096,
        }
    }
}

/// The webhook relay: events from the upstream in, signed events to tenants out.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelaySettings {
    /// Base URL at which the upstream reaches this gateway (`https://callgate.example.com`);
    /// default: `http://` and the listener's address.
    pub public_url: Option<String>,
    /// JSON pointer of the call id in an upstream event.
    pub call_id_pointer: String,
    /// JSON pointer of the status.
    pub status_pointer: String,
    /// JSON pointer of the talk time in seconds.
    pub duration_pointer: String,
    /// Statuses that end a call.
    pub final_statuses: Vec<String>,
    /// Delivery attempts to a tenant's webhook before giving up.
    pub delivery_attempts: u32,
    /// First retry delay; doubles each attempt.
    pub delivery_backoff_ms: u64,
    /// Time allowed for one delivery attempt.
    pub delivery_timeout_ms: u64,
}

impl Default for RelaySettings {
    fn default() -> Self {
        RelaySettings {
            public_url: None,
            call_id_pointer: "/call_id".into(),
            status_pointer: "/status".into(),
            duration_pointer: "/duration".into(),
            final_statuses: vec!["completed".into(), "failed".into()],
            delivery_attempts: 5,
            delivery_backoff_ms: 500,
            delivery_timeout_ms: 5_000,
        }
    }
}

/// Reconciliation against `GET /v1/calls/{id}` on the upstream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReconcileSettings {
    /// Whether the upstream has `GET /v1/calls/{id}` (the reference does not promise it).
    pub enabled: bool,
    /// How often quiet calls are looked up.
    pub interval_ms: u64,
    /// A live call with no event for this long is looked up.
    pub quiet_after_secs: u64,
    /// Refresh a live call from the upstream when a tenant reads it.
    pub refresh_on_read: bool,
}

impl Default for ReconcileSettings {
    fn default() -> Self {
        ReconcileSettings {
            enabled: false,
            interval_ms: 30_000,
            quiet_after_secs: 120,
            refresh_on_read: true,
        }
    }
}

/// `Idempotency-Key` records.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdempotencySettings {
    /// How long a key's answer is kept.
    pub ttl_secs: u64,
}

impl Default for IdempotencySettings {
    fn default() -> Self {
        IdempotencySettings { ttl_secs: 86_400 }
    }
}

/// The tenant-facing HTTP listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Largest accepted request body, in bytes.
    pub max_body_bytes: usize,
    /// Deepest accepted JSON nesting (objects and arrays).
    pub max_json_depth: usize,
    /// Time a client has to send a request's headers, from their first byte.
    pub header_read_timeout_ms: u64,
    /// Time an idle keep-alive connection is kept open between requests; longer than
    /// `header_read_timeout_ms`, so that a peer reusing a pooled connection (the upstream
    /// sending call events) does not race the gateway closing it.
    pub keepalive_idle_timeout_ms: u64,
    /// Open connections at most; past it a new connection waits for a place (up to
    /// `listen::ADMIT_WAIT`), then is answered `503` and closed.
    pub max_connections: usize,
    /// Requests handled at once; past it a request is answered `503 gateway_overloaded` with
    /// `Retry-After` at once, nothing taken.
    pub max_requests_in_flight: usize,
    /// Time a client has to send its whole body.
    pub body_read_timeout_ms: u64,
    /// Time allowed for in-flight requests to finish on shutdown.
    pub shutdown_grace_ms: u64,
    /// Serve HTTPS with this certificate (reloaded on SIGHUP); none: plain HTTP, for use behind
    /// a load balancer that terminates TLS.
    pub tls: Option<TlsSettings>,
    /// Threads that serve requests; none: see [`Settings::worker_threads`].
    pub worker_threads: Option<usize>,
}

/// A listener's certificate chain and private key, PEM.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: 64 * 1024,
            max_json_depth: 16,
            header_read_timeout_ms: 10_000,
            keepalive_idle_timeout_ms: 75_000,
            max_connections: 10_000,
            max_requests_in_flight: 2_048,
            body_read_timeout_ms: 10_000,
            shutdown_grace_ms: 10_000,
            tls: None,
            worker_threads: None,
        }
    }
}

/// The upstream calls API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSettings {
    /// Base URL (`https://api.ringyo.ai`), or `simulator` to run the built-in simulator in-process.
    pub url: String,
    /// The account key. Prefer `CALLGATE__UPSTREAM__API_KEY` or `api_key_file`.
    #[serde(default)]
    pub api_key: Option<Secret>,
    /// A file holding the account key (trailing newline ignored).
    #[serde(default)]
    pub api_key_file: Option<PathBuf>,
    /// Time to establish a connection.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    /// Time for the upstream to answer a request, connection included.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_ms: u64,
    /// Extra trusted CA certificates (PEM), for private upstreams; the platform's roots stay.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// HTTP CONNECT proxy for the upstream and webhook deliveries (`http://proxy:3128`);
    /// default: `HTTPS_PROXY` / `HTTP_PROXY` / `ALL_PROXY` from the environment.
    #[serde(default)]
    pub proxy: Option<String>,
    /// Hosts that bypass the proxy (comma-separated, as `NO_PROXY`).
    #[serde(default)]
    pub no_proxy: Option<String>,
    /// Idle connections kept per host.
    #[serde(default = "default_pool_max_idle")]
    pub pool_max_idle_per_host: usize,
    /// How long an idle pooled connection is kept.
    #[serde(default = "default_pool_idle_timeout")]
    pub pool_idle_timeout_ms: u64,
}

fn default_connect_timeout() -> u64 {
    3_000
}
fn default_request_timeout() -> u64 {
    15_000
}
fn default_pool_max_idle() -> usize {
    32
}
fn default_pool_idle_timeout() -> u64 {
    90_000
}

impl UpstreamSettings {
    /// Whether the built-in simulator stands in for the upstream.
    pub fn is_simulator(&self) -> bool {
        self.url == "simulator"
    }
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

/// The built-in Ringyo simulator.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimulatorSettings {
    /// Agent ids the simulated account has.
    pub agents: Vec<String>,
    /// Numbers the simulated account owns; the first is its primary number.
    pub owned_numbers: Vec<String>,
    /// Time from `queued` to `ringing`.
    pub queue_ms: u64,
    /// Time spent ringing before the call is answered.
    pub ring_ms: u64,
    /// Time the call talks before it completes (capped by `max_duration`).
    pub talk_ms: u64,
    /// Each call talks `talk_ms` plus a random 0..=`talk_jitter_ms` more.
    pub talk_jitter_ms: u64,
    /// Concurrent calls the simulated account allows (`rate_limit_exceeded` beyond).
    pub max_concurrent_calls: usize,
    /// Credits of the simulated account, one per started minute of `max_duration`
    /// (`insufficient_credits` when exhausted); none means unlimited.
    pub credits: Option<u64>,
    /// Calls remembered (live ones always are); past this, the oldest finished are forgotten.
    pub keep_calls: usize,
    /// Upstream faults to inject (all off by default).
    pub faults: SimFaults,
}

/// Faults the simulator injects, each a share of requests or events (0.0 to 1.0), decided at
/// random per request. What it did is kept in its ledger (`GET /_sim/ledger`), so that a soak
/// run can check the gateway's accounting against what really happened.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimFaults {
    /// `POST /v1/calls` answered `500` without placing the call.
    pub error_rate: f64,
    /// `POST /v1/calls` whose connection is closed with no answer, the call not placed.
    pub reset_rate: f64,
    /// `POST /v1/calls` placed, its answer held back `hang_ms` (past the gateway's timeout).
    pub hang_rate: f64,
    pub hang_ms: u64,
    /// Webhook events never sent (no attempt, no retry).
    pub lost_event_rate: f64,
    /// `GET /v1/calls/{id}` answered `500`.
    pub lookup_error_rate: f64,
}

impl Default for SimulatorSettings {
    fn default() -> Self {
        SimulatorSettings {
            agents: vec!["agent_abc123".into(), "agent_support".into()],
            owned_numbers: vec![
                "+18005551234".into(),
                "+18005550000".into(),
                "+18005556789".into(),
            ],
            queue_ms: 200,
            ring_ms: 2_000,
            talk_ms: 10_000,
            talk_jitter_ms: 0,
            max_concurrent_calls: 1_000,
            credits: None,
            keep_calls: 10_000,
            faults: SimFaults::default(),
        }
    }
}

/// Where the policy tree lives.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicySettings {
    /// The `policies/` directory: `schemas/`, `tenants/`, `lists/`.
    pub dir: PathBuf,
}

impl Default for PolicySettings {
    fn default() -> Self {
        PolicySettings {
            dir: PathBuf::from("policies"),
        }
    }
}

/// Redaction settings shared by all tenants.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedactionSettings {
    /// Key for the keyed hash (`hash` action), so hashed values can be joined but not reversed.
    /// Prefer `CALLGATE__REDACTION__HASH_KEY` or `hash_key_file`. Without one, a random key is
    /// made at start-up and hashes are stable only for the life of the process.
    pub hash_key: Option<Secret>,
    /// A file holding the hash key.
    pub hash_key_file: Option<PathBuf>,
}

/// Trace export: off unless an endpoint is set here or in the standard `OTEL_EXPORTER_OTLP_*`
/// variables (which win).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetrySettings {
    /// OTLP/HTTP base URL; spans go to its `/v1/traces` (like `OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub otlp_endpoint: Option<String>,
    /// The full URL for spans (like `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`).
    pub otlp_traces_endpoint: Option<String>,
    /// `service.name` of the spans (`OTEL_SERVICE_NAME` wins).
    pub service_name: String,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        TelemetrySettings {
            otlp_endpoint: None,
            otlp_traces_endpoint: None,
            service_name: "callgate".into(),
        }
    }
}

/// Log output.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// `auto` (text on a terminal, JSON otherwise), `json` (one object per line) or `text`.
    pub format: LogFormat,
    /// A `tracing` filter, e.g. `info` or `callgate=debug,info`; `RUST_LOG` wins when set.
    pub level: String,
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            format: LogFormat::Auto,
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Auto,
    Json,
    Text,
}

/// A configuration problem, with where it is.
#[derive(Debug, thiserror::Error)]
#[error("{file}{}: {reason}", line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct ConfigError {
    pub file: String,
    pub line: Option<usize>,
    pub reason: String,
}

impl ConfigError {
    pub fn new(file: impl AsRef<Path>, line: Option<usize>, reason: impl Into<String>) -> Self {
        ConfigError {
            file: file.as_ref().display().to_string(),
            line,
            reason: reason.into(),
        }
    }
}

/// The 1-based line of a byte offset in `text`.
pub fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The first line of `text` that mentions `needle`, to point a semantic error at its source.
pub fn find_line(text: &str, needle: &str) -> Option<usize> {
    text.lines().position(|l| l.contains(needle)).map(|i| i + 1)
}

/// Read a secret from a file, trimming the trailing newline.
pub fn read_secret_file(path: &Path) -> Result<Secret, ConfigError> {
    let raw = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(path, None, format!("cannot read secret file: {e}")))?;
    let value = raw.trim_end_matches(['\n', '\r']).to_string();
    if value.is_empty() {
        return Err(ConfigError::new(path, None, "secret file is empty"));
    }
    Ok(Secret(value))
}

impl Settings {
    /// The threads that serve requests: `server.worker_threads`, or by default one per core
    /// but one, which is left to the SQLite backend's writer thread (every admission passes
    /// through it), and at least one. With Redis, one per core.
    ///
    /// Measured on two cores (docs/benchmarks.md): one thread serving instead of two answers one
    /// connection in 0.33 ms instead of 0.45 (a call no longer hops between two threads that
    /// each sleep and wake), at the same requests per second under load.
    pub fn worker_threads(&self, cores: usize) -> usize {
        self.server
            .worker_threads
            .unwrap_or(match self.state.backend {
                StateBackend::Sqlite => cores.saturating_sub(1).max(1),
                StateBackend::Redis => cores.max(1),
            })
    }

    /// Load the file, apply `CALLGATE__*` overrides, resolve relative paths, validate.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        Self::load_with_env(path, std::env::vars())
    }

    /// As [`Settings::load`], with the environment given explicitly (for tests).
    pub fn load_with_env(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(path, None, format!("cannot read: {e}")))?;
        // Parse once with `toml` for syntax errors with a line number.
        if let Err(e) = text.parse::<toml::Table>() {
            let line = e.span().map(|s| line_of(&text, s.start));
            return Err(ConfigError::new(path, line, e.message().to_string()));
        }
        let env: std::collections::HashMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("CALLGATE__"))
            .collect();
        let built = config::Config::builder()
            .add_source(config::File::from_str(&text, config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("CALLGATE")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true)
                    .source(Some(env)),
            )
            .build()
            .map_err(|e| ConfigError::new(path, None, e.to_string()))?;
        let mut settings: Settings = built.try_deserialize().map_err(|e| {
            let reason = e.to_string();
            let line = reason
                .split('`')
                .nth(1)
                .and_then(|key| find_line(&text, key.rsplit('.').next().unwrap_or(key)));
            ConfigError::new(path, line, reason)
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        settings.resolve_paths(base);
        settings.validate(path, &text)?;
        Ok(settings)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut self.policies.dir);
        resolve(&mut self.state.path);
        if let Some(p) = self.audit.path.as_mut()
            && p != "stdout"
        {
            let mut path = PathBuf::from(p.as_str());
            resolve(&mut path);
            *p = path.display().to_string();
        }
        if let Some(p) = self.admin.token_file.as_mut() {
            resolve(p);
        }
        if let Some(tls) = self.admin.tls.as_mut() {
            resolve(&mut tls.cert_file);
            resolve(&mut tls.key_file);
        }
        if let Some(p) = self.upstream.ca_file.as_mut() {
            resolve(p);
        }
        if let Some(tls) = self.server.tls.as_mut() {
            resolve(&mut tls.cert_file);
            resolve(&mut tls.key_file);
        }
        if let Some(p) = self.upstream.api_key_file.as_mut() {
            resolve(p);
        }
        if let Some(p) = self.redaction.hash_key_file.as_mut() {
            resolve(p);
        }
    }

    fn validate(&self, path: &Path, text: &str) -> Result<(), ConfigError> {
        let at =
            |needle: &str, reason: String| ConfigError::new(path, find_line(text, needle), reason);
        if !self.upstream.is_simulator() {
            let url = url::Url::parse(&self.upstream.url).map_err(|e| {
                at(
                    "url",
                    format!("upstream.url {:?} is not a URL: {e}", self.upstream.url),
                )
            })?;
            if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
                return Err(at(
                    "url",
                    "upstream.url must be an http(s) URL or \"simulator\"".into(),
                ));
            }
            if self.upstream.api_key.is_none() && self.upstream.api_key_file.is_none() {
                return Err(at(
                    "[upstream]",
                    "no upstream account key: set CALLGATE__UPSTREAM__API_KEY or upstream.api_key_file".into(),
                ));
            }
        }
        if self.upstream.api_key.is_some() && self.upstream.api_key_file.is_some() {
            return Err(at(
                "api_key",
                "set one of upstream.api_key and upstream.api_key_file, not both".into(),
            ));
        }
        if self.state.backend == StateBackend::Redis {
            let Some(url) = &self.state.redis_url else {
                return Err(at(
                    "backend",
                    "state.backend = \"redis\" needs state.redis_url (or CALLGATE__STATE__REDIS_URL)".into(),
                ));
            };
            let urls: Vec<&str> = match self.state.redis_cluster {
                true => url.split(',').map(str::trim).collect(),
                false => vec![url.as_str()],
            };
            for url in urls {
                if !url.starts_with("redis://") && !url.starts_with("redis+unix://") {
                    return Err(at(
                        "redis_url",
                        format!(
                            "state.redis_url: {url:?} is not a redis:// or redis+unix:// URL (with state.redis_cluster, seed nodes separated by commas)"
                        ),
                    ));
                }
            }
            let tagless = |s: &str| {
                !s.is_empty() && !s.contains(['{', '}']) && s.chars().all(|c| !c.is_whitespace())
            };
            if !tagless(&self.state.redis_prefix) || self.state.redis_timeout_ms == 0 {
                return Err(at(
                    "redis_",
                    "state.redis_prefix must be a non-empty word without braces, and state.redis_timeout_ms positive".into(),
                ));
            }
        }
        if self.server.keepalive_idle_timeout_ms <= self.server.header_read_timeout_ms {
            return Err(at(
                "keepalive_idle_timeout_ms",
                "server.keepalive_idle_timeout_ms must be longer than server.header_read_timeout_ms".into(),
            ));
        }
        if self.server.worker_threads == Some(0) {
            return Err(at(
                "worker_threads",
                "server.worker_threads must be at least 1".into(),
            ));
        }
        if self.server.max_body_bytes == 0 || self.server.max_json_depth == 0 {
            return Err(at(
                "max_",
                "server.max_body_bytes and server.max_json_depth must be positive".into(),
            ));
        }
        if self.admin.listen.is_some()
            && self.admin.token.is_none()
            && self.admin.token_file.is_none()
        {
            return Err(at(
                "[admin]",
                "admin.listen is set but there is no admin token: set CALLGATE__ADMIN__TOKEN or admin.token_file".into(),
            ));
        }
        if self.admin.token.is_some() && self.admin.token_file.is_some() {
            return Err(at(
                "token",
                "set one of admin.token and admin.token_file, not both".into(),
            ));
        }
        if self.admission.account_max_concurrent_calls == 0 {
            return Err(at(
                "account_max_concurrent_calls",
                "admission.account_max_concurrent_calls must be at least 1".into(),
            ));
        }
        if let Some(proxy) = &self.upstream.proxy {
            let ok = url::Url::parse(proxy)
                .is_ok_and(|u| u.scheme() == "http" && u.host_str().is_some());
            if !ok {
                return Err(at(
                    "proxy",
                    format!("upstream.proxy {proxy:?} must be an http:// URL of a CONNECT proxy"),
                ));
            }
        }
        if let Some(public) = &self.relay.public_url
            && url::Url::parse(public).is_err()
        {
            return Err(at(
                "public_url",
                format!("relay.public_url {public:?} is not a URL"),
            ));
        }
        for pointer in [
            &self.relay.call_id_pointer,
            &self.relay.status_pointer,
            &self.relay.duration_pointer,
        ] {
            if !pointer.is_empty() && !pointer.starts_with('/') {
                return Err(at(
                    pointer,
                    format!("{pointer:?} is not a JSON pointer (starts with '/')"),
                ));
            }
        }
        if self.upstream.request_timeout_ms == 0 || self.upstream.connect_timeout_ms == 0 {
            return Err(at("timeout", "upstream timeouts must be positive".into()));
        }
        Ok(())
    }

    /// The admin token, from wherever it is configured.
    pub fn admin_token(&self) -> Result<Option<Secret>, ConfigError> {
        match (&self.admin.token, &self.admin.token_file) {
            (Some(t), _) => Ok(Some(t.clone())),
            (None, Some(file)) => read_secret_file(file).map(Some),
            (None, None) => Ok(None),
        }
    }

    /// The upstream account key, from wherever it is configured.
    pub fn upstream_key(&self) -> Result<Option<Secret>, ConfigError> {
        match (&self.upstream.api_key, &self.upstream.api_key_file) {
            (Some(key), _) => Ok(Some(key.clone())),
            (None, Some(file)) => read_secret_file(file).map(Some),
            (None, None) => Ok(None),
        }
    }

    /// Secrets written inline in the file itself rather than in the environment or a file:
    /// `callgate check` warns about each.
    pub fn inline_secrets(text: &str) -> Vec<String> {
        let Ok(table) = text.parse::<toml::Table>() else {
            return Vec::new();
        };
        let mut found = Vec::new();
        for (section, key) in [
            ("upstream", "api_key"),
            ("redaction", "hash_key"),
            ("admin", "token"),
        ] {
            if table.get(section).and_then(|s| s.get(key)).is_some() {
                found.push(format!("{section}.{key}"));
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("callgate.toml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn env_overrides_the_file() {
        let (_d, path) =
            write("[server]\nlisten = \"127.0.0.1:9000\"\n[upstream]\nurl = \"simulator\"\n");
        let env = vec![
            (
                "CALLGATE__SERVER__LISTEN".to_string(),
                "127.0.0.1:9001".to_string(),
            ),
            (
                "CALLGATE__UPSTREAM__API_KEY".to_string(),
                "sk_live".to_string(),
            ),
        ];
        let s = Settings::load_with_env(&path, env).unwrap();
        assert_eq!(s.server.listen.port(), 9001);
        assert_eq!(s.upstream_key().unwrap().unwrap().expose(), "sk_live");
        assert_eq!(format!("{:?}", s.upstream.api_key), "Some(Secret(***))");
    }

    #[test]
    fn worker_threads_leave_a_core_to_the_sqlite_writer_unless_set() {
        let (_d, path) = write("[upstream]\nurl = \"simulator\"\n");
        let s = Settings::load_with_env(&path, Vec::new()).unwrap();
        assert_eq!(
            [1, 2, 8].map(|cores| s.worker_threads(cores)),
            [1, 1, 7],
            "SQLite: one per core but one, at least one"
        );
        let redis = vec![
            ("CALLGATE__STATE__BACKEND".to_string(), "redis".to_string()),
            (
                "CALLGATE__STATE__REDIS_URL".to_string(),
                "redis://127.0.0.1:6390".to_string(),
            ),
        ];
        let s = Settings::load_with_env(&path, redis).unwrap();
        assert_eq!([1, 2, 8].map(|cores| s.worker_threads(cores)), [1, 2, 8]);
        let (_d, path) = write("[server]\nworker_threads = 3\n[upstream]\nurl = \"simulator\"\n");
        let s = Settings::load_with_env(&path, Vec::new()).unwrap();
        assert_eq!(s.worker_threads(2), 3);
        let (_d, path) = write("[server]\nworker_threads = 0\n[upstream]\nurl = \"simulator\"\n");
        let err = Settings::load_with_env(&path, Vec::new()).unwrap_err();
        assert!(err.reason.contains("worker_threads"), "{err}");
    }

    #[test]
    fn the_redis_backend_is_chosen_from_the_environment_and_needs_its_url() {
        let text = "[upstream]\nurl = \"simulator\"\n[state]\npath = \"state/x.db\"\nsynchronous = \"full\"\n";
        let (_d, path) = write(text);
        let backend = ("CALLGATE__STATE__BACKEND".to_string(), "redis".to_string());
        let err = Settings::load_with_env(&path, vec![backend.clone()]).unwrap_err();
        assert!(err.reason.contains("state.redis_url"), "{err}");
        let url = (
            "CALLGATE__STATE__REDIS_URL".to_string(),
            "redis://127.0.0.1:6390/2".to_string(),
        );
        // `path` and `synchronous` may stay in the file.
        let s = Settings::load_with_env(&path, vec![backend.clone(), url]).unwrap();
        assert_eq!(s.state.backend, StateBackend::Redis);
        assert_eq!(
            s.state.redis_url.as_deref(),
            Some("redis://127.0.0.1:6390/2")
        );
        let http = (
            "CALLGATE__STATE__REDIS_URL".to_string(),
            "http://127.0.0.1:6379".to_string(),
        );
        let err = Settings::load_with_env(&path, vec![backend, http]).unwrap_err();
        assert!(err.reason.contains("redis://"), "{err}");
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let (_d, path) = write("[server]\nlisten = \"127.0.0.1:9000\"\nmax_body_bytes = = 3\n");
        let err = Settings::load_with_env(&path, vec![]).unwrap_err();
        assert_eq!(err.line, Some(3), "{err}");
    }

    #[test]
    fn unknown_keys_are_errors() {
        let (_d, path) = write("[upstream]\nurl = \"simulator\"\nfrobnicate = true\n");
        let err = Settings::load_with_env(&path, vec![]).unwrap_err();
        assert!(err.reason.contains("frobnicate"), "{err}");
        assert_eq!(err.line, Some(3), "{err}");
    }

    #[test]
    fn a_real_upstream_needs_a_key() {
        let (_d, path) = write("[upstream]\nurl = \"https://api.ringyo.ai\"\n");
        let err = Settings::load_with_env(&path, vec![]).unwrap_err();
        assert!(err.reason.contains("account key"), "{err}");
    }

    #[test]
    fn relative_paths_resolve_against_the_file() {
        let (dir, path) = write("[upstream]\nurl = \"simulator\"\n[policies]\ndir = \"pol\"\n");
        let s = Settings::load_with_env(&path, vec![]).unwrap();
        assert_eq!(s.policies.dir, dir.path().join("pol"));
    }

    #[test]
    fn inline_secrets_are_found() {
        let text = "[upstream]\nurl = \"x\"\napi_key = \"k\"\n";
        assert_eq!(Settings::inline_secrets(text), vec!["upstream.api_key"]);
    }
}
