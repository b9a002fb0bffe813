//! Per-thread shards for what every request writes: the log sink's buffer
//! and the request metrics.
//!
//! One shared value that every request on every core writes (a buffer
//! behind a lock, an atomic counter) makes the cores take turns on its cache
//! line: `telemetry/access_line_json_on_two_threads` and
//! `metrics/request_on_two_threads` in `benches/micro.rs` show what that
//! costs on two cores. Instead such state is [`Sharded`]: split in [`count`]
//! shards, each on cache lines of its own, and a thread always writes the
//! shard of its [`thread_number`]; readers (the log writer, a metrics
//! scrape) visit every shard.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// One `T` per shard, each on cache lines of its own; a thread uses the
/// shard of its [`thread_number`].
#[derive(Debug)]
pub struct Sharded<T>(Box<[Padded<T>]>);

/// Keeps a shard on cache lines of its own (128 bytes: two lines, as
/// adjacent-line prefetching pairs them on x86).
#[repr(align(128))]
#[derive(Debug)]
struct Padded<T>(T);

impl<T> Sharded<T> {
    /// `count` shards rounded up to a power of two (so picking one is a
    /// mask, not a division: a division per request showed in the log
    /// line's micro-benchmark), each made by `make`.
    pub fn new(count: usize, mut make: impl FnMut() -> T) -> Self {
        let count = count.max(1).next_power_of_two();
        Sharded((0..count).map(|_| Padded(make())).collect())
    }

    /// This thread's shard.
    pub fn mine(&self) -> &T {
        &self.0[thread_number() & (self.0.len() - 1)].0
    }

    /// Every shard, for the one reader that visits them all.
    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.0.iter().map(|shard| &shard.0)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The most shards [`count`] gives.
pub const MAX_COUNT: usize = 64;

/// How many shards: one per core this process may run on, at most [`MAX_COUNT`].
pub fn count() -> usize {
    std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(MAX_COUNT)
}

/// A lock whose holder panicked is still good here: shards hold counts and
/// whole lines, never a half-made change.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// This thread's number among the live threads that asked: the smallest
/// not in use when it first asked, given back when it exits. So threads
/// that live at once (a runtime's workers) get shards of their own however
/// many short-lived threads came and went before them.
pub fn thread_number() -> usize {
    struct Number(usize);
    impl Drop for Number {
        fn drop(&mut self) {
            lock(&NUMBERS).returned.push(self.0);
        }
    }
    thread_local! {
        static NUMBER: Number = {
            let mut numbers = lock(&NUMBERS);
            let smallest_returned =
                (0..numbers.returned.len()).min_by_key(|&at| numbers.returned[at]);
            Number(match smallest_returned {
                Some(at) => numbers.returned.swap_remove(at),
                None => {
                    numbers.next += 1;
                    numbers.next - 1
                }
            })
        };
    }
    // Asked from this thread's own thread-local destructors, after its
    // number is gone: any shard does.
    NUMBER.try_with(|number| number.0).unwrap_or(0)
}

struct Numbers {
    /// The smallest never given out.
    next: usize,
    /// Given back by threads that exited.
    returned: Vec<usize>,
}

static NUMBERS: Mutex<Numbers> = Mutex::new(Numbers {
    next: 0,
    returned: Vec::new(),
});

#[cfg(test)]
mod tests {
    use super::*;

    /// Threads alive at once never share a number; a number is reused once
    /// its thread exited, so the numbers stay as few as the live threads.
    #[test]
    fn live_threads_have_distinct_numbers_and_exited_ones_give_theirs_back() {
        let barrier = std::sync::Barrier::new(8);
        let numbers: Vec<usize> = std::thread::scope(|threads| {
            let live: Vec<_> = (0..8)
                .map(|_| {
                    threads.spawn(|| {
                        let number = thread_number();
                        // All eight hold their numbers at once.
                        barrier.wait();
                        number
                    })
                })
                .collect();
            live.into_iter().map(|t| t.join().unwrap()).collect()
        });
        let mut distinct = numbers.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), 8, "{numbers:?}");
        // One after another, each exits before the next starts: they get
        // numbers already given out before, not ever-new ones (other tests
        // run threads too, so not necessarily the same number each time).
        let highest_before = lock(&NUMBERS).next;
        for _ in 0..100 {
            std::thread::spawn(thread_number).join().unwrap();
        }
        assert!(
            lock(&NUMBERS).next <= highest_before + 64,
            "sequential threads kept taking new numbers"
        );
    }
}
