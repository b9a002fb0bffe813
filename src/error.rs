//! The one place where a gateway failure becomes an answer to the client.
//!
//! Every rejection and failure the gateway produces itself is a [`GatewayError`].
//! [`GatewayError::into_response`] picks the status and renders the JSON body
//! in the error shape of the upstream the client was talking to, so an existing
//! Comfy client sees the same `{"code","message"}` it would get from Comfy Cloud.
//!
//! Client-facing messages are fixed strings: they never include a key, a header
//! value or an upstream's error text. Detail goes to the log (see `telemetry`),
//! keyed by the request id that the body also carries.

use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Response, StatusCode};
use serde_json::json;

use crate::body::Body;

/// The JSON error envelope an upstream uses; the gateway answers in the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorShape {
    /// Comfy Cloud v1 (`ErrorResponse` in comfy-cloud-openapi.yaml): `{"code","message"}`.
    ComfyFlat,
    /// Comfy API v2 (`ErrorEnvelope` in comfy-api-v2-openapi.yaml):
    /// `{"error":{"code","message","details"}}`.
    ComfyEnvelope,
    /// Scenario: `{"error": …, "message": …}` (the SDK reads either field).
    Scenario,
}

/// Everything the gateway itself can answer instead of the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GatewayError {
    #[error("no upstream is mounted at this path")]
    NoRoute,
    #[error("absolute-form request targets are not accepted; send the path only")]
    AbsoluteFormTarget,
    #[error("CONNECT is not supported: teamgate is not a forward proxy")]
    ConnectNotAllowed,
    #[error("a gateway key is required (X-API-Key or Authorization: Bearer)")]
    MissingKey,
    #[error("the gateway key is not valid")]
    UnknownKey,
    #[error("this team has no credential for this upstream")]
    NoUpstreamCredential,
    #[error("the upstream could not be reached")]
    UpstreamUnreachable,
    #[error("the upstream closed the connection before answering")]
    UpstreamReset,
    #[error("the upstream did not answer in time")]
    UpstreamTimeout,
    #[error("the upstream's answer was too large to check for the team credential its URL carried")]
    AnswerTooLargeToCheck,
    #[error("the gateway failed to handle the request")]
    Internal,
    #[error("rate limit exceeded; retry after the time in Retry-After")]
    RateLimited,
    #[error(
        "the request path is not normalised (`.`/`..` or empty segments, backslashes, encoded slashes or unreserved characters); send it normalised"
    )]
    UnsafePath,
    #[error("a header value has control characters or non-ASCII bytes")]
    InvalidHeader,
    #[error("an HTTP/1.1 request needs exactly one Host header (RFC 9112 §3.2)")]
    InvalidHost,
    #[error(
        "method-override headers are not accepted; send the method itself (the cache and quotas go by it)"
    )]
    MethodOverride,
    #[error("the query has control characters or is not UTF-8 once decoded")]
    InvalidQuery,
    #[error("the request headers are too large")]
    HeadersTooLarge,
    #[error("the request body is too large")]
    PayloadTooLarge,
    #[error("the request body is malformed")]
    MalformedBody,
    #[error("the gateway is at its connection limit; retry shortly")]
    TooManyConnections,
}

