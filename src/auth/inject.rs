//! Turns an authenticated client request into the request the upstream gets.
//!
//! - The target becomes the upstream's absolute URI: its scheme and host, its
//!   base path, the path below the mount, and the query byte for byte.
//! - Hop-by-hop headers (RFC 9110 §7.6.1, plus any the client names in
//!   `Connection`) and the client's credentials (`X-API-Key`, `Authorization`,
//!   and the credential query parameter where the route uses one) are removed.
//! - The team's upstream credential is added where the route's rule says:
//!   a header, `Authorization: Bearer`, or a query parameter (Comfy's `/ws`).
//! - `Host` is the upstream's; `X-Forwarded-For`, `X-Forwarded-Proto` and
//!   `Via` are added unless the config turns them off.
//! - `X-Request-Id` is the request's id (see [`crate::telemetry`]), in place
//!   of whatever the client sent.

use std::borrow::Cow;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::task::{Context, Poll};

use futures_util::future::{Either, Ready, ready};
use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, Uri, Version};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use tower::{Layer, Service};

use super::X_API_KEY;
use crate::body::Body;
use crate::config::secret::HeaderForm;
use crate::config::{CredentialPlacement, ServerSettings};
use crate::error::GatewayError;
use crate::route::RouteClass;
use crate::telemetry::{RequestRecord, X_REQUEST_ID};
use crate::wire;

/// The client's address, with its `X-Forwarded-For` item made once per
/// connection; every request of the connection carries it in its
/// [`RequestRecord`].
#[derive(Debug, Clone)]
pub struct ClientAddr {
    pub addr: SocketAddr,
    forwarded_for: HeaderValue,
}

impl ClientAddr {
    pub fn new(addr: SocketAddr) -> Self {
        let forwarded_for = HeaderValue::try_from(addr.ip().to_string())
            .expect("an IP address is a valid header value");
        ClientAddr {
            addr,
            forwarded_for,
        }
    }
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// A field named `close`: only a `Connection: close` names it (RFC 9110
/// §16.3.2.2 reserves the name so that nothing sends one), and then, like
/// any field a `Connection` option names, it goes.
static CLOSE: HeaderName = HeaderName::from_static("close");

/// The names the strip knows by heart, by the bit each has in its masks:
/// RFC 9110 §7.6.1 connection-specific fields, plus the legacy ones seen in
/// the wild — always removed — and, last, `close`, removed only when a
/// `Connection` option names it.
fn known_names() -> [&'static HeaderName; 10] {
    [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
        &header::PROXY_AUTHORIZATION,
        &header::PROXY_AUTHENTICATE,
        &CLOSE,
    ]
}

/// The bits of [`known_names`] that are hop-by-hop: all but `close`.
const HOP_BY_HOP: u16 = (1 << 9) - 1;
const CONNECTION_BIT: u16 = 1;

/// The bit of a lowercase name in [`known_names`], if it has one: a match
/// on the text (its length first), not a comparison with each of ten names.
fn known_bit(lowercase: &[u8]) -> u16 {
    match lowercase {
        b"connection" => 1,
        b"keep-alive" => 1 << 1,
        b"proxy-connection" => 1 << 2,
        b"te" => 1 << 3,
        b"trailer" => 1 << 4,
        b"transfer-encoding" => 1 << 5,
        b"upgrade" => 1 << 6,
        b"proxy-authorization" => 1 << 7,
        b"proxy-authenticate" => 1 << 8,
        b"close" => 1 << 9,
        _ => 0,
    }
}

/// The bit of a `Connection` option (any case) in [`known_names`], if it
/// has one.
fn known_option_bit(option: &[u8]) -> u16 {
    let mut lowercase = [0u8; "proxy-authorization".len()];
    let Some(copy) = lowercase.get_mut(..option.len()) else {
        return 0;
    };
    copy.copy_from_slice(option);
    copy.make_ascii_lowercase();
    known_bit(copy)
}

/// Removes hop-by-hop headers. On an upgrade, `Connection: upgrade` and
/// `Upgrade` are the point of the request (or 101 answer) and are kept.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the names the message has, each matched as text,
    // instead of a hashed removal of each of the nine: most messages carry
    // one of them (`Connection`) or none. (Compared with each of the nine
    // names in turn, the pass cost ~900 instructions an upstream answer.)
    let mut present = 0u16;
    for name in headers.keys() {
        present |= known_bit(name.as_str().as_bytes());
    }
    if present & HOP_BY_HOP == 0 {
        return;
    }
    let mut remove = present & HOP_BY_HOP;
    let upgrade = keep_upgrade
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten();
    // The fields a `Connection` field names go too. An option with a name
    // the strip knows (`keep-alive`, `close`: nearly always the only ones)
    // joins the mask; any other is removed by name, below.
    let mut names_others = false;
    if present & CONNECTION_BIT != 0 {
        for value in headers.get_all(header::CONNECTION) {
            for option in wire::connection_options(value.as_bytes()) {
                match known_option_bit(option) {
                    0 => names_others |= !option.is_empty(),
                    bit => remove |= present & bit,
                }
            }
        }
    }
    if names_others {
        // Each value is cloned (a reference count) so the map can change
        // while it is read, and the names are looked up as text, never
        // built: no allocation per message. The `Connection` field itself
        // stays until the end, so indices hold.
        let mut index = 0;
        while let Some(value) = headers
            .get_all(header::CONNECTION)
            .iter()
            .nth(index)
            .cloned()
        {
            index += 1;
            for option in wire::connection_options(value.as_bytes()) {
                if known_option_bit(option) == 0
                    && let Ok(name) = std::str::from_utf8(option)
                {
                    headers.remove(name);
                }
            }
        }
    }
    for (at, name) in known_names().into_iter().enumerate() {
        if remove & (1 << at) != 0 {
            headers.remove(name);
        }
    }
    if let Some(upgrade) = upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, upgrade);
    }
}

