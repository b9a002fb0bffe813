//! Quotas shared by several instances through Redis (`[shared] redis`).
//!
//! Every instance still checks each quota in its own memory, on the request
//! path, exactly as one instance alone does: a cache hit is answered in
//! microseconds, and a Redis round trip per request (hits included) would
//! cost more than the answer. What the instances share is how much each
//! has admitted. A task of each instance ([`QuotaSync`]) runs a round every
//! `shared.quota_sync` (100 ms by default): it reports the permits each
//! bucket gave out since the last round, and one script in Redis adds them
//! to the bucket's shared state — its GCRA theoretical arrival time, on
//! Redis's clock — and answers each bucket's *backlog*: how far ahead of
//! now the whole fleet's admissions have pushed it. The instance sets its
//! own bucket to that backlog, plus what it admitted while the round was
//! out. (Setting a bucket from outside is what governor, the backend of one
//! instance, has no way to do: the buckets here are GCRA in two atomics of
//! their own — `quota/shared/*` in `benches/micro.rs` measures them against
//! governor's.)
//!
//! So between two rounds the instances may together admit more than the
//! quota: each at most what it could alone in that time (what its bucket
//! held, plus one round's refill). Over any longer time the fleet admits
//! the quota: an overshoot becomes backlog every instance sees at its next
//! round, paid back before any of them admits more. A team's quotas
//! (client, route, upstream rate) are read back in every round; a per-key
//! quota's buckets are reported when they admitted something, and each
//! round also brings back every key the fleet is using (the members of the
//! quota's sorted set that are not full), so an instance that has never
//! seen a key counts what the others admitted from its first request.
//!
//! When Redis cannot be reached, each instance enforces its quotas alone
//! (N instances then admit up to N times a quota: a rate limit fails open,
//! it does not refuse everyone), says so once in the log, and counts the
//! failed rounds; what it admitted before a failed round is not reported
//! afterwards (it would charge the fleet for time already past).
//!
//! Redis keys are `<channel>:quota:<team>:<bucket>`, the bucket `client`,
//! `route:<match>` or `upstream:<name>` (a string: the time, in µs on
//! Redis's clock, the bucket is full again), or `per_key` (a sorted set of
//! such times by key id — 96 bits of the key's SHA-256, never the key).
//! Each expires when full again.
//!
//! The pause after an upstream `429` with `Retry-After` (`[limits]
//! pause_on_upstream_429`) is shared the same way: the upstream limits the
//! team's key, whichever instance sent the request. An instance that starts
//! a pause reports it at its next round (`<team>:pause:<upstream>`, a key
//! that expires when the pause ends), and every round reads each pause
//! back. In-flight caps stay per instance.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::Duration;

use governor::clock::Clock as _;
use redis::aio::MultiplexedConnection;
use tokio_util::task::AbortOnDrop;

use super::Pause;
use super::quota::{Denial, QuotaSpec, RateLimit, Snapshot, TokioClock, Verdict, ceil_secs};
use crate::auth::keys::KeyDigest;
use crate::shared::within;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::shards::lock;

/// Buckets per script call: a round with more makes several calls, so
/// none holds Redis (single-threaded) for long.
const BUCKETS_PER_CALL: usize = 500;

/// Adds what one instance admitted to each shared bucket and answers each
/// bucket's backlog (µs). A bucket is its GCRA theoretical arrival time in
/// µs on Redis's clock: a string key of its own, or a member of its per-key
/// quota's sorted set (the score). `KEYS[i]`: the key; `ARGV[3i-2]`: the
/// member, or '' for a key of its own; `ARGV[3i-1]`: the permits the
/// instance gave out since its last report; `ARGV[3i]`: the quota's
/// interval in µs. Redis's `TIME` is the one clock: instances only ever
/// exchange durations. A bucket expires when it is full again.
const REPORT_SCRIPT: &str = r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local backlogs = {}
for i, key in ipairs(KEYS) do
  local member = ARGV[3 * i - 2]
  local count = tonumber(ARGV[3 * i - 1])
  local stored
  if member == '' then
    stored = redis.call('GET', key)
  else
    stored = redis.call('ZSCORE', key, member)
  end
  local tat = math.max(tonumber(stored or '0'), now)
  if count > 0 then
    tat = tat + count * tonumber(ARGV[3 * i])
    local ttl = math.ceil((tat - now) / 1000) + 1
    if member == '' then
      redis.call('SET', key, string.format('%d', tat), 'PX', ttl)
    else
      redis.call('ZADD', key, string.format('%d', tat), member)
      if redis.call('PTTL', key) < ttl then
        redis.call('PEXPIRE', key, ttl)
      end
    end
  end
  backlogs[i] = tat - now
