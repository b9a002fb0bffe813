//! The quota layers.
//!
//! [`ClientQuota`] sits after authentication and before the cache: the team's
//! client quota, the key's own quota and any route quota apply to every
//! request, cache hits included. [`UpstreamBudget`] sits after the cache:
//! only requests that really go upstream (misses, fills, pass-through,
//! writes) spend the team's upstream rate and in-flight slots, and an
//! upstream 429 with `Retry-After` pauses the team's budget instead of
//! sending more.
//!
//! Refusals are 429 with `Retry-After`, `RateLimit-Policy`, `RateLimit` and
//! the upstream's error shape. Admitted requests carry the `RateLimit`
//! headers of the tightest quota that applied.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use futures_util::future::{Either, Ready, ready};
use http::header::{HeaderName, HeaderValue, RETRY_AFTER};
use http::{Request, Response, StatusCode};
use pin_project_lite::pin_project;
use tower::{Layer, Service, ServiceExt};

use super::Quotas;
use super::quota::{Denial, Snapshot, Verdict, policy_header, state_header};
use crate::body::Body;
use crate::error::{ErrorShape, GatewayError};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::{RequestId, RequestRecord};

pub static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
pub static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// The 429 the gateway answers for `denial`.
pub fn too_many_requests(
    denial: &Denial,
    shape: ErrorShape,
    request_id: Option<&str>,
    metrics: &Metrics,
    team: &str,
) -> Response<Body> {
    metrics.rate_limited(team, &denial.name);
    let mut response = GatewayError::RateLimited.into_response(shape, request_id);
    let retry_after = denial.retry_after_secs();
    let headers = response.headers_mut();
    headers.insert(RETRY_AFTER, HeaderValue::from(retry_after));
    if let Some(spec) = &denial.spec {
        headers.insert(&RATELIMIT_POLICY, policy_header(&denial.name, spec));
        headers.insert(&RATELIMIT, state_header(&denial.name, 0, retry_after));
    }
    tracing::info!(quota = %denial.name, retry_after, "request refused by a quota");
    response
}

/// Tower layer for [`ClientQuota`].
#[derive(Debug, Clone)]
pub struct ClientQuotaLayer {
    quotas: Arc<Quotas>,
    metrics: Arc<Metrics>,
}

impl ClientQuotaLayer {
    pub fn new(quotas: Arc<Quotas>, metrics: Arc<Metrics>) -> Self {
        ClientQuotaLayer { quotas, metrics }
    }
}

impl<S> Layer<S> for ClientQuotaLayer {
    type Service = ClientQuota<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ClientQuota {
            quotas: Arc::clone(&self.quotas),
            metrics: Arc::clone(&self.metrics),
            inner,
        }
    }
}

/// Team, key and route quotas on every request.
#[derive(Debug, Clone)]
pub struct ClientQuota<S> {
    quotas: Arc<Quotas>,
    metrics: Arc<Metrics>,
    inner: S,
}

/// Keeps the snapshot with the fewest permits left.
fn tighter(current: Option<Snapshot>, candidate: Snapshot) -> Option<Snapshot> {
    match current {
        Some(current) if current.remaining <= candidate.remaining => Some(current),
        _ => Some(candidate),
    }
}

/// The admitted request's quota state, for the answer's `RateLimit` headers.
/// The upstream budget attaches its own to the response; the tighter wins.
#[derive(Debug, Clone)]
struct UpstreamSnapshot(Snapshot);

