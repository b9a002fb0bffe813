//! The upstream HTTP/1.1 client: a keep-alive pool per upstream, and an
//! exchange that runs inside the task serving the client.
//!
//! Why not hyper's client: it drives every upstream connection from a task of
//! its own, so each proxied request crossed tasks four times (dispatch
//! channel, connection task, answer oneshot, body channel). Here the request
//! is written, the answer head read and the answer body streamed by whoever
//! polls them — the client connection's task — with no channel in between,
//! the way pingora and nginx run their upstream side.
//!
//! - Framing (RFC 9112) lives in [`codec`]: the request's `Content-Length` or
//!   `chunked` is decided from the body alone, the answer's from §6.3.
//! - The request body is written while the answer is awaited, so an upstream
//!   that answers early (a 413 mid-upload) is heard, not written into a closed
//!   socket. A connection whose request body was cut short is never reused.
//! - Idle connections are kept newest first and checked on checkout: with the
//!   reactor (no syscall) for every request, with a `MSG_PEEK` too for one
//!   that cannot be retried. A reused connection that still fails before the
//!   first byte of an answer (the upstream closed it while the request was on
//!   its way) is retried once on a fresh one when nothing can have been lost:
//!   the request had no body and is idempotent, or writing it failed outright.
//! - `101 Switching Protocols` hands the raw connection, with any bytes read
//!   past the head, to the websocket tunnel.

pub mod codec;

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::stream::{FuturesUnordered, StreamExt};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body as _, Frame, SizeHint};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

pub use self::codec::ProtocolError;
use self::codec::{ChunkedDecoder, Decoded, RequestFraming, ResponseFraming, ResponseHead};
use super::watch::WatchedBody;
use crate::body::{Body, BoxError};
use crate::config::Upstream;
use crate::telemetry::metrics::UpstreamPoolCounters;
use crate::wire::RecentNames;

/// Every read has room for this much when it can be had without a new
/// allocation: an answer up to this size (head and body) that the upstream
/// sent at once is then read at once, and goes on to the client in one write
/// with its head; large downloads move in large steps. Each answer read
/// leaves the buffer that much shorter; the room comes back in place once
/// nothing read before is still held (the last answer was written out, or
/// copied into the cache). Topped up only below 4 KiB of room, one 12 KB
/// answer in eight came in two reads and went out in two writes
/// (benches/README.md, "Read space").
const READ_BUFFER: usize = 64 * 1024;
/// While earlier reads are still held (a slow client has not taken them
/// yet), a new buffer is allocated only below this much room: each buffer
/// is then mostly filled before the next, so small frames never pin a whole
/// buffer each.
const MIN_READ_SPACE: usize = 16 * 1024;
/// The largest answer head accepted (status line and headers).
const MAX_HEAD: usize = 256 * 1024;
/// Idle connections kept per upstream; beyond it the oldest are closed.
const MAX_IDLE: usize = 1024;
/// How long one connection attempt runs alone before the next address is
/// tried beside it: RFC 8305 §5 recommends 250 ms.
const CONNECTION_ATTEMPT_DELAY: Duration = Duration::from_millis(250);