end
return backlogs
";

/// The buckets of per-key quotas that are not full: `KEYS[i]`, a per-key
/// quota's sorted set; answers, for each, its members and their backlogs
/// (µs), flat. Drops the members that are full again.
const ACTIVE_SCRIPT: &str = r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local active = {}
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  local members = redis.call('ZRANGEBYSCORE', key, '(' .. string.format('%d', now), '+inf', 'WITHSCORES')
  local backlogs = {}
  for j = 1, #members, 2 do
    backlogs[#backlogs + 1] = members[j]
    backlogs[#backlogs + 1] = tonumber(members[j + 1]) - now
  end
  active[i] = backlogs
end
return active
";

/// Shares the pauses after an upstream 429: `KEYS[i]`, a team's pause on
/// one upstream; `ARGV[i]`, the ms of a pause this instance started since
/// its last report (0: none). Answers each pause's ms left (≤ 0: none).
const PAUSE_SCRIPT: &str = r"
local left = {}
for i, key in ipairs(KEYS) do
  local ms = tonumber(ARGV[i])
  if ms > 0 and redis.call('PTTL', key) < ms then
    redis.call('SET', key, '1', 'PX', ms)
  end
  left[i] = redis.call('PTTL', key)
end
return left
";

/// A quota's GCRA parameters, in nanoseconds.
#[derive(Debug, Clone, Copy)]
struct Gcra {
    /// The time one permit takes to come back.
    interval: u64,
    /// How far ahead of now the bucket may run: a full burst.
    tolerance: u64,
}

impl Gcra {
    fn of(spec: &QuotaSpec) -> Self {
        let interval = u64::try_from(spec.interval().as_nanos())
            .unwrap_or(u64::MAX)
            .max(1);
        Gcra {
            interval,
            tolerance: interval.saturating_mul(u64::from(spec.burst)),
        }
    }

    /// The interval in whole µs (the script's unit; at least 1, so a quota
    /// of more than a million a second counts as one).
    fn interval_micros(self) -> u64 {
        (self.interval / 1_000).max(1)
    }
}

/// One bucket: GCRA in two atomics, checked without a lock.
#[derive(Debug, Default)]
struct Bucket {
    /// GCRA's theoretical arrival time: the moment (nanoseconds on the
    /// registry's clock) the bucket is full again; ahead of now by what
    /// the admitted requests have not yet paid back.
    tat: AtomicU64,
    /// Permits given out since the last report to Redis.
    unreported: AtomicU64,
}

impl Bucket {
    /// Takes one permit at `now`: then how far ahead of now the bucket
    /// runs, or, refused, how long until the next permit.
    fn take(&self, gcra: Gcra, now: u64) -> Result<u64, u64> {
        let mut tat = self.tat.load(Relaxed);
        loop {
            let ahead = tat.saturating_sub(now) + gcra.interval;
            if ahead > gcra.tolerance {
                return Err(ahead - gcra.tolerance);
            }
            match self
                .tat
                .compare_exchange_weak(tat, now + ahead, Relaxed, Relaxed)
            {
                Ok(_) => {
                    self.unreported.fetch_add(1, Relaxed);
                    return Ok(ahead);
                }
                Err(current) => tat = current,
            }
        }
    }

    /// Full, with nothing to report: no different from a new bucket here.
    fn idle(&self, now: u64) -> bool {
        self.tat.load(Relaxed) <= now && self.unreported.load(Relaxed) == 0
    }

    /// Sets the bucket from the fleet's `backlog` (which includes what this
    /// instance reported), plus what it admitted since the report was taken.
    /// A permit taken between the two stores is reported in the next round.
    fn settle(&self, gcra: Gcra, now: u64, backlog: u64) {
        let since_report = self.unreported.load(Relaxed);
        self.tat.store(
            now.saturating_add(backlog)
                .saturating_add(since_report.saturating_mul(gcra.interval)),
            Relaxed,
        );
    }
}

/// A per-key quota's buckets, by [`KeyDigest::shared_id`]: the name the
/// other instances know a key by.
type KeyBuckets = HashMap<[u8; 12], Arc<Bucket>, foldhash::fast::RandomState>;

enum Buckets {
    One(Arc<Bucket>),
    PerKey(RwLock<KeyBuckets>),
}

/// A quota whose buckets the instances share (see the module docs): checked
/// here, reported and settled by [`QuotaSync`].
pub struct SharedLimit {
    name: Arc<str>,
    spec: QuotaSpec,
    gcra: Gcra,
    /// The quota's Redis key: a string, or a per-key quota's sorted set.
    redis_key: String,
    clock: TokioClock,
    buckets: Buckets,
}

impl std::fmt::Debug for SharedLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLimit")
            .field("name", &self.name)
            .field("spec", &self.spec)
            .field("redis_key", &self.redis_key)
            .finish_non_exhaustive()
    }
}

