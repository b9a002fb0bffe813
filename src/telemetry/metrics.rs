//! Prometheus metrics: one registry per gateway, served on the admin listener.
//!
//! Every request is counted (requests, latency, cache result, in flight,
//! and the upstream's latency when it went upstream).
//! Those counts are kept per thread shard ([`super::shards`]) as plain
//! numbers — prometheus' local metrics — and added into the registry at each
//! scrape, so workers on different cores do not take turns on the same
//! atomic counters; a scrape always sees every request answered before it.
//!
//! Labels only ever take bounded values: team and upstream names from the
//! config, route classes, methods (unknown ones fold into `OTHER`), status
//! classes, cache results, quota names from the config. Never a raw path, a
//! key or an asset id.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use http::{Method, StatusCode};
use prometheus::core::Collector;
use prometheus::local::{LocalHistogram, LocalIntCounter};
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use super::shards::{self, Sharded, lock};
use crate::config::{Team, Upstream};

/// Latency buckets (seconds): from a cache hit (~100 µs) to a slow upload.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

/// The per-request metrics for one label set, as counted by the threads of
/// one shard: plain counts (prometheus' local metrics), added to the shared
/// ones at each scrape (see [`Metrics::request`]).
#[derive(Debug)]
struct LocalHandles {
    requests: LocalIntCounter,
    duration: LocalHistogram,
    cache: Option<LocalIntCounter>,
    /// The team and upstream whose addresses the entry's [`LabelKey`]
    /// holds, kept alive by the entry: a config reload drops the old
    /// config's teams, and a new team the allocator placed where one of
    /// them was would otherwise find this entry and be counted under the
    /// old team's name.
    _owners: (Option<Arc<Team>>, Option<Arc<Upstream>>),
}

#[derive(Debug, Default)]
struct ShardCounts {
    /// By label set, resolved once per shard: label lookups hash every
    /// label value, which the hot path should not do per request.
    requests: HashMap<LabelKey, LocalHandles, foldhash::fast::RandomState>,
    /// By upstream name.
    upstream_latency: HashMap<Box<str>, LocalHistogram, foldhash::fast::RandomState>,
}

impl ShardCounts {
    fn flush(&self) {
        for handles in self.requests.values() {
            handles.flush();
        }
        for latency in self.upstream_latency.values() {
            latency.flush();
        }
    }
}

impl LocalHandles {
    fn record(&self, seconds: f64) {
        self.requests.inc();
        self.duration.observe(seconds);
        if let Some(cache) = &self.cache {
            cache.inc();
        }
    }

    fn flush(&self) {
        self.requests.flush();
        self.duration.flush();
        if let Some(cache) = &self.cache {
            cache.flush();
        }
    }
}

/// What the threads of one shard counted since the last scrape.
#[derive(Debug, Default)]
struct RequestShard {
    counts: Mutex<ShardCounts>,
    /// Requests that entered here minus those that left here (a request may
    /// leave on another thread, so one shard's figure can be negative).
    in_flight: AtomicI64,
}

/// Identifies a label set without its strings: teams and upstreams by
/// address (each entry keeps its own alive, see [`LocalHandles`]), the
/// rest are `'static`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct LabelKey {
    team: usize,
    upstream: usize,
    route_class: usize,
    method: usize,
    status_class: usize,
    cache: usize,
}

/// Connection-pool counters of one upstream (see [`Metrics::upstream_pool`]).
#[derive(Debug, Clone)]
pub struct UpstreamPoolCounters {
    pub opened: IntCounter,
    pub retried: IntCounter,
}

/// Every metric the gateway exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Per-request counts and the in-flight figure, by thread shard: every
    /// request writes them, so every core writes its own (see
    /// [`super::shards`]). Added into the registry's metrics at each scrape.
    by_thread: Sharded<RequestShard>,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    upstream_duration: HistogramVec,
    in_flight: IntGauge,
    upstream_errors: IntCounterVec,
    upstream_connections: IntCounterVec,
    upstream_retries: IntCounterVec,
    cache_requests: IntCounterVec,
    cache_stores: IntCounter,
    cache_evictions: IntCounter,
    cache_invalidations: IntCounterVec,
    cache_entries: IntGauge,
    cache_bytes: IntGauge,
    ratelimit_rejections: IntCounterVec,
    config_reloads: IntCounterVec,
    cache_fanout: IntCounterVec,
    cache_fanout_subscribed: IntGauge,
    quota_sync: IntCounterVec,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("registered once");
    metric
}

