//! What the gateway's instances share through Redis (`[shared] redis`):
//! cache invalidations, fanned out over pub/sub, and on the same channel
//! the news that the managed keys changed ([`crate::auth::managed`], which
//! says what an instance does with them). Their quotas are reconciled
//! through Redis too: see [`crate::limit::shared`].
//!
//! Each instance caches in its own memory. A write through one instance
//! invalidates that instance's entries at once (the cache layer) and is
//! published on the channel; every other instance applies it and confirms
//! on the acknowledgement channel (`<channel>:acks`), and the write's answer
//! goes to the client once every instance that received it has confirmed
//! (at most `REDIS_TIMEOUT` later: an instance that does not confirm is
//! logged and counted, `unconfirmed`). So a read through any instance after
//! the write's answer misses what the write changed. Admin purges travel
//! the same way. A config reload's purge of dropped credentials does
//! not: each instance reloads its own file.
//!
//! An instance that is not subscribed could miss an invalidation, and then
//! serve a stale read after a write through another instance — so its cache
//! is paused (reads go upstream, nothing is stored) from start until the
//! subscription is up, and again whenever it drops or stops answering its
//! heartbeat (within `HEARTBEAT` + `REDIS_TIMEOUT`). Each time it comes back,
//! the local cache is flushed before it serves again: whatever a missed
//! message would have invalidated is gone too. Redis down therefore costs
//! the cache rather than serving stale reads. What is logged and counted
//! instead of prevented: a publish that fails while the other instances are
//! still subscribed (they keep the entries until these expire), and the
//! heartbeat's window before a silent server counts as gone.
//!
//! Messages carry upstream names (indexes are local), credential ids (the
//! truncated SHA-256 the cache partitions by) and the team's name, never a
//! key. A receiver invalidates the credential's partition and also its own
//! partition for that team: while a rotated upstream key rolls out, two
//! instances may key one team's entries by different credentials. A message
//! this instance cannot read (another version, another config's upstream)
//! flushes its cache: an invalidation it cannot apply precisely is applied
//! broadly.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::task::AbortOnDrop;

use crate::auth::managed::{self, ManagedKeyList};
use crate::cache::Store;
use crate::cache::policy::{CredentialId, Partition, Scope};
use crate::config::{Config, SharedSettings, Upstream};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::shards::lock;

/// How long a connection attempt, a publish and a heartbeat may take.
const REDIS_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the subscription is pinged: a connection that went silent
/// without closing (a stopped server, a network partition) would otherwise
/// look subscribed while it hears nothing.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// Reconnection backoff: doubles from the first to the last.
const RETRY_FIRST: Duration = Duration::from_millis(100);
const RETRY_LAST: Duration = Duration::from_secs(5);

/// A local invalidation, as the cache and the admin API make them.
#[derive(Debug, Clone, Copy)]
pub enum Invalidation<'a> {
    /// A write's scopes, in one team's partition.
    Scopes {
        partition: Partition,
        scopes: &'a [Scope],
        team: &'a str,
    },
    All,
    Upstream(usize),
    /// One team's partitions (an admin purge by team).
    Partitions {
        partitions: &'a [Partition],
        team: &'a str,
    },
}

/// One message on the channel.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Message {
    /// The publishing instance: it applied the invalidation itself already.
    from: String,
    /// What the receivers' acknowledgements name.
    id: u64,
    #[serde(flatten)]
    event: Event,
}

/// One message on the acknowledgement channel: `to`'s message `id` is applied.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Ack {
    to: String,
    id: u64,
}

/// Acknowledgements this instance waits for, by message id.
#[derive(Debug, Default)]
struct Pending {
    waits: std::sync::Mutex<std::collections::HashMap<u64, Wait>>,
}

#[derive(Debug)]
struct Wait {
    acked: usize,
    /// Known once `PUBLISH` has answered how many received the message
    /// (an acknowledgement may come before that).
    expected: Option<usize>,
    done: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Wait {
    fn settle(&mut self) {
        if self.expected.is_some_and(|expected| self.acked >= expected)
            && let Some(done) = self.done.take()
        {
            let _ = done.send(());
        }
    }
}

impl Pending {
    fn open(&self, id: u64) -> tokio::sync::oneshot::Receiver<()> {
        let (done, settled) = tokio::sync::oneshot::channel();
        lock(&self.waits).insert(
            id,
            Wait {
                acked: 0,
                expected: None,
                done: Some(done),
            },
        );
        settled
    }

