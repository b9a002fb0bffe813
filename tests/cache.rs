//! The response cache (issue #4): each invariant of ARCHITECTURE.md's "Cache
//! invariants" and each behaviour of the issue, counting what reaches the
//! emulator. Read rules follow comfy-cloud-openapi.yaml's `asset` routes.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::json;
use teamgate::emulator::{Fault, FaultAction};

const LIST: &str = "/api/assets?limit=20&include_tags=input";

async fn cache_stats(h: &Harness) -> serde_json::Value {
    h.admin_get("/admin/cache").await.json()
}

#[tokio::test]
async fn a_repeated_read_is_a_hit_byte_identical_to_what_upstream_sent() {
    let h = Harness::start().await;
    let miss = h.get(LIST, DESIGN_KEY).await;
    assert_eq!(miss.status, StatusCode::OK);
    assert_eq!(miss.cache_status(), "teamgate; fwd=miss; stored");
    let hit = h.get(LIST, DESIGN_KEY).await;
    assert!(
        hit.cache_status().starts_with("teamgate; hit; ttl="),
        "{}",
        hit.cache_status()
    );
    assert!(hit.headers.contains_key("age"));
    assert_eq!(h.emulator.count(Method::GET, "/api/assets"), 1);

    assert_eq!(hit.body, miss.body, "the body is byte-identical");
    let end_to_end = |answer: &Answer| {
        let mut headers: Vec<(String, Vec<u8>)> = answer
            .headers
            .iter()
            .filter(|(name, _)| !["cache-status", "age", "x-request-id"].contains(&name.as_str()))
            .map(|(name, value)| (name.to_string(), value.as_bytes().to_vec()))
            .collect();
        headers.sort();
        headers
    };
    assert_eq!(
        end_to_end(&hit),
        end_to_end(&miss),
        "so are the end-to-end headers"
    );
    // The upstream's own headers are all there, unchanged (Date included).
    assert_eq!(hit.headers["date"], miss.headers["date"]);
    assert_eq!(hit.headers["content-type"], "application/json");
    h.stop().await;
}

#[tokio::test]
async fn two_teams_never_share_an_entry_for_the_same_url() {
    let h = Harness::start().await;
    h.create_asset(DESIGN_KEY, "design-only.png").await;
    let design = h.get(LIST, DESIGN_KEY).await;
    let research = h.get(LIST, RESEARCH_KEY).await;
    assert_eq!(
        research.cache_status(),
        "teamgate; fwd=miss; stored",
        "no cross-team hit"
    );
    assert!(design.lists("design-only.png"));
    assert!(!research.lists("design-only.png"));
    // Both are now cached, each for its own team.
    assert!(!h.get(LIST, RESEARCH_KEY).await.lists("design-only.png"));
    assert!(h.get(LIST, DESIGN_KEY).await.lists("design-only.png"));
    assert_eq!(h.emulator.count(Method::GET, "/api/assets"), 2);
    let keys: Vec<_> = h
        .emulator
        .recorded()
        .iter()
        .filter(|r| r.method == Method::GET)
        .map(|r| r.headers["x-api-key"].clone())
        .collect();
    assert_eq!(keys, [DESIGN_UPSTREAM_KEY, RESEARCH_UPSTREAM_KEY]);
    h.stop().await;
}

#[tokio::test]
async fn the_key_holds_the_exact_query_and_the_representation() {
    let h = Harness::start().await;
    h.get("/api/assets?limit=5", DESIGN_KEY).await;
    h.get("/api/assets?limit=5&", DESIGN_KEY).await;
    h.get("/api/assets?offset=0&limit=5", DESIGN_KEY).await;
    h.get_with(
        "/api/assets?limit=5",
        DESIGN_KEY,
        &[("accept", "application/json")],
    )
    .await;
    h.get_with(
        "/api/assets?limit=5",
        DESIGN_KEY,
        &[("accept-encoding", "gzip")],
    )
    .await;
    assert_eq!(
        h.emulator.count(Method::GET, "/api/assets"),
        5,
        "five different keys"
    );
    h.get("/api/assets?limit=5", DESIGN_KEY).await;
    assert_eq!(
        h.emulator.count(Method::GET, "/api/assets"),
        5,
        "the first is a hit now"
    );
    h.stop().await;
}