/// Why an exchange with the upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting timed out")]
    ConnectTimeout,
    #[error("connect failed")]
    Connect(#[source] io::Error),
    #[error("TLS handshake failed")]
    Tls(#[source] io::Error),
    #[error("writing the request failed")]
    Write(#[source] io::Error),
    #[error("reading the answer failed")]
    Read(#[source] io::Error),
    #[error("the upstream closed the connection before answering")]
    ClosedBeforeAnswer,
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// The client's request body broke (too big, cut off, malformed).
    #[error("the request body failed")]
    RequestBody(#[source] BoxError),
}

/// The upstream side of a switched (websocket) connection, returned with its
/// `101` answer: the socket, and bytes already read past the head.
#[derive(Debug)]
pub struct UpgradedUpstream {
    pub io: Stream,
    pub read_ahead: Bytes,
}

/// One upstream's client: where to connect and its idle connections.
#[derive(Debug, Clone)]
pub struct Client {
    pool: Arc<Pool>,
}

#[derive(Debug)]
struct Pool {
    host: String,
    port: u16,
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    /// Newest last: checkout pops the warmest, expiry trims the front.
    idle: Mutex<VecDeque<IdleConn>>,
    /// Whether a task is trimming expired idle connections.
    sweeping: AtomicBool,
    counters: UpstreamPoolCounters,
}

#[derive(Debug)]
struct IdleConn {
    conn: Conn,
    since: Instant,
}

/// A connection to the upstream and what has been read from it but not used yet.
#[derive(Debug)]
struct Conn {
    io: Stream,
    read_buf: BytesMut,
    /// The field names of this connection's last answer.
    recent_names: RecentNames,
    reused: bool,
}

/// A TCP connection, in the clear or under TLS.
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Client {
    /// `tls` is used when the upstream's scheme is https.
    pub fn new(
        upstream: &Upstream,
        tls: &Arc<rustls::ClientConfig>,
        counters: UpstreamPoolCounters,
    ) -> Result<Self, String> {
        let authority = &upstream.authority;
        let https = upstream.scheme == http::uri::Scheme::HTTPS;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tls = if https {
            let name = ServerName::try_from(host.clone())
                .map_err(|error| format!("{host} is not a TLS server name: {error}"))?;
            Some((Arc::clone(tls), name))
        } else {
            None
        };
        Ok(Client {
            pool: Arc::new(Pool {
                host,
                port,
                tls,
                connect_timeout: upstream.timeouts.connect,
                idle_timeout: upstream.timeouts.pool_idle,
                idle: Mutex::new(VecDeque::new()),
                sweeping: AtomicBool::new(false),
                counters,
            }),
        })
    }

    /// Sends `request` (origin-form target from its URI, headers as given) and
    /// returns the answer once its head has arrived; the body streams from the
    /// connection as it is polled. `upgrade`: a `101` answer may come, and
    /// its connection is handed over with it as an [`UpgradedUpstream`].
    pub async fn send(
        &self,
        request: Request<WatchedBody>,
        upgrade: bool,
    ) -> Result<(Response<Body>, Option<UpgradedUpstream>), ClientError> {
        let (parts, body) = request.into_parts();
        let framing = RequestFraming::for_body(
            http_body::Body::is_end_stream(&body),
            http_body::Body::size_hint(&body).exact(),
        );
        let mut head = BytesMut::new();
        codec::encode_head(&parts, framing, &mut head);
        let head = head.freeze();
        // A body known to be empty is never polled; dropping it reports it sent.
        let mut body = (framing != RequestFraming::Empty).then_some(body);
        let replayable = body.is_none() && is_idempotent(&parts.method);

        // A request that cannot be sent again must not meet a connection the
        // upstream has already closed.
        let mut conn = match self.pool.checkout(!replayable) {
            Some(conn) => conn,
            None => self.pool.connect().await?,
        };
        let answered = loop {
            let reused = conn.reused;
            // Awaited in place, not from a local: a local would take room in
            // this future beside the awaited copy.
            let exchange = Exchange {
                conn: Some(conn),
                out: VecDeque::from([head.clone()]),
                body: body.take(),
                framing,
                sent: 0,
                flushed: false,
                write_failed: None,
                wrote_any: false,
                answer_started: false,
            }
            .await;
            match exchange {
                Ok(answered) => break answered,
                Err(failed) => {
                    let retry = reused
                        && !failed.answer_started
                        && (replayable || failed.nothing_sent)
                        && matches!(
                            failed.error,
                            ClientError::Write(_)
                                | ClientError::Read(_)
                                | ClientError::ClosedBeforeAnswer
                        );
                    if !retry {
                        return Err(failed.error);
                    }
                    tracing::debug!(error = %failed.error, "pooled upstream connection was stale; retrying on a new one");
                    self.pool.counters.retried.inc();
                    body = failed.body;
                    conn = self.pool.connect().await?;
                }
            }
        };
        self.answer(answered, &parts.method, upgrade)
    }

    fn answer(
        &self,
        answered: Answered,
        method: &Method,
        upgrade: bool,
    ) -> Result<(Response<Body>, Option<UpgradedUpstream>), ClientError> {
        let Answered {
            mut conn,
            head,
            request_complete,
        } = answered;
        let ResponseHead {
            status,
            version,
            mut headers,
        } = head;
        let mut response = Response::new(Body::Empty);
        *response.status_mut() = status;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            if !upgrade {
                return Err(
                    ProtocolError("101 answer to a request that asked for no upgrade").into(),
                );
            }
            let upgraded = UpgradedUpstream {
                read_ahead: conn.read_buf.split().freeze(),
                io: conn.io,
            };
            *response.headers_mut() = headers;
            return Ok((response, Some(upgraded)));
        }
        let framing = codec::response_framing(method, status, &mut headers)?;
        let reusable = request_complete
            && codec::keeps_alive(version, &headers)
            && framing != ResponseFraming::UntilClose;
        *response.headers_mut() = headers;
        let body = match framing {
            ResponseFraming::Empty => {
                self.pool.release(conn, reusable);
                Body::Empty
            }
            // The usual case: the whole body came with the head.
            ResponseFraming::Length(length) if conn.read_buf.len() as u64 >= length => {
                let bytes = conn.read_buf.split_to(length as usize).freeze();
                self.pool.release(conn, reusable);
                Body::full(bytes)
            }
            ResponseFraming::Length(length) => Body::Upstream(ResponseBody::boxed(
                conn,
                BodyState::Length(length),
                reusable,
                &self.pool,
            )),
            ResponseFraming::Chunked => Body::Upstream(ResponseBody::boxed(
                conn,
                BodyState::Chunked(ChunkedDecoder::Size),
                reusable,
                &self.pool,
            )),
            ResponseFraming::UntilClose => Body::Upstream(ResponseBody::boxed(
                conn,
                BodyState::UntilClose,
                false,
                &self.pool,
            )),
        };
        *response.body_mut() = body;
        Ok((response, None))
    }
}

/// Happy Eyeballs (RFC 8305 §5): the addresses in turn, address families
/// alternating, each attempt running alone for `attempt_delay` (or until it
/// fails) before the next one starts beside it; the first to connect wins
/// and the rest are dropped. A host whose first address blackholes (a broken
/// IPv6 route, a dead A record) costs one delay per new connection, not the
/// whole connect timeout.
async fn connect_first(addrs: Vec<SocketAddr>, attempt_delay: Duration) -> io::Result<TcpStream> {
    let mut waiting = interleave_families(addrs).into_iter();
    let mut attempts = FuturesUnordered::new();
    let mut last_error = None;
    loop {
        if let Some(addr) = waiting.next() {
            attempts.push(TcpStream::connect(addr));
        }
        if attempts.is_empty() {
            return Err(last_error.unwrap_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, "the host resolved to no address")
            }));
        }
        let another_waits = waiting.len() > 0;
        let head_start = tokio::time::sleep(attempt_delay);
        tokio::pin!(head_start);
        loop {
            tokio::select! {
                finished = attempts.next() => match finished {
                    Some(Ok(stream)) => return Ok(stream),
                    Some(Err(error)) => {
                        last_error = Some(error);
                        // A failure starts the next address at once.
                        if another_waits || attempts.is_empty() {
                            break;
                        }
                    }
                    None => break,
                },
                () = &mut head_start, if another_waits => break,
            }
        }
    }
}

