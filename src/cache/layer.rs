//! The cache as a tower layer: hits answered from memory, misses filled once.
//!
//! For a cacheable read (decided at classification) the layer:
//! 1. bypasses the cache on `no-store` or `Range`;
//! 2. answers a fresh, still-valid entry itself (`304` for a matching
//!    `If-None-Match`, headers only for `HEAD`), with `Age` and `Cache-Status`;
//! 3. within `stale-while-revalidate`, answers the stale entry and starts one
//!    background refresh for the key;
//! 4. otherwise joins the fill in progress for the key or starts one. The fill
//!    runs in its own task — it completes for the waiters even if the client
//!    that started it goes away — and always asks upstream for a full `GET`.
//!    Its answer is shared with every waiter; a `200` is stored if cacheable;
//!    a 5xx is replaced by a stale entry still within `stale-if-error`.
//!
//! Every answer of a cacheable read carries the layer's `Cache-Status` member
//! last, after any an upstream's own caches sent (RFC 9211 §2; an entry keeps
//! those apart from its shared fields, see `CachedResponse`).
//!
//! For a write matching a write rule, a 2xx answer invalidates the scopes the
//! rule names, in the writer's partition, before the answer reaches the client.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::future::{Either, Ready, ready};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Extensions, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};
use tracing::Instrument;

use super::policy::{
    BodyScope, CACHE_STATUS, CacheKey, CacheRoute, Partition, RequestMode, Scope, cache_status,
    if_none_match, request_mode, storable, strong_etag,
};
use super::store::{CachedResponse, EntryState, Freshness, Join, Outcome, Store};
use crate::body::Body;
use crate::error::GatewayError;
use crate::fields::{EncodedFields, SharedFields};
use crate::shared::{Fanout, Invalidation};
use crate::telemetry::metrics::{CACHE_HIT, Metrics, cache_label};
use crate::telemetry::{RequestId, RequestRecord};

/// Tower layer for [`CacheService`].
#[derive(Debug, Clone)]
pub struct CacheLayer {
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    fanout: Option<Arc<Fanout>>,
}

impl CacheLayer {
    /// `fanout`: where writes' invalidations are shared with the gateway's
    /// other instances, if it has any (`crate::shared`).
    pub fn new(store: Arc<Store>, metrics: Arc<Metrics>, fanout: Option<Arc<Fanout>>) -> Self {
        CacheLayer {
            store,
            metrics,
            fanout,
        }
    }
}

