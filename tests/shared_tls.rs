//! `[shared] redis = "rediss://…"`: the instances reach Redis over TLS, the
//! server's certificate checked against `redis_ca` (a private CA) — and
//! refused without it (the public roots do not vouch for it). Needs
//! `redis-server` with TLS on the PATH (Debian's is; `.ci/run` installs it).

mod common;

use common::redis_server::Redis;
use common::*;
use http::StatusCode;

/// A gateway sharing through the TLS Redis at `url_file`, with `redis_ca` if given.
async fn instance(url_file: &std::path::Path, ca: Option<&std::path::Path>) -> Harness {
    let (emulator, addr) = serve_emulator(test_emulator()).await;
    let ca = ca.map_or(String::new(), |ca| {
        format!("redis_ca = \"{}\"\n", ca.display())
    });
    let shared = format!(
        "[shared]\nredis = \"file:{}\"\nquota_sync = \"20ms\"\n{ca}[teams.design.limits]\nclient = {{ rate = \"1/h\", burst = 10 }}\n",
        url_file.display()
    );
    Harness::start_with_text(
        emulator,
        addr,
        &config_text(&format!("http://{addr}"), "", &shared),
    )
    .await
}

/// Waits until `h` has run `count` rounds ending in `outcome`.
async fn rounds_reach(h: &Harness, outcome: &str, count: f64) {
    h.wait_for_metric(
        "teamgate_quota_sync_total",
        &[("outcome", outcome)],
        |rounds| rounds >= count,
    )
    .await;
}

#[tokio::test]
async fn instances_share_through_a_tls_redis_whose_certificate_they_check() {
    let mut redis = Redis::reserve("tls");
    let pair = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let (cert, key) = (redis.dir().join("redis.pem"), redis.dir().join("redis.key"));
    std::fs::write(&cert, pair.cert.pem()).unwrap();
    std::fs::write(&key, pair.signing_key.serialize_pem()).unwrap();
    redis.start_tls(&cert, &key);
    let url_file = redis.dir().join("rediss.url");
    std::fs::write(&url_file, redis.url().replace("redis://", "rediss://")).unwrap();

    // With the CA: subscribed, and quota rounds go through.
    let trusting = instance(&url_file, Some(&cert)).await;
    trusting.until_subscribed(1.0).await;
    rounds_reach(&trusting, "ok", 2.0).await;
    assert_eq!(
        trusting.get("/api/jobs", DESIGN_KEY).await.status,
        StatusCode::OK
    );

    // Without it the server's certificate is not trusted: nothing is shared
    // (the cache stays paused, quotas are enforced alone), and the failed
    // rounds are counted.
    let doubting = instance(&url_file, None).await;
    rounds_reach(&doubting, "failed", 2.0).await;
    assert_eq!(doubting.quota_rounds("ok").await, 0.0);
    assert_eq!(
        doubting
            .metric("teamgate_cache_fanout_subscribed", &[])
            .await,
        Some(0.0)
    );
    assert_eq!(
        doubting.get("/api/jobs", DESIGN_KEY).await.status,
        StatusCode::OK,
        "the gateway serves all the same"
    );
    trusting.stop().await;
    doubting.stop().await;
}
