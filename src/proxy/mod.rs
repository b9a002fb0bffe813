//! The upstream side: forwarding through a per-upstream HTTP/1.1 client
//! (see `client`), with timeouts, and the tunnel for upgraded (websocket)
//! connections. Tunnels, event streams and long downloads watch the served
//! config and end when a reload revokes the key they were opened with
//! (`Grant`, `RevocableStream`).
//!
//! Bodies stream in both directions; nothing here buffers a body. The
//! response timeout starts once the request body has been fully sent, so a
//! slow 50 MB upload is not cut off by a timer meant for a slow upstream.
//! Transport failures map to 502 (refused, reset, closed early, malformed
//! answer) or 504 (connect or response timeout), answered in the route's
//! error shape.

mod client;
mod idle;
mod redact;
mod watch;

use std::convert::Infallible;
use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::FutureExt;
use http::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tower::Service;
use tracing::Instrument;

use crate::auth::Authenticated;
use crate::auth::inject::strip_hop_by_hop;
use crate::body::Body;
use crate::cache::policy::CacheRoute;
use crate::config::{Config, CredentialPlacement, Upstream};
use crate::error::GatewayError;
use crate::route::{RouteClass, RouteMatch};
use crate::telemetry::RequestRecord;
use crate::telemetry::metrics::Metrics;
use client::{Client, ClientError, UpgradedUpstream};
pub use client::{ResponseBody, codec as http1};
pub use watch::WatchedBody;

/// One client per upstream (their timeouts and pools differ), indexed by `Upstream::index`.
#[derive(Clone)]
pub struct Forward {
    upstreams: Arc<Upstreams>,
    limits: ForwardLimits,
}

/// What every forwarded request shares, behind the one reference count a
/// request's future holds.
struct Upstreams {
    clients: Box<[Client]>,
    metrics: Arc<Metrics>,
    /// The config the gateway serves by now: websocket tunnels, event
    /// streams and long downloads watch it, to end when a reload revokes the
    /// key they were opened with.
    serving: tokio::sync::watch::Receiver<Arc<Config>>,
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
            .field("clients", &self.upstreams.clients.len())
            .finish()
    }
}

impl Forward {
    /// Clients for `serving`'s upstreams, which a reload never changes.
    pub fn new(
        serving: tokio::sync::watch::Receiver<Arc<Config>>,
        metrics: Arc<Metrics>,
        limits: ForwardLimits,
    ) -> Self {
        let config = Arc::clone(&serving.borrow());
        let public_roots = Arc::new(upstream_tls_config(rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        }));
        let clients = config
            .upstreams
            .iter()
            .map(|upstream| {
                let tls = match &upstream.trusted_roots {
                    None => Arc::clone(&public_roots),
                    Some(roots) => Arc::new(upstream_tls_config(roots.clone())),
                };
                Client::new(upstream, &tls, metrics.upstream_pool(&upstream.name))
                    .unwrap_or_else(|error| panic!("upstream {}: {error}", upstream.name))
            })
            .collect();
        Forward {
            upstreams: Arc::new(Upstreams {
                clients,
                metrics,
                serving,
            }),
            limits,
        }
    }
}

/// TLS to upstreams: certificates checked against `roots` (the Mozilla set
/// from webpki-roots unless the upstream has a `ca_file`), HTTP/1.1 by ALPN.
fn upstream_tls_config(roots: rustls::RootCertStore) -> rustls::ClientConfig {
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("the ring provider supports the default protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config
}

impl Service<Request<Body>> for Forward {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let span = tracing::debug_span!(
            "upstream",
            upstream = tracing::field::Empty,
            upstream_status = tracing::field::Empty
        );
        // `forward`'s own future goes into the box, not one wrapped in an
        // `async` block: a wrapper would hold it beside its own state, and
        // every request would allocate and copy twice the bytes.
        Box::pin(
            forward(Arc::clone(&self.upstreams), self.limits, request)
                .map(Ok)
                .instrument(span),
        )
    }
}