impl<S> Layer<S> for CacheLayer {
    type Service = CacheService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CacheService {
            store: Arc::clone(&self.store),
            metrics: Arc::clone(&self.metrics),
            fanout: self.fanout.clone(),
            inner,
        }
    }
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct CacheService<S> {
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    fanout: Option<Arc<Fanout>>,
    inner: S,
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

/// How long an entry of one rule stays useful.
#[derive(Debug, Clone, Copy)]
struct Lifetimes {
    ttl: Duration,
    stale_while_revalidate: Duration,
    stale_if_error: Duration,
}

impl<S> Service<Request<Body>> for CacheService<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = Response<Body>;
    type Error = Infallible;
    /// Pass-through, or a fresh hit answered in `call`, or the read/write path.
    type Future = Either<S::Future, Either<Ready<Result<Response<Body>, Infallible>>, BoxFuture>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        // The record's `Arc`: a read that goes on past `call` keeps it, to
        // record what it answered.
        let Some(record) = request.extensions().get::<Arc<RequestRecord>>() else {
            return Either::Left(self.inner.call(request));
        };
        let Some(route) = record.route() else {
            return Either::Left(self.inner.call(request));
        };
        // Borrowed from the record: a fresh hit copies nothing of the route.
        let Some(cache_route) = &route.cache else {
            return Either::Left(self.inner.call(request));
        };
        let upstream = route.upstream.index;
        let credential = record
            .authenticated()
            .and_then(|auth| auth.team.credential_id_for(&route.upstream));
        let public_read = record.is_public_read();
        match cache_route {
            CacheRoute::Write { scopes, from_body } => {
                let (Some(credential), Some(authenticated)) = (credential, record.authenticated())
                else {
                    return Either::Left(self.inner.call(request));
                };
                let team = Arc::clone(&authenticated.team);
                let (mut scopes, from_body) = (scopes.clone(), from_body.clone());
                let store = Arc::clone(&self.store);
                let inner = self.take_ready_inner();
                let partition = Partition::Team {
                    upstream,
                    credential,
                };
                let metrics = Arc::clone(&self.metrics);
                let fanout = self.fanout.clone();
                let upstream_name = Arc::clone(&route.upstream);
                Either::Right(Either::Right(Box::pin(async move {
                    let request = if from_body.is_empty() {
                        request
                    } else {
                        let (request, body_scopes) = scopes_from_body(request, &from_body).await;
                        scopes.extend(body_scopes);
                        request
                    };
                    let response = inner.oneshot(request).await?;
                    // Before the client sees the 2xx: any later read misses these scopes.
                    if response.status().is_success() {
                        store.invalidate(partition, &scopes);
                        for scope in &scopes {
                            metrics.cache_invalidated(&upstream_name.name, &scope.family);
                        }
                        tracing::debug!(scopes = scopes.len(), "write invalidated cache scopes");
                        // Also before the client sees it: by then the other
                        // instances have been sent the invalidation.
                        if let Some(fanout) = fanout {
                            fanout
                                .publish(Invalidation::Scopes {
                                    partition,
                                    scopes: &scopes,
                                    team: &team.name,
                                })
                                .await;
                        }
                    }
                    Ok(response)
                })))
            }
            CacheRoute::Read { rule, scope } => {
                let rule = &route.upstream.cache.reads[*rule];
                let lifetimes = Lifetimes {
                    ttl: rule.ttl,
                    stale_while_revalidate: rule.stale_while_revalidate,
                    stale_if_error: rule.stale_if_error,
                };
                let partition = match (rule.shared || public_read, credential) {
                    // Shared rules, and public reads (identical for everyone by definition).
                    (true, _) => Partition::Shared { upstream },
                    (false, Some(credential)) => Partition::Team {
                        upstream,
                        credential,
                    },
                    (false, None) => return Either::Left(self.inner.call(request)),
                };
                // One exact-size allocation: the key's own copy of path and query.
                let path = route.upstream_path(request.uri().path());
                let query = request.uri().query();
                let mut target =
                    String::with_capacity(path.len() + query.map_or(0, |q| q.len() + 1));
                target.push_str(path);
                if let Some(query) = query {
                    target.push('?');
                    target.push_str(query);
                }
                let key = CacheKey::new(partition, target, request.headers());
                if let Some(hit) = fresh_hit(&self.store, &request, &key, scope) {
                    let _ = record.cache.set(CACHE_HIT);
                    // The answer reuses the request's extension map, emptied,
                    // instead of allocating its own for the stored fields: a
                    // table and a box fewer per hit.
                    let mut request = request;
                    let response = hit.answer(std::mem::take(request.extensions_mut()));
                    return Either::Right(Either::Left(ready(Ok(response))));
                }
                let scope = scope.clone();
                let store = Arc::clone(&self.store);
                let inner = self.take_ready_inner();
                let span = tracing::debug_span!("cache.lookup", scope = %scope.family);
                let answered = Arc::clone(record);
                let read = read(store, inner, request, key, scope, lifetimes);
                Either::Right(Either::Right(Box::pin(
                    async move {
                        let response = read.await?;
                        // What the read path answered (the `Cache-Status`
                        // member it added) goes into the request's record, as
                        // a hit does.
                        let status = cache_status::own(response.headers());
                        let _ = answered.cache.set(cache_label(status));
                        Ok(response)
                    }
                    .instrument(span),
                )))
            }
        }
    }
}

