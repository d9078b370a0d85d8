//! Logging and tracing set-up.
//!
//! - Logs: `tracing` lines, JSON or text (`log.format`: `auto` is text on a terminal, JSON
//!   otherwise), filtered by `log.level` or `RUST_LOG`. Span fields (request id, tenant,
//!   decision, stage, reason) are on every line of a request.
//! - Traces: the same spans exported as OpenTelemetry spans over OTLP/HTTP (protobuf), when an
//!   endpoint is configured: `OTEL_EXPORTER_OTLP_ENDPOINT` (spans to its `/v1/traces`),
//!   `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (the full URL), or `telemetry.otlp_endpoint` in the
//!   config (the environment wins). `OTEL_SERVICE_NAME`, `OTEL_EXPORTER_OTLP_HEADERS`,
//!   `OTEL_EXPORTER_OTLP_TIMEOUT` and `OTEL_BSP_*` work as everywhere. W3C `traceparent` is the
//!   propagation format, both ways.

use std::io::IsTerminal;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, LogSettings, TelemetrySettings};

/// The tracer provider, kept to flush spans at shutdown.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Whether spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Export what is buffered and stop (graceful shutdown).
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            // The batch processor's thread hands batches to this runtime: wait off its workers.
            let done = tokio::task::spawn_blocking(move || provider.shutdown()).await;
            if let Ok(Err(e)) = done {
                eprintln!("callgate: flushing traces failed: {e}");
            }
        }
    }
}

/// The OTLP exporter, its batches sent from the gateway's Tokio runtime (the batch processor
/// runs on a thread of its own; the HTTP client needs the runtime).
#[derive(Debug)]
struct OnRuntime {
    exporter: std::sync::Arc<opentelemetry_otlp::SpanExporter>,
    runtime: tokio::runtime::Handle,
}

impl opentelemetry_sdk::trace::SpanExporter for OnRuntime {
    fn export(
        &self,
        batch: Vec<SpanData>,
    ) -> impl std::future::Future<Output = opentelemetry_sdk::error::OTelSdkResult> + Send {
        let exporter = self.exporter.clone();
        let task = self
            .runtime
            .spawn(async move { exporter.export(batch).await });
        async move {
            task.await.unwrap_or_else(|e| {
                Err(opentelemetry_sdk::error::OTelSdkError::InternalFailure(
                    e.to_string(),
                ))
            })
        }
    }

    fn shutdown_with_timeout(
        &self,
        timeout: std::time::Duration,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        self.exporter.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        if let Some(exporter) = std::sync::Arc::get_mut(&mut self.exporter) {
            opentelemetry_sdk::trace::SpanExporter::set_resource(exporter, resource);
        }
    }
}

/// Whether trace export is configured, and where (`None`: the environment says).
fn otlp_endpoint(settings: &TelemetrySettings) -> Option<Option<String>> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    if env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
        || env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
    {
        return Some(None);
    }
    if let Some(url) = &settings.otlp_traces_endpoint {
        return Some(Some(url.clone()));
    }
    settings
        .otlp_endpoint
        .as_ref()
        .map(|base| Some(format!("{}/v1/traces", base.trim_end_matches('/'))))
}

fn tracer_provider(settings: &TelemetrySettings) -> Result<Option<SdkTracerProvider>, String> {
    let Some(endpoint) = otlp_endpoint(settings) else {
        return Ok(None);
    };
    use opentelemetry_otlp::WithExportConfig;
    let mut builder = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary);
    if let Some(url) = endpoint {
        builder = builder.with_endpoint(url);
    }
    let exporter = builder.build().map_err(|e| e.to_string())?;
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|_| "tracing needs the gateway's runtime".to_string())?;
    let service = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| settings.service_name.clone());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service)
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_resource(resource)
        .with_batch_exporter(OnRuntime {
            exporter: std::sync::Arc::new(exporter),
            runtime,
        })
        .build();
    Ok(Some(provider))
}

/// Install the global subscriber (logs, and traces when configured). Safe to call twice (the
/// second call installs nothing and exports nothing).
pub fn init(log: &LogSettings, telemetry: &TelemetrySettings) -> Telemetry {
    let filter = || {
        EnvFilter::try_from_default_env()
            .or_else(|_| EnvFilter::try_new(&log.level))
            .unwrap_or_else(|_| EnvFilter::new("info"))
    };
    let json = match log.format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_span_events(FmtSpan::NONE)
        .with_writer(std::io::stderr);
    let fmt = if json {
        fmt.json()
            .with_current_span(true)
            .with_span_list(false)
            .boxed()
    } else {
        fmt.boxed()
    };
    let provider = match tracer_provider(telemetry) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("callgate: traces not exported: {e}");
            None
        }
    };
    let otel = provider.as_ref().map(|p| {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("callgate"))
            .with_filter(tracing_subscriber::filter::filter_fn(|m| {
                m.target().starts_with("callgate")
            }))
    });
    let installed = tracing_subscriber::registry()
        .with(fmt.with_filter(filter()))
        .with(otel)
        .try_init()
        .is_ok();
    Telemetry {
        provider: provider.filter(|_| installed),
    }
}

use tracing_subscriber::Layer as _;

/// The W3C trace context of `headers` (`traceparent`, `tracestate`), if any, as the parent of
/// `span`.
pub fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) {
    if !headers.contains_key("traceparent") {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    let _ = span.set_parent(parent);
}

/// Write `span`'s trace context into `headers` (`traceparent`), naming it as the parent.
pub fn inject(span: &tracing::Span, headers: &mut http::HeaderMap) {
    TraceContextPropagator::new().inject_context(&span.context(), &mut HeaderInjector(headers));
}

/// The W3C `traceparent` of `span`, if it is being traced.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let mut headers = http::HeaderMap::new();
    inject(span, &mut headers);
    headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Link `span` to the trace named by a W3C `traceparent` value.
pub fn link(span: &tracing::Span, traceparent: &str) {
    let mut headers = http::HeaderMap::new();
    let Ok(value) = http::HeaderValue::from_str(traceparent) else {
        return;
    };
    headers.insert("traceparent", value);
    let cx = TraceContextPropagator::new().extract(&HeaderExtractor(&headers));
    use opentelemetry::trace::TraceContextExt;
    let linked = cx.span().span_context().clone();
    if linked.is_valid() {
        span.add_link(linked);
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}
