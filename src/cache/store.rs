//! Where cached responses live, and the bookkeeping that keeps them correct.
//!
//! - Entries sit in a moka cache bounded in bytes (weigher over key, headers
//!   and body; TinyLFU admission and eviction). moka's own expiry only frees
//!   memory (TTL + grace); freshness is judged against tokio's clock, so
//!   tests can pause and advance time.
//! - `Generations` closes the fill-versus-invalidate race. A fill is stamped
//!   with the generations of its scope *before* it goes upstream; a write that
//!   returns 2xx bumps the generations of the scopes it touched before its
//!   answer reaches the client. An entry (or an in-flight fill) whose stamp is
//!   no longer current is neither stored, nor served, nor joined.
//! - Hits do not take the generations lock. Every bump also advances one
//!   epoch counter, and an entry remembers the epoch its stamp was last found
//!   current at (under the lock). A hit whose entry was checked in the
//!   current epoch is served on two atomic loads; after any bump, the next hit
//!   on each entry checks its stamp under the lock again. So the lock is
//!   taken by writes and by the first hit on each entry after a write, not by
//!   every hit on every core.
//! - The in-flight map coalesces concurrent misses for one key into one fill.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::sync::watch;
use tokio::time::Instant;

use super::policy::{CacheKey, Partition, Scope};
use crate::fields::EncodedFields;
use crate::telemetry::metrics::Metrics;

/// A complete response, as stored (or as shared with coalesced waiters).
#[derive(Debug)]
pub struct CachedResponse {
    pub status: StatusCode,
    /// End-to-end headers as the upstream sent them (plus a generated `ETag`
    /// if it sent none), encoded once for the hits that share them.
    pub fields: Arc<EncodedFields>,
    pub body: Bytes,
    pub etag: Option<HeaderValue>,
    pub stored_at: Instant,
    pub ttl: Duration,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    /// The generations current when the fill began.
    pub stamp: Stamp,
    /// The generation epoch in which `stamp` was last found current (see the
    /// module docs); [`Verified::default`] until it is stored.
    pub verified: Verified,
}

/// The epoch an entry's stamp was last checked in, or never.
#[derive(Debug)]
pub struct Verified(AtomicU64);

impl Default for Verified {
    /// Never: no epoch has this value.
    fn default() -> Self {
        Verified(AtomicU64::new(u64::MAX))
    }
}

/// How usable an entry is at a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Within its TTL; the value is the whole seconds left.
    Fresh(u64),
    /// Expired, but within `stale-while-revalidate`.
    Revalidatable,
    /// Expired, but within `stale-if-error`.
    ErrorFallback,
    /// Of no further use.
    Dead,
}

impl CachedResponse {
    pub fn headers(&self) -> &HeaderMap {
        self.fields.map()
    }

    pub fn age(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.stored_at)
    }

    /// Seconds of freshness left; negative once expired.
    pub fn ttl_left(&self, now: Instant) -> i64 {
        let age = self.age(now);
        if age <= self.ttl {
            (self.ttl - age).as_secs() as i64
        } else {
            -((age - self.ttl).as_secs() as i64) - 1
        }
    }

    pub fn freshness(&self, now: Instant) -> Freshness {
        let age = self.age(now);
        if age < self.ttl {
            Freshness::Fresh((self.ttl - age).as_secs())
        } else if age < self.ttl + self.stale_while_revalidate {
            Freshness::Revalidatable
        } else if age < self.ttl + self.stale_if_error {
            Freshness::ErrorFallback
        } else {
            Freshness::Dead
        }
    }

    /// Bytes this entry costs: body, headers and bookkeeping.
    fn weight(&self) -> usize {
        let headers: usize = self
            .headers()
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 32)
            .sum();
        self.body.len()
            + headers
            + self.fields.encoded_len()
            + std::mem::size_of::<Self>()
            + std::mem::size_of::<EncodedFields>()
    }
}

/// The generations an entry was filled under: global, upstream, partition,
/// scope family, scope member. Valid while all five are unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp([u64; 5]);

