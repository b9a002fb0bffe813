//! OpenTelemetry traces over OTLP/gRPC (issue #6): the same spans as over
//! HTTP, received by an in-process tonic `TraceService` on 127.0.0.1:0.
//! Its own binary: it installs the process's global subscriber.

mod common;

use std::sync::{Arc, Mutex};

use common::*;
use http::StatusCode;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::trace::v1::Span;
use teamgate::config::OtlpProtocol;

#[derive(Default, Clone)]
struct Collector(Arc<Mutex<Vec<Span>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                self.0.lock().unwrap().extend(scope.spans);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_arrive_over_grpc_with_the_clients_trace_as_parent() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let collector = Collector::default();
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(collector.clone()))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    tokio::spawn(server);

    let telemetry = export_traces_to(addr, OtlpProtocol::Grpc);

    let h = Harness::start().await;
    let trace_id = "0af7651916cd43dd8448eb211c80319c";
    let answer = h
        .get_with(
            "/api/jobs",
            DESIGN_KEY,
            &[("traceparent", &format!("00-{trace_id}-b7ad6b7169203331-01"))],
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK);
    h.stop().await;
    tokio::task::spawn_blocking(move || telemetry.shutdown())
        .await
        .unwrap();

    let spans = collector.0.lock().unwrap().clone();
    let request = spans
        .iter()
        .find(|span| span.name == "request")
        .expect("a request span");
    assert_eq!(hex::encode(&request.trace_id), trace_id);
    assert_eq!(hex::encode(&request.parent_span_id), "b7ad6b7169203331");
    let upstream = spans
        .iter()
        .find(|span| span.name == "upstream")
        .expect("an upstream span");
    assert_eq!(
        upstream.parent_span_id, request.span_id,
        "a pass-through goes straight upstream"
    );
}
