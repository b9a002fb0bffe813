//! The gateway core (issue #2), end to end: emulator + gateway on 127.0.0.1:0.
//! Spec references are to shared/upstream/comfy-cloud-openapi.yaml (v1) and
//! comfy-api-v2-openapi.yaml (v2).

mod common;

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use serde_json::json;
use teamgate::emulator::{Fault, FaultAction, demo_blob_hash};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn forwards_with_the_team_upstream_key_and_never_the_client_key() {
    let h = Harness::start().await;
    let answer = h.get("/api/assets?limit=5", DESIGN_KEY).await;
    assert_eq!(answer.status, StatusCode::OK);
    // ListAssetsResponse: {assets, total, has_more}.
    let body = answer.json();
    assert!(body["assets"].is_array() && body["total"].is_u64() && body["has_more"].is_boolean());
    assert_eq!(h.emulator.count(Method::GET, "/api/assets"), 1);

    let seen = h.emulator.recorded().pop().unwrap();
    assert_eq!(seen.headers["x-api-key"], DESIGN_UPSTREAM_KEY);
    assert_eq!(seen.headers.get_all("x-api-key").iter().count(), 1);
    assert!(seen.headers.get("authorization").is_none());
    assert!(!everything_upstream_saw(&h.emulator).contains(DESIGN_KEY));
    h.stop().await;
}

