//! Quotas (issue #5), end to end. Rates here are per hour, so no permit comes
//! back during a test: outcomes depend on counts, never on timing. The exact
//! `Retry-After` moment is tested with paused tokio time in `src/limit/layer.rs`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Method, StatusCode};
use http_body_util::Full;
use serde_json::json;
use teamgate::emulator::{Fault, FaultAction};
use tokio::sync::Semaphore;

#[tokio::test]
async fn a_burst_of_exactly_the_configured_size_is_admitted_then_429() {
    let limits = "[teams.design.limits]\nclient = { rate = \"1/h\", burst = 3 }\n";
    let h = Harness::start_with_config("", limits).await;
    for remaining in [2, 1, 0] {
        let answer = h.get("/api/jobs", DESIGN_KEY).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.header("ratelimit-policy"), "\"client\";q=3;w=10800");
        assert!(
            answer
                .header("ratelimit")
                .starts_with(&format!("\"client\";r={remaining};t="))
        );
    }
    let refused = h.get("/api/jobs", DESIGN_KEY).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    // The next permit comes one interval (1 h) after the first was taken.
    let retry: u64 = refused.header("retry-after").parse().unwrap();
    assert!((3595..=3600).contains(&retry), "Retry-After {retry}");
    assert_eq!(refused.header("ratelimit-policy"), "\"client\";q=3;w=10800");
    assert_eq!(
        refused.header("ratelimit"),
        format!("\"client\";r=0;t={retry}")
    );
    let body = refused.json();
    assert_eq!(body["code"], "rate_limited");
    assert_eq!(body["error"]["type"], "RATE_LIMITED");
    assert!(body["message"].is_string());
    assert_eq!(
        h.emulator.count(Method::GET, "/api/jobs"),
        3,
        "the refused request went nowhere"
    );
    h.stop().await;
}