/// A counter with one label, its series for each of `values` there from the
/// start: dashboards and alerts see a 0, not nothing.
fn counter_of_each(
    registry: &Registry,
    name: &str,
    help: &str,
    label: &str,
    values: &[&str],
) -> IntCounterVec {
    let metric = counter(registry, name, help, &[label]);
    for value in values {
        metric.with_label_values(&[*value]);
    }
    metric
}

fn histogram(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let metric = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
        labels,
    )
    .expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("registered once");
    metric
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let metric = IntGauge::new(name, help).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("registered once");
    metric
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let build_info = IntGaugeVec::new(
            Opts::new(
                "teamgate_build_info",
                "Always 1; the labels say which build is running.",
            ),
            &["version"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(build_info.clone()))
            .expect("registered once");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let single = |name: &str, help: &str| {
            let metric = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(metric.clone()))
                .expect("registered once");
            metric
        };
        let config_reloads = counter_of_each(
            &registry,
            "teamgate_config_reloads_total",
            "Config reloads, by result.",
            "result",
            &["success", "failure"],
        );
        let cache_fanout = counter_of_each(
            &registry,
            "teamgate_cache_fanout_total",
            "Cache invalidations shared with the other instances through Redis: published (and confirmed by every instance), unconfirmed, publish_failed, applied (one of theirs).",
            "event",
            &["published", "unconfirmed", "publish_failed", "applied"],
        );
        let quota_sync = counter_of_each(
            &registry,
            "teamgate_quota_sync_total",
            "Rounds of sharing quotas with the other instances through Redis ([shared] redis), by outcome: ok, failed (each instance enforces its quotas alone meanwhile).",
            "outcome",
            &["ok", "failed"],
        );
        Metrics {
            by_thread: Sharded::new(shards::count(), RequestShard::default),
            requests: counter(
                &registry,
                "teamgate_requests_total",
                "Requests answered, by team, upstream, route class, method, status class and cache result.",
                &[
                    "team",
                    "upstream",
                    "route_class",
                    "method",
                    "status_class",
                    "cache",
                ],
            ),
            request_duration: histogram(
                &registry,
                "teamgate_request_duration_seconds",
                "Time from request to response headers, as the client sees it.",
                &["upstream", "route_class", "cache"],
            ),
            upstream_duration: histogram(
                &registry,
                "teamgate_upstream_duration_seconds",
                "Time from sending a request upstream to its response headers.",
                &["upstream"],
            ),
            in_flight: gauge(
                &registry,
                "teamgate_requests_in_flight",
                "Requests being handled now.",
            ),
            upstream_errors: counter(
                &registry,
                "teamgate_upstream_errors_total",
                "Failed upstream requests, by kind: connect, timeout, reset, 5xx.",
                &["upstream", "kind"],
            ),
            upstream_connections: counter(
                &registry,
                "teamgate_upstream_connections_opened_total",
                "Upstream connections opened (TCP, and TLS for https); the rest of the requests reuse pooled ones.",
                &["upstream"],
            ),
            upstream_retries: counter(
                &registry,
                "teamgate_upstream_retries_total",
                "Requests sent again on a new connection after a pooled one closed without answering.",
                &["upstream"],
            ),
            cache_requests: counter(
                &registry,
                "teamgate_cache_requests_total",
                "Cacheable reads by result: hit, miss, collapsed (waited on another fill), stale, refresh, bypass.",
                &["upstream", "result"],
            ),
            cache_stores: single(
                "teamgate_cache_stores_total",
                "Responses stored in the cache.",
            ),
            cache_evictions: single(
                "teamgate_cache_evictions_total",
                "Entries evicted to keep the cache within its byte bound.",
            ),
            cache_invalidations: counter(
                &registry,
                "teamgate_cache_invalidations_total",
                "Scopes invalidated by writes, by scope family.",
                &["upstream", "scope"],
            ),
            cache_entries: gauge(&registry, "teamgate_cache_entries", "Entries in the cache."),
            cache_bytes: gauge(
                &registry,
                "teamgate_cache_bytes",
                "Bytes held by the cache (keys, headers, bodies).",
            ),
            ratelimit_rejections: counter(
                &registry,
                "teamgate_ratelimit_rejections_total",
                "Requests refused with 429 by a quota, by team and quota.",
                &["team", "quota"],
            ),
            config_reloads,
            cache_fanout,
            quota_sync,
            cache_fanout_subscribed: gauge(
                &registry,
                "teamgate_cache_fanout_subscribed",
                "1 while this instance hears the other instances' invalidations ([shared] redis); its cache is paused while 0.",
            ),
            registry,
        }
    }

    /// Records one answered request.
    pub fn request(
        &self,
        labels: &RequestLabels<'_>,
        method: &Method,
        status: StatusCode,
        cache: &'static str,
        seconds: f64,
    ) {
        let RequestLabels {
            team,
            upstream,
            route_class,
        } = *labels;
        let method = method_label(method);
        let status_class = status_class(status);
        let key = LabelKey {
            team: team.map_or(0, |team| Arc::as_ptr(team) as usize),
            upstream: upstream.map_or(0, |upstream| Arc::as_ptr(upstream) as usize),
            route_class: route_class.as_ptr() as usize,
            method: method.as_ptr() as usize,
            status_class: status_class.as_ptr() as usize,
            cache: cache.as_ptr() as usize,
        };
        let mut counts = lock(&self.by_thread.mine().counts);
        if let Some(handles) = counts.requests.get(&key) {
            handles.record(seconds);
            return;
        }
        // First request with this label set in this shard: resolve it once.
        let owners = (team.cloned(), upstream.cloned());
        let team = team.map_or("", |team| team.name.as_str());
        let upstream = upstream.map_or("", |upstream| upstream.name.as_str());
        let handles = LocalHandles {
            _owners: owners,
            requests: self
                .requests
                .with_label_values(&[team, upstream, route_class, method, status_class, cache])
                .local(),
            duration: self
                .request_duration
                .with_label_values(&[upstream, route_class, cache])
                .local(),
            cache: (cache != CACHE_NONE).then(|| {
                self.cache_requests
                    .with_label_values(&[upstream, cache])
                    .local()
            }),
        };
        handles.record(seconds);
        counts.requests.insert(key, handles);
    }

    /// A request came in; [`Metrics::request_left`] when it is over.
    pub fn request_entered(&self) {
        self.by_thread
            .mine()
            .in_flight
            .fetch_add(1, Ordering::Relaxed);
    }

    pub fn request_left(&self) {
        self.by_thread
            .mine()
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
    }

    /// An answer head from `upstream` came `seconds` after the request was sent.
    pub fn upstream_latency(&self, upstream: &str, seconds: f64) {
        let mut counts = lock(&self.by_thread.mine().counts);
        if let Some(latency) = counts.upstream_latency.get(upstream) {
            latency.observe(seconds);
            return;
        }
        let latency = self
            .upstream_duration
            .with_label_values(&[upstream])
            .local();
        latency.observe(seconds);
        counts.upstream_latency.insert(upstream.into(), latency);
    }

    /// The counters an upstream's connection pool bumps, resolved once.
    pub fn upstream_pool(&self, upstream: &str) -> UpstreamPoolCounters {
        UpstreamPoolCounters {
            opened: self.upstream_connections.with_label_values(&[upstream]),
            retried: self.upstream_retries.with_label_values(&[upstream]),
        }
    }

    pub fn upstream_error(&self, upstream: &str, kind: &str) {
        self.upstream_errors
            .with_label_values(&[upstream, kind])
            .inc();
    }

    pub fn cache_stored(&self) {
        self.cache_stores.inc();
    }

    pub fn cache_evicted(&self) {
        self.cache_evictions.inc();
    }

    pub fn cache_invalidated(&self, upstream: &str, scope_family: &str) {
        self.cache_invalidations
            .with_label_values(&[upstream, scope_family])
            .inc();
    }

    pub fn rate_limited(&self, team: &str, quota: &str) {
        self.ratelimit_rejections
            .with_label_values(&[team, quota])
            .inc();
    }

    /// A reload replaced the config's teams with `teams`: the series of a
    /// team that is gone leave the exposition (a dashboard would otherwise
    /// show it frozen at its last figures until a restart), and the label
    /// sets resolved per shard are let go, with the old config's teams they
    /// keep alive (each is resolved again on its next request).
    pub fn teams_replaced(&self, teams: &[Arc<Team>]) {
        for shard in self.by_thread.iter() {
            let mut counts = lock(&shard.counts);
            counts.flush();
            counts.requests.clear();
        }
        let kept: HashSet<&str> = teams.iter().map(|team| team.name.as_str()).collect();
        remove_series_of_other_teams(&self.requests, &kept);
        remove_series_of_other_teams(&self.ratelimit_rejections, &kept);
    }

    /// Counts one cache invalidation shared with the other instances:
    /// `published` (and confirmed by every instance), `unconfirmed`,
    /// `publish_failed`, or `applied` (one of theirs).
    pub fn cache_fanout(&self, event: &'static str) {
        self.cache_fanout.with_label_values(&[event]).inc();
    }

    /// Counts one round of sharing quotas: `ok` or `failed`.
    pub fn quota_sync(&self, outcome: &'static str) {
        self.quota_sync.with_label_values(&[outcome]).inc();
    }

    pub fn cache_fanout_subscribed(&self, subscribed: bool) {
        self.cache_fanout_subscribed.set(i64::from(subscribed));
    }

    /// Counts one config reload, applied or refused.
    pub fn config_reloaded(&self, applied: bool) {
        let result = if applied { "success" } else { "failure" };
        self.config_reloads.with_label_values(&[result]).inc();
    }

    /// The text exposition, with the cache gauges read at scrape time.
    pub fn render(&self, cache_entries: u64, cache_bytes: u64) -> String {
        self.cache_entries.set(cache_entries as i64);
        self.cache_bytes.set(cache_bytes as i64);
        let mut in_flight = 0;
        for shard in self.by_thread.iter() {
            lock(&shard.counts).flush();
            in_flight += shard.in_flight.load(Ordering::Relaxed);
        }
        self.in_flight.set(in_flight);
        let mut buffer = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buffer)
            .expect("text encoding of gathered metrics cannot fail");
        String::from_utf8(buffer).expect("the text format is UTF-8")
    }
}

