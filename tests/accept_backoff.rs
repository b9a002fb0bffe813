//! Out of file descriptors, every listener (the gateway's, the admin
//! port's, the built-in emulator's) says so and retries no sooner than 50 ms
//! later instead of spinning on `accept`, and takes the waiting connections
//! once descriptors are free again. Its own binary: it lowers the process's descriptor limit and
//! captures every log line.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::log_capture::LogCapture;
use common::*;
use rustix::process::{Resource, getrlimit, setrlimit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// When each `accept failed` line was written, by listener.
fn accept_failures(capture: &LogCapture) -> HashMap<String, Vec<Instant>> {
    let mut by_listener: HashMap<String, Vec<Instant>> = HashMap::new();
    for (at, line) in capture.lines() {
        let Ok(line) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if line["fields"]["message"] == "accept failed" {
            let listener = line["fields"]["listener"].as_str().unwrap_or("?");
            by_listener.entry(listener.to_owned()).or_default().push(at);
        }
    }
    by_listener
}

/// Sends one request on `stream` (already connected) and returns the
/// answer's status line.
async fn status_line(mut stream: TcpStream, request: &str) -> String {
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer);
    answer.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_listeners_back_off_and_recover() {
    let capture = LogCapture::default();
    tracing_subscriber::fmt()
        .json()
        .with_env_filter("warn,teamgate::emulator=off")
        .with_writer(capture.clone())
        .init();
    let h = Harness::start().await;

    // The sockets the test connects with exist before the limit drops:
    // `connect` takes no new descriptor, `accept` on the other side does.
    let to_gateway = TcpSocket::new_v4().unwrap();
    let to_admin = TcpSocket::new_v4().unwrap();
    let to_emulator = TcpSocket::new_v4().unwrap();
    let limit = getrlimit(Resource::Nofile);
    // The lowest free descriptor number: every one below it is taken, so
    // with the soft limit there no new descriptor can be opened.
    let lowest_free = {
        use std::os::fd::AsRawFd;
        let probe = std::fs::File::open("/dev/null").unwrap();
        u64::try_from(probe.as_raw_fd()).unwrap()
    };
    setrlimit(
        Resource::Nofile,
        rustix::process::Rlimit {
            current: Some(lowest_free),
            maximum: limit.maximum,
        },
    )
    .unwrap();
    let connected = async {
        let to_gateway = to_gateway.connect(h.gateway).await;
        let to_admin = to_admin.connect(h.admin).await;
        let to_emulator = to_emulator.connect(h.emulator_addr).await;
        (to_gateway, to_admin, to_emulator)
    }
    .await;

    // Bounded: `eventually` gives up after ~10 s; three failures per
    // listener take ~100 ms when it backs off.
    eventually("three failed accepts on each listener", async || {
        let failures = accept_failures(&capture);
        ["gateway", "admin", "emulator"]
            .iter()
            .all(|listener| failures.get(*listener).is_some_and(|at| at.len() >= 3))
    })
    .await;
    setrlimit(Resource::Nofile, limit).unwrap();

    // A lower bound only: a slow machine spaces the retries further apart,
    // never closer.
    for (listener, at) in accept_failures(&capture) {
        for pair in at.windows(2) {
            let gap = pair[1] - pair[0];
            assert!(
                gap >= Duration::from_millis(45),
                "{listener}: failed accepts {gap:?} apart; a listener must back off, not spin"
            );
        }
    }

    // Nothing was lost: each waiting connection is taken and answered.
    let (to_gateway, to_admin, to_emulator) = connected;
    let admin: SocketAddr = h.admin;
    assert_eq!(
        status_line(
            to_admin.unwrap(),
            &format!("GET /healthz HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n")
        )
        .await,
        "HTTP/1.1 200 OK"
    );
    assert_eq!(
        status_line(
            to_gateway.unwrap(),
            &format!(
                "GET /api/assets HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {DESIGN_KEY}\r\nConnection: close\r\n\r\n",
                h.gateway
            )
        )
        .await,
        "HTTP/1.1 200 OK"
    );
    assert_eq!(
        status_line(
            to_emulator.unwrap(),
            &format!(
                "GET /api/assets HTTP/1.1\r\nHost: {}\r\nX-API-Key: {DESIGN_UPSTREAM_KEY}\r\nConnection: close\r\n\r\n",
                h.emulator_addr
            )
        )
        .await,
        "HTTP/1.1 200 OK"
    );
    h.stop().await;
}
