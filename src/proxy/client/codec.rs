//! HTTP/1.1 framing for the upstream client (RFC 9112): the request head it
//! writes, the response head it parses, and how each body is delimited.
//!
//! Everything here is pure — bytes in, bytes or decisions out — so the rules
//! that decide where one message ends and the next begins (the rules request
//! smuggling lives off) are tested on their own, without sockets.

use std::mem::MaybeUninit;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap};
use http::{Method, StatusCode, Version, request};

use crate::wire::{self, FieldSpans, RecentNames};

/// Why an upstream's bytes could not be read as an HTTP/1.1 answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed upstream answer: {0}")]
pub struct ProtocolError(pub &'static str);

/// The most header fields an upstream answer may carry (hyper's default is 100).
const MAX_HEADERS: usize = 128;
/// The longest chunk-size line (with extensions) or trailer section accepted.
const MAX_CHUNK_LINE: usize = 4 * 1024;
const MAX_TRAILERS: usize = 16 * 1024;

/// How the request body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    /// No body; `Content-Length: 0` is written for methods that usually carry one.
    Empty,
    /// `Content-Length: n`, then exactly `n` bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`: a body whose size is unknown until it ends.
    Chunked,
}

impl RequestFraming {
    /// A body known to be empty, one of known size, or a stream.
    pub fn for_body(end_stream: bool, exact_size: Option<u64>) -> Self {
        match (end_stream, exact_size) {
            (true, _) | (false, Some(0)) => RequestFraming::Empty,
            (false, Some(length)) => RequestFraming::Length(length),
            (false, None) => RequestFraming::Chunked,
        }
    }
}

/// Methods whose requests normally have a body: an empty one is announced as
/// `Content-Length: 0`, since some servers wait for a body otherwise.
fn expects_body(method: &Method) -> bool {
    !matches!(
        *method,
        Method::GET
            | Method::HEAD
            | Method::DELETE
            | Method::OPTIONS
            | Method::TRACE
            | Method::CONNECT
    )
}

/// Writes `METHOD /path?query HTTP/1.1`, the headers, and the framing header.
///
/// Any `Content-Length` or `Transfer-Encoding` in `parts` is replaced by the
/// one `framing` says: the body's real framing is decided here and nowhere else.
pub fn encode_head(parts: &request::Parts, framing: RequestFraming, out: &mut BytesMut) {
    let target = parts
        .uri
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str);
    let estimate = 64
        + target.len()
        + parts
            .headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum::<usize>();
    out.reserve(estimate);
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.extend_from_slice(b" ");
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    wire::write_fields(&parts.headers, true, out);
    match framing {
        RequestFraming::Empty if !expects_body(&parts.method) => {}
        RequestFraming::Empty => out.extend_from_slice(b"content-length: 0\r\n"),
        RequestFraming::Length(length) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(length).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        RequestFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

/// A parsed response head.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
}

/// Parses a response head from the front of `buf` and removes it. `Ok(None)`:
/// the head is not complete yet. Header values share the head's bytes;
/// names the connection's last answer spelled alike come from `recent`.
pub fn parse_head(
    buf: &mut BytesMut,
    recent: &mut RecentNames,
) -> Result<Option<ResponseHead>, ProtocolError> {
    // Uninitialised slots: zeroing all of them cost more than the parse.
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut []);
    let consumed = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        buf,
        &mut slots,
    ) {
        Ok(httparse::Status::Complete(consumed)) => consumed,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(ProtocolError("too many headers")),
        Err(_) => return Err(ProtocolError("invalid response head")),
    };
    let status = response
        .code
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or(ProtocolError("invalid status code"))?;
    let version = if response.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let spans = FieldSpans::of(buf, response.headers);
    let head = buf.split_to(consumed).freeze();
    let headers = wire::header_map(&head, spans.as_slice(), recent).map_err(ProtocolError)?;
    Ok(Some(ResponseHead {
        status,
        version,
        headers,
    }))
}

