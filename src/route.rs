//! Upstream selection and request classification: pure functions, decided once.
//!
//! [`Router::classify`] looks at the method, target and headers of a request and
//! answers which upstream it is for (by mount prefix), which rule of that
//! upstream's preset applies (where the credential goes, which error shape the
//! gateway answers in) and its [`RouteClass`]. The result travels with the
//! request in its `RequestRecord`, so no later layer parses the path again.
//!
//! Paths are matched with [`PathPattern`], the small pattern language presets
//! and config rules are written in: literal segments, `{name}` for any one
//! segment, `{name:uuid}` for a UUID segment, and a trailing `**` for any rest.

use std::sync::Arc;

use http::{HeaderMap, Method, Request, Version, header};

use crate::cache::policy::CacheRoute;
use crate::config::{RouteRule, Upstream};
use crate::error::{ErrorShape, GatewayError};

/// What kind of handling a request needs; the layers below branch on this only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteClass {
    /// Forwarded unchanged, body streamed both ways.
    Passthrough,
    /// An HTTP/1.1 `Upgrade` (websocket): forwarded, then tunnelled both ways.
    Upgrade,
}

/// The routing decision for one request, kept in its `RequestRecord`.
#[derive(Debug, Clone)]
pub struct RouteMatch {
    pub upstream: Arc<Upstream>,
    /// Byte offset in the request path where the upstream's path begins
    /// (the mount prefix is stripped; the rest is forwarded byte for byte).
    pub path_offset: usize,
    /// Index into `upstream.preset.rules` of the rule that matched.
    rule_index: usize,
    pub class: RouteClass,
    /// What the cache does with it: a cacheable read, an invalidating write, or nothing.
    pub cache: Option<CacheRoute>,
}

impl RouteMatch {
    pub fn rule(&self) -> &RouteRule {
        &self.upstream.preset.rules[self.rule_index]
    }

    pub fn error_shape(&self) -> ErrorShape {
        self.rule().error_shape
    }

    /// The route class as a metric label.
    pub fn class_label(&self) -> &'static str {
        match (&self.class, &self.cache) {
            (RouteClass::Upgrade, _) => "upgrade",
            (_, Some(CacheRoute::Read { .. })) => "cacheable_read",
            (_, Some(CacheRoute::Write { .. })) => "invalidating_write",
            (RouteClass::Passthrough, None) => "passthrough",
        }
    }

    /// The path to send upstream (before the upstream base path is prepended).
    pub fn upstream_path<'a>(&self, request_path: &'a str) -> &'a str {
        below_mount(request_path, self.path_offset)
    }
}

/// Picks the upstream and rule for a request. Built once from the config.
#[derive(Debug, Clone)]
pub struct Router {
    /// Sorted by mount length, longest first, so `/scenario` wins over `/`.
    upstreams: Vec<Arc<Upstream>>,
    /// The shape used for rejections that happen before any upstream is known.
    default_shape: ErrorShape,
}

impl Router {
    pub fn new(upstreams: &[Arc<Upstream>]) -> Self {
        let mut upstreams = upstreams.to_vec();
        upstreams.sort_by_key(|upstream| std::cmp::Reverse(upstream.mount.len()));
        // The upstream mounted at the root (the primary one) speaks for the gateway
        // when no route is known yet.
        let default_shape = upstreams
            .iter()
            .find(|upstream| upstream.mount == "/")
            .or(upstreams.last())
            .and_then(|upstream| upstream.preset.rules.last())
            .map_or(ErrorShape::ComfyFlat, |rule| rule.error_shape);
        Router {
            upstreams,
            default_shape,
        }
    }

    /// The upstream whose mount covers `path` (the longest), where its part
    /// of the path starts, and the index of its first rule that matches it.
    fn locate(&self, path: &str) -> Option<(&Arc<Upstream>, usize, usize)> {
        let (upstream, path_offset) = self
            .upstreams
            .iter()
            .find_map(|upstream| mount_offset(&upstream.mount, path).map(|at| (upstream, at)))?;
        let upstream_path = below_mount(path, path_offset);
        let rule_index = upstream
            .preset
            .rules
            .iter()
            .position(|rule| rule.pattern.matches(upstream_path))?;
        Some((upstream, path_offset, rule_index))
    }

    /// The shape a request refused before it is routed is answered in: that
    /// of the rule its path falls under, so a Scenario client hears
    /// Scenario's shape even for a path the checks refuse; else the primary
    /// upstream's.
    pub fn shape_for(&self, path: &str) -> ErrorShape {
        self.locate(path)
            .map_or(self.default_shape, |(upstream, _, rule)| {
                upstream.preset.rules[rule].error_shape
            })
    }

