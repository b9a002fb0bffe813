//! Logging and OpenTelemetry traces: the subscriber, the OTLP exporter, and
//! W3C `traceparent` propagation.
//!
//! Export is on when `telemetry.traces.otlp_endpoint` (or the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT`) is set, over HTTP/protobuf or gRPC. A
//! client's `traceparent` is continued by the request span, and the upstream
//! call carries the gateway's own span as parent. When export is off, spans
//! stay local (logs) and the client's `traceparent` passes through unchanged.

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use super::logging::{self, LogSink, LogSinkGuard};
use crate::config::{LogSettings, OtlpProtocol, TraceSettings};

/// Keeps the trace pipeline alive; [`TelemetryGuard::shutdown`] flushes it.
#[derive(Debug, Default)]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
    /// Writes the buffered log lines when dropped.
    _log_sink: Option<LogSinkGuard>,
}

impl TelemetryGuard {
    /// Exports the spans that have ended so far, without stopping the
    /// pipeline. Blocks, like [`TelemetryGuard::shutdown`].
    ///
    /// A span ends when its last child does: a request span whose cache fill
    /// runs on in the background is exported only once that fill is done,
    /// possibly after the client has its answer.
    pub fn flush(&self) {
        if let Some(provider) = &self.provider {
            if let Err(error) = provider.force_flush() {
                eprintln!("teamgate: flushing traces failed: {error}");
            }
        }
    }

    /// Exports the spans still buffered. Blocks: call it from a blocking
    /// context (e.g. `spawn_blocking`) while the tokio runtime still runs.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(error) = provider.shutdown() {
                eprintln!("teamgate: flushing traces failed: {error}");
            }
        }
    }
}

/// Installs the global subscriber: logs (text or JSON, `RUST_LOG` wins over
/// the configured level) and, when configured, the OTLP trace exporter.
/// Must be called inside a tokio runtime when traces are on.
pub fn init(log: &LogSettings, traces: &TraceSettings) -> anyhow::Result<TelemetryGuard> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // Every line goes to stderr from a background thread (see `logging`):
    // a request never waits on a write. The per-request access line has a
    // formatter of its own; every other line is the stock text or JSON.
    let (sink, sink_guard) = LogSink::spawn(std::io::stderr());
    let provider = traces
        .endpoint
        .as_deref()
        .map(|endpoint| provider(endpoint, traces))
        .transpose()?;
    // With traces on, the OTLP layer takes access lines too (as events of
    // the request span); without, the log layer may write them itself.
    let log_layer = logging::layer(log.format, ansi, sink, provider.is_none());
    // Spans are DEBUG: the OTLP layer takes them (and everything the log
    // takes), the log layer only what its own level allows.
    let otel = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("teamgate"))
            .with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target("teamgate", tracing::Level::DEBUG),
            )
    });
    if provider.is_some() {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    }
    // `try_init`: in tests and `demo` a subscriber may already be installed;
    // keep it. Without traces, no `.with(None)`: an absent layer beside the
    // filtered log layer makes `tracing::enabled!` say yes to what the
    // filter refuses, and access lines are written on its answer.
    let logs = tracing_subscriber::registry().with(log_layer.with_filter(filter));
    let _ = match otel {
        Some(otel) => logs.with(otel).try_init(),
        None => logs.try_init(),
    };
    Ok(TelemetryGuard {
        provider,
        _log_sink: Some(sink_guard),
    })
}

fn provider(endpoint: &str, settings: &TraceSettings) -> anyhow::Result<SdkTracerProvider> {
    let exporter = match settings.protocol {
        OtlpProtocol::HttpProtobuf => {
            let endpoint = endpoint.trim_end_matches('/');
            let url = if endpoint.ends_with("/v1/traces") {
                endpoint.to_owned()
            } else {
                format!("{endpoint}/v1/traces")
            };
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(url)
                .build()?
        }
        OtlpProtocol::Grpc => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()?,
    };
    // Exports from tokio tasks: the exporters' clients need the runtime.
    let processor =
        opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .build();
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            settings.sample_ratio,
        ))))
        .with_resource(
            Resource::builder()
                .with_service_name(settings.service_name.clone())
                .build(),
        )
        .build())
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Makes `span` a child of the client's `traceparent`, if it sent one.
pub fn continue_trace(span: &Span, headers: &HeaderMap) {
    // A disabled span (DEBUG, with no exporter asking for it) has no parent
    // to set: the header is not even looked up.
    if !span.is_disabled() && headers.contains_key(&TRACEPARENT) {
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
        let _ = span.set_parent(parent);
    }
}

/// Puts `span` as the parent in the upstream request's `traceparent`, when
/// spans are exported (otherwise the client's own header stays as it is).
pub fn propagate(span: &Span, headers: &mut HeaderMap) {
    let context = span.context();
    TraceContextPropagator::new().inject_context(&context, &mut HeaderInjector(headers));
}