impl<S: Clone> CacheService<S> {
    /// The ready service, for a future to call later; `self` keeps a fresh
    /// clone, which `poll_ready` readies next (tower's contract).
    fn take_ready_inner(&mut self) -> S {
        let fresh = self.inner.clone();
        std::mem::replace(&mut self.inner, fresh)
    }
}

/// A fresh entry found for a request, with what its answer needs from the
/// request (owned, so the request can give up its extension map to be
/// reused).
struct FreshHit {
    entry: Arc<CachedResponse>,
    head_only: bool,
    condition: Option<HeaderValue>,
    /// Seconds of freshness left, for `Cache-Status`.
    left: u64,
    age: Duration,
}

impl FreshHit {
    fn answer(self, extensions: Extensions) -> Response<Body> {
        respond(
            &self.entry,
            self.head_only,
            self.condition.as_ref(),
            cache_status::hit(self.left),
            Some(self.age),
            extensions,
        )
    }
}

/// Finds a fresh entry to answer a request with on the spot, or says there
/// is none.
///
/// Most reads are fresh hits; answering them in `call` spares each one the
/// boxed `read` future (sized for the fill path, allocated and copied per
/// request). Everything else — stale entries, misses, bypass and refresh —
/// goes through `read`, which checks the entry again.
fn fresh_hit(
    store: &Store,
    request: &Request<Body>,
    key: &CacheKey,
    scope: &Scope,
) -> Option<FreshHit> {
    if request_mode(request.headers()) != RequestMode::Normal {
        return None;
    }
    let entry = store.get(key, scope)?;
    let now = Instant::now();
    let Freshness::Fresh(left) = entry.freshness(now) else {
        return None;
    };
    Some(FreshHit {
        age: entry.age(now),
        entry,
        head_only: request.method() == Method::HEAD,
        condition: crate::wire::rare_field(request.headers(), &header::IF_NONE_MATCH).cloned(),
        left,
    })
}

/// The most of a write's body read to find the scopes it names.
const BODY_SCOPE_LIMIT: usize = 64 * 1024;

/// Reads the (small, JSON) body of a write whose rule names scopes from it,
/// and returns the request with the same bytes to forward. A body that is
/// too big, unreadable or not as expected invalidates the whole family.
async fn scopes_from_body(
    request: Request<Body>,
    from_body: &[BodyScope],
) -> (Request<Body>, Vec<Scope>) {
    let (parts, body) = request.into_parts();
    let declared_small = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<usize>().ok())
        .is_none_or(|length| length <= BODY_SCOPE_LIMIT);
    let (body, bytes) = if declared_small {
        match collect_capped(body, BODY_SCOPE_LIMIT).await {
            Collected::Complete(bytes) => (Body::full(bytes.clone()), Some(bytes)),
            Collected::TooBig(body) => (body, None),
            // The client's body broke off: forwarding fails on its own; invalidate broadly.
            Collected::Failed => (Body::Empty, None),
        }
    } else {
        (body, None)
    };
    let scopes = from_body
        .iter()
        .flat_map(|body_scope| {
            bytes
                .as_deref()
                .and_then(|bytes| body_scope.resolve(bytes))
                .unwrap_or_else(|| vec![body_scope.family()])
        })
        .collect();
    (Request::from_parts(parts, body), scopes)
}

