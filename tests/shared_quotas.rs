//! Several instances sharing their quotas through a real Redis (`[shared]
//! redis`, src/limit/shared.rs): what one instance admitted counts against
//! the quota on every other, for team, per-key and upstream quotas alike;
//! without Redis each instance enforces its quotas alone, and says so.
//! Needs `redis-server` on the PATH (`.ci/run` installs it).
//!
//! Rounds are awaited through `teamgate_quota_sync_total`, never timed:
//! two whole rounds of one instance after its requests have reported them,
//! two of another after that have read them back.

mod common;

use std::net::SocketAddr;

use common::redis_server::Redis;
use common::*;
use http::{Method, StatusCode};
use teamgate::emulator::{Emulator, Fault, FaultAction};

/// The config of a gateway in front of the emulator at `addr` sharing its
/// quotas through `redis`, with `limits` (TOML) for its teams.
fn config(addr: SocketAddr, redis: &Redis, limits: &str) -> String {
    let shared = format!(
        "[shared]\nredis = \"file:{}\"\nquota_sync = \"20ms\"\n{limits}",
        redis.url_file().display()
    );
    config_text(&format!("http://{addr}"), "", &shared)
}

/// A gateway running [`config`].
async fn instance(emulator: &Emulator, addr: SocketAddr, redis: &Redis, limits: &str) -> Harness {
    Harness::start_with_text(emulator.clone(), addr, &config(addr, redis, limits)).await
}

/// Waits (20 s at most) until `h` has run two more rounds ending in `outcome`:
/// the first may have been under way already, the second began after this
/// call — so it reported what `h` admitted before, and read back what the
/// others had reported.
async fn two_rounds(h: &Harness, outcome: &str) {
    let from = h.quota_rounds(outcome).await;
    h.wait_for_metric(
        "teamgate_quota_sync_total",
        &[("outcome", outcome)],
        |now| now >= from + 2.0,
    )
    .await;
}

/// `path` through `h` with `key`: its status.
async fn status(h: &Harness, path: &str, key: &str) -> StatusCode {
    h.get(path, key).await.status
}

