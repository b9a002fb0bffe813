//! HTTP/1.1 framing for client connections (RFC 9112), the pure half: which
//! request heads the gateway's own loop serves, and the answer heads it writes.
//!
//! The loop serves only requests that cannot carry a body: HTTP/1.1,
//! origin-form, no `Transfer-Encoding`, no `Content-Length` other than a
//! single `0`, no `Upgrade` or `Expect`, not `CONNECT`. Everything else —
//! uploads, websockets, HTTP/1.0, h2c, anything malformed — is handed to hyper
//! with its bytes untouched, so the rules request smuggling lives off stay in
//! one well-tested place and this one only has to recognise when it is out of
//! its depth.

use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};

use http::header::{self, HeaderMap};
use http::{Method, Request, StatusCode, Uri, Version, response};

use crate::fields::{self, EncodedFields, SharedFields};
use crate::wire::{self, FieldSpan, FieldSpans, RecentNames};

/// The most header fields a request the loop serves may carry (hyper's default).
const MAX_HEADERS: usize = 100;

/// What the front of the read buffer holds.
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "returned once per request and moved straight on; a box would be an allocation per request"
)]
pub enum Head {
    /// Not a whole head yet.
    Partial,
    /// A request with no body, taken off the buffer. `keep_alive` is false
    /// when the client said `Connection: close`.
    Simple {
        request: Request<()>,
        keep_alive: bool,
    },
    /// A request (or bytes) for hyper: the buffer is left exactly as read.
    HandOff,
}

/// Parses the request head at the front of `buf` (see the module docs for
/// which ones are served here). Header values share the head's bytes.
pub fn parse_request(buf: &mut BytesMut, recent: &mut RecentNames) -> Head {
    // Uninitialised slots: zeroing 100 of them cost more than the parse.
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    let consumed = match parsed.parse_with_uninit_headers(buf, &mut slots) {
        Ok(httparse::Status::Complete(consumed)) => consumed,
        Ok(httparse::Status::Partial) => return Head::Partial,
        Err(_) => return Head::HandOff,
    };
    let (Some(method), Some(path), Some(1)) = (parsed.method, parsed.path, parsed.version) else {
        return Head::HandOff;
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return Head::HandOff;
    };
    if method == Method::CONNECT || !path.starts_with('/') {
        return Head::HandOff;
    }
    let mut keep_alive = true;
    let mut seen_length = false;
    for field in parsed.headers.iter() {
        let name = field.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            // Only one `0` is a body this loop can skip; anything else
            // (a length, a list, a duplicate) is hyper's to judge.
            if seen_length || field.value != b"0" {
                return Head::HandOff;
            }
            seen_length = true;
        } else if name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"upgrade")
            || name.eq_ignore_ascii_case(b"expect")
        {
            return Head::HandOff;
        } else if name.eq_ignore_ascii_case(b"connection") {
            for option in wire::connection_options(field.value) {
                if option.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if option.eq_ignore_ascii_case(b"upgrade") {
                    return Head::HandOff;
                }
            }
        }
    }

    let target = wire::span_of(buf, path.as_bytes());
    let spans = FieldSpans::of(buf, parsed.headers);
    let head = buf.split_to(consumed).freeze();
    match build_request(&head, method, target, spans.as_slice(), recent) {
        Some(request) => Head::Simple {
            request,
            keep_alive,
        },
        None => {
            // A target or field `http` refuses: put the bytes back for hyper,
            // which answers it. Rare, so the copy does not matter.
            let mut restored = BytesMut::with_capacity(head.len() + buf.len());
            restored.extend_from_slice(&head);
            restored.extend_from_slice(buf);
            *buf = restored;
            Head::HandOff
        }
    }
}

fn build_request(
    head: &Bytes,
    method: Method,
    target: (u32, u32),
    spans: &[FieldSpan],
    recent: &mut RecentNames,
) -> Option<Request<()>> {
    let uri = Uri::from_maybe_shared(wire::cut(head, target)).ok()?;
    let headers = wire::header_map(head, spans, recent).ok()?;
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = Version::HTTP_11;
    *request.headers_mut() = headers;
    Some(request)
}

/// How an answer's body goes on the wire, and which framing headers say so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body follows, and the headers are written as they are: the answer
    /// to `HEAD` and a 304 describe a body that is not sent.
    AsIs,
    /// No body, and no framing headers (1xx, 204; RFC 9110 §8.6).
    None,
    /// `Content-Length: n`, then `n` bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`: a stream whose size is not known.
    Chunked,
}

