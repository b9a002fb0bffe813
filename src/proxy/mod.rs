//! The upstream side: pooled HTTP/1.1 clients (rustls for https), forwarding
//! with timeouts, and the tunnel for upgraded (websocket) connections.
//!
//! Bodies stream in both directions; nothing here buffers a body. The
//! response timeout starts once the request body has been fully sent, so a
//! slow 50 MB upload is not cut off by a timer meant for a slow upstream.
//! Transport failures map to 502 (refused, reset, closed early) or 504
//! (connect or response timeout), answered in the route's error shape.

mod idle;
mod watch;

use std::convert::Infallible;
use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tower::Service;
use tracing::Instrument;

use crate::auth::inject::strip_hop_by_hop;
use crate::body::Body;
use crate::config::Upstream;
use crate::error::GatewayError;
use crate::route::{RouteClass, RouteMatch};
use crate::telemetry::RequestId;
use crate::telemetry::metrics::Metrics;
pub use watch::WatchedBody;

type HttpsClient = Client<HttpsConnector<HttpConnector>, WatchedBody>;

/// One pooled client per upstream (their timeouts differ), indexed by `Upstream::index`.
#[derive(Clone)]
pub struct Forward {
    clients: Arc<[HttpsClient]>,
    metrics: Arc<Metrics>,
    limits: ForwardLimits,
}

/// Client-side limits the forwarder enforces while streaming.
#[derive(Debug, Clone, Copy)]
pub struct ForwardLimits {
    pub max_request_body: u64,
    /// How long to wait for the first bytes of a request body before giving up.
    pub first_body_byte: Duration,
    pub websocket_idle: Duration,
}

impl std::fmt::Debug for Forward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forward")
            .field("clients", &self.clients.len())
            .finish()
    }
}

impl Forward {
    pub fn new(upstreams: &[Arc<Upstream>], metrics: Arc<Metrics>, limits: ForwardLimits) -> Self {
        let clients = upstreams
            .iter()
            .map(|upstream| client_for(upstream))
            .collect();
        Forward {
            clients,
            metrics,
            limits,
        }
    }
}

/// Each read from an upstream connection asks for up to this much. hyper's
/// adaptive default starts at 8 KiB, so a 12 KiB asset list arrives in two
/// reads and two body chunks (two channel hops, two client writes); 64 KiB
/// takes a typical JSON answer in one, and big downloads in large reads.
const UPSTREAM_READ_BUFFER: usize = 64 * 1024;

fn client_for(upstream: &Upstream) -> HttpsClient {
    let mut http = HttpConnector::new();
    // The scheme is enforced by the TLS connector below (`https_or_http`).
    http.enforce_http(false);
    http.set_connect_timeout(Some(upstream.timeouts.connect));
    http.set_nodelay(true);
    let connector = HttpsConnectorBuilder::new()
        .with_provider_and_webpki_roots(rustls::crypto::ring::default_provider())
        .expect("the ring provider supports the default protocol versions")
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .http1_read_buf_exact_size(UPSTREAM_READ_BUFFER)
        .pool_idle_timeout(upstream.timeouts.pool_idle)
        .pool_timer(TokioTimer::new())
        .build(connector)
}

impl Service<Request<Body>> for Forward {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let clients = Arc::clone(&self.clients);
        let metrics = Arc::clone(&self.metrics);
        let limits = self.limits;
        Box::pin(async move {
            let span = tracing::debug_span!(
                "upstream",
                upstream = tracing::field::Empty,
                upstream_status = tracing::field::Empty
            );
            Ok(forward(&clients, &metrics, limits, request)
                .instrument(span)
                .await)
        })
    }
}

