//! HTTP/1.1 wire pieces both sides of the proxy share: the client-facing
//! loop ([`crate::server`]) and the upstream client (`proxy::client`) parse
//! heads with httparse and write header fields, chunk-size lines and
//! `Connection` options the same way, so each rule is written once here.

use bytes::{BufMut, Bytes};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Where one header field sits in a head being parsed, as offsets into the
/// read buffer: httparse borrows the buffer, so the fields are recorded
/// first and cut from the frozen head (no copy) once that borrow ends.
#[derive(Debug, Clone, Copy, Default)]
pub struct FieldSpan {
    name: (u32, u32),
    value: (u32, u32),
}

impl FieldSpan {
    /// The span of `field`, which httparse parsed out of `buf`.
    pub fn of(buf: &[u8], field: &httparse::Header<'_>) -> Self {
        FieldSpan {
            name: span_of(buf, field.name.as_bytes()),
            value: span_of(buf, field.value),
        }
    }
}

/// The spans of a parsed head's fields: inline up to [`FieldSpans::INLINE`]
/// fields (more than most heads carry), on the heap beyond, rather than an
/// array sized for the most fields a head may have (100 or 128) filled in
/// for every head. Both codecs record their spans through it.
#[derive(Debug)]
#[allow(
    clippy::large_enum_variant,
    reason = "lives on the stack for one parse; boxing the inline spans would be the allocation this avoids"
)]
pub enum FieldSpans {
    /// The first `.1` spans are the fields'.
    Inline([FieldSpan; FieldSpans::INLINE], usize),
    Spilled(Vec<FieldSpan>),
}

impl FieldSpans {
    pub const INLINE: usize = 24;