/// The read path; see the module documentation.
async fn read<S>(
    store: Arc<Store>,
    inner: S,
    request: Request<Body>,
    key: CacheKey,
    scope: Scope,
    lifetimes: Lifetimes,
) -> Result<Response<Body>, Infallible>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    let mode = request_mode(request.headers());
    if mode == RequestMode::Bypass {
        let mut response = inner.oneshot(request).await?;
        cache_status::add(response.headers_mut(), cache_status::BYPASS);
        return Ok(response);
    }
    let head_only = request.method() == Method::HEAD;
    let condition = request.headers().get(header::IF_NONE_MATCH).cloned();
    let answer = |entry: &CachedResponse, status: HeaderValue, with_age: bool| {
        respond(
            entry,
            head_only,
            condition.as_ref(),
            status,
            with_age.then(|| entry.age(Instant::now())),
            Extensions::new(),
        )
    };

    let mut fallback = None;
    if mode == RequestMode::Normal {
        if let Some(entry) = store.get(&key, &scope) {
            let now = Instant::now();
            match entry.freshness(now) {
                Freshness::Fresh(left) => return Ok(answer(&entry, cache_status::hit(left), true)),
                Freshness::Revalidatable => {
                    refresh_in_background(&store, &inner, &request, &key, &scope, lifetimes);
                    let status = cache_status::stale_while_revalidate(entry.ttl_left(now));
                    return Ok(answer(&entry, status, true));
                }
                Freshness::ErrorFallback => fallback = Some(entry),
                Freshness::Dead => {}
            }
        }
    }

    let stamp = store.stamp(key.partition, &scope);
    match store.join(&key, stamp, mode == RequestMode::Normal) {
        Join::Leader { id, outcome } => {
            let (leader, led) = oneshot::channel();
            let fill = fill(
                Arc::clone(&store),
                inner,
                fill_request(&request),
                key,
                scope,
                lifetimes,
                stamp,
                id,
                outcome,
                Some(leader),
            );
            tokio::spawn(fill.instrument(tracing::debug_span!("cache.fill")));
            let (stored_status, unstored_status) = match mode {
                RequestMode::Refresh => (cache_status::REFRESH_STORED, cache_status::REFRESH),
                _ => (cache_status::MISS_STORED, cache_status::MISS),
            };
            Ok(match led.await {
                Ok(LeaderOutcome::Shared { response, stored }) => {
                    if let Some(stale) = usable_fallback(&response, fallback.as_deref()) {
                        answer(
                            stale,
                            cache_status::stale_if_error(
                                stale.ttl_left(Instant::now()),
                                response.status.as_u16(),
                            ),
                            true,
                        )
                    } else {
                        answer(
                            &response,
                            if stored {
                                stored_status
                            } else {
                                unstored_status
                            },
                            false,
                        )
                    }
                }
                Ok(LeaderOutcome::Streamed(mut response)) => {
                    cache_status::add(response.headers_mut(), cache_status::MISS);
                    response
                }
                Err(_) => GatewayError::Internal
                    .into_response(crate::error::shape_of(&request), RequestId::of(&request)),
            })
        }
        Join::Waiter(mut outcome, _ticket) => {
            let shared = loop {
                if let Some(done) = outcome.borrow_and_update().clone() {
                    break Some(done);
                }
                if outcome.changed().await.is_err() {
                    break None;
                }
            };
            match shared {
                Some(Outcome::Shared { response, .. }) => {
                    if let Some(stale) = usable_fallback(&response, fallback.as_deref()) {
                        let status = cache_status::stale_if_error(
                            stale.ttl_left(Instant::now()),
                            response.status.as_u16(),
                        );
                        return Ok(answer(stale, status, true));
                    }
                    Ok(answer(&response, cache_status::COLLAPSED, false))
                }
                // Too big to share, or the fill died: go upstream alone.
                Some(Outcome::Refetch) | None => {
                    let mut response = inner.oneshot(request).await?;
                    cache_status::add(response.headers_mut(), cache_status::MISS);
                    Ok(response)
                }
            }
        }
    }
}

/// The stale entry to serve instead of a failed fill, if the rule allows it.
fn usable_fallback<'a>(
    fresh: &CachedResponse,
    fallback: Option<&'a CachedResponse>,
) -> Option<&'a CachedResponse> {
    fallback.filter(|stale| {
        fresh.status.is_server_error() && stale.freshness(Instant::now()) != Freshness::Dead
    })
}

/// Starts a background fill for `key` unless one is already running.
fn refresh_in_background<S>(
    store: &Arc<Store>,
    inner: &S,
    request: &Request<Body>,
    key: &CacheKey,
    scope: &Scope,
    lifetimes: Lifetimes,
) where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    let stamp = store.stamp(key.partition, scope);
    if let Join::Leader { id, outcome } = store.join(key, stamp, true) {
        let fill = fill(
            Arc::clone(store),
            inner.clone(),
            fill_request(request),
            key.clone(),
            scope.clone(),
            lifetimes,
            stamp,
            id,
            outcome,
            None,
        );
        tokio::spawn(fill.instrument(tracing::debug_span!("cache.fill", background = true)));
    }
}