    pub fn classify<B>(&self, request: &Request<B>) -> Result<RouteMatch, GatewayError> {
        if request.method() == Method::CONNECT {
            return Err(GatewayError::ConnectNotAllowed);
        }
        // HTTP/1 clients send origin-form (`/path`); an absolute-form target
        // (`http://host/path`) is how forward proxies are asked to reach other hosts.
        // HTTP/2 always carries :scheme and :authority, so only HTTP/1 is checked.
        if request.version() <= Version::HTTP_11 && request.uri().authority().is_some() {
            return Err(GatewayError::AbsoluteFormTarget);
        }
        let path = request.uri().path();
        let (upstream, path_offset, rule_index) = self.locate(path).ok_or(GatewayError::NoRoute)?;
        let upstream_path = below_mount(path, path_offset);
        let (class, cache) = if is_upgrade(request.version(), request.headers()) {
            (RouteClass::Upgrade, None)
        } else {
            let cache = upstream.cache.classify(request.method(), upstream_path);
            (RouteClass::Passthrough, cache)
        };
        Ok(RouteMatch {
            upstream: Arc::clone(upstream),
            path_offset,
            rule_index,
            class,
            cache,
        })
    }
}

/// Size limits checked before routing.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    pub max_header_bytes: usize,
    pub max_request_body: u64,
}

/// Refuses what must never reach an upstream: oversized header sections,
/// declared bodies over the cap, header values with control or non-ASCII
/// bytes, method-override headers, an HTTP/1.1 request without exactly one
/// `Host`, paths that are not normal, queries that decode to control
/// characters or invalid UTF-8. Cheap: one pass over what hyper parsed.
pub fn check_request<B>(request: &Request<B>, limits: RequestLimits) -> Result<(), GatewayError> {
    let uri = request.uri();
    let mut header_bytes =
        request.method().as_str().len() + uri.path().len() + uri.query().map_or(0, str::len) + 12;
    let mut hosts = 0usize;
    for (name, value) in request.headers() {
        header_bytes += name.as_str().len() + value.len() + 4;
        hosts += usize::from(name == header::HOST);
        if !is_visible_ascii(value.as_bytes()) {
            return Err(GatewayError::InvalidHeader);
        }
        if is_method_override(name) {
            return Err(GatewayError::MethodOverride);
        }
    }
    if header_bytes > limits.max_header_bytes {
        return Err(GatewayError::HeadersTooLarge);
    }
    // RFC 9112 §3.2: a server answers 400 to an HTTP/1.1 request without a
    // Host, and to any request with more than one. (HTTP/2 carries
    // `:authority` instead.)
    if hosts > 1 || (hosts == 0 && request.version() == Version::HTTP_11) {
        return Err(GatewayError::InvalidHost);
    }
    // (Content-Length with Transfer-Encoding never gets here: hyper applies
    // RFC 9112 §6.3 — chunked wins, Content-Length is dropped, the connection
    // closes after the answer; see tests/hostile.rs.)
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limits.max_request_body) {
        return Err(GatewayError::PayloadTooLarge);
    }
    check_path(uri.path())?;
    if let Some(query) = uri.query() {
        check_query(query)?;
    }
    Ok(())
}

/// `X-HTTP-Method-Override` and its variants. Frameworks and API front ends
/// that honour them (Google's API proxies, Rails and Express middleware) run
/// another method than the request's, while the gateway's cache rules,
/// invalidations and route quotas go by the request's own: a `GET` that
/// deletes would be stored as a read and invalidate nothing. Every method
/// passes through the gateway, so a client never needs one.
fn is_method_override(name: &http::HeaderName) -> bool {
    matches!(
        name.as_str(),
        "x-http-method-override" | "x-http-method" | "x-method-override"
    )
}

