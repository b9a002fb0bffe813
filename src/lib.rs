//! teamgate: an authenticated caching reverse proxy for AI-generation cloud APIs.
//!
//! Team members call teamgate with their own gateway keys; teamgate holds the
//! team's real upstream keys (Comfy Cloud, Scenario), injects them, and
//! forwards everything else unchanged.
//!
//! # Layout
//! - [`run`] is the one entry point: `main`, `demo`, the tests and the
//!   benchmarks all call it with listeners they bound themselves.
//! - [`config`] loads and validates the TOML file (secrets by reference).
//! - [`server`] serves each accepted connection's bodiless requests itself
//!   and hands the connection to hyper at the first request it does not.
//! - [`connection`] is the service a connection calls: the stack, called in
//!   place, with the peer's address on every request.
//! - [`stack`] assembles the request path; each layer lives in its own module:
//!   [`telemetry`] (request id, span, access log), [`route`] (classification),
//!   [`auth`] (client keys, credential injection), [`proxy`] (upstream clients).
//! - [`wire`] holds the HTTP/1.1 pieces the client side and the upstream
//!   side share (header spans, field writing, `Connection` options).
//! - [`fields`] lets a cache hit's answer share the entry's encoded header
//!   fields instead of carrying a copy.
//! - [`error`] renders every answer the gateway makes itself.
//! - [`reload`] reads the config file again and swaps in its teams.
//! - [`admin`] serves `/healthz` and `/readyz` on a separate listener.
//! - [`emulator`] is an in-memory Comfy Cloud for `demo`, tests and benches.

#![doc(html_no_source)]

pub mod admin;
pub mod auth;
pub mod body;
pub mod cache;
pub mod config;
pub mod connection;
pub mod demo;
pub mod emulator;
pub mod error;
pub mod fields;
pub mod limit;
pub mod proxy;
pub mod reload;
pub mod route;
pub mod server;
pub mod shared;
pub mod stack;
pub mod telemetry;
pub mod tls;
pub mod wire;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};

use crate::admin::Readiness;
use crate::auth::inject::ClientAddr;
use crate::config::Config;

/// With `[shared] redis`: serves the managed keys each time the instance
/// reads them (`auth::managed`), and says so to the fan-out, which waits for
/// it before confirming a change to the other instances.
fn serve_managed_keys(live: &Arc<reload::Live>) -> Option<tokio::task::JoinHandle<()>> {
    let fanout = live.shared().fanout?;
    let live = Arc::clone(live);
    let mut read = fanout.managed_keys();
    Some(tokio::spawn(async move {
        loop {
            let keys = read.borrow_and_update().clone();
            if keys.version > 0 {
                live.serve_managed_keys(keys.keys).await;
                fanout.managed_keys_served(keys.version);
            }
            if read.changed().await.is_err() {
                return;
            }
        }
    }))
}

/// The sockets the gateway serves on. The caller binds them (port 0 in tests).
#[derive(Debug)]
pub struct Listeners {
    pub gateway: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    /// Binds the addresses from the config.
    pub async fn bind(config: &Config) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let gateway = TcpListener::bind(config.server.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.server.listen))?;
        let admin = TcpListener::bind(config.server.admin_listen)
            .await
            .with_context(|| format!("cannot listen on {} (admin)", config.server.admin_listen))?;
        Ok(Listeners { gateway, admin })
    }
}

/// Serves until `shutdown` resolves, then stops accepting, lets in-flight
/// requests finish for up to `server.shutdown_grace`, and returns. The
/// config is fixed: see [`run_with_reload`] for one read from a file.
pub async fn run(
    listeners: Listeners,
    config: Arc<Config>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    serve(listeners, config, None, shutdown).await
}

/// [`run`], for a config read from `file`: `SIGHUP` and `POST /admin/reload`
/// read it again and apply its teams (see [`reload`]).
pub async fn run_with_reload(
    listeners: Listeners,
    config: Arc<Config>,
    file: reload::ConfigFile,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    serve(listeners, config, Some(file), shutdown).await
}

