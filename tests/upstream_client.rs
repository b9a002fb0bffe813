//! The upstream HTTP/1.1 client, seen from outside: keep-alive reuse, the
//! retry of a stale pooled connection, the answer framings of RFC 9112 §6,
//! and an upstream that answers before the upload has ended.
//!
//! The upstream here is a scripted TCP server rather than the emulator, so a
//! test can say exactly which bytes arrive and when the connection closes.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use http::{Method, StatusCode};
use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A request as the scripted upstream received it.
#[derive(Debug, Clone)]
struct Seen {
    /// Which connection (0, 1, …, in accept order) and which request on it.
    connection: usize,
    on_connection: usize,
    method: String,
    target: String,
    body: Vec<u8>,
}

/// What the scripted upstream does with a request.
enum Reply {
    /// Write these bytes, keep the connection.
    Send(Vec<u8>),
    /// Write these bytes, then close.
    SendAndClose(Vec<u8>),
    /// Close without a byte of answer.
    Close,
    /// Answer as soon as the head is in, before reading the body, then read
    /// and discard until the gateway closes (a lingering close).
    AnswerEarly(Vec<u8>),
}

fn ok(body: &str) -> Reply {
    Reply::Send(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

type Script = dyn Fn(&Seen) -> Reply + Send + Sync;

struct Upstream {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    /// Connections the upstream has closed on its side.
    closed: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    async fn start(script: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Self {
        Self::start_with(None, script).await
    }

    /// The same, over TLS with `pair` as the server certificate.
    async fn start_tls(
        pair: &rcgen::CertifiedKey<rcgen::KeyPair>,
        script: impl Fn(&Seen) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(pair.signing_key.serialize_der().into());
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![pair.cert.der().clone()], key)
        .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Self::start_with(
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
            script,
        )
        .await
    }

    async fn start_with(
        tls: Option<tokio_rustls::TlsAcceptor>,
        script: impl Fn(&Seen) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let script: Arc<Script> = Arc::new(script);
        {
            let connections = Arc::clone(&connections);
            let closed = Arc::clone(&closed);
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let connection = connections.fetch_add(1, Ordering::SeqCst);
                    let (script, seen, tls) = (Arc::clone(&script), Arc::clone(&seen), tls.clone());
                    let closed = Arc::clone(&closed);
                    tokio::spawn(async move {
                        match tls {
                            None => serve(stream, connection, script, seen).await,
                            Some(acceptor) => {
                                if let Ok(stream) = acceptor.accept(stream).await {
                                    serve(stream, connection, script, seen).await;
                                }
                            }
                        }
                        // `serve` owned the stream: it is closed by now.
                        closed.fetch_add(1, Ordering::SeqCst);
                    });
                }
            });
        }
        Upstream {
            addr,
            connections,
            closed,
            seen,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    async fn gateway(&self) -> Harness {
        self.gateway_with("").await
    }

    /// A gateway in front of this upstream, with extra `[upstreams.comfy]` settings.
    async fn gateway_with(&self, upstream_extra: &str) -> Harness {
        let emulator = teamgate::emulator::Emulator::new(accounts());
        let base_url = format!("http://{}", self.addr);
        Harness::start_in_front_of(emulator, self.addr, &base_url, upstream_extra).await
    }
}

async fn serve(
    mut stream: impl AsyncRead + AsyncWrite + Unpin,
    connection: usize,
    script: Arc<Script>,
    seen: Arc<Mutex<Vec<Seen>>>,
) {
    let mut buffer = Vec::new();
    for on_connection in 0.. {
        let Some(head_end) = read_until(&mut stream, &mut buffer, b"\r\n\r\n").await else {
            return;
        };
        let head: Vec<u8> = buffer.drain(..head_end).collect();
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut request = httparse::Request::new(&mut headers);
        request.parse(&head).unwrap();
        let length: usize = request
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .map_or(0, |h| {
                std::str::from_utf8(h.value).unwrap().parse().unwrap()
            });
        let mut seen_request = Seen {
            connection,
            on_connection,
            method: request.method.unwrap().to_owned(),
            target: request.path.unwrap().to_owned(),
            body: Vec::new(),
        };
        if let Reply::AnswerEarly(bytes) = script(&seen_request) {
            seen.lock().unwrap().push(seen_request);
            stream.write_all(&bytes).await.unwrap();
            let mut sink = [0u8; 16 * 1024];
            while stream.read(&mut sink).await.is_ok_and(|n| n > 0) {}
            return;
        }
        while buffer.len() < length {
            let mut chunk = [0u8; 16 * 1024];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            }
        }
        seen_request.body = buffer.drain(..length).collect();
        let reply = script(&seen_request);
        seen.lock().unwrap().push(seen_request);
        match reply {
            Reply::Send(bytes) => stream.write_all(&bytes).await.unwrap(),
            Reply::SendAndClose(bytes) => {
                stream.write_all(&bytes).await.unwrap();
                return;
            }
            Reply::Close | Reply::AnswerEarly(_) => return,
        }
    }
}

