//! Client (gateway) keys: generation, hashing, and lookup by hash.
//!
//! Keys are random 192-bit tokens with a `tg_` prefix, so a plain SHA-256 is
//! the right hash: there is nothing to brute-force, and a lookup costs one
//! hash. Only the hash is stored (`sha256:<hex>` in the config). Lookup is a
//! hash-map probe on the digest, and the final equality check is constant-time
//! ([`KeyDigest`]'s `PartialEq`), so response timing tells nothing about how
//! close a guess came.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use base64::Engine;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The prefix of every key `teamgate keys new` makes: recognisable in a leak scan.
pub const KEY_PREFIX: &str = "tg_";
/// The algorithm tag of stored key hashes.
pub const HASH_ALGORITHM: &str = "sha256";

/// The SHA-256 of a client key. Equality is constant-time.
#[derive(Clone, Copy, Eq)]
pub struct KeyDigest([u8; 32]);

impl KeyDigest {
    pub fn of_key(key: &str) -> Self {
        KeyDigest(Sha256::digest(key.as_bytes()).into())
    }

    /// Parses the stored form, `sha256:<64 hex digits>`.
    pub fn parse(stored: &str) -> Result<Self, String> {
        let hex_digits = stored.strip_prefix("sha256:").ok_or_else(|| {
            "expected `sha256:<64 hex digits>` (see `teamgate keys hash`)".to_owned()
        })?;
        let mut digest = [0u8; 32];
        hex::decode_to_slice(hex_digits.to_ascii_lowercase(), &mut digest)
            .map_err(|_| "expected `sha256:` followed by 64 hex digits".to_owned())?;
        Ok(KeyDigest(digest))
    }

    /// The stored form, `sha256:<hex>`.
    pub fn to_stored(self) -> String {
        format!("{HASH_ALGORITHM}:{}", hex::encode(self.0))
    }

    /// The key's name in state shared with other instances (its per-key
    /// quota's bucket in Redis): the first 96 bits of the hash — unique
    /// among any number of keys a team could hold, and no more a way to the
    /// key than the stored hash is.
    pub fn shared_id(self) -> [u8; 12] {
        self.0[..12].try_into().expect("12 of 32 bytes")
    }

    /// A short, non-secret label for logs: the first 8 hex digits of the hash.
    pub fn fingerprint(self) -> Fingerprint {
        let mut digits = [0u8; 8];
        hex::encode_to_slice(&self.0[..4], &mut digits).expect("4 bytes are 8 hex digits");
        Fingerprint(digits)
    }
}

/// [`KeyDigest::fingerprint`]: eight hex digits, made on the stack (it is
/// recorded on every authenticated request's span).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint([u8; 8]);

impl Fingerprint {
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("hex digits are ASCII")
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq for KeyDigest {
    fn eq(&self, other: &Self) -> bool {
        // Constant-time by 64-bit words: `subtle`'s slice comparison goes
        // byte by byte, an optimisation barrier each (~340 instructions per
        // key look-up under callgrind, against ~40 for the four words).
        let words = |digest: &[u8; 32]| -> [u64; 4] {
            std::array::from_fn(|index| {
                let at = index * 8;
                u64::from_ne_bytes(digest[at..at + 8].try_into().expect("eight bytes"))
            })
        };
        let (mine, theirs) = (words(&self.0), words(&other.0));
        let same = mine[0].ct_eq(&theirs[0])
            & mine[1].ct_eq(&theirs[1])
            & mine[2].ct_eq(&theirs[2])
            & mine[3].ct_eq(&theirs[3]);
        same.into()
    }
}

impl Hash for KeyDigest {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // The digest is already uniformly distributed; 8 bytes are plenty to bucket on.
        state.write(&self.0[..8]);
    }
}

impl std::fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyDigest({}…)", self.fingerprint())
    }
}