/// Removes from `metric` every series whose `team` is set (a request
/// refused before it was authenticated has `team=""`) and not in `kept`.
fn remove_series_of_other_teams(metric: &IntCounterVec, kept: &HashSet<&str>) {
    for family in metric.collect() {
        for series in family.get_metric() {
            let labels: HashMap<&str, &str> = series
                .get_label()
                .iter()
                .map(|pair| (pair.name(), pair.value()))
                .collect();
            let gone = labels
                .get("team")
                .is_some_and(|team| !team.is_empty() && !kept.contains(team));
            if gone {
                // Only fails for labels the metric does not have.
                let _ = metric.remove(&labels);
            }
        }
    }
}

fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

fn status_class(status: StatusCode) -> &'static str {
    match status.as_u16() {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// The cache label of a fresh hit, the one the cache layer sets without a
/// [`cache_label`] look at the answer.
pub const CACHE_HIT: &str = "hit";

/// The cache label of a request the gateway's cache took no part in.
pub const CACHE_NONE: &str = "none";

/// The cache result a `Cache-Status` value reports, as a label.
pub fn cache_label(cache_status: Option<&http::HeaderValue>) -> &'static str {
    let Some(value) = cache_status.and_then(|value| value.to_str().ok()) else {
        return CACHE_NONE;
    };
    if value.contains("; hit") {
        CACHE_HIT
    } else if value.contains("collapsed") {
        "collapsed"
    } else if value.contains("fwd=stale") {
        "stale"
    } else if value.contains("fwd=bypass") {
        "bypass"
    } else if value.contains("fwd=request") {
        "refresh"
    } else {
        "miss"
    }
}