/// How the response body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFraming {
    /// No body: a `HEAD` answer, 1xx, 204, 304.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Everything until the upstream closes the connection.
    UntilClose,
}

/// Decides the body framing of an answer to `method`. A `Transfer-Encoding`
/// overrides `Content-Length` (§6.3 rule 3), which is then removed so the
/// client side does not announce a length the body will not have.
pub fn response_framing(
    method: &Method,
    status: StatusCode,
    headers: &mut HeaderMap,
) -> Result<ResponseFraming, ProtocolError> {
    if *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok(ResponseFraming::Empty);
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
        let last_coding = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .flat_map(|value| value.as_bytes().split(|&byte| byte == b','))
            .map(<[u8]>::trim_ascii)
            .rfind(|coding| !coding.is_empty());
        return Ok(match last_coding {
            Some(coding) if coding.eq_ignore_ascii_case(b"chunked") => ResponseFraming::Chunked,
            _ => ResponseFraming::UntilClose,
        });
    }
    let mut length: Option<u64> = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for item in value.as_bytes().split(|&byte| byte == b',') {
            let item = item.trim_ascii();
            if item.is_empty() || !item.iter().all(u8::is_ascii_digit) || item.len() > 19 {
                return Err(ProtocolError("invalid content-length"));
            }
            let parsed: u64 = std::str::from_utf8(item)
                .ok()
                .and_then(|text| text.parse().ok())
                .ok_or(ProtocolError("invalid content-length"))?;
            if length.is_some_and(|seen| seen != parsed) {
                return Err(ProtocolError("conflicting content-length values"));
            }
            length = Some(parsed);
        }
    }
    Ok(match length {
        Some(0) => ResponseFraming::Empty,
        Some(length) => ResponseFraming::Length(length),
        None => ResponseFraming::UntilClose,
    })
}

/// Whether the connection may carry another request after this answer.
pub fn keeps_alive(version: Version, headers: &HeaderMap) -> bool {
    if version != Version::HTTP_11 {
        // HTTP/1.0 keep-alive is an opt-in extension; not worth the risk.
        return false;
    }
    !wire::says_close(headers)
}

/// What one decoding step of a chunked body produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Data(Bytes),
    /// The buffer holds no complete next step; read more.
    NeedMore,
    /// The last chunk and the trailers have been read.
    Done,
}

/// The chunked transfer coding, decoded from a buffer that fills as bytes arrive.
/// Chunk extensions and trailers are read and dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkedDecoder {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk, this many bytes to go.
    Data(u64),
    /// After a chunk's data, expecting its CRLF.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailers {
        seen: usize,
    },
    Done,
}

impl ChunkedDecoder {
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, ProtocolError> {
        loop {
            match *self {
                ChunkedDecoder::Size => {
                    let Some(line) = take_line(buf, MAX_CHUNK_LINE)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    let size = parse_chunk_size(&line)?;
                    *self = if size == 0 {
                        ChunkedDecoder::Trailers { seen: 0 }
                    } else {
                        ChunkedDecoder::Data(size)
                    };
                }
                ChunkedDecoder::Data(remaining) => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let data = split_up_to(buf, remaining);
                    let left = remaining - data.len() as u64;
                    *self = if left == 0 {
                        ChunkedDecoder::DataEnd
                    } else {
                        ChunkedDecoder::Data(left)
                    };
                    return Ok(Decoded::Data(data));
                }
                ChunkedDecoder::DataEnd => {
                    let Some(line) = take_line(buf, 2)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    if !line.is_empty() {
                        return Err(ProtocolError("chunk data longer than its size"));
                    }
                    *self = ChunkedDecoder::Size;
                }
                ChunkedDecoder::Trailers { seen } => {
                    if seen >= MAX_TRAILERS {
                        return Err(ProtocolError("trailer section too long"));
                    }
                    let Some(line) = take_line(buf, MAX_TRAILERS - seen)? else {
                        return Ok(Decoded::NeedMore);
                    };
                    *self = if line.is_empty() {
                        ChunkedDecoder::Done
                    } else {
                        ChunkedDecoder::Trailers {
                            seen: seen + line.len() + 2,
                        }
                    };
                }
                ChunkedDecoder::Done => return Ok(Decoded::Done),
            }
        }
    }
}

