//! Request ids, the per-request span, the access log, and logging set-up.
//!
//! The request's record holds its id from the start (a client's sane
//! `X-Request-Id`, or a fresh UUID), from where the upstream rewrite
//! (`auth::inject`) sends it on. [`ObserveLayer`] is the outermost layer: it
//! opens the request span every inner layer
//! records into (`team`, `upstream`, …), sets the id on the answer, and
//! writes one access-log line per request, rejections included. The span
//! records the path but never the query: Comfy's `/ws` carries a key in
//! `token=`.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::header::{HeaderName, HeaderValue};
use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::{Layer, Service};
use tracing::Span;

use crate::body::Body;

pub mod logging;
pub mod metrics;
pub mod shards;
pub mod traces;

use std::sync::{Arc, OnceLock};

use crate::auth::inject::ClientAddr;
use crate::auth::{Authenticated, Caller};
use crate::route::RouteMatch;
use metrics::{Metrics, RequestLabels};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The request span [`Observe`] opened, for an inner layer's `call` to record
/// fields on (it runs inside that span); `None` when no span at the request
/// span's level (DEBUG) can be on, which a global atomic tells without the
/// thread-local look-up of the current span.
pub fn request_span() -> Option<Span> {
    tracing::level_enabled!(tracing::Level::DEBUG).then(Span::current)
}

/// The request id, in the request's record; also sent upstream and back to
/// the client.
#[derive(Debug, Clone)]
pub struct RequestId(pub HeaderValue);

impl RequestId {
    /// The id of a request with a record (every request a connection serves,
    /// and any that went through [`Observe`]), for error bodies.
    pub fn of<B>(request: &Request<B>) -> Option<&str> {
        RequestRecord::of(request).and_then(|record| record.id.0.to_str().ok())
    }

    /// Keeps a sane client-supplied id; anything else is replaced by a fresh UUID.
    fn for_request<B>(request: &Request<B>) -> RequestId {
        let supplied = crate::wire::rare_field(request.headers(), &X_REQUEST_ID).filter(|value| {
            let bytes = value.as_bytes();
            !bytes.is_empty()
                && bytes.len() <= 128
                && bytes
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(b))
        });
        match supplied {
            Some(value) => RequestId(value.clone()),
            None => {
                // A thread-local CSPRNG, not `Uuid::new_v4` (one `getrandom` syscall per request).
                let mut random = [0u8; 16];
                rand::RngCore::fill_bytes(&mut rand::rng(), &mut random);
                let uuid = uuid::Builder::from_random_bytes(random).into_uuid();
                let mut id = [0u8; uuid::fmt::Hyphenated::LENGTH];
                uuid.as_hyphenated().encode_lower(&mut id);
                // Owned by one reference-counted box: the id is cloned into the
                // answer's (and a forwarded request's) `X-Request-Id`, and a value
                // copied into a `Vec` would take a second allocation on the first clone.
                let id = bytes::Bytes::from_owner(id);
                RequestId(
                    HeaderValue::from_maybe_shared(id).expect("a UUID is a valid header value"),
                )
            }
        }
    }
}

/// What is known about one request as it goes through the stack: where it
/// came from and its id (set by the connection, or by [`Observe`] for a
/// request without a record), where it
/// is routed (`route::Classify`), who it was let through as
/// (`auth::Authenticate`) and what the upstream answered (`proxy`). One
/// extension, `Arc<RequestRecord>`, shared by every layer and by a cache fill
/// started for the request, and each fact is in it once: an extension per
/// fact cost a box each (and the fourth made the extension table grow), and
/// the metric labels and the access line read the same route and team the
/// layers acted on.
#[derive(Debug)]
pub struct RequestRecord {
    /// The peer, with its `X-Forwarded-For` item; `None` outside a connection.
    pub client: Option<ClientAddr>,
    /// Whether the client connected over TLS (`X-Forwarded-Proto`).
    pub tls: bool,
    /// Kept from the client's `X-Request-Id` when sane, else a fresh UUID;
    /// taken as the record is made, so no layer waits on it.
    pub id: RequestId,
    /// The upstream and rule the request is routed to.
    pub route: OnceLock<RouteMatch>,
    /// The team (or public read) the request was let through as.
    pub caller: OnceLock<Caller>,
    /// The status the upstream answered with, when the request went upstream.
    pub upstream_status: OnceLock<u16>,
    /// What the gateway's cache did with the request, as a metric label
    /// (`hit`, `miss`, `collapsed`, `stale`, `bypass`, `refresh`); unset
    /// where the cache did not take part. Set by the cache layer as it
    /// answers, not read back from the answer's `Cache-Status`: an upstream
    /// may send one of its own on a route the gateway does not cache.
    pub cache: OnceLock<&'static str>,
}

impl RequestRecord {
    /// The record a connection attaches to `request`.
    pub fn for_client<B>(request: &Request<B>, client: ClientAddr, tls: bool) -> Self {
        RequestRecord {
            client: Some(client),
            ..RequestRecord::for_request(request, tls)
        }
    }

