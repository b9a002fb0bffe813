//! Several instances sharing cache invalidations through a real Redis
//! (`[shared] redis`, src/shared.rs): a write or an admin purge through one
//! instance reaches the others' caches; an instance that cannot hear the
//! others does not serve from its cache, and flushes it when it can again.
//! Needs `redis-server` on the PATH (`.ci/run` installs it).

mod common;

use std::time::Duration;

use common::redis_server::Redis;
use common::*;
use http::Method;
use teamgate::emulator::Emulator;

/// `teamgate_cache_fanout_total{event}` of `h`.
async fn fanout_events(h: &Harness, event: &str) -> Option<f64> {
    h.metric("teamgate_cache_fanout_total", &[("event", event)])
        .await
}

async fn subscribed(h: &Harness) -> Option<f64> {
    h.metric("teamgate_cache_fanout_subscribed", &[]).await
}

const LIST: &str = "/api/assets?limit=50";

/// Reads `LIST` through `h` until it is cached there: the second read is a hit.
async fn cache_list(h: &Harness) {
    h.get(LIST, DESIGN_KEY).await;
    let again = h.get(LIST, DESIGN_KEY).await;
    assert!(again.is_hit(), "{}", again.cache_status());
}

/// Reads `LIST` through `h`, and checks it was answered from the upstream,
/// not from `h`'s cache.
async fn read_goes_upstream(h: &Harness, emulator: &Emulator) -> Answer {
    let reads_before = emulator.count(Method::GET, "/api/assets");
    let answer = h.get(LIST, DESIGN_KEY).await;
    assert_eq!(answer.status, 200);
    assert!(!answer.is_hit(), "{}", answer.cache_status());
    assert_eq!(emulator.count(Method::GET, "/api/assets"), reads_before + 1);
    answer
}

#[tokio::test]
async fn writes_and_purges_through_one_instance_reach_the_others_cache() {
    let redis = Redis::started("fanout");
    let (emulator, addr) = serve_emulator(test_emulator()).await;
    let a = Harness::start_shared(emulator.clone(), addr, &redis).await;
    let b = Harness::start_shared(emulator.clone(), addr, &redis).await;
    a.until_subscribed(1.0).await;
    b.until_subscribed(1.0).await;

    assert!(!b.get(LIST, DESIGN_KEY).await.lists("made-on-a.png"));
    assert!(b.get(LIST, DESIGN_KEY).await.is_hit());

    // A write through A: B's cached list is invalidated.
    assert!(
        a.create_asset(DESIGN_KEY, "made-on-a.png")
            .await
            .status
            .is_success()
    );
    // The write's answer came once B had applied it: B's very next read misses.
    let after_write = read_goes_upstream(&b, &emulator).await;
    assert!(
        after_write.lists("made-on-a.png"),
        "B reads the asset A wrote"
    );

    // A purge through A's admin API: B's cache is purged too.
    assert!(b.get(LIST, DESIGN_KEY).await.is_hit());
    let purged = a
        .admin_call(
            Method::DELETE,
            "/admin/cache?team=design",
            Some(ADMIN_TOKEN),
        )
        .await;
    assert_eq!(purged.status, 200);
    read_goes_upstream(&b, &emulator).await;

    assert_eq!(fanout_events(&a, "published").await, Some(2.0));
    assert_eq!(fanout_events(&b, "applied").await, Some(2.0));
    assert_eq!(
        fanout_events(&a, "applied").await,
        Some(0.0),
        "A skips its own messages"
    );
    assert_eq!(fanout_events(&a, "publish_failed").await, Some(0.0));
    assert_eq!(fanout_events(&a, "unconfirmed").await, Some(0.0));
    a.stop().await;
    b.stop().await;
}