async fn forward(
    upstreams: Arc<Upstreams>,
    limits: ForwardLimits,
    mut request: Request<Body>,
) -> Response<Body> {
    let Upstreams {
        clients, metrics, ..
    } = &*upstreams;
    // Every request here was routed (`Classify`), and its record says where.
    let record = request.extensions().get::<Arc<RequestRecord>>().cloned();
    let Some(route) = record.as_deref().and_then(RequestRecord::route) else {
        return GatewayError::Internal.into_response(crate::error::ErrorShape::ComfyFlat, None);
    };
    let shape = route.error_shape();
    let request_id = record
        .as_deref()
        .and_then(|record| record.id.0.to_str().ok());

    // The team's key is in this request's URL when the route's rule puts it
    // in the query: the answer is searched for it (`redact`).
    let url_secret = match route.rule().credential {
        CredentialPlacement::QueryParam(_) => record
            .as_deref()
            .and_then(RequestRecord::authenticated)
            .and_then(|auth| auth.team.credential_for(&route.upstream))
            .cloned(),
        _ => None,
    };
    let is_upgrade = route.class == RouteClass::Upgrade;
    let client_upgrade = is_upgrade.then(|| hyper::upgrade::on(&mut request));
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
    let sent_at = std::time::Instant::now();
    // Both futures are built inside `select!`: held in locals first, they
    // would each take room in this future beside `select!`'s own copies.
    let result = tokio::select! {
        result = clients[route.upstream.index].send(upstream_request, is_upgrade) => result,
        () = async {
            // An error here means the body was dropped unfinished; the request fails on its own.
            let _ = body_sent.await;
            tokio::time::sleep(response_timeout).await;
        } => {
            metrics.upstream_error(upstream_name, "timeout");
            tracing::warn!(upstream = %route.upstream.name, timeout = ?response_timeout, "upstream response timed out");
            return GatewayError::UpstreamTimeout.into_response(shape, request_id);
        }
    };
    let (mut response, upgraded_upstream) = match result {
        Ok(answer) => answer,
        Err(error) => {
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

    metrics.upstream_latency(upstream_name, sent_at.elapsed().as_secs_f64());
    span.record("upstream_status", response.status().as_u16());
    if let Some(record) = &record {
        let _ = record.upstream_status.set(response.status().as_u16());
    }
    if response.status().is_server_error() {
        metrics.upstream_error(upstream_name, "5xx");
    }
    let grant = || Grant::of(record.as_deref(), &route.upstream, &upstreams.serving);
    // The client asked for the upgrade (or `send` would have refused the 101).
    if let (Some(client_upgrade), Some(upstream)) = (client_upgrade, upgraded_upstream) {
        tokio::spawn(tunnel(
            client_upgrade,
            upstream,
            limits.websocket_idle,
            grant(),
        ));
    } else if let Some(ending) = ending_on_revocation(&response, route)
        && let Some(grant) = grant()
    {
        response = response.map(|body| RevocableStream::wrap(body, grant, ending));
    }
    let is_switch = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    strip_hop_by_hop(response.headers_mut(), is_switch);
    match url_secret {
        // Boxed: only these routes pay for the body's read in their future.
        Some(secret) => Box::pin(redact::answer(response, &secret, response_timeout))
            .await
            .unwrap_or_else(|error| error.into_response(shape, request_id)),
        None => response,
    }
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

/// What a tunnel, an event stream or a long download was opened as: the team and key that
/// authenticated it and the upstream it reaches, checked again whenever a
/// reload changes the config.
struct Grant {
    authenticated: Authenticated,
    upstream: Arc<Upstream>,
    serving: tokio::sync::watch::Receiver<Arc<Config>>,
}

impl Grant {
    /// The grant of an authenticated request to `upstream`; `None` for a
    /// request let through without a key (public reads).
    fn of(
        record: Option<&RequestRecord>,
        upstream: &Arc<Upstream>,
        serving: &tokio::sync::watch::Receiver<Arc<Config>>,
    ) -> Option<Grant> {
        let authenticated = record?.authenticated()?;
        Some(Grant {
            authenticated: authenticated.clone(),
            upstream: Arc::clone(upstream),
            serving: serving.clone(),
        })
    }

    /// Returns once a reload has revoked the grant: the key is gone or now
    /// another team's, or the team's credential for the upstream changed.
    async fn revoked(mut self) {
        // `serving` is cloned from a receiver that never marks a config
        // seen, so after any reload the first `changed` returns at once: a
        // reload between the request's authentication and here is checked too.
        while self.serving.changed().await.is_ok() {
            let config = Arc::clone(&self.serving.borrow_and_update());
            if !self.authenticated.still_granted(&config, &self.upstream) {
                return;
            }
        }
        // The gateway is shutting down; the tunnel ends as the connection does.
        std::future::pending().await
    }
}

/// Copies bytes both ways between an upgraded client and upstream connection.
/// Frames (text, binary, ping, pong, close) pass through untouched; the tunnel
/// ends when either side closes, when nothing moved either way for `idle`,
/// or when a reload revokes its `grant`.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    upstream: UpgradedUpstream,
    idle: Duration,
    grant: Option<Grant>,
) {
    let client = match client.await {
        Ok(client) => client,
        Err(error) => {
            tracing::debug!(%error, "upgrade did not complete");
            return;
        }
    };
    let activity = Arc::new(idle::Activity::default());
    let mut client = idle::Tracked::new(TokioIo::new(client), Arc::clone(&activity));
    let mut upstream_io = idle::Tracked::new(upstream.io, Arc::clone(&activity));
    let relay = async {
        // Frames the upstream sent right behind its 101 were read with the head.
        if !upstream.read_ahead.is_empty() {
            client.write_all(&upstream.read_ahead).await?;
        }
        tokio::io::copy_bidirectional(&mut client, &mut upstream_io).await
    };
    tokio::select! {
        copied = relay => match copied {
            Ok((sent, received)) => tracing::debug!(sent, received, "tunnel closed"),
            Err(error) => tracing::debug!(%error, "tunnel ended with an error"),
        },
        () = activity.idle_for(idle) => tracing::debug!(?idle, "idle tunnel closed"),
        () = async {
            match grant {
                Some(grant) => grant.revoked().await,
                None => std::future::pending().await,
            }
        } => tracing::info!("tunnel closed: a config reload revoked the key it was opened with"),
    }
}

/// A body longer than this (or of unknown length) on a route the cache does
/// not store is cut when the key it is sent to is revoked: a download can
/// take minutes, and a revoked (perhaps leaked) key should not keep one
/// running. Shorter bodies are done before a revocation could matter.
const LONG_BODY: u64 = 1 << 20;

/// How an answer's body ends if a reload revokes the key it is sent with,
/// or `None` where it is left to finish. An event stream ends as its
/// upstream would end it; a long body is cut, so the client can tell it is
/// incomplete. Answers on cacheable reads are left alone: a cache fill's
/// body is shared with the requests waiting on it, of other keys too, and
/// is bounded by the entry cap.
fn ending_on_revocation(response: &Response<Body>, route: &RouteMatch) -> Option<Ending> {
    if is_event_stream(response) {
        return Some(Ending::AsTheStreamEnds);
    }
    use http_body::Body as _;
    let body = response.body();
    let long = body
        .size_hint()
        .exact()
        .is_none_or(|length| length > LONG_BODY);
    let cacheable = matches!(route.cache, Some(CacheRoute::Read { .. }));
    (long && !cacheable && !body.is_end_stream()).then_some(Ending::Cut)
}

/// Whether the answer is a server-sent event stream (Comfy's
/// `GET /api/v2/jobs/{id}/events`), which stays open as long as its job runs.
fn is_event_stream(response: &Response<Body>) -> bool {
    response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|value| {
            value
                .as_bytes()
                .get(..b"text/event-stream".len())
                .is_some_and(|start| start.eq_ignore_ascii_case(b"text/event-stream"))
        })
}

/// How a [`RevocableStream`] ends when its key is revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// As the upstream would end it (the last chunk, the connection kept):
    /// an `EventSource` then reconnects, and the reconnection is refused
    /// with the gateway's `401`.
    AsTheStreamEnds,
    /// With an error: the answer is left short of its `Content-Length` (or
    /// without its last chunk), so the client sees a broken download, not a
    /// complete one.
    Cut,
}

