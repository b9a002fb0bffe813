//! A 1 GiB download passes through intact within 64 MiB of idle RSS, and a
//! slow reader gets backpressure instead of the gateway buffering (issue #3).
//! Its own binary: the process's peak RSS is this test's alone.

mod common;

use std::time::Duration;

use common::*;
use http_body_util::BodyExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1_gib_download_is_intact_and_a_slow_reader_gets_backpressure() {
    let h = Harness::start().await;

    // A slow reader: take 4 MiB of a 512 MiB answer, then stop reading.
    let mut slow = h.start_download(DESIGN_KEY, 512 << 20, false).await;
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
    let mut body = h.start_download(DESIGN_KEY, 1 << 30, false).await;
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