    fn expect(&self, id: u64, expected: usize) {
        if let Some(wait) = lock(&self.waits).get_mut(&id) {
            wait.expected = Some(expected);
            wait.settle();
        }
    }

    fn acknowledged(&self, id: u64) {
        if let Some(wait) = lock(&self.waits).get_mut(&id) {
            wait.acked += 1;
            wait.settle();
        }
    }

    fn close(&self, id: u64) {
        lock(&self.waits).remove(&id);
    }
}

/// The acknowledgement channel of `channel`.
fn acks_channel(channel: &str) -> String {
    format!("{channel}:acks")
}

/// A client for `[shared]`'s Redis: `rediss://` checks the server's
/// certificate against `redis_ca` when given, else the public roots.
pub(crate) fn client(settings: &SharedSettings) -> Option<redis::Client> {
    let url = settings.redis.as_ref()?;
    // Validated when the config was loaded.
    Some(match &settings.redis_ca {
        Some(ca) => redis::Client::build_with_tls(
            url.expose(),
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(ca.to_vec()),
            },
        )
        .expect("a valid rediss:// URL and CA"),
        None => redis::Client::open(url.expose()).expect("a valid Redis URL"),
    })
}

/// `request`, given `REDIS_TIMEOUT`; either failure as a message for the log.
pub(crate) async fn within<T>(
    request: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(REDIS_TIMEOUT, request).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("timed out".to_owned()),
    }
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Event {
    /// The managed keys changed (`crate::auth::managed`): read them again.
    ManagedKeys,
    Scopes {
        partition: WirePartition,
        scopes: Vec<WireScope>,
        team: String,
    },
    All,
    Upstream {
        upstream: String,
    },
    Partitions {
        partitions: Vec<WirePartition>,
        team: String,
    },
}

/// A partition by upstream name; `credential` is `None` for the shared one.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct WirePartition {
    upstream: String,
    credential: Option<String>,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct WireScope {
    family: String,
    member: Option<String>,
}

/// The index of the upstream named `name` among `upstreams` (the config's;
/// indexes are local, names are what instances share, and a reload changes
/// neither).
fn upstream_index(upstreams: &[Arc<Upstream>], name: &str) -> Option<usize> {
    upstreams.iter().position(|upstream| upstream.name == name)
}

fn partition_to_wire(upstreams: &[Arc<Upstream>], partition: Partition) -> WirePartition {
    let (upstream, credential) = match partition {
        Partition::Team {
            upstream,
            credential,
        } => (upstream, Some(credential.to_hex())),
        Partition::Shared { upstream } => (upstream, None),
    };
    WirePartition {
        upstream: upstreams[upstream].name.clone(),
        credential,
    }
}

fn partition_from_wire(upstreams: &[Arc<Upstream>], wire: &WirePartition) -> Option<Partition> {
    let upstream = upstream_index(upstreams, &wire.upstream)?;
    Some(match &wire.credential {
        Some(hex) => Partition::Team {
            upstream,
            credential: CredentialId::from_hex(hex)?,
        },
        None => Partition::Shared { upstream },
    })
}

fn to_wire(upstreams: &[Arc<Upstream>], invalidation: Invalidation<'_>) -> Event {
    match invalidation {
        Invalidation::Scopes {
            partition,
            scopes,
            team,
        } => Event::Scopes {
            team: team.to_owned(),
            partition: partition_to_wire(upstreams, partition),
            scopes: scopes
                .iter()
                .map(|scope| WireScope {
                    family: scope.family.to_string(),
                    member: scope.member.as_deref().map(str::to_owned),
                })
                .collect(),
        },
        Invalidation::All => Event::All,
        Invalidation::Upstream(index) => Event::Upstream {
            upstream: upstreams[index].name.clone(),
        },
        Invalidation::Partitions { partitions, team } => Event::Partitions {
            team: team.to_owned(),
            partitions: partitions
                .iter()
                .map(|partition| partition_to_wire(upstreams, *partition))
                .collect(),
        },
    }
}

