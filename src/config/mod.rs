//! Typed configuration: the TOML file, environment overrides, validation.
//!
//! Loading happens in two passes so an operator sees every problem at once:
//! 1. the TOML is parsed into the `File*` structs (a syntax or type error stops
//!    here); unknown keys are collected rather than failing on the first;
//! 2. `validate` turns that into the runtime [`Config`], collecting every
//!    problem — bad URLs, unknown presets, unresolvable secrets, duplicate
//!    client keys — each with the key it belongs to.
//!
//! Precedence: environment override > file > built-in default. The overrides
//! (`TEAMGATE_LISTEN`, `TEAMGATE_ADMIN_LISTEN`, `TEAMGATE_UPSTREAM_<NAME>_BASE_URL`,
//! `TEAMGATE_LOG_FORMAT`) cover the settings a deployment changes per environment.

pub mod preset;
pub mod secret;

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{HeaderValue, Uri};
use serde::Deserialize;

use crate::auth::keys::{KeyDigest, KeyStore};
use crate::auth::managed::ManagedKeyList;
use crate::cache::policy::{
    CachePolicy, CredentialId, MethodMatch, Partition, ReadRule, ScopeTemplate, WriteRule,
    parse_match,
};
use crate::limit::quota::{QuotaSpec, parse_rate};
use base64::Engine as _;
pub use preset::{CredentialKind, CredentialPlacement, Preset, RouteRule};
pub use secret::Secret;

/// The validated configuration the gateway runs with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it came from (a path, or `<demo>`), for messages.
    pub origin: String,
    pub server: ServerSettings,
    pub log: LogSettings,
    /// In declaration order; `Upstream::index` is the position here.
    pub upstreams: Vec<Arc<Upstream>>,
    pub teams: Vec<Arc<Team>>,
    /// Client key hash → team: the file's, and the managed keys served.
    pub keys: KeyStore<Team>,
    /// The managed keys among `keys` (`crate::auth::managed`; none in a
    /// config as loaded from its file).
    pub managed_keys: ManagedKeyList,
    pub cache: CacheSettings,
    pub admin: AdminSettings,
    pub limits: LimitSettings,
    pub traces: TraceSettings,
    /// State shared with the gateway's other instances (`[shared]`).
    pub shared: SharedSettings,
    /// The file's settings a reload cannot change: all but `[teams]` and
    /// `[admin]`, as written (see [`Config::restart_changes`]).
    restart_settings: toml::Table,
}

impl Config {
    /// The keys whose settings differ between `self` and `newer` and need a
    /// restart to take effect: everything outside `[teams]` and `[admin]`,
    /// compared as the files wrote them (dotted keys, sorted; empty when only
    /// teams or the admin token changed).
    pub fn restart_changes(&self, newer: &Config) -> Vec<String> {
        let mut changed = Vec::new();
        table_changes(
            &self.restart_settings,
            &newer.restart_settings,
            "",
            &mut changed,
        );
        changed.sort();
        changed
    }
}

