//! The service one accepted client connection calls, from the gateway's own
//! HTTP/1 loop ([`crate::server`]) or from hyper after a hand-off: the gateway's
//! tower stack, plus what every request on the connection carries (the
//! peer's address, whether it came over TLS). Answers for hyper get the
//! header fields they share with a cache entry merged in ([`crate::fields`]).
//!
//! hyper-util's `TowerToHyperService` clones the whole tower stack for every
//! request — a dozen reference counts up and back down — and moves the clone
//! into the request's future. A connection calls its service from its own
//! task, one call at a time, and the gateway's layers are ready at once (none
//! holds capacity in `poll_ready`), so [`ConnectionService`] keeps one stack
//! per connection and calls it in place: +1.5–2% on cache hits and
//! pass-through in A/B runs. Should a layer ever answer `Pending`, that
//! request waits on a clone of the stack, as with `TowerToHyperService`,
//! instead of being refused.
//!
//! A config reload builds a new stack and [`Published::publish`]es it; each
//! connection takes it before its next request (one atomic load per request
//! tells whether there is a newer one), so a revoked key is refused on the
//! next request of a keep-alive connection too, while requests in flight
//! finish on the stack they started with.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::task::{Context, Poll, Waker};

use futures_util::FutureExt;
use futures_util::future::{Either, Map};
use http::{Request, Response};
use hyper::body::Incoming;
use tower::util::Oneshot;
use tower::{Service, ServiceExt};

use crate::auth::inject::ClientAddr;
use crate::body::Body;
use crate::telemetry::RequestRecord;

/// The stack new requests are served by, replaced whole by a config reload.
#[derive(Debug)]
pub struct Published<S> {
    /// `current`'s generation, readable without the lock: connections look
    /// at it on every request, and it changes only on a reload.
    generation: AtomicU64,
    current: RwLock<Versioned<S>>,
}

/// A stack and the generation it was published as.
#[derive(Debug, Clone)]
struct Versioned<S> {
    generation: u64,
    stack: S,
}

impl<S: Clone> Published<S> {
    pub fn new(stack: S) -> Self {
        Published {
            generation: AtomicU64::new(0),
            current: RwLock::new(Versioned {
                generation: 0,
                stack,
            }),
        }
    }

    /// Makes `stack` the one every connection's next request is served by.
    pub fn publish(&self, stack: S) {
        let mut current = self.current.write().unwrap_or_else(PoisonError::into_inner);
        current.generation += 1;
        current.stack = stack;
        self.generation.store(current.generation, Ordering::Release);
    }

    fn versioned(&self) -> Versioned<S> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The current stack, if it is not the one of `generation`.
    fn newer_than(&self, generation: u64) -> Option<Versioned<S>> {
        (self.generation.load(Ordering::Acquire) != generation).then(|| self.versioned())
    }
}

/// One client connection's service (see the module docs).
#[derive(Debug)]
pub struct ConnectionService<S> {
    /// The stack this connection calls: `published`'s, as of its last request.
    stack: Mutex<Versioned<S>>,
    published: Arc<Published<S>>,
    /// Attached to every request: the peer and its `X-Forwarded-For` item.
    client_addr: ClientAddr,
    is_tls: bool,
}

impl<S> ConnectionService<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone,
{
    pub fn new(published: Arc<Published<S>>, client_addr: ClientAddr, is_tls: bool) -> Self {
        ConnectionService {
            stack: Mutex::new(published.versioned()),
            published,
            client_addr,
            is_tls,
        }
    }

    /// Calls the stack in place when it is ready, else a clone that waits.
    pub fn call_stack(
        &self,
        mut request: Request<Body>,
    ) -> Either<S::Future, Oneshot<S, Request<Body>>> {
        let record = RequestRecord::for_client(&request, self.client_addr.clone(), self.is_tls);
        request.extensions_mut().insert(Arc::new(record));
        // Uncontended: only this connection's task calls it.
        let mut versioned = self.stack.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(newer) = self.published.newer_than(versioned.generation) {
            *versioned = newer;
        }
        let stack = &mut versioned.stack;
        match stack.poll_ready(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Ok(())) => Either::Left(stack.call(request)),
            Poll::Pending => Either::Right(stack.clone().oneshot(request)),
        }
    }
}

impl<S> hyper::service::Service<Request<Incoming>> for ConnectionService<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible> + Clone,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Map<Either<S::Future, Oneshot<S, Request<Body>>>, ForHyper>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        self.call_stack(request.map(Body::Incoming))
            .map(with_shared_fields_merged as ForHyper)
    }
}

type ForHyper = fn(Result<Response<Body>, Infallible>) -> Result<Response<Body>, Infallible>;

