//! OpenTelemetry traces (issue #6): spans reach an OTLP/HTTP receiver with the
//! client's `traceparent` as parent, and the upstream sees the gateway's span.
//! Its own binary: it installs the process's global subscriber.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::*;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use teamgate::config::OtlpProtocol;

/// An OTLP/HTTP receiver on 127.0.0.1:0 that keeps every span it is sent.
async fn receiver() -> (
    std::net::SocketAddr,
    Arc<Mutex<Vec<Span>>>,
    Arc<Mutex<Vec<String>>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let spans = Arc::new(Mutex::new(Vec::new()));
    let paths = Arc::new(Mutex::new(Vec::new()));
    let (kept, seen) = (Arc::clone(&spans), Arc::clone(&paths));
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let (kept, seen) = (Arc::clone(&kept), Arc::clone(&seen));
            let service =
                hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let (kept, seen) = (Arc::clone(&kept), Arc::clone(&seen));
                    async move {
                        seen.lock().unwrap().push(request.uri().path().to_owned());
                        let body = request.into_body().collect().await.unwrap().to_bytes();
                        let export =
                            ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf body");
                        for resource in export.resource_spans {
                            for scope in resource.scope_spans {
                                kept.lock().unwrap().extend(scope.spans);
                            }
                        }
                        let mut response = Response::new(Full::new(Bytes::new()));
                        *response.status_mut() = StatusCode::OK;
                        response
                            .headers_mut()
                            .insert("content-type", "application/x-protobuf".parse().unwrap());
                        Ok::<_, Infallible>(response)
                    }
                });
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, spans, paths)
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_arrive_with_the_clients_trace_as_parent_and_propagate_upstream() {
    let (addr, spans, paths) = receiver().await;
    let telemetry = export_traces_to(addr, OtlpProtocol::HttpProtobuf);

    let h = Harness::start().await;
    let answer = h
        .get_with(
            "/api/assets?limit=2",
            DESIGN_KEY,
            &[("traceparent", &format!("00-{TRACE_ID}-{CLIENT_SPAN}-01"))],
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    let upstream_traceparent = h.emulator.recorded().pop().unwrap().headers["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    h.stop().await;
    // The request span ends with its last child, the cache fill, which runs
    // in a task of its own and may finish after the client has its answer
    // (and after the gateway stopped): wait for it rather than assume it.
    let exported = |name: &str| spans.lock().unwrap().iter().any(|span| span.name == name);
    eventually("the request span is exported", async || {
        tokio::task::block_in_place(|| telemetry.flush());
        exported("request")
    })
    .await;
    tokio::task::spawn_blocking(move || telemetry.shutdown())
        .await
        .unwrap();

    assert!(
        paths
            .lock()
            .unwrap()
            .iter()
            .all(|path| path == "/v1/traces")
    );
    let spans = spans.lock().unwrap().clone();
    let by_id: HashMap<Vec<u8>, &Span> = spans
        .iter()
        .map(|span| (span.span_id.clone(), span))
        .collect();
    let named = |name: &str| {
        spans
            .iter()
            .find(|span| span.name == name)
            .unwrap_or_else(|| {
                panic!(
                    "no `{name}` span among {:?}",
                    spans.iter().map(|s| &s.name).collect::<Vec<_>>()
                )
            })
    };
    let request = named("request");
    assert_eq!(
        hex::encode(&request.trace_id),
        TRACE_ID,
        "the client's trace is continued"
    );
    assert_eq!(
        hex::encode(&request.parent_span_id),
        CLIENT_SPAN,
        "under the client's span"
    );

    // What the layers inside the request span record on it as they go
    // (`telemetry::request_span`): the route, the team and the key.
    let attribute = |span: &Span, key: &str| {
        span.attributes
            .iter()
            .find(|attribute| attribute.key == key)
            .and_then(|attribute| attribute.value.as_ref()?.value.clone())
            .and_then(|value| match value {
                opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(text) => {
                    Some(text)
                }
                _ => None,
            })
    };
    assert_eq!(attribute(request, "upstream").as_deref(), Some("comfy"));
    assert_eq!(
        attribute(request, "route_class").as_deref(),
        Some("cacheable_read")
    );
    assert_eq!(attribute(request, "team").as_deref(), Some("design"));
    let key = attribute(request, "key").expect("the key's fingerprint");
    assert!(
        !key.is_empty() && !DESIGN_KEY.contains(&key),
        "a fingerprint, not the key: {key}"
    );

    let upstream = named("upstream");
    assert_eq!(hex::encode(&upstream.trace_id), TRACE_ID);
    // upstream → cache.fill → cache.lookup → request
    let mut ancestors = Vec::new();
    let mut current = upstream;
    while let Some(parent) = by_id.get(&current.parent_span_id) {
        ancestors.push(parent.name.clone());
        current = parent;
    }
    assert_eq!(ancestors, ["cache.fill", "cache.lookup", "request"]);

    // The upstream request names the gateway's upstream span as its parent.
    assert_eq!(
        upstream_traceparent,
        format!("00-{TRACE_ID}-{}-01", hex::encode(&upstream.span_id)),
        "traceparent propagated upstream"
    );
}