/// Characters kept as-is in a query value: RFC 3986 unreserved.
pub(crate) const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Drops every `name=` parameter from a raw query (names compared decoded, so
/// `tok%65n` cannot sneak past) and appends `name=<value>`. All other
/// parameters stay byte for byte, in order.
pub fn replace_query_param(query: Option<&str>, name: &str, value: &str) -> String {
    let mut rewritten =
        String::with_capacity(query.map_or(0, str::len) + name.len() + value.len() * 3 + 2);
    for pair in query.into_iter().flat_map(|query| query.split('&')) {
        let key = pair.split_once('=').map_or(pair, |(key, _)| key);
        if pair.is_empty() || percent_decode_str(key).decode_utf8_lossy() == name {
            continue;
        }
        rewritten.push_str(pair);
        rewritten.push('&');
    }
    rewritten.push_str(name);
    rewritten.push('=');
    rewritten.extend(utf8_percent_encode(value, QUERY_VALUE));
    rewritten
}

/// Rewrites `request` in place into the upstream request.
pub fn prepare_upstream_request(
    request: &mut Request<Body>,
    settings: &ServerSettings,
) -> Result<(), GatewayError> {
    // First everything the request's record and URI say, as owned values
    // (reference counts, no copies of the route or the team); then the
    // request is rewritten. Every request here was routed (`Classify`).
    let record = RequestRecord::of(request).ok_or(GatewayError::Internal)?;
    let route = record.route().ok_or(GatewayError::Internal)?;
    let auth = record.authenticated();
    let public_read = record.is_public_read();
    let client_addr = record
        .client
        .as_ref()
        .map(|client| client.forwarded_for.clone());
    let client_tls = record.tls;
    let request_id = record.id.0.clone();
    let upstream = &route.upstream;
    // A public read carries no team credential: the client's own
    // `Authorization: public-auth-token` is what the upstream expects.
    let secret = match (auth, public_read) {
        (Some(auth), _) => Some(
            auth.team
                .credential_for(upstream)
                .ok_or(GatewayError::NoUpstreamCredential)?,
        ),
        (None, true) => None,
        (None, false) => return Err(GatewayError::Internal),
    };
    let placement = &route.rule().credential;
    let credential_header = match (placement, secret) {
        (_, None) | (CredentialPlacement::QueryParam(_), _) => None,
        (CredentialPlacement::Header(name), Some(secret)) => {
            Some((name.clone(), secret.header_value(HeaderForm::Plain)))
        }
        (CredentialPlacement::Bearer, Some(secret)) => Some((
            header::AUTHORIZATION,
            secret.header_value(HeaderForm::Bearer),
        )),
        (CredentialPlacement::Basic, Some(secret)) => Some((
            header::AUTHORIZATION,
            secret.header_value(HeaderForm::Basic),
        )),
    };

    let path = route.upstream_path(request.uri().path());
    let query: Option<Cow<'_, str>> = match (placement, secret) {
        (CredentialPlacement::QueryParam(name), Some(secret)) => {
            Some(replace_query_param(request.uri().query(), name, secret.expose()).into())
        }
        _ => request.uri().query().map(Cow::Borrowed),
    };
    let mut target = String::with_capacity(
        upstream.base_path.len() + path.len() + query.as_ref().map_or(0, |q| q.len() + 1),
    );
    target.push_str(&upstream.base_path);
    target.push_str(path);
    if let Some(query) = &query {
        target.push('?');
        target.push_str(query);
    }
    let mut uri = http::uri::Parts::default();
    uri.scheme = Some(upstream.scheme.clone());
    uri.authority = Some(upstream.authority.clone());
    uri.path_and_query = Some(PathAndQuery::try_from(target).map_err(|_| GatewayError::Internal)?);
    let uri = Uri::from_parts(uri).map_err(|_| GatewayError::Internal)?;
    let is_upgrade = route.class == RouteClass::Upgrade;
    let host = upstream.host_header.clone();
    let strips_authorization = secret.is_some();

    let received_version = request.version();
    *request.uri_mut() = uri;
    // Upstreams are spoken to over HTTP/1.1, whatever the client used.
    *request.version_mut() = Version::HTTP_11;

    let headers = request.headers_mut();
    strip_hop_by_hop(headers, is_upgrade);
    headers.remove(&X_API_KEY);
    if strips_authorization {
        headers.remove(header::AUTHORIZATION);
    }
    headers.insert(header::HOST, host);
    // The id the client's answer carries (a sane one the client sent, or
    // the gateway's), in place of whatever the client sent.
    headers.insert(X_REQUEST_ID.clone(), request_id);
    if settings.forwarded_headers {
        if let Some(ip) = client_addr {
            append_list(headers, &X_FORWARDED_FOR, ip);
        }
        let proto = if client_tls { "https" } else { "http" };
        headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    if settings.via {
        let via = if received_version == Version::HTTP_2 {
            HeaderValue::from_static("2 teamgate")
        } else {
            HeaderValue::from_static("1.1 teamgate")
        };
        append_list(headers, &header::VIA, via);
    }
    if let Some((name, value)) = credential_header {
        headers.insert(name, value.ok_or(GatewayError::Internal)?);
    }
    Ok(())
}

/// Appends to a comma-separated list header, joining any existing values
/// into one. Without existing values (the usual case) `item` goes in as is.
/// One look-up of the name either way (an entry), not one to ask and
/// another to insert.
fn append_list(headers: &mut HeaderMap, name: &HeaderName, item: HeaderValue) {
    let mut existing = match headers.entry(name) {
        Entry::Vacant(vacant) => {
            vacant.insert(item);
            return;
        }
        Entry::Occupied(existing) => existing,
    };
    let mut joined = Vec::new();
    for value in existing.iter() {
        joined.extend_from_slice(value.as_bytes());
        joined.extend_from_slice(b", ");
    }
    joined.extend_from_slice(item.as_bytes());
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        // Replaces every value the field had with the one list.
        existing.insert(value);
    }
}