#[tokio::test]
async fn bearer_client_keys_work_and_are_removed_too() {
    let h = Harness::start().await;
    let request = Request::get(h.url("/api/jobs"))
        .header("authorization", format!("Bearer {DESIGN_KEY}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(h.send(request).await.status, StatusCode::OK);
    let seen = h.emulator.recorded().pop().unwrap();
    assert_eq!(seen.headers["x-api-key"], DESIGN_UPSTREAM_KEY);
    assert!(seen.headers.get("authorization").is_none());
    h.stop().await;
}

#[tokio::test]
async fn missing_and_unknown_keys_get_401_in_comfy_shape_and_nothing_goes_upstream() {
    let h = Harness::start().await;
    for key in [None, Some("tg_not_a_key_of_anyone"), Some("")] {
        let answer = h.call(Method::GET, "/api/assets", key, None).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{key:?}");
        // ErrorResponse: {code, message}; plus the request id to quote.
        let body = answer.json();
        assert_eq!(body["code"], "unauthorized");
        assert!(body["message"].is_string());
        assert_eq!(
            body["request_id"],
            answer.headers["x-request-id"].to_str().unwrap()
        );
        assert!(
            !answer.body.windows(9).any(|w| w == b"tg_not_a_"),
            "the key is not echoed"
        );
    }
    let bearer = Request::get(h.url("/api/assets"))
        .header("authorization", "Bearer tg_wrong")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(h.send(bearer).await.status, StatusCode::UNAUTHORIZED);
    assert_eq!(h.emulator.total(), 0, "a 401 sends nothing upstream");
    h.stop().await;
}

#[tokio::test]
async fn a_team_without_a_credential_for_the_upstream_gets_403() {
    let h = Harness::start().await;
    let answer = h.get("/api/assets", NO_CREDENTIAL_KEY).await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert_eq!(answer.json()["code"], "forbidden");
    assert_eq!(h.emulator.total(), 0);
    h.stop().await;
}

#[tokio::test]
async fn v2_routes_get_the_key_as_bearer_and_gateway_errors_in_the_v2_envelope() {
    let h = Harness::start().await;
    // A job to stream events for (v1 submit, v2 events, same account).
    let submitted = h
        .call(
            Method::POST,
            "/api/prompt",
            Some(DESIGN_KEY),
            Some(json!({"prompt": {"3": {}}})),
        )
        .await;
    let job = submitted.json()["prompt_id"].as_str().unwrap().to_owned();
    let events = h
        .get(&format!("/api/v2/jobs/{job}/events"), DESIGN_KEY)
        .await;
    assert_eq!(events.status, StatusCode::OK);
    assert_eq!(events.headers["content-type"], "text/event-stream");
    let text = String::from_utf8(events.body.to_vec()).unwrap();
    assert!(
        text.starts_with("event: status\n") && text.contains("\"completed\""),
        "{text}"
    );
    let seen = h.emulator.recorded().pop().unwrap();
    assert_eq!(
        seen.headers["authorization"],
        format!("Bearer {DESIGN_UPSTREAM_KEY}")
    );
    assert!(seen.headers.get("x-api-key").is_none());

    let refused = h
        .call(Method::GET, "/api/v2/jobs/x/events", None, None)
        .await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    // v2 ErrorEnvelope: {error: {code, message, details}}.
    assert_eq!(refused.json()["error"]["code"], "unauthorized");
    h.stop().await;
}

#[tokio::test]
async fn two_teams_each_get_their_own_upstream_key_and_see_their_own_assets() {
    let h = Harness::start().await;
    let created = h.create_asset(DESIGN_KEY, "only-design.png").await;
    assert_eq!(created.status, StatusCode::CREATED);
    let id = created.json()["id"].as_str().unwrap().to_owned();

    assert_eq!(
        h.get(&format!("/api/assets/{id}"), DESIGN_KEY).await.status,
        StatusCode::OK
    );
    assert_eq!(
        h.get(&format!("/api/assets/{id}"), RESEARCH_KEY)
            .await
            .status,
        StatusCode::NOT_FOUND
    );
    let research_list = h.get("/api/assets?limit=500", RESEARCH_KEY).await.json();
    assert!(!research_list.to_string().contains("only-design.png"));

    let keys: Vec<String> = h
        .emulator
        .recorded()
        .iter()
        .map(|r| r.headers["x-api-key"].to_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        keys,
        [
            DESIGN_UPSTREAM_KEY,
            DESIGN_UPSTREAM_KEY,
            RESEARCH_UPSTREAM_KEY,
            RESEARCH_UPSTREAM_KEY
        ]
    );
    h.stop().await;
}

#[tokio::test]
async fn path_and_query_bytes_are_preserved() {
    let h = Harness::start().await;
    // Comma-joined tags (style: form, explode: false), a repeated parameter,
    // percent-escapes of every kind, an empty value and a bare flag.
    let target = "/api/assets?include_tags=models,checkpoint&include_tags=x&name_contains=a%2Fb%20c%2bd&metadata_filter=%7B%22k%22%3A1%7D&empty=&flag&order=desc";
    let answer = h.get(target, DESIGN_KEY).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(h.emulator.recorded().pop().unwrap().target, target);
    h.stop().await;
}

#[tokio::test]
async fn redirects_are_passed_through_never_followed() {
    let h = Harness::start().await;
    let answer = h
        .get(
            "/api/view?filename=ComfyUI_00004_.png&type=output",
            DESIGN_KEY,
        )
        .await;
    assert_eq!(answer.status, StatusCode::FOUND);
    let location = answer.headers["location"].to_str().unwrap();
    assert!(
        location.starts_with("https://storage.emulator.invalid/"),
        "{location}"
    );
    assert_eq!(
        h.emulator.total(),
        1,
        "exactly the one request, no follow-up"
    );
    h.stop().await;
}

#[tokio::test]
async fn delete_with_a_json_body_is_forwarded() {
    let h = Harness::start().await;
    let created = h
        .call(
            Method::POST,
            "/api/assets/from-hash",
            Some(DESIGN_KEY),
            Some(json!({"hash": demo_blob_hash(), "tags": ["input", "keep", "drop"]})),
        )
        .await
        .json();
    let id = created["id"].as_str().unwrap();
    // removeAssetTags: DELETE /api/assets/{id}/tags with {"tags": [...]}.
    let removed = h
        .call(
            Method::DELETE,
            &format!("/api/assets/{id}/tags"),
            Some(DESIGN_KEY),
            Some(json!({"tags": ["drop"]})),
        )
        .await;
    assert_eq!(removed.status, StatusCode::OK);
    let body = removed.json();
    assert_eq!(body["removed"], json!(["drop"]));
    assert_eq!(body["total_tags"], json!(["input", "keep"]));
    h.stop().await;
}

#[tokio::test]
async fn every_method_is_forwarded() {
    let h = Harness::start().await;
    for method in [
        "PATCH", "OPTIONS", "PUT", "DELETE", "HEAD", "POST", "GET", "PROPFIND",
    ] {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let answer = h
            .call(
                method.clone(),
                "/api/some/other/route",
                Some(DESIGN_KEY),
                None,
            )
            .await;
        assert_ne!(answer.status, StatusCode::UNAUTHORIZED);
        assert_eq!(
            h.emulator.count(method.clone(), "/api/some/other/route"),
            1,
            "{method}"
        );
    }
    h.stop().await;
}

#[tokio::test]
async fn hop_by_hop_headers_are_stripped_and_forwarding_headers_added() {
    let h = Harness::start().await;
    let request = Request::get(h.url("/api/jobs"))
        .header("x-api-key", DESIGN_KEY)
        .header("connection", "keep-alive, x-private-hop")
        .header("x-private-hop", "secret-hop-value")
        .header("keep-alive", "timeout=5")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-end-to-end", "kept")
        .header("x-request-id", "client-chosen-id-1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let answer = h.send(request).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.headers["x-request-id"], "client-chosen-id-1");
    let seen = h.emulator.recorded().pop().unwrap().headers;
    for gone in ["x-private-hop", "keep-alive", "proxy-authorization"] {
        assert!(seen.get(gone).is_none(), "{gone} must not be forwarded");
    }
    assert_eq!(seen["x-end-to-end"], "kept");
    assert_eq!(seen["host"], h.emulator_addr.to_string());
    assert_eq!(seen["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["via"], "1.1 teamgate");
    assert_eq!(seen["x-request-id"], "client-chosen-id-1");
    h.stop().await;
}

/// The upstream sees the id the client's answer carries — a fresh one when
/// the client sent none, and in place of one that is not sane (too long, or
/// with characters an id has no use for) — on a forwarded read and on the
/// fill a cache miss sends (the fill is a request of its own, built by the
/// cache, and carries the leader's id).
#[tokio::test]
async fn the_upstream_sees_the_answers_request_id() {
    let h = Harness::start().await;
    let too_long = "a".repeat(129);
    let cases = [
        None,
        Some(too_long.as_str()),
        Some("has space"),
        Some("quote\"d"),
    ];
    for (n, sent) in cases.into_iter().enumerate() {
        // A pass-through read, then a list page nobody asked for before (a miss).
        for path in [
            "/api/jobs".to_owned(),
            format!("/api/assets?limit={}", n + 1),
        ] {
            let mut request = Request::get(h.url(&path)).header("x-api-key", DESIGN_KEY);
            if let Some(sent) = sent {
                request = request.header("x-request-id", sent);
            }
            let answer = h.send(request.body(Full::new(Bytes::new())).unwrap()).await;
            assert_eq!(answer.status, StatusCode::OK, "{path} {sent:?}");
            let id = answer.headers["x-request-id"].to_str().unwrap();
            assert_eq!(id.len(), 36, "a fresh UUID for {path} {sent:?}, not {id}");
            let upstream = h.emulator.recorded().pop().unwrap();
            let path_only = path.split('?').next().unwrap();
            assert!(
                upstream.target.starts_with(path_only),
                "{path} went upstream as {}",
                upstream.target
            );
            let seen = upstream.headers;
            assert_eq!(
                seen.get_all("x-request-id").iter().count(),
                1,
                "{path} {sent:?}"
            );
            assert_eq!(seen["x-request-id"], id, "{path} {sent:?}");
        }
    }
    h.stop().await;
}

#[tokio::test]
async fn websocket_token_is_rewritten_to_the_team_key_and_frames_flow_both_ways() {
    let h = Harness::start().await;
    let url = format!("ws://{}/ws?clientId=client-1&token={DESIGN_KEY}", h.gateway);
    let (mut socket, response) = tokio_tungstenite::connect_async(url)
        .await
        .expect("upgrade through the gateway");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);

    // WebSocketStatusMessage first, with our client id as sid.
    let Some(Ok(Message::Text(first))) = socket.next().await else {
        panic!("no status message")
    };
    let first: serde_json::Value = serde_json::from_str(&first).unwrap();
    assert_eq!(first["type"], "status");
    assert_eq!(first["data"]["sid"], "client-1");

    socket.send(Message::Text("hello".into())).await.unwrap();
    socket
        .send(Message::Binary(Bytes::from_static(&[0, 1, 2, 255])))
        .await
        .unwrap();
    let mut progress = 0;
    let mut echoes = Vec::new();
    while echoes.len() < 2 {
        match socket.next().await.expect("the tunnel stays open").unwrap() {
            Message::Text(text) if text.as_str().contains("\"progress\"") => progress += 1,
            other => echoes.push(other),
        }
    }
    assert_eq!(progress, 3);
    assert_eq!(echoes[0], Message::Text("hello".into()));
    assert_eq!(
        echoes[1],
        Message::Binary(Bytes::from_static(&[0, 1, 2, 255]))
    );
    socket.close(None).await.unwrap();
    while let Some(Ok(message)) = socket.next().await {
        if message.is_close() {
            break;
        }
    }

    let upgrade = h
        .emulator
        .recorded()
        .into_iter()
        .find(|r| r.target.starts_with("/ws"))
        .unwrap();
    assert_eq!(
        upgrade.target,
        format!("/ws?clientId=client-1&token={DESIGN_UPSTREAM_KEY}")
    );
    assert!(!everything_upstream_saw(&h.emulator).contains(DESIGN_KEY));
    h.stop().await;
}

/// An upstream that answers every request by echoing its target — a
/// redirect's `Location`, a header and a JSON message, as a framework's
/// trailing-slash redirect or a "no route for …" error would — with a body
/// past 64 KiB when the target asks for `big`, and half a body and then
/// silence when it asks for `stall`.
async fn echoing_upstream() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).await.unwrap_or(0) == 1
                {
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).into_owned();
                let target = head.split(' ').nth(1).unwrap_or("/").to_owned();
                if target.contains("stall") {
                    // Half an answer, then nothing: a body still coming.
                    let half =
                        format!("HTTP/1.1 400 Bad Request\r\nContent-Length: 1000\r\n\r\n{target}");
                    let _ = stream.write_all(half.as_bytes()).await;
                    tokio::time::sleep(std::time::Duration::from_secs(30)).await;
                    return;
                }
                let padding = if target.contains("big") {
                    "x".repeat(100 * 1024)
                } else {
                    String::new()
                };
                let body = format!("{{\"message\":\"{padding}no route for {target}\"}}");
                let answer = format!(
                    "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://upstream.internal{target}\r\n\
                     X-Echo: {target}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    });
    addr
}

/// The team's key travels in the URL of a `/ws` request (the v1 spec's
/// `token` parameter), so an upstream answer that echoes the URL would hand
/// it to the member: the gateway takes it out of every header and body of
/// such answers, upgrade refusals included, and refuses to pass on a body
/// too big to check or too slow to end.
#[tokio::test]
async fn an_answer_echoing_the_url_never_shows_the_team_key() {
    let echo = echoing_upstream().await;
    let emulator = teamgate::emulator::Emulator::new(accounts());
    let h = Harness::start_in_front_of(
        emulator,
        echo,
        &format!("http://{echo}"),
        "response_timeout = \"1s\"",
    )
    .await;
    let mut answers = vec![
        h.get("/ws?clientId=c1", DESIGN_KEY).await,
        h.get("/ws/?clientId=c2", DESIGN_KEY).await,
    ];
    let upgrade = Request::get(h.url("/ws?clientId=c3"))
        .header("x-api-key", DESIGN_KEY)
        .header("connection", "upgrade")
        .header("upgrade", "websocket")
        .header("sec-websocket-version", "13")
        .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        .body(Full::new(Bytes::new()))
        .unwrap();
    answers.push(h.send(upgrade).await);
    for answer in &answers {
        assert_eq!(answer.status, StatusCode::TEMPORARY_REDIRECT);
        let everything = format!(
            "{:?} {}",
            answer.headers,
            String::from_utf8_lossy(&answer.body)
        );
        assert!(!everything.contains(DESIGN_UPSTREAM_KEY), "{everything}");
        assert!(everything.contains("token=[redacted]"), "{everything}");
        assert!(
            everything.contains("clientId=c"),
            "the rest is kept: {everything}"
        );
        assert!(
            answer.json()["message"]
                .as_str()
                .unwrap()
                .starts_with("no route for /ws"),
            "the body is still the upstream's JSON"
        );
    }
    let big = h.get("/ws?clientId=big", DESIGN_KEY).await;
    assert_eq!(big.status, StatusCode::BAD_GATEWAY);
    assert_eq!(big.json()["code"], "bad_gateway");
    assert!(!String::from_utf8_lossy(&big.body).contains(DESIGN_UPSTREAM_KEY));
    // A body that never ends is not waited for past the response timeout.
    let stalled = h.get("/ws?clientId=stall", DESIGN_KEY).await;
    assert_eq!(stalled.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(!String::from_utf8_lossy(&stalled.body).contains(DESIGN_UPSTREAM_KEY));
    // Other routes carry the key in a header the answer cannot echo by accident.
    let plain = h.get("/api/jobs", DESIGN_KEY).await;
    assert_eq!(plain.status, StatusCode::TEMPORARY_REDIRECT);
    assert_eq!(plain.headers["x-echo"], "/api/jobs");
    h.stop().await;
}

#[tokio::test]
async fn refused_upstream_gives_502_in_comfy_shape_and_the_gateway_keeps_serving() {
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed_addr = closed.local_addr().unwrap();
    drop(closed);
    let emulator = teamgate::emulator::Emulator::new(accounts());
    let h = Harness::start_in_front_of(emulator, closed_addr, &format!("http://{closed_addr}"), "")
        .await;
    for _ in 0..3 {
        let answer = h.get("/api/assets", DESIGN_KEY).await;
        assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
        let body = answer.json();
        assert_eq!(body["code"], "bad_gateway");
        assert_eq!(
            body["request_id"],
            answer.headers["x-request-id"].to_str().unwrap()
        );
        assert!(
            !answer.body.windows(5).any(|w| w == b"127.0"),
            "no internals in the body"
        );
    }
    h.stop().await;
}

#[tokio::test]
async fn a_dropped_upstream_connection_gives_502_and_others_are_still_served() {
    let h = Harness::start().await;
    h.emulator
        .inject(Fault::new(Some(Method::GET), "/api/jobs", FaultAction::Drop).times(1));
    let answer = h.get("/api/jobs", DESIGN_KEY).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert_eq!(answer.json()["code"], "bad_gateway");
    assert_eq!(h.get("/api/jobs", DESIGN_KEY).await.status, StatusCode::OK);
    h.stop().await;
}

#[tokio::test]
async fn an_upstream_5xx_passes_through_untouched() {
    let h = Harness::start().await;
    h.emulator.inject(
        Fault::new(
            None,
            "/api/jobs",
            FaultAction::Status(StatusCode::SERVICE_UNAVAILABLE),
        )
        .times(1),
    );
    let answer = h.get("/api/jobs", DESIGN_KEY).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        answer.json()["code"],
        "injected_fault",
        "the upstream's own body"
    );
    h.stop().await;
}

#[tokio::test]
async fn a_slow_upstream_gives_504_and_the_gateway_keeps_serving() {
    let h = Harness::start_with(r#"response_timeout = "200ms""#).await;
    // Held forever: the answer can only come from the gateway's timeout.
    let gate = hold_once(&h.emulator, None, "/api/jobs", FaultAction::Hold);
    let answer = h.get("/api/jobs", DESIGN_KEY).await;
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(answer.json()["code"], "gateway_timeout");
    assert_eq!(
        h.get("/api/assets", DESIGN_KEY).await.status,
        StatusCode::OK
    );
    gate.add_permits(1);
    h.stop().await;
}

async fn raw_exchange(addr: std::net::SocketAddr, request: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn absolute_form_targets_and_connect_are_refused_without_any_upstream_request() {
    let h = Harness::start().await;
    let absolute = raw_exchange(
        h.gateway,
        &format!("GET http://169.254.169.254/latest/meta-data HTTP/1.1\r\nHost: 169.254.169.254\r\nX-API-Key: {DESIGN_KEY}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert!(absolute.starts_with("HTTP/1.1 400"), "{absolute}");
    assert!(absolute.contains("\"code\":\"bad_request\""), "{absolute}");

    let connect = raw_exchange(
        h.gateway,
        &format!("CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nX-API-Key: {DESIGN_KEY}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert!(connect.starts_with("HTTP/1.1 405"), "{connect}");
    assert_eq!(h.emulator.total(), 0);
    // And the gateway still serves normal requests.
    assert_eq!(
        h.get("/api/assets", DESIGN_KEY).await.status,
        StatusCode::OK
    );
    h.stop().await;
}

#[tokio::test]
async fn health_readiness_and_graceful_shutdown_let_in_flight_requests_finish() {
    let mut h = Harness::start().await;
    assert_eq!(h.admin_get("/healthz").await.status, StatusCode::OK);
    assert_eq!(h.admin_get("/readyz").await.status, StatusCode::OK);

    let gate = hold_once(&h.emulator, None, "/api/jobs", FaultAction::Hold);
    let in_flight = spawn_get(&h.client, h.url("/api/jobs"), DESIGN_KEY);
    eventually("the request is parked at the upstream", async || {
        h.emulator.count(Method::GET, "/api/jobs") == 1
    })
    .await;

    h.trigger_shutdown();
    eventually("draining is not ready", async || {
        h.admin_get("/readyz").await.status == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    assert_eq!(h.admin_get("/healthz").await.status, StatusCode::OK);
    // New connections are refused once draining.
    assert!(tokio::net::TcpStream::connect(h.gateway).await.is_err());

    gate.add_permits(1);
    assert_eq!(
        in_flight.await.unwrap().status,
        StatusCode::OK,
        "the in-flight request completes"
    );
    h.stopped().await.expect("run returns Ok after draining");
}

#[tokio::test]
async fn unknown_paths_outside_any_mount_get_404_in_shape() {
    let h = Harness::start().await;
    let answer = raw_exchange(
        h.gateway,
        "OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    assert!(answer.contains("\"code\":\"not_found\""));
    assert_eq!(h.emulator.total(), 0);
    h.stop().await;
}

#[tokio::test]
async fn a_malformed_upstream_answer_is_a_502_not_the_clients_fault() {
    // An "upstream" that answers garbage instead of HTTP.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buffer = [0u8; 4096];
                let _ = stream.read(&mut buffer).await;
                let _ = stream.write_all(b"this is not HTTP\r\n\r\n").await;
            });
        }
    });
    let emulator = teamgate::emulator::Emulator::new(accounts());
    let h = Harness::start_in_front_of(emulator, addr, &format!("http://{addr}"), "").await;
    let answer = h.get("/api/jobs", DESIGN_KEY).await;
    assert_eq!(
        answer.status,
        StatusCode::BAD_GATEWAY,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.json()["code"], "bad_gateway");
    h.stop().await;
}
