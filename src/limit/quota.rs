//! Quotas: rate specs, the limiter interface, and its in-process backend.
//!
//! [`RateLimit`] is the interface a quota is checked through. The backend of
//! one instance is [`GovernorLimit`] (GCRA, in memory); that of several
//! instances sharing their quotas is [`super::shared::SharedLimit`].
//!
//! Time comes from tokio's clock ([`TokioClock`]), so tests can pause time and
//! advance it to the exact moment a `Retry-After` names.

use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::{StateInformationMiddleware, StateSnapshot};
use governor::nanos::Nanos;
use governor::state::keyed::DashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{NotUntil, Quota, RateLimiter};
use http::HeaderValue;

use crate::auth::keys::KeyDigest;

/// `20/s`, `10/m`, `100/h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

pub fn parse_rate(value: &str) -> Result<Rate, String> {
    let bad = || format!("`{value}` is not a rate; expected e.g. `20/s`, `10/m`, `100/h`");
    let (count, unit) = value.trim().split_once('/').ok_or_else(bad)?;
    let count: u32 = count.trim().parse().map_err(|_| bad())?;
    let per = match unit.trim() {
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        _ => return Err(bad()),
    };
    if count == 0 {
        return Err(format!(
            "`{value}`: a rate must allow at least 1 request (leave the quota out for none)"
        ));
    }
    Ok(Rate { count, per })
}

/// A quota: a sustained rate and a burst (the bucket size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaSpec {
    pub rate: Rate,
    pub burst: u32,
}

impl QuotaSpec {
    fn governor(&self) -> Quota {
        let interval = self.rate.per / self.rate.count;
        Quota::with_period(interval)
            .expect("a rate of at least 1 per second-or-more has a non-zero period")
            .allow_burst(NonZeroU32::new(self.burst).expect("burst is validated to be at least 1"))
    }

    /// The time one permit takes to come back.
    pub fn interval(&self) -> Duration {
        self.rate.per / self.rate.count
    }

    /// The policy window in whole seconds: the time a full burst takes to replenish.
    pub fn window_secs(&self) -> u64 {
        ceil_secs(self.interval() * self.burst)
    }
}

pub fn ceil_secs(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

/// governor's clock, read from tokio's (pausable) clock.
#[derive(Debug, Clone)]
pub struct TokioClock {
    origin: tokio::time::Instant,
}

impl Default for TokioClock {
    fn default() -> Self {
        TokioClock {
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    type Instant = Nanos;

    fn now(&self) -> Nanos {
        Nanos::from(self.origin.elapsed())
    }
}

/// The answer to one check.
#[derive(Debug, Clone)]
pub enum Verdict {
    Allowed(Snapshot),
    Denied(Denial),
}

/// A quota's state after an admitted request: for the `RateLimit` headers.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub name: Arc<str>,
    pub spec: QuotaSpec,
    pub remaining: u32,
    /// Seconds until the bucket is full again.
    pub reset_secs: u64,
}

/// A refused request: which quota, and when the next permit comes.
#[derive(Debug, Clone)]
pub struct Denial {
    pub name: Arc<str>,
    /// `None` for refusals that are not a rate (an upstream pause, a full in-flight cap).
    pub spec: Option<QuotaSpec>,
    pub retry_after: Duration,
}

impl Denial {
    /// `Retry-After` in whole seconds, rounded up so a retry then is admitted.
    pub fn retry_after_secs(&self) -> u64 {
        ceil_secs(self.retry_after).max(1)
    }
}

/// The interface a quota is checked through.
pub trait RateLimit: Send + Sync + fmt::Debug {
    /// Takes one permit if there is one. `key` selects the bucket of a per-key quota.
    fn check(&self, key: Option<&KeyDigest>) -> Verdict;
    /// Drops state that is indistinguishable from a fresh bucket (idle keys).
    fn retain_recent(&self) {}
}

type Direct = RateLimiter<NotKeyed, InMemoryState, TokioClock, StateInformationMiddleware>;
type Keyed =
    RateLimiter<KeyDigest, DashMapStateStore<KeyDigest>, TokioClock, StateInformationMiddleware>;

enum Buckets {
    One(Direct),
    PerKey(Keyed),
}

/// In-memory GCRA quota (governor): one bucket, or one bucket per client key.
pub struct GovernorLimit {
    name: Arc<str>,
    spec: QuotaSpec,
    clock: TokioClock,
    buckets: Buckets,
}

impl fmt::Debug for GovernorLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GovernorLimit")
            .field("name", &self.name)
            .field("spec", &self.spec)
            .finish()
    }
}

impl GovernorLimit {
    pub fn single(name: &str, spec: QuotaSpec) -> Self {
        let clock = TokioClock::default();
        GovernorLimit {
            name: name.into(),
            spec,
            buckets: Buckets::One(
                RateLimiter::direct_with_clock(spec.governor(), clock.clone()).with_middleware(),
            ),
            clock,
        }
    }