impl<S> Service<Request<Body>> for ClientQuota<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Either<Ready<Result<Response<Body>, Infallible>>, ClientQuotaFuture<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let record = RequestRecord::of(&request);
        let (Some(auth), Some(route)) = (
            record.and_then(RequestRecord::authenticated),
            record.and_then(RequestRecord::route),
        ) else {
            return Either::Right(ClientQuotaFuture {
                inner: self.inner.call(request),
                tightest: None,
            });
        };
        let Some(team) = self.quotas.team(&auth.team.name) else {
            return Either::Right(ClientQuotaFuture {
                inner: self.inner.call(request),
                tightest: None,
            });
        };
        let path = route.upstream_path(request.uri().path());
        let routes = team.routes.iter().filter(|route_limit| {
            let rule = &route_limit.rule;
            rule.methods.matches(request.method())
                && rule.pattern.matches(path)
                && rule
                    .upstream
                    .as_ref()
                    .is_none_or(|name| *name == route.upstream.name)
        });
        let checks = team
            .per_key
            .iter()
            .map(|built| (&built.limit, Some(&auth.key)))
            .chain(routes.map(|route_limit| (&route_limit.limit, None)))
            .chain(team.client.iter().map(|built| (&built.limit, None)));
        let mut tightest = None;
        for (limit, key) in checks {
            match limit.check(key) {
                Verdict::Allowed(snapshot) => tightest = tighter(tightest, snapshot),
                Verdict::Denied(denial) => {
                    let response = too_many_requests(
                        &denial,
                        crate::error::shape_of(&request),
                        RequestId::of(&request),
                        &self.metrics,
                        &auth.team.name,
                    );
                    return Either::Left(ready(Ok(response)));
                }
            }
        }
        Either::Right(ClientQuotaFuture {
            inner: self.inner.call(request),
            tightest,
        })
    }
}

pin_project! {
    /// Adds the `RateLimit` headers of the tightest quota to the answer.
    pub struct ClientQuotaFuture<F> {
        #[pin]
        inner: F,
        tightest: Option<Snapshot>,
    }
}

impl<F> Future for ClientQuotaFuture<F>
where
    F: Future<Output = Result<Response<Body>, Infallible>>,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(mut response) = std::task::ready!(this.inner.poll(cx));
        let upstream = response.extensions_mut().remove::<UpstreamSnapshot>();
        let mut tightest = this.tightest.take();
        if let Some(UpstreamSnapshot(snapshot)) = upstream {
            tightest = tighter(tightest, snapshot);
        }
        // A refusal from below already carries its own headers.
        if let Some(snapshot) =
            tightest.filter(|_| !crate::fields::has_field(&response, &RATELIMIT))
        {
            let headers = response.headers_mut();
            headers.insert(
                &RATELIMIT_POLICY,
                policy_header(&snapshot.name, &snapshot.spec),
            );
            headers.insert(
                &RATELIMIT,
                state_header(&snapshot.name, snapshot.remaining, snapshot.reset_secs),
            );
        }
        Poll::Ready(Ok(response))
    }
}

/// Tower layer for [`UpstreamBudget`].
#[derive(Debug, Clone)]
pub struct UpstreamBudgetLayer {
    quotas: Arc<Quotas>,
    metrics: Arc<Metrics>,
}

impl UpstreamBudgetLayer {
    pub fn new(quotas: Arc<Quotas>, metrics: Arc<Metrics>) -> Self {
        UpstreamBudgetLayer { quotas, metrics }
    }
}

impl<S> Layer<S> for UpstreamBudgetLayer {
    type Service = UpstreamBudget<S>;

    fn layer(&self, inner: S) -> Self::Service {
        UpstreamBudget {
            quotas: Arc::clone(&self.quotas),
            metrics: Arc::clone(&self.metrics),
            inner,
        }
    }
}

