//! Cache policy: pure functions and the rule types they read. No I/O, no clock.
//!
//! - Which requests are cacheable reads and which writes invalidate what:
//!   [`CachePolicy::classify`] over an upstream's ordered rules (first match).
//! - The key an entry is stored under: [`CacheKey`] (upstream + team
//!   credential or the shared partition + path and exact query + the
//!   representation varied on).
//! - Whether a response may be stored ([`storable`]), what the request asks of
//!   the cache ([`RequestMode`]), `If-None-Match` matching, `Cache-Status` values.

use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use sha2::{Digest, Sha256};

use crate::route::PathPattern;

/// Identifies a team's upstream credential without holding it: the first 16
/// bytes of its SHA-256. Teams that share a credential share a partition,
/// which is exactly what the upstream would show them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CredentialId([u8; 16]);

impl CredentialId {
    pub fn of(secret: &str) -> Self {
        let digest = Sha256::digest(secret.as_bytes());
        let mut id = [0u8; 16];
        id.copy_from_slice(&digest[..16]);
        CredentialId(id)
    }

    /// As hex, for the invalidations instances share (`crate::shared`).
    pub fn to_hex(self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(text: &str) -> Option<Self> {
        let mut id = [0u8; 16];
        hex::decode_to_slice(text, &mut id).ok()?;
        Some(CredentialId(id))
    }
}

/// Whose entries these are: one team's (by credential), or every team's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Partition {
    Team {
        upstream: usize,
        credential: CredentialId,
    },
    /// Only for rules marked `shared`: responses identical for every team.
    Shared { upstream: usize },
}

impl Partition {
    pub fn upstream(self) -> usize {
        match self {
            Partition::Team { upstream, .. } | Partition::Shared { upstream } => upstream,
        }
    }
}

/// The cache key. The method is implicitly GET: only GET responses are stored,
/// and HEAD is answered from them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    pub partition: Partition,
    /// The upstream path and query exactly as the client sent them (after the mount).
    pub target: Box<str>,
    pub accept: Option<HeaderValue>,
    pub accept_encoding: Option<HeaderValue>,
}

impl CacheKey {
    pub fn new(partition: Partition, target: impl Into<Box<str>>, headers: &HeaderMap) -> Self {
        CacheKey {
            partition,
            target: target.into(),
            accept: joined(headers, &header::ACCEPT),
            accept_encoding: joined(headers, &header::ACCEPT_ENCODING),
        }
    }

    /// The key with its header values in their own allocations, for storing:
    /// values parsed by hyper are slices of the connection's read buffer,
    /// which a stored key would otherwise keep alive for the entry's life.
    pub fn detached(&self) -> Self {
        CacheKey {
            partition: self.partition,
            target: self.target.clone(),
            accept: self.accept.as_ref().map(owned_value),
            accept_encoding: self.accept_encoding.as_ref().map(owned_value),
        }
    }

    /// Approximate bytes the key occupies, for the weigher.
    pub fn weight(&self) -> usize {
        self.target.len()
            + self.accept.as_ref().map_or(0, HeaderValue::len)
            + self.accept_encoding.as_ref().map_or(0, HeaderValue::len)
            + 64
    }
}

/// A header value in its own allocation. Values hyper parsed are slices of
/// a connection's read buffer; anything the cache keeps must not pin those.
pub fn owned_value(value: &HeaderValue) -> HeaderValue {
    let mut copy = HeaderValue::from_bytes(value.as_bytes()).expect("copied from a valid value");
    copy.set_sensitive(value.is_sensitive());
    copy
}

/// All values of a header as one (they are a comma-separated list semantically).
fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<HeaderValue> {
    let mut values = crate::wire::rare_field_values(headers, name);
    let first = values.next()?;
    let Some(second) = values.next() else {
        return Some(first.clone());
    };
    let mut combined = first.as_bytes().to_vec();
    for value in std::iter::once(second).chain(values) {
        combined.extend_from_slice(b", ");
        combined.extend_from_slice(value.as_bytes());
    }
    HeaderValue::from_bytes(&combined).ok()
}

