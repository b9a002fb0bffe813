//! The upstream side: pooled HTTP/1.1 clients (rustls for https), forwarding
//! with timeouts, and the tunnel for upgraded (websocket) connections.
//!
//! Bodies stream in both directions; nothing here buffers a body. The
//! response timeout starts once the request body has been fully sent, so a
//! slow 50 MB upload is not cut off by a timer meant for a slow upstream.
//! Transport failures map to 502 (refused, reset, closed early) or 504
//! (connect or response timeout), answered in the route's error shape.

mod watch;

use std::convert::Infallible;
use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

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
}

impl std::fmt::Debug for Forward {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forward")
            .field("clients", &self.clients.len())
            .finish()
    }
}

impl Forward {
    pub fn new(upstreams: &[Arc<Upstream>], metrics: Arc<Metrics>) -> Self {
        let clients = upstreams
            .iter()
            .map(|upstream| client_for(upstream))
            .collect();
        Forward { clients, metrics }
    }
}

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
        Box::pin(async move {
            let span = tracing::info_span!(
                "upstream",
                upstream = tracing::field::Empty,
                upstream_status = tracing::field::Empty
            );
            Ok(forward(&clients, &metrics, request).instrument(span).await)
        })
    }
}

async fn forward(
    clients: &[HttpsClient],
    metrics: &Metrics,
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
    let span = tracing::Span::current();
    span.record("upstream", route.upstream.name.as_str());
    crate::telemetry::traces::propagate(&span, &mut parts.headers);
    let (body, body_sent) = WatchedBody::new(body);
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
            tokio::spawn(tunnel(client_upgrade, upstream_upgrade));
        }
    }
    let is_switch = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    strip_hop_by_hop(response.headers_mut(), is_switch);
    response.map(Body::Incoming)
}

/// Copies bytes both ways between an upgraded client and upstream connection.
/// Frames (text, binary, ping, pong, close) pass through untouched; the tunnel
/// ends when either side closes.
async fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(pair) => pair,
        Err(error) => {
            tracing::debug!(%error, "upgrade did not complete");
            return;
        }
    };
    let mut client = TokioIo::new(client);
    let mut upstream = TokioIo::new(upstream);
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((sent, received)) => tracing::debug!(sent, received, "tunnel closed"),
        Err(error) => tracing::debug!(%error, "tunnel ended with an error"),
    }
}

/// Connect failures are 502 unless they timed out (504); anything after
/// connecting (reset, closed before the answer) is a 502 as well.
fn classify_client_error(error: &hyper_util::client::legacy::Error) -> GatewayError {
    let mut timed_out = false;
    let mut cause = error.source();
    while let Some(inner) = cause {
        timed_out |= inner
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut);
        cause = inner.source();
    }
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
