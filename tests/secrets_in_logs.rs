//! No client key and no upstream key ever appears in the gateway's logs, at
//! any level, across a traffic mix of successes, refusals and failures.
//! Its own binary: it installs a global subscriber that captures everything.

mod common;

use common::log_capture::LogCapture;
use common::redis_server::Redis;
use common::*;
use futures_util::StreamExt;
use http::{Method, StatusCode};
use teamgate::emulator::{Fault, FaultAction};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_appears_in_any_log_line() {
    let capture = LogCapture::default();
    // Everything the gateway process logs, at trace. The emulator is the
    // upstream (a different party that legitimately sees the upstream keys),
    // and the websocket client is the test's, so those two are left out.
    tracing_subscriber::fmt()
        .with_env_filter(
            "trace,teamgate::emulator=off,axum=off,tungstenite=off,tokio_tungstenite=off",
        )
        .with_writer(capture.clone())
        .with_ansi(false)
        .init();

    let h = Harness::start().await;
    let wrong_key = "tg_wrong_key_that_must_not_be_logged";
    assert_eq!(
        h.get("/api/assets", DESIGN_KEY).await.status,
        StatusCode::OK
    );
    assert_eq!(
        h.get("/api/jobs", RESEARCH_KEY).await.status,
        StatusCode::OK
    );
    assert_eq!(
        h.get("/api/assets", wrong_key).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        h.call(Method::GET, "/api/assets", None, None).await.status,
        StatusCode::UNAUTHORIZED
    );
    drop_next_connection(&h.emulator, "/api/tags");
    assert_eq!(
        h.get("/api/tags", DESIGN_KEY).await.status,
        StatusCode::BAD_GATEWAY
    );
    h.emulator.inject(
        Fault::new(
            None,
            "/api/tags",
            FaultAction::Status(StatusCode::INTERNAL_SERVER_ERROR),
        )
        .times(1),
    );
    assert_eq!(
        h.get("/api/tags", DESIGN_KEY).await.status,
        StatusCode::INTERNAL_SERVER_ERROR
    );
    let url = format!("ws://{}/ws?clientId=c&token={DESIGN_KEY}", h.gateway);
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let _ = socket.next().await;
    drop(socket);
    let bad_ws = format!("ws://{}/ws?clientId=c&token={wrong_key}", h.gateway);
    assert!(tokio_tungstenite::connect_async(bad_ws).await.is_err());
    h.stop().await;

    // `[shared] redis` with a password Redis refuses: the instance says it
    // cannot share its cache invalidations and quotas, never the URL's password.
    let redis_password = "wr0ng-redis-pa55word";
    let mut redis = Redis::reserve("secrets");
    redis.start_with(&["--requirepass", "the-right-one"]);
    let url_file = redis.url_file().with_file_name("wrong-password.url");
    let url = redis
        .url()
        .replace("redis://", &format!("redis://:{redis_password}@"));
    std::fs::write(&url_file, url).unwrap();
    let (emulator, addr) = serve_emulator(test_emulator()).await;
    let shared = format!(
        "[shared]\nredis = \"file:{}\"\nquota_sync = \"20ms\"\n[teams.design.limits]\nclient = {{ rate = \"10/s\" }}\n",
        url_file.display()
    );
    let text = config_text(&format!("http://{addr}"), "", &shared);
    let shared_instance = Harness::start_with_text(emulator, addr, &text).await;
    shared_instance
        .wait_for_metric(
            "teamgate_quota_sync_total",
            &[("outcome", "failed")],
            |failed| failed >= 2.0,
        )
        .await;
    assert_eq!(
        shared_instance.get("/api/jobs", DESIGN_KEY).await.status,
        StatusCode::OK
    );
    shared_instance.stop().await;

    let logs = capture.text();
    assert!(
        logs.contains("served"),
        "the access log was captured: {logs}"
    );
    assert!(
        logs.contains("team=\"design\""),
        "lines carry the team: {logs}"
    );
    // The access-log line carries what the issue asks: id, team, upstream, route class,
    // cache result, status, upstream status, latency.
    let access = logs
        .lines()
        .find(|line| line.contains("teamgate::access") && line.contains("cache=\"miss\""))
        .expect("an access-log line for the cacheable read");
    for field in [
        "request_id=",
        "team=\"design\"",
        "upstream=\"comfy\"",
        "route_class=\"cacheable_read\"",
        "status=200",
        "upstream_status=200",
        "latency_us=",
    ] {
        assert!(access.contains(field), "`{field}` in {access}");
    }
    for refused in [
        "cannot share quotas through Redis",
        "cannot subscribe to Redis",
    ] {
        let line = logs
            .lines()
            .find(|line| line.contains(refused))
            .unwrap_or_else(|| panic!("`{refused}` logged: {logs}"));
        assert!(line.contains("authentication failed"), "says why: {line}");
    }
    for secret in [
        DESIGN_KEY,
        RESEARCH_KEY,
        wrong_key,
        DESIGN_UPSTREAM_KEY,
        RESEARCH_UPSTREAM_KEY,
        redis_password,
    ] {
        assert!(!logs.contains(secret), "{secret} leaked into the logs");
    }
}