/// A scope: a family (`assets`, `tags`, `asset`) and optionally one member (`asset:<id>`).
/// Invalidating a family invalidates all its members too.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scope {
    pub family: Arc<str>,
    pub member: Option<Box<str>>,
}

/// A scope as written in a rule: `assets`, `asset:{id}` (from the path), `asset:fixed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScopeTemplate {
    family: Arc<str>,
    member: Option<MemberTemplate>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum MemberTemplate {
    Literal(Box<str>),
    Capture(String),
    /// `{body.field}`: every string in the JSON request body's `field` array
    /// (or the one string there), e.g. Scenario's `DELETE /assets {"assetIds": […]}`.
    BodyField(String),
}

/// A scope whose members come from the write's JSON body, resolved by the cache layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyScope {
    pub family: Arc<str>,
    pub field: String,
}

impl BodyScope {
    /// The scopes `body` names; `None` when the body is not JSON with that
    /// field, and the caller must fall back to the whole family.
    pub fn resolve(&self, body: &[u8]) -> Option<Vec<Scope>> {
        let value: serde_json::Value = serde_json::from_slice(body).ok()?;
        let members: Vec<&str> = match value.get(&self.field)? {
            serde_json::Value::Array(items) => items
                .iter()
                .map(|item| item.as_str())
                .collect::<Option<_>>()?,
            serde_json::Value::String(one) => vec![one.as_str()],
            _ => return None,
        };
        Some(
            members
                .into_iter()
                .map(|member| Scope {
                    family: Arc::clone(&self.family),
                    member: Some(member.into()),
                })
                .collect(),
        )
    }

    /// The whole family: what to invalidate when the body cannot be read.
    pub fn family(&self) -> Scope {
        Scope {
            family: Arc::clone(&self.family),
            member: None,
        }
    }
}

impl ScopeTemplate {
    /// Parses a scope and checks its `{placeholder}` exists in `pattern`.
    pub fn parse(source: &str, pattern: &PathPattern) -> Result<Self, String> {
        let (family, member) = match source.split_once(':') {
            None => (source, None),
            Some((family, member)) => (family, Some(member)),
        };
        let valid_name = |name: &str| {
            !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        };
        if !valid_name(family) {
            return Err(format!(
                "bad scope `{source}`: expected `family` or `family:{{param}}`"
            ));
        }
        let member = match member {
            None => None,
            Some(member) if member.starts_with("{body.") && member.ends_with('}') => {
                let field = &member[6..member.len() - 1];
                if !valid_name(field) {
                    return Err(format!("bad body field in scope `{source}`"));
                }
                Some(MemberTemplate::BodyField(field.to_owned()))
            }
            Some(member) if member.starts_with('{') && member.ends_with('}') => {
                let name = &member[1..member.len() - 1];
                if !pattern.has_capture(name) {
                    return Err(format!(
                        "scope `{source}` uses `{{{name}}}`, which `{}` does not capture",
                        pattern.as_str()
                    ));
                }
                Some(MemberTemplate::Capture(name.to_owned()))
            }
            Some(member) if valid_name(member) => Some(MemberTemplate::Literal(member.into())),
            Some(_) => return Err(format!("bad scope `{source}`")),
        };
        Ok(ScopeTemplate {
            family: family.into(),
            member,
        })
    }

    /// The scope for a request path that `pattern` matched (`None` for body scopes).
    fn render(&self, pattern: &PathPattern, path: &str) -> Option<Scope> {
        let member = match &self.member {
            None => None,
            Some(MemberTemplate::Literal(literal)) => Some(literal.clone()),
            Some(MemberTemplate::Capture(name)) => pattern.capture(path, name).map(Into::into),
            Some(MemberTemplate::BodyField(_)) => return None,
        };
        Some(Scope {
            family: Arc::clone(&self.family),
            member,
        })
    }

    /// Whether the members come from the request body (not allowed on reads).
    pub fn from_body(&self) -> bool {
        matches!(self.member, Some(MemberTemplate::BodyField(_)))
    }

    fn body_scope(&self) -> Option<BodyScope> {
        match &self.member {
            Some(MemberTemplate::BodyField(field)) => Some(BodyScope {
                family: Arc::clone(&self.family),
                field: field.clone(),
            }),
            _ => None,
        }
    }
}