/// What the client that started a fill gets.
enum LeaderOutcome {
    Shared {
        response: Arc<CachedResponse>,
        stored: bool,
    },
    Streamed(Response<Body>),
}

/// One upstream fetch for a key, shared by everyone waiting on it.
#[allow(clippy::too_many_arguments)]
async fn fill<S>(
    store: Arc<Store>,
    inner: S,
    request: Request<Body>,
    key: CacheKey,
    scope: Scope,
    lifetimes: Lifetimes,
    stamp: super::store::Stamp,
    id: u64,
    outcome: watch::Sender<Option<Outcome>>,
    leader: Option<oneshot::Sender<LeaderOutcome>>,
) where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    let request_id = RequestId::of(&request).map(str::to_owned);
    let shape = crate::error::shape_of(&request);
    let Ok(response) = inner.oneshot(request).await;
    let (parts, body) = response.into_parts();
    let declared_length = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<usize>().ok());
    let collected = if declared_length.is_some_and(|length| length > store.max_entry_bytes) {
        Collected::TooBig(body)
    } else {
        collect_capped(body, store.max_entry_bytes).await
    };
    match collected {
        Collected::Complete(bytes) => {
            let cacheable = storable(parts.status, &parts.headers).is_ok();
            let mut headers = owned_headers(&parts.headers);
            let prior_cache_status = take_all(&mut headers, &CACHE_STATUS);
            let etag = match headers.get(header::ETAG) {
                Some(etag) => Some(etag.clone()),
                None if cacheable => {
                    let etag = strong_etag(&bytes);
                    headers.insert(header::ETAG, etag.clone());
                    Some(etag)
                }
                None => None,
            };
            let response = Arc::new(CachedResponse {
                status: parts.status,
                fields: Arc::new(EncodedFields::new(headers)),
                prior_cache_status,
                body: bytes,
                etag,
                stored_at: Instant::now(),
                ttl: lifetimes.ttl,
                stale_while_revalidate: lifetimes.stale_while_revalidate,
                stale_if_error: lifetimes.stale_if_error,
                stamp,
                state: EntryState::default(),
            });
            let stored = cacheable && store.insert(key.clone(), &scope, Arc::clone(&response));
            outcome.send_replace(Some(Outcome::Shared {
                response: Arc::clone(&response),
                stored,
            }));
            if let Some(leader) = leader {
                let _ = leader.send(LeaderOutcome::Shared { response, stored });
            }
        }
        Collected::TooBig(body) => {
            outcome.send_replace(Some(Outcome::Refetch));
            if let Some(leader) = leader {
                let _ = leader.send(LeaderOutcome::Streamed(Response::from_parts(parts, body)));
            }
        }
        Collected::Failed => {
            // The upstream broke off mid-body: every waiter gets the gateway's 502.
            let error = GatewayError::UpstreamReset;
            let mut headers = http::HeaderMap::new();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            let response = Arc::new(CachedResponse {
                status: error.status(),
                fields: Arc::new(EncodedFields::new(headers)),
                prior_cache_status: Box::default(),
                body: error.json_body(shape, request_id.as_deref()),
                etag: None,
                stored_at: Instant::now(),
                ttl: Duration::ZERO,
                stale_while_revalidate: Duration::ZERO,
                stale_if_error: Duration::ZERO,
                stamp,
                state: EntryState::default(),
            });
            outcome.send_replace(Some(Outcome::Shared {
                response: Arc::clone(&response),
                stored: false,
            }));
            if let Some(leader) = leader {
                let _ = leader.send(LeaderOutcome::Shared {
                    response,
                    stored: false,
                });
            }
        }
    }
    store.finish(&key, id);
}

