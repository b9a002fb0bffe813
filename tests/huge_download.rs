//! A 1 GiB download passes through intact within 64 MiB of idle RSS, and a
//! slow reader gets backpressure instead of the gateway buffering (issue #3).
//! Its own binary: the process's peak RSS is this test's alone.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};

async fn download(h: &Harness, size: u64) -> hyper::body::Incoming {
    let request = Request::get(h.url(&format!("/emulator/bytes/{size}")))
        .header("x-api-key", DESIGN_KEY)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = h.client.request(request).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-length"],
        size.to_string().as_str()
    );
    response.into_body()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_gib_download_is_intact_and_a_slow_reader_gets_backpressure() {
    let h = Harness::start().await;

    // A slow reader: take 4 MiB of a 512 MiB answer, then stop reading.
    let mut slow = download(&h, 512 << 20).await;
    let mut read = 0usize;
    while read < 4 << 20 {
        read += slow
            .frame()
            .await
            .unwrap()
            .unwrap()
            .into_data()
            .unwrap()
            .len();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let produced = h.emulator.bytes_streamed();
    eprintln!(
        "slow reader: read {} MiB, upstream produced {} MiB",
        read >> 20,
        produced >> 20
    );
    assert!(
        produced < 64 << 20,
        "the gateway kept pulling from upstream: {} MiB",
        produced >> 20
    );
    drop(slow);

    // The full 1 GiB, at full speed.
    let idle = current_rss();
    reset_peak_rss();
    let mut body = download(&h, 1 << 30).await;
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        let data = frame.unwrap().into_data().unwrap();
        assert!(data.iter().all(|&byte| byte == 0xa5), "intact");
        total += data.len() as u64;
    }
    let peak = peak_rss();
    assert_eq!(total, 1 << 30);
    let grown = peak.saturating_sub(idle);
    eprintln!("1 GiB download: peak RSS {} MiB over idle", grown >> 20);
    assert!(grown < 64 << 20, "peak RSS grew by {} MiB", grown >> 20);
    h.stop().await;
}
