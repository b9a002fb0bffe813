//! Managed client keys: made and revoked through the admin API, kept in
//! Redis, served by every instance (`[shared] redis`).
//!
//! The config file's `client_keys` stay the gateway's own: they work with
//! or without Redis. A managed key is one more key of a team the file
//! names, made by `POST /admin/teams/{team}/keys` on any instance (the key
//! is shown once, in that answer) and revoked by
//! `DELETE /admin/teams/{team}/keys/{hash}` on any instance. Redis holds
//! the hash `<channel>:keys`: the key's stored hash (`sha256:<hex>`, never
//! the key) → [`ManagedKey`] as JSON.
//!
//! Each instance serves the managed keys as part of its config (the served
//! config is the file's plus these, [`Config::with_managed_keys`]), so a
//! revoked key is refused on the next request of any connection, and its
//! websockets, event streams and long downloads are closed, as after a
//! reload. A change is
//! announced on the cache fan-out's channel (`crate::shared`) and answered
//! once every instance has applied it. An instance that does not hear the
//! channel could miss a revocation, so it serves **no** managed key until
//! it hears it again (then it reads them all afresh): Redis down costs the
//! managed keys, never a revoked key working. File keys are unaffected.

use std::collections::HashMap;

use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use serde::{Deserialize, Serialize};

use super::keys::KeyDigest;
use crate::config::Config;
use crate::shared::within;

/// A managed key's record in Redis.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagedKey {
    /// The team the key belongs to (a team of the config file).
    pub team: String,
    /// What the key is for, as its maker said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// When it was made, RFC 3339.
    pub created: String,
}

/// Managed keys, by the hash they are stored under.
pub type ManagedKeyList = Vec<(KeyDigest, ManagedKey)>;

/// The Redis hash of `channel`'s managed keys.
fn store(channel: &str) -> String {
    format!("{channel}:keys")
}

/// Every managed key in Redis. A record this version cannot read is left
/// out (and logged): a key it cannot place is not served.
pub async fn read_all(
    connection: &mut MultiplexedConnection,
    channel: &str,
) -> Result<ManagedKeyList, String> {
    let stored: HashMap<String, String> = within(connection.hgetall(store(channel))).await?;
    let mut keys = Vec::with_capacity(stored.len());
    for (hash, record) in stored {
        match (
            KeyDigest::parse(&hash),
            serde_json::from_str::<ManagedKey>(&record),
        ) {
            (Ok(digest), Ok(key)) => keys.push((digest, key)),
            _ => tracing::warn!(
                key = %hash.get(..15).unwrap_or(&hash),
                "a managed key's record in Redis does not read; it is not served"
            ),
        }
    }
    Ok(keys)
}

/// Stores `key` under `digest`; false if a key with that hash is stored already.
pub async fn add(
    connection: &mut MultiplexedConnection,
    channel: &str,
    digest: KeyDigest,
    key: &ManagedKey,
) -> Result<bool, String> {
    let record = serde_json::to_string(key).expect("records serialize");
    within(connection.hset_nx(store(channel), digest.to_stored(), record)).await
}

/// Removes a record if its key belongs to the team named: one script, so
/// the check and the removal cannot be split by another instance's change.
/// `KEYS[1]`: the store; `ARGV`: the stored hash, the team. Answers the
/// record removed, or nil.
static REMOVE_SCRIPT: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r"
local record = redis.call('HGET', KEYS[1], ARGV[1])
if not record then return false end
local key = cjson.decode(record)
if key.team ~= ARGV[2] then return false end
redis.call('HDEL', KEYS[1], ARGV[1])
return record
",
    )
});

/// Removes the key hashed to `digest` if it belongs to `team`: its record,
/// or `None` if there is no such key of that team.
pub async fn remove(
    connection: &mut MultiplexedConnection,
    channel: &str,
    digest: KeyDigest,
    team: &str,
) -> Result<Option<ManagedKey>, String> {
    let mut call = REMOVE_SCRIPT.prepare_invoke();
    call.key(store(channel)).arg(digest.to_stored()).arg(team);
    let record: Option<String> = within(call.invoke_async(connection)).await?;
    Ok(record.and_then(|record| serde_json::from_str(&record).ok()))
}

impl Config {
    /// This config (the file's) serving `managed` too. A managed key of a
    /// team the file does not name is left out (it comes back if a reload
    /// brings the team back), and so is one whose hash the file lists.
    pub fn with_managed_keys(&self, managed: &[(KeyDigest, ManagedKey)]) -> Config {
        let mut served = self.clone();
        served.managed_keys = Vec::with_capacity(managed.len());
        for (digest, key) in managed {
            let Some(team) = self.teams.iter().find(|team| team.name == key.team) else {
                continue;
            };
            if served
                .keys
                .insert(*digest, std::sync::Arc::clone(team))
                .is_ok()
            {
                served.managed_keys.push((*digest, key.clone()));
            }
        }
        served
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Secrets, load_str};

    const FILE: &str = r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[upstreams.comfy]
base_url = "http://127.0.0.1:1"
preset = "comfy-cloud"
[teams.design]
upstream_keys = { comfy = "env:KEY" }
client_keys = ["sha256:cb50c518421683db3cd0f6cec979d3686abd269087ce618c44557cb4a744264b"]
[teams.research]
upstream_keys = { comfy = "env:KEY" }
"#;

    fn managed(team: &str) -> ManagedKey {
        ManagedKey {
            team: team.into(),
            label: None,
            created: "2026-12-07T10:00:00Z".into(),
        }
    }

    #[test]
    fn the_served_config_is_the_files_plus_the_managed_keys_of_its_teams() {
        let file = load_str(
            FILE,
            "t.toml",
            None,
            &|name| (name == "KEY").then(|| "k".into()),
            Secrets::Resolve,
        )
        .unwrap();
        let in_file = KeyDigest::parse(
            "sha256:cb50c518421683db3cd0f6cec979d3686abd269087ce618c44557cb4a744264b",
        )
        .unwrap();
        let served = file.with_managed_keys(&[
            (KeyDigest::of_key("tg_new"), managed("research")),
            (KeyDigest::of_key("tg_gone"), managed("no-such-team")),
            (in_file, managed("research")),
        ]);
        assert_eq!(served.keys.len(), 2);
        assert_eq!(served.keys.lookup("tg_new").unwrap().owner.name, "research");
        assert_eq!(
            served.keys.owner(&in_file).unwrap().name,
            "design",
            "the file's wins"
        );
        assert_eq!(served.managed_keys.len(), 1);
        assert_eq!(file.keys.len(), 1, "the file's config is left as it was");
        assert!(file.managed_keys.is_empty());
    }
}