impl Framing {
    /// The framing for an answer (to a `HEAD` if `is_head`) with `status`,
    /// whose body is `exact` bytes long if known. A streamed body with a
    /// `Content-Length` from upstream keeps that length (the writer holds it
    /// to it).
    pub fn for_answer(
        is_head: bool,
        status: StatusCode,
        headers: &HeaderMap,
        exact: Option<u64>,
    ) -> Framing {
        if status.is_informational() || status == StatusCode::NO_CONTENT {
            return Framing::None;
        }
        if is_head || status == StatusCode::NOT_MODIFIED {
            return Framing::AsIs;
        }
        if let Some(length) = exact {
            return Framing::Length(length);
        }
        let mut lengths = headers.get_all(header::CONTENT_LENGTH).iter();
        match (lengths.next(), lengths.next()) {
            (Some(value), None) => match value.to_str().ok().and_then(|v| v.parse().ok()) {
                Some(length) => Framing::Length(length),
                None => Framing::Chunked,
            },
            _ => Framing::Chunked,
        }
    }

    /// Whether body bytes follow the head.
    pub fn has_body(self) -> bool {
        matches!(self, Framing::Length(1..) | Framing::Chunked)
    }
}

/// Writes the head of the answer `parts` describe (to a `HEAD` if
/// `is_head`) into `out`, replacing what it held (callers keep one buffer
/// for every answer), and says how its body follows, which is `exact` bytes
/// long if known. Fields the answer shares with a cache entry are
/// written from their encoding when its own fields name none of them and
/// its length is known (always, for cache hits); else they are merged into
/// its map first.
pub fn encode_answer_head(
    parts: &mut response::Parts,
    exact: Option<u64>,
    is_head: bool,
    close: bool,
    date: &[u8],
    out: &mut Vec<u8>,
) -> Framing {
    let shared = match parts.extensions.remove::<SharedFields>() {
        Some(SharedFields(shared)) if exact.is_some() && !shared.overlaps(&parts.headers) => {
            Some(shared)
        }
        Some(SharedFields(shared)) => {
            fields::merge_into(&mut parts.headers, &shared);
            None
        }
        None => None,
    };
    let framing = Framing::for_answer(is_head, parts.status, &parts.headers, exact);
    encode_response_head(parts, shared.as_deref(), framing, close, date, out);
    framing
}

