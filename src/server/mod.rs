//! The gateway's own HTTP/1.1 loop for client connections: the requests that
//! make up nearly all traffic (bodiless reads: cache hits and pass-through
//! `GET`s) are read, answered and written here; the first request it does not
//! serve (see [`codec`]) hands the connection to hyper with every byte it has
//! read, for the rest of the connection's life.
//!
//! Why not hyper for everything: hyper's server framing was ~13% of a core on
//! cache hits (per-request header-read timer, dispatcher state machine, write
//! buffer management). This loop keeps one buffer and one timer per
//! connection, writes each answer's head and body with one `writev`, and does
//! nothing else. What it does (RFC 9112):
//! - pipelined requests are answered in order from the same buffer;
//! - `Connection: close` from either side ends the connection after the answer;
//! - answers get `Date`, and a `Content-Length` (known size) or chunked
//!   framing (streams); `HEAD`, 1xx, 204 and 304 get no body;
//! - a streamed answer with an upstream `Content-Length` is held to it: more
//!   or fewer bytes end the connection, so the client sees a truncated answer
//!   rather than a wrong one;
//! - the header-read timeout (slowloris) runs from the moment the loop waits
//!   for a head, idle keep-alive included, as with hyper;
//! - on shutdown, an idle connection closes at once and a busy one after its
//!   answer, which says `Connection: close`.
//!
//! A client that hangs up while its request is in flight is noticed when the
//! answer is written (the upstream request itself is bounded by its timeouts).

pub mod codec;

use std::convert::Infallible;
use std::future::poll_fn;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, Request, Response};
use http_body::Body as _;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tower::Service;

use crate::body::Body;
use crate::connection::ConnectionService;
use crate::wire::{self, RecentNames};
use codec::{Framing, Head};

/// A partial head this long is hyper's to finish (and to refuse with 431 if
/// it grows past its limit): real request heads are a few hundred bytes.
const HAND_OFF_PARTIAL_HEAD: usize = 8 * 1024;
/// Room kept free for the next read.
const READ_RESERVE: usize = 4 * 1024;

/// How a connection left the loop.
#[derive(Debug)]
pub enum Ended<I> {
    /// Closed: by either side, a timeout, an error, or shutdown.
    Closed,
    /// A request the loop does not serve: hyper takes the connection, reading
    /// the bytes already buffered first.
    HandOff(Prefixed<I>),
}

/// Serves `io` until it closes or needs hyper (see the module docs).
pub async fn serve<I, S>(
    io: I,
    service: &ConnectionService<S>,
    header_read_timeout: Duration,
    stop: CancellationToken,
) -> Ended<I>
where
    I: AsyncRead + AsyncWrite + Unpin,
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone,
{
    let mut conn = Conn {
        io,
        buf: BytesMut::with_capacity(2 * READ_RESERVE),
        head_out: Vec::with_capacity(512),
        recent_names: RecentNames::default(),
        header_read_timeout,
        deadline: Instant::now() + header_read_timeout,
        timer: Box::pin(tokio::time::sleep(header_read_timeout)),
        stopping: Box::pin(stop.clone().cancelled_owned()),
        stop,
    };
    match conn.run(service).await {
        Ok(Next::HandOff) => Ended::HandOff(Prefixed {
            prefix: conn.buf.freeze(),
            io: conn.io,
        }),
        Ok(Next::Close) => {
            let _ = conn.io.shutdown().await;
            Ended::Closed
        }
        Err(error) => {
            tracing::debug!(%error, "client connection ended with an error");
            Ended::Closed
        }
    }
}

enum Next {
    Close,
    HandOff,
}

/// What a read for a head brought.
enum Filled {
    Bytes,
    /// The client closed, timed out, or the gateway is stopping.
    Close,
}

