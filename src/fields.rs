//! Header fields an answer shares with a cache entry instead of carrying a
//! copy of them.
//!
//! A cache hit used to clone the entry's `HeaderMap` into its answer (a
//! vector, an index table and a reference count per value); the HTTP/1.1
//! writer then encoded the copy field by field and dropped it. That was
//! about 4% of a core on cache hits. Now an entry keeps its fields encoded
//! once, as `name: value\r\n` lines ([`EncodedFields`]), and a hit's answer
//! carries a reference to them ([`SharedFields`], a response extension). Its
//! own header map holds only what was made for this answer: `Cache-Status`,
//! `Age`, the request id, rate-limit state.
//!
//! The rule every writer follows: an answer's fields are the shared ones,
//! minus any name its own map also has, followed by its own. The gateway's
//! HTTP/1.1 loop ([`crate::server`]) writes the encoded lines as they are.
//! Every other writer (hyper, after a hand-off or over h2) gets one ordinary
//! map from [`merge`] first. A layer that asks whether an answer has a field
//! uses [`has_field`], which looks in both.

use std::sync::Arc;

use bytes::Bytes;
use http::Response;
use http::header::{self, HeaderMap, HeaderName};

use crate::wire;

/// A header map together with its HTTP/1.1 encoding, made once.
#[derive(Debug)]
pub struct EncodedFields {
    map: HeaderMap,
    /// Every field but `Content-Length` and `Transfer-Encoding`: a writer
    /// decides the body's framing itself.
    lines: Bytes,
    /// The framing fields, for an answer whose framing is passed on as it
    /// is (`HEAD`, `304`).
    framing_lines: Bytes,
    /// Looked up once here rather than for every answer written.
    has_date: bool,
    has_connection: bool,
}

impl EncodedFields {
    pub fn new(map: HeaderMap) -> Self {
        let mut lines = Vec::with_capacity(map.len() * 40);
        let mut framing_lines = Vec::new();
        for (name, value) in &map {
            let out = if wire::is_framing(name) {
                &mut framing_lines
            } else {
                &mut lines
            };
            wire::write_field(name, value, out);
        }
        EncodedFields {
            has_date: map.contains_key(header::DATE),
            has_connection: map.contains_key(header::CONNECTION),
            map,
            lines: Bytes::from(lines),
            framing_lines: Bytes::from(framing_lines),
        }
    }

    pub fn map(&self) -> &HeaderMap {
        &self.map
    }

    /// The fields as `name: value\r\n` lines, framing fields left out.
    pub fn lines(&self) -> &[u8] {
        &self.lines
    }

    /// The `Content-Length` and `Transfer-Encoding` lines alone.
    pub fn framing_lines(&self) -> &[u8] {
        &self.framing_lines
    }

    pub fn has_date(&self) -> bool {
        self.has_date
    }

    pub fn has_connection(&self) -> bool {
        self.has_connection
    }

    /// Bytes held beyond the struct: the encoded lines (the map is counted
    /// by whoever built it).
    pub fn encoded_len(&self) -> usize {
        self.lines.len() + self.framing_lines.len()
    }

    /// Whether `own` names any field these also have, so that writing both
    /// as they are would repeat it.
    pub fn overlaps(&self, own: &HeaderMap) -> bool {
        own.keys().any(|name| crate::wire::names(&self.map, name))
    }
}

/// Response extension: fields the answer shares with a cache entry, not yet
/// in its own header map (see the module docs).
#[derive(Debug, Clone)]
pub struct SharedFields(pub Arc<EncodedFields>);

/// Folds an answer's shared fields into its own header map, which wins by
/// name, and drops the extension. Answers without shared fields are left as
/// they are.
pub fn merge<B>(response: &mut Response<B>) {
    if let Some(SharedFields(shared)) = response.extensions_mut().remove::<SharedFields>() {
        merge_into(response.headers_mut(), &shared);
    }
}

