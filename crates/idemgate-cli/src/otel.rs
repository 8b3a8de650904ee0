//! `--otlp ENDPOINT` (feature `otel`): the process's spans to an OpenTelemetry collector.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;

use crate::BoxError;

/// A tracer provider exporting in batches over OTLP/HTTP (protobuf) to `endpoint`
/// (`http://collector:4318`; `/v1/traces` is added unless given), and the `tracing` layer
/// feeding it. Shut the provider down before exiting, so the last batch is sent.
pub(crate) fn layer<S>(
    endpoint: &str,
) -> Result<
    (
        SdkTracerProvider,
        tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>,
    ),
    BoxError,
>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    let endpoint = if endpoint.trim_end_matches('/').ends_with("/v1/traces") {
        endpoint.to_owned()
    } else {
        format!("{}/v1/traces", endpoint.trim_end_matches('/'))
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(endpoint)
        .build()?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name("idemgate").build())
        .build();
    let tracer = provider.tracer("idemgate");
    Ok((provider, tracing_opentelemetry::layer().with_tracer(tracer)))
}
