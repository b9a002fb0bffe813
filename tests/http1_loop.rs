//! The gateway's own HTTP/1.1 loop for client connections (`src/server`),
//! over real TCP: pipelining, the hand-off to hyper in the middle of a
//! connection, `HEAD`, `Connection: close`, the idle header-read timeout and
//! shutdown. Raw bytes on the wire, so nothing a client library smooths over
//! is hidden.

mod common;

use common::wire::{RawAnswer, Wire};
use common::*;
use http::Method;
use teamgate::emulator::{FaultAction, demo_blob_hash};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: x\r\nX-API-Key: {DESIGN_KEY}\r\n\r\n")
}

fn asset_names(answer: &RawAnswer) -> Vec<String> {
    answer.json()["assets"]
        .as_array()
        .expect("an asset list")
        .iter()
        .filter_map(|asset| asset["name"].as_str().map(str::to_owned))
        .collect()
}

/// Pipelined requests are answered in order; a request with a body on the
/// same connection goes to hyper with its bytes intact, and the read after
/// that write is fresh (cache invariant: no stale read after a write).
#[tokio::test]
async fn pipelined_reads_then_a_write_on_the_same_connection() {
    let h = Harness::start().await;
    let mut wire = Wire::connect(&h).await;
    wire.send(&format!(
        "{}{}",
        get("/api/assets?limit=50"),
        get("/api/jobs")
    ))
    .await;
    let assets = wire.answer(false).await;
    let jobs = wire.answer(false).await;
    assert_eq!(assets.status, 200);
    assert!(assets.header("date").is_some(), "answers carry a Date");
    assert!(
        asset_names(&assets)
            .iter()
            .all(|name| name != "pipelined.png")
    );
    assert_eq!(jobs.status, 200);
    assert!(jobs.json()["jobs"].is_array(), "{jobs:?}");

    // Cached now: the same read again is a hit on the same connection.
    wire.send(&get("/api/assets?limit=50")).await;
    let again = wire.answer(false).await;
    assert!(
        again
            .header("cache-status")
            .is_some_and(|status| status.contains("hit")),
        "{again:?}"
    );
    assert_eq!(h.emulator.count(Method::GET, "/api/assets"), 1);

    let body =
        serde_json::json!({"hash": demo_blob_hash(), "name": "pipelined.png", "tags": ["input"]})
            .to_string();
    // The write and the next read in one segment: the loop hands both to hyper.
    wire.send(&format!(
        "POST /api/assets/from-hash HTTP/1.1\r\nHost: x\r\nX-API-Key: {DESIGN_KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}{}",
        body.len(),
        get("/api/assets?limit=50"),
    ))
    .await;
    let created = wire.answer(false).await;
    assert!(
        created.status == 200 || created.status == 201,
        "{created:?}"
    );
    let fresh = wire.answer(false).await;
    assert_eq!(fresh.status, 200);
    assert!(
        asset_names(&fresh)
            .iter()
            .any(|name| name == "pipelined.png")
    );
    assert_eq!(h.emulator.count(Method::POST, "/api/assets/from-hash"), 1);
    h.stop().await;
}

#[tokio::test]
async fn head_answers_carry_no_body_and_connection_close_is_honoured() {
    let h = Harness::start().await;
    let mut wire = Wire::connect(&h).await;
    wire.send(&format!(
        "HEAD /api/jobs HTTP/1.1\r\nHost: x\r\nX-API-Key: {DESIGN_KEY}\r\n\r\n"
    ))
    .await;
    let head = wire.answer(true).await;
    assert_eq!(head.status, 200);
    // A HEAD the cache answers from a stored GET says that body's length.
    wire.send(&get("/api/assets")).await;
    let listed = wire.answer(false).await;
    wire.send(&format!(
        "HEAD /api/assets HTTP/1.1\r\nHost: x\r\nX-API-Key: {DESIGN_KEY}\r\n\r\n"
    ))
    .await;
    let cached_head = wire.answer(true).await;
    assert!(
        cached_head
            .header("cache-status")
            .is_some_and(|status| status.contains("hit"))
    );
    assert_eq!(
        cached_head.header("content-length"),
        Some(listed.body.len().to_string().as_str())
    );
    // Then a GET on the same connection, asking to close after it: had the
    // HEAD answer carried a body, this head would not parse.
    wire.send(&format!(
        "GET /api/jobs HTTP/1.1\r\nHost: x\r\nX-API-Key: {DESIGN_KEY}\r\nConnection: close\r\n\r\n"
    ))
    .await;
    let answer = wire.answer(false).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("connection"), Some("close"));
    wire.assert_closed().await;
    h.stop().await;
}

