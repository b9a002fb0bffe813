//! A per-thread front for the entries each thread hits again and again.
//!
//! moka writes on every read: it queues a read record for its admission and
//! eviction policy, drains that queue under its own lock when it fills, and
//! stamps the entry's access time. On one thread a look-up costs ~115 ns; two
//! threads looking up at once paid 0.44–1.2 µs each (`cache/get_on_two_threads`
//! in `benches/micro.rs`), so cache hits did not scale with cores. The front
//! keeps, per thread, a few entries this thread hit lately and answers repeat
//! look-ups from them without touching moka's shared state.
//!
//! It only shortcuts the look-up; what it returns is what moka would:
//! - A slot matches on the store and the whole key (partition, target,
//!   `Accept`, `Accept-Encoding`); the hash only narrows the scan, so another
//!   team's key never matches.
//! - `Store::get` runs the same generation check on an entry from here as on
//!   one from moka: nothing a completed write invalidated is returned.
//! - An entry moka let go of (replaced by a refresh, invalidated, expired,
//!   evicted) is flagged by the store's eviction listener and not returned.
//!   Evictions reach the listener when moka next does its housekeeping; until
//!   then the entry is still a current, unreplaced one, as it was in moka.
//! - Every [`RECHECK_EVERY`]-th look-up of a slot goes through moka instead,
//!   so moka's admission policy still hears (sampled) how hot an entry is.
//! - Bounded: [`SLOTS`] slots a thread, entries with bodies of at most
//!   [`MAX_BODY_BYTES`]. A key takes a slot only when it is looked up in moka
//!   twice within the last [`SEEN`] moka look-ups of its thread (a
//!   doorkeeper), and slots are reused by the CLOCK rule (a slot hit since the
//!   hand last passed gets another round), so a spread of cold keys neither
//!   churns the hot ones out nor costs a key copy per look-up. An entry moka
//!   dropped that a slot still holds is freed when the slot is reused.

use std::cell::RefCell;
use std::hash::BuildHasher;
use std::sync::Arc;

use super::policy::CacheKey;
use super::store::CachedResponse;

/// Slots per thread.
pub const SLOTS: usize = 16;

/// Bodies bigger than this are always looked up in moka: the front's memory
/// (entries moka may already have dropped) stays under `SLOTS` × this per thread.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// A slot's look-ups between two that go through moka.
pub const RECHECK_EVERY: u32 = 64;

/// Moka look-ups a thread remembers the key hashes of, for admission.
pub const SEEN: usize = 32;

/// The front's hash of a key. Fixed seed: a collision only costs a key
/// comparison (slots compare whole keys), and at most `SLOTS` of them.
pub fn hash(key: &CacheKey) -> u64 {
    const HASHER: foldhash::fast::FixedState = foldhash::fast::FixedState::with_seed(0x7ea_6a7e);
    HASHER.hash_one(key)
}

struct Slot {
    store: u64,
    hash: u64,
    key: CacheKey,
    entry: Arc<CachedResponse>,
    /// Look-ups left before the next one goes through moka.
    until_recheck: u32,
    /// Looked up since the CLOCK hand last passed.
    referenced: bool,
}

impl Slot {
    fn holds(&self, store: u64, hash: u64, key: &CacheKey) -> bool {
        self.hash == hash && self.store == store && self.key == *key
    }
}

struct Front {
    slots: Vec<Slot>,
    hand: usize,
    /// Key hashes of recent moka look-ups that did not take a slot.
    seen: [u64; SEEN],
    next_seen: usize,
}

thread_local! {
    static FRONT: RefCell<Front> = const {
        RefCell::new(Front {
            slots: Vec::new(),
            hand: 0,
            seen: [0; SEEN],
            next_seen: 0,
        })
    };
}

/// Runs `with` on this thread's front; `None` if it is in use further up
/// the stack (never, unless dropping an entry looked something up).
fn with_front<T>(with: impl FnOnce(&mut Front) -> Option<T>) -> Option<T> {
    FRONT
        .try_with(|front| with(&mut *front.try_borrow_mut().ok()?))
        .ok()
        .flatten()
}

