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
//! - Look-ups try this thread's front first (the `front` module): a few
//!   entries the thread hit lately, served without moka's per-read writes.
//!   The stamp check above applies to them the same way; moka's removal
//!   listener flags every entry it lets go of, so the front never returns
//!   one moka replaced, invalidated, expired or evicted.
//! - The in-flight map coalesces concurrent misses for one key into one fill.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::sync::watch;
use tokio::time::Instant;

use super::front;
use super::policy::{CACHE_STATUS, CacheKey, Partition, Scope};
use crate::fields::EncodedFields;
use crate::telemetry::metrics::Metrics;

/// A complete response, as stored (or as shared with coalesced waiters).
#[derive(Debug)]
pub struct CachedResponse {
    pub status: StatusCode,
    /// End-to-end headers as the upstream sent them (plus a generated `ETag`
    /// if it sent none; its `Cache-Status` apart, below), encoded once for
    /// the hits that share them.
    pub fields: Arc<EncodedFields>,
    /// The `Cache-Status` members the upstream's answer came with, from
    /// caches nearer the origin. Kept out of `fields`: each answer lists
    /// them and then its own member, last (RFC 9211 §2).
    pub prior_cache_status: Box<[HeaderValue]>,
    pub body: Bytes,
    pub etag: Option<HeaderValue>,
    pub stored_at: Instant,
    pub ttl: Duration,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    /// The generations current when the fill began.
    pub stamp: Stamp,
    /// What the store has found out about the entry since; set by the
    /// store ([`EntryState::default`] in every new response).
    pub state: EntryState,
}

/// What the store knows about a stored entry beyond its contents.
#[derive(Debug)]
pub struct EntryState {
    /// The generation epoch in which the entry's stamp was last found
    /// current (see the module docs), or `u64::MAX`: never.
    verified_in: AtomicU64,
    /// moka let go of the entry (replaced, invalidated, expired or evicted):
    /// the per-thread front must not return it any more.
    removed: AtomicBool,
}

impl Default for EntryState {
    /// Never checked, not removed.
    fn default() -> Self {
        EntryState {
            verified_in: AtomicU64::new(u64::MAX),
            removed: AtomicBool::new(false),
        }
    }
}

