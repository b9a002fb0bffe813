//! Keeps a team credential that travels in the upstream URL out of the
//! answer the member gets.
//!
//! On a route whose rule puts the team's upstream key in a query parameter
//! (Comfy's `GET /ws?clientId=…&token=<key>`), the key is part of the URL the
//! upstream was sent. An answer that echoes that URL — a redirect's
//! `Location` (a framework's trailing-slash redirect keeps the query), a
//! "no route for …" message, an upgrade refused with the request line in its
//! body — would show the member the team's key, which the gateway exists to
//! keep from them. So on those routes every answer's header values and body
//! are searched for the key, as it is and percent-encoded as it was sent,
//! and each occurrence is replaced by [`REDACTED`].
//!
//! Bodies are read whole for this, up to [`MAX_CHECKED_BODY`] and within the
//! upstream's response timeout: besides the 101 these routes answer with
//! short errors; a longer body is refused with a 502, and one still coming
//! when the timeout ends with a 504, rather than passed on unchecked. A 101's tunnel is not searched:
//! its frames are the application's own.

use std::time::Duration;

use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use percent_encoding::utf8_percent_encode;

use crate::auth::inject::QUERY_VALUE;
use crate::body::Body;
use crate::config::secret::Secret;
use crate::error::GatewayError;

/// The largest answer body searched; a longer one is refused (502).
pub const MAX_CHECKED_BODY: usize = 64 * 1024;

/// What each occurrence of the credential becomes.
pub const REDACTED: &str = "[redacted]";

/// Takes every form of `secret` out of `response`'s header values and body.
/// A body past [`MAX_CHECKED_BODY`] is refused, one that fails while being
/// read is the upstream's reset, and one not read whole `within` (a stream
/// that never ends) is its timeout.
pub async fn answer(
    response: Response<Body>,
    secret: &Secret,
    within: Duration,
) -> Result<Response<Body>, GatewayError> {
    let forms = forms_of(secret.expose());
    let (mut parts, body) = response.into_parts();
    for value in parts.headers.values_mut() {
        if let Some(clean) = replaced(value.as_bytes(), &forms) {
            *value = HeaderValue::from_bytes(&clean)
                .unwrap_or_else(|_| HeaderValue::from_static(REDACTED));
        }
    }
    if parts.status == StatusCode::SWITCHING_PROTOCOLS {
        return Ok(Response::from_parts(parts, body));
    }
    let bytes = tokio::time::timeout(within, Limited::new(body, MAX_CHECKED_BODY).collect())
        .await
        .map_err(|_| GatewayError::UpstreamTimeout)?
        .map_err(|error| {
            if error.is::<http_body_util::LengthLimitError>() {
                GatewayError::AnswerTooLargeToCheck
            } else {
                GatewayError::UpstreamReset
            }
        })?
        .to_bytes();
    let body = match replaced(&bytes, &forms) {
        Some(clean) => {
            // The length changed; a `HEAD` or 304 answer has no body to change.
            parts
                .headers
                .insert(header::CONTENT_LENGTH, clean.len().into());
            Body::full(clean)
        }
        None => Body::full(bytes),
    };
    Ok(Response::from_parts(parts, body))
}

/// The credential as it is, and percent-encoded as the gateway put it in
/// the query (with upper- and lower-case hex, as an echo may re-encode it).
fn forms_of(secret: &str) -> Vec<String> {
    if secret.is_empty() {
        return Vec::new();
    }
    let encoded = utf8_percent_encode(secret, QUERY_VALUE).to_string();
    let lower_hex = lower_percent_hex(&encoded);
    let mut forms = vec![encoded, lower_hex, secret.to_owned()];
    // Longest first, so no form is replaced inside a longer one's
    // occurrence; equal forms end up side by side for `dedup`.
    forms.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
    forms.dedup();
    forms
}

/// `%2F` → `%2f`, leaving everything else as it is.
fn lower_percent_hex(encoded: &str) -> String {
    let mut out = String::with_capacity(encoded.len());
    let mut hex_left = 0;
    for character in encoded.chars() {
        if character == '%' {
            hex_left = 2;
            out.push(character);
        } else if hex_left > 0 {
            hex_left -= 1;
            out.push(character.to_ascii_lowercase());
        } else {
            out.push(character);
        }
    }
    out
}

/// `bytes` with every occurrence of each form replaced, or `None` if none occurs.
fn replaced(bytes: &[u8], forms: &[String]) -> Option<Vec<u8>> {
    let mut current: Option<Vec<u8>> = None;
    for form in forms {
        let haystack = current.as_deref().unwrap_or(bytes);
        let mut found = memchr::memmem::find_iter(haystack, form.as_bytes()).peekable();
        if found.peek().is_none() {
            continue;
        }
        let mut out = Vec::with_capacity(haystack.len());
        let mut from = 0;
        // `find_iter` yields non-overlapping occurrences, in order.
        for start in found {
            out.extend_from_slice(&haystack[from..start]);
            out.extend_from_slice(REDACTED.as_bytes());
            from = start + form.len();
        }
        out.extend_from_slice(&haystack[from..]);
        current = Some(out);
    }
    current
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redacted(text: &str, secret: &str) -> Option<String> {
        replaced(text.as_bytes(), &forms_of(secret)).map(|out| String::from_utf8(out).unwrap())
    }

    #[test]
    fn every_form_of_the_credential_is_replaced_and_nothing_else() {
        assert_eq!(
            redacted("/ws?clientId=c&token=k3y&x=k3y", "k3y").as_deref(),
            Some("/ws?clientId=c&token=[redacted]&x=[redacted]")
        );
        assert_eq!(
            redacted("sent a/b+c, a%2Fb%2Bc and a%2fb%2bc", "a/b+c").as_deref(),
            Some("sent [redacted], [redacted] and [redacted]")
        );
        assert_eq!(redacted("nothing to see", "k3y"), None);
        assert_eq!(redacted("kk3y3y", "k3y").as_deref(), Some("k[redacted]3y"));
        assert_eq!(
            redacted("anything", ""),
            None,
            "an empty key matches nothing"
        );
    }

    #[test]
    fn forms_are_deduplicated_and_longest_first() {
        assert_eq!(forms_of("plain-key_1.~"), ["plain-key_1.~"]);
        let forms = forms_of("a/b");
        assert_eq!(forms, ["a%2Fb", "a%2fb", "a/b"]);
    }
}