/// While a rotated upstream key rolls out, two instances key one team's
/// entries by different credentials: a write through one still reaches the
/// other's entries of that team.
#[tokio::test]
async fn a_write_reaches_an_instance_that_keys_the_team_by_another_credential() {
    let redis = Redis::started("rotation");
    let (emulator, addr) = serve_emulator(test_emulator()).await;
    let a = Harness::start_shared(emulator.clone(), addr, &redis).await;
    let b = Harness::start_shared_with(emulator.clone(), addr, &redis, |text| {
        let design = "[teams.design]\nupstream_keys = { comfy = \"env:DESIGN_COMFY_KEY\" }";
        assert!(text.contains(design));
        text.replace(
            design,
            "[teams.design]\nupstream_keys = { comfy = \"env:RESEARCH_COMFY_KEY\" }",
        )
    })
    .await;
    a.until_subscribed(1.0).await;
    b.until_subscribed(1.0).await;
    cache_list(&b).await;

    assert!(
        a.create_asset(DESIGN_KEY, "rotated.png")
            .await
            .status
            .is_success()
    );
    read_goes_upstream(&b, &emulator).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn an_instance_that_cannot_hear_the_others_serves_nothing_from_its_cache() {
    let mut redis = Redis::reserve("paused");
    let (emulator, addr) = serve_emulator(test_emulator()).await;
    let h = Harness::start_shared(emulator.clone(), addr, &redis).await;

    // No Redis yet: every read goes upstream, nothing is stored.
    for _ in 0..3 {
        read_goes_upstream(&h, &emulator).await;
    }
    assert_eq!(subscribed(&h).await, Some(0.0));
    // A write is still answered; the invalidation it could not share is counted.
    assert!(
        h.create_asset(DESIGN_KEY, "while-down.png")
            .await
            .status
            .is_success()
    );
    assert_eq!(fanout_events(&h, "publish_failed").await, Some(1.0));

    // Redis comes up: the instance subscribes and caches again.
    redis.start();
    h.until_subscribed(1.0).await;
    cache_list(&h).await;

    // Redis goes away: the cached entry is not served any more.
    redis.stop();
    h.until_subscribed(0.0).await;
    read_goes_upstream(&h, &emulator).await;

    // And back: what was cached before the outage is flushed, not served.
    redis.start();
    h.until_subscribed(1.0).await;
    read_goes_upstream(&h, &emulator).await;
    h.stop().await;
}

/// A Redis that stops answering without closing its connections (stopped,
/// or cut off by the network) is noticed by the heartbeat: the cache pauses
/// until the subscription is back, and is flushed then.
#[tokio::test]
async fn a_silent_redis_pauses_the_cache_until_it_answers_again() {
    let redis = Redis::started("silent");
    let (emulator, addr) = serve_emulator(test_emulator()).await;
    let h = Harness::start_shared(emulator.clone(), addr, &redis).await;
    h.until_subscribed(1.0).await;
    cache_list(&h).await;

    redis.signal("STOP");
    h.until_subscribed(0.0).await;
    read_goes_upstream(&h, &emulator).await;

    // Back: flushed, so the entry cached before is not served.
    redis.signal("CONT");
    h.until_subscribed(1.0).await;
    read_goes_upstream(&h, &emulator).await;
    h.stop().await;
}

/// Another instance, played by the test on a raw Redis connection: it takes
/// its time (300 ms) before it confirms each invalidation — or never does.
/// Returns a flag set just before each confirmation is sent.
async fn slow_instance(
    redis: &Redis,
    confirms: bool,
) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    use futures_util::StreamExt;
    let confirmed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = redis::Client::open(redis.url()).unwrap();
    let mut subscription = client.get_async_pubsub().await.unwrap();
    subscription.subscribe("teamgate:cache").await.unwrap();
    let mut acks = client.get_multiplexed_async_connection().await.unwrap();
    let flag = std::sync::Arc::clone(&confirmed);
    tokio::spawn(async move {
        let mut messages = subscription.into_on_message();
        while let Some(message) = messages.next().await {
            let message: serde_json::Value =
                serde_json::from_slice(message.get_payload_bytes()).unwrap();
            if !confirms {
                continue;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            flag.store(true, std::sync::atomic::Ordering::SeqCst);
            let ack = serde_json::json!({ "to": message["from"], "id": message["id"] });
            redis::AsyncCommands::publish::<_, _, usize>(
                &mut acks,
                "teamgate:cache:acks",
                ack.to_string(),
            )
            .await
            .unwrap();
        }
    });
    confirmed
}

/// A write's answer waits until every instance that received its
/// invalidation has confirmed applying it; one that never confirms holds it
/// up at most 2 s, and is counted.
#[tokio::test]
async fn a_write_is_answered_once_every_instance_has_applied_it() {
    let redis = Redis::started("acks");
    let (emulator, addr) = serve_emulator(test_emulator()).await;
    let h = Harness::start_shared(emulator.clone(), addr, &redis).await;
    h.until_subscribed(1.0).await;

    let confirmed = slow_instance(&redis, true).await;
    assert!(
        h.create_asset(DESIGN_KEY, "confirmed.png")
            .await
            .status
            .is_success()
    );
    assert!(
        confirmed.load(std::sync::atomic::Ordering::SeqCst),
        "answered before the other instance confirmed"
    );
    assert_eq!(fanout_events(&h, "published").await, Some(1.0));

    let _silent = slow_instance(&redis, false).await;
    assert!(
        h.create_asset(DESIGN_KEY, "unconfirmed.png")
            .await
            .status
            .is_success()
    );
    assert_eq!(fanout_events(&h, "unconfirmed").await, Some(1.0));
    h.stop().await;
}