/// The body of an event stream or a long download, ended as soon as a
/// reload revokes the key it was opened with (see `Ending`). The upstream
/// connection is closed.
pub struct RevocableStream {
    inner: Body,
    /// Boxed: a `Grant::revoked` future; `Sync`, as every `Body` is.
    revoked: Pin<Box<dyn Future<Output = ()> + Send + Sync>>,
    ending: Ending,
    ended: bool,
}

impl RevocableStream {
    fn wrap(inner: Body, grant: Grant, ending: Ending) -> Body {
        Body::Revocable(Box::new(RevocableStream {
            inner,
            revoked: Box::pin(grant.revoked()),
            ending,
            ended: false,
        }))
    }
}

/// The error a cut download ends with.
#[derive(Debug)]
struct Revoked;

impl std::fmt::Display for Revoked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the key this answer was sent with was revoked")
    }
}

impl StdError for Revoked {}

impl std::fmt::Debug for RevocableStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RevocableStream")
            .field("inner", &self.inner)
            .field("ending", &self.ending)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl http_body::Body for RevocableStream {
    type Data = bytes::Bytes;
    type Error = crate::body::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<bytes::Bytes>, crate::body::BoxError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        // Polled first, so a stream waiting for its next event is woken
        // (and ended) by the reload itself.
        if self.revoked.as_mut().poll(cx).is_ready() {
            self.ended = true;
            // Dropped now: the upstream connection closes at once.
            self.inner = Body::Empty;
            return match self.ending {
                Ending::AsTheStreamEnds => {
                    tracing::info!(
                        "event stream ended: a config reload revoked the key it was opened with"
                    );
                    Poll::Ready(None)
                }
                Ending::Cut => {
                    tracing::info!(
                        "download cut: a config reload revoked the key it was opened with"
                    );
                    Poll::Ready(Some(Err(Box::new(Revoked))))
                }
            };
        }
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        if self.ended {
            http_body::SizeHint::with_exact(0)
        } else {
            self.inner.size_hint()
        }
    }
}