enum Collected {
    Complete(Bytes),
    /// Over the per-entry cap: what was read so far, chained to the rest.
    TooBig(Body),
    Failed,
}

async fn collect_capped(mut body: Body, cap: usize) -> Collected {
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut total = 0usize;
    loop {
        match body.frame().await {
            None => break,
            Some(Err(_)) => return Collected::Failed,
            Some(Ok(frame)) => {
                // Trailers are not stored; Comfy's JSON answers carry none.
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                total += data.len();
                chunks.push(data);
                if total > cap {
                    return Collected::TooBig(Body::Chained {
                        head: Some(concat(chunks)),
                        tail: Box::new(body),
                    });
                }
            }
        }
    }
    Collected::Complete(concat(chunks))
}

/// The headers with values in their own allocations. hyper's values are
/// slices of the connection's read buffer; stored as they are, every cache
/// entry would keep a whole read buffer alive (measured: RSS 2.7x the bytes
/// cached, in benches/load.sh).
fn owned_headers(headers: &http::HeaderMap) -> http::HeaderMap {
    let mut owned = http::HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        owned.append(name.clone(), super::policy::owned_value(value));
    }
    owned
}

/// Every value of `name`, taken out of `headers`.
fn take_all(headers: &mut HeaderMap, name: &HeaderName) -> Box<[HeaderValue]> {
    match headers.entry(name) {
        header::Entry::Occupied(entry) => entry.remove_entry_mult().1.collect(),
        header::Entry::Vacant(_) => Box::default(),
    }
}

/// One exact-size buffer for the stored body. A single chunk is copied too:
/// it is usually a slice of the connection's much larger read buffer, which
/// the cache would otherwise keep alive for the entry's whole life.
fn concat(chunks: Vec<Bytes>) -> Bytes {
    match chunks.len() {
        0 => Bytes::new(),
        1 => Bytes::copy_from_slice(&chunks[0]),
        _ => {
            let mut joined = BytesMut::with_capacity(chunks.iter().map(Bytes::len).sum());
            for chunk in chunks {
                joined.extend_from_slice(&chunk);
            }
            joined.freeze()
        }
    }
}

/// The leading client's fields a fill carries: the ones the key holds, the
/// client's `Authorization` (a public read goes upstream with its own token;
/// for a team `auth::inject` puts the team's credential in its place, as it
/// does for every request) and `User-Agent`. Nothing else: the stored answer
/// is every member's, so it may depend only on what its key says (the first
/// cache invariant) — one member's `X-Forwarded-Host`, `Forwarded`,
/// `X-Original-URL`, cookie or language must not shape what the others are
/// served (web cache poisoning). What the layers below add themselves
/// (`Host`, `X-Request-Id`, `X-Forwarded-*`, `Via`, trace context) they add
/// to fills too.
const FILL_FIELDS: [HeaderName; 4] = [
    header::ACCEPT,
    header::ACCEPT_ENCODING,
    header::AUTHORIZATION,
    header::USER_AGENT,
];

/// The request a fill sends: a plain `GET` for the same target,
/// unconditional (so the upstream answers in full), with the leading
/// client's [`FILL_FIELDS`] only.
fn fill_request(request: &Request<Body>) -> Request<Body> {
    let mut fill = Request::new(Body::Empty);
    *fill.method_mut() = Method::GET;
    *fill.uri_mut() = request.uri().clone();
    *fill.version_mut() = request.version();
    let headers = fill.headers_mut();
    for name in &FILL_FIELDS {
        for value in request.headers().get_all(name) {
            headers.append(name, value.clone());
        }
    }
    // The leader's record: the fill goes upstream on the leader's route, as
    // its team, with its client address and request id, and the leader's
    // access line reports the fill's upstream status.
    if let Some(record) = request.extensions().get::<Arc<RequestRecord>>() {
        fill.extensions_mut().insert(Arc::clone(record));
    }
    fill
}