    pub fn per_key(name: &str, spec: QuotaSpec) -> Self {
        let clock = TokioClock::default();
        GovernorLimit {
            name: name.into(),
            spec,
            buckets: Buckets::PerKey(
                RateLimiter::dashmap_with_clock(spec.governor(), clock.clone()).with_middleware(),
            ),
            clock,
        }
    }

    fn verdict(&self, outcome: Result<StateSnapshot, NotUntil<Nanos>>) -> Verdict {
        match outcome {
            Ok(state) => {
                let remaining = state.remaining_burst_capacity();
                let used = self.spec.burst.saturating_sub(remaining);
                Verdict::Allowed(Snapshot {
                    name: Arc::clone(&self.name),
                    spec: self.spec,
                    remaining,
                    reset_secs: ceil_secs(self.spec.interval() * used),
                })
            }
            Err(not_until) => Verdict::Denied(Denial {
                name: Arc::clone(&self.name),
                spec: Some(self.spec),
                retry_after: not_until.wait_time_from(self.clock.now()),
            }),
        }
    }
}

impl RateLimit for GovernorLimit {
    fn check(&self, key: Option<&KeyDigest>) -> Verdict {
        match (&self.buckets, key) {
            (Buckets::One(limiter), _) => self.verdict(limiter.check()),
            (Buckets::PerKey(limiter), Some(key)) => self.verdict(limiter.check_key(key)),
            // A per-key quota without a key has nothing to count against.
            (Buckets::PerKey(_), None) => Verdict::Allowed(Snapshot {
                name: Arc::clone(&self.name),
                spec: self.spec,
                remaining: self.spec.burst,
                reset_secs: 0,
            }),
        }
    }

    fn retain_recent(&self) {
        if let Buckets::PerKey(limiter) = &self.buckets {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

/// `RateLimit-Policy: "client";q=40;w=2` (draft-ietf-httpapi-ratelimit-headers).
pub fn policy_header(name: &str, spec: &QuotaSpec) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "\"{name}\";q={};w={}",
        spec.burst,
        spec.window_secs()
    ))
    .expect("quota names are header-safe")
}

/// `RateLimit: "client";r=12;t=1`.
pub fn state_header(name: &str, remaining: u32, reset_secs: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{name}\";r={remaining};t={reset_secs}"))
        .expect("quota names are header-safe")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `rate` with `burst`.
    pub(crate) fn spec(rate: &str, burst: u32) -> QuotaSpec {
        QuotaSpec {
            rate: parse_rate(rate).unwrap(),
            burst,
        }
    }

    #[test]
    fn rates_parse_in_every_unit() {
        assert_eq!(
            parse_rate("20/s").unwrap(),
            Rate {
                count: 20,
                per: Duration::from_secs(1)
            }
        );
        assert_eq!(
            parse_rate("10/m").unwrap(),
            Rate {
                count: 10,
                per: Duration::from_secs(60)
            }
        );
        assert_eq!(
            parse_rate(" 5 / h ").unwrap(),
            Rate {
                count: 5,
                per: Duration::from_secs(3600)
            }
        );
        for bad in ["", "20", "20/d", "0/s", "x/s", "-1/s"] {
            assert!(parse_rate(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_is_admitted_then_the_next_permit_comes_exactly_on_time() {
        let limit = GovernorLimit::single("client", spec("10/m", 2));
        let Verdict::Allowed(first) = limit.check(None) else {
            panic!()
        };
        assert_eq!(first.remaining, 1);
        assert_eq!(first.reset_secs, 6);
        assert!(matches!(limit.check(None), Verdict::Allowed(_)));
        let Verdict::Denied(denied) = limit.check(None) else {
            panic!("burst of 2")
        };
        assert_eq!(denied.retry_after, Duration::from_secs(6));
        assert_eq!(denied.retry_after_secs(), 6);
        tokio::time::advance(Duration::from_millis(5999)).await;
        assert!(
            matches!(limit.check(None), Verdict::Denied(_)),
            "not a moment early"
        );
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(
            matches!(limit.check(None), Verdict::Allowed(_)),
            "exactly on time"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn per_key_buckets_are_independent_and_idle_ones_are_dropped() {
        let limit = GovernorLimit::per_key("per_key", spec("1/s", 1));
        let (a, b) = (KeyDigest::of_key("a"), KeyDigest::of_key("b"));
        assert!(matches!(limit.check(Some(&a)), Verdict::Allowed(_)));
        assert!(matches!(limit.check(Some(&a)), Verdict::Denied(_)));
        assert!(matches!(limit.check(Some(&b)), Verdict::Allowed(_)));
        let Buckets::PerKey(keyed) = &limit.buckets else {
            panic!()
        };
        assert_eq!(keyed.len(), 2);
        tokio::time::advance(Duration::from_secs(2)).await;
        limit.retain_recent();
        assert_eq!(keyed.len(), 0, "idle keys are forgotten");
    }

    #[test]
    fn headers_follow_the_ietf_draft() {
        let spec = spec("20/s", 40);
        assert_eq!(policy_header("client", &spec), "\"client\";q=40;w=2");
        assert_eq!(state_header("client", 12, 1), "\"client\";r=12;t=1");
    }
}
