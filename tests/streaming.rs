//! Bodies stream through the gateway; nothing buffers them whole.
//! Alone in its own test binary so the process's peak RSS is this test's.

mod common;

use bytes::Bytes;
use common::*;
use http::StatusCode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100_mb_upload_streams_through_with_bounded_memory() {
    const TOTAL: u64 = 100 * 1024 * 1024;
    const CHUNK: usize = 64 * 1024;
    // Above the default body cap (64 MiB, room for Comfy's 50 MB uploads).
    let h = Harness::start_with_server("max_request_body = \"1GiB\"").await;

    let boundary = "teamgate-test-boundary";
    let head = Bytes::from(format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"tags\"\r\n\r\ninput\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n"
    ));
    let tail = Bytes::from(format!("\r\n--{boundary}--\r\n"));
    // One chunk, shared: the test itself holds 64 KiB, whatever the total.
    let chunk = Bytes::from(vec![0x5au8; CHUNK]);
    let chunks = (TOTAL / CHUNK as u64) as usize;
    let chunks = std::iter::once(head.clone())
        .chain(std::iter::repeat_n(chunk, chunks))
        .chain(std::iter::once(tail.clone()));
    let length = head.len() as u64 + TOTAL + tail.len() as u64;
    let headers = [
        (
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        ),
        ("content-length", length.to_string()),
    ];
    let (answer, grown) = post_streamed(&h, "/api/assets", &headers, chunks).await;

    assert_eq!(
        answer.status,
        StatusCode::CREATED,
        "{}",
        String::from_utf8_lossy(&answer.body)
    );
    let asset = answer.json();
    assert_eq!(asset["size"], TOTAL, "every byte arrived upstream");
    eprintln!("peak RSS growth during the upload: {} KiB", grown / 1024);
    // Gateway + emulator + client in one process: far below the 100 MiB body.
    assert!(
        grown < 24 * 1024 * 1024,
        "peak RSS grew by {} MiB",
        grown / (1024 * 1024)
    );
    h.stop().await;
}