    /// A record for `request` with nothing known yet but its id.
    fn for_request<B>(request: &Request<B>, tls: bool) -> Self {
        RequestRecord {
            client: None,
            tls,
            id: RequestId::for_request(request),
            route: OnceLock::new(),
            caller: OnceLock::new(),
            upstream_status: OnceLock::new(),
            cache: OnceLock::new(),
        }
    }

    pub fn of<B>(request: &Request<B>) -> Option<&RequestRecord> {
        request
            .extensions()
            .get::<Arc<RequestRecord>>()
            .map(Arc::as_ref)
    }

    /// The request's record; an empty one is attached to a request that has
    /// none (a layer called outside a connection and [`Observe`]: tests,
    /// benchmarks).
    pub fn attached<B>(request: &mut Request<B>) -> &Arc<RequestRecord> {
        if request.extensions().get::<Arc<RequestRecord>>().is_none() {
            let record = Arc::new(RequestRecord::for_request(request, false));
            request.extensions_mut().insert(record);
        }
        request
            .extensions()
            .get::<Arc<RequestRecord>>()
            .expect("attached above")
    }

    /// The route of a routed request.
    pub fn route(&self) -> Option<&RouteMatch> {
        self.route.get()
    }

    /// The team of a request authenticated by a client key.
    pub fn authenticated(&self) -> Option<&Authenticated> {
        match self.caller.get() {
            Some(Caller::Team(authenticated)) => Some(authenticated),
            Some(Caller::PublicRead) | None => None,
        }
    }

    /// Whether the request was let through as a keyless public read.
    pub fn is_public_read(&self) -> bool {
        matches!(self.caller.get(), Some(Caller::PublicRead))
    }

    /// The labels the request is counted under (`none`, and no team or
    /// upstream, for what the layers did not get to).
    pub fn labels(&self) -> RequestLabels<'_> {
        let route = self.route();
        RequestLabels {
            team: self
                .authenticated()
                .map(|authenticated| &authenticated.team),
            upstream: route.map(|route| &route.upstream),
            route_class: route.map_or("none", RouteMatch::class_label),
        }
    }
}

/// Tower layer for [`Observe`].
#[derive(Debug, Clone)]
pub struct ObserveLayer {
    metrics: Arc<Metrics>,
}

impl ObserveLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        ObserveLayer { metrics }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Observe {
            metrics: Arc::clone(&self.metrics),
            inner,
        }
    }
}

/// Request id, span, metrics and access log around everything else.
#[derive(Debug, Clone)]
pub struct Observe<S> {
    metrics: Arc<Metrics>,
    inner: S,
}

/// Counts a request in `teamgate_requests_in_flight` until dropped, so a
/// client that goes away mid-request is counted out too. It also holds the
/// metrics the request is counted in when it is answered.
struct InFlightGuard(Arc<Metrics>);

impl InFlightGuard {
    fn enter(metrics: &Arc<Metrics>) -> Self {
        metrics.request_entered();
        InFlightGuard(Arc::clone(metrics))
    }

    fn metrics(&self) -> &Metrics {
        &self.0
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.request_left();
    }
}

impl std::fmt::Debug for InFlightGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InFlightGuard")
    }
}

impl<S> Service<Request<Body>> for Observe<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ObserveFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        // Before the inner layers' synchronous work: a cache hit (auth, quota,
        // lookup, the answer) is done by the time `call` returns, and timed
        // from after it, its latency would leave all of that out.
        let started = Instant::now();
        // The connection attaches the record; a stack called without one
        // (the micro-benchmarks, layer tests) gets an empty one here.
        let record = Arc::clone(RequestRecord::attached(&mut request));
        // Goes upstream in `X-Request-Id` (set with the upstream request's
        // other fields, `auth::inject`) and back on the answer (below).
        let request_id = &record.id;
        let span = tracing::debug_span!(
            "request",
            request_id = %request_id.0.to_str().unwrap_or_default(),
            method = %request.method(),
            path = %request.uri().path(),
            upstream = tracing::field::Empty,
            route_class = tracing::field::Empty,
            team = tracing::field::Empty,
            key = tracing::field::Empty,
            cache = tracing::field::Empty,
            status = tracing::field::Empty,
            upstream_status = tracing::field::Empty,
        );
        traces::continue_trace(&span, request.headers());
        // What the access line needs that the request no longer holds at the
        // end (a reference-counted clone), kept only when that line is on.
        let logged_uri = logging::AccessLine::enabled().then(|| request.uri().clone());
        let method = request.method().clone();
        // Inner layers' synchronous work (routing, auth) runs inside the span too.
        let inner = span.in_scope(|| self.inner.call(request));
        ObserveFuture {
            inner,
            span,
            started,
            record,
            method,
            logged_uri,
            in_flight: InFlightGuard::enter(&self.metrics),
        }
    }
}