/// Applies `event` to `store`, `config` being the one this instance serves;
/// `false` when it names what this instance does not know (the caller then
/// flushes).
fn apply(event: &Event, store: &Store, config: &Config) -> bool {
    let upstreams = &config.upstreams;
    match event {
        Event::Scopes {
            partition,
            scopes,
            team,
        } => {
            let Some(partition) = partition_from_wire(upstreams, partition) else {
                return false;
            };
            let scopes: Vec<Scope> = scopes
                .iter()
                .map(|scope| Scope {
                    family: Arc::from(scope.family.as_str()),
                    member: scope.member.as_deref().map(Box::from),
                })
                .collect();
            store.invalidate(partition, &scopes);
            if let Some(own) = team_partition(config, team, partition.upstream())
                && own != partition
            {
                store.invalidate(own, &scopes);
            }
        }
        Event::All => store.purge_all(),
        // Not the cache's: `Subscriber::receive` reads the keys again.
        Event::ManagedKeys => {}
        Event::Upstream { upstream } => {
            let Some(index) = upstream_index(upstreams, upstream) else {
                return false;
            };
            store.purge_upstream(index);
        }
        Event::Partitions { partitions, team } => {
            let Some(mut partitions) = partitions
                .iter()
                .map(|wire| partition_from_wire(upstreams, wire))
                .collect::<Option<Vec<_>>>()
            else {
                return false;
            };
            let named: Vec<usize> = partitions.iter().map(|p| p.upstream()).collect();
            for upstream in named {
                if let Some(own) = team_partition(config, team, upstream)
                    && !partitions.contains(&own)
                {
                    partitions.push(own);
                }
            }
            store.purge_partitions(partitions);
        }
    }
    true
}

/// The partition this instance keeps the team `name`'s entries from
/// `upstream` in, if it has that team.
fn team_partition(config: &Config, name: &str, upstream: usize) -> Option<Partition> {
    let team = config.teams.iter().find(|team| team.name == name)?;
    team.cache_partitions()
        .find(|partition| partition.upstream() == upstream)
}

/// The managed keys this instance has read (`crate::auth::managed`), for
/// the gateway to serve: a new version each time they may have changed.
#[derive(Debug, Clone, Default)]
pub struct ManagedKeys {
    pub version: u64,
    pub keys: Arc<ManagedKeyList>,
}

/// Hands the managed keys read to the gateway, and hears when it serves them.
#[derive(Debug)]
struct KeysHandOver {
    read: watch::Sender<ManagedKeys>,
    served: watch::Sender<u64>,
    /// One reader at a time (the subscriber, the admin API): a read that
    /// started earlier never replaces one that started later.
    reading: tokio::sync::Mutex<()>,
}

impl KeysHandOver {
    fn new() -> Self {
        KeysHandOver {
            read: watch::channel(ManagedKeys::default()).0,
            served: watch::channel(0).0,
            reading: tokio::sync::Mutex::new(()),
        }
    }

    /// Reads the managed keys from Redis and hands them over: whether the
    /// gateway serves them within `REDIS_TIMEOUT` (it does a moment on, if not).
    async fn read(
        &self,
        connection: Option<MultiplexedConnection>,
        channel: &str,
    ) -> Result<bool, String> {
        let version = {
            let _one_reader = self.reading.lock().await;
            let mut connection = connection.ok_or("not connected to Redis")?;
            let keys = managed::read_all(&mut connection, channel).await?;
            self.hand_over(keys)
        };
        Ok(self.served(version).await)
    }

    /// Hands over no managed keys: this instance could miss a revocation.
    async fn refuse_all(&self) {
        let version = {
            let _one_reader = self.reading.lock().await;
            self.hand_over(Vec::new())
        };
        self.served(version).await;
    }

    fn hand_over(&self, keys: ManagedKeyList) -> u64 {
        let mut version = 0;
        self.read.send_modify(|current| {
            current.version += 1;
            current.keys = Arc::new(keys);
            version = current.version;
        });
        version
    }

    /// Whether the gateway serves `version` within `REDIS_TIMEOUT`.
    async fn served(&self, version: u64) -> bool {
        let mut served = self.served.subscribe();
        let waited =
            tokio::time::timeout(REDIS_TIMEOUT, served.wait_for(|served| *served >= version)).await;
        if waited.is_err() {
            tracing::warn!("the managed keys read from Redis were not served in time");
        }
        waited.is_ok()
    }
}

/// How an announcement to the other instances went.
#[derive(Debug)]
enum Announced {
    /// Every instance that received it confirmed it.
    Confirmed,
    Unconfirmed,
    Failed(String),
}

