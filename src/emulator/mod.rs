//! An in-memory Comfy Cloud, for `teamgate demo`, the tests and the benchmarks.
//!
//! It follows `shared/upstream/comfy-cloud-openapi.yaml` for the asset surface
//! (lists with filters and pagination, details, from-hash, tags, uploads,
//! remote-metadata), plus `/api/view` (302), `/api/prompt`, `/api/jobs`, the
//! `/ws` progress websocket and the v2 SSE stream `/api/v2/jobs/{id}/events`.
//!
//! It checks credentials the way Comfy Cloud does — `X-API-Key` on v1,
//! `Authorization: Bearer` on v2, `token=` on `/ws` — against its own accounts,
//! and each account sees only its own assets (plus the public ones).
//!
//! For tests it counts and records every request it receives (so a test can
//! assert exactly what reached upstream) and can inject faults: latency, an
//! error status, or a dropped connection.

mod comfy;
mod scenario;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http::{HeaderMap, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tower::ServiceExt;

pub use comfy::{DEMO_BLOB, demo_blob_hash};

/// An emulator account: a name (for messages) and its Comfy API key.
#[derive(Debug, Clone)]
pub struct Account {
    pub name: String,
    pub api_key: String,
}

/// What a fault does to a matching request.
#[derive(Debug, Clone)]
pub enum FaultAction {
    /// Wait this long, then answer normally.
    Delay(Duration),
    /// Answer this status with an `ErrorResponse` body, without touching state.
    Status(StatusCode),
    /// Close the connection without answering.
    Drop,
    /// Park the request until the test adds a permit to the semaphore, then
    /// answer normally: lets a test hold a request in flight deterministically.
    Hold(Arc<tokio::sync::Semaphore>),
    /// Compute the answer now, but hold it back until the test adds a permit:
    /// the answer reflects the state at arrival, whatever happens meanwhile.
    HoldResponse(Arc<tokio::sync::Semaphore>),
    /// Answer 429 with `Retry-After: <seconds>`, as Comfy Cloud does when throttling.
    RateLimited { retry_after_secs: u64 },
}

/// A fault applied to requests matching `method` (any if `None`) and `path` (exact).
#[derive(Debug, Clone)]
pub struct Fault {
    pub method: Option<Method>,
    pub path: String,
    pub action: FaultAction,
    /// How many requests it applies to; `None` for all.
    pub times: Option<u32>,
}

impl Fault {
    pub fn new(method: Option<Method>, path: impl Into<String>, action: FaultAction) -> Self {
        Fault {
            method,
            path: path.into(),
            action,
            times: None,
        }
    }

    pub fn times(mut self, times: u32) -> Self {
        self.times = Some(times);
        self
    }

    fn applies_to(&self, method: &Method, path: &str) -> bool {
        self.times != Some(0)
            && self.method.as_ref().is_none_or(|m| m == method)
            && self.path == path
    }
}

/// One request as the emulator received it.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    pub method: Method,
    /// Path and query exactly as received.
    pub target: String,
    pub headers: HeaderMap,
}

/// How many requests the recorder keeps (the oldest are dropped first).
const RECORD_LIMIT: usize = 4096;

#[derive(Debug, Default)]
struct Traffic {
    counts: HashMap<(Method, String), u64>,
    total: u64,
    recorded: std::collections::VecDeque<RecordedRequest>,
}

/// Which API an emulator speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// Comfy Cloud v1 and v2, at `/`.
    Comfy,
    /// Scenario, at `/v1` (`https://api.cloud.scenario.com/v1`).
    Scenario,
}

#[derive(Debug)]
struct Shared {
    flavor: Flavor,
    /// API key (Comfy) or `key:secret` (Scenario) → account name.
    accounts: HashMap<String, String>,
    store: Mutex<comfy::Store>,
    scenario: Mutex<scenario::Store>,
    traffic: Mutex<Traffic>,
    faults: Mutex<Vec<Fault>>,
    /// Requests being handled now, and the most ever at once.
    in_flight: std::sync::atomic::AtomicUsize,
    peak_in_flight: std::sync::atomic::AtomicUsize,
    /// Bytes produced by `/emulator/bytes/{n}` so far.
    bytes_streamed: Arc<std::sync::atomic::AtomicU64>,
    /// Pause between SSE events and websocket progress messages.
    event_interval: Duration,
}