/// The entry this thread's front holds for `key` of store `store`, if it
/// may be returned without asking moka (the caller still checks its stamp).
pub fn lookup(store: u64, hash: u64, key: &CacheKey) -> Option<Arc<CachedResponse>> {
    with_front(|front| {
        let slot = front
            .slots
            .iter_mut()
            .find(|slot| slot.holds(store, hash, key))?;
        if slot.until_recheck == 0 || slot.entry.state.is_removed() {
            return None;
        }
        slot.until_recheck -= 1;
        slot.referenced = true;
        Some(Arc::clone(&slot.entry))
    })
}

/// `entry` is what moka holds for `key` now (and its stamp is current): keep
/// it in the slot that has the key, or give it one if the key was looked up
/// in moka recently.
pub fn remember(store: u64, hash: u64, key: &CacheKey, entry: &Arc<CachedResponse>) {
    if entry.body.len() > MAX_BODY_BYTES {
        return;
    }
    with_front(|front| {
        if let Some(slot) = front
            .slots
            .iter_mut()
            .find(|slot| slot.holds(store, hash, key))
        {
            if !Arc::ptr_eq(&slot.entry, entry) {
                slot.entry = Arc::clone(entry);
            }
            slot.until_recheck = RECHECK_EVERY;
            slot.referenced = true;
            return Some(());
        }
        if !front.seen_recently(hash) {
            return None;
        }
        let slot = Slot {
            store,
            hash,
            key: key.detached(),
            entry: Arc::clone(entry),
            until_recheck: RECHECK_EVERY,
            referenced: false,
        };
        if front.slots.len() < SLOTS {
            front.slots.push(slot);
        } else {
            let victim = front.victim();
            front.slots[victim] = slot;
        }
        Some(())
    });
}

/// moka has no current entry for `key`: drop this thread's slot for it.
pub fn forget(store: u64, hash: u64, key: &CacheKey) {
    with_front(|front| {
        let at = front
            .slots
            .iter()
            .position(|slot| slot.holds(store, hash, key))?;
        front.slots.swap_remove(at);
        if front.hand >= front.slots.len() {
            front.hand = 0;
        }
        Some(())
    });
}

impl Front {
    /// Whether `hash` was looked up in moka lately (and then forgets it);
    /// if not, remembers it.
    fn seen_recently(&mut self, hash: u64) -> bool {
        if let Some(at) = self.seen.iter().position(|&seen| seen == hash) {
            self.seen[at] = 0;
            return true;
        }
        self.seen[self.next_seen] = hash;
        self.next_seen = (self.next_seen + 1) % SEEN;
        false
    }

    /// The slot to reuse: the first the hand finds not looked up since it
    /// last passed (clearing the marks it passes). Only called when full.
    fn victim(&mut self) -> usize {
        loop {
            let at = self.hand;
            self.hand = (self.hand + 1) % self.slots.len();
            let slot = &mut self.slots[at];
            if !std::mem::take(&mut slot.referenced) {
                return at;
            }
        }
    }
}