/// Tower layer for [`InjectCredentials`].
#[derive(Debug, Clone)]
pub struct InjectCredentialsLayer {
    settings: std::sync::Arc<ServerSettings>,
}

impl InjectCredentialsLayer {
    pub fn new(settings: ServerSettings) -> Self {
        InjectCredentialsLayer {
            settings: std::sync::Arc::new(settings),
        }
    }
}

impl<S> Layer<S> for InjectCredentialsLayer {
    type Service = InjectCredentials<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InjectCredentials {
            settings: std::sync::Arc::clone(&self.settings),
            inner,
        }
    }
}

/// Applies [`prepare_upstream_request`]; the last step before the wire.
#[derive(Debug, Clone)]
pub struct InjectCredentials<S> {
    settings: std::sync::Arc<ServerSettings>,
    inner: S,
}

impl<S> Service<Request<Body>> for InjectCredentials<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Either<Ready<Result<Response<Body>, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<Body>) -> Self::Future {
        match prepare_upstream_request(&mut request, &self.settings) {
            Ok(()) => Either::Right(self.inner.call(request)),
            Err(error) => {
                tracing::error!(%error, "could not build the upstream request");
                Either::Left(ready(Ok(crate::error::reject(&request, error))))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_rewrite_replaces_only_the_credential_and_keeps_bytes() {
        assert_eq!(
            replace_query_param(
                Some("clientId=a%20b&token=tg_client&x=1,2"),
                "token",
                "k/+="
            ),
            "clientId=a%20b&x=1,2&token=k%2F%2B%3D"
        );
        assert_eq!(replace_query_param(None, "token", "k"), "token=k");
        // An encoded name is the same parameter and is removed too.
        assert_eq!(
            replace_query_param(Some("tok%65n=tg_client&token=again"), "token", "k"),
            "token=k"
        );
    }

    /// The fields `fields` leave after the strip (no upgrade), in order.
    fn left_after_strip(fields: &[(&str, &str)]) -> Vec<(String, String)> {
        let mut headers = HeaderMap::new();
        for (name, value) in fields {
            let name = HeaderName::from_bytes(name.as_bytes()).unwrap();
            headers.append(name, value.parse().unwrap());
        }
        strip_hop_by_hop(&mut headers, false);
        headers
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_str().unwrap().to_owned()))
            .collect()
    }

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_removed() {
        let only = |name: &str, value: &str| vec![(name.to_owned(), value.to_owned())];
        let cases: [(&[(&str, &str)], _, &str); 5] = [
            (
                &[
                    ("connection", "keep-alive, X-Hop"),
                    ("x-hop", "1"),
                    ("keep-alive", "timeout=5"),
                    ("te", "trailers"),
                    ("proxy-authorization", "Basic x"),
                    ("x-end-to-end", "kept"),
                ],
                only("x-end-to-end", "kept"),
                "the hop-by-hop fields, and the field `Connection` names",
            ),
            (
                &[
                    ("connection", "Connection, , X-One"),
                    ("connection", "x-two,bad name"),
                    ("x-one", "1"),
                    ("x-two", "2"),
                    ("x-three", "kept"),
                ],
                only("x-three", "kept"),
                "several `Connection` fields, one naming itself, empty and invalid options",
            ),
            (
                &[
                    ("connection", "Keep-Alive, CLOSE, Te"),
                    ("keep-alive", "timeout=5"),
                    ("close", "1"),
                    ("x-kept", "kept"),
                ],
                only("x-kept", "kept"),
                "options in any case; `close` named; `te` named and absent",
            ),
            (
                &[("connection", "keep-alive"), ("close", "1")],
                only("close", "1"),
                "a field named `close` the `Connection` field does not name",
            ),
            (
                &[("close", "1"), ("trailer", "x")],
                only("close", "1"),
                "a field named `close` and no `Connection` field",
            ),
        ];
        for (fields, left, case) in cases {
            assert_eq!(left_after_strip(fields), left, "{case}");
        }
    }