/// hyper writes an answer's header map alone: fields a cache hit shares with
/// its entry go into it first (see [`crate::fields`]).
fn with_shared_fields_merged(
    answer: Result<Response<Body>, Infallible>,
) -> Result<Response<Body>, Infallible> {
    let Ok(mut response) = answer;
    crate::fields::merge(&mut response);
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::{Ready, ready};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// Answers with the connection facts it was given; ready only once
    /// opened. Counts its clones, to tell the in-place path from the waiting one.
    struct Gate {
        open: Arc<AtomicBool>,
        waiting: Arc<Mutex<Option<Waker>>>,
        clones: Arc<AtomicUsize>,
    }

    impl Gate {
        fn new(open: bool) -> Self {
            Gate {
                open: Arc::new(AtomicBool::new(open)),
                waiting: Arc::new(Mutex::new(None)),
                clones: Arc::new(AtomicUsize::new(0)),
            }
        }

        /// Makes every copy ready and wakes the one waiting.
        fn opener(&self) -> impl FnOnce() + use<> {
            let (open, waiting) = (Arc::clone(&self.open), Arc::clone(&self.waiting));
            move || {
                open.store(true, Ordering::SeqCst);
                if let Some(waker) = waiting.lock().unwrap().take() {
                    waker.wake();
                }
            }
        }
    }

    impl Clone for Gate {
        fn clone(&self) -> Self {
            self.clones.fetch_add(1, Ordering::SeqCst);
            Gate {
                open: Arc::clone(&self.open),
                waiting: Arc::clone(&self.waiting),
                clones: Arc::clone(&self.clones),
            }
        }
    }

    impl Service<Request<Body>> for Gate {
        type Response = Response<Body>;
        type Error = Infallible;
        type Future = Ready<Result<Response<Body>, Infallible>>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            let mut waiting = self.waiting.lock().unwrap();
            if self.open.load(Ordering::SeqCst) {
                return Poll::Ready(Ok(()));
            }
            *waiting = Some(cx.waker().clone());
            Poll::Pending
        }

        fn call(&mut self, request: Request<Body>) -> Self::Future {
            let record = RequestRecord::of(&request);
            let addr = record
                .and_then(|record| record.client.as_ref())
                .map(|client| client.addr.to_string());
            let tls = record.is_some_and(|record| record.tls);
            ready(Ok(Response::new(Body::full(format!("{addr:?} tls={tls}")))))
        }
    }

    fn client() -> ClientAddr {
        ClientAddr::new("192.0.2.7:4000".parse().unwrap())
    }

    async fn text(response: Response<Body>) -> String {
        use http_body_util::BodyExt;
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_ready_stack_is_called_in_place_with_the_connection_facts() {
        let gate = Gate::new(true);
        let clones = Arc::clone(&gate.clones);
        let service = ConnectionService::new(Arc::new(Published::new(gate)), client(), true);
        // The connection's own copy of the published stack.
        assert_eq!(clones.load(Ordering::SeqCst), 1);
        for _ in 0..3 {
            let future = service.call_stack(Request::new(Body::Empty));
            assert!(matches!(future, Either::Left(_)), "called in place");
            let Ok(response) = future.await;
            assert_eq!(text(response).await, "Some(\"192.0.2.7:4000\") tls=true");
        }
        assert_eq!(clones.load(Ordering::SeqCst), 1, "no clone per request");
    }

    #[tokio::test]
    async fn a_stack_that_is_not_ready_is_waited_for_not_refused() {
        let gate = Gate::new(false);
        let (open, clones) = (gate.opener(), Arc::clone(&gate.clones));
        let service = ConnectionService::new(Arc::new(Published::new(gate)), client(), false);
        let future = service.call_stack(Request::new(Body::Empty));
        assert!(matches!(future, Either::Right(_)), "waits on a clone");
        assert_eq!(
            clones.load(Ordering::SeqCst),
            2,
            "the connection's copy, and one to wait on"
        );
        let answer = tokio::spawn(future);
        tokio::task::yield_now().await;
        assert!(
            !answer.is_finished(),
            "not answered before the stack is ready"
        );
        open();
        let answered = tokio::time::timeout(std::time::Duration::from_secs(10), answer).await;
        let Ok(response) = answered
            .expect("woken when the stack became ready")
            .unwrap();
        assert_eq!(text(response).await, "Some(\"192.0.2.7:4000\") tls=false");
    }

    /// Answers its name.
    #[derive(Clone)]
    struct Named(&'static str);

    impl Service<Request<Body>> for Named {
        type Response = Response<Body>;
        type Error = Infallible;
        type Future = Ready<Result<Response<Body>, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Request<Body>) -> Self::Future {
            ready(Ok(Response::new(Body::full(self.0))))
        }
    }

    #[tokio::test]
    async fn an_open_connection_takes_a_published_stack_at_its_next_request() {
        let published = Arc::new(Published::new(Named("first")));
        let service = ConnectionService::new(Arc::clone(&published), client(), false);
        let Ok(response) = service.call_stack(Request::new(Body::Empty)).await;
        assert_eq!(text(response).await, "first");
        let started_before = service.call_stack(Request::new(Body::Empty));
        published.publish(Named("second"));
        let Ok(response) = started_before.await;
        assert_eq!(text(response).await, "first", "finished on its own stack");
        for _ in 0..2 {
            let Ok(response) = service.call_stack(Request::new(Body::Empty)).await;
            assert_eq!(text(response).await, "second");
        }
        let later = ConnectionService::new(Arc::clone(&published), client(), false);
        let Ok(response) = later.call_stack(Request::new(Body::Empty)).await;
        assert_eq!(text(response).await, "second");
    }
}