/// This instance's end of the channel: publishes its invalidations; a task
/// of its own applies the others' (see the module docs).
pub struct Fanout {
    instance: String,
    channel: String,
    /// The config served now: messages name its upstreams.
    serving: watch::Receiver<Arc<Config>>,
    /// The connection to publish on, while subscribed.
    publisher: watch::Receiver<Option<MultiplexedConnection>>,
    pending: Arc<Pending>,
    metrics: Arc<Metrics>,
    keys: Arc<KeysHandOver>,
    /// The subscriber task, stopped when the fan-out is dropped.
    _subscriber: AbortOnDrop,
}

/// Without the connection: its details are the Redis URL's, which may hold a password.
impl std::fmt::Debug for Fanout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fanout")
            .field("instance", &self.instance)
            .field("channel", &self.channel)
            .field("subscribed", &self.publisher.borrow().is_some())
            .finish_non_exhaustive()
    }
}

impl Fanout {
    /// Pauses `store` and starts the task that subscribes (and resumes it);
    /// `serving` is the config this instance serves (its teams change on
    /// reload). Must run inside the tokio runtime.
    pub fn start(
        client: redis::Client,
        serving: watch::Receiver<Arc<Config>>,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
    ) -> Arc<Fanout> {
        // `[shared]` is fixed at start: a reload that changes it is refused.
        let channel = serving.borrow().shared.channel.clone();
        store.pause();
        metrics.cache_fanout_subscribed(false);
        let instance = hex::encode(rand::random::<[u8; 8]>());
        let (publisher_tx, publisher) = watch::channel(None);
        let pending = Arc::new(Pending::default());
        let keys = Arc::new(KeysHandOver::new());
        let subscriber = Subscriber {
            pending: Arc::clone(&pending),
            keys: Arc::clone(&keys),
            client,
            channel: channel.clone(),
            instance: instance.clone(),
            serving: serving.clone(),
            store,
            metrics: Arc::clone(&metrics),
            publisher: publisher_tx,
        };
        let task = tokio::spawn(subscriber.run());
        Arc::new(Fanout {
            instance,
            channel,
            serving,
            publisher,
            pending,
            metrics,
            keys,
            _subscriber: AbortOnDrop::new(task.abort_handle()),
        })
    }

    /// The managed keys as this instance reads them: none while it does not
    /// hear the other instances (it could miss a revocation). Whoever serves
    /// them says so with [`Self::managed_keys_served`].
    pub fn managed_keys(&self) -> watch::Receiver<ManagedKeys> {
        self.keys.read.subscribe()
    }

    /// The gateway serves the managed keys of `version` (or a later one).
    pub fn managed_keys_served(&self, version: u64) {
        self.keys.served.send_if_modified(|served| {
            let newer = version > *served;
            if newer {
                *served = version;
            }
            newer
        });
    }

    /// The channel, whose name the managed keys' Redis hash starts with.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// A connection to Redis, while this instance hears the others.
    pub fn connection(&self) -> Option<MultiplexedConnection> {
        self.publisher.borrow().clone()
    }

    /// After a change to the managed keys in Redis: reads them again, and
    /// returns once this instance serves them and every other instance has
    /// confirmed it does (`Ok(false)`: not every one confirmed in time).
    pub async fn managed_keys_changed(&self) -> Result<bool, String> {
        let served_here = self.keys.read(self.connection(), &self.channel).await?;
        match self.announce(Event::ManagedKeys).await {
            Announced::Confirmed => Ok(served_here),
            Announced::Unconfirmed => {
                tracing::warn!(
                    "a change to the managed keys was not confirmed by every instance in time"
                );
                Ok(false)
            }
            Announced::Failed(error) => Err(error),
        }
    }

    /// Publishes an invalidation this instance applied itself, and returns
    /// once every other instance that received it has applied it (or
    /// `REDIS_TIMEOUT` has passed). A failure is logged and counted: the
    /// local invalidation stands, and the other instances drop the entries
    /// when they expire.
    pub async fn publish(&self, invalidation: Invalidation<'_>) {
        let event = to_wire(&self.serving.borrow().upstreams, invalidation);
        match self.announce(event).await {
            Announced::Confirmed => self.metrics.cache_fanout("published"),
            Announced::Unconfirmed => {
                self.metrics.cache_fanout("unconfirmed");
                tracing::warn!(
                    "a cache invalidation was not confirmed by every instance in time: one may serve stale reads until it expires or reconnects"
                );
            }
            Announced::Failed(error) => {
                self.metrics.cache_fanout("publish_failed");
                tracing::warn!(%error, "cache invalidation not shared with the other instances");
            }
        }
    }

