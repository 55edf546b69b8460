//! OpenTelemetry traces of invocations, exported over OTLP/HTTP (protobuf).
//!
//! - **Off unless configured** (`--otlp-endpoint`): no tracer, no span, no
//!   header parsed; what the request path pays is one branch.
//! - **A span per invocation** (`SERVER`), its parent the W3C `traceparent`
//!   (and `tracestate`) the request came with, sampled at `--trace-sampling`
//!   (on a keyed hash of the trace id, so a client cannot pick one that is
//!   always kept; a forward carries the decision to its peer, signed).
//!   The parent's own sampled flag is followed only where it is trusted: a
//!   peer's signed forward, the host's own map items and triggers, or every
//!   client with `--trace-trust-client`; otherwise a stranger could make
//!   the host record and export every request it sends; children for admission,
//!   instantiation, the guest call, a forward to a peer and each outbound
//!   request. The guest is handed the `traceparent` of its call's span, a
//!   forward and each outbound request carry their own span's, so a trace
//!   follows a request from host to host and out.
//! - **Exported off the request path**: finished spans go to the SDK's batch
//!   processor (its own thread, a bounded queue that drops when full), whose
//!   HTTP requests run on the host's tokio runtime through hyper.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{Span as _, SpanKind, Status, TraceContextExt, Tracer as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HeaderExtractor, HeaderInjector, HttpClient, HttpError};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider};

/// How long one export may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest answer read from a collector.
const MAX_ANSWER_BYTES: usize = 1 << 20;

/// Where traces go, and how many.
#[derive(Debug, Clone)]
pub struct TraceConfig {
    /// The collector's OTLP/HTTP base URL (`http://collector:4318`);
    /// `/v1/traces` is added unless the path already ends with it. `None`:
    /// no tracing.
    pub endpoint: Option<String>,
    /// Headers sent with each export (an API key, say).
    pub headers: Vec<(String, String)>,
    /// The share of traces started here that are kept (0 to 1); a request
    /// with a `traceparent` follows its caller's decision only if trusted.
    pub sampling: f64,
    /// Whether a client's `traceparent` sampled flag is followed (a peer's
    /// signed one always is).
    pub trust_client: bool,
}

impl Default for TraceConfig {
    fn default() -> Self {
        TraceConfig {
            endpoint: None,
            headers: Vec::new(),
            sampling: 1.0,
            trust_client: false,
        }
    }
}

/// The host's tracer, if tracing is on.
#[derive(Default)]
pub struct Tracing {
    on: Option<On>,
}

struct On {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    sampling: f64,
    trust_client: bool,
}

impl Tracing {
    /// Starts exporting as `config` says, naming this host `node`; off
    /// without an endpoint. Call within the host's tokio runtime.
    pub fn start(config: &TraceConfig, node: &str) -> anyhow::Result<Tracing> {
        let Some(endpoint) = &config.endpoint else {
            return Ok(Tracing::default());
        };
        if !(0.0..=1.0).contains(&config.sampling) {
            anyhow::bail!("--trace-sampling is a ratio from 0 to 1");
        }
        let url = traces_url(endpoint)?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(Exporting::new()?)
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(url.clone())
            .with_timeout(EXPORT_TIMEOUT)
            .with_headers(config.headers.iter().cloned().collect::<HashMap<_, _>>())
            .build()
            .context("the OTLP exporter")?;
        let resource = Resource::builder()
            .with_service_name("lichen")
            .with_attribute(KeyValue::new("service.instance.id", node.to_string()))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                config.sampling,
            ))))
            .with_resource(resource)
            .build();
        let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "lichen");
        tracing::info!(endpoint = %url, sampling = config.sampling, "exporting traces");
        Ok(Tracing {
            on: Some(On {
                provider,
                tracer,
                sampling: config.sampling,
                trust_client: config.trust_client,
            }),
        })
    }

    /// The span of one invocation of `function`, its parent what `headers`
    /// carry, with the `attributes` known at its start (asked for only when
    /// tracing is on); `None` when tracing is off.
    /// `trusted`: the headers come from a signed peer or the host itself.
    pub fn invocation(
        &self,
        headers: &HeaderMap,
        trusted: bool,
        function: &str,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Option<Traced> {
        self.server(
            headers,
            trusted,
            || format!("invoke {function}"),
            function,
            attributes,
        )
    }

    /// The span of a map over `function`: each item's invocation is a
    /// child of it.
    /// A map's request is a client's.
    pub fn map(&self, headers: &HeaderMap, function: &str) -> Option<Traced> {
        self.server(
            headers,
            false,
            || format!("map {function}"),
            function,
            Vec::new,
        )
    }

    fn server(
        &self,
        headers: &HeaderMap,
        trusted: bool,
        name: impl FnOnce() -> String,
        function: &str,
        attributes: impl FnOnce() -> Vec<KeyValue>,
    ) -> Option<Traced> {
        let on = self.on.as_ref()?;
        let mut parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
        if !(trusted || on.trust_client) {
            parent = decided_here(parent, on.sampling);
        }
        let mut attributes = attributes();
        attributes.push(KeyValue::new("lichen.function", function.to_string()));
        let span = on
            .tracer
            .span_builder(name())
            .with_kind(SpanKind::Server)
            .with_attributes(attributes)
            .start_with_context(&on.tracer, &parent);
        Some(Traced {
            cx: parent.with_span(span),
            tracer: on.tracer.clone(),
        })
    }

    /// Exports what is left (at shutdown); waits at most for one export.
    pub fn shutdown(&self) {
        if let Some(on) = &self.on
            && let Err(error) = on.provider.shutdown()
        {
            tracing::warn!(error = %error, "flushing traces at shutdown failed");
        }
    }
}