/// A path is forwarded byte for byte, so it must already be normal: nothing
/// an upstream (or a proxy in front of it) may rewrite into a different route
/// than the one classified here — the route that picks the cache rule, the
/// writes' invalidation and the route quotas. Refused:
/// - `.` and `..` segments, raw or percent-encoded (RFC 3986 §5.2.4), with
///   or without path parameters (`..;x`);
/// - a backslash, raw or encoded, which a decoding upstream (or one that
///   reads `\` as `/`, as WHATWG URLs and Windows servers do) splits
///   differently, and an encoded `/`;
/// - an empty segment (`//`), which nginx's default `merge_slashes` and many
///   routers merge away: `POST /api//prompt` would escape a quota on
///   `POST /api/prompt`;
/// - a percent-encoded unreserved character (RFC 3986 §2.3, §6.2.2.2: the
///   URI is equivalent to the one with the character itself, and normalizers
///   decode it): `POST /api/%61ssets/from-hash` would be the upstream's
///   `from-hash` write without invalidating what it changes.
///
/// A trailing `/`, letter case and a segment's `;` parameters are left
/// alone: they are not equivalent by the RFC, and rules match them as the
/// plain path (see [`PathPattern`]).
fn check_path(path: &str) -> Result<(), GatewayError> {
    if path == "*" {
        // `OPTIONS *` matches no mount and is answered 404 by routing.
        return Ok(());
    }
    if looks_normal(path) {
        return Ok(());
    }
    let mut segments = path.strip_prefix('/').unwrap_or(path).split('/').peekable();
    while let Some(segment) = segments.next() {
        if segment.is_empty() && segments.peek().is_some() {
            return Err(GatewayError::UnsafePath);
        }
        if !segment.contains('%') {
            // Nothing encoded: only the literal dot-segments and backslashes
            // can be wrong (the parser has already refused raw control bytes).
            if is_dot_segment(segment) || segment.contains('\\') {
                return Err(GatewayError::UnsafePath);
            }
            continue;
        }
        if encodes_an_unreserved_character(segment) {
            return Err(GatewayError::UnsafePath);
        }
        let decoded = percent_encoding::percent_decode_str(segment).collect::<Vec<u8>>();
        let Ok(decoded) = std::str::from_utf8(&decoded) else {
            return Err(GatewayError::UnsafePath);
        };
        if is_dot_segment(decoded)
            || decoded.contains(['/', '\\'])
            || decoded.chars().any(char::is_control)
        {
            return Err(GatewayError::UnsafePath);
        }
    }
    Ok(())
}

/// The usual path, in one pass: nothing encoded, no backslash, no empty
/// segment and no segment that starts with a dot (so none is `.` or `..`).
/// Anything else is looked at segment by segment.
fn looks_normal(path: &str) -> bool {
    let mut previous = b'/';
    for &byte in path.strip_prefix('/').unwrap_or(path).as_bytes() {
        if byte == b'%' || byte == b'\\' || (previous == b'/' && matches!(byte, b'.' | b'/')) {
            return false;
        }
        previous = byte;
    }
    true
}

/// Whether `segment` is `.` or `..`, path parameters aside: servlet
/// containers drop a segment's `;…` before resolving it, so to Tomcat
/// `/v1/..;x/admin` is `/admin`, outside the upstream's base path.
fn is_dot_segment(segment: &str) -> bool {
    matches!(segment_name(segment), "." | "..")
}

/// A path segment without its parameters (`;…`), which servlet containers
/// drop before they resolve or route it.
fn segment_name(segment: &str) -> &str {
    // A byte loop, not `split_once`: segments are a few bytes long, and the
    // searcher `split_once` sets up costs more than the scan (it runs for
    // every segment of every pattern tried, on every request).
    match segment.bytes().position(|byte| byte == b';') {
        Some(at) => &segment[..at],
        None => segment,
    }
}

/// The `/`-separated segments of a path with its leading `/` removed
/// (`api/assets` → `api`, `assets`; `a/` → `a`, ``); none for ``, so that
/// `/` has no segments. `str::split` does the same with a searcher whose
/// set-up costs more than these few bytes' scan.
#[derive(Debug, Clone)]
struct Segments<'p> {
    rest: Option<&'p str>,
}

impl<'p> Segments<'p> {
    fn of(rest: &'p str) -> Self {
        Segments {
            rest: (!rest.is_empty()).then_some(rest),
        }
    }
}

impl<'p> Iterator for Segments<'p> {
    type Item = &'p str;

    fn next(&mut self) -> Option<&'p str> {
        let rest = self.rest?;
        match rest.bytes().position(|byte| byte == b'/') {
            Some(at) => {
                self.rest = Some(&rest[at + 1..]);
                Some(&rest[..at])
            }
            None => {
                self.rest = None;
                Some(rest)
            }
        }
    }
}

