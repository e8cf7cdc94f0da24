//! OTLP encoding of span records, and the gRPC and HTTP/protobuf senders.
use std::{collections::HashMap, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use opentelemetry_proto::tonic::{
    collector::trace::v1::{trace_service_client::TraceServiceClient, ExportTraceServiceRequest},
    common::v1::{any_value, AnyValue, ArrayValue, InstrumentationScope, KeyValue as PKeyValue},
    resource::v1::Resource as PResource,
    trace::v1::{
        span::SpanKind as PSpanKind, status::StatusCode, ResourceSpans, ScopeSpans, Span, Status,
    },
};
use prost::Message;
use tonic::{
    codec::CompressionEncoding,
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};

use super::{ExportConfig, SendError};
use crate::spans::{KeyValue, Resource, SpanKind, SpanRecord, Value};

/// W3C trace-flags "sampled" and OTLP's "has remote parent" flag bits.
const FLAG_SAMPLED: u32 = 0x01;
const FLAG_CONTEXT_HAS_IS_REMOTE: u32 = 0x100;
const FLAG_CONTEXT_IS_REMOTE: u32 = 0x200;

fn value(v: &Value) -> AnyValue {
    let inner = match v {
        Value::Str(s) => any_value::Value::StringValue(s.to_string()),
        Value::Int(i) => any_value::Value::IntValue(*i),
        Value::StrArray(a) => any_value::Value::ArrayValue(ArrayValue {
            values: a
                .iter()
                .map(|s| AnyValue {
                    value: Some(any_value::Value::StringValue(s.clone())),
                })
                .collect(),
        }),
    };
    AnyValue { value: Some(inner) }
}

fn attrs(a: &[KeyValue]) -> Vec<PKeyValue> {
    a.iter()
        .map(|kv| PKeyValue {
            key: kv.key.to_string(),
            value: Some(value(&kv.value)),
            ..Default::default()
        })
        .collect()
}

fn span(s: &SpanRecord) -> Span {
    let mut flags = FLAG_SAMPLED;
    if s.parent_span_id.is_some() {
        flags |= FLAG_CONTEXT_HAS_IS_REMOTE;
        if s.parent_is_remote {
            flags |= FLAG_CONTEXT_IS_REMOTE;
        }
    }
    Span {
        trace_id: s.trace_id.to_vec(),
        span_id: s.span_id.to_vec(),
        parent_span_id: s.parent_span_id.map(|p| p.to_vec()).unwrap_or_default(),
        flags,
        name: s.name.clone(),
        kind: match s.kind {
            SpanKind::Internal => PSpanKind::Internal,
            SpanKind::Server => PSpanKind::Server,
            SpanKind::Client => PSpanKind::Client,
        } as i32,
        start_time_unix_nano: s.start_unix_ns,
        end_time_unix_nano: s.end_unix_ns,
        attributes: attrs(&s.attributes),
        status: s.error.then(|| Status {
            code: StatusCode::Error as i32,
            message: String::new(),
        }),
        ..Default::default()
    }
}

/// One request, spans grouped by resource (each its own service).
pub fn request(spans: &[SpanRecord]) -> ExportTraceServiceRequest {
    let mut groups: HashMap<&Resource, Vec<Span>> = HashMap::new();
    let mut order: Vec<&Arc<Resource>> = Vec::new();
    for s in spans {
        let e = groups.entry(&s.resource).or_default();
        if e.is_empty() {
            order.push(&s.resource);
        }
        e.push(span(s));
    }
    let resource_spans = order
        .into_iter()
        .map(|r| ResourceSpans {
            resource: Some(PResource {
                attributes: attrs(&r.attributes),
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "tagflow".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                spans: groups.remove(&**r).unwrap_or_default(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .collect();
    ExportTraceServiceRequest { resource_spans }
}

#[derive(Clone)]
pub struct Grpc {
    client: TraceServiceClient<Channel>,
    headers: Vec<(
        tonic::metadata::MetadataKey<tonic::metadata::Ascii>,
        MetadataValue<tonic::metadata::Ascii>,
    )>,
}

impl Grpc {
    pub fn new(endpoint: &str, cfg: &ExportConfig) -> Result<Self, SendError> {
        let (headers, gzip) = (&cfg.headers, cfg.gzip);
        let timeout = Duration::from_millis(cfg.timeout_ms);
        let bad = |e: &dyn std::error::Error| {
            SendError::Config(format!("endpoint {endpoint}: {}", crate::report(e)))
        };
        let mut ep = Channel::from_shared(endpoint.to_string())
            .map_err(|e| bad(&e))?
            .connect_timeout(timeout)
            .timeout(timeout);
        if endpoint.starts_with("https://") {
            let (ca, identity) = cfg.tls.read().map_err(|e| bad(&e))?;
            let mut t = ClientTlsConfig::new();
            t = match ca {
                Some(pem) => t.ca_certificate(Certificate::from_pem(pem)),
                None => t.with_native_roots(),
            };
            if let Some((cert, key)) = identity {
                t = t.identity(Identity::from_pem(cert, key));
            }
            ep = ep.tls_config(t).map_err(|e| bad(&e))?;
        }
        let ch = ep.connect_lazy();
        let mut client = TraceServiceClient::new(ch);
        if gzip {
            client = client.send_compressed(CompressionEncoding::Gzip);
        }
        let headers = headers
            .iter()
            .map(|(k, v)| {
                Ok((
                    k.parse()
                        .map_err(|_| SendError::Config(format!("header name {k:?}")))?,
                    v.parse()
                        .map_err(|_| SendError::Config(format!("header value for {k}")))?,
                ))
            })
            .collect::<Result<_, SendError>>()?;
        Ok(Self { client, headers })
    }

    pub async fn send(&mut self, spans: &[SpanRecord]) -> Result<(), SendError> {
        let mut req = tonic::Request::new(request(spans));
        for (k, v) in &self.headers {
            req.metadata_mut().insert(k.clone(), v.clone());
        }
        match self.client.export(req).await {
            Ok(_) => Ok(()),
            Err(st) => {
                use tonic::Code::*;
                let retry = matches!(
                    st.code(),
                    Unavailable | ResourceExhausted | DeadlineExceeded | Aborted | Cancelled
                );
                Err(SendError::Remote {
                    retry,
                    after: None,
                    message: format!("gRPC {:?}: {}", st.code(), st.message()),
                })
            }
        }
    }
}

pub struct Http {
    uri: hyper::Uri,
    authority: String,
    /// For `https://`: the connector and the name the certificate must have.
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls_pki_types::ServerName<'static>,
    )>,
    headers: Vec<(String, String)>,
    gzip: bool,
    timeout: Duration,
    conn: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
}

impl Http {
    /// A sender of its own to the same endpoint (its own connection).
    pub fn lane(&self) -> Self {
        Self {
            uri: self.uri.clone(),
            authority: self.authority.clone(),
            tls: self.tls.clone(),
            headers: self.headers.clone(),
            gzip: self.gzip,
            timeout: self.timeout,
            conn: None,
        }
    }

    pub fn new(endpoint: &str, cfg: &ExportConfig) -> Result<Self, SendError> {
        let bad = |e: String| SendError::Config(format!("endpoint {endpoint}: {e}"));
        let uri: hyper::Uri = endpoint.parse().map_err(|e| bad(format!("{e}")))?;
        let a = uri
            .authority()
            .ok_or_else(|| bad("no host".into()))?
            .clone();
        let tls = match uri.scheme_str() {
            Some("http") => None,
            Some("https") => {
                let c = cfg
                    .tls
                    .client_config(&[b"http/1.1"])
                    .map_err(|e| bad(crate::report(&e)))?;
                let host = a.host().trim_start_matches('[').trim_end_matches(']');
                let name = rustls_pki_types::ServerName::try_from(host.to_string())
                    .map_err(|e| bad(e.to_string()))?;
                Some((tokio_rustls::TlsConnector::from(c), name))
            }
            _ => return Err(bad("the scheme must be http:// or https://".into())),
        };
        let port = a.port_u16().unwrap_or(if tls.is_some() { 443 } else { 80 });
        Ok(Self {
            authority: format!("{}:{port}", a.host()),
            uri,
            tls,
            headers: cfg.headers.clone(),
            gzip: cfg.gzip,
            timeout: Duration::from_millis(cfg.timeout_ms),
            conn: None,
        })
    }

    pub async fn send(&mut self, spans: &[SpanRecord]) -> Result<(), SendError> {
        let mut body = request(spans).encode_to_vec();
        if self.gzip {
            use std::io::Write;
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(&body)
                .map_err(|e| SendError::Config(e.to_string()))?;
            body = enc.finish().map_err(|e| SendError::Config(e.to_string()))?;
        }
        let t = self.timeout;
        tokio::time::timeout(t, self.post(body))
            .await
            .unwrap_or_else(|_| {
                Err(SendError::Remote {
                    retry: true,
                    after: None,
                    message: format!("timed out after {t:?}"),
                })
            })
    }

    async fn post(&mut self, body: Vec<u8>) -> Result<(), SendError> {
        let net = |e: String| SendError::Remote {
            retry: true,
            after: None,
            message: e,
        };
        if !self.conn.as_ref().is_some_and(|c| c.is_ready()) {
            let stream = tokio::net::TcpStream::connect(&self.authority)
                .await
                .map_err(|e| net(e.to_string()))?;
            use hyper::client::conn::http1::handshake;
            use hyper_util::rt::TokioIo;
            let send = match &self.tls {
                None => {
                    let (send, conn) = handshake(TokioIo::new(stream))
                        .await
                        .map_err(|e| net(e.to_string()))?;
                    tokio::spawn(conn);
                    send
                }
                Some((tls, name)) => {
                    // A certificate the CA did not sign is not retried
                    // any sooner: still a network-level failure.
                    let stream = tls
                        .connect(name.clone(), stream)
                        .await
                        .map_err(|e| net(format!("TLS: {e}")))?;
                    let (send, conn) = handshake(TokioIo::new(stream))
                        .await
                        .map_err(|e| net(e.to_string()))?;
                    tokio::spawn(conn);
                    send
                }
            };
            self.conn = Some(send);
        }
        let host = self.uri.authority().map_or("", |a| a.as_str());
        let path = self.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut req = hyper::Request::post(path)
            .header("host", host)
            .header("content-type", "application/x-protobuf");
        if self.gzip {
            req = req.header("content-encoding", "gzip");
        }
        for (k, v) in &self.headers {
            req = req.header(k, v);
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| SendError::Config(e.to_string()))?;
        let conn = self.conn.as_mut().expect("connected above");
        let resp = conn.send_request(req).await.map_err(|e| {
            self.conn = None;
            net(e.to_string())
        })?;
        let status = resp.status();
        let after = retry_after(resp.headers());
        let _ = resp.into_body().collect().await;
        if status.is_success() {
            return Ok(());
        }
        Err(SendError::Remote {
            retry: matches!(status.as_u16(), 429 | 502 | 503 | 504),
            after,
            message: format!("HTTP {status}"),
        })
    }
}

/// A collector's `Retry-After: <seconds>` (the HTTP-date form is not used
/// by collectors); at most a minute is honoured.
fn retry_after(h: &hyper::HeaderMap) -> Option<Duration> {
    let s: u64 = h.get("retry-after")?.to_str().ok()?.trim().parse().ok()?;
    Some(Duration::from_secs(s.min(60)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spans::kv;

    #[test]
    fn retry_after_is_read_in_seconds_and_capped() {
        let mut h = hyper::HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", "7".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert("retry-after", "86400".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(60)));
        h.insert(
            "retry-after",
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), None);
    }

    fn rec(service: &str, id: u8, parent: Option<[u8; 8]>, remote: bool) -> SpanRecord {
        SpanRecord {
            trace_id: [7; 16],
            span_id: [id; 8],
            parent_span_id: parent,
            parent_is_remote: remote,
            name: "tcp 10.0.0.2:80".into(),
            kind: SpanKind::Client,
            start_unix_ns: 10,
            end_unix_ns: 20,
            attributes: vec![
                kv("tagflow.packets", Value::Int(3)),
                kv(
                    "http.request.header.x-request-id",
                    Value::StrArray(vec!["r".into()]),
                ),
            ],
            resource: Arc::new(Resource {
                attributes: vec![kv("service.name", Value::Str(service.to_string().into()))],
            }),
            error: id == 2,
        }
    }

    #[test]
    fn spans_are_grouped_by_resource_and_encoded_faithfully() {
        let a = rec("frontend", 1, Some([9; 8]), true);
        let b = rec("backend", 2, Some([1; 8]), false);
        let c = rec("frontend", 3, None, false);
        let req = request(&[a, b, c]);
        assert_eq!(req.resource_spans.len(), 2, "one ResourceSpans per service");
        let names: Vec<String> = req
            .resource_spans
            .iter()
            .map(|r| {
                match &r.resource.as_ref().unwrap().attributes[0]
                    .value
                    .as_ref()
                    .unwrap()
                    .value
                {
                    Some(any_value::Value::StringValue(s)) => s.clone(),
                    other => panic!("{other:?}"),
                }
            })
            .collect();
        assert_eq!(names, ["frontend", "backend"]);
        let fe = &req.resource_spans[0].scope_spans[0];
        assert_eq!(fe.scope.as_ref().unwrap().name, "tagflow");
        assert_eq!(fe.spans.len(), 2);
        let s = &fe.spans[0];
        assert_eq!(
            (s.trace_id.len(), s.span_id.as_slice()),
            (16, &[1u8; 8][..])
        );
        assert_eq!(s.parent_span_id, vec![9; 8]);
        assert_eq!(
            s.flags,
            FLAG_SAMPLED | FLAG_CONTEXT_HAS_IS_REMOTE | FLAG_CONTEXT_IS_REMOTE
        );
        assert_eq!(s.kind, PSpanKind::Client as i32);
        assert_eq!((s.start_time_unix_nano, s.end_time_unix_nano), (10, 20));
        assert!(
            fe.spans[1].parent_span_id.is_empty(),
            "a root has no parent"
        );
        assert_eq!(fe.spans[1].flags, FLAG_SAMPLED);
        let local_parent = &req.resource_spans[1].scope_spans[0].spans[0];
        assert_eq!(
            local_parent.flags,
            FLAG_SAMPLED | FLAG_CONTEXT_HAS_IS_REMOTE
        );
        // A failed call's status is Error; others leave it unset.
        let error = local_parent.status.as_ref().map(|s| s.code);
        assert_eq!(error, Some(StatusCode::Error as i32));
        assert_eq!(s.status, None);
        // Round trip through protobuf bytes.
        let back = ExportTraceServiceRequest::decode(&req.encode_to_vec()[..]).unwrap();
        assert_eq!(back, req);
    }
}