/// The dotted keys under which `old` and `new` differ, appended to `changed`.
fn table_changes(old: &toml::Table, new: &toml::Table, prefix: &str, changed: &mut Vec<String>) {
    let keys = old
        .keys()
        .chain(new.keys().filter(|key| !old.contains_key(*key)));
    for key in keys {
        let dotted = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match (old.get(key), new.get(key)) {
            (Some(toml::Value::Table(old)), Some(toml::Value::Table(new))) => {
                table_changes(old, new, &dotted, changed);
            }
            (old, new) if old != new => changed.push(dotted),
            _ => {}
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct CacheSettings {
    /// Total bytes of cached responses (keys, headers, bodies).
    pub max_bytes: u64,
    /// A response bigger than this streams through uncached.
    pub max_entry_bytes: usize,
}

/// `[shared]`: what several instances of the gateway share through Redis.
#[derive(Debug, Clone)]
pub struct SharedSettings {
    /// `redis://[user:password@]host[:port][/db]`, from an `env:`/`file:`
    /// reference (it may hold a password). `None`: this instance shares
    /// nothing (one instance, or instances that must not cache).
    pub redis: Option<Secret>,
    /// The pub/sub channel cache invalidations travel on; instances on the
    /// same channel share them, and their quotas (the Redis keys of the
    /// shared buckets start with it).
    pub channel: String,
    /// How often each instance reports what its quotas admitted and reads
    /// back what the others' did (see `limit::shared`).
    pub quota_sync: Duration,
    /// PEM certificates a `rediss://` server's certificate is checked
    /// against, from `redis_ca`; `None`: the public roots (webpki-roots).
    pub redis_ca: Option<Arc<[u8]>>,
}

impl Default for SharedSettings {
    fn default() -> Self {
        SharedSettings {
            redis: None,
            channel: DEFAULT_SHARED_CHANNEL.to_owned(),
            quota_sync: DEFAULT_QUOTA_SYNC,
            redis_ca: None,
        }
    }
}

/// `shared.quota_sync` when the file names none.
pub const DEFAULT_QUOTA_SYNC: Duration = Duration::from_millis(100);

/// The channel of `[shared]` when the file names none.
pub const DEFAULT_SHARED_CHANNEL: &str = "teamgate:cache";

#[derive(Debug, Clone, Default)]
pub struct AdminSettings {
    /// Bearer token for the admin API's writes (cache purge); `None` disables them.
    pub token: Option<Secret>,
}

#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// How long in-flight requests may run on after SIGTERM/SIGINT.
    pub shutdown_grace: Duration,
    /// Add `X-Forwarded-For` and `X-Forwarded-Proto` to forwarded requests.
    pub forwarded_headers: bool,
    /// Add `Via: 1.1 teamgate` to forwarded requests.
    pub via: bool,
    /// Request line + header section, in bytes; above it: 431.
    pub max_header_bytes: usize,
    /// Request body, in bytes; above it: 413.
    pub max_request_body: u64,
    /// A client must send its whole header section within this (slowloris),
    /// on the gateway port and the admin port alike.
    pub header_read_timeout: Duration,
    /// Concurrent client connections; beyond: a 503 and the connection is closed.
    pub max_connections: usize,
    /// A websocket tunnel with no traffic either way for this long is closed.
    pub websocket_idle_timeout: Duration,
    /// Terminate TLS for clients (`[server.tls]`); plain HTTP when absent.
    pub tls: Option<TlsSettings>,
}

/// `[server.tls]`: PEM files, re-read when they change.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub reload_interval: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// OpenTelemetry trace export (`[telemetry.traces]`, or the standard `OTEL_*` variables).
#[derive(Debug, Clone, PartialEq)]
pub struct TraceSettings {
    /// The collector; `None` turns export off.
    pub endpoint: Option<String>,
    pub protocol: OtlpProtocol,
    pub service_name: String,
    /// The share of new traces recorded (a client's sampled `traceparent` is always followed).
    pub sample_ratio: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// OTLP over HTTP with protobuf bodies (`http/protobuf`, port 4318).
    HttpProtobuf,
    /// OTLP over gRPC (`grpc`, port 4317).
    Grpc,
}

#[derive(Debug, Clone)]
pub struct LogSettings {
    pub format: LogFormat,
    /// An `EnvFilter` directive; `RUST_LOG` wins when set.
    pub level: String,
}

/// One upstream API the gateway fronts.
#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    pub index: usize,
    pub scheme: Scheme,
    pub authority: Authority,
    /// The base URL's path without a trailing `/` (`""` for Comfy, `/v1` for Scenario).
    pub base_path: String,
    /// The value of `Host` on forwarded requests.
    pub host_header: HeaderValue,
    /// The gateway path prefix this upstream is served under (`/` or `/scenario`).
    pub mount: String,
    pub preset: Preset,
    pub timeouts: UpstreamTimeouts,
    /// The roots trusted for an https upstream (`ca_file`); `None` means the
    /// public web roots (webpki-roots).
    pub trusted_roots: Option<rustls::RootCertStore>,
    /// Config rules first, then the preset's (unless `preset_rules = false`); empty when disabled.
    pub cache: CachePolicy,
    /// Let the preset's public reads through without a gateway key (Scenario's
    /// `Authorization: public-auth-token`). Off by default.
    pub public_reads: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct UpstreamTimeouts {
    /// TCP (and TLS) connection establishment.
    pub connect: Duration,
    /// From the end of the request body to the response headers.
    pub response: Duration,
    /// How long an unused pooled connection is kept.
    pub pool_idle: Duration,
}

/// A team's quotas, as configured (the limiter state lives in `limit::Quotas`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TeamLimits {
    /// Every request of the team, cache hits included.
    pub client: Option<QuotaSpec>,
    /// Every request, per client key.
    pub per_key: Option<QuotaSpec>,
    /// Only what really goes upstream (per upstream).
    pub upstream: UpstreamLimits,
    /// Per route class, every request.
    pub routes: Vec<RouteQuota>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct UpstreamLimits {
    pub rate: Option<QuotaSpec>,
    pub max_in_flight: Option<u32>,
    /// How long a request may wait for an in-flight slot before it is refused.
    pub queue_timeout: Duration,
}

/// A quota on the requests matching `METHODS /pattern` (optionally of one upstream).
#[derive(Debug, Clone, PartialEq)]
pub struct RouteQuota {
    /// The `match` as written; the quota's name in `RateLimit` headers.
    pub label: String,
    pub methods: MethodMatch,
    pub pattern: crate::route::PathPattern,
    pub upstream: Option<String>,
    pub spec: QuotaSpec,
}

/// Gateway-wide quota settings (`[limits]`).
#[derive(Debug, Clone, Copy)]
pub struct LimitSettings {
    /// Pause a team's upstream budget when the upstream answers 429 with `Retry-After`.
    pub pause_on_upstream_429: bool,
    /// The longest such pause.
    pub max_pause: Duration,
    /// How often idle per-key limiter state is dropped.
    pub sweep_interval: Duration,
}

/// A team: its upstream credentials. Client keys point here through `Config::keys`.
#[derive(Debug)]
pub struct Team {
    pub name: String,
    pub limits: TeamLimits,
    /// Indexed by `Upstream::index`; `None` where the team has no credential.
    credentials: Vec<Option<(Secret, CredentialId)>>,
}

impl Team {
    pub fn new(
        name: impl Into<String>,
        credentials: Vec<Option<Secret>>,
        limits: TeamLimits,
    ) -> Self {
        Team {
            name: name.into(),
            limits,
            credentials: credentials
                .into_iter()
                .map(|secret| {
                    secret.map(|secret| {
                        let id = CredentialId::of(secret.expose());
                        (secret, id)
                    })
                })
                .collect(),
        }
    }

    pub fn credential_for(&self, upstream: &Upstream) -> Option<&Secret> {
        self.credentials
            .get(upstream.index)
            .and_then(Option::as_ref)
            .map(|(secret, _)| secret)
    }

    /// The cache partition identity of this team's credential for `upstream`.
    pub fn credential_id_for(&self, upstream: &Upstream) -> Option<CredentialId> {
        self.credentials
            .get(upstream.index)
            .and_then(Option::as_ref)
            .map(|(_, id)| *id)
    }

    /// The cache partitions this team's entries are in: one per upstream it
    /// holds a credential for.
    pub fn cache_partitions(&self) -> impl Iterator<Item = Partition> + '_ {
        self.credentials
            .iter()
            .enumerate()
            .filter_map(|(upstream, credential)| {
                credential.as_ref().map(|(_, id)| Partition::Team {
                    upstream,
                    credential: *id,
                })
            })
    }
}

/// Everything wrong with a config file.
#[derive(Debug)]
pub struct ConfigError {
    pub origin: String,
    pub problems: Vec<Problem>,
}

/// One problem: the key it is about and what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = self.problems.len();
        writeln!(
            f,
            "{}: {count} problem{}:",
            self.origin,
            if count == 1 { "" } else { "s" }
        )?;
        for problem in &self.problems {
            writeln!(f, "  {}: {}: {}", self.origin, problem.key, problem.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

// ---- The file format ------------------------------------------------------

#[derive(Debug, Default, Deserialize)]
struct FileConfig {
    #[serde(default)]
    server: FileServer,
    #[serde(default)]
    log: FileLog,
    #[serde(default)]
    upstreams: BTreeMap<String, FileUpstream>,
    #[serde(default)]
    teams: BTreeMap<String, FileTeam>,
    #[serde(default)]
    cache: FileCache,
    #[serde(default)]
    admin: FileAdmin,
    #[serde(default)]
    limits: FileLimitSettings,
    #[serde(default)]
    telemetry: FileTelemetry,
    #[serde(default)]
    shared: FileShared,
}

#[derive(Debug, Default, Deserialize)]
struct FileShared {
    redis: Option<String>,
    channel: Option<String>,
    quota_sync: Option<String>,
    redis_ca: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct FileTelemetry {
    #[serde(default)]
    traces: FileTraces,
}

#[derive(Debug, Default, Deserialize)]
struct FileTraces {
    otlp_endpoint: Option<String>,
    protocol: Option<String>,
    service_name: Option<String>,
    sample_ratio: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
struct FileLimitSettings {
    pause_on_upstream_429: Option<bool>,
    max_pause: Option<String>,
    sweep_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct FileTeamLimits {
    client: Option<FileQuota>,
    per_key: Option<FileQuota>,
    upstream: Option<FileUpstreamQuota>,
    #[serde(default)]
    routes: Vec<FileRouteQuota>,
}

/// `"env:KEY"`, or `{ key = "env:KEY", secret = "env:SECRET" }` for upstreams
/// that authenticate with a key pair (Scenario's Basic auth).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum FileCredential {
    Token(String),
    Pair { key: String, secret: String },
}

#[derive(Debug, Deserialize)]
struct FileQuota {
    rate: String,
    burst: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct FileUpstreamQuota {
    rate: Option<String>,
    burst: Option<u32>,
    max_in_flight: Option<u32>,
    queue_timeout: Option<String>,
}

#[derive(Debug, Deserialize)]
struct FileRouteQuota {
    #[serde(rename = "match")]
    matches: String,
    rate: String,
    burst: Option<u32>,
    upstream: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct FileCache {
    max_bytes: Option<String>,
    max_entry_bytes: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct FileAdmin {
    token: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct FileUpstreamCache {
    enabled: Option<bool>,
    preset_rules: Option<bool>,
    #[serde(default)]
    rules: Vec<FileReadRule>,
    #[serde(default)]
    invalidate: Vec<FileWriteRule>,
}

#[derive(Debug, Deserialize)]
struct FileReadRule {
    #[serde(rename = "match")]
    matches: String,
    ttl: String,
    scope: String,
    shared: Option<bool>,
    stale_while_revalidate: Option<String>,
    stale_if_error: Option<String>,
}

#[derive(Debug, Deserialize)]
struct FileWriteRule {
    #[serde(rename = "match")]
    matches: String,
    scopes: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
struct FileServer {
    listen: Option<String>,
    admin_listen: Option<String>,
    shutdown_grace: Option<String>,
    forwarded_headers: Option<bool>,
    via: Option<bool>,
    max_header_bytes: Option<String>,
    max_request_body: Option<String>,
    header_read_timeout: Option<String>,
    max_connections: Option<usize>,
    websocket_idle_timeout: Option<String>,
    tls: Option<FileTls>,
}

#[derive(Debug, Deserialize)]
struct FileTls {
    cert: String,
    key: String,
    reload_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct FileLog {
    format: Option<String>,
    level: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct FileUpstream {
    base_url: Option<String>,
    preset: Option<String>,
    mount: Option<String>,
    connect_timeout: Option<String>,
    response_timeout: Option<String>,
    pool_idle_timeout: Option<String>,
    ca_file: Option<String>,
    #[serde(default)]
    cache: FileUpstreamCache,
    public_reads: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
struct FileTeam {
    #[serde(default)]
    upstream_keys: BTreeMap<String, FileCredential>,
    #[serde(default)]
    client_keys: Vec<String>,
    #[serde(default)]
    limits: FileTeamLimits,
}

// ---- Loading ---------------------------------------------------------------

/// Whether secret references are resolved at load, or only checked for form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secrets {
    /// Read every `env:`/`file:` reference; a missing one is a problem. What `serve` does.
    Resolve,
    /// Check that every reference is well-formed, read none: `check-config --no-secrets`,
    /// for validating a file on a machine that does not hold the secrets (CI).
    FormOnly,
}

impl Secrets {
    /// The secret `reference` (`env:NAME`, `file:PATH`) names — or, with
    /// [`Secrets::FormOnly`], a placeholder once the reference is well-formed.
    fn read(
        self,
        reference: &str,
        dir: Option<&Path>,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Secret, String> {
        match self {
            Secrets::Resolve => secret::resolve(reference, dir, env),
            Secrets::FormOnly => secret::check_form(reference),
        }
    }
}

/// The process environment, for [`load_file`].
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Loads and validates a config file, resolving secrets and applying overrides from `env`.
pub fn load_file(
    path: &Path,
    env: &dyn Fn(&str) -> Option<String>,
    secrets: Secrets,
) -> Result<Config, ConfigError> {
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|error| ConfigError {
        origin: origin.clone(),
        problems: vec![Problem {
            key: "(file)".into(),
            message: format!("cannot read: {error}"),
        }],
    })?;
    load_str(&text, &origin, path.parent(), env, secrets)
}

/// Loads and validates config text. `dir` anchors relative `file:` secret paths.
pub fn load_str(
    text: &str,
    origin: &str,
    dir: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
    secrets: Secrets,
) -> Result<Config, ConfigError> {
    let mut problems = Vec::new();
    let deserializer = toml::Deserializer::new(text);
    let parsed: Result<FileConfig, _> = serde_ignored::deserialize(deserializer, |path| {
        problems.push(Problem {
            key: path.to_string(),
            message: "unknown key".into(),
        });
    });
    let file = match parsed {
        Ok(file) => file,
        Err(error) => {
            // Syntax and type errors carry their own line, column and key.
            return Err(ConfigError {
                origin: origin.to_owned(),
                problems: vec![Problem {
                    key: "(toml)".into(),
                    message: error.to_string().trim_end().to_owned(),
                }],
            });
        }
    };
    let mut config = validate(file, origin, dir, env, secrets, &mut problems);
    // The text parsed above, again, untyped: what a reload compares. (One
    // pass into a `Table` and the structs from it would cost the type
    // errors above their line and column.)
    if let Ok(mut table) = text.parse::<toml::Table>() {
        // What a reload applies: the teams, and the admin token (the admin
        // API reads it from the served config at each request).
        table.remove("teams");
        table.remove("admin");
        config.restart_settings = table;
    }
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError {
            origin: origin.to_owned(),
            problems,
        })
    }
}

fn validate(
    file: FileConfig,
    origin: &str,
    dir: Option<&Path>,
    env: &dyn Fn(&str) -> Option<String>,
    secrets: Secrets,
    problems: &mut Vec<Problem>,
) -> Config {
    let mut problem = |key: &str, message: String| {
        problems.push(Problem {
            key: key.to_owned(),
            message,
        })
    };

    // [server]
    let listen = pick(
        env,
        "TEAMGATE_LISTEN",
        file.server.listen.as_deref(),
        "0.0.0.0:8080",
    );
    let listen = parse_addr(&listen.value).unwrap_or_else(|message| {
        problem(&listen.key("server.listen"), message);
        SocketAddr::from(([0, 0, 0, 0], 8080))
    });
    let admin = pick(
        env,
        "TEAMGATE_ADMIN_LISTEN",
        file.server.admin_listen.as_deref(),
        "127.0.0.1:9090",
    );
    let admin_listen = parse_addr(&admin.value).unwrap_or_else(|message| {
        problem(&admin.key("server.admin_listen"), message);
        SocketAddr::from(([127, 0, 0, 1], 9090))
    });
    let shutdown_grace = duration_or(
        file.server.shutdown_grace.as_deref(),
        Duration::from_secs(30),
        "server.shutdown_grace",
        &mut problem,
    );
    let server = ServerSettings {
        listen,
        admin_listen,
        shutdown_grace,
        forwarded_headers: file.server.forwarded_headers.unwrap_or(true),
        via: file.server.via.unwrap_or(true),
        max_header_bytes: size_or(
            file.server.max_header_bytes.as_deref(),
            64 << 10,
            "server.max_header_bytes",
            &mut problem,
        ) as usize,
        // Comfy's uploads go up to 50 MB (`/api/upload/image`); room for multipart framing.
        max_request_body: size_or(
            file.server.max_request_body.as_deref(),
            64 << 20,
            "server.max_request_body",
            &mut problem,
        ),
        header_read_timeout: duration_or(
            file.server.header_read_timeout.as_deref(),
            Duration::from_secs(10),
            "server.header_read_timeout",
            &mut problem,
        ),
        max_connections: file.server.max_connections.unwrap_or(10_000),
        websocket_idle_timeout: duration_or(
            file.server.websocket_idle_timeout.as_deref(),
            Duration::from_secs(300),
            "server.websocket_idle_timeout",
            &mut problem,
        ),
        tls: file.server.tls.as_ref().map(|tls| TlsSettings {
            cert: from_config_dir(dir, &tls.cert),
            key: from_config_dir(dir, &tls.key),
            reload_interval: duration_or(
                tls.reload_interval.as_deref(),
                Duration::from_secs(30),
                "server.tls.reload_interval",
                &mut problem,
            ),
        }),
    };
    // The files must load now, not at the first client handshake (skipped in
    // `--no-secrets` mode: the key is a secret the checking machine may not hold).
    if let (Some(tls), Secrets::Resolve) = (&server.tls, secrets) {
        if let Err(message) = crate::tls::load_pair(&tls.cert, &tls.key) {
            problem("server.tls", message);
        }
    }
    if server.max_header_bytes < 1024 {
        problem("server.max_header_bytes", "must be at least 1KiB".into());
    }
    if server.max_connections == 0 {
        problem("server.max_connections", "must be at least 1".into());
    }

    // [log]
    let format = pick(
        env,
        "TEAMGATE_LOG_FORMAT",
        file.log.format.as_deref(),
        "text",
    );
    let format = match format.value.as_str() {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        other => {
            problem(
                &format.key("log.format"),
                format!("`{other}` is not a log format; expected `text` or `json`"),
            );
            LogFormat::Text
        }
    };
    let level = file.log.level.unwrap_or_else(|| "info".to_owned());
    if let Err(error) = tracing_subscriber::EnvFilter::builder().parse(&level) {
        problem(
            "log.level",
            format!("`{level}` is not a valid filter: {error}"),
        );
    }
    let log = LogSettings { format, level };

    // [upstreams.*]
    if file.upstreams.is_empty() {
        problem(
            "upstreams",
            "no upstream configured; add `[upstreams.comfy]` with `base_url` and `preset`".into(),
        );
    }
    let mut upstreams: Vec<Arc<Upstream>> = Vec::new();
    for (index, (name, upstream)) in file.upstreams.into_iter().enumerate() {
        let key = |field: &str| format!("upstreams.{name}.{field}");
        if !is_identifier(&name) {
            problem(
                &format!("upstreams.{name}"),
                "upstream names use lowercase letters, digits, `-` and `_`".into(),
            );
        }
        let env_name = format!("TEAMGATE_UPSTREAM_{}_BASE_URL", env_suffix(&name));
        let base_url = match env(&env_name) {
            Some(value) => Some((value, format!("{env_name} (environment)"))),
            None => upstream.base_url.map(|value| (value, key("base_url"))),
        };
        let base = match base_url {
            None => {
                problem(&key("base_url"), "missing; expected an http(s) URL".into());
                None
            }
            Some((value, source)) => parse_base_url(&value)
                .map_err(|message| problem(&source, message))
                .ok(),
        };
        let preset_name = upstream.preset.unwrap_or_else(|| "comfy-cloud".to_owned());
        let preset = preset::by_name(&preset_name);
        if preset.is_none() {
            problem(
                &key("preset"),
                format!(
                    "unknown preset `{preset_name}`; expected one of: {}",
                    preset::PRESET_NAMES.join(", ")
                ),
            );
        }
        let mount = upstream.mount.unwrap_or_else(|| "/".to_owned());
        if !mount.starts_with('/') || (mount.len() > 1 && mount.ends_with('/')) {
            problem(
                &key("mount"),
                format!("`{mount}` must start with `/` and not end with one (e.g. `/scenario`)"),
            );
        } else if let Some(other) = upstreams.iter().find(|other| other.mount == mount) {
            problem(
                &key("mount"),
                format!(
                    "`{mount}` is already the mount of upstream `{}`",
                    other.name
                ),
            );
        }
        let timeouts = UpstreamTimeouts {
            connect: duration_or(
                upstream.connect_timeout.as_deref(),
                Duration::from_secs(5),
                &key("connect_timeout"),
                &mut problem,
            ),
            response: duration_or(
                upstream.response_timeout.as_deref(),
                Duration::from_secs(60),
                &key("response_timeout"),
                &mut problem,
            ),
            pool_idle: duration_or(
                upstream.pool_idle_timeout.as_deref(),
                Duration::from_secs(90),
                &key("pool_idle_timeout"),
                &mut problem,
            ),
        };
        let trusted_roots = upstream.ca_file.as_ref().and_then(|path| {
            crate::tls::load_roots(&from_config_dir(dir, path))
                .map_err(|message| problem(&key("ca_file"), message))
                .ok()
        });
        let cache = cache_policy(
            &upstream.cache,
            preset.as_ref(),
            &key("cache"),
            &mut problem,
        );
        if upstream.public_reads == Some(true)
            && preset.as_ref().is_some_and(|p| p.public_reads.is_empty())
        {
            problem(
                &key("public_reads"),
                format!("the `{preset_name}` preset has no public reads"),
            );
        }
        if let (Some((scheme, authority, base_path)), Some(preset)) = (base, preset) {
            let host_header = HeaderValue::from_str(authority.as_str())
                .expect("a parsed authority is a valid header value");
            upstreams.push(Arc::new(Upstream {
                name,
                index,
                scheme,
                authority,
                base_path,
                host_header,
                mount,
                public_reads: upstream.public_reads.unwrap_or(false),
                preset,
                timeouts,
                trusted_roots,
                cache,
            }));
        } else {
            // Keep indices aligned with declaration order for the team tables below.
            upstreams.push(Arc::new(placeholder_upstream(name, index)));
        }
    }

    // [teams.*]
    let mut teams = Vec::new();
    let mut keys = KeyStore::new();
    for (name, team) in file.teams {
        let key = |field: &str| format!("teams.{name}.{field}");
        if !is_identifier(&name) {
            problem(
                &format!("teams.{name}"),
                "team names use lowercase letters, digits, `-` and `_`".into(),
            );
        }
        let mut credentials = vec![None; upstreams.len()];
        for (upstream_name, reference) in &team.upstream_keys {
            let field = key(&format!("upstream_keys.{upstream_name}"));
            let Some(upstream) = upstreams.iter().find(|u| &u.name == upstream_name) else {
                problem(
                    &field,
                    format!("no upstream named `{upstream_name}` is configured"),
                );
                continue;
            };
            let resolve = |reference: &str| secrets.read(reference, dir, env);
            let resolved = match (reference, upstream.preset.credential) {
                (FileCredential::Token(reference), CredentialKind::Token) => resolve(reference),
                (FileCredential::Pair { key, secret }, CredentialKind::KeyAndSecret) => {
                    // Basic auth (RFC 7617): the token is base64(key ":" secret), built once here.
                    resolve(key).and_then(|key| {
                        resolve(secret).map(|secret| {
                            Secret::new(base64::engine::general_purpose::STANDARD.encode(format!(
                                "{}:{}",
                                key.expose(),
                                secret.expose()
                            )))
                        })
                    })
                }
                (FileCredential::Token(_), CredentialKind::KeyAndSecret) => Err(format!(
                    "the `{}` preset authenticates with a key pair: use {{ key = \"env:…\", secret = \"env:…\" }}",
                    upstream.preset.name
                )),
                (FileCredential::Pair { .. }, CredentialKind::Token) => Err(format!(
                    "the `{}` preset takes one key: use \"env:NAME\" or \"file:PATH\"",
                    upstream.preset.name
                )),
            };
            match resolved.and_then(secret::header_safe) {
                Ok(secret) => credentials[upstream.index] = Some(secret),
                Err(message) => problem(&field, message),
            }
        }
        let limits = team_limits(&team.limits, &key("limits"), &upstreams, &mut problem);
        let team_arc = Arc::new(Team::new(name.clone(), credentials, limits));
        for (position, stored) in team.client_keys.iter().enumerate() {
            let field = key(&format!("client_keys[{position}]"));
            match KeyDigest::parse(stored) {
                Ok(digest) => {
                    if let Err(owner) = keys.insert(digest, Arc::clone(&team_arc)) {
                        let message = if owner.name == name {
                            format!("{} is listed twice for this team", digest.to_stored())
                        } else {
                            format!(
                                "{} is already a key of team `{}`; a key belongs to one team",
                                digest.to_stored(),
                                owner.name
                            )
                        };
                        problem(&field, message);
                    }
                }
                Err(message) => problem(&field, message),
            }
        }
        teams.push(team_arc);
    }

    // [cache]
    let cache = CacheSettings {
        max_bytes: size_or(
            file.cache.max_bytes.as_deref(),
            256 << 20,
            "cache.max_bytes",
            &mut problem,
        ),
        max_entry_bytes: size_or(
            file.cache.max_entry_bytes.as_deref(),
            8 << 20,
            "cache.max_entry_bytes",
            &mut problem,
        ) as usize,
    };
    if cache.max_entry_bytes as u64 > cache.max_bytes {
        problem(
            "cache.max_entry_bytes",
            format!(
                "{} is larger than cache.max_bytes ({})",
                cache.max_entry_bytes, cache.max_bytes
            ),
        );
    }

    // [admin]
    let admin = AdminSettings {
        token: file.admin.token.as_deref().and_then(|reference| {
            secrets
                .read(reference, dir, env)
                .and_then(secret::header_safe)
                .map_err(|message| problem("admin.token", message))
                .ok()
        }),
    };

    // [limits]
    let limits = LimitSettings {
        pause_on_upstream_429: file.limits.pause_on_upstream_429.unwrap_or(true),
        max_pause: duration_or(
            file.limits.max_pause.as_deref(),
            Duration::from_secs(300),
            "limits.max_pause",
            &mut problem,
        ),
        sweep_interval: duration_or(
            file.limits.sweep_interval.as_deref(),
            Duration::from_secs(60),
            "limits.sweep_interval",
            &mut problem,
        ),
    };
    if limits.sweep_interval.is_zero() {
        problem("limits.sweep_interval", "must be more than 0".into());
    }

    // [telemetry.traces]
    let endpoint = env("OTEL_EXPORTER_OTLP_ENDPOINT")
        .map(|value| {
            (
                value,
                "OTEL_EXPORTER_OTLP_ENDPOINT (environment)".to_owned(),
            )
        })
        .or_else(|| {
            file.telemetry
                .traces
                .otlp_endpoint
                .clone()
                .map(|value| (value, "telemetry.traces.otlp_endpoint".to_owned()))
        });
    let endpoint = endpoint.and_then(|(value, source)| match parse_base_url(&value) {
        Ok(_) => Some(value),
        Err(message) => {
            problem(&source, message);
            None
        }
    });
    let protocol = pick(
        env,
        "OTEL_EXPORTER_OTLP_PROTOCOL",
        file.telemetry.traces.protocol.as_deref(),
        "http/protobuf",
    );
    let protocol = match protocol.value.as_str() {
        "http/protobuf" | "http" => OtlpProtocol::HttpProtobuf,
        "grpc" => OtlpProtocol::Grpc,
        other => {
            problem(
                &protocol.key("telemetry.traces.protocol"),
                format!("`{other}` is not supported; expected `http/protobuf` or `grpc`"),
            );
            OtlpProtocol::HttpProtobuf
        }
    };
    let service_name = pick(
        env,
        "OTEL_SERVICE_NAME",
        file.telemetry.traces.service_name.as_deref(),
        "teamgate",
    )
    .value;
    let sample_ratio = file.telemetry.traces.sample_ratio.unwrap_or(1.0);
    if !(0.0..=1.0).contains(&sample_ratio) {
        problem(
            "telemetry.traces.sample_ratio",
            format!("{sample_ratio} is not between 0 and 1"),
        );
    }
    let traces = TraceSettings {
        endpoint,
        protocol,
        service_name,
        sample_ratio,
    };

    // [shared]
    let shared = SharedSettings {
        redis: file.shared.redis.as_deref().and_then(|reference| {
            secrets
                .read(reference, dir, env)
                // A placeholder (`Secrets::FormOnly`) is no URL to check.
                .and_then(|url| match secrets {
                    Secrets::Resolve => redis_url(url),
                    Secrets::FormOnly => Ok(url),
                })
                .map_err(|message| problem("shared.redis", message))
                .ok()
        }),
        channel: match file.shared.channel {
            Some(channel) if channel.trim().is_empty() => {
                problem("shared.channel", "must not be empty".into());
                DEFAULT_SHARED_CHANNEL.to_owned()
            }
            Some(channel) => channel,
            None => DEFAULT_SHARED_CHANNEL.to_owned(),
        },
        quota_sync: duration_or(
            file.shared.quota_sync.as_deref(),
            DEFAULT_QUOTA_SYNC,
            "shared.quota_sync",
            &mut problem,
        ),
        redis_ca: file.shared.redis_ca.as_deref().and_then(|path| {
            // Not a secret, but like the secrets perhaps not on a machine
            // that checks the file for form only.
            if secrets == Secrets::FormOnly {
                return None;
            }
            let path = from_config_dir(dir, path);
            match std::fs::read(&path) {
                Ok(pem) if pem_has_certificate(&pem) => Some(Arc::from(pem)),
                Ok(_) => {
                    problem(
                        "shared.redis_ca",
                        format!("{} holds no PEM certificate", path.display()),
                    );
                    None
                }
                Err(error) => {
                    problem(
                        "shared.redis_ca",
                        format!("cannot read {}: {error}", path.display()),
                    );
                    None
                }
            }
        }),
    };
    let tls = |url: &Secret| url.expose().starts_with("rediss://");
    if shared.redis_ca.is_some() && !shared.redis.as_ref().is_some_and(tls) {
        problem(
            "shared.redis_ca",
            "is for a rediss:// (TLS) shared.redis only".into(),
        );
    }
    if !(Duration::from_millis(10)..=Duration::from_secs(10)).contains(&shared.quota_sync) {
        problem(
            "shared.quota_sync",
            "must be between 10ms and 10s: the instances together may admit what each could alone in this time".into(),
        );
    }

    Config {
        origin: origin.to_owned(),
        server,
        log,
        upstreams,
        teams,
        keys,
        cache,
        admin,
        limits,
        traces,
        shared,
        managed_keys: Vec::new(),
        restart_settings: toml::Table::new(),
    }
}

/// A resolved `shared.redis` that a Redis client can connect with. The
/// message never repeats the URL: it may hold a password.
fn redis_url(url: Secret) -> Result<Secret, String> {
    let scheme = url.expose().starts_with("redis://") || url.expose().starts_with("rediss://");
    if scheme && redis::Client::open(url.expose()).is_ok() {
        Ok(url)
    } else {
        Err("is not a Redis URL: expected redis://[user:password@]host[:port][/db], or rediss:// for TLS".into())
    }
}

/// Whether `pem` holds at least one certificate.
fn pem_has_certificate(pem: &[u8]) -> bool {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem).any(|cert| cert.is_ok())
}

fn quota_spec(
    rate: &str,
    burst: Option<u32>,
    key: &str,
    problem: &mut impl FnMut(&str, String),
) -> Option<QuotaSpec> {
    let rate = parse_rate(rate)
        .map_err(|message| problem(&format!("{key}.rate"), message))
        .ok()?;
    let burst = burst.unwrap_or(rate.count);
    if burst == 0 {
        problem(&format!("{key}.burst"), "must be at least 1".into());
        return None;
    }
    Some(QuotaSpec { rate, burst })
}

fn team_limits(
    file: &FileTeamLimits,
    key: &str,
    upstreams: &[Arc<Upstream>],
    problem: &mut impl FnMut(&str, String),
) -> TeamLimits {
    let client = file
        .client
        .as_ref()
        .and_then(|quota| quota_spec(&quota.rate, quota.burst, &format!("{key}.client"), problem));
    let per_key = file
        .per_key
        .as_ref()
        .and_then(|quota| quota_spec(&quota.rate, quota.burst, &format!("{key}.per_key"), problem));
    let mut upstream = UpstreamLimits {
        queue_timeout: Duration::from_secs(10),
        ..UpstreamLimits::default()
    };
    if let Some(file) = &file.upstream {
        let field = format!("{key}.upstream");
        upstream.rate = file
            .rate
            .as_deref()
            .and_then(|rate| quota_spec(rate, file.burst, &field, problem));
        if file.rate.is_none() && file.burst.is_some() {
            problem(&format!("{field}.burst"), "a burst needs a `rate`".into());
        }
        upstream.max_in_flight = file.max_in_flight;
        if file.max_in_flight == Some(0) {
            problem(
                &format!("{field}.max_in_flight"),
                "must be at least 1".into(),
            );
        }
        upstream.queue_timeout = duration_or(
            file.queue_timeout.as_deref(),
            upstream.queue_timeout,
            &format!("{field}.queue_timeout"),
            problem,
        );
    }
    let mut routes = Vec::new();
    for (index, route) in file.routes.iter().enumerate() {
        let field = format!("{key}.routes[{index}]");
        let (methods, pattern) = match parse_match(&route.matches) {
            Ok(parsed) => parsed,
            Err(message) => {
                problem(&format!("{field}.match"), message);
                continue;
            }
        };
        if route.matches.contains(['"', '\\']) {
            problem(
                &format!("{field}.match"),
                "quotes and backslashes are not allowed".into(),
            );
            continue;
        }
        if let Some(name) = &route.upstream {
            if !upstreams.iter().any(|upstream| &upstream.name == name) {
                problem(
                    &format!("{field}.upstream"),
                    format!("no upstream named `{name}` is configured"),
                );
            }
        }
        if let Some(spec) = quota_spec(&route.rate, route.burst, &field, problem) {
            routes.push(RouteQuota {
                label: route.matches.trim().to_owned(),
                methods,
                pattern,
                upstream: route.upstream.clone(),
                spec,
            });
        }
    }
    TeamLimits {
        client,
        per_key,
        upstream,
        routes,
    }
}

/// The upstream's cache rules: config rules first, then the preset's.
fn cache_policy(
    file: &FileUpstreamCache,
    preset: Option<&Preset>,
    key: &str,
    problem: &mut impl FnMut(&str, String),
) -> CachePolicy {
    if file.enabled == Some(false) {
        return CachePolicy::default();
    }
    let mut policy = CachePolicy::default();
    for (index, rule) in file.rules.iter().enumerate() {
        let field = format!("{key}.rules[{index}]");
        let (methods, pattern) = match parse_match(&rule.matches) {
            Ok(parsed) => parsed,
            Err(message) => {
                problem(&format!("{field}.match"), message);
                continue;
            }
        };
        if methods != MethodMatch::Listed(vec![http::Method::GET]) {
            problem(
                &format!("{field}.match"),
                "cache rules are for reads: use `GET /path` (HEAD is answered from GET)".into(),
            );
            continue;
        }
        let scope = match ScopeTemplate::parse(&rule.scope, &pattern) {
            Ok(scope) if scope.from_body() => {
                problem(
                    &format!("{field}.scope"),
                    "a read's scope comes from its path; `{body.…}` is for writes".into(),
                );
                continue;
            }
            Ok(scope) => scope,
            Err(message) => {
                problem(&format!("{field}.scope"), message);
                continue;
            }
        };
        let mut duration = |value: Option<&str>, name: &str| {
            value
                .map_or(Ok(Duration::ZERO), parse_duration)
                .unwrap_or_else(|message| {
                    problem(&format!("{field}.{name}"), message);
                    Duration::ZERO
                })
        };
        let ttl = duration(Some(&rule.ttl), "ttl");
        let stale_while_revalidate = duration(
            rule.stale_while_revalidate.as_deref(),
            "stale_while_revalidate",
        );
        let stale_if_error = duration(rule.stale_if_error.as_deref(), "stale_if_error");
        policy.reads.push(ReadRule {
            pattern,
            ttl,
            scope,
            shared: rule.shared.unwrap_or(false),
            stale_while_revalidate,
            stale_if_error,
        });
    }
    for (index, rule) in file.invalidate.iter().enumerate() {
        let field = format!("{key}.invalidate[{index}]");
        let (methods, pattern) = match parse_match(&rule.matches) {
            Ok(parsed) => parsed,
            Err(message) => {
                problem(&format!("{field}.match"), message);
                continue;
            }
        };
        let scopes: Result<Vec<_>, _> = rule
            .scopes
            .iter()
            .map(|scope| ScopeTemplate::parse(scope, &pattern))
            .collect();
        match scopes {
            Ok(scopes) => policy.writes.push(WriteRule {
                methods,
                pattern,
                scopes,
            }),
            Err(message) => problem(&format!("{field}.scopes"), message),
        }
    }
    if file.preset_rules != Some(false) {
        if let Some(preset) = preset {
            policy.reads.extend(preset.cache.reads.iter().cloned());
            policy.writes.extend(preset.cache.writes.iter().cloned());
        }
    }
    policy
}

fn size_or(
    value: Option<&str>,
    default: u64,
    key: &str,
    problem: &mut impl FnMut(&str, String),
) -> u64 {
    match value.map(parse_size) {
        None => default,
        Some(Ok(size)) => size,
        Some(Err(message)) => {
            problem(key, message);
            default
        }
    }
}

/// Parses `1048576`, `512KiB`, `64MiB`, `1GiB`.
pub fn parse_size(value: &str) -> Result<u64, String> {
    let value = value.trim();
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let bad =
        || format!("`{value}` is not a size; expected e.g. `65536`, `512KiB`, `64MiB`, `1GiB`");
    let number: u64 = number.parse().map_err(|_| bad())?;
    let multiplier = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err(bad()),
    };
    number.checked_mul(multiplier).ok_or_else(bad)
}

/// A value with where it came from, so a problem names the right source.
struct Picked {
    value: String,
    env_name: Option<&'static str>,
}

impl Picked {
    fn key(&self, file_key: &str) -> String {
        match self.env_name {
            Some(name) => format!("{name} (environment)"),
            None => file_key.to_owned(),
        }
    }
}

fn pick(
    env: &dyn Fn(&str) -> Option<String>,
    env_name: &'static str,
    file_value: Option<&str>,
    default: &str,
) -> Picked {
    match env(env_name) {
        Some(value) => Picked {
            value,
            env_name: Some(env_name),
        },
        None => Picked {
            value: file_value.unwrap_or(default).to_owned(),
            env_name: None,
        },
    }
}

fn parse_addr(value: &str) -> Result<SocketAddr, String> {
    value.parse().map_err(|_| {
        format!("`{value}` is not an address; expected `IP:PORT` such as `0.0.0.0:8080`")
    })
}

/// A path from the config file: relative ones are from the file's folder.
fn from_config_dir(dir: Option<&Path>, path: &str) -> std::path::PathBuf {
    match dir {
        Some(dir) if Path::new(path).is_relative() => dir.join(path),
        _ => Path::new(path).to_path_buf(),
    }
}

fn duration_or(
    value: Option<&str>,
    default: Duration,
    key: &str,
    problem: &mut impl FnMut(&str, String),
) -> Duration {
    match value.map(parse_duration) {
        None => default,
        Some(Ok(duration)) => duration,
        Some(Err(message)) => {
            problem(key, message);
            default
        }
    }
}

/// Parses `250ms`, `5s`, `2m`, `1h`.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let value = value.trim();
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let bad = || format!("`{value}` is not a duration; expected e.g. `250ms`, `5s`, `2m`, `1h`");
    let number: u64 = number.parse().map_err(|_| bad())?;
    match unit {
        "ms" => Ok(Duration::from_millis(number)),
        "s" => Ok(Duration::from_secs(number)),
        "m" => Ok(Duration::from_secs(number * 60)),
        "h" => Ok(Duration::from_secs(number * 3600)),
        _ => Err(bad()),
    }
}

fn parse_base_url(value: &str) -> Result<(Scheme, Authority, String), String> {
    let expected = "expected an absolute http(s) URL such as `https://cloud.comfy.org`";
    let uri: Uri = value
        .parse()
        .map_err(|_| format!("`{value}` is not a URL; {expected}"))?;
    let scheme = uri
        .scheme()
        .filter(|scheme| **scheme == Scheme::HTTP || **scheme == Scheme::HTTPS)
        .cloned()
        .ok_or_else(|| format!("`{value}` has no http or https scheme; {expected}"))?;
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("`{value}` has no host; {expected}"))?;
    if authority.as_str().contains('@') {
        return Err(format!(
            "`{}` carries credentials in the URL; put the key in `teams.*.upstream_keys` instead",
            authority.host()
        ));
    }
    if uri.query().is_some() {
        return Err(format!("`{value}` has a query string; {expected}"));
    }
    let base_path = uri.path().trim_end_matches('/').to_owned();
    Ok((scheme, authority, base_path))
}

fn is_identifier(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// `comfy-eu` → `COMFY_EU`, for `TEAMGATE_UPSTREAM_<NAME>_BASE_URL`.
fn env_suffix(name: &str) -> String {
    name.to_ascii_uppercase().replace('-', "_")
}

/// Stands in for an upstream whose section had problems, so later checks still run.
/// A config with a placeholder always has problems and is never returned.
fn placeholder_upstream(name: String, index: usize) -> Upstream {
    Upstream {
        name,
        index,
        scheme: Scheme::HTTP,
        authority: Authority::from_static("invalid"),
        base_path: String::new(),
        host_header: HeaderValue::from_static("invalid"),
        mount: String::new(),
        preset: preset::by_name("comfy-cloud").expect("built in"),
        timeouts: UpstreamTimeouts {
            connect: Duration::ZERO,
            response: Duration::ZERO,
            pool_idle: Duration::ZERO,
        },
        trusted_roots: None,
        cache: CachePolicy::default(),
        public_reads: false,
    }
}

/// A minimal valid config for unit tests elsewhere in the crate: upstream
/// `comfy` at a loopback port nobody serves, and team `design` holding
/// `client_key`, with `upstream-key` as its upstream key. `extra` is
/// appended as it is (a `[teams.design.limits]` table, say).
#[cfg(test)]
pub(crate) fn for_tests(client_key: &str, extra: &str) -> Config {
    for_tests_at("http://127.0.0.1:9", client_key, extra)
}

/// [`for_tests`] with upstream `comfy` at `comfy_base_url`.
#[cfg(test)]
pub(crate) fn for_tests_at(comfy_base_url: &str, client_key: &str, extra: &str) -> Config {
    let text = format!(
        r#"
[upstreams.comfy]
base_url = "{comfy_base_url}"
[teams.design]
upstream_keys = {{ comfy = "env:K" }}
client_keys = ["{}"]
{extra}
"#,
        crate::auth::keys::KeyDigest::of_key(client_key).to_stored()
    );
    let env = |name: &str| (name == "K").then(|| "upstream-key".to_owned());
    load_str(&text, "t.toml", None, &env, Secrets::Resolve).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "COMFY_KEY_DESIGN" => Some("upstream-design".into()),
            "COMFY_KEY_RESEARCH" => Some("upstream-research".into()),
            "REDIS_URL" => Some("redis://:s3cret-pass@127.0.0.1:6379/2".into()),
            "REDIS_TLS_URL" => Some("rediss://:s3cret-pass@redis.internal:6380/0".into()),
            "NOT_REDIS" => Some("http://:s3cret-pass@127.0.0.1:6379".into()),
            _ => None,
        }
    }

    fn load(text: &str) -> Result<Config, ConfigError> {
        load_str(text, "test.toml", None, &env, Secrets::Resolve)
    }

    /// What `Config::restart_changes` reports: every setting outside `[teams]`
    /// and `[admin]` that was added, removed or changed, however deep;
    /// nothing for teams or the admin token.
    #[test]
    fn only_changes_outside_teams_need_a_restart() {
        let running = for_tests(
            "k1",
            "[admin]\ntoken = \"env:K\"\n[upstreams.comfy.cache]\nenabled = true\n",
        );
        let same_but_teams = for_tests(
            "k2",
            "[admin]\ntoken = \"env:K\"\n[upstreams.comfy.cache]\nenabled = true\n\
             [teams.design.limits]\nclient = { rate = \"5/s\" }\n[teams.more]\nclient_keys = []\n",
        );
        assert!(running.restart_changes(&same_but_teams).is_empty());
        let elsewhere = for_tests(
            "k1",
            "[server]\nvia = false\n[upstreams.comfy.cache]\nenabled = false\n",
        );
        // The admin token gone (the admin API off) is no restart change.
        assert_eq!(
            running.restart_changes(&elsewhere),
            ["server", "upstreams.comfy.cache.enabled"]
        );
        assert_eq!(
            elsewhere.restart_changes(&running),
            ["server", "upstreams.comfy.cache.enabled"]
        );
    }

    /// `rediss://` (TLS), with the server's certificate checked against
    /// `redis_ca` (a PEM file, relative to the config file) when given.
    #[test]
    fn the_shared_redis_may_be_tls_with_a_ca_of_its_own() {
        let dir = std::env::temp_dir().join(format!("teamgate-redis-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pair = rcgen::generate_simple_self_signed(vec!["redis.internal".to_owned()]).unwrap();
        std::fs::write(dir.join("ca.pem"), pair.cert.pem()).unwrap();
        std::fs::write(dir.join("not-a-cert.pem"), "hello").unwrap();
        let load_in = |shared: &str| {
            load_str(
                &format!("{VALID}\n[shared]\n{shared}\n"),
                "test.toml",
                Some(&dir),
                &env,
                Secrets::Resolve,
            )
        };
        let tls = load_in("redis = \"env:REDIS_TLS_URL\"").unwrap();
        assert!(tls.shared.redis_ca.is_none(), "the public roots");
        let private = load_in("redis = \"env:REDIS_TLS_URL\"\nredis_ca = \"ca.pem\"").unwrap();
        assert_eq!(
            private.shared.redis_ca.as_deref(),
            Some(pair.cert.pem().as_bytes())
        );
        for (shared, message) in [
            (
                "redis = \"env:REDIS_URL\"\nredis_ca = \"ca.pem\"",
                "rediss://",
            ),
            ("redis_ca = \"ca.pem\"", "rediss://"),
            (
                "redis = \"env:REDIS_TLS_URL\"\nredis_ca = \"missing.pem\"",
                "cannot read",
            ),
            (
                "redis = \"env:REDIS_TLS_URL\"\nredis_ca = \"not-a-cert.pem\"",
                "no PEM certificate",
            ),
        ] {
            let error = load_in(shared).unwrap_err();
            assert_eq!(error.problems.len(), 1, "{shared}: {error}");
            assert_eq!(error.problems[0].key, "shared.redis_ca", "{shared}");
            assert!(
                error.problems[0].message.contains(message),
                "{shared}: {error}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// `[shared] redis` is a secret reference (the URL may hold a password)
    /// to a `redis://` URL; a problem with it never repeats the URL.
    #[test]
    fn the_shared_redis_url_is_a_secret_reference_to_a_redis_url() {
        let config = load(&format!("{VALID}\n[shared]\nredis = \"env:REDIS_URL\"\n")).unwrap();
        assert_eq!(
            config.shared.redis.unwrap().expose(),
            "redis://:s3cret-pass@127.0.0.1:6379/2"
        );
        assert_eq!(config.shared.channel, DEFAULT_SHARED_CHANNEL);
        assert_eq!(config.shared.quota_sync, DEFAULT_QUOTA_SYNC);
        assert!(load(VALID).unwrap().shared.redis.is_none());
        let config = load(&format!(
            "{VALID}\n[shared]\nredis = \"env:REDIS_URL\"\nquota_sync = \"250ms\"\n"
        ))
        .unwrap();
        assert_eq!(config.shared.quota_sync, Duration::from_millis(250));
        for (line, key) in [
            ("redis = \"redis://127.0.0.1:6379\"", "shared.redis"),
            ("redis = \"env:NOT_REDIS\"", "shared.redis"),
            (
                "redis = \"env:REDIS_URL\"\nchannel = \" \"",
                "shared.channel",
            ),
            (
                "redis = \"env:REDIS_URL\"\nquota_sync = \"5ms\"",
                "shared.quota_sync",
            ),
            (
                "redis = \"env:REDIS_URL\"\nquota_sync = \"1m\"",
                "shared.quota_sync",
            ),
        ] {
            let error = load(&format!("{VALID}\n[shared]\n{line}\n")).unwrap_err();
            assert_eq!(
                error
                    .problems
                    .iter()
                    .map(|p| p.key.as_str())
                    .collect::<Vec<_>>(),
                [key],
                "{line}"
            );
            assert!(!error.to_string().contains("s3cret-pass"), "{error}");
        }
    }

    fn problem_keys(text: &str) -> Vec<String> {
        load(text)
            .unwrap_err()
            .problems
            .into_iter()
            .map(|problem| problem.key)
            .collect()
    }

    const VALID: &str = r#"
        [server]
        listen = "127.0.0.1:8080"
        [upstreams.comfy]
        base_url = "https://cloud.comfy.org"
        preset = "comfy-cloud"
        [teams.design]
        upstream_keys = { comfy = "env:COMFY_KEY_DESIGN" }
        client_keys = ["sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"]
    "#;

    #[test]
    fn a_valid_file_loads_with_defaults_filled_in() {
        let config = load(VALID).unwrap();
        assert_eq!(config.server.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(
            config.server.admin_listen,
            "127.0.0.1:9090".parse().unwrap()
        );
        let comfy = &config.upstreams[0];
        assert_eq!(comfy.authority.as_str(), "cloud.comfy.org");
        assert_eq!(comfy.mount, "/");
        assert_eq!(comfy.timeouts.connect, Duration::from_secs(5));
        let team = &config.keys.lookup("abc").unwrap().owner;
        assert_eq!(team.name, "design");
        assert_eq!(
            team.credential_for(comfy).unwrap().expose(),
            "upstream-design"
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let text = r#"
            [server]
            listen = "nowhere"
            [upstreams.comfy]
            base_url = "ftp://cloud.comfy.org"
            preset = "comfy-clod"
            colour = "blue"
            [teams.design]
            upstream_keys = { comfy = "sk-inline-secret", scenario = "env:X" }
            client_keys = ["sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad", "nothex"]
            [teams.research]
            upstream_keys = { comfy = "env:MISSING_VAR" }
            client_keys = ["sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"]
        "#;
        let error = load(text).unwrap_err();
        let keys: Vec<&str> = error.problems.iter().map(|p| p.key.as_str()).collect();
        for expected in [
            "upstreams.comfy.colour",
            "server.listen",
            "upstreams.comfy.base_url",
            "upstreams.comfy.preset",
            "teams.design.upstream_keys.comfy",
            "teams.design.upstream_keys.scenario",
            "teams.design.client_keys[1]",
            "teams.research.upstream_keys.comfy",
            "teams.research.client_keys[0]",
        ] {
            assert!(keys.contains(&expected), "missing {expected} in {keys:?}");
        }
        let rendered = error.to_string();
        assert!(
            rendered.contains("test.toml: upstreams.comfy.preset: unknown preset `comfy-clod`")
        );
        assert!(rendered.contains("already a key of team `design`"));
        assert!(rendered.contains("environment variable `MISSING_VAR` is not set"));
        assert!(!rendered.contains("sk-inline-secret"), "secrets never echo");
    }

    #[test]
    fn unreadable_secret_files_and_bad_urls_name_their_key() {
        let text = VALID
            .replace("env:COMFY_KEY_DESIGN", "file:/nonexistent/teamgate/key")
            .replace("https://cloud.comfy.org", "https://user:pw@cloud.comfy.org");
        let keys = problem_keys(&text);
        assert_eq!(
            keys,
            [
                "upstreams.comfy.base_url",
                "teams.design.upstream_keys.comfy"
            ]
        );
    }

    #[test]
    fn an_upstream_ca_file_must_hold_usable_certificates() {
        let dir = std::env::temp_dir().join(format!("teamgate-ca-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "no certificates here").unwrap();
        for path in [dir.join("missing.pem"), not_pem] {
            let text = VALID.replace(
                "preset = \"comfy-cloud\"",
                &format!(
                    "preset = \"comfy-cloud\"\nca_file = {:?}",
                    path.display().to_string()
                ),
            );
            assert_eq!(
                problem_keys(&text),
                ["upstreams.comfy.ca_file"],
                "{}",
                path.display()
            );
        }
        assert!(load(VALID).unwrap().upstreams[0].trusted_roots.is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn syntax_errors_point_at_the_line() {
        let error = load("[server\nlisten = 1").unwrap_err();
        assert_eq!(error.problems.len(), 1);
        assert!(error.to_string().contains("line 1"), "{error}");
    }

    #[test]
    fn environment_overrides_win_over_the_file() {
        let overrides = |name: &str| match name {
            "TEAMGATE_LISTEN" => Some("127.0.0.1:7000".to_owned()),
            "TEAMGATE_UPSTREAM_COMFY_BASE_URL" => Some("http://127.0.0.1:8188".to_owned()),
            other => env(other),
        };
        let config = load_str(VALID, "test.toml", None, &overrides, Secrets::Resolve).unwrap();
        assert_eq!(config.server.listen, "127.0.0.1:7000".parse().unwrap());
        assert_eq!(config.upstreams[0].authority.as_str(), "127.0.0.1:8188");
        assert_eq!(config.upstreams[0].scheme, Scheme::HTTP);

        let broken = |name: &str| match name {
            "TEAMGATE_LISTEN" => Some("not-an-address".to_owned()),
            other => env(other),
        };
        let error = load_str(VALID, "test.toml", None, &broken, Secrets::Resolve).unwrap_err();
        assert_eq!(error.problems[0].key, "TEAMGATE_LISTEN (environment)");
    }

    #[test]
    fn mounts_must_be_distinct_and_well_formed() {
        let text = format!(
            "{VALID}\n[upstreams.other]\nbase_url = \"http://127.0.0.1:1\"\nmount = \"/\"\n[upstreams.third]\nbase_url = \"http://127.0.0.1:2\"\nmount = \"scenario/\"\n"
        );
        let keys = problem_keys(&text);
        assert!(
            keys.contains(&"upstreams.other.mount".to_owned()),
            "{keys:?}"
        );
        assert!(
            keys.contains(&"upstreams.third.mount".to_owned()),
            "{keys:?}"
        );
    }

    #[test]
    fn base_paths_are_kept_without_trailing_slash() {
        let config =
            load(&VALID.replace("https://cloud.comfy.org", "https://api.example.com/v1/")).unwrap();
        assert_eq!(config.upstreams[0].base_path, "/v1");
    }

    #[test]
    fn form_only_checks_references_without_reading_them() {
        let text = VALID.replace("env:COMFY_KEY_DESIGN", "env:NOT_ON_THIS_MACHINE");
        assert!(load(&text).is_err());
        assert!(load_str(&text, "t", None, &env, Secrets::FormOnly).is_ok());
        let inline = VALID.replace("env:COMFY_KEY_DESIGN", "sk-inline");
        assert!(load_str(&inline, "t", None, &env, Secrets::FormOnly).is_err());
    }

    #[test]
    fn cache_rules_from_config_come_before_the_preset_and_are_validated() {
        let text = format!(
            "{VALID}
[upstreams.comfy.cache]
[[upstreams.comfy.cache.rules]]
match = \"GET /api/jobs\"
ttl = \"5s\"
scope = \"jobs\"
[[upstreams.comfy.cache.invalidate]]
match = \"POST /api/prompt\"
scopes = [\"jobs\"]
"
        );
        let config = load(&text).unwrap();
        let cache = &config.upstreams[0].cache;
        assert_eq!(cache.reads[0].pattern.as_str(), "/api/jobs");
        assert_eq!(
            cache.reads.len(),
            1 + preset::by_name("comfy-cloud").unwrap().cache.reads.len()
        );
        assert_eq!(cache.writes[0].pattern.as_str(), "/api/prompt");

        let bad = format!(
            "{VALID}
[cache]
max_bytes = \"lots\"
[[upstreams.comfy.cache.rules]]
match = \"POST /api/jobs\"
ttl = \"5s\"
scope = \"jobs\"
[[upstreams.comfy.cache.rules]]
match = \"GET /api/jobs/{{id}}\"
ttl = \"forever\"
scope = \"job:{{nope}}\"
"
        );
        let keys = problem_keys(&bad);
        for expected in [
            "cache.max_bytes",
            "upstreams.comfy.cache.rules[0].match",
            "upstreams.comfy.cache.rules[1].scope",
        ] {
            assert!(
                keys.contains(&expected.to_owned()),
                "{expected} in {keys:?}"
            );
        }
    }

    #[test]
    fn a_disabled_cache_has_no_rules() {
        let text = format!("{VALID}\n[upstreams.comfy.cache]\nenabled = false\n");
        let config = load(&text).unwrap();
        assert!(config.upstreams[0].cache.reads.is_empty());
        assert!(config.upstreams[0].cache.writes.is_empty());
    }

    #[test]
    fn team_limits_parse_with_defaults_and_every_problem_is_named() {
        let text = format!(
            "{VALID}
[teams.design.limits]
client = {{ rate = \"20/s\", burst = 40 }}
per_key = {{ rate = \"5/s\" }}
upstream = {{ rate = \"10/s\", burst = 10, max_in_flight = 8 }}
[[teams.design.limits.routes]]
match = \"POST /api/prompt\"
rate = \"10/m\"
burst = 2
"
        );
        let config = load(&text).unwrap();
        let limits = &config.teams[0].limits;
        assert_eq!(limits.client.unwrap().burst, 40);
        assert_eq!(
            limits.per_key.unwrap().burst,
            5,
            "burst defaults to the rate's count"
        );
        assert_eq!(limits.upstream.max_in_flight, Some(8));
        assert_eq!(limits.routes[0].label, "POST /api/prompt");
        assert_eq!(limits.routes[0].spec.rate.per, Duration::from_secs(60));
        assert!(config.limits.pause_on_upstream_429);

        let bad = format!(
            "{VALID}
[teams.design.limits]
client = {{ rate = \"fast\" }}
per_key = {{ rate = \"5/s\", burst = 0 }}
upstream = {{ max_in_flight = 0 }}
[[teams.design.limits.routes]]
match = \"POST api/prompt\"
rate = \"1/s\"
"
        );
        let keys = problem_keys(&bad);
        for expected in [
            "teams.design.limits.client.rate",
            "teams.design.limits.per_key.burst",
            "teams.design.limits.upstream.max_in_flight",
            "teams.design.limits.routes[0].match",
        ] {
            assert!(
                keys.contains(&expected.to_owned()),
                "{expected} in {keys:?}"
            );
        }
    }

    #[test]
    fn key_pairs_are_for_presets_that_take_them() {
        let env = |name: &str| match name {
            "K" | "S" | "COMFY_KEY_DESIGN" => Some(format!("{name}-value")),
            _ => None,
        };
        let text = |credential: &str| {
            format!(
                "[upstreams.comfy]\nbase_url = \"https://cloud.comfy.org\"\n\
                 [upstreams.scenario]\nbase_url = \"https://api.cloud.scenario.com/v1\"\npreset = \"scenario\"\nmount = \"/scenario\"\n\
                 [teams.design]\nupstream_keys = {{ comfy = \"env:COMFY_KEY_DESIGN\", scenario = {credential} }}\n"
            )
        };
        let config = load_str(
            &text(r#"{ key = "env:K", secret = "env:S" }"#),
            "t",
            None,
            &env,
            Secrets::Resolve,
        )
        .unwrap();
        let scenario = &config.upstreams[1];
        assert_eq!(scenario.name, "scenario");
        assert_eq!(scenario.base_path, "/v1");
        // Basic token: base64("K-value:S-value").
        assert_eq!(
            config.teams[0].credential_for(scenario).unwrap().expose(),
            "Sy12YWx1ZTpTLXZhbHVl"
        );
        let single = load_str(&text(r#""env:K""#), "t", None, &env, Secrets::Resolve).unwrap_err();
        assert!(single.to_string().contains("key pair"), "{single}");
        let missing = load_str(
            &text(r#"{ key = "env:K", secret = "env:NOPE" }"#),
            "t",
            None,
            &env,
            Secrets::Resolve,
        )
        .unwrap_err();
        assert!(missing.to_string().contains("NOPE"), "{missing}");
    }

    #[test]
    fn sizes_parse_in_every_unit() {
        assert_eq!(parse_size("65536").unwrap(), 65536);
        assert_eq!(parse_size("512KiB").unwrap(), 512 * 1024);
        assert_eq!(parse_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        for bad in ["", "MiB", "1.5MiB", "10MB", "99999999999999GiB"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations_parse_in_every_unit() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        for bad in ["", "5", "s", "1.5s", "5 days"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