async fn forward(
    clients: &[HttpsClient],
    metrics: &Metrics,
    limits: ForwardLimits,
    mut request: Request<Body>,
) -> Response<Body> {
    let Some(route) = request.extensions_mut().remove::<RouteMatch>() else {
        return GatewayError::Internal.into_response(crate::error::ErrorShape::ComfyFlat, None);
    };
    let shape = route.error_shape();
    let request_id = request.extensions().get::<RequestId>().cloned();
    let request_id = request_id.as_ref().and_then(|id| id.0.to_str().ok());

    let client_upgrade =
        (route.class == RouteClass::Upgrade).then(|| hyper::upgrade::on(&mut request));
    let labels = request
        .extensions()
        .get::<Arc<crate::telemetry::metrics::RequestLabels>>()
        .cloned();
    let (mut parts, body) = request.into_parts();
    // Nothing goes upstream until the body has shown its first bytes: a body
    // that is broken from the start (bad chunked framing, too big) is refused
    // here and the upstream never sees the request.
    let body = match first_frame(body, limits.first_body_byte).await {
        Ok(body) => body,
        Err(error) => return error.into_response(shape, request_id),
    };
    let span = tracing::Span::current();
    span.record("upstream", route.upstream.name.as_str());
    crate::telemetry::traces::propagate(&span, &mut parts.headers);
    let (body, body_sent) = WatchedBody::new(body, limits.max_request_body);
    let upstream_request = Request::from_parts(parts, body);

    let response_timeout = route.upstream.timeouts.response;
    let upstream_name = route.upstream.name.as_str();
    let timer = metrics.upstream_latency(upstream_name).start_timer();
    let pending = clients[route.upstream.index].request(upstream_request);
    let deadline = async {
        // An error here means the body was dropped unfinished; the request fails on its own.
        let _ = body_sent.await;
        tokio::time::sleep(response_timeout).await;
    };
    let result = tokio::select! {
        result = pending => result,
                () = deadline => {
            timer.stop_and_discard();
            metrics.upstream_error(upstream_name, "timeout");
            tracing::warn!(upstream = %route.upstream.name, timeout = ?response_timeout, "upstream response timed out");
            return GatewayError::UpstreamTimeout.into_response(shape, request_id);
        }
    };
    let mut response = match result {
        Ok(response) => response,
        Err(error) => {
            timer.stop_and_discard();
            let gateway_error = classify_client_error(&error);
            if matches!(
                gateway_error,
                GatewayError::PayloadTooLarge | GatewayError::MalformedBody
            ) {
                // The client's body, not the upstream, broke this request.
                return gateway_error.into_response(shape, request_id);
            }
            metrics.upstream_error(
                upstream_name,
                match gateway_error {
                    GatewayError::UpstreamTimeout => "timeout",
                    GatewayError::UpstreamUnreachable => "connect",
                    _ => "reset",
                },
            );
            tracing::warn!(upstream = %route.upstream.name, error = %error_chain(&error), "upstream request failed");
            return gateway_error.into_response(shape, request_id);
        }
    };

    timer.observe_duration();
    span.record("upstream_status", response.status().as_u16());
    if let Some(labels) = labels {
        let _ = labels.upstream_status.set(response.status().as_u16());
    }
    if response.status().is_server_error() {
        metrics.upstream_error(upstream_name, "5xx");
    }
    if let Some(client_upgrade) = client_upgrade {
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            tokio::spawn(tunnel(
                client_upgrade,
                upstream_upgrade,
                limits.websocket_idle,
            ));
        }
    }
    let is_switch = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    strip_hop_by_hop(response.headers_mut(), is_switch);
    response.map(Body::Incoming)
}

/// Waits for a request body's first frame and puts it back in front of the
/// rest. Empty bodies pass at once.
async fn first_frame(mut body: Body, wait: Duration) -> Result<Body, GatewayError> {
    use http_body_util::BodyExt;
    if http_body::Body::is_end_stream(&body) {
        return Ok(body);
    }
    match tokio::time::timeout(wait, body.frame()).await {
        Err(_) => Err(GatewayError::MalformedBody),
        Ok(None) => Ok(Body::Empty),
        Ok(Some(Err(_))) => Err(GatewayError::MalformedBody),
        Ok(Some(Ok(frame))) => match frame.into_data() {
            Ok(head) => Ok(Body::Chained {
                head: Some(head),
                tail: Box::new(body),
            }),
            // Trailers first means no data at all.
            Err(_) => Ok(Body::Empty),
        },
    }
}

/// Copies bytes both ways between an upgraded client and upstream connection.
/// Frames (text, binary, ping, pong, close) pass through untouched; the tunnel
/// ends when either side closes, or when nothing moved either way for `idle`.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    idle: Duration,
) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(error) => {
            tracing::debug!(%error, "upgrade did not complete");
            return;
        }
    };
    let activity = Arc::new(idle::Activity::default());
    let mut client = idle::Tracked::new(TokioIo::new(client), Arc::clone(&activity));
    let mut upstream = idle::Tracked::new(TokioIo::new(upstream), Arc::clone(&activity));
    tokio::select! {
        copied = tokio::io::copy_bidirectional(&mut client, &mut upstream) => match copied {
            Ok((sent, received)) => tracing::debug!(sent, received, "tunnel closed"),
            Err(error) => tracing::debug!(%error, "tunnel ended with an error"),
        },
        () = activity.idle_for(idle) => tracing::debug!(?idle, "idle tunnel closed"),
    }
}

/// Connect failures are 502 unless they timed out (504); anything after
/// connecting (reset, closed before the answer) is a 502 as well.
fn classify_client_error(error: &hyper_util::client::legacy::Error) -> GatewayError {
    let chain: Vec<&(dyn StdError + 'static)> =
        std::iter::successors(error.source(), |cause| (*cause).source()).collect();
    if chain.iter().any(|cause| cause.is::<watch::BodyTooLarge>()) {
        return GatewayError::PayloadTooLarge;
    }
    // hyper reports a failing request body as a *user* error: the client's
    // body broke, not the upstream. A parse error without it is the upstream's
    // answer being malformed, which is a bad gateway like any other.
    if chain.iter().any(|cause| {
        cause
            .downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_user)
    }) {
        return GatewayError::MalformedBody;
    }
    let timed_out = chain.iter().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
    });
    if timed_out {
        GatewayError::UpstreamTimeout
    } else if error.is_connect() {
        GatewayError::UpstreamUnreachable
    } else {
        GatewayError::UpstreamReset
    }
}

/// `a: b: c`, for a log line that says what actually failed.
fn error_chain(error: &dyn StdError) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}
