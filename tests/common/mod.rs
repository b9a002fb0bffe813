//! The test harness: the Comfy emulator and the gateway, in-process, on
//! 127.0.0.1:0, talking real HTTP. Each test gets its own pair.
#![allow(dead_code)]

pub mod log_capture;
pub mod redis_server;
pub mod serve_process;
pub mod wire;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use teamgate::config::{self, Secrets};
use teamgate::emulator::{Account, Emulator, Fault, FaultAction, demo_blob_hash};
use teamgate::{Listeners, run, run_with_reload};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot};
use tokio::task::JoinHandle;

/// Client (gateway) keys of the test teams; their hashes are in the config below.
pub const DESIGN_KEY: &str = "tg_test_design_key_0123456789abcdef";
pub const RESEARCH_KEY: &str = "tg_test_research_key_0123456789abcdef";
pub const NO_CREDENTIAL_KEY: &str = "tg_test_nocred_key_0123456789abcdef";
/// A second key of team design.
pub const DESIGN_KEY_2: &str = "tg_test_design_key_two_0123456789abc";
/// The teams' Comfy keys, as the emulator knows them.
pub const DESIGN_UPSTREAM_KEY: &str = "comfy-upstream-design-5ecret";
pub const RESEARCH_UPSTREAM_KEY: &str = "comfy-upstream-research-5ecret";
/// The admin API token (`admin.token = "env:ADMIN_TOKEN"` where a test sets it).
pub const ADMIN_TOKEN: &str = "admin-token-for-tests";
/// Team design's Scenario key pair (team research has none).
pub const SCN_KEY_DESIGN: &str = "scn-design-key";
pub const SCN_SECRET_DESIGN: &str = "scn-design-5ecret";
pub const SCN_KEY_RESEARCH: &str = "scn-research-key";
pub const SCN_SECRET_RESEARCH: &str = "scn-research-5ecret";

pub fn hash(key: &str) -> String {
    teamgate::auth::keys::KeyDigest::of_key(key).to_stored()
}

/// The SHA-256 of `key`, in hex (the stored form without its `sha256:`).
pub fn hex_sha256(key: &str) -> String {
    hash(key)["sha256:".len()..].to_owned()
}

/// The config every harness runs; `upstream_extra` lands in `[upstreams.comfy]`.
pub fn config_text(base_url: &str, upstream_extra: &str, top_extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
shutdown_grace = "5s"

[upstreams.comfy]
base_url = "{base_url}"
preset = "comfy-cloud"
{upstream_extra}

[teams.design]
upstream_keys = {{ comfy = "env:DESIGN_COMFY_KEY" }}
client_keys = ["{design}", "{design2}"]

[teams.research]
upstream_keys = {{ comfy = "env:RESEARCH_COMFY_KEY" }}
client_keys = ["{research}"]

[teams.nocred]
client_keys = ["{nocred}"]

{top_extra}
"#,
        design = hash(DESIGN_KEY),
        design2 = hash(DESIGN_KEY_2),
        research = hash(RESEARCH_KEY),
        nocred = hash(NO_CREDENTIAL_KEY),
    )
}

pub fn test_env(name: &str) -> Option<String> {
    match name {
        "DESIGN_COMFY_KEY" => Some(DESIGN_UPSTREAM_KEY.into()),
        "RESEARCH_COMFY_KEY" => Some(RESEARCH_UPSTREAM_KEY.into()),
        "ADMIN_TOKEN" => Some(ADMIN_TOKEN.into()),
        "SCN_KEY_DESIGN" => Some(SCN_KEY_DESIGN.into()),
        "SCN_SECRET_DESIGN" => Some(SCN_SECRET_DESIGN.into()),
        "SCN_KEY_RESEARCH" => Some(SCN_KEY_RESEARCH.into()),
        "SCN_SECRET_RESEARCH" => Some(SCN_SECRET_RESEARCH.into()),
        _ => None,
    }
}

pub struct Harness {
    pub emulator: Emulator,
    pub emulator_addr: SocketAddr,
    pub gateway: SocketAddr,
    pub admin: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    pub client: Client<HttpConnector, Full<Bytes>>,
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    /// The `Cache-Status` field's last member (the gateway's on a cached
    /// route; an upstream's own come before it), or "" when absent.
    pub fn cache_status(&self) -> &str {
        self.headers
            .get_all("cache-status")
            .iter()
            .next_back()
            .map_or("", |value| value.to_str().unwrap())
    }

    /// Whether the gateway answered from its cache.
    pub fn is_hit(&self) -> bool {
        self.cache_status().starts_with("teamgate; hit")
    }