/// The gateway's own answers (401 here) go through the loop too, in shape.
#[tokio::test]
async fn an_unknown_key_gets_its_json_401_and_the_connection_stays_open() {
    let h = Harness::start().await;
    let mut wire = Wire::connect(&h).await;
    wire.send("GET /api/assets HTTP/1.1\r\nHost: x\r\nX-API-Key: nope\r\n\r\n")
        .await;
    let refused = wire.answer(false).await;
    assert_eq!(refused.status, 401);
    assert_eq!(refused.json()["code"], "unauthorized");
    wire.send(&get("/api/jobs")).await;
    assert_eq!(wire.answer(false).await.status, 200);
    assert_eq!(h.emulator.count(Method::GET, "/api/assets"), 0);
    h.stop().await;
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_header_read_timeout() {
    let h = Harness::start_with_server("header_read_timeout = \"300ms\"").await;
    let mut wire = Wire::connect(&h).await;
    wire.send(&get("/api/jobs")).await;
    assert_eq!(wire.answer(false).await.status, 200);
    // Nothing more: the gateway must close the connection on its own.
    wire.assert_closed().await;
    h.stop().await;
}

/// Shutdown closes an idle connection at once, and ends a busy one after its
/// answer, which says `Connection: close`.
#[tokio::test]
async fn shutdown_closes_idle_connections_and_lets_a_busy_one_finish() {
    let mut h = Harness::start().await;
    let mut idle = Wire::connect(&h).await;
    idle.send(&get("/api/assets")).await;
    assert_eq!(idle.answer(false).await.status, 200);

    let gate = hold_once(&h.emulator, None, "/api/jobs", FaultAction::Hold);
    let mut busy = Wire::connect(&h).await;
    busy.send(&get("/api/jobs")).await;
    eventually("the request is parked at the upstream", async || {
        h.emulator.count(Method::GET, "/api/jobs") == 1
    })
    .await;

    h.trigger_shutdown();
    idle.assert_closed().await;
    gate.add_permits(1);
    let answer = busy.answer(false).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("connection"), Some("close"));
    busy.assert_closed().await;
    h.stopped().await.expect("run returns Ok");
}

/// The request target whose answer also carries fields the gateway sets per
/// answer (`Age`, `Cache-Status`, the request id), so a hit's own fields
/// overlap the stored ones.
const OVERLAPPING: &str = "/api/assets?limit=6";
/// A target whose answer shares no field name with a hit's own fields: the
/// own loop writes the stored lines as they are.
const DISJOINT: &str = "/api/assets?limit=5";

/// An upstream that answers every request with the same asset list and a
/// field with two values, plus the per-answer fields for [`OVERLAPPING`].
/// Counts the requests it serves.
async fn canned_upstream() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    const BODY: &str = r#"{"assets":[{"id":"a1","name":"canned.png"}],"has_more":false}"#;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&served);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Bounded: a few requests per connection at most in this test.
                for _ in 0..16 {
                    while !buf.windows(4).any(|four| four == b"\r\n\r\n") {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(read) => buf.extend_from_slice(&chunk[..read]),
                        }
                    }
                    let end = buf.windows(4).position(|four| four == b"\r\n\r\n").unwrap();
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end + 4);
                    counter.fetch_add(1, Ordering::SeqCst);
                    let per_answer = if head.contains(OVERLAPPING) {
                        "Age: 900\r\nCache-Status: upstream-cdn; hit\r\nX-Request-Id: upstream-id\r\n"
                    } else {
                        ""
                    };
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{per_answer}\
                         Vary: accept\r\nVary: accept-encoding\r\nContent-Length: {}\r\n\r\n{BODY}",
                        BODY.len()
                    );
                    if stream.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, served)
}