/// Whether `segment` has a `%XX` that decodes to an unreserved character
/// (ALPHA, DIGIT, `-`, `.`, `_`, `~`; RFC 3986 §2.3).
fn encodes_an_unreserved_character(segment: &str) -> bool {
    segment
        .as_bytes()
        .windows(3)
        .filter(|window| window[0] == b'%')
        .filter_map(|window| {
            let high = char::from(window[1]).to_digit(16)?;
            let low = char::from(window[2]).to_digit(16)?;
            u8::try_from(high * 16 + low).ok()
        })
        .any(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~'))
}

/// Whether every byte is visible ASCII, a space or a tab: what the gateway
/// lets through in a header value. Folded without an early exit so that it
/// compiles to a vector loop: values are short and almost always clean, and
/// a per-byte branch cost more than the rest of the request check.
fn is_visible_ascii(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |bad, &b| {
        bad | u8::from((b < 0x20 && b != b'\t') || b >= 0x7f)
    }) == 0
}

fn check_query(query: &str) -> Result<(), GatewayError> {
    if !query.contains('%') {
        // Raw control and non-ASCII bytes never parse into a URI; only encoded ones can hide.
        return Ok(());
    }
    let decoded = percent_encoding::percent_decode_str(query).collect::<Vec<u8>>();
    match std::str::from_utf8(&decoded) {
        Ok(text) if !text.chars().any(char::is_control) => Ok(()),
        _ => Err(GatewayError::InvalidQuery),
    }
}

/// The part of `path` below its mount; the mount itself is the upstream's `/`.
fn below_mount(path: &str, offset: usize) -> &str {
    match &path[offset..] {
        "" => "/",
        rest => rest,
    }
}

/// Where the upstream's part of `path` starts, if `mount` covers it.
/// Mounts match whole segments: `/scenario` covers `/scenario/x`, not `/scenariox`.
fn mount_offset(mount: &str, path: &str) -> Option<usize> {
    if mount == "/" {
        return path.starts_with('/').then_some(0);
    }
    let rest = path.strip_prefix(mount)?;
    (rest.is_empty() || rest.starts_with('/')).then_some(mount.len())
}

/// An HTTP/1.1 upgrade request: `Connection: upgrade` plus an `Upgrade` header.
pub fn is_upgrade(version: Version, headers: &HeaderMap) -> bool {
    version == Version::HTTP_11
        && crate::wire::names(headers, &header::UPGRADE)
        && crate::wire::rare_field_values(headers, &header::CONNECTION)
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// A path pattern: `/api/assets/{id:uuid}`, `/api/v2/**`, `/ws`.
///
/// Patterns decide what the gateway does with a request — its cache rule,
/// the writes it invalidates, its route quota, where the credential goes —
/// so they match every spelling a common upstream router treats as the same
/// path: a trailing `/` (`/ws/` as `/ws`), any letter case (`/API/Prompt` as
/// `/api/prompt`; Express and ASP.NET route case-insensitively by default),
/// and a segment's path parameters (`/api/prompt;x=1` as `/api/prompt`, as
/// servlet containers do). Matching more is the safe side: a path the
/// upstream tells apart is its 404, which is neither stored nor costly,
/// while a path matched less would escape a quota or skip an invalidation.
/// (Spellings that only a decoding or slash-merging upstream reads as the
/// route are refused before matching; see `check_path`.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    source: String,
    /// `/` and the leading literal segments (`/api/assets` for
    /// `/api/assets/{id:uuid}`): every path the pattern matches starts with
    /// it, so most rules are ruled out by one comparison, without splitting
    /// the path.
    literal_prefix: String,
    segments: Vec<Segment>,
    /// Ends in `**`: any number (zero included) of further segments.
    open_tail: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `{name}` (named) or `*` (anonymous): any one non-empty segment.
    Any(Option<String>),
    /// `{name:uuid}`.
    Uuid(String),
}