    /// Whether this asset list (`{"assets": [...]}`) has an asset named `name`.
    pub fn lists(&self, name: &str) -> bool {
        self.json()["assets"]
            .as_array()
            .unwrap()
            .iter()
            .any(|asset| asset["name"] == name)
    }

    /// The header field `name`'s (first) value, or "" when absent.
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map_or("", |value| value.to_str().unwrap())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&self.body)))
    }

    /// Reads a whole response.
    pub async fn read<B>(response: http::Response<B>) -> Answer
    where
        B: http_body::Body,
        B::Error: std::fmt::Debug,
    {
        let (parts, body) = response.into_parts();
        let body = body.collect().await.expect("the body arrives").to_bytes();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }
}

pub fn accounts() -> Vec<Account> {
    vec![
        Account {
            name: "design".into(),
            api_key: DESIGN_UPSTREAM_KEY.into(),
        },
        Account {
            name: "research".into(),
            api_key: RESEARCH_UPSTREAM_KEY.into(),
        },
    ]
}

/// The emulator every harness starts with: the test accounts, events every 50 ms.
pub fn test_emulator() -> Emulator {
    Emulator::with_event_interval(accounts(), std::time::Duration::from_millis(50))
}

/// An emulator whose event streams send their first event at once and the
/// next a minute later: a stream opened on it stays open through a test.
pub async fn serve_slow_events_emulator() -> (Emulator, SocketAddr) {
    serve_emulator(Emulator::with_event_interval(
        accounts(),
        std::time::Duration::from_secs(60),
    ))
    .await
}

/// Serves `emulator` on 127.0.0.1:0; its address.
pub async fn serve_emulator(emulator: Emulator) -> (Emulator, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    emulator.spawn(listener);
    (emulator, addr)
}

impl Harness {
    pub async fn start() -> Self {
        Self::start_with("").await
    }

    /// Starts with extra settings in `[upstreams.comfy]`.
    pub async fn start_with(upstream_extra: &str) -> Self {
        Self::start_with_config(upstream_extra, "").await
    }

    /// Starts with extra settings in `[server]`.
    pub async fn start_with_server(settings: &str) -> Self {
        let (emulator, addr) = serve_emulator(test_emulator()).await;
        let text = config_text(&format!("http://{addr}"), "", "")
            .replace("[server]\n", &format!("[server]\n{settings}\n"));
        Self::start_with_text(emulator, addr, &text).await
    }

    /// Starts with extra settings in `[upstreams.comfy]` and at the top level.
    pub async fn start_with_config(upstream_extra: &str, top_extra: &str) -> Self {
        let (emulator, emulator_addr) = serve_emulator(test_emulator()).await;
        Self::start_in_front_of_with(
            emulator,
            emulator_addr,
            &format!("http://{emulator_addr}"),
            upstream_extra,
            top_extra,
        )
        .await
    }

    /// Starts a gateway whose upstream is `base_url` (which may point nowhere).
    pub async fn start_in_front_of(
        emulator: Emulator,
        emulator_addr: SocketAddr,
        base_url: &str,
        upstream_extra: &str,
    ) -> Self {
        Self::start_in_front_of_with(emulator, emulator_addr, base_url, upstream_extra, "").await
    }

    /// Starts a gateway with exactly `text` as its config (`{emulator}` is replaced
    /// by the Comfy emulator's address).
    pub async fn start_with_text(
        emulator: Emulator,
        emulator_addr: SocketAddr,
        text: &str,
    ) -> Self {
        let config = config::load_str(text, "test.toml", None, &test_env, Secrets::Resolve)
            .unwrap_or_else(|error| panic!("{error}"));
        Self::start_config(emulator, emulator_addr, config).await
    }

    /// A gateway that shares through `redis` (`[shared] redis`), with the
    /// test admin token, on [`config_text`].
    pub async fn start_shared(
        emulator: Emulator,
        emulator_addr: SocketAddr,
        redis: &redis_server::Redis,
    ) -> Self {
        Self::start_shared_with(emulator, emulator_addr, redis, |text| text).await
    }

    /// [`Harness::start_shared`], its config text edited by `edit` first.
    pub async fn start_shared_with(
        emulator: Emulator,
        emulator_addr: SocketAddr,
        redis: &redis_server::Redis,
        edit: impl FnOnce(String) -> String,
    ) -> Self {
        let shared = format!(
            "[admin]\ntoken = \"env:ADMIN_TOKEN\"\n[shared]\nredis = \"file:{}\"\n",
            redis.url_file().display()
        );
        let text = edit(config_text(&format!("http://{emulator_addr}"), "", &shared));
        Self::start_with_text(emulator, emulator_addr, &text).await
    }