/// RFC 8305 §4: the first address's family first, then the other, alternating.
fn interleave_families(addrs: Vec<SocketAddr>) -> Vec<SocketAddr> {
    let Some(first_is_v6) = addrs.first().map(SocketAddr::is_ipv6) else {
        return addrs;
    };
    let (preferred, other): (Vec<_>, Vec<_>) = addrs
        .into_iter()
        .partition(|addr| addr.is_ipv6() == first_is_v6);
    let mut interleaved = Vec::with_capacity(preferred.len() + other.len());
    let (mut preferred, mut other) = (preferred.into_iter(), other.into_iter());
    loop {
        match (preferred.next(), other.next()) {
            (None, None) => return interleaved,
            (first, second) => interleaved.extend(first.into_iter().chain(second)),
        }
    }
}

/// Requests that may be sent twice without a different outcome (RFC 9110 §9.2.2).
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

impl Pool {
    /// A new connection, TLS included when the upstream is https.
    ///
    /// Boxed: connecting (resolver, Happy Eyeballs, TLS handshake) was about
    /// half of `send`'s 2.4 KB of state, yet a warm pool almost never runs
    /// it; inline, every request's future would carry, and copy, room for it.
    fn connect(&self) -> Pin<Box<dyn Future<Output = Result<Conn, ClientError>> + Send + '_>> {
        Box::pin(async move {
            let connecting = async {
                let addrs = tokio::net::lookup_host((self.host.as_str(), self.port))
                    .await
                    .map_err(ClientError::Connect)?;
                let tcp = connect_first(addrs.collect(), CONNECTION_ATTEMPT_DELAY)
                    .await
                    .map_err(ClientError::Connect)?;
                // Heads and small bodies go out at once; writes are already batched.
                tcp.set_nodelay(true).map_err(ClientError::Connect)?;
                match &self.tls {
                    None => Ok(Stream::Plain(tcp)),
                    Some((config, name)) => TlsConnector::from(Arc::clone(config))
                        .connect(name.clone(), tcp)
                        .await
                        .map(|tls| Stream::Tls(Box::new(tls)))
                        .map_err(ClientError::Tls),
                }
            };
            let io = tokio::time::timeout(self.connect_timeout, connecting)
                .await
                .map_err(|_| ClientError::ConnectTimeout)??;
            self.counters.opened.inc();
            Ok(Conn {
                io,
                read_buf: BytesMut::new(),
                recent_names: RecentNames::default(),
                reused: false,
            })
        })
    }

    /// The newest idle connection that is neither expired nor closed;
    /// `thorough` checks each candidate with the socket, not just the reactor.
    fn checkout(&self, thorough: bool) -> Option<Conn> {
        let now = Instant::now();
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        while let Some(entry) = idle.pop_back() {
            if self.expired(&entry, now) {
                // Everything below is older still.
                idle.clear();
                return None;
            }
            if entry.conn.io.is_clean(thorough) {
                let mut conn = entry.conn;
                conn.reused = true;
                return Some(conn);
            }
        }
        None
    }

    /// An idle connection unused for `idle_timeout` is closed, never reused.
    fn expired(&self, entry: &IdleConn, now: Instant) -> bool {
        now.duration_since(entry.since) >= self.idle_timeout
    }

    /// Closes the expired idle connections (the oldest are in front).
    fn close_expired(&self, idle: &mut VecDeque<IdleConn>, now: Instant) {
        while idle.front().is_some_and(|entry| self.expired(entry, now)) {
            idle.pop_front();
        }
    }

    /// Returns a connection whose exchange is complete to the pool, or closes it.
    fn release(self: &Arc<Self>, conn: Conn, reusable: bool) {
        // Bytes past the end of the answer mean the upstream and we disagree on framing.
        if !reusable || !conn.read_buf.is_empty() || self.idle_timeout.is_zero() {
            return;
        }
        let now = Instant::now();
        let mut idle = self
            .idle
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        self.close_expired(&mut idle, now);
        if idle.len() >= MAX_IDLE {
            idle.pop_front();
        }
        idle.push_back(IdleConn { conn, since: now });
        // Under the lock, like the sweeper's decision to stop: a sweeper that
        // found the pool empty cannot miss this connection.
        let start_sweeper = !self.sweeping.swap(true, Ordering::AcqRel);
        drop(idle);
        if start_sweeper {
            tokio::spawn(sweep(Arc::downgrade(self)));
        }
    }
}

