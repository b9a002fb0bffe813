//! Config reload: the running gateway reads its config file again (on
//! `SIGHUP`, or `POST /admin/reload`) and swaps in what changed in `[teams]` (and `[admin]`).
//!
//! What a reload applies: the teams — client keys added and revoked, teams
//! added and removed, their upstream credentials (`file:` secrets are read
//! again, so a rotated key file is picked up) and their limits — and the
//! admin token (the admin API reads it from the served config). Everything
//! else (listeners, upstreams and their cache rules, the cache's size,
//! timeouts, logs, traces, `[limits]`) is fixed at start: a
//! file that changes any of it is refused with the keys that need a restart,
//! and so is a file that does not load; either way the running config stays
//! and nothing of the new one applies.
//!
//! How: [`Live::reload`] builds a new stack from the new config around the
//! same cache, metrics and upstream connection pools, with the quotas rebuilt
//! from the old ones (a limit that did not change keeps its state, so a
//! reload never refills a drained bucket), and publishes it
//! ([`Published`]): every connection serves its next request with it —
//! a revoked key is refused on the next request of an open keep-alive
//! connection — while requests in flight finish with the stack they began
//! on, except websocket tunnels, event streams and long downloads: one
//! whose key the reload revoked (or moved to another team, or whose team's
//! upstream key changed) is closed (`proxy::RevocableStream`). A removed team's metric series leave the exposition. Cache
//! entries are partitioned by upstream credential, so a rotated
//! credential starts a new partition by itself; the partitions of
//! credentials no team holds any more are purged, so nothing fetched with a
//! revoked upstream key is kept.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use crate::auth::managed::ManagedKeyList;
use crate::cache::policy::Partition;
use crate::config::{self, Config, ConfigError, Problem, Secrets};
use crate::connection::Published;
use crate::stack::{self, GatewayService, Shared};
use crate::telemetry::shards::lock;

/// The file a running gateway's config was read from, and the environment
/// its overrides and `env:` secrets come from.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    pub path: PathBuf,
    pub env: fn(&str) -> Option<String>,
}

/// The gateway's replaceable state: the stack connections call and the
/// config and quotas it was built from.
#[derive(Debug)]
pub struct Live {
    stack: Arc<Published<GatewayService>>,
    shared: Mutex<Shared>,
    source: Option<ConfigFile>,
    /// What the served config is made of.
    given: Mutex<Given>,
    /// One reload at a time: each one builds on the state the last left.
    reloading: tokio::sync::Mutex<()>,
}

/// The config as its file (or the caller) gave it, and the managed keys
/// read from Redis: the config served is the one with the other added
/// ([`Config::with_managed_keys`]).
#[derive(Debug)]
struct Given {
    config: Arc<Config>,
    managed: Arc<ManagedKeyList>,
}

/// What a reload applied.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Reloaded {
    pub teams: usize,
    pub client_keys: usize,
    /// Cache partitions dropped: those of upstream credentials no team holds now.
    pub purged_partitions: usize,
}

/// Why a reload applied nothing.
#[derive(Debug)]
pub enum ReloadError {
    /// The config was not read from a file (`teamgate demo`, tests).
    NoFile,
    /// The file does not load; the problems say where.
    Invalid(ConfigError),
    /// The file changes settings only a restart applies.
    NeedsRestart(Vec<String>),
}

impl std::fmt::Display for ReloadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReloadError::NoFile => f.write_str("the config was not read from a file"),
            ReloadError::Invalid(error) => write!(
                f,
                "{} does not load: {}",
                error.origin,
                problem_list(&error.problems)
            ),
            ReloadError::NeedsRestart(keys) => write!(
                f,
                "only [teams] and [admin] changes apply on reload; these need a restart: {}",
                keys.join(", ")
            ),
        }
    }
}

impl std::error::Error for ReloadError {}

fn problem_list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|problem| format!("{}: {}", problem.key, problem.message))
        .collect::<Vec<_>>()
        .join("; ")
}

impl Live {
    /// The gateway's state at start; `source` is where reloads read from.
    pub fn new(shared: Shared, source: Option<ConfigFile>) -> Self {
        Live {
            stack: Arc::new(Published::new(stack::build(&shared))),
            given: Mutex::new(Given {
                config: Arc::clone(&shared.config),
                managed: Arc::default(),
            }),
            shared: Mutex::new(shared),
            source,
            reloading: tokio::sync::Mutex::new(()),
        }
    }

