//! The admin listener: `GET /healthz` and `GET /readyz`.
//!
//! It listens on its own address (loopback by default) so probes and, later,
//! `/metrics` and the admin API never share a port with client traffic.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::header::{CONTENT_TYPE, HeaderValue};
use http::{Method, Request, Response, StatusCode};

use crate::body::Body;

/// Whether the gateway should receive traffic; false once shutdown has begun.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    draining: Arc<AtomicBool>,
}

impl Readiness {
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        !self.draining.load(Ordering::SeqCst)
    }
}

fn json(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut response = Response::new(Body::full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// Answers one admin request.
pub async fn handle<B>(
    readiness: Readiness,
    request: Request<B>,
) -> Result<Response<Body>, Infallible> {
    let is_read = matches!(*request.method(), Method::GET | Method::HEAD);
    Ok(match (is_read, request.uri().path()) {
        // The process is up and answering: no dependency is checked on purpose.
        (true, "/healthz") => json(StatusCode::OK, r#"{"status":"ok"}"#),
        (true, "/readyz") if readiness.is_ready() => json(StatusCode::OK, r#"{"status":"ready"}"#),
        (true, "/readyz") => json(StatusCode::SERVICE_UNAVAILABLE, r#"{"status":"draining"}"#),
        (false, "/healthz" | "/readyz") => json(
            StatusCode::METHOD_NOT_ALLOWED,
            r#"{"code":"method_not_allowed","message":"use GET"}"#,
        ),
        _ => json(
            StatusCode::NOT_FOUND,
            r#"{"code":"not_found","message":"admin endpoints: /healthz, /readyz"}"#,
        ),
    })
}
