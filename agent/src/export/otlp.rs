//! The OTLP senders: gRPC and HTTP/protobuf.
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use http_body_util::{BodyExt, Full};
use tonic::{
    client::Grpc as GrpcClient,
    codec::{CompressionEncoding, DecodeBuf, EncodeBuf},
    codegen::http::uri::PathAndQuery,
    metadata::MetadataValue,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};

use super::{encode, ExportConfig, SendError};
use crate::spans::SpanRecord;

/// The Export method's path.
const EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// gRPC messages as bytes: a request encoded by `encode::request`; the
/// response's body is not read (a partial success is still a success).
#[derive(Clone, Copy, Default)]
struct Raw;

impl tonic::codec::Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for Raw {
    type Item = ();
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<()>, tonic::Status> {
        src.advance(src.remaining());
        Ok(Some(()))
    }
}

impl tonic::codec::Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = ();
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

#[derive(Clone)]
pub struct Grpc {
    client: GrpcClient<Channel>,
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
        let mut client = GrpcClient::new(ch);
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
        let mut req = tonic::Request::new(encode::request(spans));
        for (k, v) in &self.headers {
            req.metadata_mut().insert(k.clone(), v.clone());
        }
        let sent = match self.client.ready().await {
            Ok(()) => {
                let path = PathAndQuery::from_static(EXPORT);
                self.client.unary::<_, (), _>(req, path, Raw).await
            }
            Err(e) => Err(tonic::Status::unavailable(crate::report(&e))),
        };
        match sent {
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
        let mut body = encode::request(spans);
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
}