    /// What connections call.
    pub fn stack(&self) -> &Arc<Published<GatewayService>> {
        &self.stack
    }

    /// The state the current stack was built from.
    pub fn shared(&self) -> Shared {
        self.shared
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Reads the config file again and applies its teams (see the module
    /// docs); logs and counts the outcome either way.
    pub async fn reload(&self) -> Result<Reloaded, ReloadError> {
        let _one_at_a_time = self.reloading.lock().await;
        let outcome = self.reload_once().await;
        self.shared().metrics.config_reloaded(outcome.is_ok());
        match &outcome {
            Ok(reloaded) => tracing::info!(
                teams = reloaded.teams,
                client_keys = reloaded.client_keys,
                purged_partitions = reloaded.purged_partitions,
                "config reloaded"
            ),
            Err(error) => {
                tracing::error!(%error, "config reload refused; the running config stays")
            }
        }
        outcome
    }

    async fn reload_once(&self) -> Result<Reloaded, ReloadError> {
        let source = self.source.clone().ok_or(ReloadError::NoFile)?;
        // Reading the file and `file:` secrets blocks.
        let loaded = tokio::task::spawn_blocking(move || {
            config::load_file(&source.path, &source.env, Secrets::Resolve)
        })
        .await
        .expect("the config load does not panic")
        .map_err(ReloadError::Invalid)?;
        let old = self.shared();
        let needs_restart = old.config.restart_changes(&loaded);
        if !needs_restart.is_empty() {
            return Err(ReloadError::NeedsRestart(needs_restart));
        }
        let loaded = Arc::new(loaded);
        let managed = {
            let mut given = lock(&self.given);
            given.config = Arc::clone(&loaded);
            Arc::clone(&given.managed)
        };
        Ok(self.serve(&old, loaded.with_managed_keys(&managed)))
    }

    /// Serves `keys` as the managed keys (those read from Redis; none while
    /// this instance does not hear the others), with the config last given.
    pub async fn serve_managed_keys(&self, keys: Arc<ManagedKeyList>) {
        let _one_at_a_time = self.reloading.lock().await;
        let config = {
            let mut given = lock(&self.given);
            given.managed = Arc::clone(&keys);
            Arc::clone(&given.config)
        };
        let served = self.serve(&self.shared(), config.with_managed_keys(&keys));
        tracing::info!(
            managed_keys = keys.len(),
            client_keys = served.client_keys,
            "managed keys served"
        );
    }

    /// Publishes a stack built from `config` in place of `old`'s (under
    /// `reloading`).
    fn serve(&self, old: &Shared, config: Config) -> Reloaded {
        let new = old.reloaded(Arc::new(config));
        let gone = credentials_dropped(&old.config, &new.config);
        let reloaded = Reloaded {
            teams: new.config.teams.len(),
            client_keys: new.config.keys.len(),
            purged_partitions: gone.len(),
        };
        let stack = stack::build(&new);
        let config = Arc::clone(&new.config);
        {
            // Under the lock, so the admin API never sees a config the
            // requests are not yet served by.
            let mut shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
            self.stack.publish(stack);
            // Open websocket tunnels, event streams and long downloads
            // check their keys against it, and the cache fan-out its teams.
            new.serving.send_replace(Arc::clone(&config));
            *shared = new;
        }
        // After the publish: no request that starts from now on can fill them.
        // One still in flight on the old stack may, and its entry is then
        // unreachable (no team holds the credential) until evicted.
        if !gone.is_empty() {
            old.cache.purge_partitions(gone);
        }
        old.metrics.teams_replaced(&config.teams);
        reloaded
    }
}

/// The team partitions of upstream credentials `old` has and `new` does not.
fn credentials_dropped(old: &Config, new: &Config) -> Vec<Partition> {
    let partitions = |config: &Config| -> HashSet<Partition> {
        config
            .teams
            .iter()
            .flat_map(|team| team.cache_partitions())
            .collect()
    };
    let kept = partitions(new);
    partitions(old)
        .into_iter()
        .filter(|partition| !kept.contains(partition))
        .collect()
}
