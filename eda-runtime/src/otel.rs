//! The W3C trace of an event, joined in OpenTelemetry (feature `otel`).
//!
//! Each handling's span is made a child of the span its event's `traceparent` names, and the
//! events the handling emits carry the handling's own span as their `traceparent`: with a
//! `tracing-opentelemetry` layer installed, one checkout is one trace across every service
//! that took part. Without such a layer nothing changes.
//!
//! With feature `otlp`, [`install_otlp`] sets such a layer up, exporting to a collector over
//! OTLP/HTTP, beside a log printer whose lines carry each handling's ids.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::Context;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Makes `span` a child of the remote span `traceparent` names.
pub(crate) fn continue_trace(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(parent) = traceparent.and_then(parse) {
        if let Err(e) = span.set_parent(Context::new().with_remote_span_context(parent)) {
            tracing::debug!(error = %e, "cannot join the event's trace");
        }
    }
}

/// The `traceparent` of `span`, when it is an OpenTelemetry span.
pub(crate) fn traceparent(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let otel = cx.span();
    let sc = otel.span_context();
    sc.is_valid().then(|| format!("00-{}-{}-{:02x}", sc.trace_id(), sc.span_id(), sc.trace_flags().to_u8()))
}

/// Keeps the OTLP exporter running; dropping it flushes what is left.
#[cfg(feature = "otlp")]
pub struct OtlpGuard(opentelemetry_sdk::trace::SdkTracerProvider);

#[cfg(feature = "otlp")]
impl OtlpGuard {
    /// Sends the spans not yet sent.
    pub fn flush(&self) {
        if let Err(e) = self.0.force_flush() {
            tracing::warn!(error = %e, "could not flush spans to the collector");
        }
    }
}

#[cfg(feature = "otlp")]
impl Drop for OtlpGuard {
    fn drop(&mut self) {
        if let Err(e) = self.0.shutdown() {
            eprintln!("eda: could not flush spans to the collector: {e}");
        }
    }
}

/// Installs the process's tracing: log lines to stderr (filtered by `RUST_LOG`, `info` by
/// default; lines written inside a handling carry its event id, type, correlation and causation
/// ids) and spans exported to an OpenTelemetry collector over OTLP/HTTP at `endpoint` (for
/// example `http://127.0.0.1:4318/v1/traces`) under the service name `service`. Keep the guard
/// for as long as the process runs.
///
/// ```no_run
/// # fn main() -> eda::Result<()> {
/// let _otlp = eda::otel::install_otlp("http://127.0.0.1:4318/v1/traces", "checkout")?;
/// # Ok(()) }
/// ```
#[cfg(feature = "otlp")]
pub fn install_otlp(endpoint: &str, service: &str) -> crate::Result<OtlpGuard> {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_otlp::WithExportConfig as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;

    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| crate::Error::Config(format!("cannot export spans to `{endpoint}`: {e}")))?;
    let resource = opentelemetry_sdk::Resource::builder().with_service_name(service.to_owned()).build();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("eda")))
        .try_init()
        .map_err(|e| {
            crate::Error::Config(format!(
                "a tracing subscriber is already installed ({e}); install_otlp must be the first"
            ))
        })?;
    Ok(OtlpGuard(provider))
}

fn parse(traceparent: &str) -> Option<SpanContext> {
    let mut parts = traceparent.split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00" || trace.len() != 32 || span.len() != 16 {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let sc = SpanContext::new(
        TraceId::from_hex(trace).ok()?,
        SpanId::from_hex(span).ok()?,
        TraceFlags::new(flags),
        true,
        TraceState::default(),
    );
    sc.is_valid().then_some(sc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_parse_and_invalid_ones_do_not() {
        let sc = parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").expect("valid");
        assert_eq!(sc.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(sc.is_sampled() && sc.is_remote());
        assert!(parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none());
        assert!(parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").is_none());
        assert!(parse("garbage").is_none());
    }
}