impl SharedLimit {
    fn now(&self) -> u64 {
        self.clock.now().as_u64()
    }

    fn verdict(&self, taken: Result<u64, u64>) -> Verdict {
        match taken {
            Ok(ahead) => Verdict::Allowed(Snapshot {
                name: Arc::clone(&self.name),
                spec: self.spec,
                remaining: u32::try_from((self.gcra.tolerance - ahead) / self.gcra.interval)
                    .unwrap_or(u32::MAX),
                reset_secs: ceil_secs(Duration::from_nanos(ahead)),
            }),
            Err(wait) => Verdict::Denied(Denial {
                name: Arc::clone(&self.name),
                spec: Some(self.spec),
                retry_after: Duration::from_nanos(wait),
            }),
        }
    }

    /// The buckets a round reports: a single bucket always (so its backlog
    /// is read back even when this instance admitted nothing), a per-key
    /// quota's when they admitted something here (the others' use of every
    /// key comes back through [`Self::settle_active`]).
    fn reports(&self, into: &mut Vec<Report>) {
        match &self.buckets {
            Buckets::One(bucket) => into.push(Report::of(bucket, self, None)),
            Buckets::PerKey(buckets) => {
                for (id, bucket) in read(buckets).iter() {
                    if bucket.unreported.load(Relaxed) > 0 {
                        into.push(Report::of(bucket, self, Some(hex::encode(id))));
                    }
                }
            }
        }
    }

    /// Sets this per-key quota's buckets from the fleet's backlogs (members
    /// of its sorted set that are not full), making those of keys this
    /// instance has not seen: their first request here is counted against
    /// what the others admitted.
    fn settle_active(&self, active: &[(String, u64)], now: u64) {
        let Buckets::PerKey(buckets) = &self.buckets else {
            return;
        };
        let mut buckets = write(buckets);
        for (member, backlog_micros) in active {
            let mut id = [0u8; 12];
            // Another version's member, say: not a key this version can be asked for.
            if hex::decode_to_slice(member, &mut id).is_ok() {
                buckets.entry(id).or_default().settle(
                    self.gcra,
                    now,
                    backlog_micros.saturating_mul(1_000),
                );
            }
        }
    }
}

fn read(buckets: &RwLock<KeyBuckets>) -> std::sync::RwLockReadGuard<'_, KeyBuckets> {
    buckets.read().unwrap_or_else(PoisonError::into_inner)
}

fn write(buckets: &RwLock<KeyBuckets>) -> std::sync::RwLockWriteGuard<'_, KeyBuckets> {
    buckets.write().unwrap_or_else(PoisonError::into_inner)
}