/// The team's upstream rate, in-flight cap and 429 pause.
#[derive(Debug, Clone)]
pub struct UpstreamBudget<S> {
    quotas: Arc<Quotas>,
    metrics: Arc<Metrics>,
    inner: S,
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

impl<S> Service<Request<Body>> for UpstreamBudget<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Either<S::Future, Either<WatchFor429<S::Future>, BoxFuture>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let record = RequestRecord::of(&request);
        let budget = match (
            record.and_then(RequestRecord::authenticated),
            record.and_then(RequestRecord::route),
        ) {
            (Some(auth), Some(route)) => self
                .quotas
                .team(&auth.team.name)
                .and_then(|team| team.upstream.get(route.upstream.index))
                .map(|budget| (Arc::clone(budget), Arc::clone(&auth.team))),
            _ => None,
        };
        let Some((budget, team)) = budget else {
            return Either::Left(self.inner.call(request));
        };
        let settings = self.quotas.settings;
        // No rate and no in-flight cap (the usual budget) and not paused:
        // nothing to wait for before the call, only an upstream 429 to look
        // at after it, so the inner service is called in place — no boxed
        // future, no service clone. A pause that starts meanwhile applies
        // from the next request, as it does for requests already waiting.
        if budget.rate.is_none() && budget.in_flight.is_none() && budget.paused_for().is_none() {
            return Either::Right(Either::Left(WatchFor429 {
                inner: self.inner.call(request),
                budget,
                settings,
            }));
        }
        let metrics = Arc::clone(&self.metrics);
        let inner = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, inner);
        Either::Right(Either::Right(Box::pin(async move {
            let shape = crate::error::shape_of(&request);
            let refuse = |denial: Denial| {
                Ok(too_many_requests(
                    &denial,
                    shape,
                    RequestId::of(&request),
                    &metrics,
                    &team.name,
                ))
            };
            if let Some(left) = budget.paused_for() {
                return refuse(Denial {
                    name: "upstream".into(),
                    spec: None,
                    retry_after: left,
                });
            }
            let snapshot = match budget.rate.as_ref().map(|rate| rate.check(None)) {
                Some(Verdict::Denied(denial)) => return refuse(denial),
                Some(Verdict::Allowed(snapshot)) => Some(snapshot),
                None => None,
            };
            // Held until the upstream's answer arrives (headers), then released.
            let _slot = match &budget.in_flight {
                None => None,
                Some(slots) => {
                    let wait = budget.limits.queue_timeout;
                    match tokio::time::timeout(wait, Arc::clone(slots).acquire_owned()).await {
                        Ok(Ok(slot)) => Some(slot),
                        _ => {
                            return refuse(Denial {
                                name: "upstream_in_flight".into(),
                                spec: None,
                                retry_after: Duration::from_secs(1),
                            });
                        }
                    }
                }
            };
            let Ok(mut response) = inner.oneshot(request).await;
            pause_on_upstream_429(&budget, settings, &response);
            if let Some(snapshot) = snapshot {
                response.extensions_mut().insert(UpstreamSnapshot(snapshot));
            }
            Ok(response)
        })))
    }
}

pin_project! {
    /// The upstream call of a budget with no rate or in-flight cap: the
    /// answer passes as it is, and a 429 pauses the budget.
    pub struct WatchFor429<F> {
        #[pin]
        inner: F,
        budget: Arc<super::UpstreamBudget>,
        settings: crate::config::LimitSettings,
    }
}

impl<F> Future for WatchFor429<F>
where
    F: Future<Output = Result<Response<Body>, Infallible>>,
{
    type Output = Result<Response<Body>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(response) = std::task::ready!(this.inner.poll(cx));
        pause_on_upstream_429(this.budget, *this.settings, &response);
        Poll::Ready(Ok(response))
    }
}

/// An upstream 429 with `Retry-After` pauses the team's budget for that
/// long (at most `max_pause`), when the settings say so.
fn pause_on_upstream_429(
    budget: &super::UpstreamBudget,
    settings: crate::config::LimitSettings,
    response: &Response<Body>,
) {
    if response.status() != StatusCode::TOO_MANY_REQUESTS || !settings.pause_on_upstream_429 {
        return;
    }
    if let Some(wait) = retry_after(response.headers().get(RETRY_AFTER)) {
        let wait = wait.min(settings.max_pause);
        budget.pause(wait);
        tracing::warn!(pause = ?wait, "upstream answered 429: pausing this team's upstream budget");
    }
}