    /// The spans of `fields`, which httparse parsed out of `buf`.
    pub fn of(buf: &[u8], fields: &[httparse::Header<'_>]) -> Self {
        if fields.len() > FieldSpans::INLINE {
            return FieldSpans::Spilled(
                fields
                    .iter()
                    .map(|field| FieldSpan::of(buf, field))
                    .collect(),
            );
        }
        let mut inline = [FieldSpan::default(); FieldSpans::INLINE];
        for (span, field) in inline.iter_mut().zip(fields) {
            *span = FieldSpan::of(buf, field);
        }
        FieldSpans::Inline(inline, fields.len())
    }

    pub fn as_slice(&self) -> &[FieldSpan] {
        match self {
            FieldSpans::Inline(spans, len) => &spans[..*len],
            FieldSpans::Spilled(spans) => spans,
        }
    }
}

/// `(offset, length)` of `part`, a slice of `buf`. Heads are bounded far
/// below 4 GiB by both sides, so the offsets fit `u32`.
pub fn span_of(buf: &[u8], part: &[u8]) -> (u32, u32) {
    let offset = part.as_ptr() as usize - buf.as_ptr() as usize;
    (offset as u32, part.len() as u32)
}

/// The bytes of `head` at `(offset, length)`.
pub fn cut(head: &Bytes, (offset, length): (u32, u32)) -> Bytes {
    head.slice(offset as usize..offset as usize + length as usize)
}

/// Room left in a parsed head's map for the fields the gateway adds to it
/// (to a request: request id, upstream key, `X-Forwarded-*`; to an upstream
/// answer: request id, `Cache-Status`), so adding them does not regrow it: a
/// map built exactly full reallocates both its tables on the next insert.
const ADDED_FIELDS: usize = 4;

/// Builds the header map from the spans of a head that has been frozen;
/// the values share the head's bytes, and each name is taken from `recent`
/// when the connection's last head spelled the same name at the same
/// place. Errs with what `http` refused.
pub fn header_map(
    head: &Bytes,
    spans: &[FieldSpan],
    recent: &mut RecentNames,
) -> Result<HeaderMap, &'static str> {
    let mut headers = HeaderMap::with_capacity(spans.len() + ADDED_FIELDS);
    for (place, span) in spans.iter().enumerate() {
        let (at, len) = (span.name.0 as usize, span.name.1 as usize);
        let name = recent.name(place, &head[at..at + len])?;
        let value = HeaderValue::from_maybe_shared(cut(head, span.value))
            .map_err(|_| "invalid header value")?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// The field names of the last head read on one connection, by place.
/// The heads on a connection — a client's requests, an upstream's
/// answers — name the same fields in the same order, spelled the same way,
/// nearly every time, so a name spelled byte for byte as it was at its
/// place last time is a clone of the name parsed then (a copy for a name
/// `http` knows, a reference count for any other) instead of a parse: the
/// parse lowercases and checks each byte, looks the result up among the
/// standard names, and allocates a name it does not know (~120
/// instructions a field; ~800 an upstream answer of eight fields). Names
/// longer than [`RecentNames::SPELLING`] bytes, and fields past the first
/// [`RecentNames::PLACES`], are parsed every time. A place costs ~70 bytes
/// of the connection's memory, for as long as the connection lives.
#[derive(Debug, Default)]
pub struct RecentNames {
    by_place: Vec<RecentName>,
}

#[derive(Debug)]
struct RecentName {
    /// The raw spelling, `length` bytes of it.
    spelling: [u8; RecentNames::SPELLING],
    length: u8,
    name: HeaderName,
}

impl RecentNames {
    /// The longest spelling remembered: longer than nearly every field name
    /// on the wire (`access-control-allow-credentials` is 32), short enough
    /// to compare in a few words.
    pub const SPELLING: usize = 32;

    /// Places remembered: more than most heads carry; a head with more
    /// fields parses the rest every time.
    pub const PLACES: usize = 32;

    /// The name spelled `raw`, the field at `place` of the head being read.
    fn name(&mut self, place: usize, raw: &[u8]) -> Result<HeaderName, &'static str> {
        if let Some(recent) = self.by_place.get(place)
            && recent.spelling.get(..usize::from(recent.length)) == Some(raw)
        {
            return Ok(recent.name.clone());
        }
        let name = HeaderName::from_bytes(raw).map_err(|_| "invalid header name")?;
        if place < Self::PLACES {
            // A spelling too long to keep is kept as none at all, which no
            // name matches (httparse reads no empty names): the places after
            // it stay in step.
            let mut spelling = [0; Self::SPELLING];
            let length = match spelling.get_mut(..raw.len()) {
                Some(kept) => {
                    kept.copy_from_slice(raw);
                    raw.len() as u8
                }
                None => 0,
            };
            let recent = RecentName {
                spelling,
                length,
                name: name.clone(),
            };
            let filled = self.by_place.len();
            match self.by_place.get_mut(place) {
                Some(slot) => *slot = recent,
                // Places fill in order: `place` is the next one.
                None if place == filled => self.by_place.push(recent),
                None => {}
            }
        }
        Ok(name)
    }
}

/// Writes every field as `name: value\r\n`; with `skip_framing`, not
/// `Content-Length` or `Transfer-Encoding`, because the writer decides the
/// body's framing itself and writes that header on its own.
pub fn write_fields(headers: &HeaderMap, skip_framing: bool, out: &mut impl BufMut) {
    for (name, value) in headers {
        if !(skip_framing && is_framing(name)) {
            write_field(name, value, out);
        }
    }
}

/// `Content-Length` and `Transfer-Encoding`: the fields that frame a body.
pub fn is_framing(name: &HeaderName) -> bool {
    name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING
}

/// Writes one field as `name: value\r\n`.
pub fn write_field(name: &HeaderName, value: &HeaderValue, out: &mut impl BufMut) {
    out.put_slice(name.as_str().as_bytes());
    out.put_slice(b": ");
    out.put_slice(value.as_bytes());
    out.put_slice(b"\r\n");
}

/// The options in one `Connection` field value (`keep-alive, Upgrade`).
pub fn connection_options(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&byte| byte == b',').map(<[u8]>::trim_ascii)
}

/// Maps with at most this many names are searched by a pass over them
/// ([`names`]).
const SCAN_LIMIT: usize = 8;

/// Whether `headers` names `name`, as `HeaderMap::contains_key`. A request or
/// answer head names a handful of fields, and the hot path asks a dozen
/// times for fields most heads lack (`Range`, `Cache-Control`,
/// `If-None-Match`, `X-Request-Id` …): a `HeaderMap` look-up hashes the name
/// and probes its table, while a pass over a few names (standard ones
/// compared by their one-byte tag) costs a fraction of that. Larger maps
/// are looked up as usual.
pub fn names(headers: &HeaderMap, name: &HeaderName) -> bool {
    if headers.keys_len() > SCAN_LIMIT {
        return headers.contains_key(name);
    }
    headers.keys().any(|own| own == name)
}

/// The first value of `name`, as `HeaderMap::get`, for fields most heads
/// lack: absent, it costs a [`names`] pass; present, that pass and the
/// look-up. Fields most heads have are cheaper looked up directly.
pub fn rare_field<'h>(headers: &'h HeaderMap, name: &HeaderName) -> Option<&'h HeaderValue> {
    if names(headers, name) {
        headers.get(name)
    } else {
        None
    }
}

/// Every value of `name`, in order, as `HeaderMap::get_all`, for fields
/// most heads lack (see [`rare_field`]).
pub fn rare_field_values<'h>(
    headers: &'h HeaderMap,
    name: &HeaderName,
) -> impl Iterator<Item = &'h HeaderValue> + 'h {
    names(headers, name)
        .then(|| headers.get_all(name).iter())
        .into_iter()
        .flatten()
}