/// `own` becomes `shared`'s fields, except the names `own` has, followed by
/// `own`'s (all values of a name `own` has replace all of `shared`'s).
pub fn merge_into(own: &mut HeaderMap, shared: &EncodedFields) {
    let own_fields = std::mem::replace(own, shared.map.clone());
    let mut current: Option<HeaderName> = None;
    for (name, value) in own_fields {
        // `into_iter` names a field once, then yields its further values unnamed.
        match name {
            Some(name) => {
                own.insert(&name, value);
                current = Some(name);
            }
            None => {
                let name = current
                    .clone()
                    .expect("the first field comes with its name");
                own.append(name, value);
            }
        }
    }
}

/// Whether the answer has a field `name`, in its own map or shared.
pub fn has_field<B>(response: &Response<B>, name: &HeaderName) -> bool {
    response.headers().contains_key(name)
        || response
            .extensions()
            .get::<SharedFields>()
            .is_some_and(|SharedFields(shared)| shared.map.contains_key(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn stored() -> EncodedFields {
        let mut map = HeaderMap::new();
        map.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        map.insert(header::CONTENT_LENGTH, HeaderValue::from_static("12"));
        map.append(header::VARY, HeaderValue::from_static("accept"));
        map.append(header::VARY, HeaderValue::from_static("origin"));
        map.insert(header::AGE, HeaderValue::from_static("500"));
        EncodedFields::new(map)
    }

    #[test]
    fn fields_are_encoded_once_with_framing_apart() {
        let fields = stored();
        assert_eq!(
            fields.lines(),
            b"content-type: application/json\r\nvary: accept\r\nvary: origin\r\nage: 500\r\n"
        );
        assert_eq!(fields.framing_lines(), b"content-length: 12\r\n");
        assert!(!fields.has_date());
        assert!(!fields.has_connection());
        assert_eq!(
            fields.encoded_len(),
            fields.lines().len() + fields.framing_lines().len()
        );
    }

    #[test]
    fn own_fields_win_by_name_and_keep_all_their_values() {
        let shared = Arc::new(stored());
        let mut response = Response::new(());
        response.extensions_mut().insert(SharedFields(shared));
        let own = response.headers_mut();
        own.insert(header::AGE, HeaderValue::from_static("3"));
        own.append("cache-status", HeaderValue::from_static("one"));
        own.append("cache-status", HeaderValue::from_static("two"));

        assert!(has_field(&response, &header::VARY), "shared");
        assert!(has_field(&response, &header::AGE), "own");
        assert!(!has_field(&response, &header::ETAG));

        merge(&mut response);
        assert!(response.extensions().get::<SharedFields>().is_none());
        let headers = response.headers();
        let all = |name: &str| {
            headers
                .get_all(name)
                .iter()
                .map(|value| value.to_str().unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            all("age"),
            ["3"],
            "the answer's own age replaces the stored one"
        );
        assert_eq!(all("vary"), ["accept", "origin"]);
        assert_eq!(all("cache-status"), ["one", "two"]);
        assert_eq!(all("content-length"), ["12"]);
        assert_eq!(
            (headers.keys_len(), headers.len()),
            (5, 7),
            "nothing else, nothing twice"
        );
    }

    #[test]
    fn overlap_is_by_name() {
        let fields = stored();
        let mut own = HeaderMap::new();
        own.insert("cache-status", HeaderValue::from_static("hit"));
        assert!(!fields.overlaps(&own));
        own.insert(header::AGE, HeaderValue::from_static("1"));
        assert!(fields.overlaps(&own));
    }

    #[test]
    fn answers_without_shared_fields_are_left_alone() {
        let mut response = Response::new(());
        response
            .headers_mut()
            .insert(header::ETAG, HeaderValue::from_static("\"x\""));
        merge(&mut response);
        assert_eq!(response.headers().len(), 1);
        assert!(has_field(&response, &header::ETAG));
    }
}