    /// Every name the strip knows by heart, as a field and as a
    /// `Connection` option in other cases, matches the name it stands for.
    #[test]
    fn the_known_names_match_their_bits() {
        for (at, name) in known_names().into_iter().enumerate() {
            assert_eq!(known_bit(name.as_str().as_bytes()), 1 << at, "{name}");
            let upper = name.as_str().to_ascii_uppercase();
            assert_eq!(known_option_bit(upper.as_bytes()), 1 << at, "{upper}");
        }
        assert_eq!(HOP_BY_HOP.count_ones(), 9);
        assert_eq!(known_names()[0], header::CONNECTION);
        for other in ["", "x-hop", "connections", "tee", "proxy-authorizations"] {
            assert_eq!(known_option_bit(other.as_bytes()), 0, "{other}");
        }
    }

    #[test]
    fn upgrade_headers_survive_on_an_upgrade() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, "Upgrade".parse().unwrap());
        headers.insert(header::UPGRADE, "websocket".parse().unwrap());
        strip_hop_by_hop(&mut headers, true);
        assert_eq!(headers[header::CONNECTION], "upgrade");
        assert_eq!(headers[header::UPGRADE], "websocket");
    }

    #[test]
    fn lists_are_appended_to() {
        let item = || HeaderValue::from_static("127.0.0.1");
        let mut headers = HeaderMap::new();
        append_list(&mut headers, &X_FORWARDED_FOR, item());
        assert_eq!(headers[&X_FORWARDED_FOR], "127.0.0.1");
        headers.insert(&X_FORWARDED_FOR, "10.0.0.1".parse().unwrap());
        append_list(&mut headers, &X_FORWARDED_FOR, item());
        assert_eq!(headers[&X_FORWARDED_FOR], "10.0.0.1, 127.0.0.1");
        // Several existing lines become one list, in order.
        headers.append(&X_FORWARDED_FOR, "10.0.0.2".parse().unwrap());
        append_list(&mut headers, &X_FORWARDED_FOR, item());
        assert_eq!(
            headers.get_all(&X_FORWARDED_FOR).iter().collect::<Vec<_>>(),
            ["10.0.0.1, 127.0.0.1, 10.0.0.2, 127.0.0.1"]
        );
    }

    #[test]
    fn credential_header_values_are_built_once_and_marked_sensitive() {
        use crate::config::secret::Secret;
        let secret = Secret::new("sk-test");
        for (form, text) in [
            (HeaderForm::Plain, "sk-test"),
            (HeaderForm::Bearer, "Bearer sk-test"),
            (HeaderForm::Basic, "Basic sk-test"),
        ] {
            let first = secret.header_value(form).unwrap();
            assert_eq!(first, text);
            assert!(first.is_sensitive());
            // The second is the same shared bytes, not a new allocation.
            let second = secret.header_value(form).unwrap();
            assert_eq!(first.as_bytes().as_ptr(), second.as_bytes().as_ptr());
        }
        assert!(
            Secret::new("bad\nvalue")
                .header_value(HeaderForm::Plain)
                .is_none()
        );
        assert_eq!(format!("{secret:?}"), "Secret(..)");
    }
}
