//! A 1 GiB upload passes through intact, and the gateway's peak RSS stays
//! within 64 MiB of idle (issue #3). Its own binary: the process's peak RSS
//! is this test's alone. Gateway, emulator and client share the process, so
//! the bound covers all three.

mod common;

use bytes::Bytes;
use common::*;
use http::StatusCode;

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

    let headers = [("content-length", TOTAL.to_string())];
    let (answer, grown) = post_streamed(
        &h,
        "/emulator/sink",
        &headers,
        std::iter::repeat_n(chunk, chunks),
    )
    .await;

    assert_eq!(
        answer.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let received = answer.json();
    assert_eq!(received["bytes"], TOTAL);
    assert_eq!(
        received["blake3"],
        expected.as_str(),
        "every byte, in order"
    );
    eprintln!("1 GiB upload: peak RSS {} MiB over idle", grown >> 20);
    assert!(grown < 64 << 20, "peak RSS grew by {} MiB", grown >> 20);
    h.stop().await;
}