/// Writes the status line, the fields shared with a cache entry (if any;
/// none of them named in the answer's own map), the answer's own fields, the
/// framing header, `Date` if the answer has none, and `Connection: close`
/// when the connection ends after it.
fn encode_response_head(
    parts: &response::Parts,
    shared: Option<&EncodedFields>,
    framing: Framing,
    close: bool,
    date: &[u8],
    out: &mut Vec<u8>,
) {
    out.clear();
    if parts.status == StatusCode::OK {
        out.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
    } else {
        out.extend_from_slice(b"HTTP/1.1 ");
        out.extend_from_slice(parts.status.as_str().as_bytes());
        out.push(b' ');
        out.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(shared) = shared {
        out.extend_from_slice(shared.lines());
        if framing == Framing::AsIs {
            out.extend_from_slice(shared.framing_lines());
        }
    }
    wire::write_fields(&parts.headers, framing != Framing::AsIs, out);
    match framing {
        Framing::AsIs | Framing::None => {}
        Framing::Length(length) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(length).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    if !wire::names(&parts.headers, &header::DATE) && !shared.is_some_and(EncodedFields::has_date) {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(date);
        out.extend_from_slice(b"\r\n");
    }
    if close
        && !wire::names(&parts.headers, &header::CONNECTION)
        && !shared.is_some_and(EncodedFields::has_connection)
    {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::{HeaderName, HeaderValue};

    fn parse(text: &str) -> (Head, BytesMut) {
        let mut buf = BytesMut::from(text);
        let head = parse_request(&mut buf, &mut RecentNames::default());
        (head, buf)
    }

    fn simple(text: &str) -> (Request<()>, bool, BytesMut) {
        match parse(text) {
            (
                Head::Simple {
                    request,
                    keep_alive,
                },
                rest,
            ) => (request, keep_alive, rest),
            (other, _) => panic!("not served here: {other:?} for {text:?}"),
        }
    }

    /// Handed off with every byte still in the buffer, for hyper to read.
    fn assert_handed_off(text: &str) {
        let (head, rest) = parse(text);
        assert!(matches!(head, Head::HandOff), "{head:?} for {text:?}");
        assert_eq!(&rest[..], text.as_bytes(), "bytes kept for hyper");
    }

    #[test]
    fn a_get_is_served_and_the_next_request_stays_buffered() {
        let (request, keep_alive, rest) = simple(
            "GET /api/assets?limit=20 HTTP/1.1\r\nHost: x\r\nX-API-Key: k\r\nAccept: */*\r\n\r\nGET /next HTTP/1.1\r\n",
        );
        assert_eq!(request.method(), Method::GET);
        assert_eq!(request.uri().path(), "/api/assets");
        assert_eq!(request.uri().query(), Some("limit=20"));
        assert_eq!(request.version(), Version::HTTP_11);
        assert_eq!(request.headers()["x-api-key"], "k");
        assert_eq!(request.headers().len(), 3);
        assert!(keep_alive);
        assert_eq!(&rest[..], b"GET /next HTTP/1.1\r\n");
    }

    #[test]
    fn connection_close_and_a_zero_length_are_understood() {
        let (_, keep_alive, _) = simple("GET / HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n");
        assert!(!keep_alive);
        let (request, keep_alive, _) = simple("DELETE /x HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(request.method(), Method::DELETE);
        assert!(keep_alive);
    }

    #[test]
    fn a_partial_head_waits_for_more() {
        let (head, rest) = parse("GET /api/jobs HTTP/1.1\r\nHost: x\r\nX-Slow: ");
        assert!(matches!(head, Head::Partial));
        assert_eq!(&rest[..], b"GET /api/jobs HTTP/1.1\r\nHost: x\r\nX-Slow: ");
    }

    /// Bodies, upgrades, other versions and anything malformed go to hyper
    /// untouched: the smuggling rules (RFC 9112 §6.3) are decided there only.
    #[test]
    fn anything_with_a_body_or_odd_framing_is_handed_off_whole() {
        for text in [
            "POST /api/prompt HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello",
            "POST /api/prompt HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "GET / HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
            "GET / HTTP/1.1\r\nContent-Length: 00\r\n\r\n",
            "GET / HTTP/1.1\r\nContent-Length: 0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET /ws HTTP/1.1\r\nConnection: upgrade\r\n\r\n",
            "PUT /x HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            "GET / HTTP/1.0\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
            "GET http://169.254.169.254/latest HTTP/1.1\r\n\r\n",
            "OPTIONS * HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Header: x\r\n\r\n",
            "GET / HTTP/1.1\r\nFolded: a\r\n b\r\n\r\n",
            "GET /\x7f HTTP/1.1\r\n\r\n",
            "G@T / HTTP/1.1\r\n\r\n",
        ] {
            assert_handed_off(text);
        }
    }

    #[test]
    fn a_target_http_refuses_is_put_back_after_the_split() {
        // httparse accepts `<` in a target; `Uri` does not. The head was
        // already split off when that showed, so it must be put back whole,
        // pipelined bytes behind it included.
        assert_handed_off("GET /a<b HTTP/1.1\r\nHost: x\r\n\r\nGET /next HTTP/1.1\r\n\r\n");
    }

    #[test]
    fn too_many_fields_are_handed_off() {
        let mut text = String::from("GET / HTTP/1.1\r\n");
        for index in 0..=MAX_HEADERS {
            text.push_str(&format!("x-{index}: v\r\n"));
        }
        text.push_str("\r\n");
        assert_handed_off(&text);
    }

    fn parts(status: u16, headers: &[(&str, &str)]) -> response::Parts {
        let mut response = http::Response::new(());
        *response.status_mut() = StatusCode::from_u16(status).unwrap();
        for (name, value) in headers {
            response.headers_mut().append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        response.into_parts().0
    }

    fn head_of(parts: &response::Parts, framing: Framing, close: bool) -> String {
        head_with(parts, None, framing, close)
    }

    fn head_with(
        parts: &response::Parts,
        shared: Option<&EncodedFields>,
        framing: Framing,
        close: bool,
    ) -> String {
        let mut out = Vec::new();
        encode_response_head(
            parts,
            shared,
            framing,
            close,
            b"Mon, 23 Nov 2026 12:00:00 GMT",
            &mut out,
        );
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_body_decides_the_length_and_stale_framing_headers_go() {
        let answer = parts(
            200,
            &[
                ("content-type", "application/json"),
                ("content-length", "999"),
                ("transfer-encoding", "chunked"),
            ],
        );
        assert_eq!(
            head_of(&answer, Framing::Length(12), false),
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 12\r\ndate: Mon, 23 Nov 2026 12:00:00 GMT\r\n\r\n"
        );
        assert_eq!(
            head_of(&answer, Framing::Chunked, true),
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\ndate: Mon, 23 Nov 2026 12:00:00 GMT\r\nconnection: close\r\n\r\n"
        );
    }

    #[test]
    fn head_and_304_answers_keep_their_headers_and_an_own_date_is_kept() {
        let answer = parts(
            404,
            &[
                ("content-length", "42"),
                ("date", "Sun, 22 Nov 2026 00:00:00 GMT"),
            ],
        );
        assert_eq!(
            head_of(&answer, Framing::AsIs, false),
            "HTTP/1.1 404 Not Found\r\ncontent-length: 42\r\ndate: Sun, 22 Nov 2026 00:00:00 GMT\r\n\r\n"
        );
        let odd = parts(599, &[]);
        assert!(head_of(&odd, Framing::None, false).starts_with("HTTP/1.1 599 \r\n"));
    }

    #[test]
    fn shared_fields_come_first_and_framing_only_passes_for_head() {
        let stored = parts(
            200,
            &[
                ("content-type", "application/json"),
                ("content-length", "12"),
                ("date", "Sun, 22 Nov 2026 00:00:00 GMT"),
            ],
        );
        let shared = EncodedFields::new(stored.headers);
        let own = parts(200, &[("cache-status", "teamgate; hit")]);
        assert_eq!(
            head_with(&own, Some(&shared), Framing::Length(12), true),
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ndate: Sun, 22 Nov 2026 00:00:00 GMT\r\n\
             cache-status: teamgate; hit\r\ncontent-length: 12\r\nconnection: close\r\n\r\n",
            "the stored date is kept, not a second one added"
        );
        assert_eq!(
            head_with(&own, Some(&shared), Framing::AsIs, false),
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ndate: Sun, 22 Nov 2026 00:00:00 GMT\r\n\
             content-length: 12\r\ncache-status: teamgate; hit\r\n\r\n",
            "a HEAD answer carries the stored length"
        );
    }

    /// The loop and `stack/cache_hit` keep one buffer for every answer head.
    #[test]
    fn an_answer_head_replaces_what_the_buffer_held() {
        let mut out = b"HTTP/1.1 200 OK\r\nleft: over from the last answer\r\n".to_vec();
        let framing = encode_answer_head(
            &mut parts(404, &[("content-type", "application/json")]),
            Some(2),
            false,
            false,
            b"Mon, 23 Nov 2026 12:00:00 GMT",
            &mut out,
        );
        assert_eq!(framing, Framing::Length(2));
        assert_eq!(
            String::from_utf8(out).unwrap(),
            head_of(
                &parts(404, &[("content-type", "application/json")]),
                framing,
                false
            )
        );
    }

    #[test]
    fn framing_follows_method_status_and_body() {
        let none = HeaderMap::new();
        let mut declared = HeaderMap::new();
        declared.insert(header::CONTENT_LENGTH, HeaderValue::from_static("7"));
        let ok = StatusCode::OK;
        assert_eq!(
            Framing::for_answer(false, ok, &none, Some(3)),
            Framing::Length(3)
        );
        assert_eq!(
            Framing::for_answer(false, ok, &none, None),
            Framing::Chunked
        );
        assert_eq!(
            Framing::for_answer(false, ok, &declared, None),
            Framing::Length(7)
        );
        assert_eq!(
            Framing::for_answer(true, ok, &declared, Some(0)),
            Framing::AsIs
        );
        assert_eq!(
            Framing::for_answer(false, StatusCode::NOT_MODIFIED, &declared, None),
            Framing::AsIs
        );
        assert_eq!(
            Framing::for_answer(false, StatusCode::NO_CONTENT, &declared, None),
            Framing::None
        );
        assert!(!Framing::Length(0).has_body());
        assert!(Framing::Length(1).has_body() && Framing::Chunked.has_body());
        assert!(!Framing::AsIs.has_body() && !Framing::None.has_body());
    }
}