#[tokio::test]
async fn a_team_quota_is_the_fleets_not_each_instances() {
    let redis = Redis::started("quota-team");
    let (emulator, addr) = serve_emulator(test_emulator()).await;
    let limits = "[teams.design.limits]\nclient = { rate = \"1/h\", burst = 4 }\n";
    let a = instance(&emulator, addr, &redis, limits).await;
    let b = instance(&emulator, addr, &redis, limits).await;

    for _ in 0..3 {
        assert_eq!(status(&a, "/api/jobs", DESIGN_KEY).await, StatusCode::OK);
    }
    two_rounds(&a, "ok").await;
    two_rounds(&b, "ok").await;
    // B has admitted nothing itself, yet holds one permit of the four.
    let last = b.get("/api/jobs", DESIGN_KEY).await;
    assert_eq!(last.status, StatusCode::OK);
    assert!(
        last.header("ratelimit").starts_with("\"client\";r=0;"),
        "{}",
        last.header("ratelimit")
    );
    let refused = b.get("/api/jobs", DESIGN_KEY).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    let retry: u64 = refused.header("retry-after").parse().unwrap();
    assert!((3590..=3600).contains(&retry), "Retry-After {retry}");
    assert_eq!(refused.json()["code"], "rate_limited");
    // A hears of B's: its bucket is spent too. Team research was never limited.
    two_rounds(&b, "ok").await;
    two_rounds(&a, "ok").await;
    assert_eq!(
        status(&a, "/api/jobs", DESIGN_KEY).await,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(status(&b, "/api/jobs", RESEARCH_KEY).await, StatusCode::OK);
    assert_eq!(emulator.count(Method::GET, "/api/jobs"), 5);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn per_key_and_upstream_quotas_are_shared_by_key_id_never_the_key() {
    let redis = Redis::started("quota-key");
    let (emulator, addr) = serve_emulator(test_emulator()).await;
    let limits = "[teams.design.limits]\nper_key = { rate = \"1/h\", burst = 2 }\n\
                  [teams.research.limits]\nupstream = { rate = \"1/h\", burst = 1 }\n";
    let a = instance(&emulator, addr, &redis, limits).await;
    let b = instance(&emulator, addr, &redis, limits).await;

    for _ in 0..2 {
        assert_eq!(status(&a, "/api/jobs", DESIGN_KEY).await, StatusCode::OK);
    }
    // Research's one upstream permit, spent by a pass-through read on A.
    assert_eq!(status(&a, "/api/jobs", RESEARCH_KEY).await, StatusCode::OK);
    two_rounds(&a, "ok").await;
    two_rounds(&b, "ok").await;

    assert_eq!(
        status(&b, "/api/jobs", DESIGN_KEY).await,
        StatusCode::TOO_MANY_REQUESTS,
        "the key spent its quota on A"
    );
    assert_eq!(
        status(&b, "/api/jobs", DESIGN_KEY_2).await,
        StatusCode::OK,
        "the team's other key has its own"
    );
    let refused = b.get("/api/jobs", RESEARCH_KEY).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(
        refused
            .header("ratelimit-policy")
            .starts_with("\"upstream\";"),
        "{}",
        refused.header("ratelimit-policy")
    );
    assert_eq!(emulator.count(Method::GET, "/api/jobs"), 4);

    // What Redis holds (once B has reported its own) names teams, quotas
    // and key ids: no key, no stored hash.
    two_rounds(&b, "ok").await;
    let mut redis_client = redis.connection().await;
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut redis_client)
        .await
        .unwrap();
    keys.sort();
    assert_eq!(
        keys,
        [
            "teamgate:cache:quota:design:per_key",
            "teamgate:cache:quota:research:upstream:comfy"
        ]
    );
    let mut members: Vec<String> = redis::cmd("ZRANGE")
        .arg("teamgate:cache:quota:design:per_key")
        .arg(0)
        .arg(-1)
        .query_async(&mut redis_client)
        .await
        .unwrap();
    members.sort();
    let id = |key: &str| hex_sha256(key)[..24].to_owned();
    let mut expected = vec![id(DESIGN_KEY), id(DESIGN_KEY_2)];
    expected.sort();
    assert_eq!(members, expected);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn without_redis_each_instance_enforces_its_quotas_alone_until_it_is_back() {
    let mut redis = Redis::reserve("quota-down");
    let (emulator, addr) = serve_emulator(test_emulator()).await;
    let limits = "[teams.design.limits]\nclient = { rate = \"1/h\", burst = 2 }\n";
    let a = instance(&emulator, addr, &redis, limits).await;
    let b = instance(&emulator, addr, &redis, limits).await;

    two_rounds(&a, "failed").await;
    assert_eq!(a.quota_rounds("ok").await, 0.0);
    // Each admits its own two (the fleet four), and refuses the next.
    for h in [&a, &b] {
        for _ in 0..2 {
            assert_eq!(status(h, "/api/jobs", DESIGN_KEY).await, StatusCode::OK);
        }
        assert_eq!(
            status(h, "/api/jobs", DESIGN_KEY).await,
            StatusCode::TOO_MANY_REQUESTS
        );
    }

    // Redis comes up: the rounds succeed again. What was admitted while it
    // was down (before a round that failed) is not reported: the shared
    // bucket starts from now.
    two_rounds(&a, "failed").await;
    two_rounds(&b, "failed").await;
    redis.start();
    two_rounds(&a, "ok").await;
    two_rounds(&b, "ok").await;
    let mut redis_client = redis.connection().await;
    let stored: Option<String> = redis::cmd("GET")
        .arg("teamgate:cache:quota:design:client")
        .query_async(&mut redis_client)
        .await
        .unwrap();
    assert_eq!(stored, None, "nothing admitted since Redis came up");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn an_upstream_429_through_one_instance_pauses_the_team_on_every_instance() {
    let redis = Redis::started("quota-pause");
    let (emulator, addr) = serve_emulator(test_emulator()).await;
    let a = instance(&emulator, addr, &redis, "").await;
    let b = instance(&emulator, addr, &redis, "").await;
    emulator.inject(
        Fault::new(
            None,
            "/api/jobs",
            FaultAction::RateLimited {
                retry_after_secs: 30,
            },
        )
        .times(1),
    );
    let throttled = a.get("/api/jobs", DESIGN_KEY).await;
    assert_eq!(throttled.status, StatusCode::TOO_MANY_REQUESTS);
    two_rounds(&a, "ok").await;
    two_rounds(&b, "ok").await;

    // B never sent the team's key anything, yet holds back: the upstream
    // said so to the key, through A.
    let paused = b.get("/api/jobs", DESIGN_KEY).await;
    assert_eq!(paused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        paused.json()["error"]["type"],
        "RATE_LIMITED",
        "the gateway's answer"
    );
    let retry: u64 = paused.header("retry-after").parse().unwrap();
    assert!((1..=30).contains(&retry), "Retry-After {retry}");
    assert_eq!(
        emulator.count(Method::GET, "/api/jobs"),
        1,
        "nothing more was sent"
    );
    assert_eq!(status(&b, "/api/jobs", RESEARCH_KEY).await, StatusCode::OK);
    a.stop().await;
    b.stop().await;
}

/// A reload that changes a quota keeps it shared: the new bucket is the
/// fleet's from its first round.
#[tokio::test]
async fn a_quota_a_reload_changes_is_still_the_fleets() {
    let redis = Redis::started("quota-reload");
    let (emulator, addr) = serve_emulator(test_emulator()).await;
    let limits = |burst: u32| {
        format!(
            "[admin]\ntoken = \"env:ADMIN_TOKEN\"\n[teams.design.limits]\nclient = {{ rate = \"1/h\", burst = {burst} }}\n"
        )
    };
    let file = redis.url_file().with_file_name("teamgate.toml");
    let write = |burst: u32| {
        let aside = file.with_extension("new");
        std::fs::write(&aside, config(addr, &redis, &limits(burst))).unwrap();
        std::fs::rename(aside, &file).unwrap();
    };
    write(4);
    let a = Harness::start_from_file(emulator.clone(), addr, &file).await;
    let b = instance(&emulator, addr, &redis, &limits(4)).await;

    write(3);
    let reloaded = a
        .admin_call(Method::POST, "/admin/reload", Some(ADMIN_TOKEN))
        .await;
    assert_eq!(reloaded.status, StatusCode::OK);
    for _ in 0..3 {
        assert_eq!(status(&b, "/api/jobs", DESIGN_KEY).await, StatusCode::OK);
    }
    two_rounds(&b, "ok").await;
    two_rounds(&a, "ok").await;
    let refused = a.get("/api/jobs", DESIGN_KEY).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(
        refused.header("ratelimit-policy").contains("q=3"),
        "the reloaded quota: {}",
        refused.header("ratelimit-policy")
    );
    a.stop().await;
    b.stop().await;
}