async fn serve(
    listeners: Listeners,
    config: Arc<Config>,
    file: Option<reload::ConfigFile>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let readiness = Readiness::default();
    let reloads_on_signal = file.is_some();
    let live = Arc::new(reload::Live::new(
        stack::Shared::new(Arc::clone(&config)),
        file,
    ));
    let hangups = if reloads_on_signal {
        reload_on_hangup(&live)
    } else {
        None
    };
    let managed_keys = serve_managed_keys(&live);
    // Idle per-key limiter state is dropped periodically, so it stays bounded.
    let sweeper = {
        let live = Arc::clone(&live);
        // `[limits]` is fixed at start: the interval never changes.
        let interval = config.limits.sweep_interval;
        tokio::spawn(async move {
            let mut every = tokio::time::interval(interval);
            loop {
                every.tick().await;
                live.shared().quotas.retain_recent();
            }
        })
    };
    let (admin_stop, admin_stopped) = tokio::sync::watch::channel(false);
    let admin_state = admin::AdminState {
        readiness: readiness.clone(),
        live: Arc::clone(&live),
    };
    let admin = tokio::spawn(serve_admin(
        listeners.admin,
        admin_state,
        config.server.header_read_timeout,
        admin_stopped,
    ));
    let builder = Arc::new(client_connection_builder(&config.server));
    let graceful = GracefulShutdown::new();
    let tls = match &config.server.tls {
        Some(settings) => Some(tls::Tls::new(settings).map_err(anyhow::Error::msg)?),
        None => None,
    };
    let tls_watcher = tls.clone().map(|tls| tokio::spawn(tls.watch()));
    let handshake_timeout = config.server.header_read_timeout;
    let connection_slots = Arc::new(tokio::sync::Semaphore::new(config.server.max_connections));
    // Tells the gateway's own HTTP/1 loops to stop (hyper's connections hear `graceful`).
    let stop = tokio_util::sync::CancellationToken::new();
    tracing::info!(
        listen = %listeners.gateway.local_addr()?,
        upstreams = config.upstreams.len(),
        teams = config.teams.len(),
        "teamgate serving"
    );

    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            (stream, peer) = accept(&listeners.gateway, "gateway") => {
                let Ok(slot) = Arc::clone(&connection_slots).try_acquire_owned() else {
                    tokio::spawn(refuse_connection(stream));
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let service = connection::ConnectionService::new(Arc::clone(live.stack()), ClientAddr::new(peer), tls.is_some());
                let builder = Arc::clone(&builder);
                let watcher = graceful.watcher();
                let acceptor = tls.as_ref().map(|tls| tls.acceptor.clone());
                let stop = stop.clone();
                tokio::spawn(async move {
                    let served = match acceptor {
                        None => serve_client(stream, false, service, &builder, watcher, handshake_timeout, stop).await,
                        Some(acceptor) => {
                            // The handshake counts against the header-read timeout (slowloris over TLS).
                            match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                                Ok(Ok(stream)) => {
                                    let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                                    serve_client(stream, h2, service, &builder, watcher, handshake_timeout, stop).await
                                }
                                Ok(Err(error)) => {
                                    tracing::debug!(%error, %peer, "TLS handshake failed");
                                    Ok(())
                                }
                                Err(_) => {
                                    tracing::debug!(%peer, "TLS handshake timed out");
                                    Ok(())
                                }
                            }
                        }
                    };
                    if let Err(error) = served {
                        tracing::debug!(%error, %peer, "client connection ended with an error");
                    }
                    drop(slot);
                });
            }
            () = &mut shutdown => break,
        }
    }

    readiness.start_draining();
    drop(listeners.gateway);
    stop.cancel();
    tracing::info!(grace = ?config.server.shutdown_grace, "shutting down: draining in-flight requests");
    if tokio::time::timeout(config.server.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace period over; remaining connections are closed");
    }
    sweeper.abort();
    if let Some(hangups) = hangups {
        hangups.abort();
    }
    if let Some(managed_keys) = managed_keys {
        managed_keys.abort();
    }
    if let Some(watcher) = tls_watcher {
        watcher.abort();
    }
    let _ = admin_stop.send(true);
    let _ = admin.await;
    tracing::info!("teamgate stopped");
    Ok(())
}

