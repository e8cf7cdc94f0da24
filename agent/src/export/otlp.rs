//! The OTLP senders: gRPC and HTTP/protobuf.
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tonic::{
    codegen::{http, Service},
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
    Code, Status,
};

use super::{encode, ExportConfig, SendError};
use crate::spans::SpanRecord;

/// The Export method's path.
const EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// OTLP/gRPC, each request framed here rather than by tonic's client, so
/// that gzip runs at level 1 (tonic compresses at a fixed level 6, which
/// was the largest share of the span pipeline's profile; the HTTP sender
/// already used level 1). The response's message is not read (a partial
/// success is still a success); its status is.
#[derive(Clone)]
pub struct Grpc {
    channel: Channel,
    /// content-type, te, grpc-encoding, then the configured headers.
    headers: http::HeaderMap,
    gzip: bool,
}

impl Grpc {
    pub fn new(endpoint: &str, cfg: &ExportConfig) -> Result<Self, SendError> {
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
        let mut headers = http::HeaderMap::new();
        let fixed = |v| http::HeaderValue::from_static(v);
        headers.insert(http::header::CONTENT_TYPE, fixed("application/grpc"));
        headers.insert(http::header::TE, fixed("trailers"));
        if cfg.gzip {
            headers.insert("grpc-encoding", fixed("gzip"));
        }
        for (k, v) in &cfg.headers {
            let name = http::HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes())
                .map_err(|_| SendError::Config(format!("header name {k:?}")))?;
            let value = http::HeaderValue::from_str(v)
                .map_err(|_| SendError::Config(format!("header value for {k}")))?;
            headers.insert(name, value);
        }
        Ok(Self {
            channel: ep.connect_lazy(),
            headers,
            gzip: cfg.gzip,
        })
    }

    pub async fn send(&mut self, spans: &[SpanRecord]) -> Result<(), SendError> {
        let body = frame(encode::request(spans), self.gzip)?;
        let mut req = http::Request::post(EXPORT)
            .body(tonic::body::Body::new(Full::new(Bytes::from(body))))
            .map_err(|e| SendError::Config(e.to_string()))?;
        *req.headers_mut() = self.headers.clone();
        let status = match self.exchange(req).await {
            Ok(st) => st,
            // Connecting, the timeout, a reset stream: the network's failures.
            Err(e) => Status::unavailable(crate::report(&*e)),
        };
        if status.code() == Code::Ok {
            return Ok(());
        }
        let retry = matches!(
            status.code(),
            Code::Unavailable
                | Code::ResourceExhausted
                | Code::DeadlineExceeded
                | Code::Aborted
                | Code::Cancelled
        );
        Err(SendError::Remote {
            retry,
            after: None,
            message: format!("gRPC {:?}: {}", status.code(), status.message()),
        })
    }

    /// Sends `req` and reads the call's status: from the headers of a
    /// trailers-only response, else from the trailers, else (no gRPC status
    /// at all: a proxy's answer) from the HTTP status.
    async fn exchange(
        &mut self,
        req: http::Request<tonic::body::Body>,
    ) -> Result<Status, Box<dyn std::error::Error + Send + Sync>> {
        std::future::poll_fn(|cx| self.channel.poll_ready(cx)).await?;
        let resp = self.channel.call(req).await?;
        let (parts, body) = resp.into_parts();
        if let Some(st) = Status::from_header_map(&parts.headers) {
            return Ok(st);
        }
        let collected = body.collect().await?;
        if let Some(st) = collected.trailers().and_then(Status::from_header_map) {
            return Ok(st);
        }
        Ok(Status::new(
            from_http(parts.status),
            format!("no grpc-status; HTTP {}", parts.status),
        ))
    }
}

/// One gRPC message: compressed flag, length (big-endian), the bytes.
fn frame(msg: Vec<u8>, gzip: bool) -> Result<Vec<u8>, SendError> {
    let payload = if gzip { gzip_fast(&msg)? } else { msg };
    let len = u32::try_from(payload.len())
        .map_err(|_| SendError::Config(format!("a {}-byte batch", payload.len())))?;
    let mut out = Vec::with_capacity(5 + payload.len());
    out.push(u8::from(gzip));
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// gzip at level 1: deflate went from 14 % to 2.7 % of the span pipeline
/// bench's samples against tonic's level 6 (batches somewhat larger).
fn gzip_fast(body: &[u8]) -> Result<Vec<u8>, SendError> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::fast(),
    );
    enc.write_all(body)
        .map_err(|e| SendError::Config(e.to_string()))?;
    enc.finish().map_err(|e| SendError::Config(e.to_string()))
}

/// gRPC's mapping of an HTTP status without a gRPC one
/// (grpc/doc/http-grpc-status-mapping.md).
fn from_http(status: http::StatusCode) -> Code {
    match status.as_u16() {
        400 => Code::Internal,
        401 => Code::Unauthenticated,
        403 => Code::PermissionDenied,
        404 => Code::Unimplemented,
        429 | 502 | 503 | 504 => Code::Unavailable,
        _ => Code::Unknown,
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
            body = gzip_fast(&body)?;
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
