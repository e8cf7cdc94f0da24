//! An in-process OTLP receiver for the lab: gRPC or HTTP (`/v1/traces`,
//! protobuf, optional gzip), counting what arrives and, when asked, keeping
//! each span with its resource attributes (over gRPC, a receiver that only
//! counts reads the wire bytes: `counting`). It can be switched off: its port
//! then refuses connections and open ones are cut (a collector outage).
use std::{
    collections::HashMap,
    io::Read,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        trace_service_server::{TraceService, TraceServiceServer},
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    },
    common::v1::{any_value, AnyValue},
    trace::v1::Span,
};
use prost::Message;

mod counting;

/// How the agent talks to the collector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wire {
    Grpc,
    Http,
}

/// A span as received: its resource's attributes (as strings) and itself.
pub type Received = (HashMap<String, String>, Span);

#[derive(Default)]
struct Inbox {
    up: AtomicBool,
    count: AtomicU64,
    keep: bool,
    spans: Mutex<Vec<Received>>,
}

impl Inbox {
    fn record(&self, req: ExportTraceServiceRequest) {
        let n: usize = req
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        if self.keep {
            let mut g = self.spans.lock().expect("collector lock");
            for rs in req.resource_spans {
                let res: HashMap<String, String> = rs
                    .resource
                    .map(|r| {
                        r.attributes
                            .iter()
                            .map(|a| (a.key.clone(), attr_str(&a.value)))
                            .collect()
                    })
                    .unwrap_or_default();
                for s in rs.scope_spans.into_iter().flat_map(|ss| ss.spans) {
                    g.push((res.clone(), s));
                }
            }
        }
        self.count.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// An attribute value as text (strings as they are, ints in decimal).
pub fn attr_str(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        other => format!("{other:?}"),
    }
}

/// A running receiver; it lives as long as the runtime it was started on.
#[derive(Clone)]
pub struct Collector(Arc<Inbox>);

impl Collector {
    /// Listens on `addr` (up) in the background. With `keep`, every span is
    /// kept for [`Collector::spans`]; without, only counted (long soaks).
    pub fn start(rt: &tokio::runtime::Runtime, addr: SocketAddr, wire: Wire, keep: bool) -> Self {
        let inbox = Arc::new(Inbox {
            up: AtomicBool::new(true),
            keep,
            ..Inbox::default()
        });
        let i = inbox.clone();
        rt.spawn(async move {
            loop {
                if !i.up.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                let Ok(listener) = tokio::net::TcpListener::bind(addr).await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let mut conns = tokio::task::JoinSet::new();
                while i.up.load(Ordering::Relaxed) {
                    let accepted =
                        tokio::time::timeout(Duration::from_millis(50), listener.accept()).await;
                    if let Ok(Ok((s, _))) = accepted {
                        conns.spawn(serve(s, wire, i.clone()));
                    }
                }
                // Down: the port closes and live connections are cut.
                conns.abort_all();
            }
        });
        Self(inbox)
    }

    /// Spans received so far (kept or not).
    pub fn received(&self) -> u64 {
        self.0.count.load(Ordering::Relaxed)
    }

    /// The spans kept so far.
    pub fn spans(&self) -> Vec<Received> {
        self.0.spans.lock().expect("collector lock").clone()
    }

    pub fn set_up(&self, up: bool) {
        self.0.up.store(up, Ordering::Relaxed);
    }

    pub fn is_up(&self) -> bool {
        self.0.up.load(Ordering::Relaxed)
    }
}

struct Grpc(Arc<Inbox>);

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.record(req.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn serve(s: tokio::net::TcpStream, wire: Wire, inbox: Arc<Inbox>) {
    let io = hyper_util::rt::TokioIo::new(s);
    match wire {
        Wire::Grpc if !inbox.keep => {
            let svc = hyper_util::service::TowerToHyperService::new(counting::Counting(inbox));
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(io, svc)
                .await;
        }
        Wire::Grpc => {
            let svc = TraceServiceServer::new(Grpc(inbox))
                .accept_compressed(tonic::codec::CompressionEncoding::Gzip);
            let svc = hyper_util::service::TowerToHyperService::new(svc);
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(io, svc)
                .await;
        }
        Wire::Http => {
            let svc = hyper::service::service_fn(move |req| http_export(req, inbox.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        }
    }
}

/// `POST /v1/traces` with a protobuf body, gzip or not; anything else is 400.
async fn http_export(
    req: hyper::Request<hyper::body::Incoming>,
    inbox: Arc<Inbox>,
) -> Result<hyper::Response<http_body_util::Full<bytes::Bytes>>, hyper::Error> {
    use http_body_util::BodyExt;
    let well_formed = req.uri().path() == "/v1/traces"
        && req
            .headers()
            .get("content-type")
            .is_some_and(|v| v == "application/x-protobuf");
    let gz = req
        .headers()
        .get("content-encoding")
        .is_some_and(|v| v == "gzip");
    let body = req.into_body().collect().await?.to_bytes();
    let raw = if gz {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&body[..])
            .read_to_end(&mut out)
            .map(|_| out)
            .ok()
    } else {
        Some(body.to_vec())
    };
    let decoded = raw.and_then(|r| ExportTraceServiceRequest::decode(&r[..]).ok());
    let status = match decoded {
        Some(r) if well_formed => {
            inbox.record(r);
            hyper::StatusCode::OK
        }
        _ => hyper::StatusCode::BAD_REQUEST,
    };
    let mut resp = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::new()));
    *resp.status_mut() = status;
    Ok(resp)
}