pin_project! {
    /// Completes the request span: sets `X-Request-Id` and logs the outcome.
    pub struct ObserveFuture<F> {
        #[pin]
        inner: F,
        span: Span,
        started: Instant,
        record: Arc<RequestRecord>,
        method: http::Method,
        // Logged by its path only, never the query (Comfy's `/ws` carries a key in `token=`).
        logged_uri: Option<http::Uri>,
        // The metrics the answer is counted in; counts the request out when dropped.
        in_flight: InFlightGuard,
    }
}

impl<F> Future for ObserveFuture<F>
where
    F: Future<Output = Result<Response<Body>, Infallible>>,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        let Ok(mut response) = std::task::ready!(this.inner.poll(cx));
        let request_id = &this.record.id;
        let elapsed = this.started.elapsed();
        let cache = this
            .record
            .cache
            .get()
            .copied()
            .unwrap_or(metrics::CACHE_NONE);
        let labels = this.record.labels();
        this.in_flight.metrics().request(
            &labels,
            this.method,
            response.status(),
            cache,
            elapsed.as_secs_f64(),
        );
        this.span.record("status", response.status().as_u16());
        this.span.record("cache", cache);
        let upstream_status = this.record.upstream_status.get().copied();
        if let Some(upstream_status) = upstream_status {
            this.span.record("upstream_status", upstream_status);
        }
        // The access log carries every field itself: at the default level the
        // request span (DEBUG) is not even built, so this line costs one event.
        if let Some(uri) = this.logged_uri.take() {
            logging::AccessLine {
                request_id: request_id.0.to_str().unwrap_or_default(),
                method: this.method.as_str(),
                path: uri.path(),
                team: labels.team.map_or("", |team| team.name.as_str()),
                upstream: labels
                    .upstream
                    .map_or("", |upstream| upstream.name.as_str()),
                route_class: labels.route_class,
                cache,
                status: response.status().as_u16(),
                upstream_status,
                latency_us: elapsed.as_micros() as u64,
            }
            // Asked as the request came in: `logged_uri` is kept only then.
            .log_enabled();
        }
        response
            .headers_mut()
            .insert(X_REQUEST_ID.clone(), request_id.0.clone());
        Poll::Ready(Ok(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Work an inner layer does in `call` itself — everything a cache hit
    /// does — counts toward the request's latency. (A lower bound only: the
    /// inner layer sleeps 20 ms, so no machine can make this fail by being
    /// slow.)
    #[test]
    fn latency_includes_the_inner_layers_synchronous_work() {
        let metrics = Arc::new(Metrics::new());
        let mut observe = ObserveLayer::new(Arc::clone(&metrics)).layer(tower::service_fn(
            |_request: Request<Body>| {
                std::thread::sleep(std::time::Duration::from_millis(20));
                std::future::ready(Ok::<_, Infallible>(Response::new(Body::Empty)))
            },
        ));
        let answer = observe.call(Request::new(Body::Empty));
        let Poll::Ready(Ok(_)) =
            std::pin::pin!(answer).poll(&mut Context::from_waker(std::task::Waker::noop()))
        else {
            panic!("a ready inner answer is ready at the first poll");
        };
        let rendered = metrics.render(0, 0);
        let sum: f64 = rendered
            .lines()
            .find(|line| line.starts_with("teamgate_request_duration_seconds_sum"))
            .and_then(|line| line.rsplit(' ').next())
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("a duration sum in:\n{rendered}"));
        assert!(
            sum >= 0.020,
            "latency {sum}s leaves out the 20 ms in `call`"
        );
    }

    #[test]
    fn sane_client_request_ids_are_kept_and_others_replaced() {
        let keep = Request::builder()
            .header("x-request-id", "abc-123.4:5")
            .body(())
            .unwrap();
        assert_eq!(RequestId::for_request(&keep).0, "abc-123.4:5");
        for bad in ["has space", "quote\"", ""] {
            let request = Request::builder()
                .header("x-request-id", bad)
                .body(())
                .unwrap();
            let id = RequestId::for_request(&request);
            let text = id.0.to_str().unwrap();
            let uuid = uuid::Uuid::parse_str(text)
                .unwrap_or_else(|_| panic!("{bad:?} should be replaced by a UUID, not {text:?}"));
            assert_eq!(uuid.get_version_num(), 4, "a random UUID: {text}");
            assert_eq!(
                text,
                uuid.as_hyphenated().to_string(),
                "lowercase, hyphenated"
            );
        }
        let fresh = || RequestId::for_request(&Request::new(())).0;
        assert_ne!(fresh(), fresh(), "each request gets its own id");
    }

    /// The id is in the record from the start, for every layer: the one the
    /// connection attaches and the one attached to a request without.
    #[test]
    fn a_record_carries_its_requests_id_from_the_start() {
        let mut request = Request::builder()
            .header("x-request-id", "abc-123")
            .body(())
            .unwrap();
        let client = ClientAddr::new("127.0.0.1:5000".parse().unwrap());
        assert_eq!(
            RequestRecord::for_client(&request, client, false).id.0,
            "abc-123"
        );
        assert_eq!(RequestRecord::attached(&mut request).id.0, "abc-123");
        assert_eq!(RequestId::of(&request), Some("abc-123"));
    }
}
