//! A 1 GiB upload passes through intact, and the gateway's peak RSS stays
//! within 64 MiB of idle (issue #3). Its own binary: the process's peak RSS
//! is this test's alone. Gateway, emulator and client share the process, so
//! the bound covers all three.

mod common;

use std::convert::Infallible;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body::Frame;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, StreamBody};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_gib_upload_passes_intact_within_64_mib_of_idle() {
    const TOTAL: u64 = 1 << 30;
    const CHUNK: usize = 256 * 1024;
    let h = Harness::start_with_server("max_request_body = \"2GiB\"").await;
    let chunk = Bytes::from((0..CHUNK).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
    let chunks = (TOTAL / CHUNK as u64) as usize;
    let mut expected = blake3::Hasher::new();
    for _ in 0..chunks {
        expected.update(&chunk);
    }
    let expected = expected.finalize().to_hex().to_string();

    let frames =
        std::iter::repeat_n(chunk, chunks).map(|bytes| Ok::<_, Infallible>(Frame::data(bytes)));
    let body = BoxBody::new(StreamBody::new(futures_util::stream::iter(frames)));
    let client: Client<_, BoxBody<Bytes, Infallible>> =
        Client::builder(TokioExecutor::new()).build_http();
    let request = Request::post(h.url("/emulator/sink"))
        .header("x-api-key", DESIGN_KEY)
        .header("content-length", TOTAL)
        .body(body)
        .unwrap();

    let idle = current_rss();
    reset_peak_rss();
    let response = client.request(request).await.unwrap();
    let status = response.status();
    let answer = response.into_body().collect().await.unwrap().to_bytes();
    let peak = peak_rss();

    assert_eq!(
        status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let received: serde_json::Value = serde_json::from_slice(&answer).unwrap();
    assert_eq!(received["bytes"], TOTAL);
    assert_eq!(
        received["blake3"],
        expected.as_str(),
        "every byte, in order"
    );
    let grown = peak.saturating_sub(idle);
    eprintln!("1 GiB upload: peak RSS {} MiB over idle", grown >> 20);
    assert!(grown < 64 << 20, "peak RSS grew by {} MiB", grown >> 20);
    h.stop().await;
}