#[tokio::test]
async fn after_from_hash_the_next_list_shows_the_new_asset() {
    let h = Harness::start().await;
    assert!(!h.get(LIST, DESIGN_KEY).await.lists("fresh.png"));
    assert!(h.get(LIST, DESIGN_KEY).await.cache_status().contains("hit"));
    let created = h.create_asset(DESIGN_KEY, "fresh.png").await;
    assert_eq!(created.status, StatusCode::CREATED);
    let after = h.get(LIST, DESIGN_KEY).await;
    assert_eq!(after.cache_status(), "teamgate; fwd=miss; stored");
    assert!(after.lists("fresh.png"));
    // Tags were touched too (the `tags` scope).
    h.get("/api/tags", DESIGN_KEY).await;
    h.call(
        Method::POST,
        &format!(
            "/api/assets/{}/tags",
            created.json()["id"].as_str().unwrap()
        ),
        Some(DESIGN_KEY),
        Some(json!({"tags": ["extra"]})),
    )
    .await;
    let tags = h.get("/api/tags", DESIGN_KEY).await;
    assert_eq!(tags.cache_status(), "teamgate; fwd=miss; stored");
    assert!(tags.json().to_string().contains("\"extra\""));
    h.stop().await;
}

/// Invariant 4 holds for the write however it is spelled: a spelling an
/// upstream that normalises would read as `from-hash` (merged slashes, an
/// encoded letter or `-`; RFC 3986 §6.2.2.2) but no rule here would match is
/// refused, never forwarded uninvalidated; a trailing `/` is the write itself.
#[tokio::test]
async fn a_write_spelled_another_way_is_refused_or_invalidates_as_itself() {
    let h = Harness::start().await;
    h.get(LIST, DESIGN_KEY).await;
    assert!(h.get(LIST, DESIGN_KEY).await.cache_status().contains("hit"));
    let body = json!({"name": "sneaky.png", "tags": ["input"]});
    for path in [
        "/api//assets/from-hash",
        "//api/assets/from-hash",
        "/api/%61ssets/from-hash",
        "/api/assets/from%2Dhash",
    ] {
        let refused = h
            .call(Method::POST, path, Some(DESIGN_KEY), Some(body.clone()))
            .await;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{path}");
        assert_eq!(refused.json()["code"], "bad_request", "{path}");
    }
    assert_eq!(h.emulator.count(Method::POST, "/api/assets/from-hash"), 0);
    assert!(h.get(LIST, DESIGN_KEY).await.cache_status().contains("hit"));
    // The slashed write is `from-hash` to the gateway: an upstream that
    // takes it (here one answering 202) invalidates the lists.
    h.emulator.inject(Fault::new(
        Some(Method::POST),
        "/api/assets/from-hash/",
        FaultAction::Status(StatusCode::ACCEPTED),
    ));
    let slashed = h
        .call(
            Method::POST,
            "/api/assets/from-hash/",
            Some(DESIGN_KEY),
            Some(body),
        )
        .await;
    assert_eq!(slashed.status, StatusCode::ACCEPTED);
    assert_eq!(
        h.get(LIST, DESIGN_KEY).await.cache_status(),
        "teamgate; fwd=miss; stored"
    );
    h.stop().await;
}

