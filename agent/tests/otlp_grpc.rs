//! OTLP/gRPC as the exporter frames it itself (gzip at level 1): a tonic
//! receiver decodes what it sends, the configured headers arrive, and each
//! way a collector can say no maps to retry or give up as gRPC means it.
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use opentelemetry_proto::tonic::collector::trace::v1::{
    trace_service_server::{TraceService, TraceServiceServer},
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tagflow::{
    export::{ExportConfig, Protocol, SendError, Sink},
    spans::{Resource, SpanKind, SpanRecord},
};
use tonic::{codec::CompressionEncoding, transport::server::TcpIncoming, Code};

fn span(id: u8) -> SpanRecord {
    SpanRecord {
        trace_id: [7; 16],
        span_id: [id; 8],
        parent_span_id: None,
        parent_is_remote: false,
        name: format!("GET /{id}"),
        kind: SpanKind::Server,
        start_unix_ns: 1,
        end_unix_ns: 2,
        attributes: Default::default(),
        resource: Arc::new(Resource::default()),
        error: false,
    }
}

/// What the receiver saw: span names, and the request's headers.
#[derive(Default)]
struct Seen {
    names: Vec<String>,
    tenant: Option<String>,
    encoding: Option<String>,
}

#[derive(Clone)]
struct Receiver {
    seen: Arc<Mutex<Seen>>,
    /// Answer with this status instead of OK.
    refuse: Option<Code>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        if let Some(code) = self.refuse {
            return Err(tonic::Status::new(code, "refused by the test"));
        }
        let header = |k: &str| {
            req.metadata()
                .get(k)
                .and_then(|v| v.to_str().ok())
                .map(String::from)
        };
        let mut seen = self.seen.lock().unwrap();
        seen.tenant = header("x-tenant");
        seen.encoding = header("grpc-encoding");
        for rs in &req.get_ref().resource_spans {
            for ss in &rs.scope_spans {
                seen.names.extend(ss.spans.iter().map(|s| s.name.clone()));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn receiver(refuse: Option<Code>) -> (SocketAddr, Arc<Mutex<Seen>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let incoming = TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = incoming.local_addr().unwrap();
    let svc = TraceServiceServer::new(Receiver {
        seen: seen.clone(),
        refuse,
    })
    .accept_compressed(CompressionEncoding::Gzip);
    let server = tonic::transport::Server::builder().add_service(svc);
    tokio::spawn(server.serve_with_incoming(incoming));
    (addr, seen)
}

fn sink(addr: SocketAddr, gzip: bool) -> Sink {
    Sink::from_config(&ExportConfig {
        endpoint: Some(format!("http://{addr}")),
        protocol: Protocol::Grpc,
        gzip,
        timeout_ms: 3000,
        headers: vec![("X-Tenant".into(), "blue".into())],
        ..ExportConfig::default()
    })
    .unwrap()
}

#[tokio::test]
async fn a_receiver_decodes_what_is_sent_with_and_without_gzip() {
    for gzip in [true, false] {
        let (addr, seen) = receiver(None).await;
        let mut s = sink(addr, gzip);
        s.send(&[span(1), span(2), span(3)]).await.unwrap();
        s.send(&[span(4)]).await.unwrap();
        let seen = seen.lock().unwrap();
        assert_eq!(seen.names, ["GET /1", "GET /2", "GET /3", "GET /4"]);
        assert_eq!(seen.tenant.as_deref(), Some("blue"));
        assert_eq!(
            seen.encoding.as_deref(),
            gzip.then_some("gzip"),
            "gzip {gzip}"
        );
    }
}

#[tokio::test]
async fn a_refusal_is_retried_only_when_grpc_says_it_may_pass() {
    for (code, retry) in [
        (Code::Unavailable, true),
        (Code::ResourceExhausted, true),
        (Code::InvalidArgument, false),
        (Code::Unauthenticated, false),
    ] {
        let (addr, _) = receiver(Some(code)).await;
        match sink(addr, true).send(&[span(1)]).await {
            Err(SendError::Remote {
                retry: r, message, ..
            }) => {
                assert_eq!(r, retry, "{code:?}: {message}");
                assert!(message.contains(&format!("{code:?}")), "{message}");
            }
            other => panic!("{code:?}: {other:?}"),
        }
    }
}

/// An HTTP/2 server that is no gRPC server (a proxy's error page): the
/// HTTP status decides.
#[tokio::test]
async fn an_answer_without_a_grpc_status_maps_from_the_http_status() {
    for (status, retry) in [(503u16, true), (404, false)] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let svc = hyper::service::service_fn(move |_req| async move {
                    let mut r = hyper::Response::new(http_body_util::Full::new(
                        bytes::Bytes::from_static(b"no"),
                    ));
                    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                    Ok::<_, std::convert::Infallible>(r)
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc),
                );
            }
        });
        match sink(addr, false).send(&[span(1)]).await {
            Err(SendError::Remote {
                retry: r, message, ..
            }) => {
                assert_eq!(r, retry, "HTTP {status}: {message}");
                assert!(message.contains(&status.to_string()), "{message}");
            }
            other => panic!("HTTP {status}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn no_collector_is_a_failure_worth_retrying() {
    // A port just freed: nothing listens on it.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    match sink(addr, true).send(&[span(1)]).await {
        Err(SendError::Remote { retry, .. }) => assert!(retry),
        other => panic!("{other:?}"),
    }
}