/// `Retry-After` as delay-seconds or an HTTP-date (RFC 9110 §10.2.3).
fn retry_after(value: Option<&HeaderValue>) -> Option<Duration> {
    let value = value?.to_str().ok()?.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(SystemTime::now()).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_accepts_seconds_and_dates() {
        assert_eq!(
            retry_after(Some(&HeaderValue::from_static("7"))),
            Some(Duration::from_secs(7))
        );
        let future = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(120));
        let parsed = retry_after(Some(&HeaderValue::from_str(&future).unwrap())).unwrap();
        assert!(parsed <= Duration::from_secs(120) && parsed >= Duration::from_secs(110));
        assert_eq!(retry_after(Some(&HeaderValue::from_static("soon"))), None);
        assert_eq!(retry_after(None), None);
    }
}

#[cfg(test)]
mod quota_layer_tests {
    use super::*;
    use crate::auth::{Authenticated, Caller};
    use crate::config::{self, Config};
    use crate::route::Router;

    const KEY: &str = "tg_unit_test_key";

    fn config(limits: &str) -> Arc<Config> {
        Arc::new(config::for_tests(
            KEY,
            &format!("[teams.design.limits]\n{limits}"),
        ))
    }

    /// A request as it looks after classification and authentication.
    fn request(config: &Config, method: Method, path: &str) -> Request<Body> {
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .body(Body::Empty)
            .unwrap();
        let route = Router::new(&config.upstreams).classify(&request).unwrap();
        let entry = config.keys.lookup(KEY).unwrap();
        let record = RequestRecord::attached(&mut request);
        record.route.set(route).unwrap();
        let caller = Caller::Team(Authenticated {
            team: Arc::clone(&entry.owner),
            key: entry.digest,
        });
        record.caller.set(caller).unwrap();
        request
    }