/// An entry depends only on what its key holds (invariant 1): the fill that
/// makes it carries none of the leading client's other fields, so one
/// member cannot have the upstream build the team's shared answer from a
/// `X-Forwarded-Host`, a cookie, a language or an `X-Original-URL` of their
/// choosing (web cache poisoning) — every member gets what a plain request
/// for the key would have got.
#[tokio::test]
async fn a_fill_carries_only_what_the_key_holds() {
    let h = Harness::start().await;
    let poisoned = h
        .get_with(
            LIST,
            DESIGN_KEY,
            &[
                ("x-forwarded-host", "evil.example"),
                ("forwarded", "host=evil.example"),
                ("x-original-url", "/api/admin"),
                ("cookie", "session=member-a"),
                ("accept-language", "fr"),
                ("accept", "application/json"),
                ("user-agent", "comfy-cli/1.0"),
            ],
        )
        .await;
    assert_eq!(poisoned.cache_status(), "teamgate; fwd=miss; stored");
    let fill = h
        .emulator
        .recorded()
        .into_iter()
        .find(|request| request.target.starts_with("/api/assets"))
        .expect("the fill went upstream");
    for unkeyed in [
        "x-forwarded-host",
        "forwarded",
        "x-original-url",
        "cookie",
        "accept-language",
    ] {
        assert!(
            fill.headers.get(unkeyed).is_none(),
            "{unkeyed} reached the upstream with a fill: {:?}",
            fill.headers
        );
    }
    assert_eq!(fill.headers["accept"], "application/json", "keyed: kept");
    assert_eq!(fill.headers["user-agent"], "comfy-cli/1.0");
    assert_eq!(fill.headers["x-api-key"], DESIGN_UPSTREAM_KEY);
    // A pass-through route forwards the client's fields unchanged.
    h.get_with("/api/jobs", DESIGN_KEY, &[("accept-language", "fr")])
        .await;
    let jobs = h
        .emulator
        .recorded()
        .into_iter()
        .find(|request| request.target.starts_with("/api/jobs"))
        .unwrap();
    assert_eq!(jobs.headers["accept-language"], "fr");
    h.stop().await;
}

#[tokio::test]
async fn writes_to_one_asset_invalidate_its_detail_and_only_for_that_team() {
    let h = Harness::start().await;
    let id = h.create_asset(DESIGN_KEY, "detail.png").await.json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let detail = format!("/api/assets/{id}");
    h.get(&detail, DESIGN_KEY).await;
    h.get(LIST, RESEARCH_KEY).await;
    assert!(
        h.get(&detail, DESIGN_KEY)
            .await
            .cache_status()
            .contains("hit")
    );
    let renamed = h
        .call(
            Method::PUT,
            &detail,
            Some(DESIGN_KEY),
            Some(json!({"name": "renamed.png"})),
        )
        .await;
    assert_eq!(renamed.status, StatusCode::OK);
    let after = h.get(&detail, DESIGN_KEY).await;
    assert_eq!(after.json()["name"], "renamed.png");
    assert!(
        h.get(LIST, RESEARCH_KEY)
            .await
            .cache_status()
            .contains("hit"),
        "the other team keeps its entries"
    );
    // DELETE /api/assets/{id}: the detail is gone, not served from cache.
    assert_eq!(
        h.call(Method::DELETE, &detail, Some(DESIGN_KEY), None)
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        h.get(&detail, DESIGN_KEY).await.status,
        StatusCode::NOT_FOUND
    );
    h.stop().await;
}

#[tokio::test]
async fn a_failed_write_invalidates_nothing() {
    let h = Harness::start().await;
    h.get(LIST, DESIGN_KEY).await;
    let bad_hash = h
        .call(
            Method::POST,
            "/api/assets/from-hash",
            Some(DESIGN_KEY),
            Some(json!({"hash": "nope", "tags": ["input"]})),
        )
        .await;
    assert_eq!(bad_hash.status, StatusCode::BAD_REQUEST);
    let unknown = format!("sha256:{}", "a".repeat(64));
    let missing = h
        .call(
            Method::POST,
            "/api/assets/from-hash",
            Some(DESIGN_KEY),
            Some(json!({"hash": unknown, "tags": ["input"]})),
        )
        .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert!(h.get(LIST, DESIGN_KEY).await.cache_status().contains("hit"));
    assert_eq!(h.emulator.count(Method::GET, "/api/assets"), 1);
    h.stop().await;
}