/// Which methods a write rule applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MethodMatch {
    /// `*`: every method that is not a safe read (GET, HEAD, OPTIONS, TRACE).
    AnyWrite,
    Listed(Vec<Method>),
}

impl MethodMatch {
    pub fn matches(&self, method: &Method) -> bool {
        match self {
            MethodMatch::AnyWrite => !method.is_safe(),
            MethodMatch::Listed(methods) => methods.contains(method),
        }
    }
}

/// Parses `GET /api/assets`, `POST|DELETE /api/assets/{id:uuid}/tags`, `* /api/assets/**`.
pub fn parse_match(source: &str) -> Result<(MethodMatch, PathPattern), String> {
    let (methods, path) = source
        .trim()
        .split_once(' ')
        .ok_or_else(|| format!("`{source}`: expected `METHOD /path`, e.g. `GET /api/assets`"))?;
    let methods = if methods == "*" {
        MethodMatch::AnyWrite
    } else {
        MethodMatch::Listed(
            methods
                .split('|')
                .map(|method| {
                    Method::from_bytes(method.as_bytes())
                        .ok()
                        .filter(|_| method.bytes().all(|b| b.is_ascii_uppercase()))
                        .ok_or_else(|| format!("`{method}` is not an HTTP method (use upper case)"))
                })
                .collect::<Result<_, _>>()?,
        )
    };
    Ok((methods, PathPattern::parse(path.trim())?))
}

/// A cacheable read: `GET pattern` → TTL and scope.
#[derive(Debug, Clone)]
pub struct ReadRule {
    pub pattern: PathPattern,
    pub ttl: Duration,
    pub scope: ScopeTemplate,
    /// Identical for every team: stored once, in the shared partition.
    pub shared: bool,
    /// After expiry, serve the old entry at once and refresh in the background, for this long.
    pub stale_while_revalidate: Duration,
    /// After expiry, serve the old entry when the refresh fails (5xx, timeout), for this long.
    pub stale_if_error: Duration,
}

impl ReadRule {
    /// How long past its TTL an entry may still be useful.
    pub fn grace(&self) -> Duration {
        self.stale_while_revalidate.max(self.stale_if_error)
    }
}

/// A write: `METHODS pattern` → the scopes a 2xx answer invalidates.
#[derive(Debug, Clone)]
pub struct WriteRule {
    pub methods: MethodMatch,
    pub pattern: PathPattern,
    pub scopes: Vec<ScopeTemplate>,
}

/// An upstream's cache rules, in match order.
#[derive(Debug, Clone, Default)]
pub struct CachePolicy {
    pub reads: Vec<ReadRule>,
    pub writes: Vec<WriteRule>,
}

/// What the cache does with one request; decided once, at classification.
#[derive(Debug, Clone)]
pub enum CacheRoute {
    Read {
        rule: usize,
        scope: Scope,
    },
    Write {
        scopes: Vec<Scope>,
        /// Scopes whose members the request body names.
        from_body: Vec<BodyScope>,
    },
}

impl CachePolicy {
    /// GET and HEAD are checked against the read rules, other methods against
    /// the write rules; the first matching rule decides.
    pub fn classify(&self, method: &Method, path: &str) -> Option<CacheRoute> {
        if method == Method::GET || method == Method::HEAD {
            return self.reads.iter().enumerate().find_map(|(index, rule)| {
                rule.pattern.matches(path).then(|| CacheRoute::Read {
                    rule: index,
                    scope: rule
                        .scope
                        .render(&rule.pattern, path)
                        .expect("read scopes are validated to come from the path"),
                })
            });
        }
        self.writes
            .iter()
            .find(|rule| rule.methods.matches(method) && rule.pattern.matches(path))
            .map(|rule| CacheRoute::Write {
                scopes: rule
                    .scopes
                    .iter()
                    .filter_map(|scope| scope.render(&rule.pattern, path))
                    .collect(),
                from_body: rule
                    .scopes
                    .iter()
                    .filter_map(ScopeTemplate::body_scope)
                    .collect(),
            })
    }
}