struct Conn<I> {
    io: I,
    /// Bytes read and not yet parsed: the rest of a head, or pipelined requests.
    buf: BytesMut,
    /// The answer head being written, reused for every answer.
    head_out: Vec<u8>,
    /// The field names of the last request read on this connection.
    recent_names: RecentNames,
    header_read_timeout: Duration,
    /// When the head being waited for must be complete. Moving it costs a
    /// store; `timer` is only re-armed when it fires before the deadline, so
    /// a busy connection does not touch the timer wheel per request.
    deadline: Instant,
    timer: Pin<Box<Sleep>>,
    stopping: Pin<Box<WaitForCancellationFutureOwned>>,
    stop: CancellationToken,
}

impl<I: AsyncRead + AsyncWrite + Unpin> Conn<I> {
    async fn run<S>(&mut self, service: &ConnectionService<S>) -> io::Result<Next>
    where
        S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone,
    {
        loop {
            self.deadline = Instant::now() + self.header_read_timeout;
            let (request, keep_alive) = loop {
                match codec::parse_request(&mut self.buf, &mut self.recent_names) {
                    Head::Simple {
                        request,
                        keep_alive,
                    } => break (request, keep_alive),
                    Head::HandOff => return Ok(Next::HandOff),
                    Head::Partial if self.buf.len() >= HAND_OFF_PARTIAL_HEAD => {
                        return Ok(Next::HandOff);
                    }
                    Head::Partial => match self.fill().await? {
                        Filled::Bytes => {}
                        Filled::Close => return Ok(Next::Close),
                    },
                }
            };
            let is_head = request.method() == Method::HEAD;
            let response = match service.call_stack(request.map(|()| Body::Empty)).await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            let keep_alive =
                keep_alive && !wire::says_close(response.headers()) && !self.stop.is_cancelled();
            let reusable = self.write_answer(response, is_head, !keep_alive).await?;
            if !(keep_alive && reusable) {
                return Ok(Next::Close);
            }
        }
    }

    /// Reads more of a head, or says why the connection should close: the
    /// client closed, the header-read timeout passed, or (between requests)
    /// the gateway is stopping.
    async fn fill(&mut self) -> io::Result<Filled> {
        if self.buf.capacity() - self.buf.len() < READ_RESERVE {
            self.buf.reserve(READ_RESERVE);
        }
        poll_fn(|cx| {
            match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.buf) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(Filled::Close)),
                Poll::Ready(Ok(_)) => return Poll::Ready(Ok(Filled::Bytes)),
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => {}
            }
            if self.buf.is_empty() && self.stopping.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(Filled::Close));
            }
            while self.timer.as_mut().poll(cx).is_ready() {
                if Instant::now() >= self.deadline {
                    tracing::debug!("header read timeout: closing the connection");
                    return Poll::Ready(Ok(Filled::Close));
                }
                let deadline = self.deadline;
                self.timer.as_mut().reset(deadline);
            }
            Poll::Pending
        })
        .await
    }

    /// Writes one answer. `Ok(false)`: the body ended early or ran over its
    /// length, so the connection cannot carry another answer.
    async fn write_answer(
        &mut self,
        response: Response<Body>,
        is_head: bool,
        close: bool,
    ) -> io::Result<bool> {
        let (mut parts, mut body) = response.into_parts();
        let exact = body.size_hint().exact();
        let framing = date::with(|date| {
            codec::encode_answer_head(&mut parts, exact, is_head, close, date, &mut self.head_out)
        });
        if !framing.has_body() {
            write_all(&mut self.io, &mut [IoSlice::new(&self.head_out)]).await?;
            self.io.flush().await?;
            return Ok(true);
        }
        // A complete body (cache hits, the gateway's own answers): head and
        // body in one `writev`, the body's `Bytes` as they are.
        if let (Body::Full(chunk), Framing::Length(_)) = (&mut body, framing) {
            let chunk = chunk.take().unwrap_or_default();
            write_all(
                &mut self.io,
                &mut [IoSlice::new(&self.head_out), IoSlice::new(&chunk)],
            )
            .await?;
            self.io.flush().await?;
            return Ok(true);
        }
        self.write_stream(body, framing).await
    }

    /// Writes a streamed body frame by frame as it arrives, the head in
    /// front of the first frame when that one is ready at once.
    async fn write_stream(&mut self, mut body: Body, framing: Framing) -> io::Result<bool> {
        let mut head_pending = true;
        let mut remaining = match framing {
            Framing::Length(length) => Some(length),
            _ => None,
        };
        let mut size_line = [0u8; 18];
        loop {
            let frame = match poll_fn(|cx| Poll::Ready(Pin::new(&mut body).poll_frame(cx))).await {
                Poll::Ready(frame) => frame,
                Poll::Pending => {
                    // Nothing yet (a slow stream): the client gets the head now.
                    if head_pending {
                        head_pending = false;
                        write_all(&mut self.io, &mut [IoSlice::new(&self.head_out)]).await?;
                        self.io.flush().await?;
                    }
                    poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
                }
            };
            let head: &[u8] = if head_pending { &self.head_out } else { &[] };
            match frame {
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue; // Trailers are not sent on; hyper does not either.
                    };
                    if data.is_empty() {
                        continue;
                    }
                    match &mut remaining {
                        Some(left) => {
                            let length = data.len() as u64;
                            if length > *left {
                                tracing::debug!("answer body longer than its content-length");
                                return Ok(false);
                            }
                            *left -= length;
                            write_all(&mut self.io, &mut [IoSlice::new(head), IoSlice::new(&data)])
                                .await?;
                        }
                        None => {
                            let line = wire::chunk_size_line(data.len(), &mut size_line);
                            write_all(
                                &mut self.io,
                                &mut [
                                    IoSlice::new(head),
                                    IoSlice::new(line),
                                    IoSlice::new(&data),
                                    IoSlice::new(b"\r\n"),
                                ],
                            )
                            .await?;
                        }
                    }
                    self.io.flush().await?;
                    head_pending = false;
                }
                Some(Err(error)) => {
                    // The chunked stream is left without its last chunk, so
                    // the client can tell it was cut short.
                    tracing::debug!(%error, "answer body failed while streaming");
                    return Ok(false);
                }
                None => {
                    let end: &[u8] = if remaining.is_none() {
                        b"0\r\n\r\n"
                    } else {
                        b""
                    };
                    write_all(&mut self.io, &mut [IoSlice::new(head), IoSlice::new(end)]).await?;
                    self.io.flush().await?;
                    return Ok(remaining.is_none_or(|left| left == 0));
                }
            }
        }
    }
}

