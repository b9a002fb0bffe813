//! The request body as it goes upstream: capped in size, and reporting when
//! it has been sent in full.
//!
//! The upstream response timeout counts from the end of the body: before it,
//! the upstream is still receiving, and a large upload is not a slow upstream.
//! The cap covers bodies without `Content-Length` (chunked), whose size is
//! only known while they stream; a declared oversize is refused earlier.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use tokio::sync::oneshot;

use crate::body::{Body, BoxError};

/// The error a body raises once it passes the cap; `forward` turns it into a 413.
#[derive(Debug, thiserror::Error)]
#[error("the request body is larger than the gateway's limit")]
pub struct BodyTooLarge;

/// Wraps a [`Body`]; the paired receiver resolves when the body has ended.
#[derive(Debug)]
pub struct WatchedBody {
    inner: Body,
    on_end: Option<oneshot::Sender<()>>,
    /// Bytes still allowed.
    remaining: u64,
}

impl WatchedBody {
    pub fn new(inner: Body, limit: u64) -> (Self, oneshot::Receiver<()>) {
        let (sender, receiver) = oneshot::channel();
        let mut body = WatchedBody {
            inner,
            on_end: Some(sender),
            remaining: limit,
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
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            let size = frame.data_ref().map_or(0, |data| data.len() as u64);
            match self.remaining.checked_sub(size) {
                Some(left) => self.remaining = left,
                None => return Poll::Ready(Some(Err(Box::new(BodyTooLarge)))),
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn a_body_over_the_limit_fails_and_one_within_it_reports_its_end() {
        let (body, sent) = WatchedBody::new(Body::full("12345"), 4);
        let error = body.collect().await.unwrap_err();
        assert!(error.downcast_ref::<BodyTooLarge>().is_some());
        drop(sent);
        let (body, sent) = WatchedBody::new(Body::full("1234"), 4);
        assert_eq!(body.collect().await.unwrap().to_bytes(), "1234");
        sent.await.expect("the end was reported");
    }
}
