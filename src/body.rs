//! The one body type that flows through the gateway, in both directions.
//!
//! A request arrives with hyper's [`Incoming`] body and is forwarded with it
//! untouched, so uploads stream straight through. Answers the gateway makes
//! itself (errors, health checks, and later cache hits) are a single `Bytes`
//! chunk. An enum instead of a boxed trait object keeps the hot path free of a
//! per-request allocation and keeps `Body` `Sync`, which hyper's h2 wants.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;

/// Errors a body can raise while streaming: a broken client or upstream connection.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A streaming body from the network, or a complete body the gateway made.
#[derive(Debug, Default)]
pub enum Body {
    /// Streamed from a client or an upstream connection, frame by frame.
    Incoming(Incoming),
    /// A complete body; taken on the first poll.
    Full(Option<Bytes>),
    /// No body at all (`Content-Length: 0` is implied).
    #[default]
    Empty,
    /// An upstream answer's body, read from the upstream connection as it is
    /// polled (see `proxy::client`). Boxed: it holds the connection, and
    /// bodies that arrive whole with their head never take this form.
    Upstream(Box<crate::proxy::ResponseBody>),
    /// Bytes already read, then the rest of a stream: a response the cache
    /// began to buffer and found too big to store is passed on this way.
    Chained {
        head: Option<Bytes>,
        tail: Box<Body>,
    },
    /// An event stream or a long download that ends when a reload revokes
    /// the key it was opened with (see `proxy::RevocableStream`).
    Revocable(Box<crate::proxy::RevocableStream>),
}

impl Body {
    /// A complete body from anything that turns into `Bytes` (no copy for `Bytes`/`Vec<u8>`/`&'static`).
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        if bytes.is_empty() {
            Body::Empty
        } else {
            Body::Full(Some(bytes))
        }
    }
}

impl From<Incoming> for Body {
    fn from(incoming: Incoming) -> Self {
        Body::Incoming(incoming)
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        // Every variant is `Unpin` (`Incoming` is), so no pin projection is needed.
        match self.get_mut() {
            Body::Incoming(incoming) => Pin::new(incoming).poll_frame(cx).map_err(Into::into),
            Body::Upstream(upstream) => Pin::new(upstream.as_mut()).poll_frame(cx),
            Body::Full(chunk) => Poll::Ready(chunk.take().map(|bytes| Ok(Frame::data(bytes)))),
            Body::Empty => Poll::Ready(None),
            Body::Chained { head, tail } => match head.take() {
                Some(bytes) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
                None => Pin::new(tail.as_mut()).poll_frame(cx),
            },
            Body::Revocable(stream) => Pin::new(stream.as_mut()).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Incoming(incoming) => incoming.is_end_stream(),
            Body::Upstream(upstream) => upstream.is_end_stream(),
            Body::Full(chunk) => chunk.is_none(),
            Body::Empty => true,
            Body::Chained { head, tail } => head.is_none() && tail.is_end_stream(),
            Body::Revocable(stream) => stream.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Incoming(incoming) => incoming.size_hint(),
            Body::Upstream(upstream) => upstream.size_hint(),
            Body::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            Body::Full(None) | Body::Empty => SizeHint::with_exact(0),
            Body::Chained { head, tail } => {
                let head = head.as_ref().map_or(0, |bytes| bytes.len() as u64);
                let tail = tail.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(tail.lower() + head);
                if let Some(upper) = tail.upper() {
                    hint.set_upper(upper + head);
                }
                hint
            }
            Body::Revocable(stream) => stream.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn full_body_yields_its_bytes_once_and_reports_exact_size() {
        let body = Body::full("hello");
        assert_eq!(body.size_hint().exact(), Some(5));
        let collected = body.collect().await.unwrap().to_bytes();
        assert_eq!(collected, Bytes::from_static(b"hello"));
    }

    #[tokio::test]
    async fn a_chained_body_yields_its_head_then_its_tail() {
        let body = Body::Chained {
            head: Some(Bytes::from_static(b"he")),
            tail: Box::new(Body::full("llo")),
        };
        assert_eq!(body.size_hint().exact(), Some(5));
        assert_eq!(body.collect().await.unwrap().to_bytes(), "hello");
    }

    #[test]
    fn an_empty_full_body_is_the_empty_variant() {
        assert!(matches!(Body::full(Bytes::new()), Body::Empty));
        assert!(http_body::Body::is_end_stream(&Body::Empty));
    }
}