/// Invariant 4: a fill that began before a write completed is neither stored
/// nor joined after it. The emulator computes the old answer, then holds it.
#[tokio::test]
async fn a_fill_racing_a_write_is_not_stored_and_not_joined() {
    let h = Harness::start().await;
    let gate = hold_once(
        &h.emulator,
        Some(Method::GET),
        "/api/assets",
        FaultAction::HoldResponse,
    );

    let early = spawn_get(&h.client, h.url(LIST), DESIGN_KEY);
    eventually("the early read reaches upstream", async || {
        h.emulator.count(Method::GET, "/api/assets") == 1
    })
    .await;

    // The write completes while the early fill (with the old list) is held.
    assert_eq!(
        h.create_asset(DESIGN_KEY, "raced.png").await.status,
        StatusCode::CREATED
    );
    // A read after the write must not join the early fill: it fetches anew.
    let late = h.get(LIST, DESIGN_KEY).await;
    assert!(
        late.lists("raced.png"),
        "the read after the write sees the write"
    );
    assert_eq!(h.emulator.count(Method::GET, "/api/assets"), 2);

    gate.add_permits(1);
    let early_body = early.await.unwrap().json();
    assert!(
        !early_body.to_string().contains("raced.png"),
        "the early answer was computed before the write"
    );

    // And the early answer did not overwrite the newer entry.
    let after = h.get(LIST, DESIGN_KEY).await;
    assert!(
        after.cache_status().contains("hit"),
        "{}",
        after.cache_status()
    );
    assert!(after.lists("raced.png"));
    assert_eq!(h.emulator.count(Method::GET, "/api/assets"), 2);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_misses_make_one_upstream_request() {
    let h = Harness::start().await;
    let gate = hold_once(
        &h.emulator,
        Some(Method::GET),
        "/api/assets",
        FaultAction::Hold,
    );

    // HTTP/2 (h2c, prior knowledge): 10 connections × 100 streams, so 1000
    // requests are in flight at once without 1000 sockets.
    let mut requests = Vec::new();
    for _ in 0..10 {
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
            .http2_only(true)
            .build_http();
        for _ in 0..100 {
            requests.push(spawn_get(&client, h.url(LIST), DESIGN_KEY));
        }
    }
    // All 999 others wait on the one fill before it is let go.
    eventually("999 requests wait on the fill", async || {
        cache_stats(&h).await["waiting"] == 999
    })
    .await;
    assert_eq!(cache_stats(&h).await["fills_in_progress"], 1);
    gate.add_permits(1);

    let mut collapsed = 0;
    let mut bodies = std::collections::HashSet::new();
    for request in requests {
        let answer = request.await.unwrap();
        assert_eq!(answer.status, StatusCode::OK);
        collapsed += usize::from(answer.cache_status() == "teamgate; fwd=miss; collapsed");
        bodies.insert(answer.body);
    }
    assert_eq!(
        h.emulator.count(Method::GET, "/api/assets"),
        1,
        "exactly one upstream request"
    );
    assert_eq!(collapsed, 999);
    assert_eq!(bodies.len(), 1, "every waiter got the same response");
    h.stop().await;
}

#[tokio::test]
async fn the_fill_completes_for_waiters_when_the_leading_client_goes_away() {
    let h = Harness::start().await;
    let gate = hold_once(
        &h.emulator,
        Some(Method::GET),
        "/api/assets",
        FaultAction::Hold,
    );
    let leader = spawn_get(&h.client, h.url(LIST), DESIGN_KEY);
    eventually("the leader's fill reaches upstream", async || {
        h.emulator.count(Method::GET, "/api/assets") == 1
    })
    .await;
    // Its own client, so the waiter's connection is not the one torn down.
    let waiter_client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let waiter = spawn_get(&waiter_client, h.url(LIST), DESIGN_KEY);
    eventually("the waiter joins", async || {
        cache_stats(&h).await["waiting"] == 1
    })
    .await;
    leader.abort();
    let _ = leader.await;
    gate.add_permits(1);
    let answer = waiter.await.unwrap();
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.cache_status(), "teamgate; fwd=miss; collapsed");
    assert!(
        h.get(LIST, DESIGN_KEY).await.cache_status().contains("hit"),
        "and it was stored"
    );
    assert_eq!(h.emulator.count(Method::GET, "/api/assets"), 1);
    h.stop().await;
}

#[tokio::test]
async fn an_upstream_error_is_shared_with_current_waiters_but_not_cached() {
    let h = Harness::start().await;
    let missing = format!("/api/assets/{}", uuid::Uuid::new_v4());
    let gate = hold_once(
        &h.emulator,
        Some(Method::GET),
        &missing,
        FaultAction::HoldResponse,
    );
    let mut waiting = Vec::new();
    for _ in 0..5 {
        waiting.push(spawn_get(&h.client, h.url(&missing), DESIGN_KEY));
    }
    eventually("four wait on the fill", async || {
        cache_stats(&h).await["waiting"] == 4
    })
    .await;
    gate.add_permits(1);
    for request in waiting {
        assert_eq!(request.await.unwrap().status, StatusCode::NOT_FOUND);
    }
    assert_eq!(h.emulator.count(Method::GET, &missing), 1);
    let again = h.get(&missing, DESIGN_KEY).await;
    assert_eq!(again.status, StatusCode::NOT_FOUND);
    assert_eq!(
        again.cache_status(),
        "teamgate; fwd=miss",
        "errors are not stored"
    );
    assert_eq!(h.emulator.count(Method::GET, &missing), 2);
    h.stop().await;
}