    /// Publishes `event` and waits (`REDIS_TIMEOUT` at most) until every
    /// other instance that received it has confirmed it.
    async fn announce(&self, event: Event) -> Announced {
        let id = rand::random::<u64>();
        let message = Message {
            from: self.instance.clone(),
            id,
            event,
        };
        let payload = serde_json::to_vec(&message).expect("messages serialize");
        let connection = self.connection();
        let settled = self.pending.open(id);
        let outcome = async {
            let mut connection = connection.ok_or("not connected to Redis")?;
            let receivers =
                within(connection.publish::<_, _, usize>(&self.channel, payload)).await?;
            // This instance is subscribed too (there is no connection to
            // publish on otherwise), and confirms nothing to itself.
            self.pending.expect(id, receivers.saturating_sub(1));
            Ok::<_, String>(tokio::time::timeout(REDIS_TIMEOUT, settled).await.is_ok())
        }
        .await;
        self.pending.close(id);
        match outcome {
            Ok(true) => Announced::Confirmed,
            Ok(false) => Announced::Unconfirmed,
            Err(error) => Announced::Failed(error),
        }
    }
}

/// The task that hears the other instances.
struct Subscriber {
    client: redis::Client,
    channel: String,
    instance: String,
    serving: watch::Receiver<Arc<Config>>,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    publisher: watch::Sender<Option<MultiplexedConnection>>,
    pending: Arc<Pending>,
    keys: Arc<KeysHandOver>,
}

impl Subscriber {
    async fn run(self) {
        let mut retry = RETRY_FIRST;
        let mut said_down = false;
        loop {
            match self.connect().await {
                Ok((mut subscription, mut messages, connection)) => {
                    self.publisher.send_replace(Some(connection));
                    self.store.resume_flushed();
                    // Read after subscribing: a change made since is heard.
                    if self.read_managed_keys().await.is_some() {
                        self.metrics.cache_fanout_subscribed(true);
                        tracing::info!(channel = %self.channel, "cache invalidations shared through Redis: subscribed, local cache flushed, managed keys read");
                        retry = RETRY_FIRST;
                        let mut heartbeat = tokio::time::interval(HEARTBEAT);
                        loop {
                            tokio::select! {
                                message = messages.next() => match message {
                                    Some(message) => {
                                        if !self.receive(message.get_channel_name(), message.get_payload_bytes()).await {
                                            break;
                                        }
                                    }
                                    None => break,
                                },
                                _ = heartbeat.tick() => {
                                    let ping = subscription.ping::<redis::Value>();
                                    if !matches!(tokio::time::timeout(REDIS_TIMEOUT, ping).await, Ok(Ok(_))) {
                                        break;
                                    }
                                }
                            }
                        }
                    }
                    self.store.pause();
                    self.publisher.send_replace(None);
                    // It could miss a revocation now: no managed key works here until it hears again.
                    self.keys.refuse_all().await;
                    self.metrics.cache_fanout_subscribed(false);
                    tracing::warn!(channel = %self.channel, "lost the Redis subscription (closed, or silent past its heartbeat): the cache is paused and managed keys refused until it is back");
                    said_down = true;
                }
                Err(error) if !said_down => {
                    tracing::warn!(%error, "cannot subscribe to Redis: the cache is paused and managed keys refused until it can");
                    said_down = true;
                }
                Err(error) => tracing::debug!(%error, "cannot subscribe to Redis yet"),
            }
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(RETRY_LAST);
        }
    }

    /// A subscription to the channel (its command side, for the heartbeat,
    /// and its messages) and a connection to publish on.
    async fn connect(
        &self,
    ) -> Result<
        (
            redis::aio::PubSubSink,
            redis::aio::PubSubStream,
            MultiplexedConnection,
        ),
        String,
    > {
        within(async {
            let (mut subscription, messages) = self.client.get_async_pubsub().await?.split();
            subscription
                .subscribe(&[self.channel.clone(), acks_channel(&self.channel)])
                .await?;
            let connection = self.client.get_multiplexed_async_connection().await?;
            Ok((subscription, messages, connection))
        })
        .await
    }