    fn ok_service()
    -> impl Service<Request<Body>, Response = Response<Body>, Error = Infallible, Future: Send>
    + Clone
    + Send
    + 'static {
        tower::service_fn(|_request: Request<Body>| async {
            Ok::<_, Infallible>(Response::new(Body::Empty))
        })
    }

    use http::Method;

    #[tokio::test(start_paused = true)]
    async fn the_next_request_succeeds_at_the_moment_retry_after_names() {
        let config = config(r#"client = { rate = "10/m", burst = 2 }"#);
        let quotas = Arc::new(Quotas::new(&config));
        let service =
            ClientQuotaLayer::new(Arc::clone(&quotas), Arc::default()).layer(ok_service());
        let call = |service: ClientQuota<_>| async {
            service
                .oneshot(request(&config, Method::GET, "/api/jobs"))
                .await
                .unwrap()
        };
        assert_eq!(call(service.clone()).await.status(), StatusCode::OK);
        assert_eq!(call(service.clone()).await.status(), StatusCode::OK);
        let refused = call(service.clone()).await;
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        let retry_after: u64 = refused.headers()[RETRY_AFTER]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(retry_after, 6, "one permit per 6 s at 10/m");

        tokio::time::advance(Duration::from_secs(retry_after) - Duration::from_millis(1)).await;
        assert_eq!(
            call(service.clone()).await.status(),
            StatusCode::TOO_MANY_REQUESTS,
            "not a moment early"
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(
            call(service.clone()).await.status(),
            StatusCode::OK,
            "exactly on time"
        );
    }

    /// Both ways through the budget: the in-place call of a budget with no
    /// rate or cap, and the boxed one that waits for a permit first.
    #[tokio::test(start_paused = true)]
    async fn the_upstream_pause_ends_when_retry_after_said() {
        for limits in ["", r#"upstream = { rate = "1000/h", burst = 100 }"#] {
            upstream_pause_ends_when_retry_after_said(limits).await;
        }
    }

    async fn upstream_pause_ends_when_retry_after_said(limits: &str) {
        let config = config(limits);
        let quotas = Arc::new(Quotas::new(&config));
        let throttled = tower::service_fn(|_request: Request<Body>| async {
            let mut response = Response::new(Body::Empty);
            *response.status_mut() = StatusCode::TOO_MANY_REQUESTS;
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("30"));
            Ok::<_, Infallible>(response)
        });
        let service =
            UpstreamBudgetLayer::new(Arc::clone(&quotas), Arc::default()).layer(throttled);
        let first = service
            .clone()
            .oneshot(request(&config, Method::GET, "/api/jobs"))
            .await
            .unwrap();
        assert_eq!(first.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(
            !first.headers().contains_key(&RATELIMIT),
            "the upstream's own 429, untouched"
        );

        let paused =
            UpstreamBudgetLayer::new(Arc::clone(&quotas), Arc::default()).layer(ok_service());
        let refused = paused
            .clone()
            .oneshot(request(&config, Method::GET, "/api/jobs"))
            .await
            .unwrap();
        assert_eq!(refused.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(refused.headers()[RETRY_AFTER], "30");
        tokio::time::advance(Duration::from_secs(29)).await;
        let still = paused
            .clone()
            .oneshot(request(&config, Method::GET, "/api/jobs"))
            .await
            .unwrap();
        assert_eq!(still.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(still.headers()[RETRY_AFTER], "1");
        tokio::time::advance(Duration::from_secs(1)).await;
        let after = paused
            .oneshot(request(&config, Method::GET, "/api/jobs"))
            .await
            .unwrap();
        assert_eq!(after.status(), StatusCode::OK);
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_keeps_the_state_of_teams_whose_limits_did_not_change() {
        let load = |design: &str, research: &str| {
            config::for_tests(
                KEY,
                &format!(
                    r#"
[teams.design.limits]
client = {{ rate = "{design}", burst = 1 }}
[teams.research]
upstream_keys = {{ comfy = "env:K" }}
[teams.research.limits]
client = {{ rate = "{research}", burst = 1 }}
"#
                ),
            )
        };
        let before = load("1/h", "1/h");
        let quotas = Quotas::new(&before);
        let drain = |quotas: &Quotas, team: &str| {
            quotas
                .team(team)
                .unwrap()
                .client
                .as_ref()
                .unwrap()
                .limit
                .check(None)
        };
        assert!(matches!(drain(&quotas, "design"), Verdict::Allowed(_)));
        assert!(matches!(drain(&quotas, "research"), Verdict::Allowed(_)));

        // Only research's limit changes.
        let reloaded = quotas.rebuild(&load("1/h", "2/h"));
        assert!(
            matches!(drain(&reloaded, "design"), Verdict::Denied(_)),
            "design's bucket stays drained"
        );
        assert!(
            matches!(drain(&reloaded, "research"), Verdict::Allowed(_)),
            "research starts afresh"
        );
    }

    #[tokio::test]
    async fn requests_without_a_team_consult_no_limiter() {
        let config = config(r#"per_key = { rate = "1/h", burst = 1 }"#);
        let quotas = Arc::new(Quotas::new(&config));
        let service =
            ClientQuotaLayer::new(Arc::clone(&quotas), Arc::default()).layer(ok_service());
        let anonymous = Request::get("/api/jobs").body(Body::Empty).unwrap();
        let response = service.oneshot(anonymous).await.unwrap();
        assert!(!response.headers().contains_key(&RATELIMIT));
        let team = quotas.team("design").unwrap();
        let per_key = team.per_key.as_ref().unwrap();
        // No key was ever checked, so a first check of any key is admitted with a full bucket.
        let Verdict::Allowed(snapshot) = per_key
            .limit
            .check(Some(&crate::auth::keys::KeyDigest::of_key(KEY)))
        else {
            panic!()
        };
        assert_eq!(snapshot.remaining, 0);
    }
}