/// `parent` with its sampled flag set by this host's ratio, on its trace
/// id (as `TraceIdRatioBased` decides), rather than by whoever sent it.
fn decided_here(parent: Context, ratio: f64) -> Context {
    use opentelemetry::trace::{SpanContext, TraceFlags};
    let remote = parent.span().span_context().clone();
    if !remote.is_valid() {
        return parent;
    }
    let kept = sampled_at(remote.trace_id().to_bytes(), ratio);
    let flags = if kept {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    let decided = SpanContext::new(
        remote.trace_id(),
        remote.span_id(),
        flags,
        true,
        remote.trace_state().clone(),
    );
    Context::new().with_remote_span_context(decided)
}

/// Whether a trace is kept at `ratio`: a hash of its id under a key this
/// process drew at start, below the ratio's share of hashes. Keyed, so a
/// client cannot pick a trace id that is always kept.
fn sampled_at(trace_id: [u8; 16], ratio: f64) -> bool {
    use sha2::Digest;
    static KEY: std::sync::OnceLock<[u8; 16]> = std::sync::OnceLock::new();
    let key = KEY.get_or_init(|| {
        let mut key = [0u8; 16];
        let _ = getrandom::fill(&mut key);
        key
    });
    let digest = sha2::Sha256::new()
        .chain_update(key)
        .chain_update(trace_id)
        .finalize();
    let mut low = [0u8; 8];
    low.copy_from_slice(&digest[..8]);
    let bits = u64::from_be_bytes(low) >> 1;
    let bound = (ratio.clamp(0.0, 1.0) * (1u64 << 63) as f64) as u64;
    ratio >= 1.0 || bits < bound
}

/// A span being recorded and its context: children start from it, and it
/// ends when [`Traced::end`] is called or its last clone goes.
#[derive(Clone)]
pub struct Traced {
    cx: Context,
    tracer: SdkTracer,
}

impl std::fmt::Debug for Traced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Traced({:?})", self.cx.span().span_context().span_id())
    }
}

impl Traced {
    /// Starts a child span.
    pub fn child(&self, name: &'static str, kind: SpanKind) -> Traced {
        let span = self
            .tracer
            .span_builder(name)
            .with_kind(kind)
            .start_with_context(&self.tracer, &self.cx);
        Traced {
            cx: self.cx.with_span(span),
            tracer: self.tracer.clone(),
        }
    }

    /// Records a child span that already happened, from `start` to `end`.
    pub fn child_between(
        &self,
        name: &'static str,
        (start, end): (SystemTime, SystemTime),
        attributes: impl IntoIterator<Item = KeyValue>,
    ) {
        let mut span = self
            .tracer
            .span_builder(name)
            .with_kind(SpanKind::Internal)
            .with_start_time(start)
            .with_attributes(attributes)
            .start_with_context(&self.tracer, &self.cx);
        span.end_with_timestamp(end);
    }

    pub fn set(&self, attribute: KeyValue) {
        self.cx.span().set_attribute(attribute);
    }

    /// Marks the span failed, saying why.
    pub fn fail(&self, why: impl Into<String>) {
        self.cx.span().set_status(Status::error(why.into()));
    }

    pub fn end(&self) {
        self.cx.span().end();
    }

    /// Writes this span's `traceparent` (and `tracestate`) into `headers`,
    /// replacing any there.
    pub fn inject(&self, headers: &mut HeaderMap) {
        headers.remove("traceparent");
        headers.remove("tracestate");
        TraceContextPropagator::new().inject_context(&self.cx, &mut HeaderInjector(headers));
    }
}

/// The traces URL of an OTLP/HTTP endpoint.
fn traces_url(endpoint: &str) -> anyhow::Result<String> {
    let uri: http::Uri = endpoint
        .parse()
        .with_context(|| format!("--otlp-endpoint {endpoint:?} is not a URL"))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
        anyhow::bail!("--otlp-endpoint {endpoint:?}: expected http(s)://HOST[:PORT][/PATH]");
    }
    if uri.path().ends_with("/v1/traces") {
        return Ok(endpoint.to_string());
    }
    Ok(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
}

/// The exporter's HTTP client: hyper on the host's runtime, reached from the
/// batch processor's own thread.
#[derive(Debug)]
struct Exporting {
    runtime: tokio::runtime::Handle,
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl Exporting {
    fn new() -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Handle::try_current()
            .context("tracing starts within the host's runtime")?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(EXPORT_TIMEOUT));
        connector.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(crate::tls::client_config(None)?)
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Exporting { runtime, client })
    }
}

#[async_trait::async_trait]
impl HttpClient for Exporting {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let request = request.map(Full::new);
        let sent = self.runtime.spawn(async move {
            let response = tokio::time::timeout(EXPORT_TIMEOUT, client.request(request)).await??;
            let (parts, body) = response.into_parts();
            let body = tokio::time::timeout(
                EXPORT_TIMEOUT,
                Limited::new(body, MAX_ANSWER_BYTES).collect(),
            )
            .await??;
            Ok::<_, HttpError>(Response::from_parts(parts, body.to_bytes()))
        });
        sent.await?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_traces_path_is_added_once() {
        let url = |e: &str| traces_url(e).ok();
        assert_eq!(
            url("http://127.0.0.1:4318").as_deref(),
            Some("http://127.0.0.1:4318/v1/traces")
        );
        assert_eq!(
            url("https://otlp.example.com/").as_deref(),
            Some("https://otlp.example.com/v1/traces")
        );
        assert_eq!(
            url("http://c:4318/v1/traces").as_deref(),
            Some("http://c:4318/v1/traces")
        );
        assert_eq!(url("c:4318"), None);
        assert_eq!(url("ftp://c"), None);
    }
}