/// A handle on a running (or ready-to-run) emulator. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Emulator {
    shared: Arc<Shared>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not poison the emulator for the others.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Emulator {
    pub fn new(accounts: Vec<Account>) -> Self {
        Self::with_event_interval(accounts, Duration::from_millis(100))
    }

    pub fn with_event_interval(accounts: Vec<Account>, event_interval: Duration) -> Self {
        Self::build(Flavor::Comfy, accounts, event_interval)
    }

    /// A Scenario emulator; each account's `api_key` is its `key:secret` pair.
    pub fn scenario(accounts: Vec<Account>) -> Self {
        Self::build(Flavor::Scenario, accounts, Duration::from_millis(100))
    }

    fn build(flavor: Flavor, accounts: Vec<Account>, event_interval: Duration) -> Self {
        let names: Vec<String> = accounts.iter().map(|a| a.name.clone()).collect();
        Emulator {
            shared: Arc::new(Shared {
                flavor,
                scenario: Mutex::new(scenario::Store::seeded(&names)),
                accounts: accounts
                    .into_iter()
                    .map(|account| (account.api_key, account.name))
                    .collect(),
                store: Mutex::new(comfy::Store::seeded(&names)),
                traffic: Mutex::new(Traffic::default()),
                faults: Mutex::new(Vec::new()),
                in_flight: Default::default(),
                peak_in_flight: Default::default(),
                bytes_streamed: Default::default(),
                event_interval,
            }),
        }
    }

    /// Serves on `listener` in a background task until the runtime stops.
    pub fn spawn(&self, listener: TcpListener) -> tokio::task::JoinHandle<()> {
        let emulator = self.clone();
        tokio::spawn(async move { emulator.serve(listener).await })
    }

    /// Serves on `listener` forever.
    pub async fn serve(self, listener: TcpListener) {
        let router = match self.shared.flavor {
            Flavor::Comfy => comfy::router(self.clone()),
            Flavor::Scenario => scenario::router(self.clone()),
        };
        let builder = auto::Builder::new(TokioExecutor::new());
        loop {
            let (stream, _) = crate::accept(&listener, "emulator").await;
            let emulator = self.clone();
            let router = router.clone();
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let emulator = emulator.clone();
                let router = router.clone();
                async move { emulator.handle(router, request).await }
            });
            let connection = builder
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .into_owned();
            tokio::spawn(async move {
                let _ = connection.await;
            });
        }
    }

    async fn handle(
        &self,
        router: axum::Router,
        request: Request<Incoming>,
    ) -> Result<Response<axum::body::Body>, ConnectionDropped> {
        let path = request.uri().path().to_owned();
        let method = request.method().clone();
        self.record(&request);
        let _in_flight = InFlight::enter(&self.shared);
        let fault = {
            let mut faults = lock(&self.shared.faults);
            faults
                .iter_mut()
                .find(|fault| fault.applies_to(&method, &path))
                .map(|fault| {
                    if let Some(times) = &mut fault.times {
                        *times -= 1;
                    }
                    fault.action.clone()
                })
        };
        match &fault {
            Some(FaultAction::Delay(delay)) => tokio::time::sleep(*delay).await,
            Some(FaultAction::Status(status)) => {
                return Ok(comfy::error(
                    *status,
                    "injected_fault",
                    "fault injected by the emulator",
                ));
            }
            Some(FaultAction::Drop) => return Err(ConnectionDropped),
            Some(FaultAction::HoldResponse(_)) => {}
            Some(FaultAction::RateLimited { retry_after_secs }) => {
                let mut response = comfy::error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    "too many requests for this API key",
                );
                response
                    .headers_mut()
                    .insert(http::header::RETRY_AFTER, (*retry_after_secs).into());
                return Ok(response);
            }
            Some(FaultAction::Hold(gate)) => {
                if let Ok(permit) = gate.acquire().await {
                    permit.forget();
                }
            }
            None => {}
        }
        let request = match self.authenticate(request) {
            Ok(request) => request,
            Err(response) => return Ok(*response),
        };
        let response = router
            .oneshot(request.map(axum::body::Body::new))
            .await
            .unwrap_or_else(|never: Infallible| match never {});
        if let Some(FaultAction::HoldResponse(gate)) = fault {
            // Buffer the answer first, so it is fixed before the hold.
            let (parts, body) = response.into_parts();
            let bytes = axum::body::to_bytes(body, usize::MAX)
                .await
                .unwrap_or_default();
            if let Ok(permit) = gate.acquire().await {
                permit.forget();
            }
            return Ok(Response::from_parts(parts, axum::body::Body::from(bytes)));
        }
        Ok(response)
    }

    fn record(&self, request: &Request<Incoming>) {
        let mut traffic = lock(&self.shared.traffic);
        traffic.total += 1;
        *traffic
            .counts
            .entry((request.method().clone(), request.uri().path().to_owned()))
            .or_default() += 1;
        if traffic.recorded.len() == RECORD_LIMIT {
            traffic.recorded.pop_front();
        }
        traffic.recorded.push_back(RecordedRequest {
            method: request.method().clone(),
            target: request.uri().path_and_query().map_or_else(
                || request.uri().path().to_owned(),
                |pq| pq.as_str().to_owned(),
            ),
            headers: request.headers().clone(),
        });
    }

    /// Checks the credential where the upstream expects it for this path.
    fn authenticate(
        &self,
        mut request: Request<Incoming>,
    ) -> Result<Request<Incoming>, Box<Response<axum::body::Body>>> {
        if self.shared.flavor == Flavor::Scenario {
            return match scenario::account(&request, &self.shared.accounts) {
                Some(account) => {
                    request.extensions_mut().insert(account);
                    Ok(request)
                }
                None => Err(Box::new(scenario::error(
                    StatusCode::UNAUTHORIZED,
                    "Unauthorized",
                ))),
            };
        }
        let path = request.uri().path();
        let v2 = path.starts_with("/api/v2/");
        let key = if path == "/ws" {
            request
                .uri()
                .query()
                .and_then(|query| crate::auth::query_param(query, "token"))
                .map(|key| key.into_owned())
        } else if v2 {
            request
                .headers()
                .get(http::header::AUTHORIZATION)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.strip_prefix("Bearer "))
                .map(str::to_owned)
        } else {
            request
                .headers()
                .get("x-api-key")
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned)
        };
        match key.and_then(|key| self.shared.accounts.get(&key).cloned()) {
            Some(account) => {
                request.extensions_mut().insert(comfy::AccountName(account));
                Ok(request)
            }
            None if v2 => Err(Box::new(comfy::v2_error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or invalid API key",
            ))),
            None => Err(Box::new(comfy::error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Invalid or missing API key",
            ))),
        }
    }

    /// Requests received for `method` and `path` (exact path, query ignored).
    pub fn count(&self, method: Method, path: &str) -> u64 {
        lock(&self.shared.traffic)
            .counts
            .get(&(method, path.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    /// All requests received, whatever their route or outcome.
    pub fn total(&self) -> u64 {
        lock(&self.shared.traffic).total
    }

    /// The most recent requests (up to 4096), oldest first.
    pub fn recorded(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.traffic)
            .recorded
            .iter()
            .cloned()
            .collect()
    }

    /// The most requests the emulator was ever handling at once.
    pub fn peak_in_flight(&self) -> usize {
        self.shared
            .peak_in_flight
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Bytes `/emulator/bytes/{n}` has produced so far (sent, or buffered to send).
    pub fn bytes_streamed(&self) -> u64 {
        self.shared
            .bytes_streamed
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Requests being handled right now.
    pub fn in_flight(&self) -> usize {
        self.shared
            .in_flight
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn inject(&self, fault: Fault) {
        lock(&self.shared.faults).push(fault);
    }

    pub fn clear_faults(&self) {
        lock(&self.shared.faults).clear();
    }
}

/// Counts a request as in flight until dropped.
struct InFlight<'a>(&'a Shared);

impl<'a> InFlight<'a> {
    fn enter(shared: &'a Shared) -> Self {
        use std::sync::atomic::Ordering::SeqCst;
        let now = shared.in_flight.fetch_add(1, SeqCst) + 1;
        shared.peak_in_flight.fetch_max(now, SeqCst);
        InFlight(shared)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Returned to hyper to make it close the connection without an answer.
#[derive(Debug, thiserror::Error)]
#[error("connection dropped by an injected fault")]
struct ConnectionDropped;