impl PathPattern {
    pub fn parse(source: &str) -> Result<Self, String> {
        let rest = source
            .strip_prefix('/')
            .ok_or_else(|| format!("pattern `{source}` must start with `/`"))?;
        let mut segments = Vec::new();
        let mut open_tail = false;
        let parts: Vec<&str> = if rest.is_empty() {
            Vec::new()
        } else {
            rest.split('/').collect()
        };
        for part in &parts {
            if open_tail {
                return Err(format!("`**` must be the last segment of `{source}`"));
            }
            let segment = match *part {
                "**" => {
                    open_tail = true;
                    continue;
                }
                "*" => Segment::Any(None),
                part if part.starts_with('{') && part.ends_with('}') => {
                    let inner = &part[1..part.len() - 1];
                    match inner.split_once(':') {
                        None if !inner.is_empty() => Segment::Any(Some(inner.to_owned())),
                        Some((name, "uuid")) if !name.is_empty() => Segment::Uuid(name.to_owned()),
                        _ => {
                            return Err(format!(
                                "bad placeholder `{part}` in `{source}` (use `{{name}}` or `{{name:uuid}}`)"
                            ));
                        }
                    }
                }
                part if part.contains(['{', '}', '*']) => {
                    return Err(format!("bad segment `{part}` in `{source}`"));
                }
                part => Segment::Literal(part.to_owned()),
            };
            segments.push(segment);
        }
        let literals: Vec<&str> = segments
            .iter()
            .map_while(|segment| match segment {
                Segment::Literal(literal) => Some(literal.as_str()),
                _ => None,
            })
            .collect();
        Ok(PathPattern {
            source: source.to_owned(),
            literal_prefix: format!("/{}", literals.join("/")),
            segments,
            open_tail,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.source
    }

    pub fn matches(&self, path: &str) -> bool {
        self.walk(path, |_, _| {})
    }

    /// The value of the `{name}` segment in `path`, if the pattern matches.
    pub fn capture<'p>(&self, path: &'p str, name: &str) -> Option<&'p str> {
        let mut found = None;
        let matched = self.walk(path, |segment, value| {
            if segment == name {
                found = Some(value);
            }
        });
        if matched { found } else { None }
    }

    /// Whether the pattern has a `{name}` placeholder.
    pub fn has_capture(&self, name: &str) -> bool {
        self.segments.iter().any(|segment| match segment {
            Segment::Any(Some(own)) | Segment::Uuid(own) => own == name,
            _ => false,
        })
    }

    /// Matches `path`, reporting each named placeholder's value.
    fn walk<'p>(&self, path: &'p str, mut on_capture: impl FnMut(&str, &'p str)) -> bool {
        if !may_start_with(path.as_bytes(), self.literal_prefix.as_bytes()) {
            return false;
        }
        let Some(rest) = path.strip_prefix('/') else {
            return false;
        };
        let mut parts = Segments::of(rest);
        for segment in &self.segments {
            let Some(part) = parts.next() else {
                return false;
            };
            let part = segment_name(part);
            let fits = match segment {
                Segment::Literal(literal) => part == literal || part.eq_ignore_ascii_case(literal),
                Segment::Any(_) => !part.is_empty(),
                Segment::Uuid(_) => uuid::Uuid::try_parse(part).is_ok(),
            };
            if !fits {
                return false;
            }
            if let Segment::Any(Some(name)) | Segment::Uuid(name) = segment {
                on_capture(name, part);
            }
        }
        // A trailing `/` matches as the path without it. Routers that ignore
        // it (Express's default, among others) would otherwise let
        // `POST /api/prompt/` escape a quota on `POST /api/prompt`, or a write
        // skip its invalidation; where an upstream tells them apart, the
        // slashed path is its 404 and matching it costs nothing.
        self.open_tail
            || match parts.next() {
                None => true,
                Some("") => parts.next().is_none(),
                Some(_) => false,
            }
    }
}

