//! Forwarding completeness and hostile input (issue #3): each case gets a
//! specific status and a JSON body, nothing reaches the upstream, and a
//! normal request still succeeds afterwards.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::StreamExt;
use http::{Method, Request, StatusCode, Version};
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends raw bytes and reads until the server closes (bounded).
async fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

fn status_of(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

fn json_of(answer: &str) -> serde_json::Value {
    let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {answer}"))
}

/// Sends `head` (the request line and any fields) with the design team's key
/// and `Connection: close`, then `body`, and expects `400` with a JSON body.
async fn assert_bad_request(h: &Harness, head: &str, body: &str) {
    let answer = raw(
        h.gateway,
        format!("{head}\r\nX-API-Key: {DESIGN_KEY}\r\nConnection: close\r\n\r\n{body}").as_bytes(),
    )
    .await;
    assert_eq!(status_of(&answer), 400, "{head}: {answer}");
    assert_eq!(json_of(&answer)["code"], "bad_request", "{head}");
}

async fn still_serving(h: &Harness) {
    assert_eq!(
        h.get("/api/jobs", DESIGN_KEY).await.status,
        StatusCode::OK,
        "the gateway keeps serving"
    );
}

#[tokio::test]
async fn dot_segments_and_encoded_separators_never_reach_another_route() {
    let h = Harness::start().await;
    for target in [
        "/api/assets/../jobs",
        "/api/%2e%2e/admin",
        "/api/assets/%2E%2E/jobs",
        "/api/./assets",
        "/api/assets%2f..%2fjobs",
        "/api/assets%2Fx",
        "/api/assets%5c..%5cjobs",
        "/api/assets/%00",
        "/api/assets/..;/jobs",
        "/api//jobs",
        "/api/%61ssets",
    ] {
        assert_bad_request(&h, &format!("GET {target} HTTP/1.1\r\nHost: x"), "").await;
    }
    assert_eq!(h.emulator.total(), 0, "none was forwarded, under any route");
    still_serving(&h).await;
    h.stop().await;
}

/// RFC 9112 §3.2: 400 for an HTTP/1.1 request without a `Host` and for any
/// request with two, through the gateway's own loop (a `GET`) and through
/// hyper (a body, HTTP/1.0); nothing is forwarded.
#[tokio::test]
async fn a_request_without_exactly_one_host_is_refused() {
    let h = Harness::start().await;
    for head in [
        "GET /api/jobs HTTP/1.1".to_owned(),
        "GET /api/jobs HTTP/1.1\r\nHost: a\r\nHost: b".to_owned(),
        "POST /api/prompt HTTP/1.1\r\nContent-Length: 2".to_owned(),
        "GET /api/jobs HTTP/1.0\r\nHost: a\r\nHost: a".to_owned(),
    ] {
        let body = if head.starts_with("POST") { "{}" } else { "" };
        assert_bad_request(&h, &head, body).await;
    }
    assert_eq!(h.emulator.total(), 0, "none was forwarded");
    // HTTP/1.0 needs none.
    let answer = raw(
        h.gateway,
        format!("GET /api/jobs HTTP/1.0\r\nX-API-Key: {DESIGN_KEY}\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(status_of(&answer), 200, "{answer}");
    still_serving(&h).await;
    h.stop().await;
}

/// A method-override header would have a framework upstream run another
/// method than the one the cache and quotas went by: a `GET` that deletes,
/// stored as a read. Refused, through the own loop and through hyper.
#[tokio::test]
async fn method_override_headers_never_reach_the_upstream() {
    let h = Harness::start().await;
    let id = "3f2504e0-4f89-41d3-9a0c-0305e82c3301";
    for (head, body) in [
        (
            format!("GET /api/assets/{id} HTTP/1.1\r\nX-HTTP-Method-Override: DELETE"),
            "",
        ),
        (
            "POST /api/assets/from-hash HTTP/1.1\r\nX-HTTP-Method: GET\r\nContent-Length: 2"
                .to_owned(),
            "{}",
        ),
        (
            "GET /api/assets HTTP/1.1\r\nX-Method-Override: POST".to_owned(),
            "",
        ),
    ] {
        assert_bad_request(&h, &format!("{head}\r\nHost: x"), body).await;
    }
    assert_eq!(h.emulator.total(), 0, "none was forwarded");
    still_serving(&h).await;
    h.stop().await;
}

#[tokio::test]
async fn oversized_headers_get_431_in_json() {
    let h = Harness::start_with_config("", "").await;
    // Default max_header_bytes is 64 KiB: 80 KiB is over it, under hyper's own bound.
    let big = "v".repeat(80 * 1024);
    let answer = raw(
        h.gateway,
        format!("GET /api/jobs HTTP/1.1\r\nHost: x\r\nX-API-Key: {DESIGN_KEY}\r\nX-Big: {big}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(
        status_of(&answer),
        431,
        "{}",
        &answer[..answer.len().min(200)]
    );
    assert_eq!(json_of(&answer)["code"], "request_header_fields_too_large");
    // Far beyond: hyper's buffer bound closes it with a bare 431 before any request exists.
    let huge = "v".repeat(400 * 1024);
    let answer = raw(
        h.gateway,
        format!("GET /api/jobs HTTP/1.1\r\nHost: x\r\nX-Big: {huge}\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(
        status_of(&answer),
        431,
        "{}",
        &answer[..answer.len().min(200)]
    );
    assert_eq!(h.emulator.total(), 0);
    still_serving(&h).await;
    h.stop().await;
}

#[tokio::test]
async fn non_ascii_headers_and_bad_queries_are_refused() {
    let h = Harness::start().await;
    let mut request = b"GET /api/jobs HTTP/1.1\r\nHost: x\r\nX-API-Key: ".to_vec();
    request.extend_from_slice(DESIGN_KEY.as_bytes());
    request.extend_from_slice(b"\r\nX-Name: caf\xc3\xa9 \xff\r\nConnection: close\r\n\r\n");
    let answer = raw(h.gateway, &request).await;
    assert_eq!(status_of(&answer), 400, "{answer}");
    assert_eq!(json_of(&answer)["code"], "bad_request");
    for query in ["a=%00", "a=%0d%0aInjected:%20yes", "a=%ff%fe"] {
        let answer = raw(
            h.gateway,
            format!("GET /api/jobs?{query} HTTP/1.1\r\nHost: x\r\nX-API-Key: {DESIGN_KEY}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(status_of(&answer), 400, "{query}: {answer}");
    }
    // A raw control byte in a header is refused by the HTTP parser itself.
    let answer = raw(
        h.gateway,
        b"GET /api/jobs HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&answer), 400);
    assert_eq!(h.emulator.total(), 0);
    still_serving(&h).await;
    h.stop().await;
}

#[tokio::test]
async fn broken_chunked_bodies_get_400_and_no_upstream_request() {
    let h = Harness::start().await;
    let broken = format!(
        "POST /api/prompt HTTP/1.1\r\nHost: x\r\nX-API-Key: {DESIGN_KEY}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nZZZ\r\nhello\r\n0\r\n\r\n"
    );
    let answer = raw(h.gateway, broken.as_bytes()).await;
    assert_eq!(status_of(&answer), 400, "{answer}");
    assert_eq!(json_of(&answer)["code"], "bad_request");
    let not_chunked = format!(
        "POST /api/prompt HTTP/1.1\r\nHost: x\r\nX-API-Key: {DESIGN_KEY}\r\nTransfer-Encoding: gzip\r\nConnection: close\r\n\r\n"
    );
    assert_eq!(
        status_of(&raw(h.gateway, not_chunked.as_bytes()).await),
        400
    );
    assert_eq!(h.emulator.total(), 0, "no upstream request");
    // Broken after a good first chunk: the upstream saw the head, but the
    // answer still blames the client's body, not the upstream.
    let broken_later = format!(
        "POST /emulator/sink HTTP/1.1\r\nHost: x\r\nX-API-Key: {DESIGN_KEY}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\nZZZ\r\n"
    );
    let answer = raw(h.gateway, broken_later.as_bytes()).await;
    assert_eq!(status_of(&answer), 400, "{answer}");
    still_serving(&h).await;
    h.stop().await;
}

/// Content-Length and Transfer-Encoding together: hyper applies RFC 9112 §6.3
/// (chunked wins, Content-Length is dropped, the connection is closed after
/// the answer), so a CL.TE smuggling attempt cannot slip a second request to
/// the upstream: only the one chunked request, re-framed, is forwarded.
#[tokio::test]
async fn conflicting_framing_cannot_smuggle_a_request_upstream() {
    let h = Harness::start().await;
    let smuggled = format!("GET /api/tags HTTP/1.1\r\nHost: x\r\nX-API-Key: {DESIGN_KEY}\r\n\r\n");
    let attack = format!(
        "POST /api/prompt HTTP/1.1\r\nHost: x\r\nX-API-Key: {DESIGN_KEY}\r\nContent-Type: application/json\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggled}"
    );
    let answer = raw(h.gateway, attack.as_bytes()).await;
    assert_eq!(
        answer.matches("HTTP/1.1 ").count(),
        1,
        "one answer, then the connection closes: {answer}"
    );
    assert_eq!(
        h.emulator.count(Method::GET, "/api/tags"),
        0,
        "the smuggled request never reached upstream"
    );
    let forwarded = h.emulator.recorded();
    assert_eq!(forwarded.len(), 1);
    assert!(
        forwarded[0]
            .headers
            .get("content-length")
            .is_none_or(|length| length == "0")
    );
    still_serving(&h).await;
    h.stop().await;
}

#[tokio::test]
async fn bodies_over_the_cap_get_413() {
    let h = Harness::start_with_server("max_request_body = \"1KiB\"").await;
    let declared = format!(
        "POST /api/prompt HTTP/1.1\r\nHost: x\r\nX-API-Key: {DESIGN_KEY}\r\nContent-Type: application/json\r\nContent-Length: 2048\r\nConnection: close\r\n\r\n"
    );
    let answer = raw(h.gateway, declared.as_bytes()).await;
    assert_eq!(status_of(&answer), 413, "{answer}");
    assert_eq!(json_of(&answer)["code"], "payload_too_large");
    assert_eq!(h.emulator.total(), 0);
    // Chunked, so the size shows only while streaming: cut off at the cap.
    let chunk = "x".repeat(700);
    let streamed = format!(
        "POST /api/prompt HTTP/1.1\r\nHost: x\r\nX-API-Key: {DESIGN_KEY}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n2bc\r\n{chunk}\r\n2bc\r\n{chunk}\r\n0\r\n\r\n"
    );
    let answer = raw(h.gateway, streamed.as_bytes()).await;
    assert_eq!(status_of(&answer), 413, "{answer}");
    still_serving(&h).await;
    h.stop().await;
}

/// A head that never ends is cut off after the header-read timeout, on the
/// gateway port and on the admin port (health, metrics, cache
/// administration) alike, and both keep serving.
#[tokio::test]
async fn a_slowloris_client_is_cut_off_after_the_header_read_timeout() {
    let h = Harness::start_with_server("header_read_timeout = \"300ms\"").await;
    for (port, addr, head) in [
        (
            "gateway",
            h.gateway,
            &b"GET /api/jobs HTTP/1.1\r\nHost: x\r\nX-Slow: "[..],
        ),
        (
            "admin port",
            h.admin,
            b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ",
        ),
    ] {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(head).await.unwrap();
        // Then nothing more: the server must close the connection on its own.
        let mut buffer = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut buffer)).await;
        assert!(closed.is_ok(), "the connection was closed by the {port}");
    }
    assert_eq!(h.emulator.total(), 0);
    still_serving(&h).await;
    assert_eq!(h.admin_get("/healthz").await.status, StatusCode::OK);
    h.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_limit_get_a_clear_503() {
    let h = Harness::start_with_server("max_connections = 2").await;
    let first = TcpStream::connect(h.gateway).await.unwrap();
    let second = TcpStream::connect(h.gateway).await.unwrap();
    // No wait needed: the kernel's accept queue is first in, first out and the
    // gateway takes a slot as it accepts, so both slots are gone before the
    // third connection below is accepted.
    let answer = raw(h.gateway, b"GET /api/jobs HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(status_of(&answer), 503, "{answer}");
    assert_eq!(json_of(&answer)["code"], "service_unavailable");
    assert!(answer.to_ascii_lowercase().contains("retry-after: 1"));
    drop(first);
    drop(second);
    // The slots come back as the connections end.
    eventually("a new connection is served", async || {
        // A fresh client each time: a new connection, not a pooled one.
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let request = Request::get(h.url("/api/jobs"))
            .header("x-api-key", DESIGN_KEY)
            .body(Full::new(Bytes::new()))
            .unwrap();
        client
            .request(request)
            .await
            .is_ok_and(|r| r.status() == StatusCode::OK)
    })
    .await;
    h.stop().await;
}

#[tokio::test]
async fn an_idle_websocket_tunnel_is_closed() {
    let h = Harness::start_with_server("websocket_idle_timeout = \"300ms\"").await;
    let url = format!("ws://{}/ws?clientId=idle&token={DESIGN_KEY}", h.gateway);
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut messages = 0;
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(Ok(message)) = socket.next().await {
            if message.is_text() {
                messages += 1;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the idle tunnel was closed by the gateway");
    assert_eq!(
        messages, 4,
        "status and 3 progress messages came through first"
    );
    h.stop().await;
}

#[tokio::test]
async fn server_sent_events_arrive_before_the_stream_ends() {
    // One event, then a minute before the next: a buffering gateway would hold the first.
    let (emulator, addr) = serve_slow_events_emulator().await;
    let h = Harness::start_in_front_of(emulator, addr, &format!("http://{addr}"), "").await;
    let (headers, body) = h.open_job_events(DESIGN_KEY).await;
    assert!(headers.get("content-encoding").is_none(), "not compressed");
    drop(body);
    h.stop().await;
}

#[tokio::test]
async fn h2c_with_prior_knowledge_is_served() {
    let h = Harness::start().await;
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let request = Request::get(h.url("/api/assets?limit=2"))
        .header("x-api-key", DESIGN_KEY)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = client.request(request).await.unwrap();
    assert_eq!(response.version(), Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::OK);
    let seen = h.emulator.recorded().pop().unwrap();
    assert_eq!(
        seen.headers["via"], "2 teamgate",
        "forwarded upstream over HTTP/1.1, noted in Via"
    );
    h.stop().await;
}