/// What a request is counted under, as its record says at the end
/// (`RequestRecord::labels`): no team or upstream, and route class `none`,
/// for a request refused before the layer that learns them.
#[derive(Debug, Clone, Copy)]
pub struct RequestLabels<'a> {
    pub team: Option<&'a Arc<Team>>,
    pub upstream: Option<&'a Arc<Upstream>>,
    pub route_class: &'static str,
}

impl Default for RequestLabels<'_> {
    fn default() -> Self {
        RequestLabels {
            team: None,
            upstream: None,
            route_class: "none",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_labels_follow_cache_status() {
        let label = |value: &'static str| cache_label(Some(&http::HeaderValue::from_static(value)));
        assert_eq!(label("teamgate; hit; ttl=3"), "hit");
        assert_eq!(label("teamgate; fwd=miss; stored"), "miss");
        assert_eq!(label("teamgate; fwd=miss; collapsed"), "collapsed");
        assert_eq!(
            label("teamgate; fwd=stale; ttl=-1; detail=stale-while-revalidate"),
            "stale"
        );
        assert_eq!(label("teamgate; fwd=bypass"), "bypass");
        assert_eq!(label("teamgate; fwd=request; stored"), "refresh");
        assert_eq!(cache_label(None), "none");
    }

    #[test]
    fn methods_and_statuses_fold_into_bounded_labels() {
        assert_eq!(
            method_label(&Method::from_bytes(b"PROPFIND").unwrap()),
            "OTHER"
        );
        assert_eq!(status_class(StatusCode::IM_A_TEAPOT), "4xx");
        assert_eq!(status_class(StatusCode::BAD_GATEWAY), "5xx");
    }

    /// The line of `name{labels…}` in the exposition, as a number.
    fn value_of(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
    }

    /// Counts (and upstream latencies) are kept per thread shard and added
    /// up at each scrape: what many threads counted at once is all there,
    /// every scrape shows it, and none is counted twice. A request may leave on another thread than it
    /// entered on; the in-flight figure is the sum over shards.
    #[test]
    fn counts_from_many_threads_all_reach_the_scrape_once() {
        let metrics = Metrics::new();
        let labels = RequestLabels {
            route_class: "asset_list",
            ..RequestLabels::default()
        };
        // More threads than shards, all counting at once.
        let threads = 2 * metrics.by_thread.len() + 1;
        let start = std::sync::Barrier::new(threads);
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| {
                    start.wait();
                    for _ in 0..1000 {
                        metrics.request(&labels, &Method::GET, StatusCode::OK, "hit", 0.0002);
                        metrics.upstream_latency("comfy", 0.001);
                    }
                    // One request each still in flight at the scrape.
                    metrics.request_entered();
                });
            }
        });
        let total = (threads * 1000) as f64;
        let requests = "teamgate_requests_total{cache=\"hit\",method=\"GET\",route_class=\"asset_list\",status_class=\"2xx\",team=\"\",upstream=\"\"}";
        let text = metrics.render(0, 0);
        assert_eq!(value_of(&text, requests), total);
        assert_eq!(
            value_of(
                &text,
                "teamgate_request_duration_seconds_count{cache=\"hit\",route_class=\"asset_list\",upstream=\"\"}"
            ),
            total
        );
        assert_eq!(
            value_of(
                &text,
                "teamgate_cache_requests_total{result=\"hit\",upstream=\"\"}"
            ),
            total
        );
        assert_eq!(
            value_of(
                &text,
                "teamgate_upstream_duration_seconds_count{upstream=\"comfy\"}"
            ),
            total
        );
        assert_eq!(
            value_of(&text, "teamgate_requests_in_flight"),
            threads as f64
        );
        assert_eq!(
            value_of(&metrics.render(0, 0), requests),
            total,
            "a second scrape counts nothing twice"
        );
        // Each request leaves on another thread than it entered on.
        for _ in 0..threads {
            std::thread::scope(|scope| {
                scope.spawn(|| metrics.request_left());
            });
        }
        assert_eq!(
            value_of(&metrics.render(0, 0), "teamgate_requests_in_flight"),
            0.0
        );
    }

    /// Label sets are found by the team's and upstream's addresses. A
    /// reload frees the old config's teams and allocates new ones, and the
    /// allocator hands a freed team's memory to the next team of its size:
    /// a new team found at an old one's address must still be counted under
    /// its own name.
    #[test]
    fn a_team_at_a_freed_teams_address_is_counted_under_its_own_name() {
        let metrics = Metrics::new();
        let count = |team: &Arc<Team>| {
            let labels = RequestLabels {
                team: Some(team),
                route_class: "asset_list",
                ..RequestLabels::default()
            };
            metrics.request(&labels, &Method::GET, StatusCode::OK, "hit", 0.0002);
        };
        let team = |name: &str| Arc::new(Team::new(name, Vec::new(), Default::default()));
        let removed = team("removed");
        let address = Arc::as_ptr(&removed);
        count(&removed);
        drop(removed);
        // The allocator is free to place the next teams anywhere; keep them
        // all alive so that each one takes a new place, until one lands on
        // the freed team's (or the allocator never gives it out again).
        let mut added = Vec::new();
        for n in 0..1000 {
            let next = team(&format!("added-{n}"));
            let reused = Arc::as_ptr(&next) == address;
            added.push(next);
            if reused {
                break;
            }
        }
        for team in &added {
            count(team);
        }
        let text = metrics.render(0, 0);
        let series = |team: &str| {
            format!(
                "teamgate_requests_total{{cache=\"hit\",method=\"GET\",route_class=\"asset_list\",status_class=\"2xx\",team=\"{team}\",upstream=\"\"}}"
            )
        };
        assert_eq!(value_of(&text, &series("removed")), 1.0);
        for team in &added {
            assert_eq!(value_of(&text, &series(&team.name)), 1.0, "{text}");
        }
    }

    #[test]
    fn the_exposition_has_build_info_and_the_cache_gauges() {
        let metrics = Metrics::new();
        let text = metrics.render(3, 1234);
        assert!(text.contains(&format!(
            "teamgate_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        )));
        assert!(text.contains("teamgate_cache_entries 3"));
        assert!(text.contains("teamgate_cache_bytes 1234"));
    }
}