/// What the client's request asks of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestMode {
    /// Use the cache.
    Normal,
    /// `Cache-Control: no-cache` (or `max-age=0`, or `Pragma: no-cache`):
    /// fetch fresh and replace the entry.
    Refresh,
    /// `Cache-Control: no-store`, or a `Range` request: neither read nor write the cache.
    Bypass,
}

fn directives(headers: &HeaderMap, name: &HeaderName) -> impl Iterator<Item = String> {
    crate::wire::rare_field_values(headers, name)
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|directive| directive.trim().to_ascii_lowercase())
        .collect::<Vec<_>>()
        .into_iter()
}

pub fn request_mode(headers: &HeaderMap) -> RequestMode {
    // Most requests name none of the three: one pass over the names says so.
    let mut named = headers
        .keys()
        .filter(|name| [&header::RANGE, &header::CACHE_CONTROL, &header::PRAGMA].contains(name));
    if named.next().is_none() {
        return RequestMode::Normal;
    }
    if headers.contains_key(header::RANGE) {
        return RequestMode::Bypass;
    }
    let mut mode = RequestMode::Normal;
    let mut has_cache_control = false;
    for directive in directives(headers, &header::CACHE_CONTROL) {
        has_cache_control = true;
        match directive.as_str() {
            "no-store" => return RequestMode::Bypass,
            "no-cache" | "max-age=0" => mode = RequestMode::Refresh,
            _ => {}
        }
    }
    // RFC 9111 §5.4: Pragma only counts when Cache-Control is absent.
    if !has_cache_control && directives(headers, &header::PRAGMA).any(|d| d == "no-cache") {
        mode = RequestMode::Refresh;
    }
    mode
}

/// Why a response was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotStored {
    Status,
    SetCookie,
    CacheControl,
    Vary,
}

/// Only 200s without `Set-Cookie`, `private`/`no-store`/`no-cache`, and varying
/// on nothing but what the key holds (`Accept`, `Accept-Encoding`) are stored.
pub fn storable(status: StatusCode, headers: &HeaderMap) -> Result<(), NotStored> {
    if status != StatusCode::OK {
        return Err(NotStored::Status);
    }
    if headers.contains_key(header::SET_COOKIE) {
        return Err(NotStored::SetCookie);
    }
    if directives(headers, &header::CACHE_CONTROL).any(|directive| {
        matches!(directive.as_str(), "private" | "no-store" | "no-cache")
            || directive.starts_with("private=")
            || directive.starts_with("no-cache=")
    }) {
        return Err(NotStored::CacheControl);
    }
    if directives(headers, &header::VARY)
        .any(|field| field != "accept" && field != "accept-encoding")
    {
        return Err(NotStored::Vary);
    }
    Ok(())
}

/// `If-None-Match` against an entity tag, with the weak comparison RFC 9110 §13.1.2 prescribes.
pub fn if_none_match(condition: &HeaderValue, etag: &HeaderValue) -> bool {
    let Ok(condition) = condition.to_str() else {
        return false;
    };
    let Ok(etag) = etag.to_str() else {
        return false;
    };
    let opaque = |tag: &str| tag.trim().trim_start_matches("W/").to_owned();
    condition.trim() == "*"
        || condition
            .split(',')
            .any(|candidate| opaque(candidate) == opaque(etag))
}

/// A strong validator for a body the upstream sent without one.
pub fn strong_etag(body: &[u8]) -> HeaderValue {
    let hash = blake3::hash(body);
    HeaderValue::from_str(&format!("\"tg-{}\"", &hash.to_hex()[..32]))
        .expect("hex is a valid header value")
}

/// The `Cache-Status` header name (RFC 9211).
pub static CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");

/// RFC 9211 `Cache-Status` values, with `teamgate` as the cache's name, and
/// where the gateway's member goes in the field.
pub mod cache_status {
    use http::{HeaderMap, HeaderValue};

    use super::CACHE_STATUS;