/// Takes at most `limit` bytes off the front of `buf`: the part of a
/// length-delimited body (or chunk) that has arrived.
pub fn split_up_to(buf: &mut BytesMut, limit: u64) -> Bytes {
    let take = usize::try_from(limit).map_or(buf.len(), |limit| limit.min(buf.len()));
    buf.split_to(take).freeze()
}

/// Takes one line (without its `\r\n` or bare `\n`) off the front of `buf`;
/// `None` while no line end has arrived. Lines longer than `max` are an error.
fn take_line(buf: &mut BytesMut, max: usize) -> Result<Option<BytesMut>, ProtocolError> {
    let window = &buf[..buf.len().min(max + 2)];
    let Some(end) = window.iter().position(|&byte| byte == b'\n') else {
        return if window.len() >= max + 2 {
            Err(ProtocolError("chunk line too long"))
        } else {
            Ok(None)
        };
    };
    let mut line = buf.split_to(end + 1);
    line.truncate(end);
    if line.last() == Some(&b'\r') {
        line.truncate(end - 1);
    }
    Ok(Some(line))
}

/// `1a3f` or `1a3f;name=value`: hex digits, then optional extensions.
fn parse_chunk_size(line: &[u8]) -> Result<u64, ProtocolError> {
    let digits_end = line
        .iter()
        .position(|byte| !byte.is_ascii_hexdigit())
        .unwrap_or(line.len());
    let (digits, rest) = line.split_at(digits_end);
    if digits.is_empty() || digits.len() > 16 {
        return Err(ProtocolError("invalid chunk size"));
    }
    let rest = rest.trim_ascii_start();
    if !(rest.is_empty() || rest.first() == Some(&b';')) {
        return Err(ProtocolError("invalid chunk size"));
    }
    Ok(digits.iter().fold(0u64, |size, &digit| {
        let value = match digit {
            b'0'..=b'9' => digit - b'0',
            b'a'..=b'f' => digit - b'a' + 10,
            _ => digit - b'A' + 10,
        };
        (size << 4) | u64::from(value)
    }))
}