/// Whether any `Connection` field says `close`.
pub fn says_close(headers: &HeaderMap) -> bool {
    rare_field_values(headers, &header::CONNECTION)
        .flat_map(|value| connection_options(value.as_bytes()))
        .any(|option| option.eq_ignore_ascii_case(b"close"))
}

/// The size line in front of a chunk: `{length:x}\r\n`, written into
/// `scratch` without allocating.
pub fn chunk_size_line(length: usize, scratch: &mut [u8; 18]) -> &[u8] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut at = scratch.len() - 2;
    scratch[at..].copy_from_slice(b"\r\n");
    let mut rest = length;
    loop {
        at -= 1;
        scratch[at] = HEX[rest & 0xf];
        rest >>= 4;
        if rest == 0 {
            break;
        }
    }
    &scratch[at..]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The map of `text`'s head (a response head, fields only), its names
    /// taken from `recent` where they can be.
    fn map_of(text: &str, recent: &mut RecentNames) -> Result<HeaderMap, &'static str> {
        let bytes = Bytes::from(format!("HTTP/1.1 200 OK\r\n{text}\r\n"));
        let mut slots = vec![httparse::EMPTY_HEADER; 128];
        let mut response = httparse::Response::new(&mut slots);
        assert!(response.parse(&bytes).unwrap().is_complete(), "{text}");
        let spans = FieldSpans::of(&bytes, response.headers);
        header_map(&bytes, spans.as_slice(), recent)
    }

    /// Heads read one after another on a connection give the maps they give
    /// read alone: a name is reused only when spelled byte for byte as it
    /// was at its place in the last head; any other is parsed (and refused
    /// if it is no name), however the heads change.
    #[test]
    fn recent_names_give_the_maps_a_fresh_parse_gives() {
        let long = "x-a-field-name-longer-than-thirty-two-bytes";
        let many: String = (0..40).map(|at| format!("x-many-{at}: {at}\r\n")).collect();
        let heads = [
            "Content-Type: a\r\nX-Custom: b\r\nDate: c\r\n".to_owned(),
            "Content-Type: a\r\nX-Custom: b\r\nDate: c\r\n".to_owned(),
            // Other case, same names; then other names of the same lengths.
            "content-type: a\r\nx-custom: b\r\nDATE: c\r\n".to_owned(),
            "content-tipe: a\r\nx-kustom: b\r\ndata: c\r\n".to_owned(),
            // Another order, a duplicate, fewer fields.
            "Date: c\r\nDate: d\r\n".to_owned(),
            // A name too long to keep, and the places after it.
            format!("{long}: 1\r\nX-After: 2\r\n"),
            format!("{long}: 1\r\nX-After: 2\r\n"),
            format!("{long}X: 1\r\nX-After: 2\r\n"),
            // More fields than places kept.
            many.clone(),
            many,
            "Server: x\r\n".to_owned(),
        ];
        let mut recent = RecentNames::default();
        for text in &heads {
            let fresh = map_of(text, &mut RecentNames::default()).unwrap();
            let reused = map_of(text, &mut recent).unwrap();
            assert_eq!(
                reused.iter().collect::<Vec<_>>(),
                fresh.iter().collect::<Vec<_>>(),
                "{text}"
            );
        }
        // The forty-field heads kept their first places, and no more.
        assert_eq!(recent.by_place.len(), RecentNames::PLACES);
        // A name that is no name, where the last head had a good one.
        map_of("X-Good: 1\r\n", &mut recent).unwrap();
        let bytes = Bytes::from_static(b"X-G\x7fod: 1");
        let spans = [FieldSpan {
            name: (0, 6),
            value: (8, 1),
        }];
        assert_eq!(
            header_map(&bytes, &spans, &mut recent).unwrap_err(),
            "invalid header name"
        );
        // The long name kept its place as none: the field after it is kept.
        let mut recent = RecentNames::default();
        map_of(&format!("{long}: 1\r\nX-After: 2\r\n"), &mut recent).unwrap();
        assert_eq!(recent.by_place.len(), 2);
        assert_eq!(recent.by_place[0].length, 0);
        assert_eq!(recent.by_place[1].name, "x-after");
    }

    /// Heads with few fields (spans inline) and with more than the inline
    /// room (spans on the heap) give the same map: every field, in order,
    /// duplicates kept.
    #[test]
    fn field_spans_cover_every_field_inline_or_spilled() {
        for count in [0, 3, FieldSpans::INLINE, FieldSpans::INLINE + 1, 90] {
            let mut text = String::from("HTTP/1.1 200 OK\r\n");
            for at in 0..count {
                text.push_str(&format!("x-field-{}: value {at}\r\n", at % 7));
            }
            text.push_str("\r\n");
            let bytes = Bytes::from(text);
            let mut slots = vec![httparse::EMPTY_HEADER; 128];
            let mut response = httparse::Response::new(&mut slots);
            assert!(response.parse(&bytes).unwrap().is_complete());
            let spans = FieldSpans::of(&bytes, response.headers);
            assert_eq!(spans.as_slice().len(), count);
            let map = header_map(&bytes, spans.as_slice(), &mut RecentNames::default()).unwrap();
            assert_eq!(map.len(), count);
            for at in 0..count {
                let name = format!("x-field-{}", at % 7);
                let nth = map.get_all(&name).iter().nth(at / 7).unwrap();
                assert_eq!(nth, format!("value {at}").as_str(), "{count} fields");
            }
        }
    }

    #[test]
    fn chunk_size_lines_are_lowercase_hex() {
        let mut scratch = [0; 18];
        assert_eq!(chunk_size_line(0, &mut scratch), b"0\r\n");
        assert_eq!(chunk_size_line(255, &mut scratch), b"ff\r\n");
        assert_eq!(chunk_size_line(12_288, &mut scratch), b"3000\r\n");
        assert_eq!(
            chunk_size_line(usize::MAX, &mut scratch),
            b"ffffffffffffffff\r\n"
        );
    }

    /// The scanned look-ups answer as `HeaderMap`'s own, on maps small
    /// enough to be scanned and on larger ones, standard and custom names,
    /// one value and several.
    #[test]
    fn scanned_lookups_answer_as_the_map_does() {
        let custom = HeaderName::from_static("x-request-id");
        let absent = [header::RANGE, HeaderName::from_static("x-absent")];
        for extra in [0, SCAN_LIMIT] {
            let mut headers = HeaderMap::new();
            headers.append(header::HOST, HeaderValue::from_static("gateway"));
            headers.append(header::ACCEPT, HeaderValue::from_static("a/1"));
            headers.append(&custom, HeaderValue::from_static("id-1"));
            headers.append(header::ACCEPT, HeaderValue::from_static("a/2"));
            for index in 0..extra {
                headers.append(
                    HeaderName::from_bytes(format!("x-filler-{index}").as_bytes()).unwrap(),
                    HeaderValue::from_static("x"),
                );
            }
            assert_eq!(headers.keys_len() > SCAN_LIMIT, extra > 0);
            for name in [header::HOST, header::ACCEPT, custom.clone()] {
                assert!(names(&headers, &name), "{name}");
                assert_eq!(rare_field(&headers, &name), headers.get(&name), "{name}");
                assert!(
                    rare_field_values(&headers, &name).eq(headers.get_all(&name)),
                    "{name}"
                );
            }
            for name in &absent {
                assert!(!names(&headers, name), "{name}");
                assert_eq!(rare_field(&headers, name), None);
                assert_eq!(rare_field_values(&headers, name).count(), 0);
            }
            let accepts: Vec<_> = rare_field_values(&headers, &header::ACCEPT).collect();
            assert_eq!(accepts, ["a/1", "a/2"]);
        }
    }

    #[test]
    fn close_is_found_among_connection_options() {
        let mut headers = HeaderMap::new();
        assert!(!says_close(&headers));
        headers.append(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        assert!(!says_close(&headers));
        headers.append(
            header::CONNECTION,
            HeaderValue::from_static("Upgrade , Close"),
        );
        assert!(says_close(&headers));
        assert_eq!(
            connection_options(b" a,b ,, c").collect::<Vec<_>>(),
            [&b"a"[..], b"b", b"", b"c"]
        );
    }

    #[test]
    fn fields_are_written_with_or_without_their_framing() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("3"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        let mut all = Vec::new();
        write_fields(&headers, false, &mut all);
        assert_eq!(
            all,
            b"content-type: text/plain\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n"
        );
        let mut without = Vec::new();
        write_fields(&headers, true, &mut without);
        assert_eq!(without, b"content-type: text/plain\r\n");
    }

    #[test]
    fn header_maps_share_the_head_and_refuse_what_http_refuses() {
        let head = Bytes::from_static(b"X-One: 1\r\nx-two: two\r\n");
        let spans = [
            FieldSpan {
                name: (0, 5),
                value: (7, 1),
            },
            FieldSpan {
                name: (10, 5),
                value: (17, 3),
            },
        ];
        let headers = header_map(&head, &spans, &mut RecentNames::default()).unwrap();
        assert_eq!(headers["x-one"], "1");
        assert_eq!(headers["x-two"], "two");
        let bad_name = [FieldSpan {
            name: (5, 2),
            value: (7, 1),
        }];
        assert_eq!(
            header_map(&head, &bad_name, &mut RecentNames::default()).unwrap_err(),
            "invalid header name"
        );
    }
}