/// Reads until `buffer` holds `marker`; returns the index just past it, or
/// `None` if the peer closed first.
async fn read_until(
    stream: &mut (impl AsyncRead + Unpin),
    buffer: &mut Vec<u8>,
    marker: &[u8],
) -> Option<usize> {
    loop {
        if let Some(at) = buffer
            .windows(marker.len())
            .position(|window| window == marker)
        {
            return Some(at + marker.len());
        }
        let mut chunk = [0u8; 16 * 1024];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A counter of the comfy upstream from the gateway's `/metrics`.
async fn upstream_counter(h: &Harness, name: &str) -> u64 {
    let text = h.metrics_text().await;
    let prefix = format!("{name}{{upstream=\"comfy\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map_or(0, |value| value.parse().unwrap())
}

/// A job submission: a POST with a JSON body, never safe to send twice.
async fn post_prompt(h: &Harness) -> Answer {
    h.call(
        Method::POST,
        "/api/prompt",
        Some(DESIGN_KEY),
        Some(json!({"prompt": {}})),
    )
    .await
}

#[tokio::test]
async fn keep_alive_connections_are_reused_and_connection_close_is_honoured() {
    let upstream = Upstream::start(|seen| {
        if seen.target.contains("close") {
            Reply::Send(
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\nbye".to_vec(),
            )
        } else {
            ok("{\"jobs\":[]}")
        }
    })
    .await;
    let h = upstream.gateway().await;
    for _ in 0..5 {
        let answer = h.get("/api/jobs", DESIGN_KEY).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.body, "{\"jobs\":[]}");
    }
    assert_eq!(
        upstream.connections(),
        1,
        "one keep-alive connection for five requests"
    );
    assert_eq!(
        upstream_counter(&h, "teamgate_upstream_connections_opened_total").await,
        1
    );

    assert_eq!(h.get("/api/jobs?close=1", DESIGN_KEY).await.body, "bye");
    assert_eq!(h.get("/api/jobs", DESIGN_KEY).await.status, StatusCode::OK);
    assert_eq!(
        upstream.connections(),
        2,
        "an answer with `Connection: close` ends its connection"
    );
    h.stop().await;
}

#[tokio::test]
async fn a_pooled_connection_closed_unanswered_is_retried_for_a_get_but_not_for_a_post() {
    // The second request on the first connection, and any POST that is not
    // the first request on its connection, meet a close without an answer —
    // what a keep-alive timeout racing a request looks like from here.
    let upstream =
        Upstream::start(
            |seen| match (seen.connection, seen.on_connection, seen.method.as_str()) {
                (0, 1, _) => Reply::Close,
                (_, n, "POST") if n > 0 => Reply::Close,
                _ => ok("{\"jobs\":[]}"),
            },
        )
        .await;
    let h = upstream.gateway().await;
    assert_eq!(h.get("/api/jobs", DESIGN_KEY).await.status, StatusCode::OK);
    let retried = h.get("/api/jobs", DESIGN_KEY).await;
    assert_eq!(
        retried.status,
        StatusCode::OK,
        "the GET went again, on a new connection"
    );
    assert_eq!(upstream.connections(), 2);
    assert_eq!(upstream.seen().len(), 3);
    assert_eq!(
        upstream_counter(&h, "teamgate_upstream_retries_total").await,
        1
    );

    // A POST may have been acted on: it is never sent twice.
    let post = post_prompt(&h).await;
    assert_eq!(post.status, StatusCode::BAD_GATEWAY);
    assert_eq!(post.json()["code"], "bad_gateway");
    let posts: Vec<Seen> = upstream
        .seen()
        .into_iter()
        .filter(|seen| seen.method == "POST")
        .collect();
    assert_eq!(posts.len(), 1, "{posts:?}");
    assert_eq!(posts[0].body, br#"{"prompt":{}}"#);
    assert_eq!(
        upstream.connections(),
        2,
        "and no new connection was opened for it"
    );
    h.stop().await;
}

#[tokio::test]
async fn chunked_close_delimited_and_interim_answers_reach_the_client_intact() {
    let upstream = Upstream::start(|seen| match seen.target.split_once('?').map(|(_, query)| query) {
        Some("chunked") => Reply::Send(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n\
              5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n"
                .to_vec(),
        ),
        Some("until-close") => {
            Reply::SendAndClose(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nread until the close".to_vec())
        }
        Some("interim") => Reply::Send(
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
        ),
        _ => ok("plain"),
    })
    .await;
    let h = upstream.gateway().await;
    let chunked = h.get("/api/jobs?chunked", DESIGN_KEY).await;
    assert_eq!(chunked.status, StatusCode::OK);
    assert_eq!(chunked.body, "hello, world");
    let interim = h.get("/api/jobs?interim", DESIGN_KEY).await;
    assert_eq!(interim.status, StatusCode::OK);
    assert_eq!(interim.body, "ok");
    assert_eq!(
        upstream.connections(),
        1,
        "both bodies were read to their end, so the connection was reused"
    );
    let until_close = h.get("/api/jobs?until-close", DESIGN_KEY).await;
    assert_eq!(until_close.body, "read until the close");
    assert_eq!(h.get("/api/jobs", DESIGN_KEY).await.body, "plain");
    assert_eq!(
        upstream.connections(),
        2,
        "a close-delimited body ends its connection"
    );
    h.stop().await;
}

#[tokio::test]
async fn an_upstream_that_answers_before_the_upload_ends_is_heard() {
    let refusal = r#"{"error":{"type":"too_large","message":"no"}}"#;
    let upstream = {
        let answer = format!(
            "HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{refusal}",
            refusal.len()
        );
        Upstream::start(move |_| Reply::AnswerEarly(answer.clone().into_bytes())).await
    };
    let h = upstream.gateway().await;
    // The client announces 1 MB and sends 16 bytes of it, then waits.
    let mut client = TcpStream::connect(h.gateway).await.unwrap();
    let head = format!(
        "POST /api/upload/image HTTP/1.1\r\nHost: gateway\r\nX-API-Key: {DESIGN_KEY}\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: 1000000\r\n\r\n0123456789abcdef"
    );
    client.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    // Bounded: a gateway that waited for the rest of the upload would never
    // answer, and this must fail rather than hang.
    let head_end = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        read_until(&mut client, &mut answer, b"\r\n\r\n"),
    )
    .await
    .expect("the answer came while the upload was still unfinished")
    .expect("an answer");
    let text = String::from_utf8_lossy(&answer[..head_end]).into_owned();
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");
    while answer.len() < head_end + refusal.len() {
        let mut chunk = [0u8; 4096];
        let n = client.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the body arrives before the close");
        answer.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(
        &answer[head_end..head_end + refusal.len()],
        refusal.as_bytes()
    );
    assert_eq!(upstream.seen().len(), 1);
    // The gateway keeps serving.
    drop(client);
    h.stop().await;
}

#[tokio::test]
async fn https_upstreams_are_verified_against_the_configured_roots() {
    let pair = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
    let upstream = Upstream::start_tls(&pair, |_| ok("over tls")).await;
    let dir = std::env::temp_dir().join(format!("teamgate-upstream-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = dir.join("upstream-ca.pem");
    std::fs::write(&ca_file, pair.cert.pem()).unwrap();
    let base_url = format!("https://{}", upstream.addr);

    let trusting = Harness::start_in_front_of(
        teamgate::emulator::Emulator::new(accounts()),
        upstream.addr,
        &base_url,
        &format!("ca_file = {:?}", ca_file.display().to_string()),
    )
    .await;
    for _ in 0..3 {
        let answer = trusting.get("/api/jobs", DESIGN_KEY).await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_eq!(answer.body, "over tls");
    }
    assert_eq!(upstream.connections(), 1, "TLS connections are pooled too");
    assert_eq!(upstream.seen().len(), 3);
    trusting.stop().await;

    // Without `ca_file` only the public web roots count: the handshake fails,
    // the request never reaches the upstream, and the client gets a 502.
    let public_roots = Harness::start_in_front_of(
        teamgate::emulator::Emulator::new(accounts()),
        upstream.addr,
        &base_url,
        "",
    )
    .await;
    let refused = public_roots.get("/api/jobs", DESIGN_KEY).await;
    assert_eq!(refused.status, StatusCode::BAD_GATEWAY);
    assert_eq!(refused.json()["code"], "bad_gateway");
    assert_eq!(
        upstream.seen().len(),
        3,
        "nothing was sent over an unverified connection"
    );
    public_roots.stop().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn a_connection_the_upstream_closed_while_idle_is_not_used_for_a_post() {
    // Every answer looks keep-alive, but the upstream closes right after it,
    // as one whose idle timeout is shorter than the gateway's does.
    let upstream = Upstream::start(|_| {
        Reply::SendAndClose(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}".to_vec())
    })
    .await;
    let h = upstream.gateway().await;
    assert_eq!(h.get("/api/jobs", DESIGN_KEY).await.status, StatusCode::OK);
    eventually("the upstream closed its side", async || {
        upstream.closed.load(Ordering::SeqCst) == 1
    })
    .await;
    // Not retryable, so it must not be written into the closed connection.
    let post = post_prompt(&h).await;
    assert_eq!(
        post.status,
        StatusCode::OK,
        "{:?}",
        String::from_utf8_lossy(&post.body)
    );
    assert_eq!(upstream.connections(), 2);
    let posts = upstream
        .seen()
        .into_iter()
        .filter(|seen| seen.method == "POST")
        .count();
    assert_eq!(posts, 1);
    h.stop().await;
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_pool_idle_timeout() {
    let upstream = Upstream::start(|_| ok("{}")).await;
    let h = upstream
        .gateway_with(r#"pool_idle_timeout = "100ms""#)
        .await;
    assert_eq!(h.get("/api/jobs", DESIGN_KEY).await.status, StatusCode::OK);
    // No more traffic: the pool's sweeper closes the connection on its own,
    // and the upstream sees the close.
    eventually("the idle connection was closed", async || {
        upstream.closed.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(h.get("/api/jobs", DESIGN_KEY).await.status, StatusCode::OK);
    assert_eq!(
        upstream.connections(),
        2,
        "the next request opened a new one"
    );
    h.stop().await;
}
