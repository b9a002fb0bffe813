//! Managed client keys (src/auth/managed.rs): made and revoked through the
//! admin API of any instance, kept in a real Redis, served by every
//! instance — and refused by an instance that cannot hear the others.
//! Needs `redis-server` on the PATH (`.ci/run` installs it).

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::redis_server::Redis;
use common::*;
use http::{Method, Request, StatusCode};
use http_body_util::Full;

/// `POST /admin/teams/{team}/keys` on `h` with `body`.
async fn make_key(h: &Harness, team: &str, body: &str) -> Answer {
    let request = Request::post(format!("http://{}/admin/teams/{team}/keys", h.admin))
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    h.send(request).await
}

async fn revoke_key(h: &Harness, team: &str, hash: &str) -> Answer {
    h.admin_call(
        Method::DELETE,
        &format!("/admin/teams/{team}/keys/{hash}"),
        Some(ADMIN_TOKEN),
    )
    .await
}

/// The managed keys `GET /admin/teams` lists for `team` on `h`.
async fn listed(h: &Harness, team: &str) -> Vec<serde_json::Value> {
    let teams = h
        .admin_call(Method::GET, "/admin/teams", Some(ADMIN_TOKEN))
        .await
        .json();
    teams["teams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == team)
        .unwrap()["managed_keys"]
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test]
async fn a_key_made_on_one_instance_works_on_all_and_revoked_on_another_works_on_none() {
    use http_body_util::BodyExt;
    let redis = Redis::started("keys");
    let (emulator, addr) = serve_slow_events_emulator().await;
    let a = Harness::start_shared(emulator.clone(), addr, &redis).await;
    let b = Harness::start_shared(emulator.clone(), addr, &redis).await;
    a.until_subscribed(1.0).await;
    b.until_subscribed(1.0).await;

    let made = make_key(&a, "research", r#"{"label": "ci runner"}"#).await;
    assert_eq!(made.status, StatusCode::CREATED, "{:?}", made.body);
    let made = made.json();
    let key = made["key"].as_str().unwrap().to_owned();
    let hash = made["hash"].as_str().unwrap().to_owned();
    assert!(key.starts_with("tg_"));
    assert_eq!(hash, common::hash(&key));
    assert_eq!(made["team"], "research");
    assert_eq!(made["confirmed_by_every_instance"], true);
    // Served by both the moment the answer is out; upstream as team research.
    for h in [&a, &b] {
        assert_eq!(h.get("/api/jobs", &key).await.status, StatusCode::OK);
        let keys = listed(h, "research").await;
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0]["hash"], hash);
        assert_eq!(keys[0]["label"], "ci runner");
        assert!(listed(h, "design").await.is_empty());
    }
    let last = emulator.recorded().pop().unwrap();
    assert_eq!(last.headers["x-api-key"], RESEARCH_UPSTREAM_KEY);
    // Redis holds the hash and the record, never the key.
    let mut redis_client = redis.connection().await;
    let stored: std::collections::HashMap<String, String> = redis::cmd("HGETALL")
        .arg("teamgate:cache:keys")
        .query_async(&mut redis_client)
        .await
        .unwrap();
    assert_eq!(stored.keys().collect::<Vec<_>>(), [&hash]);
    assert!(!format!("{stored:?}").contains(&key));

    // Revoked through B: A refuses it on the very next request, and ends
    // the event stream it had opened with it.
    let (_, mut events) = a.open_job_events(&key).await;
    assert_eq!(
        revoke_key(&b, "design", &hash).await.status,
        StatusCode::NOT_FOUND,
        "not a key of team design"
    );
    let revoked = revoke_key(&b, "research", &hash).await;
    assert_eq!(revoked.status, StatusCode::OK);
    assert_eq!(revoked.json()["confirmed_by_every_instance"], true);
    let ended = tokio::time::timeout(Duration::from_secs(20), events.frame())
        .await
        .expect("the revoked key's event stream ends");
    assert!(ended.is_none(), "ended as a stream ends: {ended:?}");
    for h in [&a, &b] {
        assert_eq!(
            h.get("/api/jobs", &key).await.status,
            StatusCode::UNAUTHORIZED
        );
        assert!(listed(h, "research").await.is_empty());
    }
    assert_eq!(
        revoke_key(&a, "research", &hash).await.status,
        StatusCode::NOT_FOUND,
        "already gone"
    );
    // The file's keys are the file's.
    let in_file = revoke_key(&a, "design", &common::hash(DESIGN_KEY)).await;
    assert_eq!(in_file.status, StatusCode::CONFLICT);
    assert_eq!(in_file.json()["code"], "key_in_config_file");
    assert_eq!(a.get("/api/jobs", DESIGN_KEY).await.status, StatusCode::OK);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn the_key_api_refuses_what_it_cannot_do() {
    let redis = Redis::started("keys-refused");
    let (emulator, addr) = serve_emulator(test_emulator()).await;
    let h = Harness::start_shared(emulator.clone(), addr, &redis).await;
    h.until_subscribed(1.0).await;
    let without_token = h
        .admin_call(Method::POST, "/admin/teams/design/keys", None)
        .await;
    assert_eq!(without_token.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        make_key(&h, "no-such-team", "").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        make_key(&h, "design", "{\"labels\": 1}").await.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        revoke_key(&h, "design", "not-a-hash").await.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        h.admin_call(Method::GET, "/admin/teams/design/keys", Some(ADMIN_TOKEN))
            .await
            .status,
        StatusCode::METHOD_NOT_ALLOWED
    );
    let made = make_key(&h, "design", "").await;
    assert_eq!(made.status, StatusCode::CREATED);
    assert_eq!(made.json()["label"], serde_json::Value::Null);
    h.stop().await;

    // Without [shared] redis, keys live in the config file only.
    let alone = Harness::start_with_config("", "[admin]\ntoken = \"env:ADMIN_TOKEN\"\n").await;
    let refused = make_key(&alone, "design", "").await;
    assert_eq!(refused.status, StatusCode::CONFLICT);
    assert_eq!(refused.json()["code"], "keys_not_shared");
    alone.stop().await;
}

#[tokio::test]
async fn an_instance_that_cannot_hear_the_others_refuses_managed_keys_until_it_can() {
    let redis = Redis::started("keys-down");
    let (emulator, addr) = serve_emulator(test_emulator()).await;
    // From a file, to reload it.
    let file = redis.url_file().with_file_name("teamgate.toml");
    let shared = format!(
        "[admin]\ntoken = \"env:ADMIN_TOKEN\"\n[shared]\nredis = \"file:{}\"\n",
        redis.url_file().display()
    );
    std::fs::write(&file, config_text(&format!("http://{addr}"), "", &shared)).unwrap();
    let h = Harness::start_from_file(emulator.clone(), addr, &file).await;
    h.until_subscribed(1.0).await;
    let key = make_key(&h, "design", "").await.json()["key"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(h.get("/api/jobs", &key).await.status, StatusCode::OK);
    // A reload of the file keeps serving it.
    let reloaded = h
        .admin_call(Method::POST, "/admin/reload", Some(ADMIN_TOKEN))
        .await;
    assert_eq!(reloaded.status, StatusCode::OK);
    assert_eq!(h.get("/api/jobs", &key).await.status, StatusCode::OK);

    // Redis silent: the instance could miss a revocation, so once its
    // heartbeat says so the managed key is refused; the file's keys keep
    // working. Making a key is refused too, and changes nothing.
    redis.signal("STOP");
    h.until_subscribed(0.0).await;
    assert_eq!(
        h.get("/api/jobs", &key).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(h.get("/api/jobs", DESIGN_KEY).await.status, StatusCode::OK);
    let refused = make_key(&h, "design", "").await;
    assert_eq!(refused.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.json()["code"], "redis_unavailable");

    // Heard again: the keys are read afresh, and the managed key works.
    redis.signal("CONT");
    h.until_subscribed(1.0).await;
    assert_eq!(h.get("/api/jobs", &key).await.status, StatusCode::OK);
    assert_eq!(listed(&h, "design").await.len(), 1);
    h.stop().await;
}
