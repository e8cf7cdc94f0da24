//! The receiver's gRPC side when spans are only counted (the span pipeline
//! bench, soaks): the request is framed, inflated and checked by tonic as
//! before, then its spans are counted from the wire bytes without building
//! a message. The receiver stands in for a collector on another machine;
//! prost's owned decoding (a string and a vector per attribute, freed at
//! once) took about a third of the two vCPUs the agent's side runs on, and
//! that was being measured as the agent's cost.
use std::{
    convert::Infallible,
    future::{ready, Future, Ready},
    pin::Pin,
    sync::{atomic::Ordering, Arc},
    task::{Context, Poll},
};

use bytes::Buf;
use tonic::{
    codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder},
    codegen::{http, Service},
    server::{Grpc, UnaryService},
    Status,
};

use super::Inbox;

const EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// The Export method, counting; any other path is UNIMPLEMENTED.
#[derive(Clone)]
pub(super) struct Counting(pub(super) Arc<Inbox>);

impl<B> Service<http::Request<B>> for Counting
where
    B: tonic::codegen::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let inbox = self.0.clone();
        Box::pin(async move {
            if req.uri().path() != EXPORT {
                return Ok(Status::unimplemented(req.uri().path().to_string()).into_http());
            }
            let mut grpc = Grpc::new(Count).accept_compressed(CompressionEncoding::Gzip);
            Ok(grpc.unary(Add(inbox), req).await)
        })
    }
}

struct Add(Arc<Inbox>);

impl UnaryService<u64> for Add {
    type Response = ();
    type Future = Ready<Result<tonic::Response<()>, Status>>;

    fn call(&mut self, req: tonic::Request<u64>) -> Self::Future {
        self.0.count.fetch_add(req.into_inner(), Ordering::Relaxed);
        ready(Ok(tonic::Response::new(())))
    }
}

/// Requests in as span counts; the (empty) response out as no bytes.
#[derive(Clone, Copy, Default)]
struct Count;

impl Codec for Count {
    type Encode = ();
    type Decode = u64;
    type Encoder = Count;
    type Decoder = Count;
    fn encoder(&mut self) -> Count {
        Count
    }
    fn decoder(&mut self) -> Count {
        Count
    }
}

impl Encoder for Count {
    type Item = ();
    type Error = Status;
    // An ExportTraceServiceResponse with nothing set encodes to no bytes.
    fn encode(&mut self, _: (), _: &mut EncodeBuf<'_>) -> Result<(), Status> {
        Ok(())
    }
}

impl Decoder for Count {
    type Item = u64;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<u64>, Status> {
        let bytes = src.copy_to_bytes(src.remaining());
        spans_in(&bytes)
            .map(Some)
            .ok_or_else(|| Status::invalid_argument("malformed ExportTraceServiceRequest"))
    }
}

/// The spans of an `ExportTraceServiceRequest`: resource_spans = 1 →
/// scope_spans = 2 → spans = 2. `None` when the bytes are not protobuf.
pub(super) fn spans_in(req: &[u8]) -> Option<u64> {
    let mut n = 0;
    each(req, 1, |rs| {
        each(rs, 2, |ss| {
            each(ss, 2, |_| {
                n += 1;
                Some(())
            })
        })
    })?;
    Some(n)
}

/// Calls `f` on each length-delimited field numbered `want` of the message
/// `b`, skipping every other field by its wire type.
fn each(b: &[u8], want: u64, mut f: impl FnMut(&[u8]) -> Option<()>) -> Option<()> {
    let mut i = 0;
    while i < b.len() {
        let key = varint(b, &mut i)?;
        match key & 7 {
            0 => {
                varint(b, &mut i)?;
            }
            1 => i += 8,
            5 => i += 4,
            2 => {
                let len = usize::try_from(varint(b, &mut i)?).ok()?;
                let body = b.get(i..i.checked_add(len)?)?;
                if key >> 3 == want {
                    f(body)?;
                }
                i += len;
            }
            _ => return None,
        }
    }
    (i == b.len()).then_some(())
}

fn varint(b: &[u8], i: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*i)?;
        *i += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::{
        collector::trace::v1::ExportTraceServiceRequest,
        common::v1::{any_value, AnyValue, KeyValue},
        resource::v1::Resource,
        trace::v1::{ResourceSpans, ScopeSpans, Span},
    };
    use prost::Message;

    fn span(i: u8) -> Span {
        Span {
            trace_id: vec![i; 16],
            span_id: vec![i; 8],
            name: format!("GET /{i}"),
            start_time_unix_nano: 1,
            end_time_unix_nano: 2,
            attributes: vec![KeyValue {
                key: "http.request.header.x-request-id".into(),
                value: Some(AnyValue {
                    value: Some(any_value::Value::StringValue("r".into())),
                }),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn counts_what_prost_encoded_and_refuses_what_is_not_protobuf() {
        let rs = |spans: Vec<Vec<Span>>| ResourceSpans {
            resource: Some(Resource::default()),
            scope_spans: spans
                .into_iter()
                .map(|spans| ScopeSpans {
                    spans,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let req = ExportTraceServiceRequest {
            resource_spans: vec![
                rs(vec![vec![span(1), span(2)], vec![span(3)]]),
                rs(vec![vec![]]),
                rs(vec![(4..40).map(span).collect()]),
            ],
        }
        .encode_to_vec();
        assert_eq!(spans_in(&req), Some(39));
        assert_eq!(spans_in(&[]), Some(0));
        // Cut inside a span: the length runs past the end.
        assert_eq!(spans_in(&req[..req.len() - 3]), None);
        // Wire type 7 does not exist.
        assert_eq!(spans_in(&[0x0f, 0]), None);
    }

    /// The agent's own exporter against the counting receiver: every span
    /// counted, gzip or not.
    #[test]
    fn counts_what_the_exporter_sends() {
        use crate::collector::{Collector, Wire};
        use tagflow::{
            export::{ExportConfig, Protocol, Sink},
            spans::{Resource, SpanKind, SpanRecord},
        };
        let rt = tokio::runtime::Runtime::new().unwrap();
        // The gRPC channel is made (lazily) on the runtime.
        let _in_rt = rt.enter();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{}", crate::topo::free_port())
            .parse()
            .unwrap();
        let got = Collector::start(&rt, addr, Wire::Grpc, false);
        let record = |i: u8| SpanRecord {
            trace_id: [i; 16],
            span_id: [i; 8],
            parent_span_id: None,
            parent_is_remote: false,
            name: format!("GET /{i}"),
            kind: SpanKind::Server,
            start_unix_ns: 1,
            end_unix_ns: 2,
            attributes: Default::default(),
            resource: Arc::new(Resource::default()),
            error: false,
        };
        let mut sent = 0;
        for gzip in [true, false] {
            let mut sink = Sink::from_config(&ExportConfig {
                endpoint: Some(format!("http://{addr}")),
                protocol: Protocol::Grpc,
                gzip,
                ..ExportConfig::default()
            })
            .unwrap();
            let batch: Vec<_> = (0..100).map(record).collect();
            // The receiver may still be binding its port.
            let t0 = std::time::Instant::now();
            while rt.block_on(sink.send(&batch)).is_err() {
                assert!(t0.elapsed().as_secs() < 5, "receiver never answered");
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            sent += batch.len() as u64;
            assert_eq!(got.received(), sent, "gzip {gzip}");
        }
    }
}