/// A short TTL and a real pause past it: the entry is not served once expired.
/// (Freshness arithmetic itself is unit-tested with paused tokio time in `store`.)
#[tokio::test]
async fn entries_expire_after_their_ttl() {
    let rules = r#"
[[upstreams.comfy.cache.rules]]
match = "GET /api/jobs"
ttl = "2s"
scope = "jobs"
"#;
    let h = Harness::start_with(rules).await;
    assert_eq!(
        h.get("/api/jobs", DESIGN_KEY).await.cache_status(),
        "teamgate; fwd=miss; stored"
    );
    let hit = h.get("/api/jobs", DESIGN_KEY).await;
    assert!(
        hit.cache_status().starts_with("teamgate; hit; ttl="),
        "{}",
        hit.cache_status()
    );
    tokio::time::sleep(Duration::from_millis(2200)).await;
    assert_eq!(
        h.get("/api/jobs", DESIGN_KEY).await.cache_status(),
        "teamgate; fwd=miss; stored"
    );
    assert_eq!(h.emulator.count(Method::GET, "/api/jobs"), 2);
    h.stop().await;
}

#[tokio::test]
async fn if_none_match_is_answered_304_from_the_cache() {
    let h = Harness::start().await;
    let first = h.get(LIST, DESIGN_KEY).await;
    let etag = first.headers["etag"].to_str().unwrap().to_owned();
    assert!(etag.starts_with('"'), "a strong validator: {etag}");
    let revalidated = h
        .get_with(LIST, DESIGN_KEY, &[("if-none-match", &etag)])
        .await;
    assert_eq!(revalidated.status, StatusCode::NOT_MODIFIED);
    assert!(revalidated.body.is_empty());
    assert_eq!(revalidated.headers["etag"], etag.as_str());
    assert!(revalidated.cache_status().contains("hit"));
    let other = h
        .get_with(LIST, DESIGN_KEY, &[("if-none-match", "\"something-else\"")])
        .await;
    assert_eq!(other.status, StatusCode::OK);
    assert_eq!(other.body, first.body);
    assert_eq!(h.emulator.count(Method::GET, "/api/assets"), 1);
    // On a miss the condition is not sent upstream; the gateway answers it.
    let fresh_list = "/api/assets?limit=3";
    let miss = h
        .get_with(fresh_list, DESIGN_KEY, &[("if-none-match", "*")])
        .await;
    assert_eq!(miss.status, StatusCode::NOT_MODIFIED);
    assert!(
        h.emulator
            .recorded()
            .last()
            .unwrap()
            .headers
            .get("if-none-match")
            .is_none()
    );
    h.stop().await;
}

#[tokio::test]
async fn head_is_answered_from_the_get_entry() {
    let h = Harness::start().await;
    let get = h.get(LIST, DESIGN_KEY).await;
    let head = h.request_with(Method::HEAD, LIST, DESIGN_KEY, &[]).await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    assert!(head.cache_status().contains("hit"));
    assert_eq!(
        head.headers["content-length"],
        get.body.len().to_string().as_str()
    );
    assert_eq!(h.emulator.count(Method::GET, "/api/assets"), 1);
    assert_eq!(h.emulator.count(Method::HEAD, "/api/assets"), 0);
    h.stop().await;
}