    pub async fn start_in_front_of_with(
        emulator: Emulator,
        emulator_addr: SocketAddr,
        base_url: &str,
        upstream_extra: &str,
        top_extra: &str,
    ) -> Self {
        let text = config_text(base_url, upstream_extra, top_extra);
        let config = config::load_str(&text, "test.toml", None, &test_env, Secrets::Resolve)
            .unwrap_or_else(|error| panic!("{error}"));
        Self::start_config(emulator, emulator_addr, config).await
    }

    /// Starts a gateway from the config file at `path` (secrets from
    /// [`test_env`]) as `teamgate serve` does: `POST /admin/reload` reads it again.
    pub async fn start_from_file(
        emulator: Emulator,
        emulator_addr: SocketAddr,
        path: &std::path::Path,
    ) -> Self {
        let config = config::load_file(path, &test_env, Secrets::Resolve)
            .unwrap_or_else(|error| panic!("{error}"));
        let file = teamgate::reload::ConfigFile {
            path: path.to_owned(),
            env: test_env,
        };
        Self::start_with_source(emulator, emulator_addr, config, Some(file)).await
    }

    async fn start_config(
        emulator: Emulator,
        emulator_addr: SocketAddr,
        config: teamgate::config::Config,
    ) -> Self {
        Self::start_with_source(emulator, emulator_addr, config, None).await
    }