    /// Adds the gateway's member to an answer's `Cache-Status`, after any
    /// the upstream's own caches put there: RFC 9211 §2 lists the caches
    /// from the origin's side, so each adds its member last and keeps the rest.
    pub fn add(headers: &mut HeaderMap, member: HeaderValue) {
        headers.append(&CACHE_STATUS, member);
    }

    /// The gateway's member of an answer's `Cache-Status` (see [`add`]): the
    /// field's last.
    pub fn own(headers: &HeaderMap) -> Option<&HeaderValue> {
        headers.get_all(&CACHE_STATUS).iter().next_back()
    }

    /// Values for the first hour are built once and shared (a clone is a
    /// reference-count increment); hits are the hot path.
    pub fn hit(ttl_left: u64) -> HeaderValue {
        static TABLE: std::sync::OnceLock<Vec<HeaderValue>> = std::sync::OnceLock::new();
        let make =
            |ttl: u64| HeaderValue::from_str(&format!("teamgate; hit; ttl={ttl}")).expect("ascii");
        let table = TABLE.get_or_init(|| (0..=3600).map(make).collect());
        table
            .get(ttl_left as usize)
            .cloned()
            .unwrap_or_else(|| make(ttl_left))
    }

    /// `Age` values, shared the same way.
    pub fn age(seconds: u64) -> HeaderValue {
        static TABLE: std::sync::OnceLock<Vec<HeaderValue>> = std::sync::OnceLock::new();
        let table = TABLE.get_or_init(|| (0..=3600u64).map(HeaderValue::from).collect());
        table
            .get(seconds as usize)
            .cloned()
            .unwrap_or_else(|| HeaderValue::from(seconds))
    }
    pub const MISS_STORED: HeaderValue = HeaderValue::from_static("teamgate; fwd=miss; stored");
    pub const MISS: HeaderValue = HeaderValue::from_static("teamgate; fwd=miss");
    pub const COLLAPSED: HeaderValue = HeaderValue::from_static("teamgate; fwd=miss; collapsed");
    pub const REFRESH_STORED: HeaderValue =
        HeaderValue::from_static("teamgate; fwd=request; stored");
    pub const REFRESH: HeaderValue = HeaderValue::from_static("teamgate; fwd=request");
    pub const BYPASS: HeaderValue = HeaderValue::from_static("teamgate; fwd=bypass");

    pub fn stale_while_revalidate(ttl_left: i64) -> HeaderValue {
        HeaderValue::from_str(&format!(
            "teamgate; fwd=stale; ttl={ttl_left}; detail=stale-while-revalidate"
        ))
        .expect("ascii")
    }

    pub fn stale_if_error(ttl_left: i64, upstream_status: u16) -> HeaderValue {
        HeaderValue::from_str(&format!(
            "teamgate; fwd=stale; fwd-status={upstream_status}; ttl={ttl_left}; detail=stale-if-error"
        ))
        .expect("ascii")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        map
    }

    fn policy() -> CachePolicy {
        let read = |source: &str, scope: &str| {
            let (_, pattern) = parse_match(source).unwrap();
            ReadRule {
                scope: ScopeTemplate::parse(scope, &pattern).unwrap(),
                pattern,
                ttl: Duration::from_secs(30),
                shared: false,
                stale_while_revalidate: Duration::ZERO,
                stale_if_error: Duration::ZERO,
            }
        };
        let write = |source: &str, scopes: &[&str]| {
            let (methods, pattern) = parse_match(source).unwrap();
            WriteRule {
                scopes: scopes
                    .iter()
                    .map(|s| ScopeTemplate::parse(s, &pattern).unwrap())
                    .collect(),
                methods,
                pattern,
            }
        };
        CachePolicy {
            reads: vec![
                read("GET /api/assets", "assets"),
                read("GET /api/assets/remote-metadata", "remote-metadata"),
                read("GET /api/assets/{id:uuid}", "asset:{id}"),
            ],
            writes: vec![
                write("POST /api/assets/from-hash", &["assets", "tags"]),
                write(
                    "PUT|DELETE /api/assets/{id:uuid}",
                    &["asset:{id}", "assets"],
                ),
                write("* /api/assets/**", &["assets", "asset"]),
            ],
        }
    }