/// Drops `n` bytes from the front of a queue of buffers (after a partial write).
pub fn advance_queue(queue: &mut std::collections::VecDeque<Bytes>, mut n: usize) {
    while n > 0 {
        let Some(front) = queue.front_mut() else {
            return;
        };
        if front.len() > n {
            front.advance(n);
            return;
        }
        n -= front.len();
        queue.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::{HeaderName, HeaderValue};

    fn head_of(method: Method, headers: &[(&str, &str)], framing: RequestFraming) -> String {
        let mut builder = http::Request::builder()
            .method(method)
            .uri("http://upstream.test/api/assets?limit=20");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let (parts, ()) = builder.body(()).unwrap().into_parts();
        let mut out = BytesMut::new();
        encode_head(&parts, framing, &mut out);
        String::from_utf8(out.to_vec()).unwrap()
    }

    #[test]
    fn the_request_head_is_origin_form_with_exactly_one_framing_header() {
        let head = head_of(
            Method::GET,
            &[("host", "upstream.test"), ("x-api-key", "k")],
            RequestFraming::Empty,
        );
        assert_eq!(
            head,
            "GET /api/assets?limit=20 HTTP/1.1\r\nhost: upstream.test\r\nx-api-key: k\r\n\r\n"
        );
        // A client's own framing headers never reach the wire: the body's real
        // framing replaces them, so the two can never disagree.
        let head = head_of(
            Method::POST,
            &[("content-length", "99"), ("transfer-encoding", "gzip")],
            RequestFraming::Length(5),
        );
        assert_eq!(
            head,
            "POST /api/assets?limit=20 HTTP/1.1\r\ncontent-length: 5\r\n\r\n"
        );
        let head = head_of(
            Method::PUT,
            &[("content-length", "5")],
            RequestFraming::Chunked,
        );
        assert!(head.ends_with("\r\ntransfer-encoding: chunked\r\n\r\n"));
        assert!(!head.contains("content-length"));
        let head = head_of(Method::POST, &[], RequestFraming::Empty);
        assert!(head.ends_with("\r\ncontent-length: 0\r\n\r\n"));
    }

    #[test]
    fn request_framing_follows_what_is_known_about_the_body() {
        assert_eq!(
            RequestFraming::for_body(true, Some(0)),
            RequestFraming::Empty
        );
        assert_eq!(
            RequestFraming::for_body(false, Some(0)),
            RequestFraming::Empty
        );
        assert_eq!(
            RequestFraming::for_body(false, Some(7)),
            RequestFraming::Length(7)
        );
        assert_eq!(
            RequestFraming::for_body(false, None),
            RequestFraming::Chunked
        );
    }

    #[test]
    fn a_head_parses_once_complete_and_leaves_the_body_in_the_buffer() {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Custom: a"[..],
        );
        assert!(
            parse_head(&mut buf, &mut RecentNames::default())
                .unwrap()
                .is_none()
        );
        buf.extend_from_slice(b"\r\nContent-Length: 2\r\n\r\n{}");
        let mut head = parse_head(&mut buf, &mut RecentNames::default())
            .unwrap()
            .unwrap();
        assert_eq!(head.status, StatusCode::OK);
        assert_eq!(head.headers["content-type"], "application/json");
        assert_eq!(head.headers["x-custom"], "a");
        assert_eq!(&buf[..], b"{}");
        assert_eq!(
            response_framing(&Method::GET, head.status, &mut head.headers),
            Ok(ResponseFraming::Length(2))
        );
    }

    #[test]
    fn garbage_and_oversized_heads_are_protocol_errors() {
        let mut buf = BytesMut::from(&b"NOT HTTP\r\n\r\n"[..]);
        assert!(parse_head(&mut buf, &mut RecentNames::default()).is_err());
        let mut many = String::from("HTTP/1.1 200 OK\r\n");
        for index in 0..=MAX_HEADERS {
            many.push_str(&format!("x-{index}: v\r\n"));
        }
        many.push_str("\r\n");
        let mut buf = BytesMut::from(many.as_bytes());
        assert_eq!(
            parse_head(&mut buf, &mut RecentNames::default()).unwrap_err(),
            ProtocolError("too many headers")
        );
    }

    fn framing_of(
        method: Method,
        status: u16,
        headers: &[(&str, &str)],
    ) -> Result<ResponseFraming, ProtocolError> {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        response_framing(&method, StatusCode::from_u16(status).unwrap(), &mut map)
    }

    #[test]
    fn response_framing_follows_rfc_9112_section_6_3() {
        use ResponseFraming::*;
        // Rule 1: no body, whatever the headers claim.
        assert_eq!(
            framing_of(Method::HEAD, 200, &[("content-length", "12")]),
            Ok(Empty)
        );
        assert_eq!(
            framing_of(Method::GET, 204, &[("content-length", "12")]),
            Ok(Empty)
        );
        assert_eq!(
            framing_of(Method::GET, 304, &[("transfer-encoding", "chunked")]),
            Ok(Empty)
        );
        // Rule 3: chunked last wins over Content-Length; any other last coding reads to close.
        assert_eq!(
            framing_of(
                Method::GET,
                200,
                &[
                    ("transfer-encoding", "gzip, chunked"),
                    ("content-length", "3")
                ]
            ),
            Ok(Chunked)
        );
        assert_eq!(
            framing_of(Method::GET, 200, &[("transfer-encoding", "chunked, gzip")]),
            Ok(UntilClose)
        );
        // Rule 5: one length, repeated identically at most; anything else is refused.
        assert_eq!(
            framing_of(Method::GET, 200, &[("content-length", "12, 12")]),
            Ok(Length(12))
        );
        assert!(
            framing_of(
                Method::GET,
                200,
                &[("content-length", "12"), ("content-length", "13")]
            )
            .is_err()
        );
        assert!(framing_of(Method::GET, 200, &[("content-length", "-1")]).is_err());
        assert!(framing_of(Method::GET, 200, &[("content-length", "+5")]).is_err());
        assert!(
            framing_of(
                Method::GET,
                200,
                &[("content-length", "99999999999999999999")]
            )
            .is_err()
        );
        // Rule 7: neither header, read until close.
        assert_eq!(framing_of(Method::GET, 200, &[]), Ok(UntilClose));
    }

    #[test]
    fn transfer_encoding_removes_a_conflicting_content_length() {
        let mut map = HeaderMap::new();
        map.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        map.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        response_framing(&Method::GET, StatusCode::OK, &mut map).unwrap();
        assert!(!map.contains_key(header::CONTENT_LENGTH));
    }

    #[test]
    fn only_http_11_without_connection_close_keeps_alive() {
        let mut map = HeaderMap::new();
        assert!(keeps_alive(Version::HTTP_11, &map));
        assert!(!keeps_alive(Version::HTTP_10, &map));
        map.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Close"),
        );
        assert!(!keeps_alive(Version::HTTP_11, &map));
    }

    fn decode_all(input: &[u8], step: usize) -> Result<(Vec<u8>, BytesMut), ProtocolError> {
        let mut decoder = ChunkedDecoder::Size;
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut fed = 0;
        loop {
            match decoder.decode(&mut buf)? {
                Decoded::Data(bytes) => body.extend_from_slice(&bytes),
                Decoded::Done => return Ok((body, buf)),
                Decoded::NeedMore if fed < input.len() => {
                    let next = (fed + step).min(input.len());
                    buf.extend_from_slice(&input[fed..next]);
                    fed = next;
                }
                Decoded::NeedMore => return Err(ProtocolError("truncated")),
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_whatever_way_the_bytes_arrive() {
        let wire = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nx-trailer: 1\r\n\r\nNEXT";
        for step in [1, 2, 3, 7, wire.len()] {
            let (body, rest) = decode_all(wire, step).unwrap();
            assert_eq!(body, b"hello, world", "fed {step} byte(s) at a time");
            // What follows the body belongs to the next message and is left alone.
            assert!(b"NEXT".starts_with(&rest), "fed {step}: {rest:?}");
        }
        assert_eq!(
            decode_all(b"A\n0123456789\n0\n\n", 4).unwrap().0,
            b"0123456789"
        );
    }

    #[test]
    fn malformed_chunked_bodies_are_protocol_errors() {
        for wire in [
            &b"zz\r\n"[..],
            b"5\r\nhello!!\r\n0\r\n\r\n",
            b"-5\r\nhello\r\n",
            b"11111111111111111\r\n",
            b"5 x\r\nhello\r\n",
        ] {
            assert!(
                decode_all(wire, 64).is_err(),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
        let endless_size_line = vec![b'1'; MAX_CHUNK_LINE + 10];
        assert_eq!(
            decode_all(&endless_size_line, 1000).unwrap_err(),
            ProtocolError("chunk line too long")
        );
        let mut endless_trailers = b"0\r\n".to_vec();
        endless_trailers.extend(std::iter::repeat_n(b"x: y\r\n", 4000).flatten());
        assert!(decode_all(&endless_trailers, 4096).is_err());
    }

    #[test]
    fn a_partial_write_advances_the_queue_across_buffers() {
        let mut queue: std::collections::VecDeque<Bytes> =
            [Bytes::from_static(b"abc"), Bytes::from_static(b"defg")].into();
        advance_queue(&mut queue, 4);
        assert_eq!(queue, [Bytes::from_static(b"efg")]);
        advance_queue(&mut queue, 3);
        assert!(queue.is_empty());
    }
}