/// Whether `path` may start with `prefix`, ignoring letter case: the
/// patterns' first, cheap check. A `;` where the two differ may be a path
/// parameter the segment walk drops, so it is left to the walk.
fn may_start_with(path: &[u8], prefix: &[u8]) -> bool {
    // Paths are nearly always spelled as the patterns are: one `memcmp`.
    if path.starts_with(prefix) {
        return true;
    }
    for (byte, expected) in path.iter().zip(prefix) {
        if !byte.eq_ignore_ascii_case(expected) {
            return *byte == b';';
        }
    }
    path.len() >= prefix.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_whole_segments() {
        let id = "3f2504e0-4f89-41d3-9a0c-0305e82c3301";
        let cases: &[(&str, &str, bool)] = &[
            ("/ws", "/ws", true),
            ("/ws", "/ws/", true),
            ("/ws", "/ws//", false),
            // Letter case and path parameters are not part of the route.
            ("/api/prompt", "/API/Prompt", true),
            ("/api/prompt", "/api/prompt;jsessionid=1", true),
            ("/api/prompt", "/api;x/prompt", true),
            ("/api/prompt", "/api/prompt;x/", true),
            ("/api/prompt", "/api/promptx;", false),
            ("/api/prompt", "/api/;x/prompt", false),
            ("/api/assets/{id}/tags", "/api/assets/;x/tags", false),
            ("/api/v2/**", "/API/V2/jobs", true),
            ("/api/assets/{id:uuid}", &format!("/api/assets/{id}/"), true),
            ("/api/assets/{id:uuid}", "/api/assets/", false),
            ("/ws", "/wss", false),
            ("/api/v2/**", "/api/v2", true),
            ("/api/v2/**", "/api/v2/jobs/1/events", true),
            ("/api/v2/**", "/api/v2x/jobs", false),
            ("/**", "/", true),
            ("/**", "/anything/at/all", true),
            ("/api/assets/{id:uuid}", &format!("/api/assets/{id}"), true),
            ("/api/assets/{id:uuid}", "/api/assets/from-hash", false),
            (
                "/api/assets/{id:uuid}",
                &format!("/api/assets/{id}/tags"),
                false,
            ),
            ("/api/assets/{id}/tags", "/api/assets/x/tags", true),
            ("/api/assets/{id}/tags", "/api/assets//tags", false),
            ("/api/assets/*", "/api/assets/remote-metadata", true),
            ("/", "/", true),
            ("/", "/x", false),
            // The literal prefix is only a first check: segment boundaries
            // and what follows it still decide.
            ("/api/assets", "/api/assetsx", false),
            ("/api/assets/{id}/tags", "/api/assets", false),
            ("/api/assets/{id}/tags", "/api/asset/x/tags", false),
            ("/{team}/jobs", "/design/jobs", true),
            ("/{team}/jobs", "/design/job", false),
            ("/api/v2/**", "/api/v", false),
            // Spelled otherwise than the pattern only after its literal prefix.
            ("/api/assets/{id}/tags", "/api/assets/x/TAGS", true),
            ("/api/assets", "/api/ASSETS/", true),
        ];
        for (pattern, path, expected) in cases {
            let parsed = PathPattern::parse(pattern).unwrap();
            assert_eq!(parsed.matches(path), *expected, "{pattern} vs {path}");
        }
    }

    #[test]
    fn segments_are_what_split_on_slashes_gives() {
        for rest in ["", "a", "a/", "a//b", "api/assets", "/x", "a/b/c/"] {
            let expected: Vec<&str> = if rest.is_empty() {
                Vec::new()
            } else {
                rest.split('/').collect()
            };
            assert_eq!(Segments::of(rest).collect::<Vec<_>>(), expected, "{rest:?}");
        }
        assert_eq!(segment_name("prompt;x=1;y"), "prompt");
        assert_eq!(segment_name(";x"), "");
        assert_eq!(segment_name("prompt"), "prompt");
    }

    #[test]
    fn named_placeholders_capture_their_segment() {
        let id = "3f2504e0-4f89-41d3-9a0c-0305e82c3301";
        let pattern = PathPattern::parse("/api/assets/{id:uuid}/tags").unwrap();
        assert_eq!(
            pattern.capture(&format!("/api/assets/{id}/tags"), "id"),
            Some(id)
        );
        assert_eq!(pattern.capture("/api/assets/nope/tags", "id"), None);
        assert_eq!(
            pattern.capture(&format!("/api/assets/{id};v=2/tags"), "id"),
            Some(id),
            "without the segment's parameters, so its scope is the asset's"
        );
        assert!(pattern.has_capture("id") && !pattern.has_capture("other"));
        let any = PathPattern::parse("/collections/{collection}/assets").unwrap();
        assert_eq!(
            any.capture("/collections/c1/assets", "collection"),
            Some("c1")
        );
    }

    #[test]
    fn malformed_patterns_are_rejected_with_the_reason() {
        for bad in ["api", "/a/**/b", "/{}", "/{id:int}", "/a{b}", "/x*"] {
            assert!(PathPattern::parse(bad).is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn mounts_cover_whole_segments_only() {
        assert_eq!(mount_offset("/", "/api/assets"), Some(0));
        assert_eq!(mount_offset("/scenario", "/scenario/assets"), Some(9));
        assert_eq!(mount_offset("/scenario", "/scenario"), Some(9));
        assert_eq!(mount_offset("/scenario", "/scenarios"), None);
        assert_eq!(mount_offset("/", "*"), None);
    }

    #[test]
    fn unsafe_paths_and_queries_are_refused() {
        for path in [
            "/api/../admin",
            "/api/./assets",
            "/api/%2e%2e/x",
            "/api/%2E%2E/x",
            "/api/.%2e/x",
            "/api/assets%2f..%2fjobs",
            "/api/a%5cb",
            "/api/%00",
            "/api/%ff",
            "/..",
            // Names another route once slashes are merged or unreserved
            // characters decoded (RFC 3986 §6.2.2.2).
            "/api//prompt",
            "//api/prompt",
            "/api/prompt//",
            "/api/%61ssets",
            "/api/%41ssets",
            "/api/assets/from%2Dhash",
            "/api/assets/from%2dhash",
            "/api/v%32/jobs",
            "/api/%5Fx",
            "/api/%7e",
            "/api/a.b%2E",
            // Path parameters aside, a dot-segment (servlet containers).
            "/api/..;/admin",
            "/api/..;x=1/admin",
            "/api/.;x/assets",
            "/api/..%3b/admin",
            "/api\\..\\jobs",
            "/api/assets\\",
        ] {
            assert_eq!(check_path(path), Err(GatewayError::UnsafePath), "{path}");
            assert!(!looks_normal(path), "{path} must not take the fast path");
        }
        // The fast path takes the usual paths: the slow one is for odd ones.
        for path in [
            "/",
            "/api/assets",
            "/api/assets/",
            "/api/assets/3f2504e0-4f89-41d3-9a0c-0305e82c3301/tags",
            "/scenario/assets/asset_1",
        ] {
            assert!(looks_normal(path), "{path}");
        }
        for path in [
            "/",
            "/api/assets",
            "/api/assets/",
            "/api/a%20b",
            "/api/a%2Cb%3A%40",
            "/api/%E2%9C%93",
            "/api/100%",
            "/api/%g1",
            "/api/..x",
            "/api/x;..",
            "/api/...;x",
            "/api/.well-known",
            "*",
        ] {
            assert_eq!(check_path(path), Ok(()), "{path}");
        }
        for query in ["a=%00", "a=%0a", "a=%ff%fe", "a=%7f"] {
            assert_eq!(
                check_query(query),
                Err(GatewayError::InvalidQuery),
                "{query}"
            );
        }
        for query in [
            "include_tags=a,b",
            "name_contains=%E2%9C%93",
            "metadata_filter=%7B%22k%22%3A1%7D",
            "a=b+c",
        ] {
            assert_eq!(check_query(query), Ok(()), "{query}");
        }
    }

    /// Every byte value, alone and at each end of a value longer than a
    /// vector register, against the rule spelled out byte by byte.
    #[test]
    fn header_values_pass_only_visible_ascii_spaces_and_tabs() {
        for byte in 0..=u8::MAX {
            let allowed = byte == b'\t' || (0x20..0x7f).contains(&byte);
            assert_eq!(is_visible_ascii(&[byte]), allowed, "{byte:#04x}");
            let mut long = vec![b'v'; 100];
            long[99] = byte;
            assert_eq!(is_visible_ascii(&long), allowed, "{byte:#04x} last");
            long[99] = b'v';
            long[0] = byte;
            assert_eq!(is_visible_ascii(&long), allowed, "{byte:#04x} first");
        }
        assert!(is_visible_ascii(b""));
    }

    const LIMITS: RequestLimits = RequestLimits {
        max_header_bytes: 1024,
        max_request_body: 100,
    };

    /// `check_request` on a `method` request for `path` as a client sends it
    /// (with its `Host`), plus the field `name: value`.
    fn check_with<V>(method: Method, path: &str, name: &str, value: V) -> Result<(), GatewayError>
    where
        http::HeaderValue: TryFrom<V>,
        <http::HeaderValue as TryFrom<V>>::Error: Into<http::Error>,
    {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "gateway")
            .header(name, value)
            .body(())
            .unwrap();
        check_request(&request, LIMITS)
    }

    #[test]
    fn headers_over_the_limit_or_with_control_bytes_are_refused() {
        let get = |name, value| check_with(Method::GET, "/api/assets", name, value);
        assert_eq!(get("x-a", "plain value\twith tab".to_owned()), Ok(()));
        assert_eq!(
            get("x-a", "v".repeat(2000)),
            Err(GatewayError::HeadersTooLarge)
        );
        // (Control bytes never get this far: `http` and hyper refuse them when parsing.)
        assert_eq!(
            check_with(
                Method::GET,
                "/api/assets",
                "x-a",
                HeaderValueExt::bytes(b"caf\xc3\xa9")
            ),
            Err(GatewayError::InvalidHeader)
        );
        assert_eq!(
            check_with(Method::POST, "/api/assets", "content-length", "101"),
            Err(GatewayError::PayloadTooLarge)
        );
    }

    #[test]
    fn method_override_headers_are_refused() {
        let detail = "/api/assets/3f2504e0-4f89-41d3-9a0c-0305e82c3301";
        for name in [
            "x-http-method-override",
            "X-HTTP-Method",
            "x-method-override",
        ] {
            assert_eq!(
                check_with(Method::GET, detail, name, "DELETE"),
                Err(GatewayError::MethodOverride),
                "{name}"
            );
        }
        assert_eq!(
            check_with(Method::GET, detail, "x-http-method-overrides", "no"),
            Ok(())
        );
    }

    #[test]
    fn an_http_1_1_request_needs_exactly_one_host() {
        let with_hosts = |version: Version, hosts: &[&str]| {
            let mut request = Request::get("/api/assets").version(version);
            for host in hosts {
                request = request.header("host", *host);
            }
            check_request(&request.body(()).unwrap(), LIMITS)
        };
        assert_eq!(with_hosts(Version::HTTP_11, &["gateway"]), Ok(()));
        assert_eq!(
            with_hosts(Version::HTTP_11, &[]),
            Err(GatewayError::InvalidHost)
        );
        assert_eq!(
            with_hosts(Version::HTTP_11, &["a", "b"]),
            Err(GatewayError::InvalidHost)
        );
        assert_eq!(with_hosts(Version::HTTP_10, &[]), Ok(()));
        assert_eq!(
            with_hosts(Version::HTTP_10, &["a", "a"]),
            Err(GatewayError::InvalidHost)
        );
        assert_eq!(
            with_hosts(Version::HTTP_2, &[]),
            Ok(()),
            ":authority instead"
        );
    }

    struct HeaderValueExt;
    impl HeaderValueExt {
        fn bytes(bytes: &[u8]) -> http::HeaderValue {
            http::HeaderValue::from_bytes(bytes).unwrap()
        }
    }

    #[test]
    fn upgrade_needs_both_headers_on_http_1_1() {
        let mut headers = HeaderMap::new();
        headers.insert(header::UPGRADE, "websocket".parse().unwrap());
        assert!(!is_upgrade(Version::HTTP_11, &headers));
        headers.insert(header::CONNECTION, "keep-alive, Upgrade".parse().unwrap());
        assert!(is_upgrade(Version::HTTP_11, &headers));
        assert!(!is_upgrade(Version::HTTP_10, &headers));
    }
}

/// Tower layer for [`Classify`].
#[derive(Debug, Clone)]
pub struct ClassifyLayer {
    router: Arc<Router>,
    limits: RequestLimits,
}

impl ClassifyLayer {
    pub fn new(router: Router, limits: RequestLimits) -> Self {
        ClassifyLayer {
            router: Arc::new(router),
            limits,
        }
    }
}

impl<S> tower::Layer<S> for ClassifyLayer {
    type Service = Classify<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Classify {
            router: Arc::clone(&self.router),
            limits: self.limits,
            inner,
        }
    }
}

/// Attaches the [`RouteMatch`], or answers 400/404/405 for targets no upstream serves.
#[derive(Debug, Clone)]
pub struct Classify<S> {
    router: Arc<Router>,
    limits: RequestLimits,
    inner: S,
}

impl<S> tower::Service<Request<crate::body::Body>> for Classify<S>
where
    S: tower::Service<
            Request<crate::body::Body>,
            Response = http::Response<crate::body::Body>,
            Error = std::convert::Infallible,
        >,
{
    type Response = http::Response<crate::body::Body>;
    type Error = std::convert::Infallible;
    type Future = futures_util::future::Either<
        futures_util::future::Ready<Result<Self::Response, Self::Error>>,
        S::Future,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<crate::body::Body>) -> Self::Future {
        use futures_util::future::{Either, ready};
        let checked =
            check_request(&request, self.limits).and_then(|()| self.router.classify(&request));
        match checked {
            Ok(route) => {
                if let Some(span) = crate::telemetry::request_span() {
                    span.record("upstream", route.upstream.name.as_str());
                    span.record("route_class", route.class_label());
                }
                // Classified once: nothing above this layer sets a route.
                let _ = crate::telemetry::RequestRecord::attached(&mut request)
                    .route
                    .set(route);
                Either::Right(self.inner.call(request))
            }
            Err(error) => {
                let request_id = crate::telemetry::RequestId::of(&request);
                tracing::debug!(%error, "request refused by routing");
                let shape = self.router.shape_for(request.uri().path());
                Either::Left(ready(Ok(error.into_response(shape, request_id))))
            }
        }
    }
}