impl RateLimit for SharedLimit {
    fn check(&self, key: Option<&KeyDigest>) -> Verdict {
        let now = self.now();
        let taken = match (&self.buckets, key) {
            (Buckets::One(bucket), _) => bucket.take(self.gcra, now),
            (Buckets::PerKey(buckets), Some(key)) => {
                let id = key.shared_id();
                let known = read(buckets)
                    .get(&id)
                    .map(|bucket| bucket.take(self.gcra, now));
                match known {
                    Some(taken) => taken,
                    None => write(buckets).entry(id).or_default().take(self.gcra, now),
                }
            }
            // A per-key quota without a key has nothing to count against.
            (Buckets::PerKey(_), None) => Ok(0),
        };
        self.verdict(taken)
    }

    fn retain_recent(&self) {
        if let Buckets::PerKey(buckets) = &self.buckets {
            let now = self.now();
            let mut buckets = write(buckets);
            buckets.retain(|_, bucket| !bucket.idle(now));
            buckets.shrink_to_fit();
        }
    }
}

/// One bucket's part in a round: what it admitted since the last one.
#[derive(Debug)]
struct Report {
    bucket: Arc<Bucket>,
    gcra: Gcra,
    redis_key: String,
    /// The key id in a per-key quota's sorted set (hex).
    member: Option<String>,
    count: u64,
}

impl Report {
    /// Takes the bucket's unreported permits: from here on they are this
    /// round's (and lost with it, if it fails).
    fn of(bucket: &Arc<Bucket>, limit: &SharedLimit, member: Option<String>) -> Self {
        Report {
            count: bucket.unreported.swap(0, Relaxed),
            bucket: Arc::clone(bucket),
            gcra: limit.gcra,
            redis_key: limit.redis_key.clone(),
            member,
        }
    }
}

/// This instance's shared quotas: makes them, and reports them for
/// [`QuotaSync`]. Quotas a reload drops leave with their last owner.
#[derive(Debug)]
pub struct SharedQuotas {
    /// `<channel>:quota`.
    prefix: String,
    /// One clock for every bucket, so a round reads `now` once.
    clock: TokioClock,
    limits: Mutex<Vec<Weak<SharedLimit>>>,
    /// Each pause after an upstream 429, with its Redis key.
    pauses: Mutex<Vec<(String, Weak<Pause>)>>,
    report: redis::Script,
    active: redis::Script,
    pause: redis::Script,
}

impl SharedQuotas {
    pub fn new(channel: &str) -> Arc<Self> {
        Arc::new(SharedQuotas {
            prefix: format!("{channel}:quota"),
            clock: TokioClock::default(),
            limits: Mutex::default(),
            pauses: Mutex::default(),
            report: redis::Script::new(REPORT_SCRIPT),
            active: redis::Script::new(ACTIVE_SCRIPT),
            pause: redis::Script::new(PAUSE_SCRIPT),
        })
    }

    /// The quota of `team` named `name` (in `RateLimit` headers), shared as
    /// `bucket`: one bucket, or one per client key.
    pub fn limit(
        &self,
        team: &str,
        bucket: &str,
        name: &str,
        spec: QuotaSpec,
        per_key: bool,
    ) -> Arc<SharedLimit> {
        let limit = Arc::new(SharedLimit {
            name: name.into(),
            spec,
            gcra: Gcra::of(&spec),
            redis_key: format!("{}:{team}:{bucket}", self.prefix),
            clock: self.clock.clone(),
            buckets: if per_key {
                Buckets::PerKey(RwLock::default())
            } else {
                Buckets::One(Arc::default())
            },
        });
        lock(&self.limits).push(Arc::downgrade(&limit));
        limit
    }

    /// `team`'s pause on `upstream`, shared as `<team>:pause:<upstream>`.
    pub fn pause(&self, team: &str, upstream: &str) -> Arc<Pause> {
        let pause = Arc::new(Pause::default());
        let redis_key = format!("{}:{team}:pause:{upstream}", self.prefix);
        lock(&self.pauses).push((redis_key, Arc::downgrade(&pause)));
        pause
    }