    fn scope(family: &str, member: Option<&str>) -> Scope {
        Scope {
            family: family.into(),
            member: member.map(Into::into),
        }
    }

    #[test]
    fn classification_table() {
        let id = "3f2504e0-4f89-41d3-9a0c-0305e82c3301";
        let policy = policy();
        let read = |method: Method, path: &str| match policy.classify(&method, path) {
            Some(CacheRoute::Read { scope, .. }) => Some(scope),
            _ => None,
        };
        let write = |method: Method, path: &str| match policy.classify(&method, path) {
            Some(CacheRoute::Write { scopes, .. }) => Some(scopes),
            _ => None,
        };
        assert_eq!(
            read(Method::GET, "/api/assets"),
            Some(scope("assets", None))
        );
        assert_eq!(
            read(Method::HEAD, "/api/assets"),
            Some(scope("assets", None))
        );
        // The literal route wins over `{id:uuid}`, and non-UUIDs are not details.
        assert_eq!(
            read(Method::GET, "/api/assets/remote-metadata"),
            Some(scope("remote-metadata", None))
        );
        assert_eq!(
            read(Method::GET, &format!("/api/assets/{id}")),
            Some(scope("asset", Some(id)))
        );
        assert_eq!(read(Method::GET, "/api/assets/from-hash"), None);
        assert_eq!(read(Method::GET, "/api/jobs"), None);

        assert_eq!(
            write(Method::POST, "/api/assets/from-hash"),
            Some(vec![scope("assets", None), scope("tags", None)])
        );
        assert_eq!(
            write(Method::DELETE, &format!("/api/assets/{id}")),
            Some(vec![scope("asset", Some(id)), scope("assets", None)])
        );
        // The safe default catches other writes under /api/assets.
        assert_eq!(
            write(Method::PATCH, &format!("/api/assets/{id}")),
            Some(vec![scope("assets", None), scope("asset", None)])
        );
        assert_eq!(write(Method::POST, "/api/prompt"), None);
        assert!(policy.classify(&Method::OPTIONS, "/api/assets/x").is_none());
    }