/// A cache hit shares the entry's encoded fields instead of copying them
/// (`src/fields.rs`). Written by the own loop or by hyper (after a hand-off),
/// the answer carries the same fields: each field the gateway sets per answer
/// once, its own value replacing one stored from upstream (`Cache-Status`
/// excepted: the gateway's member follows the upstream's), and stored fields
/// with several values kept whole. Both for an entry whose fields the hit's
/// own ones overlap (the loop merges) and for one they do not (the loop
/// writes the stored lines as they are).
#[tokio::test]
async fn a_cache_hit_carries_the_same_fields_from_either_writer() {
    let (addr, served) = canned_upstream().await;
    let emulator = teamgate::emulator::Emulator::new(accounts());
    let h = Harness::start_in_front_of(emulator, addr, &format!("http://{addr}"), "").await;

    for (fills, path) in [(1, DISJOINT), (2, OVERLAPPING)] {
        let mut own_loop = Wire::connect(&h).await;
        own_loop.send(&get(path)).await;
        let filled = own_loop.answer(false).await;
        assert_eq!(filled.status, 200, "{path}: {filled:?}");
        own_loop.send(&get(path)).await;
        let from_loop = own_loop.answer(false).await;

        // HTTP/1.0 is not the loop's to serve: this connection goes to hyper at once.
        let mut handed_off = Wire::connect(&h).await;
        handed_off
            .send(&format!(
                "GET {path} HTTP/1.0\r\nHost: x\r\nX-API-Key: {DESIGN_KEY}\r\n\r\n"
            ))
            .await;
        let from_hyper = handed_off.answer(false).await;

        assert_eq!(
            served.load(std::sync::atomic::Ordering::SeqCst),
            fills,
            "{path}: one fill, then hits"
        );
        for (writer, answer) in [("own loop", &from_loop), ("hyper", &from_hyper)] {
            let all = |name: &str| {
                answer
                    .headers
                    .iter()
                    .filter(|(field, _)| field == name)
                    .map(|(_, value)| value.as_str())
                    .collect::<Vec<_>>()
            };
            let at = format!("{path} via {writer}");
            assert_eq!(answer.status, 200, "{at}: {answer:?}");
            assert_eq!(answer.body, filled.body, "{at}");
            // The upstream CDN's member kept, first; the gateway's last (RFC 9211 §2).
            let status = all("cache-status");
            let (own, upstream) = status.split_last().expect("a Cache-Status");
            assert!(own.starts_with("teamgate; hit"), "{at}: {status:?}");
            let upstream_members: &[&str] = if path == OVERLAPPING {
                &["upstream-cdn; hit"]
            } else {
                &[]
            };
            assert_eq!(upstream, upstream_members, "{at}");
            let age = all("age");
            assert!(age.len() == 1 && age[0] != "900", "{at}: {age:?}");
            let id = all("x-request-id");
            assert!(id.len() == 1 && id[0] != "upstream-id", "{at}: {id:?}");
            assert_eq!(all("vary"), ["accept", "accept-encoding"], "{at}");
            assert_eq!(all("content-type"), ["application/json"], "{at}");
            assert_eq!(
                all("content-length"),
                [filled.body.len().to_string()],
                "{at}"
            );
            assert_eq!(all("date").len(), 1, "{at}");
        }
        let names = |answer: &RawAnswer| {
            let mut names = answer
                .headers
                .iter()
                .map(|(name, _)| name.clone())
                .filter(|name| name != "connection" && name != "keep-alive")
                .collect::<Vec<_>>();
            names.sort();
            names
        };
        assert_eq!(names(&from_loop), names(&from_hyper), "{path}");
    }
    h.stop().await;
}