/// Monotonic generation counters for every level a purge or write can touch.
///
/// Counters are keyed by a hash of the level's identity. Two identities that
/// collide share a counter, which can only cause extra misses, never a stale hit.
#[derive(Debug)]
struct Generations {
    /// Source of new generation values: each bump takes a never-used value, so
    /// a stamp can never become valid again.
    next: AtomicU64,
    /// Advanced by every bump, under the lock: a stamp found current under the
    /// lock stays current for as long as the epoch does not move.
    epoch: AtomicU64,
    counters: Mutex<HashMap<u64, u64, foldhash::fast::RandomState>>,
    hasher: foldhash::fast::RandomState,
    /// How many counters are kept before the table is reset (see `bump_locked`).
    limit: usize,
}

/// Counters kept before a reset: one per invalidated scope member (asset id)
/// and family, per team — about 5 MiB at this size.
const GENERATION_LIMIT: usize = 100_000;

#[derive(Hash)]
enum Level<'a> {
    Global,
    Upstream(usize),
    Partition(Partition),
    Family(Partition, &'a str),
    Member(Partition, &'a str, &'a str),
}

impl Generations {
    fn new(limit: usize) -> Self {
        Generations {
            next: AtomicU64::new(1),
            epoch: AtomicU64::new(0),
            counters: Mutex::new(HashMap::default()),
            hasher: foldhash::fast::RandomState::default(),
            limit,
        }
    }