/// Writes every slice, with as few `writev`s as the socket allows.
async fn write_all<W: AsyncWrite + Unpin>(
    io: &mut W,
    mut slices: &mut [IoSlice<'_>],
) -> io::Result<()> {
    IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        let written = io.write_vectored(slices).await?;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, written);
    }
    Ok(())
}

/// A connection with bytes already read from it in front: what hyper is
/// handed, so it parses the request the loop stopped at from its first byte.
#[derive(Debug)]
pub struct Prefixed<I> {
    prefix: Bytes,
    io: I,
}

impl<I> Prefixed<I> {
    /// A connection no byte has been read from yet.
    pub fn nothing_read(io: I) -> Self {
        Prefixed {
            prefix: Bytes::new(),
            io,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.is_empty() {
            return Pin::new(&mut self.io).poll_read(cx, buf);
        }
        let count = self.prefix.len().min(buf.remaining());
        buf.put_slice(&self.prefix[..count]);
        self.prefix.advance(count);
        Poll::Ready(Ok(()))
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        slices: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, slices)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The `Date` header value, formatted once per second per thread.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    struct Cached {
        second: u64,
        text: String,
    }

    thread_local! {
        static CACHED: RefCell<Cached> = const { RefCell::new(Cached { second: u64::MAX, text: String::new() }) };
    }

    /// Calls `f` with the current `Date` value (IMF-fixdate, RFC 9110 §5.6.7).
    pub fn with<R>(f: impl FnOnce(&[u8]) -> R) -> R {
        let now = SystemTime::now();
        let second = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        CACHED.with_borrow_mut(|cached| {
            if cached.second != second {
                cached.second = second;
                cached.text = httpdate::fmt_http_date(now);
            }
            f(cached.text.as_bytes())
        })
    }
}