#[tokio::test]
async fn no_cache_refetches_and_replaces_no_store_bypasses() {
    let h = Harness::start().await;
    h.get(LIST, DESIGN_KEY).await;
    h.create_asset(RESEARCH_KEY, "unrelated.png").await;
    let refreshed = h
        .get_with(LIST, DESIGN_KEY, &[("cache-control", "no-cache")])
        .await;
    assert_eq!(refreshed.cache_status(), "teamgate; fwd=request; stored");
    assert_eq!(h.emulator.count(Method::GET, "/api/assets"), 2);
    let after = h.get(LIST, DESIGN_KEY).await;
    assert!(after.cache_status().contains("hit"));
    assert_eq!(
        after.body, refreshed.body,
        "the entry was replaced by the refetch"
    );

    let bypass_target = "/api/assets?limit=7";
    let bypassed = h
        .get_with(bypass_target, DESIGN_KEY, &[("cache-control", "no-store")])
        .await;
    assert_eq!(bypassed.cache_status(), "teamgate; fwd=bypass");
    assert_eq!(
        h.get(bypass_target, DESIGN_KEY).await.cache_status(),
        "teamgate; fwd=miss; stored",
        "nothing was stored"
    );
    h.stop().await;
}

#[tokio::test]
async fn stale_if_error_serves_the_expired_entry_when_the_refresh_fails() {
    let rules = r#"
[[upstreams.comfy.cache.rules]]
match = "GET /api/jobs"
ttl = "1s"
scope = "jobs"
stale_if_error = "1h"
"#;
    let h = Harness::start_with(rules).await;
    let original = h.get("/api/jobs", DESIGN_KEY).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    h.emulator.inject(
        Fault::new(
            None,
            "/api/jobs",
            FaultAction::Status(StatusCode::SERVICE_UNAVAILABLE),
        )
        .times(1),
    );
    let stale = h.get("/api/jobs", DESIGN_KEY).await;
    assert_eq!(stale.status, StatusCode::OK);
    assert_eq!(stale.body, original.body);
    assert!(
        stale
            .cache_status()
            .starts_with("teamgate; fwd=stale; fwd-status=503"),
        "{}",
        stale.cache_status()
    );
    assert!(stale.cache_status().ends_with("detail=stale-if-error"));
    // A dropped connection (the gateway's own 502) counts as an error too.
    drop_next_connection(&h.emulator, "/api/jobs");
    let after_drop = h.get("/api/jobs", DESIGN_KEY).await;
    assert_eq!(after_drop.status, StatusCode::OK);
    assert!(
        after_drop.cache_status().contains("fwd-status=502"),
        "{}",
        after_drop.cache_status()
    );
    assert_eq!(h.emulator.count(Method::GET, "/api/jobs"), 4);
    // Without a stale entry, the error passes through.
    h.emulator.inject(
        Fault::new(
            None,
            "/api/tags",
            FaultAction::Status(StatusCode::SERVICE_UNAVAILABLE),
        )
        .times(1),
    );
    assert_eq!(
        h.get("/api/tags", DESIGN_KEY).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
    h.stop().await;
}

#[tokio::test]
async fn stale_while_revalidate_answers_at_once_and_refreshes_in_the_background() {
    let rules = r#"
[[upstreams.comfy.cache.rules]]
match = "GET /api/jobs"
ttl = "1s"
scope = "jobs"
stale_while_revalidate = "1h"
"#;
    let h = Harness::start_with(rules).await;
    h.get("/api/jobs", DESIGN_KEY).await;
    h.call(
        Method::POST,
        "/api/prompt",
        Some(DESIGN_KEY),
        Some(json!({"prompt": {}})),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let stale = h.get("/api/jobs", DESIGN_KEY).await;
    assert!(
        stale
            .cache_status()
            .ends_with("detail=stale-while-revalidate"),
        "{}",
        stale.cache_status()
    );
    assert_eq!(
        stale.json()["jobs"].as_array().unwrap().len(),
        0,
        "the old answer, at once"
    );
    eventually("the background refresh stores the new answer", async || {
        let answer = h.get("/api/jobs", DESIGN_KEY).await;
        answer.cache_status().contains("hit")
            && answer.json()["jobs"].as_array().unwrap().len() == 1
    })
    .await;
    assert_eq!(h.emulator.count(Method::GET, "/api/jobs"), 2, "one refresh");
    h.stop().await;
}

#[tokio::test]
async fn responses_over_the_entry_cap_stream_through_uncached_and_memory_stays_bounded() {
    let h = Harness::start_with_config(
        "",
        "[cache]\nmax_bytes = \"64KiB\"\nmax_entry_bytes = \"1KiB\"\n",
    )
    .await;
    let big = h.get("/api/assets?limit=500", DESIGN_KEY).await;
    assert!(big.body.len() > 1024);
    assert_eq!(big.cache_status(), "teamgate; fwd=miss");
    assert_eq!(big.json()["total"], 5, "intact");
    assert_eq!(
        h.get("/api/assets?limit=500", DESIGN_KEY)
            .await
            .cache_status(),
        "teamgate; fwd=miss"
    );
    assert_eq!(h.emulator.count(Method::GET, "/api/assets"), 2);

    for page in 0..200 {
        h.get(&format!("/api/tags?limit={}", page + 1), DESIGN_KEY)
            .await;
    }
    let stats = cache_stats(&h).await;
    assert!(stats["bytes"].as_u64().unwrap() <= 64 * 1024, "{stats}");
    assert!(stats["entries"].as_u64().unwrap() < 200, "{stats}");
    h.stop().await;
}

#[tokio::test]
async fn passthrough_routes_carry_no_cache_status_and_are_never_cached() {
    let h = Harness::start().await;
    let jobs = h.get("/api/jobs", DESIGN_KEY).await;
    assert!(!jobs.headers.contains_key("cache-status"));
    h.get("/api/jobs", DESIGN_KEY).await;
    assert_eq!(h.emulator.count(Method::GET, "/api/jobs"), 2);
    h.stop().await;
}

#[tokio::test]
async fn admin_purge_needs_the_token_and_purges_by_team_or_all() {
    let h = Harness::start_with_config("", "[admin]\ntoken = \"env:ADMIN_TOKEN\"\n").await;
    h.get(LIST, DESIGN_KEY).await;
    h.get(LIST, RESEARCH_KEY).await;
    let purge = async |query: &str, token: Option<&str>| {
        h.admin_call(Method::DELETE, &format!("/admin/cache{query}"), token)
            .await
    };
    assert_eq!(purge("", None).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        purge("", Some("wrong")).await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        purge("?team=nobody", Some(ADMIN_TOKEN)).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        purge("?team=design", Some(ADMIN_TOKEN)).await.status,
        StatusCode::OK
    );
    assert_eq!(
        h.get(LIST, DESIGN_KEY).await.cache_status(),
        "teamgate; fwd=miss; stored"
    );
    assert!(
        h.get(LIST, RESEARCH_KEY)
            .await
            .cache_status()
            .contains("hit")
    );
    assert_eq!(
        purge("?upstream=comfy", Some(ADMIN_TOKEN)).await.status,
        StatusCode::OK
    );
    assert_eq!(
        h.get(LIST, RESEARCH_KEY).await.cache_status(),
        "teamgate; fwd=miss; stored"
    );
    assert_eq!(purge("", Some(ADMIN_TOKEN)).await.json()["purged"], "all");
    assert_eq!(
        h.get(LIST, DESIGN_KEY).await.cache_status(),
        "teamgate; fwd=miss; stored"
    );
    h.stop().await;
}

#[tokio::test]
async fn the_admin_purge_is_off_without_a_token() {
    let h = Harness::start().await;
    let purge = h.admin_call(Method::DELETE, "/admin/cache", None).await;
    assert_eq!(purge.status, StatusCode::FORBIDDEN);
    h.stop().await;
}

#[tokio::test]
async fn a_shared_rule_serves_one_entry_to_every_team() {
    let rules = r#"
[[upstreams.comfy.cache.rules]]
match = "GET /api/assets/remote-metadata"
ttl = "1h"
scope = "remote-metadata"
shared = true
"#;
    let h = Harness::start_with(rules).await;
    let target = "/api/assets/remote-metadata?url=https://civitai.com/api/download/models/1";
    assert_eq!(
        h.get(target, DESIGN_KEY).await.cache_status(),
        "teamgate; fwd=miss; stored"
    );
    assert!(
        h.get(target, RESEARCH_KEY)
            .await
            .cache_status()
            .contains("hit")
    );
    assert_eq!(
        h.emulator.count(Method::GET, "/api/assets/remote-metadata"),
        1
    );
    // Off by default: without the rule, each team has its own entry.
    let plain = Harness::start().await;
    plain.get(target, DESIGN_KEY).await;
    assert_eq!(
        plain.get(target, RESEARCH_KEY).await.cache_status(),
        "teamgate; fwd=miss; stored"
    );
    plain.stop().await;
    h.stop().await;
}