impl GatewayError {
    pub fn status(self) -> StatusCode {
        match self {
            GatewayError::NoRoute => StatusCode::NOT_FOUND,
            GatewayError::AbsoluteFormTarget => StatusCode::BAD_REQUEST,
            GatewayError::ConnectNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::MissingKey | GatewayError::UnknownKey => StatusCode::UNAUTHORIZED,
            GatewayError::NoUpstreamCredential => StatusCode::FORBIDDEN,
            GatewayError::UpstreamUnreachable
            | GatewayError::UpstreamReset
            | GatewayError::AnswerTooLargeToCheck => StatusCode::BAD_GATEWAY,
            GatewayError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            GatewayError::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::UnsafePath
            | GatewayError::InvalidHeader
            | GatewayError::InvalidHost
            | GatewayError::MethodOverride
            | GatewayError::InvalidQuery
            | GatewayError::MalformedBody => StatusCode::BAD_REQUEST,
            GatewayError::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            GatewayError::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::TooManyConnections => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The machine-readable code, in the vocabulary the v2 spec's `ErrorEnvelope` uses.
    pub fn code(self) -> &'static str {
        match self {
            GatewayError::NoRoute => "not_found",
            GatewayError::AbsoluteFormTarget => "bad_request",
            GatewayError::ConnectNotAllowed => "method_not_allowed",
            GatewayError::MissingKey | GatewayError::UnknownKey => "unauthorized",
            GatewayError::NoUpstreamCredential => "forbidden",
            GatewayError::UpstreamUnreachable
            | GatewayError::UpstreamReset
            | GatewayError::AnswerTooLargeToCheck => "bad_gateway",
            GatewayError::UpstreamTimeout => "gateway_timeout",
            GatewayError::Internal => "internal_error",
            GatewayError::RateLimited => "rate_limited",
            GatewayError::UnsafePath
            | GatewayError::InvalidHeader
            | GatewayError::InvalidHost
            | GatewayError::MethodOverride
            | GatewayError::InvalidQuery
            | GatewayError::MalformedBody => "bad_request",
            GatewayError::HeadersTooLarge => "request_header_fields_too_large",
            GatewayError::PayloadTooLarge => "payload_too_large",
            GatewayError::TooManyConnections => "service_unavailable",
        }
    }

    /// Renders the answer. `request_id` is echoed so a user can quote it to an operator.
    pub fn into_response(self, shape: ErrorShape, request_id: Option<&str>) -> Response<Body> {
        let mut response = Response::new(Body::full(self.json_body(shape, request_id)));
        *response.status_mut() = self.status();
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if self == GatewayError::ConnectNotAllowed {
            response.headers_mut().insert(
                http::header::ALLOW,
                HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
            );
        }
        response
    }

    /// The JSON body alone, in `shape`.
    pub fn json_body(self, shape: ErrorShape, request_id: Option<&str>) -> bytes::Bytes {
        let message = self.to_string();
        let mut body = match shape {
            ErrorShape::ComfyFlat => json!({
                "code": self.code(),
                "message": message,
                "request_id": request_id,
            }),
            ErrorShape::ComfyEnvelope => json!({
                "error": {
                    "code": self.code(),
                    "message": message,
                    "details": { "request_id": request_id },
                }
            }),
            ErrorShape::Scenario => json!({
                "error": message,
                "message": message,
                "code": self.code(),
                "requestId": request_id,
            }),
        };
        // comfy-cli tells throttling from billing refusals by `error.type`.
        if self == GatewayError::RateLimited {
            match shape {
                ErrorShape::ComfyFlat => {
                    body["error"] = json!({ "type": "RATE_LIMITED", "message": message });
                }
                ErrorShape::ComfyEnvelope => body["error"]["type"] = json!("RATE_LIMITED"),
                ErrorShape::Scenario => {}
            }
        }
        bytes::Bytes::from(body.to_string())
    }
}

/// The shape a request's errors are answered in: its upstream route's, or
/// the primary upstream's (Comfy v1) before routing.
pub fn shape_of<B>(request: &http::Request<B>) -> ErrorShape {
    crate::telemetry::RequestRecord::of(request)
        .and_then(crate::telemetry::RequestRecord::route)
        .map_or(ErrorShape::ComfyFlat, crate::route::RouteMatch::error_shape)
}

/// `error` as the answer to `request`: the route's error shape and the request id.
pub fn reject<B>(request: &http::Request<B>, error: GatewayError) -> Response<Body> {
    error.into_response(shape_of(request), crate::telemetry::RequestId::of(request))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn json_of(response: Response<Body>) -> serde_json::Value {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn flat_shape_matches_comfy_error_response() {
        let response =
            GatewayError::UpstreamTimeout.into_response(ErrorShape::ComfyFlat, Some("r-1"));
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
        let body = json_of(response).await;
        assert_eq!(body["code"], "gateway_timeout");
        assert_eq!(body["request_id"], "r-1");
        assert!(body["message"].is_string());
    }

    #[tokio::test]
    async fn envelope_shape_matches_comfy_v2_error_envelope() {
        let response =
            GatewayError::UnknownKey.into_response(ErrorShape::ComfyEnvelope, Some("r-2"));
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let body = json_of(response).await;
        assert_eq!(body["error"]["code"], "unauthorized");
        assert_eq!(body["error"]["details"]["request_id"], "r-2");
    }

    #[tokio::test]
    async fn rate_limited_bodies_carry_the_type_comfy_cli_checks() {
        let flat =
            json_of(GatewayError::RateLimited.into_response(ErrorShape::ComfyFlat, None)).await;
        assert_eq!(flat["code"], "rate_limited");
        assert_eq!(flat["error"]["type"], "RATE_LIMITED");
        let envelope =
            json_of(GatewayError::RateLimited.into_response(ErrorShape::ComfyEnvelope, None)).await;
        assert_eq!(envelope["error"]["code"], "rate_limited");
        assert_eq!(envelope["error"]["type"], "RATE_LIMITED");
    }

    #[test]
    fn every_error_has_a_distinct_meaningful_status() {
        use GatewayError::*;
        for (error, status) in [
            (NoRoute, 404),
            (AbsoluteFormTarget, 400),
            (ConnectNotAllowed, 405),
            (MissingKey, 401),
            (UnknownKey, 401),
            (NoUpstreamCredential, 403),
            (UpstreamUnreachable, 502),
            (UpstreamReset, 502),
            (AnswerTooLargeToCheck, 502),
            (UpstreamTimeout, 504),
            (Internal, 500),
            (RateLimited, 429),
            (UnsafePath, 400),
            (InvalidHeader, 400),
            (InvalidHost, 400),
            (MethodOverride, 400),
            (InvalidQuery, 400),
            (MalformedBody, 400),
            (HeadersTooLarge, 431),
            (PayloadTooLarge, 413),
            (TooManyConnections, 503),
        ] {
            assert_eq!(error.status().as_u16(), status, "{error:?}");
        }
    }
}