    /// Applies one message; `false` when the subscription should be given
    /// up (the managed keys could not be read again: reconnecting reads them
    /// afresh, and refuses them meanwhile).
    async fn receive(&self, channel: &str, payload: &[u8]) -> bool {
        if channel != self.channel {
            if let Ok(ack) = serde_json::from_slice::<Ack>(payload)
                && ack.to == self.instance
            {
                self.pending.acknowledged(ack.id);
            }
            return true;
        }
        let message = serde_json::from_slice::<Message>(payload).ok();
        let applied = match &message {
            Some(message) if message.from == self.instance => return true,
            Some(Message {
                event: Event::ManagedKeys,
                ..
            }) => {
                match self.read_managed_keys().await {
                    // Read, but not served yet: no confirmation (the change's maker says so).
                    Some(false) => return true,
                    Some(true) => true,
                    None => return false,
                }
            }
            Some(message) => {
                let config = Arc::clone(&self.serving.borrow());
                let applied = apply(&message.event, &self.store, &config);
                self.metrics.cache_fanout("applied");
                applied
            }
            None => {
                self.metrics.cache_fanout("applied");
                false
            }
        };
        if !applied {
            // It may have been a revocation, too.
            tracing::warn!(
                "a message from another instance could not be read: the whole cache is flushed and the managed keys read again"
            );
            self.store.purge_all();
            match self.read_managed_keys().await {
                Some(false) => return true,
                Some(true) => {}
                None => return false,
            }
        }
        let (Some(message), Some(mut connection)) = (message, self.publisher.borrow().clone())
        else {
            return true;
        };
        let ack = Ack {
            to: message.from,
            id: message.id,
        };
        let payload = serde_json::to_vec(&ack).expect("acks serialize");
        let sent =
            within(connection.publish::<_, _, usize>(acks_channel(&self.channel), payload)).await;
        if let Err(error) = sent {
            tracing::debug!(%error, "could not confirm an invalidation to the instance that published it");
        }
        true
    }

    /// Reads the managed keys again and hands them over: whether they are
    /// served in time, or `None` if they could not be read.
    async fn read_managed_keys(&self) -> Option<bool> {
        let connection = self.publisher.borrow().clone();
        match self.keys.read(connection, &self.channel).await {
            Ok(served) => Some(served),
            Err(error) => {
                tracing::warn!(%error, "cannot read the managed keys from Redis: reconnecting");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_upstreams_and_credentials_and_read_back_the_same() {
        let config = crate::config::load_str(
            "[upstreams.comfy]\nbase_url = \"http://127.0.0.1:9\"\n\
             [upstreams.scenario]\nbase_url = \"http://127.0.0.1:9/v1\"\npreset = \"scenario\"\nmount = \"/scenario\"\n",
            "t.toml",
            None,
            &|_| None,
            crate::config::Secrets::Resolve,
        )
        .unwrap();
        let upstreams = &config.upstreams;
        assert_eq!(upstreams[1].name, "scenario");
        let team = Partition::Team {
            upstream: 1,
            credential: CredentialId::of("the team's upstream key"),
        };
        let scopes = [
            Scope {
                family: Arc::from("assets"),
                member: None,
            },
            Scope {
                family: Arc::from("asset"),
                member: Some(Box::from("a1")),
            },
        ];
        let message = Message {
            from: "i1".into(),
            id: 7,
            event: to_wire(
                upstreams,
                Invalidation::Scopes {
                    partition: team,
                    scopes: &scopes,
                    team: "design",
                },
            ),
        };
        let text = serde_json::to_string(&message).unwrap();
        assert!(text.contains("\"upstream\":\"scenario\""), "{text}");
        assert!(!text.contains("the team's upstream key"), "{text}");
        assert_eq!(serde_json::from_str::<Message>(&text).unwrap(), message);
        let Event::Scopes { partition, .. } = &message.event else {
            panic!()
        };
        assert_eq!(partition_from_wire(upstreams, partition), Some(team));
        let shared = Partition::Shared { upstream: 0 };
        assert_eq!(
            partition_from_wire(upstreams, &partition_to_wire(upstreams, shared)),
            Some(shared)
        );
        let unknown = WirePartition {
            upstream: "elsewhere".into(),
            credential: None,
        };
        assert_eq!(partition_from_wire(upstreams, &unknown), None);
    }
}