/// Reloads `live` on every `SIGHUP`, in a task of its own (`None` when the
/// signal cannot be watched: reloads then come through the admin API only).
fn reload_on_hangup(live: &Arc<reload::Live>) -> Option<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(error) => {
            tracing::warn!(%error, "no SIGHUP handler: reload through the admin API only");
            return None;
        }
    };
    let live = Arc::clone(live);
    Some(tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            // `reload` logs and counts the outcome.
            let _ = live.reload().await;
        }
    }))
}

/// One client connection: the gateway's own HTTP/1 loop first ([`server`]),
/// then hyper if a request needs it; hyper from the start when TLS agreed on
/// h2. The connection holds `watcher` either way, so shutdown waits for it.
async fn serve_client<I, S>(
    io: I,
    h2_agreed: bool,
    service: connection::ConnectionService<S>,
    builder: &auto::Builder<TokioExecutor>,
    watcher: hyper_util::server::graceful::Watcher,
    header_read_timeout: Duration,
    stop: tokio_util::sync::CancellationToken,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<
            http::Request<body::Body>,
            Response = http::Response<body::Body>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let io = if h2_agreed {
        server::Prefixed::nothing_read(io)
    } else {
        match server::serve(io, &service, header_read_timeout, stop).await {
            server::Ended::Closed => return Ok(()),
            server::Ended::HandOff(io) => io,
        }
    };
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    watcher.watch(connection.into_owned()).await
}

/// HTTP/1.1 and h2c (prior knowledge) on one port, with the protocol-level
/// limits from the config: the header-read timeout (slowloris) and hyper's own
/// buffer bound, set above `max_header_bytes` so the 431 the stack answers (in
/// the upstream's JSON shape) is the one clients normally see.
fn client_connection_builder(settings: &config::ServerSettings) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        // Without this, hyper copies every body into its head buffer here
        // (it does not see this connection as vectored). Cached bodies are
        // `Bytes` already: one `writev` sends head and body as they are.
        .writev(true)
        .max_buf_size((settings.max_header_bytes * 2).max(16 * 1024));
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_header_list_size(u32::try_from(settings.max_header_bytes * 2).unwrap_or(u32::MAX));
    builder
}

/// Over `max_connections`: a short 503 in the primary upstream's JSON shape, then close.
async fn refuse_connection(mut stream: TcpStream) {
    use tokio::io::AsyncWriteExt;
    let body =
        error::GatewayError::TooManyConnections.json_body(error::ErrorShape::ComfyFlat, None);
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(&body).await;
    let _ = stream.shutdown().await;
    tracing::warn!("connection refused: at server.max_connections");
}

/// How long a listener waits after a failed `accept` before the next.
const ACCEPT_RETRY_AFTER: Duration = Duration::from_millis(50);

/// The next connection on `listener` (`name`d in the log). A failed
/// `accept` (out of file descriptors, most often) is logged and tried again
/// after [`ACCEPT_RETRY_AFTER`]: the connection that could not be taken stays
/// in the kernel's queue, so the listener stays readable and an immediate
/// retry would fail the same way, in a loop that takes a whole core.
/// Cancel-safe, as `TcpListener::accept` is: for `select!` loops.
pub(crate) async fn accept(
    listener: &TcpListener,
    name: &'static str,
) -> (TcpStream, std::net::SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(error) => {
                tracing::warn!(listener = name, %error, retry_after = ?ACCEPT_RETRY_AFTER, "accept failed");
                tokio::time::sleep(ACCEPT_RETRY_AFTER).await;
            }
        }
    }
}

/// The admin port: health, readiness, metrics and cache administration, for
/// operators and scrapers. The same header-read timeout as the gateway port,
/// so a client that never finishes a head cannot hold a connection open here
/// either.
async fn serve_admin(
    listener: TcpListener,
    state: admin::AdminState,
    header_read_timeout: Duration,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    loop {
        tokio::select! {
            (stream, _) = accept(&listener, "admin") => {
                let state = state.clone();
                let service = hyper::service::service_fn(move |request| admin::handle(state.clone(), request));
                let connection = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                tokio::spawn(async move {
                    let _ = connection.await;
                });
            }
            _ = stopped.changed() => return,
        }
    }
}
