//! Quotas: per-team and per-key rate limits, per-route quotas, and the
//! upstream budget that protects a team's shared upstream key.
//!
//! - [`quota`]: rate specs, the [`quota::RateLimit`] interface, the governor backend.
//! - [`shared`]: the backend of instances that share their quotas through Redis.
//! - [`Quotas`]: the limiter state for every team, built from the config and
//!   rebuilt on reload without resetting the teams whose limits did not change.
//! - [`layer`]: [`layer::ClientQuotaLayer`] (every request, cache hits
//!   included) and [`layer::UpstreamBudgetLayer`] (only what goes upstream).

pub mod layer;
pub mod quota;
pub mod shared;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::telemetry::shards::lock;

use crate::config::{Config, LimitSettings, RouteQuota, UpstreamLimits};
pub use layer::{ClientQuotaLayer, UpstreamBudgetLayer};
use quota::{GovernorLimit, QuotaSpec, RateLimit};
use shared::SharedQuotas;

/// Where the quotas' buckets live.
#[derive(Debug, Clone, Default)]
pub enum Backend {
    /// In this instance's memory (governor).
    #[default]
    Local,
    /// In this instance's memory, reconciled with the other instances'
    /// through Redis (`[shared] redis`).
    Shared(Arc<SharedQuotas>),
}

impl Backend {
    /// `team`'s quota named `name` in `RateLimit` headers; `bucket` names
    /// it among the team's quotas (unique, unlike `name`).
    fn single(&self, team: &str, bucket: &str, name: &str, spec: QuotaSpec) -> Arc<dyn RateLimit> {
        match self {
            Backend::Local => Arc::new(GovernorLimit::single(name, spec)),
            Backend::Shared(shared) => shared.limit(team, bucket, name, spec, false),
        }
    }

    fn per_key(&self, team: &str, name: &str, spec: QuotaSpec) -> Arc<dyn RateLimit> {
        match self {
            Backend::Local => Arc::new(GovernorLimit::per_key(name, spec)),
            Backend::Shared(shared) => shared.limit(team, name, name, spec, true),
        }
    }

    /// `team`'s pause on `upstream`.
    fn pause(&self, team: &str, upstream: &str) -> Arc<Pause> {
        match self {
            Backend::Local => Arc::default(),
            Backend::Shared(shared) => shared.pause(team, upstream),
        }
    }
}

/// One quota and the spec it was built from (to reuse it across reloads).
#[derive(Debug, Clone)]
struct Built {
    spec: QuotaSpec,
    limit: Arc<dyn RateLimit>,
}

/// A route quota with its limiter.
#[derive(Debug)]
pub struct RouteLimit {
    pub rule: RouteQuota,
    limit: Arc<dyn RateLimit>,
}

/// A team's pause on one upstream, set when the upstream answered 429
/// with `Retry-After`. With `[shared] redis` the instances share it (the
/// upstream limits the team's key, not one instance): see [`shared`].
#[derive(Debug, Default)]
pub struct Pause {
    until: Mutex<Option<Instant>>,
    /// The end of a pause this instance started, until a round reports it.
    unreported: Mutex<Option<Instant>>,
}

impl Pause {
    /// The remaining pause, if the upstream asked this team to back off.
    pub fn left(&self) -> Option<Duration> {
        let until = (*lock(&self.until))?;
        until
            .checked_duration_since(Instant::now())
            .filter(|left| !left.is_zero())
    }

    /// Pauses until `until`, unless paused longer already; whether it did.
    fn extend(&self, until: Instant) -> bool {
        let mut paused = lock(&self.until);
        let longer = paused.is_none_or(|current| current < until);
        if longer {
            *paused = Some(until);
        }
        longer
    }

    /// Starts a pause of `duration` here (the other instances hear of it
    /// at the next round).
    fn start(&self, duration: Duration) {
        let until = Instant::now() + duration;
        if self.extend(until) {
            *lock(&self.unreported) = Some(until);
        }
    }

    /// The pause this instance started since the last round, if it still runs.
    fn take_unreported(&self) -> Option<Duration> {
        let until = lock(&self.unreported).take()?;
        until
            .checked_duration_since(Instant::now())
            .filter(|left| !left.is_zero())
    }
}

/// A team's budget on one upstream.
#[derive(Debug)]
pub struct UpstreamBudget {
    limits: UpstreamLimits,
    rate: Option<Arc<dyn RateLimit>>,
    in_flight: Option<Arc<Semaphore>>,
    pause: Arc<Pause>,
}