/// Closes expired idle connections while there are any, so an upstream's
/// connections do not linger past `pool_idle` when traffic stops.
async fn sweep(pool: Weak<Pool>) {
    loop {
        let Some(interval) = pool.upgrade().map(|pool| pool.idle_timeout) else {
            return;
        };
        tokio::time::sleep(interval).await;
        let Some(pool) = pool.upgrade() else {
            return;
        };
        let mut idle = pool
            .idle
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        pool.close_expired(&mut idle, Instant::now());
        if idle.is_empty() {
            pool.sweeping.store(false, Ordering::Release);
            return;
        }
    }
}

impl Conn {
    /// Reads what is available into the buffer; `Ok(0)` at end of stream.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if !self.read_buf.try_reclaim(READ_BUFFER)
            && self.read_buf.capacity() - self.read_buf.len() < MIN_READ_SPACE
        {
            self.read_buf.reserve(READ_BUFFER);
        }
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.read_buf)
    }
}

impl Stream {
    /// No close and no stray byte seen since the last answer was read.
    ///
    /// First asks the reactor, which costs nothing: tokio clears read
    /// readiness when a read drains the socket, so readiness here means the
    /// upstream sent something unasked — most often its FIN (or TLS
    /// close_notify) after an idle timeout. The reactor only knows what it has
    /// polled, though; for a request that cannot be retried (`thorough`) the
    /// socket itself is asked as well, with one non-blocking `MSG_PEEK`.
    fn is_clean(&self, thorough: bool) -> bool {
        let tcp = match self {
            Stream::Plain(tcp) => tcp,
            Stream::Tls(tls) => tls.get_ref().0,
        };
        let mut cx = Context::from_waker(std::task::Waker::noop());
        if tcp.poll_read_ready(&mut cx).is_ready() {
            return false;
        }
        if !thorough {
            return true;
        }
        let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
        matches!(
            socket2::SockRef::from(tcp).peek(&mut byte),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock
        )
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_read(cx, buf),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_write(cx, data),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, data),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        slices: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_write_vectored(cx, slices),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_write_vectored(cx, slices),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(tcp) => tcp.is_write_vectored(),
            Stream::Tls(tls) => tls.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_shutdown(cx),
        }
    }
}