    /// The pauses alive, with their Redis keys.
    fn live_pauses(&self) -> Vec<(String, Arc<Pause>)> {
        retain_alive(&self.pauses, |(redis_key, pause)| {
            Some((redis_key.clone(), pause.upgrade()?))
        })
    }

    /// The quotas alive (those of the config served, and of requests still
    /// in flight on the one before).
    fn live(&self) -> Vec<Arc<SharedLimit>> {
        retain_alive(&self.limits, Weak::upgrade)
    }

    /// Every bucket to report this round, their unreported permits taken.
    fn reports(limits: &[Arc<SharedLimit>]) -> Vec<Report> {
        let mut reports = Vec::new();
        for limit in limits {
            limit.reports(&mut reports);
        }
        reports
    }

    /// Forgets what was admitted since the last round: a round failed, and
    /// reporting it later would charge the fleet for time already past.
    fn discard_unreported(&self) {
        drop(Self::reports(&self.live()));
    }

    /// One round: reports every bucket in use and settles it from the
    /// fleet's backlog, then settles each per-key quota's buckets from the
    /// keys the fleet is using.
    async fn sync(&self, connection: &mut MultiplexedConnection) -> Result<(), String> {
        let limits = self.live();
        let reports = Self::reports(&limits);
        for round in reports.chunks(BUCKETS_PER_CALL) {
            let mut call = self.report.prepare_invoke();
            for report in round {
                call.key(&report.redis_key)
                    .arg(report.member.as_deref().unwrap_or(""))
                    .arg(report.count)
                    .arg(report.gcra.interval_micros());
            }
            let backlogs: Vec<u64> = within(call.invoke_async(connection)).await?;
            answered(backlogs.len(), round.len())?;
            let now = self.clock.now().as_u64();
            for (report, backlog_micros) in round.iter().zip(backlogs) {
                report
                    .bucket
                    .settle(report.gcra, now, backlog_micros.saturating_mul(1_000));
            }
        }
        let per_key: Vec<_> = limits
            .iter()
            .filter(|limit| matches!(limit.buckets, Buckets::PerKey(_)))
            .collect();
        for round in per_key.chunks(BUCKETS_PER_CALL) {
            let mut call = self.active.prepare_invoke();
            for limit in round {
                call.key(&limit.redis_key);
            }
            let backlogs: Vec<Vec<(String, u64)>> = within(call.invoke_async(connection)).await?;
            answered(backlogs.len(), round.len())?;
            let now = self.clock.now().as_u64();
            for (limit, active) in round.iter().zip(backlogs) {
                limit.settle_active(&active, now);
            }
        }
        for round in self.live_pauses().chunks(BUCKETS_PER_CALL) {
            let mut call = self.pause.prepare_invoke();
            for (redis_key, pause) in round {
                let started = pause.take_unreported().unwrap_or_default();
                // Rounded up: a pause never ends early for a rounding.
                let started_ms = u64::try_from(started.as_nanos().div_ceil(1_000_000));
                call.key(redis_key).arg(started_ms.unwrap_or(u64::MAX));
            }
            let left: Vec<i64> = within(call.invoke_async(connection)).await?;
            answered(left.len(), round.len())?;
            let now = tokio::time::Instant::now();
            for ((_, pause), left_ms) in round.iter().zip(left) {
                if let Ok(left_ms) = u64::try_from(left_ms)
                    && left_ms > 0
                {
                    pause.extend(now + Duration::from_millis(left_ms));
                }
            }
        }
        Ok(())
    }
}

/// What `upgrade` makes of each entry of `registered`, forgetting the
/// entries it makes nothing of (their owner is gone).
fn retain_alive<E, T>(registered: &Mutex<Vec<E>>, upgrade: impl Fn(&E) -> Option<T>) -> Vec<T> {
    let mut alive = Vec::new();
    lock(registered).retain(|entry| match upgrade(entry) {
        Some(live) => {
            alive.push(live);
            true
        }
        None => false,
    });
    alive
}