/// What a failed exchange means for the client: its own body's fault (413,
/// 400), a timeout (504), or an unreachable or misbehaving upstream (502).
fn classify_client_error(error: &ClientError) -> GatewayError {
    match error {
        // `WatchedBody`, the outermost body, raises `BodyTooLarge` itself.
        ClientError::RequestBody(cause) if cause.is::<watch::BodyTooLarge>() => {
            GatewayError::PayloadTooLarge
        }
        ClientError::RequestBody(_) => GatewayError::MalformedBody,
        ClientError::ConnectTimeout => GatewayError::UpstreamTimeout,
        ClientError::Connect(io) | ClientError::Tls(io)
            if io.kind() == std::io::ErrorKind::TimedOut =>
        {
            GatewayError::UpstreamTimeout
        }
        ClientError::Connect(_) | ClientError::Tls(_) => GatewayError::UpstreamUnreachable,
        ClientError::Write(_)
        | ClientError::Read(_)
        | ClientError::ClosedBeforeAnswer
        | ClientError::Protocol(_) => GatewayError::UpstreamReset,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The future `Forward` boxes is allocated, and partly copied, once per
    /// proxied request. While an `async` block held `forward`'s future
    /// beside its own state and `send` kept room for connecting inline, it
    /// was 12,416 bytes in release and 4,064 in the test profile; it is
    /// ~2.5 KB in both now (benches/README.md, "Future sizes"). The bound
    /// sits between: a return of those shapes fails here, ~20% of drift
    /// does not.
    #[test]
    fn a_proxied_request_boxes_a_small_future() {
        let config = crate::config::for_tests("a-client-key", "");
        let (_serving, config) = tokio::sync::watch::channel(Arc::new(config));
        let mut forward = Forward::new(
            config,
            Arc::new(Metrics::new()),
            ForwardLimits {
                max_request_body: 1 << 20,
                first_body_byte: Duration::from_secs(1),
                websocket_idle: Duration::from_secs(1),
            },
        );
        let future = forward.call(Request::new(Body::Empty));
        let size = std::mem::size_of_val(&*future);
        assert!(size <= 3 * 1024, "boxed forward future is {size} bytes");
    }
}