/// One request written and its answer head read, on one connection.
struct Exchange {
    conn: Option<Conn>,
    /// Bytes queued for the socket: the head, then body chunks as they come.
    out: VecDeque<Bytes>,
    /// The request body still to send; `None` once it has ended (or if empty).
    body: Option<WatchedBody>,
    framing: RequestFraming,
    /// Body bytes sent so far, checked against a declared length.
    sent: u64,
    flushed: bool,
    /// Writing failed; the answer may still be readable (an early error reply).
    write_failed: Option<io::Error>,
    /// Some bytes of the request reached the socket. Until then the body has
    /// not been polled either (it is read only once the head is out), so the
    /// request can still go elsewhere whole.
    wrote_any: bool,
    answer_started: bool,
}

struct Answered {
    conn: Conn,
    head: ResponseHead,
    /// The request went out in full; otherwise the connection cannot be reused.
    request_complete: bool,
}

struct Failed {
    error: ClientError,
    answer_started: bool,
    /// Not a byte of the request reached the socket, so it can go elsewhere.
    nothing_sent: bool,
    /// The body, handed back for a retry if it was never polled.
    body: Option<WatchedBody>,
}

enum SendError {
    Io(io::Error),
    Body(BoxError),
}

impl Exchange {
    /// Writes queued bytes and feeds body frames into the queue until the
    /// socket or the body has to wait, or everything has been sent.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Result<(), SendError> {
        let io = &mut self.conn.as_mut().expect("polled after completion").io;
        loop {
            while !self.out.is_empty() {
                let mut slices = [IoSlice::new(&[]); 8];
                let count = self.out.len().min(slices.len());
                for (slice, bytes) in slices.iter_mut().zip(self.out.iter()) {
                    *slice = IoSlice::new(bytes);
                }
                match Pin::new(&mut *io).poll_write_vectored(cx, &slices[..count]) {
                    Poll::Ready(Ok(0)) => {
                        return Err(SendError::Io(io::ErrorKind::WriteZero.into()));
                    }
                    Poll::Ready(Ok(written)) => {
                        self.wrote_any = true;
                        codec::advance_queue(&mut self.out, written);
                    }
                    Poll::Ready(Err(error)) => return Err(SendError::Io(error)),
                    Poll::Pending => return Ok(()),
                }
                self.flushed = false;
            }
            if !self.flushed {
                // A no-op for TCP; TLS may still hold records.
                match Pin::new(&mut *io).poll_flush(cx) {
                    Poll::Ready(Ok(())) => self.flushed = true,
                    Poll::Ready(Err(error)) => return Err(SendError::Io(error)),
                    Poll::Pending => return Ok(()),
                }
            }
            let Some(body) = self.body.as_mut() else {
                return Ok(());
            };
            match Pin::new(body).poll_frame(cx) {
                Poll::Pending => return Ok(()),
                Poll::Ready(Some(Err(error))) => return Err(SendError::Body(error)),
                Poll::Ready(Some(Ok(frame))) => {
                    // Trailers are not forwarded: nothing upstream asks for them.
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if data.is_empty() {
                        continue;
                    }
                    self.sent += data.len() as u64;
                    match self.framing {
                        RequestFraming::Length(length) if self.sent > length => {
                            return Err(SendError::Body(
                                "request body longer than its length".into(),
                            ));
                        }
                        RequestFraming::Chunked => {
                            let mut scratch = [0; 18];
                            let line = crate::wire::chunk_size_line(data.len(), &mut scratch);
                            self.out.push_back(Bytes::copy_from_slice(line));
                            self.out.push_back(data);
                            self.out.push_back(Bytes::from_static(b"\r\n"));
                        }
                        _ => self.out.push_back(data),
                    }
                }
                Poll::Ready(None) => {
                    self.body = None;
                    match self.framing {
                        RequestFraming::Chunked => {
                            self.out.push_back(Bytes::from_static(b"0\r\n\r\n"));
                        }
                        RequestFraming::Length(length) if self.sent != length => {
                            return Err(SendError::Body(
                                "request body shorter than its length".into(),
                            ));
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    fn fail(&mut self, error: ClientError) -> Poll<Result<Answered, Failed>> {
        Poll::Ready(Err(Failed {
            error,
            answer_started: self.answer_started,
            nothing_sent: !self.wrote_any,
            body: if self.wrote_any {
                None
            } else {
                self.body.take()
            },
        }))
    }
}

impl Future for Exchange {
    type Output = Result<Answered, Failed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if this.write_failed.is_none() {
            match this.poll_send(cx) {
                Ok(()) => {}
                Err(SendError::Body(error)) => return this.fail(ClientError::RequestBody(error)),
                // Keep reading: an upstream that closed mid-request may have said why.
                Err(SendError::Io(error)) => this.write_failed = Some(error),
            }
        }
        loop {
            let conn = this.conn.as_mut().expect("polled after completion");
            if !conn.read_buf.is_empty() {
                match codec::parse_head(&mut conn.read_buf, &mut conn.recent_names) {
                    Err(error) => return this.fail(error.into()),
                    // 100 Continue, 103 Early Hints: the final answer follows.
                    Ok(Some(head))
                        if head.status.is_informational()
                            && head.status != StatusCode::SWITCHING_PROTOCOLS =>
                    {
                        continue;
                    }
                    Ok(Some(head)) => {
                        let request_complete = this.write_failed.is_none()
                            && this.body.is_none()
                            && this.out.is_empty();
                        return Poll::Ready(Ok(Answered {
                            conn: this.conn.take().expect("checked above"),
                            head,
                            request_complete,
                        }));
                    }
                    Ok(None) if conn.read_buf.len() > MAX_HEAD => {
                        return this.fail(ProtocolError("answer head too large").into());
                    }
                    Ok(None) => {}
                }
            }
            match ready!(conn.poll_fill(cx)) {
                Ok(0) => {
                    let error = match this.write_failed.take() {
                        Some(error) => ClientError::Write(error),
                        None if this.answer_started => {
                            ProtocolError("connection closed inside the answer head").into()
                        }
                        None => ClientError::ClosedBeforeAnswer,
                    };
                    return this.fail(error);
                }
                Ok(_) => this.answer_started = true,
                Err(error) => {
                    let error = match this.write_failed.take() {
                        Some(write) => ClientError::Write(write),
                        None => ClientError::Read(error),
                    };
                    return this.fail(error);
                }
            }
        }
    }
}

/// An answer body read from the upstream connection as it is polled; the
/// connection goes back to the pool when the body has been read to its end.
#[derive(Debug)]
pub struct ResponseBody {
    conn: Option<Conn>,
    state: BodyState,
    reusable: bool,
    pool: Arc<Pool>,
}

/// How the rest of the body is delimited; the body has ended once `conn` is gone.
#[derive(Debug, Clone, Copy)]
enum BodyState {
    Length(u64),
    Chunked(ChunkedDecoder),
    UntilClose,
}

impl ResponseBody {
    fn boxed(conn: Conn, state: BodyState, reusable: bool, pool: &Arc<Pool>) -> Box<Self> {
        Box::new(ResponseBody {
            conn: Some(conn),
            state,
            reusable,
            pool: Arc::clone(pool),
        })
    }

    fn finish(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.pool.release(conn, self.reusable);
        }
    }

    fn fail(&mut self, error: BoxError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.conn = None;
        Poll::Ready(Some(Err(error)))
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut this.state {
                BodyState::Length(remaining) => {
                    if !conn.read_buf.is_empty() {
                        let data = codec::split_up_to(&mut conn.read_buf, *remaining);
                        *remaining -= data.len() as u64;
                        if *remaining == 0 {
                            this.finish();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                BodyState::Chunked(decoder) => match decoder.decode(&mut conn.read_buf) {
                    Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Decoded::Done) => {
                        this.finish();
                        return Poll::Ready(None);
                    }
                    Ok(Decoded::NeedMore) => {}
                    Err(error) => return this.fail(Box::new(error)),
                },
                BodyState::UntilClose => {
                    if !conn.read_buf.is_empty() {
                        let data = conn.read_buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
            }
            match ready!(conn.poll_fill(cx)) {
                Ok(0) if matches!(this.state, BodyState::UntilClose) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    return this.fail(Box::new(ClientError::Read(
                        io::ErrorKind::UnexpectedEof.into(),
                    )));
                }
                Ok(_) => {}
                Err(error) => return this.fail(Box::new(ClientError::Read(error))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            _ if self.conn.is_none() => SizeHint::with_exact(0),
            BodyState::Length(remaining) => SizeHint::with_exact(remaining),
            BodyState::Chunked(_) | BodyState::UntilClose => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};
    use tokio::net::{TcpListener, TcpSocket};

    /// A loopback address whose connects hang like a blackholed route: a
    /// listener with a backlog of one, filled by the returned connection and
    /// never accepted from, drops every further SYN. Keep both alive.
    async fn blackhole() -> (SocketAddr, TcpListener, TcpStream) {
        let socket = TcpSocket::new_v4().unwrap();
        socket
            .bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let listener = socket.listen(0).unwrap();
        let filler = TcpStream::connect(addr).await.unwrap();
        (addr, listener, filler)
    }

    /// A loopback port nobody listens on: connects are refused at once.
    async fn refused() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    }

    /// Races `first` against a live listener placed second and checks the
    /// live one won within a bound that only keeps a broken build from
    /// hanging the suite.
    async fn second_address_wins(first: SocketAddr, head_start: Duration, why: &str) {
        let live = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live_addr = live.local_addr().unwrap();
        let connected = tokio::time::timeout(
            Duration::from_secs(30),
            connect_first(vec![first, live_addr], head_start),
        )
        .await
        .expect(why)
        .unwrap();
        assert_eq!(connected.peer_addr().unwrap(), live_addr);
    }

    #[tokio::test]
    async fn a_blackholed_first_address_is_overtaken_by_the_next() {
        let (dead, _listener, _filler) = blackhole().await;
        // Connecting to `dead` alone would hang for the kernel's SYN retries (minutes).
        second_address_wins(
            dead,
            Duration::from_millis(50),
            "the second address is tried while the first hangs",
        )
        .await;
    }

    #[tokio::test]
    async fn a_refused_address_moves_on_to_the_next() {
        // A head start longer than the bound: only the refusal can start the next attempt.
        second_address_wins(
            refused().await,
            Duration::from_secs(3600),
            "a refusal starts the next address at once",
        )
        .await;
    }

    #[tokio::test]
    async fn every_address_failing_gives_the_last_error() {
        let error = connect_first(
            vec![refused().await, refused().await],
            Duration::from_millis(50),
        )
        .await
        .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::ConnectionRefused);
        let error = connect_first(Vec::new(), Duration::from_millis(50))
            .await
            .unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
    }

    /// An upstream on loopback that answers `answers` requests on one
    /// connection, each with `body` in one write (so it reaches the client's
    /// socket in one piece), and a client for it.
    async fn one_connection_upstream(
        answers: usize,
        body: Bytes,
    ) -> (Client, tokio::task::JoinHandle<()>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut answer =
            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes();
        answer.extend_from_slice(&body);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}", listener.local_addr().unwrap());
        let upstream = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut received = Vec::new();
            let mut answered = 0;
            while answered < answers {
                let mut chunk = [0u8; 1024];
                let read = socket.read(&mut chunk).await.unwrap();
                assert!(read > 0, "the client closed after {answered} answers");
                received.extend_from_slice(&chunk[..read]);
                while let Some(end) = received.windows(4).position(|w| w == b"\r\n\r\n") {
                    received.drain(..end + 4);
                    socket.write_all(&answer).await.unwrap();
                    answered += 1;
                }
            }
        });
        let config = crate::config::for_tests_at(&base_url, "a-client-key", "");
        let tls = Arc::new(crate::proxy::upstream_tls_config(
            rustls::RootCertStore::empty(),
        ));
        let metrics = crate::telemetry::metrics::Metrics::new();
        let client =
            Client::new(&config.upstreams[0], &tls, metrics.upstream_pool("comfy")).unwrap();
        (client, upstream)
    }

    /// Sends a bodiless GET and returns the answer's body, which must have
    /// come whole with its head (`Body::Full`: the server writes the two together).
    async fn get_whole(client: &Client, n: usize) -> Bytes {
        let (body, _sent) = WatchedBody::new(Body::Empty, 0);
        let request = Request::get("/api/assets").body(body).unwrap();
        let (response, _) = client.send(request, false).await.unwrap();
        match response.into_body() {
            Body::Full(Some(bytes)) => bytes,
            other => panic!(
                "answer {n} did not come whole with its head (streamed: {})",
                matches!(other, Body::Upstream(_))
            ),
        }
    }

    /// An answer that fits [`READ_BUFFER`] and arrives at once is read at
    /// once, however many answers before it shortened the read buffer.
    /// When the room was only topped up below 4 KiB, the sixth 12 KB answer
    /// on a connection was read in two parts and streamed.
    #[tokio::test]
    async fn answers_that_fit_the_read_buffer_arrive_whole_on_a_kept_connection() {
        const ANSWERS: usize = 12;
        let body: Bytes = (0..12_000).map(|i| b'a' + (i % 26) as u8).collect();
        let (client, upstream) = one_connection_upstream(ANSWERS, body.clone()).await;
        for n in 1..=ANSWERS {
            assert_eq!(get_whole(&client, n).await, body, "answer {n}");
        }
        // Every answer was read on the one connection the upstream accepted.
        upstream.await.unwrap();
    }

    /// Answers still held (not yet written to a slow client) keep their
    /// buffer; the next read must not take a whole new buffer each time, or
    /// every small frame would pin 64 KiB. Forty 1 KB answers held at once
    /// fit in one buffer, and need at most one more.
    #[tokio::test]
    async fn held_answers_share_read_buffers() {
        const ANSWERS: usize = 40;
        let body = Bytes::from(vec![b'x'; 1_000]);
        let (client, upstream) = one_connection_upstream(ANSWERS, body.clone()).await;
        let mut held = Vec::new();
        for n in 1..=ANSWERS {
            held.push(get_whole(&client, n).await);
        }
        upstream.await.unwrap();
        // Answers read into one buffer lie in it one after the other.
        let new_buffers = held
            .windows(2)
            .filter(|pair| {
                let step = (pair[1].as_ptr() as usize).wrapping_sub(pair[0].as_ptr() as usize);
                !(body.len()..2 * body.len()).contains(&step)
            })
            .count();
        assert!(
            new_buffers <= 1,
            "{new_buffers} new read buffers for {ANSWERS} held answers"
        );
        assert!(held.iter().all(|answer| *answer == body));
    }

    #[test]
    fn families_alternate_starting_with_the_first_address() {
        let v6 = |port| SocketAddr::from((Ipv6Addr::LOCALHOST, port));
        let v4 = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        assert_eq!(
            interleave_families(vec![v6(1), v6(2), v6(3), v4(4), v4(5)]),
            vec![v6(1), v4(4), v6(2), v4(5), v6(3)]
        );
        assert_eq!(
            interleave_families(vec![v4(1), v6(2), v4(3)]),
            vec![v4(1), v6(2), v4(3)]
        );
        assert_eq!(interleave_families(Vec::new()), Vec::new());
    }
}