#[tokio::test]
async fn teams_and_keys_are_limited_independently() {
    let limits = "[teams.design.limits]\nper_key = { rate = \"1/h\", burst = 1 }\n";
    let h = Harness::start_with_config("", limits).await;
    assert_eq!(h.get("/api/jobs", DESIGN_KEY).await.status, StatusCode::OK);
    assert_eq!(
        h.get("/api/jobs", DESIGN_KEY).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(
        h.get("/api/jobs", DESIGN_KEY_2).await.status,
        StatusCode::OK,
        "the team's other key has its own bucket"
    );
    for _ in 0..5 {
        assert_eq!(
            h.get("/api/jobs", RESEARCH_KEY).await.status,
            StatusCode::OK,
            "another team is unlimited"
        );
    }
    h.stop().await;
}

/// Two prompts an hour for the design team.
const PROMPT_QUOTA: &str = r#"
[[teams.design.limits.routes]]
match = "POST /api/prompt"
rate = "1/h"
burst = 2
"#;

#[tokio::test]
async fn route_quotas_apply_to_their_route_only() {
    let h = Harness::start_with_config("", PROMPT_QUOTA).await;
    let prompt = || {
        h.call(
            Method::POST,
            "/api/prompt",
            Some(DESIGN_KEY),
            Some(json!({"prompt": {}})),
        )
    };
    assert_eq!(prompt().await.status, StatusCode::OK);
    let second = prompt().await;
    assert_eq!(second.status, StatusCode::OK);
    assert_eq!(
        second.header("ratelimit"),
        "\"POST /api/prompt\";r=0;t=7200"
    );
    let third = prompt().await;
    assert_eq!(third.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        third.header("ratelimit-policy"),
        "\"POST /api/prompt\";q=2;w=7200"
    );
    for _ in 0..3 {
        assert_eq!(h.get("/api/jobs", DESIGN_KEY).await.status, StatusCode::OK);
    }
    assert_eq!(h.emulator.count(Method::POST, "/api/prompt"), 2);
    h.stop().await;
}

/// A quota's route cannot be escaped by spelling it another way: a trailing
/// `/`, another letter case or a path parameter counts as the route (routers
/// that ignore them would run the prompt), and merged slashes or encoded letters — the route itself to an upstream that
/// normalises (RFC 3986 §6.2.2.2) — are refused before any quota or upstream
/// sees them.
#[tokio::test]
async fn a_route_quota_cannot_be_escaped_by_spelling_its_path_another_way() {
    let h = Harness::start_with_config("", PROMPT_QUOTA).await;
    let prompt = |path: &'static str| {
        h.call(
            Method::POST,
            path,
            Some(DESIGN_KEY),
            Some(json!({"prompt": {}})),
        )
    };
    for path in [
        "/api//prompt",
        "//api/prompt",
        "/api/%70rompt",
        "/api/promp%74",
    ] {
        let refused = prompt(path).await;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{path}");
        assert_eq!(refused.json()["code"], "bad_request", "{path}");
    }
    assert_eq!(h.emulator.total(), 0, "no refused spelling was forwarded");
    assert_ne!(
        prompt("/api/prompt").await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    let slashed = prompt("/api/prompt/").await;
    assert_ne!(slashed.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        slashed.header("ratelimit"),
        "\"POST /api/prompt\";r=0;t=7200",
        "the slashed path spent the route's quota"
    );
    // Spent now, under every spelling a common router reads as the route:
    // letter case (Express, ASP.NET) and path parameters (servlet containers).
    for path in [
        "/api/prompt",
        "/api/prompt/",
        "/API/Prompt",
        "/api/prompt;x=1",
    ] {
        assert_eq!(
            prompt(path).await.status,
            StatusCode::TOO_MANY_REQUESTS,
            "{path}"
        );
    }
    assert_eq!(h.emulator.total(), 2, "nothing more was forwarded");
    assert_eq!(
        h.emulator.count(Method::POST, "/api/prompt")
            + h.emulator.count(Method::POST, "/api/prompt/"),
        2
    );
    h.stop().await;
}

#[tokio::test]
async fn cache_hits_spend_the_client_quota_but_not_the_upstream_budget() {
    let limits = r#"
[teams.design.limits]
client = { rate = "1/h", burst = 5 }
upstream = { rate = "1/h", burst = 1 }
"#;
    let h = Harness::start_with_config("", limits).await;
    let list = "/api/assets?limit=5";
    let miss = h.get(list, DESIGN_KEY).await;
    assert_eq!(miss.status, StatusCode::OK, "spends one of each");
    // The upstream budget is spent: another miss is refused by it…
    let other = h.get("/api/assets?limit=6", DESIGN_KEY).await;
    assert_eq!(other.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(other.header("ratelimit-policy"), "\"upstream\";q=1;w=3600");
    // …while cached reads keep flowing.
    for _ in 0..3 {
        let hit = h.get(list, DESIGN_KEY).await;
        assert_eq!(hit.status, StatusCode::OK);
        assert!(hit.cache_status().contains("hit"));
    }
    // Five requests so far: the client quota is spent, hits included.
    let refused = h.get(list, DESIGN_KEY).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.header("ratelimit-policy"), "\"client\";q=5;w=18000");
    assert_eq!(h.emulator.count(Method::GET, "/api/assets"), 1);
    h.stop().await;
}

#[tokio::test]
async fn successful_answers_carry_the_tightest_quota() {
    let limits = r#"
[teams.design.limits]
client = { rate = "1/h", burst = 100 }
upstream = { rate = "1/h", burst = 3 }
"#;
    let h = Harness::start_with_config("", limits).await;
    let answer = h.get("/api/jobs", DESIGN_KEY).await;
    assert_eq!(
        answer.header("ratelimit-policy"),
        "\"upstream\";q=3;w=10800"
    );
    assert!(answer.header("ratelimit").starts_with("\"upstream\";r=2;"));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_in_flight_holds_under_concurrency() {
    let limits = "[teams.design.limits]\nupstream = { max_in_flight = 3 }\n";
    let h = Harness::start_with_config("", limits).await;
    let gate = Arc::new(Semaphore::new(0));
    h.emulator.inject(Fault::new(
        None,
        "/api/jobs",
        FaultAction::Hold(Arc::clone(&gate)),
    ));
    let mut requests = Vec::new();
    for _ in 0..12 {
        // A client each: twelve connections, so the cap is the gateway's, not the pool's.
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http::<Full<Bytes>>();
        requests.push(spawn_get(&client, h.url("/api/jobs"), DESIGN_KEY));
    }
    eventually("three requests reach the upstream", async || {
        h.emulator.in_flight() == 3
    })
    .await;
    // Let them through one at a time; the cap must hold the whole way.
    for _ in 0..12 {
        gate.add_permits(1);
    }
    for request in requests {
        assert_eq!(request.await.unwrap().status, StatusCode::OK);
    }
    assert_eq!(h.emulator.count(Method::GET, "/api/jobs"), 12);
    assert_eq!(
        h.emulator.peak_in_flight(),
        3,
        "never more than max_in_flight upstream at once"
    );
    h.stop().await;
}

#[tokio::test]
async fn an_upstream_429_passes_through_and_pauses_the_team_budget() {
    let h = Harness::start().await;
    let list = "/api/assets?limit=5";
    h.get(list, DESIGN_KEY).await;
    h.emulator.inject(
        Fault::new(
            None,
            "/api/jobs",
            FaultAction::RateLimited {
                retry_after_secs: 2,
            },
        )
        .times(1),
    );
    let throttled = h.get("/api/jobs", DESIGN_KEY).await;
    assert_eq!(throttled.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(throttled.header("retry-after"), "2");
    assert_eq!(
        throttled.json()["message"],
        "too many requests for this API key",
        "the upstream's own answer"
    );

    let paused = h.get("/api/jobs", DESIGN_KEY).await;
    assert_eq!(paused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(
        paused.json()["error"]["type"],
        "RATE_LIMITED",
        "answered by the gateway"
    );
    let retry: u64 = paused.header("retry-after").parse().unwrap();
    assert!((1..=2).contains(&retry), "{retry}");
    assert_eq!(
        h.emulator.count(Method::GET, "/api/jobs"),
        1,
        "nothing more was sent"
    );
    assert!(
        h.get(list, DESIGN_KEY).await.cache_status().contains("hit"),
        "cached reads keep flowing"
    );
    assert_eq!(
        h.get("/api/jobs", RESEARCH_KEY).await.status,
        StatusCode::OK,
        "other teams are not paused"
    );

    tokio::time::sleep(Duration::from_secs(retry)).await;
    assert_eq!(
        h.get("/api/jobs", DESIGN_KEY).await.status,
        StatusCode::OK,
        "the pause ends when Retry-After said"
    );
    h.stop().await;
}

#[tokio::test]
async fn a_flood_of_unknown_keys_is_refused_by_authentication_not_the_limiter() {
    let limits = "[teams.design.limits]\nper_key = { rate = \"1/h\", burst = 1 }\n";
    let h = Harness::start_with_config("", limits).await;
    for attempt in 0..200 {
        let answer = h
            .get("/api/jobs", &format!("tg_random_guess_{attempt}"))
            .await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
        assert!(
            !answer.headers.contains_key("ratelimit"),
            "no limiter was consulted"
        );
    }
    assert_eq!(h.get("/api/jobs", DESIGN_KEY).await.status, StatusCode::OK);
    assert_eq!(h.emulator.total(), 1);
    h.stop().await;
}

#[tokio::test]
async fn v2_routes_get_the_429_in_the_v2_envelope() {
    let limits = "[teams.design.limits]\nclient = { rate = \"1/h\", burst = 1 }\n";
    let h = Harness::start_with_config("", limits).await;
    h.get("/api/jobs", DESIGN_KEY).await;
    let refused = h.get("/api/v2/jobs/x/events", DESIGN_KEY).await;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.json()["error"]["code"], "rate_limited");
    assert_eq!(refused.json()["error"]["type"], "RATE_LIMITED");
    h.stop().await;
}