/// A script answered one entry per key it was given.
fn answered(answers: usize, asked: usize) -> Result<(), String> {
    if answers == asked {
        Ok(())
    } else {
        Err(format!(
            "a quota script answered {answers} entries for {asked} keys"
        ))
    }
}

/// The task that runs the rounds; stopped when dropped.
#[derive(Debug)]
pub struct QuotaSync {
    _task: AbortOnDrop,
}

impl QuotaSync {
    /// Starts the rounds, one every `every`. Must run inside the tokio runtime.
    pub fn start(
        client: redis::Client,
        every: Duration,
        quotas: Arc<SharedQuotas>,
        metrics: Arc<Metrics>,
    ) -> QuotaSync {
        let task = tokio::spawn(run_rounds(client, every, quotas, metrics));
        QuotaSync {
            _task: AbortOnDrop::new(task.abort_handle()),
        }
    }
}

async fn run_rounds(
    client: redis::Client,
    every: Duration,
    quotas: Arc<SharedQuotas>,
    metrics: Arc<Metrics>,
) {
    let mut connection = None;
    let mut failing = false;
    let mut rounds = tokio::time::interval(every);
    rounds.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        rounds.tick().await;
        let outcome = match &mut connection {
            Some(connection) => quotas.sync(connection).await,
            None => match within(client.get_multiplexed_async_connection()).await {
                Ok(opened) => quotas.sync(connection.insert(opened)).await,
                Err(error) => Err(error),
            },
        };
        match outcome {
            Ok(()) => {
                metrics.quota_sync("ok");
                if failing {
                    tracing::info!("quotas shared through Redis again");
                    failing = false;
                }
            }
            Err(error) => {
                quotas.discard_unreported();
                metrics.quota_sync("failed");
                connection = None;
                if !failing {
                    tracing::warn!(%error, "cannot share quotas through Redis: each instance enforces them alone until it can");
                    failing = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limit::quota::tests::spec;

    fn allowed(verdict: Verdict) -> Snapshot {
        match verdict {
            Verdict::Allowed(snapshot) => snapshot,
            Verdict::Denied(denial) => panic!("refused: {denial:?}"),
        }
    }

    fn denied(verdict: Verdict) -> Denial {
        match verdict {
            Verdict::Denied(denial) => denial,
            Verdict::Allowed(snapshot) => panic!("admitted: {snapshot:?}"),
        }
    }

    /// The same answers as the in-memory backend's test
    /// (`quota::tests::a_burst_is_admitted_then_the_next_permit_comes_exactly_on_time`).
    #[tokio::test(start_paused = true)]
    async fn alone_it_limits_like_the_in_memory_backend() {
        let quotas = SharedQuotas::new("tg");
        let limit = quotas.limit("design", "client", "client", spec("10/m", 2), false);
        let first = allowed(limit.check(None));
        assert_eq!((first.remaining, first.reset_secs), (1, 6));
        assert_eq!(allowed(limit.check(None)).remaining, 0);
        let refused = denied(limit.check(None));
        assert_eq!(refused.retry_after, Duration::from_secs(6));
        tokio::time::advance(Duration::from_millis(5999)).await;
        denied(limit.check(None));
        tokio::time::advance(Duration::from_millis(1)).await;
        allowed(limit.check(None));
    }

    #[tokio::test(start_paused = true)]
    async fn a_round_reports_what_was_admitted_and_settles_to_the_fleets_backlog() {
        let quotas = SharedQuotas::new("tg");
        let limit = quotas.limit("design", "client", "client", spec("10/m", 5), false);
        allowed(limit.check(None));
        allowed(limit.check(None));
        let reports = SharedQuotas::reports(&quotas.live());
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].redis_key, "tg:quota:design:client");
        assert_eq!(reports[0].member, None);
        assert_eq!(reports[0].count, 2);
        assert_eq!(reports[0].gcra.interval_micros(), 6_000_000);
        // While the round is out, one more here.
        allowed(limit.check(None));
        // The fleet has admitted 4 in all (the other instances 2, unseen here):
        // with the one since the report, 5 of 5 are spent.
        let report = &reports[0];
        let now = quotas.clock.now().as_u64();
        report
            .bucket
            .settle(report.gcra, now, 4 * report.gcra.interval);
        let refused = denied(limit.check(None));
        assert_eq!(refused.retry_after, Duration::from_secs(6));
        // The next round reports only the one admitted since; a failed
        // round's are forgotten.
        assert_eq!(SharedQuotas::reports(&quotas.live())[0].count, 1);
        tokio::time::advance(Duration::from_secs(6)).await;
        allowed(limit.check(None));
        quotas.discard_unreported();
        assert_eq!(SharedQuotas::reports(&quotas.live())[0].count, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_overshoot_is_debt_paid_back_before_more_is_admitted() {
        let quotas = SharedQuotas::new("tg");
        let limit = quotas.limit("design", "client", "client", spec("1/s", 2), false);
        let report = SharedQuotas::reports(&quotas.live()).pop().unwrap();
        // The fleet ran 3 s past a full bucket (other instances admitted
        // before they heard of each other).
        let now = quotas.clock.now().as_u64();
        report
            .bucket
            .settle(report.gcra, now, 5 * report.gcra.interval);
        assert_eq!(
            denied(limit.check(None)).retry_after,
            Duration::from_secs(4)
        );
        tokio::time::advance(Duration::from_millis(3999)).await;
        denied(limit.check(None));
        tokio::time::advance(Duration::from_millis(1)).await;
        allowed(limit.check(None));
    }

    #[tokio::test(start_paused = true)]
    async fn per_key_buckets_are_reported_by_key_id_and_learned_from_the_fleet() {
        let quotas = SharedQuotas::new("tg");
        let limit = quotas.limit("design", "per_key", "per_key", spec("1/s", 1), true);
        let (a, b, c) = (
            KeyDigest::of_key("tg_a"),
            KeyDigest::of_key("tg_b"),
            KeyDigest::of_key("tg_c"),
        );
        allowed(limit.check(Some(&a)));
        denied(limit.check(Some(&a)));
        allowed(limit.check(Some(&b)));
        allowed(limit.check(None));
        let mut reports: Vec<_> = SharedQuotas::reports(&quotas.live())
            .into_iter()
            .map(|r| (r.redis_key, r.member.unwrap(), r.count))
            .collect();
        reports.sort();
        let mut expected = vec![
            (
                "tg:quota:design:per_key".to_owned(),
                hex::encode(a.shared_id()),
                1,
            ),
            (
                "tg:quota:design:per_key".to_owned(),
                hex::encode(b.shared_id()),
                1,
            ),
        ];
        expected.sort();
        assert_eq!(reports, expected);
        assert!(
            SharedQuotas::reports(&quotas.live()).is_empty(),
            "nothing new to report"
        );

        // The fleet spent key c's permit elsewhere: its first request here is refused.
        let now = quotas.clock.now().as_u64();
        limit.settle_active(&[(hex::encode(c.shared_id()), 1_000_000)], now);
        assert_eq!(
            denied(limit.check(Some(&c))).retry_after,
            Duration::from_secs(1)
        );

        tokio::time::advance(Duration::from_secs(1)).await;
        limit.retain_recent();
        let Buckets::PerKey(buckets) = &limit.buckets else {
            panic!()
        };
        assert!(read(buckets).is_empty(), "full again: forgotten");
    }

    #[tokio::test(start_paused = true)]
    async fn quotas_a_reload_dropped_are_no_longer_reported() {
        let quotas = SharedQuotas::new("tg");
        let kept = quotas.limit("design", "client", "client", spec("1/s", 1), false);
        let dropped = quotas.limit("research", "client", "client", spec("1/s", 1), false);
        assert_eq!(quotas.live().len(), 2);
        drop(dropped);
        let reports = SharedQuotas::reports(&quotas.live());
        assert_eq!(reports.len(), 1);
        assert_eq!(reports[0].redis_key, "tg:quota:design:client");
        assert_eq!(lock(&quotas.limits).len(), 1);
        drop(kept);
    }
}
