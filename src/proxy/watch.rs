//! A request body that says when it has been sent in full.
//!
//! The upstream response timeout counts from that moment: before it, the
//! upstream is still receiving, and a large upload is not a slow upstream.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::sync::oneshot;

use crate::body::{Body, BoxError};

/// Wraps a [`Body`]; the paired receiver resolves when the body has ended.
#[derive(Debug)]
pub struct WatchedBody {
    inner: Body,
    on_end: Option<oneshot::Sender<()>>,
}

impl WatchedBody {
    pub fn new(inner: Body) -> (Self, oneshot::Receiver<()>) {
        let (sender, receiver) = oneshot::channel();
        let mut body = WatchedBody {
            inner,
            on_end: Some(sender),
        };
        // Bodies known to be empty are "sent" from the start.
        if http_body::Body::is_end_stream(&body.inner) {
            body.finish();
        }
        (body, receiver)
    }

    fn finish(&mut self) {
        if let Some(sender) = self.on_end.take() {
            let _ = sender.send(());
        }
    }
}

impl http_body::Body for WatchedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None))
            || (polled.is_ready() && http_body::Body::is_end_stream(&self.inner))
        {
            self.finish();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
