//! The response cache: per-team asset reads from memory, coalesced, and
//! invalidated by the writes that change them.
//!
//! - [`policy`]: pure rules — what is cacheable, keys, scopes, headers.
//! - [`store`]: moka storage bounded in bytes, generations, fills in progress.
//! - `front`: per-thread slots for the entries a thread hits again and again.
//! - [`layer`]: the tower layer that answers hits, runs fills, invalidates.

mod front;
pub mod layer;
pub mod policy;
pub mod store;

pub use layer::{CacheLayer, CacheService};
pub use store::Store;