impl UpstreamBudget {
    fn new(
        limits: &UpstreamLimits,
        rate: impl FnOnce(QuotaSpec) -> Arc<dyn RateLimit>,
        pause: Arc<Pause>,
    ) -> Self {
        UpstreamBudget {
            limits: limits.clone(),
            rate: limits.rate.map(rate),
            in_flight: limits
                .max_in_flight
                .map(|max| Arc::new(Semaphore::new(max as usize))),
            pause,
        }
    }

    /// The remaining pause, if the upstream asked this team to back off.
    pub fn paused_for(&self) -> Option<Duration> {
        self.pause.left()
    }

    pub fn pause(&self, duration: Duration) {
        self.pause.start(duration);
    }
}

/// Every limiter of one team.
#[derive(Debug)]
pub struct TeamQuotas {
    client: Option<Built>,
    per_key: Option<Built>,
    routes: Vec<RouteLimit>,
    /// Indexed by `Upstream::index`.
    upstream: Vec<Arc<UpstreamBudget>>,
}

/// The limiter state of every team.
#[derive(Debug)]
pub struct Quotas {
    teams: HashMap<String, Arc<TeamQuotas>, foldhash::fast::RandomState>,
    pub settings: LimitSettings,
    backend: Backend,
}

impl Quotas {
    /// In-memory quotas for `config`.
    pub fn new(config: &Config) -> Self {
        Self::build(config, None, Backend::Local)
    }

    /// Quotas for `config` whose buckets live in `backend`.
    pub fn with_backend(config: &Config, backend: Backend) -> Self {
        Self::build(config, None, backend)
    }

    /// The quotas for a reloaded config: a team whose limits did not change
    /// keeps its limiter state (a drained bucket stays drained).
    pub fn rebuild(&self, config: &Config) -> Self {
        Self::build(config, Some(self), self.backend.clone())
    }

    fn build(config: &Config, previous: Option<&Quotas>, backend: Backend) -> Self {
        let mut teams = HashMap::default();
        for team in &config.teams {
            let old = previous.and_then(|quotas| quotas.teams.get(&team.name));
            let reuse =
                |old: Option<&Built>, spec: QuotaSpec, make: &dyn Fn() -> Arc<dyn RateLimit>| {
                    match old {
                        Some(built) if built.spec == spec => built.clone(),
                        _ => Built {
                            spec,
                            limit: make(),
                        },
                    }
                };
            let limits = &team.limits;
            let name = team.name.as_str();
            let client = limits.client.map(|spec| {
                reuse(old.and_then(|o| o.client.as_ref()), spec, &|| {
                    backend.single(name, "client", "client", spec)
                })
            });
            let per_key = limits.per_key.map(|spec| {
                reuse(old.and_then(|o| o.per_key.as_ref()), spec, &|| {
                    backend.per_key(name, "per_key", spec)
                })
            });
            let routes = limits
                .routes
                .iter()
                .map(|rule| {
                    let kept = old
                        .and_then(|o| o.routes.iter().find(|r| r.rule == *rule))
                        .map(|r| Arc::clone(&r.limit));
                    RouteLimit {
                        limit: kept.unwrap_or_else(|| {
                            let bucket = format!("route:{}", rule.label);
                            backend.single(name, &bucket, &rule.label, rule.spec)
                        }),
                        rule: rule.clone(),
                    }
                })
                .collect();
            let upstream = config
                .upstreams
                .iter()
                .map(
                    |upstream| match old.and_then(|o| o.upstream.get(upstream.index)) {
                        Some(budget) if budget.limits == limits.upstream => Arc::clone(budget),
                        _ => Arc::new(UpstreamBudget::new(
                            &limits.upstream,
                            |spec| {
                                let bucket = format!("upstream:{}", upstream.name);
                                backend.single(name, &bucket, "upstream", spec)
                            },
                            backend.pause(name, &upstream.name),
                        )),
                    },
                )
                .collect();
            teams.insert(
                team.name.clone(),
                Arc::new(TeamQuotas {
                    client,
                    per_key,
                    routes,
                    upstream,
                }),
            );
        }
        Quotas {
            teams,
            settings: config.limits,
            backend,
        }
    }

    pub fn team(&self, name: &str) -> Option<&Arc<TeamQuotas>> {
        self.teams.get(name)
    }

    /// Drops idle per-key state; called periodically.
    pub fn retain_recent(&self) {
        for team in self.teams.values() {
            if let Some(per_key) = &team.per_key {
                per_key.limit.retain_recent();
            }
        }
    }
}