    #[test]
    fn body_scopes_name_the_members_the_body_lists() {
        let (_, pattern) = parse_match("DELETE /assets").unwrap();
        let template = ScopeTemplate::parse("asset:{body.assetIds}", &pattern).unwrap();
        let body = template.body_scope().unwrap();
        assert_eq!(
            body.resolve(br#"{"assetIds":["a1","a2"]}"#).unwrap(),
            vec![scope("asset", Some("a1")), scope("asset", Some("a2"))]
        );
        assert_eq!(
            body.resolve(br#"{"assetIds":"a1"}"#).unwrap(),
            vec![scope("asset", Some("a1"))]
        );
        assert!(body.resolve(b"not json").is_none());
        assert!(body.resolve(br#"{"other":[]}"#).is_none());
        assert!(body.resolve(br#"{"assetIds":[1]}"#).is_none());
        assert_eq!(body.family(), scope("asset", None));
    }

    #[test]
    fn rule_syntax_errors_are_explained() {
        assert!(parse_match("GET").is_err());
        assert!(parse_match("get /x").is_err());
        assert!(parse_match("GET x").is_err());
        let (_, pattern) = parse_match("GET /api/assets/{id:uuid}").unwrap();
        assert!(
            ScopeTemplate::parse("asset:{other}", &pattern)
                .unwrap_err()
                .contains("does not capture")
        );
        assert!(ScopeTemplate::parse("bad scope", &pattern).is_err());
        assert!(ScopeTemplate::parse("asset:{id}", &pattern).is_ok());
    }

    #[test]
    fn keys_separate_teams_queries_and_representations() {
        let team = |byte: &str| Partition::Team {
            upstream: 0,
            credential: CredentialId::of(byte),
        };
        let json = headers(&[("accept", "application/json")]);
        let base = CacheKey::new(team("a"), "/api/assets?limit=5", &json);
        assert_eq!(base, CacheKey::new(team("a"), "/api/assets?limit=5", &json));
        assert_ne!(
            base,
            CacheKey::new(team("b"), "/api/assets?limit=5", &json),
            "teams"
        );
        assert_ne!(
            base,
            CacheKey::new(
                Partition::Shared { upstream: 0 },
                "/api/assets?limit=5",
                &json
            )
        );
        assert_ne!(
            base,
            CacheKey::new(team("a"), "/api/assets?limit=6", &json),
            "query"
        );
        assert_ne!(
            base,
            CacheKey::new(team("a"), "/api/assets?limit=5&", &json),
            "exact query bytes"
        );
        assert_ne!(
            base,
            CacheKey::new(team("a"), "/api/assets?limit=5", &HeaderMap::new()),
            "accept"
        );
        let gzip = headers(&[("accept", "application/json"), ("accept-encoding", "gzip")]);
        assert_ne!(
            base,
            CacheKey::new(team("a"), "/api/assets?limit=5", &gzip),
            "accept-encoding"
        );
        let split = headers(&[("accept", "a"), ("accept", "b")]);
        assert_eq!(
            CacheKey::new(team("a"), "/", &split).accept.unwrap(),
            "a, b"
        );
    }

    #[test]
    fn storability_table() {
        let ok = StatusCode::OK;
        assert_eq!(
            storable(ok, &headers(&[("content-type", "application/json")])),
            Ok(())
        );
        assert_eq!(
            storable(ok, &headers(&[("vary", "Accept-Encoding, accept")])),
            Ok(())
        );
        assert_eq!(
            storable(StatusCode::NOT_FOUND, &HeaderMap::new()),
            Err(NotStored::Status)
        );
        assert_eq!(
            storable(StatusCode::CREATED, &HeaderMap::new()),
            Err(NotStored::Status)
        );
        assert_eq!(
            storable(ok, &headers(&[("set-cookie", "a=b")])),
            Err(NotStored::SetCookie)
        );
        for directive in [
            "private",
            "no-store",
            "max-age=60, Private",
            "no-cache",
            "private=\"x\"",
        ] {
            assert_eq!(
                storable(ok, &headers(&[("cache-control", directive)])),
                Err(NotStored::CacheControl),
                "{directive}"
            );
        }
        assert_eq!(
            storable(ok, &headers(&[("cache-control", "public, max-age=60")])),
            Ok(())
        );
        assert_eq!(
            storable(ok, &headers(&[("vary", "Cookie")])),
            Err(NotStored::Vary)
        );
        assert_eq!(
            storable(ok, &headers(&[("vary", "*")])),
            Err(NotStored::Vary)
        );
    }

    #[test]
    fn request_modes() {
        assert_eq!(request_mode(&HeaderMap::new()), RequestMode::Normal);
        assert_eq!(
            request_mode(&headers(&[("cache-control", "no-cache")])),
            RequestMode::Refresh
        );
        assert_eq!(
            request_mode(&headers(&[("cache-control", "max-age=0")])),
            RequestMode::Refresh
        );
        assert_eq!(
            request_mode(&headers(&[("pragma", "no-cache")])),
            RequestMode::Refresh
        );
        assert_eq!(
            request_mode(&headers(&[
                ("pragma", "no-cache"),
                ("cache-control", "max-age=5")
            ])),
            RequestMode::Normal
        );
        assert_eq!(
            request_mode(&headers(&[("cache-control", "No-Store")])),
            RequestMode::Bypass
        );
        assert_eq!(
            request_mode(&headers(&[("range", "bytes=0-1")])),
            RequestMode::Bypass
        );
    }

    #[test]
    fn if_none_match_uses_weak_comparison() {
        let etag = HeaderValue::from_static("\"abc\"");
        for (condition, expected) in [
            ("\"abc\"", true),
            ("W/\"abc\"", true),
            ("\"x\", \"abc\"", true),
            ("*", true),
            ("\"abd\"", false),
        ] {
            assert_eq!(
                if_none_match(&HeaderValue::from_static(condition), &etag),
                expected,
                "{condition}"
            );
        }
        let generated = strong_etag(b"body");
        assert!(generated.to_str().unwrap().starts_with("\"tg-"));
        assert_eq!(generated, strong_etag(b"body"));
        assert_ne!(generated, strong_etag(b"other"));
    }
}