    fn id(&self, level: Level<'_>) -> u64 {
        self.hasher.hash_one(level)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, u64, foldhash::fast::RandomState>> {
        self.counters
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn levels(&self, partition: Partition, scope: &Scope) -> [u64; 5] {
        let family = &*scope.family;
        [
            self.id(Level::Global),
            self.id(Level::Upstream(partition.upstream())),
            self.id(Level::Partition(partition)),
            self.id(Level::Family(partition, family)),
            // An entry without a member still gets a distinct (never bumped) level.
            self.id(Level::Member(
                partition,
                family,
                scope.member.as_deref().unwrap_or(""),
            )),
        ]
    }

    fn stamp_locked(
        counters: &HashMap<u64, u64, foldhash::fast::RandomState>,
        levels: &[u64; 5],
    ) -> Stamp {
        Stamp(levels.map(|level| counters.get(&level).copied().unwrap_or(0)))
    }

    fn bump_locked(
        &self,
        counters: &mut HashMap<u64, u64, foldhash::fast::RandomState>,
        level: u64,
    ) {
        if counters.len() >= self.limit {
            // Bounded memory: forget every counter and move the global level to a
            // never-used value. Every existing stamp then fails — a full flush,
            // never a stale hit — and the table starts over.
            counters.clear();
            let global = self.next.fetch_add(1, Ordering::Relaxed);
            counters.insert(self.id(Level::Global), global);
        }
        let generation = self.next.fetch_add(1, Ordering::Relaxed);
        counters.insert(level, generation);
        // SeqCst (as the loads in `Store::get`): a hit that begins after this
        // bump's write was answered sees the new epoch and checks the stamp.
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// Whether `entry`'s stamp is current: at once if it was found so in this
    /// epoch, else checked under the lock (and remembered if it is).
    fn is_current(&self, partition: Partition, scope: &Scope, entry: &CachedResponse) -> bool {
        if entry.verified.0.load(Ordering::SeqCst) == self.epoch.load(Ordering::SeqCst) {
            return true;
        }
        let levels = self.levels(partition, scope);
        let counters = self.lock();
        if Self::stamp_locked(&counters, &levels) != entry.stamp {
            return false;
        }
        self.mark_current(&counters, entry);
        true
    }

    /// Records that `entry`'s stamp is current in this epoch. Takes the
    /// locked counters: under the lock the epoch cannot move between the
    /// caller's check and this.
    fn mark_current(
        &self,
        _locked: &HashMap<u64, u64, foldhash::fast::RandomState>,
        entry: &CachedResponse,
    ) {
        entry
            .verified
            .0
            .store(self.epoch.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

/// One fill in progress, that concurrent misses for the same key can wait on.
#[derive(Debug)]
struct Inflight {
    id: u64,
    stamp: Stamp,
    outcome: watch::Receiver<Option<Outcome>>,
    /// Requests waiting on this fill right now.
    waiters: Arc<AtomicUsize>,
}

/// Held by a waiting request; counts it in [`Stats::waiting`] until dropped.
#[derive(Debug)]
pub struct WaitTicket(Arc<AtomicUsize>);

impl Drop for WaitTicket {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What a fill produced, for everyone who waited on it.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// A complete response: stored if `stored`, else only shared (errors, uncacheable).
    Shared {
        response: Arc<CachedResponse>,
        stored: bool,
    },
    /// The response streamed to the fill's leader (too big to buffer); every
    /// waiter must go upstream on its own.
    Refetch,
}

/// The caller's role for a key: fill it, or wait for the fill in progress.
#[derive(Debug)]
pub enum Join {
    Leader {
        id: u64,
        outcome: watch::Sender<Option<Outcome>>,
    },
    Waiter(watch::Receiver<Option<Outcome>>, WaitTicket),
}

/// The cache's storage: entries, generations, fills in progress.
pub struct Store {
    entries: moka::sync::Cache<CacheKey, Arc<CachedResponse>, foldhash::fast::RandomState>,
    generations: Generations,
    inflight: Mutex<HashMap<CacheKey, Inflight, foldhash::fast::RandomState>>,
    next_fill: AtomicU64,
    max_bytes: u64,
    pub max_entry_bytes: usize,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("entries", &self.entries.entry_count())
            .field("max_bytes", &self.max_bytes)
            .field("max_entry_bytes", &self.max_entry_bytes)
            .finish()
    }
}

/// moka expiry: free an entry once even its stale windows are over.
struct UntilUseless;

impl UntilUseless {
    fn lifetime(value: &CachedResponse) -> Duration {
        value.ttl + value.stale_while_revalidate.max(value.stale_if_error)
    }
}

impl moka::Expiry<CacheKey, Arc<CachedResponse>> for UntilUseless {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        value: &Arc<CachedResponse>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(Self::lifetime(value))
    }

    /// A replacement (a refresh) gets its own lifetime: moka's default keeps
    /// the replaced entry's remaining one.
    fn expire_after_update(
        &self,
        _key: &CacheKey,
        value: &Arc<CachedResponse>,
        _updated_at: std::time::Instant,
        _duration_until_expiry: Option<Duration>,
    ) -> Option<Duration> {
        Some(Self::lifetime(value))
    }
}

/// Numbers for the admin API and metrics.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Stats {
    pub entries: u64,
    pub bytes: u64,
    /// Fills running now (one per key at most, background refreshes included).
    pub fills_in_progress: usize,
    /// Requests waiting on a fill another request started (coalesced misses).
    pub waiting: usize,
    pub max_bytes: u64,
    pub max_entry_bytes: usize,
}

impl Store {
    pub fn new(max_bytes: u64, max_entry_bytes: usize, metrics: Arc<Metrics>) -> Self {
        Self::with_generation_limit(max_bytes, max_entry_bytes, GENERATION_LIMIT, metrics)
    }

    fn with_generation_limit(
        max_bytes: u64,
        max_entry_bytes: usize,
        generation_limit: usize,
        metrics: Arc<Metrics>,
    ) -> Self {
        let evictions = Arc::clone(&metrics);
        let entries = moka::sync::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|key: &CacheKey, value: &Arc<CachedResponse>| {
                u32::try_from(key.weight() + value.weight()).unwrap_or(u32::MAX)
            })
            .expire_after(UntilUseless)
            .eviction_listener(move |_key, _value, cause| {
                if cause == moka::notification::RemovalCause::Size {
                    evictions.cache_evicted();
                }
            })
            .support_invalidation_closures()
            // Keys hold the whole target string; SipHash over it on every hit was measurable.
            .build_with_hasher(foldhash::fast::RandomState::default());
        Store {
            entries,
            generations: Generations::new(generation_limit),
            inflight: Mutex::new(HashMap::default()),
            next_fill: AtomicU64::new(1),
            max_bytes,
            max_entry_bytes,
            metrics,
        }
    }

    /// The generations a fill for `scope` in `partition` starts under.
    pub fn stamp(&self, partition: Partition, scope: &Scope) -> Stamp {
        let levels = self.generations.levels(partition, scope);
        Generations::stamp_locked(&self.generations.lock(), &levels)
    }

    /// A stored entry that is still valid (not invalidated since its fill began).
    /// Invalidated entries are removed on sight.
    pub fn get(&self, key: &CacheKey, scope: &Scope) -> Option<Arc<CachedResponse>> {
        let entry = self.entries.get(key)?;
        if self.generations.is_current(key.partition, scope, &entry) {
            Some(entry)
        } else {
            self.entries.invalidate(key);
            None
        }
    }

    /// Stores `response` unless its stamp went out of date while it was fetched.
    /// Returns whether it was stored.
    pub fn insert(&self, key: CacheKey, scope: &Scope, response: Arc<CachedResponse>) -> bool {
        let levels = self.generations.levels(key.partition, scope);
        // Under the generations lock, so no invalidation can slip between check and insert.
        let counters = self.generations.lock();
        if Generations::stamp_locked(&counters, &levels) != response.stamp {
            return false;
        }
        self.generations.mark_current(&counters, &response);
        self.entries.insert(key.detached(), response);
        self.metrics.cache_stored();
        true
    }

    /// A write answered 2xx: every entry of these scopes (in this partition) is now stale.
    pub fn invalidate(&self, partition: Partition, scopes: &[Scope]) {
        let mut counters = self.generations.lock();
        for scope in scopes {
            let level = match &scope.member {
                None => self.generations.id(Level::Family(partition, &scope.family)),
                Some(member) => {
                    self.generations
                        .id(Level::Member(partition, &scope.family, member))
                }
            };
            self.generations.bump_locked(&mut counters, level);
        }
    }

    /// Purges everything.
    pub fn purge_all(&self) {
        let level = self.generations.id(Level::Global);
        self.generations
            .bump_locked(&mut self.generations.lock(), level);
        self.entries.invalidate_all();
    }

    /// Purges one upstream's entries, every team's and the shared ones.
    pub fn purge_upstream(&self, upstream: usize) {
        let level = self.generations.id(Level::Upstream(upstream));
        self.generations
            .bump_locked(&mut self.generations.lock(), level);
        let _ = self
            .entries
            .invalidate_entries_if(move |key, _| key.partition.upstream() == upstream);
    }

    /// Purges the given partitions (one team's, across upstreams).
    pub fn purge_partitions(&self, partitions: Vec<Partition>) {
        {
            let mut counters = self.generations.lock();
            for partition in &partitions {
                let level = self.generations.id(Level::Partition(*partition));
                self.generations.bump_locked(&mut counters, level);
            }
        }
        let _ = self
            .entries
            .invalidate_entries_if(move |key, _| partitions.contains(&key.partition));
    }

    /// Become the filler for `key`, or wait on the fill already running under
    /// the same (still current) stamp. `coalesce: false` always leads.
    pub fn join(&self, key: &CacheKey, stamp: Stamp, coalesce: bool) -> Join {
        let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if coalesce {
            if let Some(fill) = inflight.get(key).filter(|fill| fill.stamp == stamp) {
                fill.waiters.fetch_add(1, Ordering::Relaxed);
                return Join::Waiter(fill.outcome.clone(), WaitTicket(Arc::clone(&fill.waiters)));
            }
        }
        let id = self.next_fill.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = watch::channel(None);
        inflight.insert(
            key.detached(),
            Inflight {
                id,
                stamp,
                outcome: receiver,
                waiters: Arc::new(AtomicUsize::new(0)),
            },
        );
        Join::Leader {
            id,
            outcome: sender,
        }
    }

    /// The fill `id` is over: later misses start a new one.
    pub fn finish(&self, key: &CacheKey, id: u64) {
        let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if inflight.get(key).is_some_and(|fill| fill.id == id) {
            inflight.remove(key);
        }
    }

    pub fn stats(&self) -> Stats {
        self.entries.run_pending_tasks();
        let (fills_in_progress, waiting) = {
            let inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            let waiting = inflight
                .values()
                .map(|fill| fill.waiters.load(Ordering::Relaxed))
                .sum();
            (inflight.len(), waiting)
        };
        Stats {
            entries: self.entries.entry_count(),
            bytes: self.entries.weighted_size(),
            fills_in_progress,
            waiting,
            max_bytes: self.max_bytes,
            max_entry_bytes: self.max_entry_bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::policy::CredentialId;
    use super::*;

    fn team(name: &str) -> Partition {
        Partition::Team {
            upstream: 0,
            credential: CredentialId::of(name),
        }
    }

    fn scope(family: &str, member: Option<&str>) -> Scope {
        Scope {
            family: family.into(),
            member: member.map(Into::into),
        }
    }

    fn key(partition: Partition, target: &str) -> CacheKey {
        CacheKey::new(partition, target, &HeaderMap::new())
    }

    fn response(stamp: Stamp, body: &'static [u8], ttl: u64) -> Arc<CachedResponse> {
        Arc::new(CachedResponse {
            status: StatusCode::OK,
            fields: Arc::new(EncodedFields::new(HeaderMap::new())),
            body: Bytes::from_static(body),
            etag: None,
            stored_at: Instant::now(),
            ttl: Duration::from_secs(ttl),
            stale_while_revalidate: Duration::from_secs(5),
            stale_if_error: Duration::from_secs(60),
            stamp,
            verified: Verified::default(),
        })
    }

    /// Stores `body` under `key` as a fill that began now; whether it was stored.
    fn fill_now(store: &Store, key: CacheKey, scope: &Scope, body: &'static [u8]) -> bool {
        let stamp = store.stamp(key.partition, scope);
        store.insert(key, scope, response(stamp, body, 30))
    }

    #[test]
    fn a_fill_that_started_before_an_invalidation_is_not_stored() {
        let store = Store::new(1 << 20, 1 << 16, Arc::default());
        let lists = scope("assets", None);
        let before = store.stamp(team("a"), &lists);
        store.invalidate(team("a"), std::slice::from_ref(&lists));
        assert!(!store.insert(key(team("a"), "/l"), &lists, response(before, b"old", 30)));
        assert!(store.get(&key(team("a"), "/l"), &lists).is_none());
        assert!(fill_now(&store, key(team("a"), "/l"), &lists, b"new"));
        assert_eq!(
            store.get(&key(team("a"), "/l"), &lists).unwrap().body,
            "new"
        );
    }

    #[test]
    fn invalidation_is_per_partition_and_per_scope_and_families_cover_members() {
        let store = Store::new(1 << 20, 1 << 16, Arc::default());
        let lists = scope("assets", None);
        let one = scope("asset", Some("1"));
        let two = scope("asset", Some("2"));
        for (partition, s, target) in [
            (team("a"), &lists, "/l"),
            (team("b"), &lists, "/l"),
            (team("a"), &one, "/1"),
            (team("a"), &two, "/2"),
        ] {
            assert!(fill_now(&store, key(partition, target), s, b"x"));
        }
        store.invalidate(team("a"), std::slice::from_ref(&one));
        assert!(
            store.get(&key(team("a"), "/1"), &one).is_none(),
            "the member"
        );
        assert!(
            store.get(&key(team("a"), "/2"), &two).is_some(),
            "not its sibling"
        );
        assert!(
            store.get(&key(team("a"), "/l"), &lists).is_some(),
            "not another family"
        );
        store.invalidate(team("a"), &[scope("asset", None)]);
        assert!(
            store.get(&key(team("a"), "/2"), &two).is_none(),
            "the family covers members"
        );
        store.invalidate(team("a"), std::slice::from_ref(&lists));
        assert!(store.get(&key(team("a"), "/l"), &lists).is_none());
        assert!(
            store.get(&key(team("b"), "/l"), &lists).is_some(),
            "other teams keep theirs"
        );
    }

    #[test]
    fn purges_by_team_upstream_and_all() {
        let store = Store::new(1 << 20, 1 << 16, Arc::default());
        let lists = scope("assets", None);
        let shared = Partition::Shared { upstream: 0 };
        let other_upstream = Partition::Team {
            upstream: 1,
            credential: CredentialId::of("a"),
        };
        let insert = |partition| {
            assert!(fill_now(&store, key(partition, "/l"), &lists, b"x"));
        };
        for partition in [team("a"), team("b"), shared, other_upstream] {
            insert(partition);
        }
        store.purge_partitions(vec![team("a")]);
        assert!(store.get(&key(team("a"), "/l"), &lists).is_none());
        assert!(store.get(&key(team("b"), "/l"), &lists).is_some());
        store.purge_upstream(0);
        assert!(store.get(&key(team("b"), "/l"), &lists).is_none());
        assert!(store.get(&key(shared, "/l"), &lists).is_none());
        assert!(store.get(&key(other_upstream, "/l"), &lists).is_some());
        store.purge_all();
        assert!(store.get(&key(other_upstream, "/l"), &lists).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn freshness_follows_the_tokio_clock() {
        let entry = response(Stamp([0; 5]), b"x", 30);
        assert_eq!(entry.freshness(Instant::now()), Freshness::Fresh(30));
        tokio::time::advance(Duration::from_secs(29)).await;
        assert_eq!(entry.freshness(Instant::now()), Freshness::Fresh(1));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(entry.freshness(Instant::now()), Freshness::Revalidatable);
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(entry.freshness(Instant::now()), Freshness::ErrorFallback);
        tokio::time::advance(Duration::from_secs(55)).await;
        assert_eq!(entry.freshness(Instant::now()), Freshness::Dead);
    }

    #[test]
    fn coalescing_joins_only_fills_under_the_current_stamp() {
        let store = Store::new(1 << 20, 1 << 16, Arc::default());
        let lists = scope("assets", None);
        let k = key(team("a"), "/l");
        let stamp = store.stamp(team("a"), &lists);
        let Join::Leader { id, .. } = store.join(&k, stamp, true) else {
            panic!("first is leader")
        };
        assert!(matches!(store.join(&k, stamp, true), Join::Waiter(..)));
        assert!(
            matches!(store.join(&k, stamp, false), Join::Leader { .. }),
            "no-cache leads"
        );
        store.invalidate(team("a"), std::slice::from_ref(&lists));
        let newer = store.stamp(team("a"), &lists);
        assert!(
            matches!(store.join(&k, newer, true), Join::Leader { .. }),
            "never join an outdated fill"
        );
        store.finish(&k, id);
    }

    /// Hits skip the generations lock only while no bump has happened since
    /// their entry was last checked: any write, even another team's, sends
    /// the next hit on every entry back to the lock, and a write to the
    /// entry's own scope keeps it from ever being served again (ARCHITECTURE.md,
    /// cache invariant 4: after a write returns 2xx, nothing fetched before it
    /// is served again for the scopes it touched).
    #[test]
    fn a_hit_is_checked_again_under_the_lock_after_any_write() {
        let store = Store::new(1 << 20, 1 << 16, Arc::default());
        let lists = scope("assets", None);
        let mine = key(team("a"), "/l");
        assert!(fill_now(&store, mine.clone(), &lists, b"x"));
        let epoch = || store.generations.epoch.load(Ordering::SeqCst);
        let checked_in = |entry: &CachedResponse| entry.verified.0.load(Ordering::SeqCst);
        let entry = store.get(&mine, &lists).expect("stored");
        assert_eq!(checked_in(&entry), epoch(), "checked when stored");

        store.invalidate(team("b"), std::slice::from_ref(&lists));
        assert_ne!(
            checked_in(&entry),
            epoch(),
            "another team's write moves the epoch"
        );
        let entry = store
            .get(&mine, &lists)
            .expect("another team's write leaves it current");
        assert_eq!(
            checked_in(&entry),
            epoch(),
            "checked again, in the new epoch"
        );

        store.invalidate(team("a"), std::slice::from_ref(&lists));
        assert!(store.get(&mine, &lists).is_none());
        assert!(
            store.get(&mine, &lists).is_none(),
            "and not on a later look either"
        );
    }

    /// Readers on other threads never get an entry once the write that
    /// invalidated it has returned, however the lock-free check and the
    /// bump interleave. Each round stores a fresh entry, lets two readers
    /// hit it, invalidates it, and has each reader look a bounded number of
    /// times more after it has seen the invalidation complete.
    #[test]
    fn no_thread_hits_an_entry_after_its_invalidation_returned() {
        use std::sync::Barrier;
        use std::sync::atomic::AtomicBool;
        const ROUNDS: usize = 200;
        const LOOKS_AFTER: usize = 200;
        const MAX_LOOKS: usize = 1_000_000;
        let store = Store::new(1 << 20, 1 << 16, Arc::default());
        let lists = scope("assets", None);
        let mine = key(team("a"), "/l");
        for round in 0..ROUNDS {
            assert!(fill_now(&store, mine.clone(), &lists, b"x"));
            let invalidated = AtomicBool::new(false);
            let start = Barrier::new(3);
            std::thread::scope(|threads| {
                for _ in 0..2 {
                    threads.spawn(|| {
                        start.wait();
                        let mut looks_after = 0;
                        for look in 0..MAX_LOOKS {
                            // Now and then, room for the writer on a busy machine.
                            if look % 256 == 255 {
                                std::thread::yield_now();
                            }
                            let was_invalidated = invalidated.load(Ordering::SeqCst);
                            let hit = store.get(&mine, &lists).is_some();
                            if was_invalidated {
                                assert!(
                                    !hit,
                                    "round {round}: a hit after the invalidation returned"
                                );
                                looks_after += 1;
                                if looks_after == LOOKS_AFTER {
                                    return;
                                }
                            }
                        }
                        panic!("round {round}: the invalidation never became visible");
                    });
                }
                start.wait();
                // Another team's write first, so the readers also race a re-check.
                store.invalidate(team("b"), std::slice::from_ref(&lists));
                store.invalidate(team("a"), std::slice::from_ref(&lists));
                invalidated.store(true, Ordering::SeqCst);
            });
        }
    }

    /// A refreshed entry lives its own life in moka, not what was left of
    /// the entry it replaced. moka keeps an updated entry's old expiry unless
    /// told otherwise, which cut every background refresh short: the
    /// replacement vanished when the old entry's stale window ended.
    /// (moka expires by the real clock, so this test waits for real: 300 ms.)
    #[test]
    fn a_replacement_is_kept_for_its_own_lifetime_not_the_old_ones() {
        let store = Store::new(1 << 20, 1 << 16, Arc::default());
        let lists = scope("assets", None);
        let k = key(team("a"), "/l");
        let with_ttl = |ttl: Duration| {
            let mut entry = Arc::try_unwrap(response(store.stamp(team("a"), &lists), b"x", 0))
                .expect("only reference");
            entry.ttl = ttl;
            entry.stale_while_revalidate = Duration::ZERO;
            entry.stale_if_error = Duration::ZERO;
            Arc::new(entry)
        };
        assert!(store.insert(k.clone(), &lists, with_ttl(Duration::from_millis(200))));
        std::thread::sleep(Duration::from_millis(100));
        assert!(store.insert(k.clone(), &lists, with_ttl(Duration::from_secs(60))));
        // Past the first entry's end, well inside the replacement's.
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            store.get(&k, &lists).is_some(),
            "the replacement expired with the entry it replaced"
        );
    }

    #[test]
    fn the_generation_table_is_bounded_and_its_reset_invalidates_rather_than_revives() {
        let store = Store::with_generation_limit(1 << 20, 1 << 16, 8, Arc::default());
        let lists = scope("assets", None);
        let old = store.stamp(team("a"), &lists);
        store.invalidate(team("a"), std::slice::from_ref(&lists));
        // An entry filled before that invalidation must never become valid again.
        for member in 0..50 {
            store.invalidate(team("b"), &[scope("asset", Some(&member.to_string()))]);
        }
        assert!(store.generations.lock().len() <= 8);
        assert!(!store.insert(key(team("a"), "/l"), &lists, response(old, b"old", 30)));
        assert!(fill_now(&store, key(team("a"), "/l"), &lists, b"new"));
    }

    #[test]
    fn memory_stays_within_the_byte_bound() {
        let max = 256 * 1024;
        let store = Store::new(max, 16 * 1024, Arc::default());
        let lists = scope("assets", None);
        static BODY: [u8; 8 * 1024] = [7; 8 * 1024];
        for i in 0..500 {
            let stamp = store.stamp(team("a"), &lists);
            store.insert(
                key(team("a"), &format!("/l?page={i}")),
                &lists,
                response(stamp, &BODY, 30),
            );
        }
        let stats = store.stats();
        assert!(stats.bytes <= max, "{} > {max}", stats.bytes);
        assert!(
            stats.entries > 0 && stats.entries < 500,
            "{} entries",
            stats.entries
        );
    }
}
