//! Metrics (issue #6): values after a traffic mix, bounded labels, and the
//! Grafana dashboard only querying metrics that `/metrics` exports.

mod common;

use common::*;
use http::{Method, StatusCode};
use teamgate::emulator::{Fault, FaultAction};

async fn traffic_mix(h: &Harness) -> String {
    let list = "/api/assets?limit=5";
    h.get(list, DESIGN_KEY).await; // miss, stored
    h.get(list, DESIGN_KEY).await; // hit
    h.get(list, DESIGN_KEY).await; // hit
    let created = h.create_asset(DESIGN_KEY, "metrics.png").await;
    let id = created.json()["id"].as_str().unwrap().to_owned();
    h.get(&format!("/api/assets/{id}"), DESIGN_KEY).await;
    h.get("/api/jobs", RESEARCH_KEY).await;
    h.get("/api/jobs", RESEARCH_KEY).await; // refused by research's quota
    h.call(Method::GET, "/api/jobs", None, None).await; // 401
    drop_next_connection(&h.emulator, "/api/tags");
    h.get("/api/tags", DESIGN_KEY).await; // 502: reset
    h.emulator.inject(
        Fault::new(
            None,
            "/api/tags",
            FaultAction::Status(StatusCode::SERVICE_UNAVAILABLE),
        )
        .times(1),
    );
    h.get("/api/tags", DESIGN_KEY).await; // 503 from upstream
    id
}

const LIMITS: &str = "[teams.research.limits]\nclient = { rate = \"1/h\", burst = 1 }\n";

#[tokio::test]
async fn metrics_count_what_happened_with_bounded_labels() {
    let h = Harness::start_with_config("", LIMITS).await;
    let asset_id = traffic_mix(&h).await;
    let metrics = h.admin_get("/metrics").await;
    assert_eq!(metrics.status, StatusCode::OK);
    assert!(
        metrics.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4")
    );
    let text = String::from_utf8(metrics.body.to_vec()).unwrap();

    let design_hits = [
        ("team", "design"),
        ("upstream", "comfy"),
        ("route_class", "cacheable_read"),
        ("cache", "hit"),
        ("status_class", "2xx"),
        ("method", "GET"),
    ];
    assert_eq!(
        sample(&text, "teamgate_requests_total", &design_hits),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &text,
            "teamgate_requests_total",
            &[
                ("team", "design"),
                ("route_class", "invalidating_write"),
                ("method", "POST")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "teamgate_requests_total",
            &[
                ("team", "research"),
                ("status_class", "4xx"),
                ("route_class", "passthrough")
            ]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "teamgate_requests_total",
            &[("team", ""), ("status_class", "4xx")]
        ),
        Some(1.0),
        "the 401"
    );
    assert_eq!(
        sample(
            &text,
            "teamgate_request_duration_seconds_count",
            &[("route_class", "passthrough"), ("cache", "none")]
        ),
        Some(3.0)
    );
    assert_eq!(
        sample(
            &text,
            "teamgate_upstream_errors_total",
            &[("kind", "reset")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "teamgate_upstream_errors_total", &[("kind", "5xx")]),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "teamgate_ratelimit_rejections_total",
            &[("team", "research"), ("quota", "client")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "teamgate_cache_requests_total", &[("result", "hit")]),
        Some(2.0)
    );
    // The list's first read and the new asset's detail, at least.
    assert!(
        sample(
            &text,
            "teamgate_cache_requests_total",
            &[("result", "miss")]
        )
        .unwrap()
            >= 2.0,
        "{text}"
    );
    assert!(sample(&text, "teamgate_cache_stores_total", &[]).unwrap() >= 2.0);
    assert_eq!(
        sample(
            &text,
            "teamgate_cache_invalidations_total",
            &[("scope", "assets")]
        ),
        Some(1.0)
    );
    assert!(sample(&text, "teamgate_cache_entries", &[]).unwrap() >= 2.0);
    assert!(sample(&text, "teamgate_cache_bytes", &[]).unwrap() > 0.0);
    assert_eq!(sample(&text, "teamgate_requests_in_flight", &[]), Some(0.0));
    assert!(
        sample(
            &text,
            "teamgate_upstream_duration_seconds_count",
            &[("upstream", "comfy")]
        )
        .unwrap()
            >= 5.0
    );
    assert_eq!(
        sample(
            &text,
            "teamgate_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "teamgate_config_reloads_total",
            &[("result", "success")]
        ),
        Some(0.0)
    );

    for unbounded in [
        asset_id.as_str(),
        "/api/",
        DESIGN_KEY,
        RESEARCH_KEY,
        DESIGN_UPSTREAM_KEY,
        "limit=5",
    ] {
        assert!(
            !text.contains(unbounded),
            "`{unbounded}` must never be a label value"
        );
    }
    h.stop().await;
}

#[tokio::test]
async fn every_metric_the_dashboard_queries_is_exported() {
    let h = Harness::start_with_config("", LIMITS).await;
    traffic_mix(&h).await;
    let text = h.metrics_text().await;
    let exported: std::collections::HashSet<&str> = text
        .lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split(['{', ' ']).next())
        .collect();

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/grafana/teamgate.json"
        ))
        .unwrap(),
    )
    .unwrap();
    let mut queried = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(at) = rest.find("teamgate_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[at + name.len()..];
                queried.push(name);
            }
        }
    }
    assert!(queried.len() >= 10, "{queried:?}");
    for name in &queried {
        assert!(
            exported.contains(name.as_str()),
            "the dashboard queries `{name}`, which /metrics does not export"
        );
    }
    let titles: Vec<&str> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    for wanted in [
        "Requests/s by team",
        "Cache hit ratio",
        "Latency: gateway vs upstream (p50 / p95 / p99)",
        "429s by team and quota",
        "Upstream errors by kind",
        "Cache memory and entries",
    ] {
        assert!(titles.contains(&wanted), "panel `{wanted}`");
    }
    h.stop().await;
}