/// Makes a fresh client key: `tg_` + 24 random bytes, base64url (192 bits of entropy).
pub fn generate_key() -> String {
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    format!(
        "{KEY_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// What a valid client key resolves to.
#[derive(Debug)]
pub struct KeyEntry<T> {
    pub owner: Arc<T>,
    pub digest: KeyDigest,
}

/// Not derived: that would ask `T: Clone`, and owners are shared, not copied.
impl<T> Clone for KeyEntry<T> {
    fn clone(&self) -> Self {
        KeyEntry {
            owner: Arc::clone(&self.owner),
            digest: self.digest,
        }
    }
}

/// Hash → owner (a team). Built at config load (and copied with the keys
/// kept in Redis added, `crate::auth::shared`); read-only afterwards.
#[derive(Debug)]
pub struct KeyStore<T> {
    entries: HashMap<KeyDigest, KeyEntry<T>, foldhash::fast::RandomState>,
}

impl<T> Clone for KeyStore<T> {
    fn clone(&self) -> Self {
        KeyStore {
            entries: self.entries.clone(),
        }
    }
}

impl<T> KeyStore<T> {
    pub fn new() -> Self {
        KeyStore {
            entries: HashMap::default(),
        }
    }

    /// Adds a digest; returns the existing owner if the digest is already listed.
    pub fn insert(&mut self, digest: KeyDigest, owner: Arc<T>) -> Result<(), Arc<T>> {
        if let Some(existing) = self.entries.get(&digest) {
            return Err(Arc::clone(&existing.owner));
        }
        self.entries.insert(digest, KeyEntry { owner, digest });
        Ok(())
    }

    pub fn lookup(&self, key: &str) -> Option<&KeyEntry<T>> {
        self.entries.get(&KeyDigest::of_key(key))
    }

    /// Every key's digest and owner, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&KeyDigest, &Arc<T>)> {
        self.entries
            .iter()
            .map(|(digest, entry)| (digest, &entry.owner))
    }

    /// The owner of the key hashed to `digest`.
    pub fn owner(&self, digest: &KeyDigest) -> Option<&Arc<T>> {
        self.entries.get(digest).map(|entry| &entry.owner)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl<T> Default for KeyStore<T> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_are_prefixed_long_and_distinct() {
        let a = generate_key();
        let b = generate_key();
        assert!(a.starts_with(KEY_PREFIX));
        // 24 bytes → 32 base64url characters.
        assert_eq!(a.len(), KEY_PREFIX.len() + 32);
        assert_ne!(a, b);
    }

    #[test]
    fn stored_form_round_trips_and_matches_sha256() {
        let digest = KeyDigest::of_key("abc");
        // SHA-256("abc"), FIPS 180-2 appendix B.1.
        assert_eq!(
            digest.to_stored(),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(KeyDigest::parse(&digest.to_stored()).unwrap(), digest);
        assert_eq!(
            KeyDigest::parse(
                &digest
                    .to_stored()
                    .to_uppercase()
                    .replace("SHA256", "sha256")
            )
            .unwrap(),
            digest
        );
    }

    #[test]
    fn digests_differing_in_any_one_byte_are_unequal() {
        let digest = KeyDigest::of_key("tg_one");
        assert_eq!(digest, KeyDigest::of_key("tg_one"));
        for at in 0..32 {
            let mut other = digest;
            other.0[at] ^= 0x01;
            assert_ne!(digest, other, "byte {at}");
        }
    }

    #[test]
    fn malformed_stored_hashes_are_refused() {
        for bad in ["abc", "sha256:xyz", "md5:00", "sha256:ba7816bf"] {
            assert!(KeyDigest::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_fingerprint_is_the_first_eight_hex_digits_of_the_stored_hash() {
        let digest = KeyDigest::of_key("tg_one");
        let stored = digest.to_stored();
        assert_eq!(
            digest.fingerprint().as_str(),
            &stored["sha256:".len()..][..8]
        );
        assert_eq!(
            digest.fingerprint().to_string(),
            digest.fingerprint().as_str()
        );
    }

    #[test]
    fn lookup_finds_only_listed_keys_and_duplicates_are_reported() {
        let mut store = KeyStore::new();
        let team = Arc::new("design");
        store
            .insert(KeyDigest::of_key("tg_one"), Arc::clone(&team))
            .unwrap();
        assert_eq!(*store.lookup("tg_one").unwrap().owner, "design");
        assert!(store.lookup("tg_two").is_none());
        let duplicate = store.insert(KeyDigest::of_key("tg_one"), Arc::new("other"));
        assert_eq!(*duplicate.unwrap_err(), "design");
    }
}