impl EntryState {
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::SeqCst)
    }

    /// Called by the store when moka lets go of the entry.
    pub(super) fn mark_removed(&self) {
        self.removed.store(true, Ordering::SeqCst);
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
        let prior_cache_status = self
            .prior_cache_status
            .iter()
            .map(|member| (&CACHE_STATUS, member));
        let headers: usize = self
            .headers()
            .iter()
            .chain(prior_cache_status)
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

#[cfg(test)]
impl Stamp {
    pub fn test_value() -> Self {
        Stamp([0; 5])
    }
}

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
        if entry.state.verified_in.load(Ordering::SeqCst) == self.epoch.load(Ordering::SeqCst) {
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
            .state
            .verified_in
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
    /// This store among all in the process, for the per-thread front's slots.
    id: u64,
    entries: moka::sync::Cache<CacheKey, Arc<CachedResponse>, foldhash::fast::RandomState>,
    generations: Generations,
    inflight: Mutex<HashMap<CacheKey, Inflight, foldhash::fast::RandomState>>,
    next_fill: AtomicU64,
    max_bytes: u64,
    pub max_entry_bytes: usize,
    metrics: Arc<Metrics>,
    /// While set, nothing is served from the store and nothing is stored:
    /// the gateway's instances share invalidations (`crate::shared`) and
    /// this one is not hearing them.
    paused: AtomicBool,
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
            .eviction_listener(move |_key, value: Arc<CachedResponse>, cause| {
                value.state.mark_removed();
                if cause == moka::notification::RemovalCause::Size {
                    evictions.cache_evicted();
                }
            })
            .support_invalidation_closures()
            // Keys hold the whole target string; SipHash over it on every hit was measurable.
            .build_with_hasher(foldhash::fast::RandomState::default());
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Store {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            entries,
            generations: Generations::new(generation_limit),
            inflight: Mutex::new(HashMap::default()),
            next_fill: AtomicU64::new(1),
            max_bytes,
            max_entry_bytes,
            metrics,
            paused: AtomicBool::new(false),
        }
    }

    /// Stops serving and storing entries (see `paused`).
    pub fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
    }

    /// Purges everything, then serves and stores again: whatever an
    /// invalidation missed while paused would have hit is gone.
    pub fn resume_flushed(&self) {
        self.purge_all();
        self.paused.store(false, Ordering::SeqCst);
    }

    pub fn is_paused(&self) -> bool {
        // Acquire, paired with `resume_flushed`'s store: a lookup that sees
        // the store unpaused sees the purge before it too. (A plain load on x86.)
        self.paused.load(Ordering::Acquire)
    }

    /// The generations a fill for `scope` in `partition` starts under.
    pub fn stamp(&self, partition: Partition, scope: &Scope) -> Stamp {
        let levels = self.generations.levels(partition, scope);
        Generations::stamp_locked(&self.generations.lock(), &levels)
    }

    /// A stored entry that is still valid (not invalidated since its fill began).
    /// Invalidated entries are removed on sight.
    ///
    /// Looked up in this thread's front first (see the `front` module); either way the
    /// entry's stamp is checked here.
    pub fn get(&self, key: &CacheKey, scope: &Scope) -> Option<Arc<CachedResponse>> {
        if self.is_paused() {
            return None;
        }
        let hash = front::hash(key);
        if let Some(entry) = front::lookup(self.id, hash, key) {
            if self.generations.is_current(key.partition, scope, &entry) {
                return Some(entry);
            }
        }
        match self.entries.get(key) {
            Some(entry) if self.generations.is_current(key.partition, scope, &entry) => {
                front::remember(self.id, hash, key, &entry);
                Some(entry)
            }
            found => {
                if found.is_some() {
                    self.entries.invalidate(key);
                }
                front::forget(self.id, hash, key);
                None
            }
        }
    }

    /// Stores `response` unless its stamp went out of date while it was fetched.
    /// Returns whether it was stored.
    pub fn insert(&self, key: CacheKey, scope: &Scope, response: Arc<CachedResponse>) -> bool {
        let levels = self.generations.levels(key.partition, scope);
        // Under the generations lock, so no invalidation can slip between check and insert.
        let counters = self.generations.lock();
        // Checked under the lock too: `resume_flushed` purges (and so bumps
        // the stamp of every fill before it) before it unpauses.
        if self.is_paused() || Generations::stamp_locked(&counters, &levels) != response.stamp {
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
            prior_cache_status: Box::default(),
            body: Bytes::from_static(body),
            etag: None,
            stored_at: Instant::now(),
            ttl: Duration::from_secs(ttl),
            stale_while_revalidate: Duration::from_secs(5),
            stale_if_error: Duration::from_secs(60),
            stamp,
            state: EntryState::default(),
        })
    }

    /// A store holding one list page of team a (`body`), its scope and key.
    fn one_stored_list(body: &'static [u8]) -> (Store, Scope, CacheKey) {
        let store = Store::new(1 << 20, 1 << 16, Arc::default());
        let lists = scope("assets", None);
        let mine = key(team("a"), "/l");
        assert!(fill_now(&store, mine.clone(), &lists, body));
        (store, lists, mine)
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
        let (store, lists, mine) = one_stored_list(b"x");
        let epoch = || store.generations.epoch.load(Ordering::SeqCst);
        let checked_in = |entry: &CachedResponse| entry.state.verified_in.load(Ordering::SeqCst);
        get_into_front(&store, &mine, &lists);
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

    /// Looks `key` up until it is in this thread's front (the second moka
    /// look-up admits it); the body found.
    fn get_into_front(store: &Store, key: &CacheKey, scope: &Scope) -> Bytes {
        let first = store.get(key, scope).expect("stored").body.clone();
        assert_eq!(store.get(key, scope).expect("stored").body, first);
        assert!(
            front::lookup(store.id, front::hash(key), key).is_some(),
            "in the front now"
        );
        first
    }

    /// The front is per thread and shared by every store on it (tests run
    /// many gateways in one process): a slot answers only for its own store
    /// and its own whole key, team included.
    #[test]
    fn the_front_answers_only_for_its_own_store_and_team() {
        let lists = scope("assets", None);
        let stores = [
            Store::new(1 << 20, 1 << 16, Arc::default()),
            Store::new(1 << 20, 1 << 16, Arc::default()),
        ];
        let bodies: [[&'static [u8]; 2]; 2] = [
            [b"store 0 team a", b"store 0 team b"],
            [b"store 1 team a", b"store 1 team b"],
        ];
        for (store, bodies) in stores.iter().zip(bodies) {
            for (name, body) in ["a", "b"].into_iter().zip(bodies) {
                assert!(fill_now(store, key(team(name), "/l"), &lists, body));
            }
        }
        for _ in 0..3 {
            for (store, bodies) in stores.iter().zip(bodies) {
                for (name, body) in ["a", "b"].into_iter().zip(bodies) {
                    assert_eq!(get_into_front(store, &key(team(name), "/l"), &lists), body);
                }
            }
        }
    }

    /// A refresh replaces an entry the front holds: the next look-up, on any
    /// thread, returns the replacement (moka's removal listener flags the old one).
    #[test]
    fn a_replacement_is_returned_at_once_though_the_front_held_the_old_entry() {
        let (store, lists, mine) = one_stored_list(b"old");
        assert_eq!(get_into_front(&store, &mine, &lists), "old");
        let on_another_thread = std::thread::scope(|threads| {
            threads
                .spawn(|| get_into_front(&store, &mine, &lists))
                .join()
                .expect("reader")
        });
        assert_eq!(on_another_thread, "old");
        assert!(fill_now(&store, mine.clone(), &lists, b"new"));
        assert_eq!(store.get(&mine, &lists).expect("stored").body, "new");
        let on_another_thread = std::thread::scope(|threads| {
            threads
                .spawn(|| store.get(&mine, &lists).expect("stored").body.clone())
                .join()
                .expect("reader")
        });
        assert_eq!(on_another_thread, "new");
    }

    /// An entry moka removed without a write (evicted for room, or removed
    /// by hand) is not returned from the front either.
    #[test]
    fn entries_moka_let_go_of_are_not_returned_from_the_front() {
        let (store, lists, mine) = one_stored_list(b"x");
        get_into_front(&store, &mine, &lists);
        store.entries.invalidate(&mine);
        assert!(store.get(&mine, &lists).is_none());
        assert_eq!(front::slots_in_use(store.id), 0, "and the slot is freed");

        // Evicted for room: a 64 KiB store, then 16 KiB more entries than fit.
        let small = Store::new(64 * 1024, 16 * 1024, Arc::default());
        static BODY: [u8; 8 * 1024] = [7; 8 * 1024];
        let first = key(team("a"), "/0");
        assert!(fill_now(&small, first.clone(), &lists, &BODY));
        get_into_front(&small, &first, &lists);
        for i in 1..40 {
            let newer = key(team("a"), &format!("/{i}"));
            assert!(fill_now(&small, newer.clone(), &lists, &BODY));
            // Read more often than `first` (straight from moka, past the
            // front), so moka's admission policy prefers them to it.
            for _ in 0..8 {
                small.entries.get(&newer);
            }
            small.entries.run_pending_tasks();
        }
        assert!(!small.entries.contains_key(&first), "evicted for room");
        assert!(small.get(&first, &lists).is_none(), "evicted, yet answered");
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