/// The gateway in front of an upstream behind a cache of its own: every
/// answer is `200 {}` with `Cache-Status: othercdn; hit`.
async fn in_front_of_a_cdn() -> Harness {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut received = Vec::new();
                let mut buffer = [0u8; 4096];
                while let Ok(read @ 1..) = stream.read(&mut buffer).await {
                    received.extend_from_slice(&buffer[..read]);
                    while let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
                        received.drain(..end + 4);
                        let answer = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                                      cache-status: othercdn; hit\r\ncontent-length: 2\r\n\r\n{}";
                        if stream.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    let emulator = teamgate::emulator::Emulator::new(accounts());
    Harness::start_in_front_of(emulator, addr, &format!("http://{addr}"), "").await
}

/// The `cache` label (metrics and the access line) is what the gateway's
/// cache did, never what an upstream says of caches of its own: on a route
/// the gateway does not cache, the upstream's `Cache-Status` is forwarded
/// unchanged and the request is counted as `cache="none"`.
#[tokio::test]
async fn an_upstreams_own_cache_status_is_forwarded_not_counted_as_the_gateways() {
    let h = in_front_of_a_cdn().await;
    for _ in 0..2 {
        let answer = h.get("/api/jobs", DESIGN_KEY).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(
            answer.cache_status(),
            "othercdn; hit",
            "forwarded unchanged"
        );
    }
    let text = h.metrics_text().await;
    let passthrough = [
        ("team", "design"),
        ("route_class", "passthrough"),
        ("method", "GET"),
    ];
    assert_eq!(
        sample(
            &text,
            "teamgate_requests_total",
            &[passthrough.as_slice(), &[("cache", "none")]].concat()
        ),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "teamgate_requests_total",
            &[passthrough.as_slice(), &[("cache", "hit")]].concat()
        ),
        None
    );
    assert_eq!(
        sample(&text, "teamgate_cache_requests_total", &[("result", "hit")]),
        None,
        "{text}"
    );
    h.stop().await;
}

/// RFC 9211 §2: a cache adds its `Cache-Status` member after the members of
/// the caches nearer the origin, and keeps theirs. On a route the gateway
/// caches, the upstream CDN's member comes first on the miss, on the hit,
/// on a `304` from the entry and on a bypass, the gateway's last; and what is counted
/// is the gateway's own member, not the CDN's "hit".
#[tokio::test]
async fn a_cached_answer_keeps_the_upstreams_cache_status_members_before_its_own() {
    let h = in_front_of_a_cdn().await;
    let members = |answer: &Answer| -> Vec<String> {
        answer
            .headers
            .get_all("cache-status")
            .iter()
            .map(|member| member.to_str().unwrap().to_owned())
            .collect()
    };
    let list = "/api/assets?limit=20";
    let miss = h.get(list, DESIGN_KEY).await;
    assert_eq!(miss.status, StatusCode::OK);
    assert_eq!(
        members(&miss),
        ["othercdn; hit", "teamgate; fwd=miss; stored"]
    );
    let hit = h.get(list, DESIGN_KEY).await;
    let hit_members = members(&hit);
    assert_eq!(hit_members.len(), 2, "{hit_members:?}");
    assert_eq!(hit_members[0], "othercdn; hit");
    assert!(
        hit_members[1].starts_with("teamgate; hit; ttl="),
        "{hit_members:?}"
    );
    let etag = hit.headers["etag"].to_str().unwrap().to_owned();
    let not_modified = h
        .get_with(list, DESIGN_KEY, &[("if-none-match", &etag)])
        .await;
    assert_eq!(not_modified.status, StatusCode::NOT_MODIFIED);
    assert_eq!(members(&not_modified)[..], hit_members[..]);
    let bypass = h
        .get_with(list, DESIGN_KEY, &[("cache-control", "no-store")])
        .await;
    assert_eq!(members(&bypass), ["othercdn; hit", "teamgate; fwd=bypass"]);
    let text = h.metrics_text().await;
    let counted = |result: &str| {
        sample(
            &text,
            "teamgate_cache_requests_total",
            &[("upstream", "comfy"), ("result", result)],
        )
    };
    assert_eq!(counted("miss"), Some(1.0), "{text}");
    assert_eq!(counted("hit"), Some(2.0), "{text}");
    assert_eq!(counted("bypass"), Some(1.0), "{text}");
    h.stop().await;
}