/// How many of this thread's slots hold keys of store `store`.
#[cfg(test)]
pub fn slots_in_use(store: u64) -> usize {
    with_front(|front| {
        Some(
            front
                .slots
                .iter()
                .filter(|slot| slot.store == store)
                .count(),
        )
    })
    .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::policy::{CredentialId, Partition};
    use crate::cache::store::{EntryState, Stamp};
    use crate::fields::EncodedFields;
    use http::HeaderMap;

    fn key(target: &str) -> CacheKey {
        let team = Partition::Team {
            upstream: 0,
            credential: CredentialId::of("a"),
        };
        CacheKey::new(team, target, &HeaderMap::new())
    }

    fn entry(body: &'static [u8]) -> Arc<CachedResponse> {
        Arc::new(CachedResponse {
            status: http::StatusCode::OK,
            fields: Arc::new(EncodedFields::new(HeaderMap::new())),
            prior_cache_status: Box::default(),
            body: bytes::Bytes::from_static(body),
            etag: None,
            stored_at: tokio::time::Instant::now(),
            ttl: std::time::Duration::from_secs(30),
            stale_while_revalidate: std::time::Duration::ZERO,
            stale_if_error: std::time::Duration::ZERO,
            stamp: Stamp::test_value(),
            state: EntryState::default(),
        })
    }

    /// Each test runs on a thread of its own, but a store id of its own too,
    /// so a test never sees another's slots even if threads were reused.
    fn store_id() -> u64 {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(u64::MAX / 2);
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// `target`'s key, its hash and an entry, after two moka look-ups
    /// (so in a slot of `store`'s).
    fn admitted(
        store: u64,
        target: &str,
        body: &'static [u8],
    ) -> (CacheKey, u64, Arc<CachedResponse>) {
        let (k, e) = (key(target), entry(body));
        let h = hash(&k);
        remember(store, h, &k, &e);
        remember(store, h, &k, &e);
        (k, h, e)
    }

    #[test]
    fn a_key_takes_a_slot_on_its_second_moka_look_up_and_is_rechecked_in_moka_every_so_often() {
        let store = store_id();
        let (k, e) = (key("/l"), entry(b"x"));
        let h = hash(&k);
        remember(store, h, &k, &e);
        assert!(lookup(store, h, &k).is_none(), "one look-up takes no slot");
        remember(store, h, &k, &e);
        for look in 0..RECHECK_EVERY {
            let found = lookup(store, h, &k).unwrap_or_else(|| panic!("look-up {look}"));
            assert!(Arc::ptr_eq(&found, &e));
        }
        assert!(
            lookup(store, h, &k).is_none(),
            "after {RECHECK_EVERY} look-ups, one goes through moka"
        );
        remember(store, h, &k, &e);
        assert!(lookup(store, h, &k).is_some(), "and the slot serves again");
    }

    #[test]
    fn slots_match_whole_keys_of_one_store_only() {
        let (store, other_store) = (store_id(), store_id());
        let (k, h, _) = admitted(store, "/l", b"x");
        assert!(lookup(store, h, &k).is_some());
        assert!(lookup(other_store, h, &k).is_none(), "another store");
        assert!(
            lookup(store, h, &key("/other")).is_none(),
            "another key under the same hash"
        );
    }

    #[test]
    fn removed_and_forgotten_entries_are_not_returned() {
        let store = store_id();
        let (k, h, e) = admitted(store, "/l", b"x");
        e.state.mark_removed();
        assert!(lookup(store, h, &k).is_none(), "moka let go of it");
        let (k2, h2, _) = admitted(store, "/2", b"y");
        assert!(lookup(store, h2, &k2).is_some());
        forget(store, h2, &k2);
        assert!(lookup(store, h2, &k2).is_none());
        assert_eq!(
            slots_in_use(store),
            1,
            "only the removed entry's slot is left"
        );
    }

    #[test]
    fn slots_are_bounded_and_hot_keys_outlast_a_stream_of_cold_ones() {
        let store = store_id();
        let (hot, h, e) = admitted(store, "/hot", b"x");
        for round in 0..1000 {
            assert!(lookup(store, h, &hot).is_some(), "round {round}");
            if round % RECHECK_EVERY as usize == 0 {
                remember(store, h, &hot, &e);
            }
            // Cold keys, each looked up in moka twice (so each takes a slot).
            let cold = key(&format!("/cold/{round}"));
            let cold_hash = hash(&cold);
            remember(store, cold_hash, &cold, &e);
            remember(store, cold_hash, &cold, &e);
            assert!(slots_in_use(store) <= SLOTS);
        }
        assert_eq!(slots_in_use(store), SLOTS);
    }

    #[test]
    fn big_bodies_take_no_slot() {
        static BIG: [u8; MAX_BODY_BYTES + 1] = [0; MAX_BODY_BYTES + 1];
        let store = store_id();
        let (k, h, _) = admitted(store, "/big", &BIG);
        assert!(lookup(store, h, &k).is_none());
    }
}