/// An answer from a complete response: `304` if the client's `If-None-Match`
/// matches, headers only for `HEAD`, the body otherwise. Its extensions go
/// in `extensions` emptied first: on a fresh hit the request's map, whose
/// allocation is reused, and none of whose values belong in an answer.
fn respond(
    entry: &CachedResponse,
    head_only: bool,
    condition: Option<&HeaderValue>,
    status: HeaderValue,
    age: Option<Duration>,
    mut extensions: Extensions,
) -> Response<Body> {
    extensions.clear();
    let not_modified = entry.status == StatusCode::OK
        && matches!((condition, &entry.etag), (Some(condition), Some(etag)) if if_none_match(condition, etag));
    let mut response = if not_modified {
        let mut response = Response::new(Body::Empty);
        *response.status_mut() = StatusCode::NOT_MODIFIED;
        *response.extensions_mut() = extensions;
        // RFC 9110 §15.4.5: the fields a 200 would have carried that describe the representation.
        for name in [
            header::ETAG,
            header::CACHE_CONTROL,
            header::VARY,
            header::DATE,
            header::EXPIRES,
            header::CONTENT_LOCATION,
        ] {
            for value in entry.headers().get_all(&name) {
                response.headers_mut().append(name.clone(), value.clone());
            }
        }
        response
    } else {
        let body = if head_only {
            Body::Empty
        } else {
            Body::Full(Some(entry.body.clone()))
        };
        // The stored fields are shared, not copied; only this answer's own
        // fields go in its map (see `crate::fields`).
        let mut response = Response::new(body);
        *response.status_mut() = entry.status;
        *response.headers_mut() = HeaderMap::with_capacity(4);
        *response.extensions_mut() = extensions;
        response
            .extensions_mut()
            .insert(SharedFields(Arc::clone(&entry.fields)));
        response
    };
    let headers = response.headers_mut();
    // The upstream's members as they came, then the gateway's.
    for member in &entry.prior_cache_status {
        headers.append(&CACHE_STATUS, member.clone());
    }
    cache_status::add(headers, status);
    if let Some(age) = age {
        headers.insert(header::AGE, cache_status::age(age.as_secs()));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::store::Stamp;

    fn entry() -> Arc<CachedResponse> {
        let mut fields = HeaderMap::new();
        fields.insert(header::ETAG, HeaderValue::from_static("\"v1\""));
        Arc::new(CachedResponse {
            status: StatusCode::OK,
            fields: Arc::new(EncodedFields::new(fields)),
            prior_cache_status: Box::default(),
            body: Bytes::from_static(b"[]"),
            etag: Some(HeaderValue::from_static("\"v1\"")),
            stored_at: Instant::now(),
            ttl: Duration::from_secs(30),
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            stamp: Stamp::test_value(),
            state: EntryState::default(),
        })
    }

    /// A fresh hit's answer reuses the request's extension map emptied: none
    /// of the request's values reaches the answer, the stored fields do (for
    /// a 200; a 304 carries its fields in its own map).
    #[test]
    fn a_fresh_hit_answer_carries_none_of_the_requests_extensions() {
        #[derive(Debug, Clone, PartialEq)]
        struct Carried(u32);
        for condition in [None, Some(HeaderValue::from_static("\"v1\""))] {
            let not_modified = condition.is_some();
            let mut extensions = Extensions::new();
            extensions.insert(Carried(7));
            let hit = FreshHit {
                entry: entry(),
                head_only: false,
                condition,
                left: 30,
                age: Duration::ZERO,
            };
            let answer = hit.answer(extensions);
            assert_eq!(answer.extensions().get::<Carried>(), None);
            if not_modified {
                assert_eq!(answer.status(), StatusCode::NOT_MODIFIED);
                assert_eq!(answer.headers()[header::ETAG], "\"v1\"");
            } else {
                assert_eq!(answer.status(), StatusCode::OK);
                let SharedFields(shared) = answer.extensions().get().expect("the stored fields");
                assert_eq!(shared.map()[header::ETAG], "\"v1\"");
            }
            assert!(answer.headers().contains_key(&CACHE_STATUS));
            assert_eq!(answer.headers()[header::AGE], "0");
        }
    }
}