    async fn start_with_source(
        emulator: Emulator,
        emulator_addr: SocketAddr,
        config: teamgate::config::Config,
        file: Option<teamgate::reload::ConfigFile>,
    ) -> Self {
        let listeners = Listeners {
            gateway: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            admin: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        };
        let gateway = listeners.gateway.local_addr().unwrap();
        let admin = listeners.admin.local_addr().unwrap();
        let (shutdown, stopped) = oneshot::channel::<()>();
        let stopped = async {
            let _ = stopped.await;
        };
        let task = match file {
            None => tokio::spawn(run(listeners, Arc::new(config), stopped)),
            Some(file) => tokio::spawn(run_with_reload(listeners, Arc::new(config), file, stopped)),
        };
        Harness {
            emulator,
            emulator_addr,
            gateway,
            admin,
            shutdown: Some(shutdown),
            task: Some(task),
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{path_and_query}", self.gateway)
    }

    /// Submits a job with `key` and opens its event stream (v2
    /// `GET /api/v2/jobs/{id}/events`, `text/event-stream`): the answer's
    /// head, and its body once the first event (the job's status) has
    /// arrived — within 20 s, while the stream is still open.
    pub async fn open_job_events(&self, key: &str) -> (HeaderMap, hyper::body::Incoming) {
        let submitted = self
            .call(
                Method::POST,
                "/api/prompt",
                Some(key),
                Some(serde_json::json!({"prompt": {}})),
            )
            .await;
        let job = submitted.json()["prompt_id"].as_str().unwrap().to_owned();
        let request = Request::get(self.url(&format!("/api/v2/jobs/{job}/events")))
            .header("authorization", format!("Bearer {key}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = self.client.request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        let (head, mut body) = response.into_parts();
        let first = tokio::time::timeout(std::time::Duration::from_secs(20), body.frame())
            .await
            .expect("the first event arrives while the stream is still open")
            .unwrap()
            .unwrap()
            .into_data()
            .unwrap();
        assert!(first.starts_with(b"event: status\n"), "{first:?}");
        (head.headers, body)
    }

    pub async fn send(&self, request: Request<Full<Bytes>>) -> Answer {
        let response = self
            .client
            .request(request)
            .await
            .expect("the gateway answers");
        Answer::read(response).await
    }

    /// A request with the design team's key in `X-API-Key`.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        json: Option<serde_json::Value>,
    ) -> Answer {
        let mut builder = Request::builder().method(method).uri(self.url(path));
        if let Some(key) = key {
            builder = builder.header("x-api-key", key);
        }
        let body = match json {
            Some(json) => {
                builder = builder.header("content-type", "application/json");
                Full::new(Bytes::from(json.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        self.send(builder.body(body).unwrap()).await
    }

    /// `POST /api/assets/from-hash` of the emulator's demo blob under `name`,
    /// tagged `input`: the asset-creating write most tests need.
    pub async fn create_asset(&self, key: &str, name: &str) -> Answer {
        self.call(
            Method::POST,
            "/api/assets/from-hash",
            Some(key),
            Some(serde_json::json!({"hash": demo_blob_hash(), "name": name, "tags": ["input"]})),
        )
        .await
    }

    pub async fn get(&self, path: &str, key: &str) -> Answer {
        self.call(Method::GET, path, Some(key), None).await
    }

    /// Sends a request with arbitrary extra headers.
    pub async fn get_with(&self, path: &str, key: &str, headers: &[(&str, &str)]) -> Answer {
        self.request_with(Method::GET, path, key, headers).await
    }

    pub async fn request_with(
        &self,
        method: Method,
        path: &str,
        key: &str,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut builder = Request::builder()
            .method(method)
            .uri(self.url(path))
            .header("x-api-key", key);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        self.send(builder.body(Full::new(Bytes::new())).unwrap())
            .await
    }

    pub async fn admin_get(&self, path: &str) -> Answer {
        self.admin_call(Method::GET, path, None).await
    }

    /// The `/metrics` exposition.
    pub async fn metrics_text(&self) -> String {
        String::from_utf8(self.admin_get("/metrics").await.body.to_vec()).unwrap()
    }

    /// Waits (20 s at most) until `/metrics` has the series `name` with
    /// `labels` at a value `wanted` accepts; that value.
    pub async fn wait_for_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        wanted: impl Fn(f64) -> bool,
    ) -> f64 {
        for _ in 0..2000 {
            if let Some(value) = self.metric(name, labels).await.filter(|v| wanted(*v)) {
                return value;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("{name} {labels:?} never became what was waited for");
    }

    /// Waits (20 s at most) until `teamgate_cache_fanout_subscribed` is
    /// `value`: 1 while this instance hears the others (`[shared] redis`).
    pub async fn until_subscribed(&self, value: f64) {
        self.wait_for_metric("teamgate_cache_fanout_subscribed", &[], |v| v == value)
            .await;
    }

    /// Starts `GET /emulator/bytes/{size}` with `key` — the emulator's
    /// download, with a `Content-Length`, or `chunked` without one — and
    /// checks the head; the answer's body, unread.
    pub async fn start_download(
        &self,
        key: &str,
        size: u64,
        chunked: bool,
    ) -> hyper::body::Incoming {
        let query = if chunked { "?chunked" } else { "" };
        let request = Request::get(self.url(&format!("/emulator/bytes/{size}{query}")))
            .header("x-api-key", key)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = self.client.request(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let length = response.headers().get("content-length");
        if chunked {
            assert_eq!(length, None);
        } else {
            assert_eq!(length.unwrap(), size.to_string().as_str());
        }
        response.into_body()
    }

    /// How many of this instance's quota rounds with Redis ended in
    /// `outcome` (`ok`, `failed`); the series exist from the start.
    pub async fn quota_rounds(&self, outcome: &str) -> f64 {
        self.metric("teamgate_quota_sync_total", &[("outcome", outcome)])
            .await
            .expect("the quota round series exist from the start")
    }

    /// One series of `/metrics` (see [`sample`]).
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        sample(&self.metrics_text().await, name, labels)
    }

    /// `method path` on the admin listener, with `token` as the bearer token.
    pub async fn admin_call(&self, method: Method, path: &str, token: Option<&str>) -> Answer {
        let mut request = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.admin));
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        self.send(request.body(Full::new(Bytes::new())).unwrap())
            .await
    }

    /// Triggers shutdown and waits for `run` to return, which must be `Ok`.
    pub async fn stop(mut self) {
        let _ = self.shutdown.take().unwrap().send(());
        self.task
            .take()
            .unwrap()
            .await
            .unwrap()
            .expect("run returns Ok");
    }

    pub fn trigger_shutdown(&mut self) {
        let _ = self.shutdown.take().unwrap().send(());
    }

    pub async fn stopped(mut self) -> anyhow::Result<()> {
        self.task.take().unwrap().await.unwrap()
    }
}

/// The value of the Prometheus sample of `name` in `text` whose labels include all of `labels`.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} "))
        })
        .find(|line| {
            labels
                .iter()
                .all(|(key, value)| line.contains(&format!("{key}=\"{value}\"")))
        })
        .and_then(|line| line.rsplit(' ').next())
        .map(|value| value.parse().unwrap())
}

/// Every byte the upstream received for all recorded requests, headers and targets.
pub fn everything_upstream_saw(emulator: &Emulator) -> String {
    let mut seen = String::new();
    for request in emulator.recorded() {
        seen.push_str(&request.target);
        seen.push('\n');
        for (name, value) in &request.headers {
            seen.push_str(name.as_str());
            seen.push_str(": ");
            seen.push_str(&String::from_utf8_lossy(value.as_bytes()));
            seen.push('\n');
        }
    }
    seen
}

/// VmHWM (peak resident set) of this process, in bytes.
pub fn peak_rss() -> u64 {
    proc_status_kib("VmHWM:") * 1024
}

/// VmRSS (resident set now) of this process, in bytes.
pub fn current_rss() -> u64 {
    proc_status_kib("VmRSS:") * 1024
}

/// Resets VmHWM to the current RSS (Linux `clear_refs` value 5).
pub fn reset_peak_rss() {
    std::fs::write("/proc/self/clear_refs", "5")
        .expect("clear_refs is writable for our own process");
}

fn proc_status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|line| line.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Sends `GET url` with `key` in `X-API-Key` on a task of its own; the task
/// yields the whole answer. For requests that must be in flight while a test
/// does something else (held fills, races, coalescing).
pub fn spawn_get(
    client: &Client<HttpConnector, Full<Bytes>>,
    url: String,
    key: &'static str,
) -> JoinHandle<Answer> {
    let client = client.clone();
    tokio::spawn(async move {
        let request = Request::get(url)
            .header("x-api-key", key)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let response = client.request(request).await.expect("the gateway answers");
        Answer::read(response).await
    })
}

/// Installs the gateway's own logging (text, info) and trace export to an
/// OTLP receiver at `addr`, every span sampled. Once per test binary: the
/// subscriber is global.
pub fn export_traces_to(
    addr: SocketAddr,
    protocol: config::OtlpProtocol,
) -> teamgate::telemetry::traces::TelemetryGuard {
    let settings = config::TraceSettings {
        endpoint: Some(format!("http://{addr}")),
        protocol,
        service_name: "teamgate-test".into(),
        sample_ratio: 1.0,
    };
    let log = config::LogSettings {
        format: config::LogFormat::Text,
        level: "info".into(),
    };
    teamgate::telemetry::traces::init(&log, &settings).expect("telemetry starts")
}

/// Waits (bounded: 2000 checks, 5 ms apart) until `check` holds; panics
/// with `what` if it never does.
pub async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..2000 {
        if check().await {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// Makes the upstream close the connection on the next `path` request
/// without answering, as a crashed upstream would. Twice: when that happens on
/// a pooled connection the gateway retries an idempotent request once on a
/// new connection (the close may be an idle timeout racing the request), so
/// the second close is the one the client sees as a 502.
pub fn drop_next_connection(emulator: &Emulator, path: &str) {
    emulator.inject(Fault::new(None, path, FaultAction::Drop).times(2));
}

/// Injects a fault built from a fresh gate on the next `method path`
/// request and returns the gate: that request waits at the emulator until
/// the test adds a permit. `make` is `FaultAction::Hold` (wait before
/// answering) or `FaultAction::HoldResponse` (compute the answer, then wait).
pub fn hold_once(
    emulator: &Emulator,
    method: Option<Method>,
    path: &str,
    make: fn(Arc<Semaphore>) -> FaultAction,
) -> Arc<Semaphore> {
    let gate = Arc::new(Semaphore::new(0));
    emulator.inject(Fault::new(method, path, make(Arc::clone(&gate))).times(1));
    gate
}

/// POSTs `chunks` as one streamed body (share one `Bytes` so the client itself
/// holds almost nothing) and returns the answer with how much this process's
/// peak RSS grew while it was sent and answered.
pub async fn post_streamed(
    h: &Harness,
    path: &str,
    headers: &[(&str, String)],
    chunks: impl Iterator<Item = Bytes> + Send + Sync + 'static,
) -> (Answer, u64) {
    use http_body::Frame;
    use http_body_util::StreamBody;
    use http_body_util::combinators::BoxBody;
    let frames = chunks.map(|bytes| Ok::<_, std::convert::Infallible>(Frame::data(bytes)));
    let body = BoxBody::new(StreamBody::new(futures_util::stream::iter(frames)));
    let client: Client<_, BoxBody<Bytes, std::convert::Infallible>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut request = Request::post(h.url(path)).header("x-api-key", DESIGN_KEY);
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let request = request.body(body).unwrap();

    let idle = current_rss();
    reset_peak_rss();
    let response = client.request(request).await.expect("the gateway answers");
    let answer = Answer::read(response).await;
    (answer, peak_rss().saturating_sub(idle))
}
