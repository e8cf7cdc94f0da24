//! OTLP over TLS against receivers with a test CA: gRPC with a client
//! certificate (mTLS) and OTLP/HTTP, each refusing what it must refuse (a
//! server signed by another CA, a client without its certificate).
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
};

use opentelemetry_proto::tonic::collector::trace::v1::{
    trace_service_server::{TraceService, TraceServiceServer},
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use tagflow::{
    export::{tls::TlsFiles, ExportConfig, Protocol, SendError, Sink},
    spans::{Resource, SpanKind, SpanRecord},
};
use tonic::transport::{server::TcpIncoming, Certificate, Identity, Server, ServerTlsConfig};

/// A CA and what it signed, written as PEM files in a directory.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("tagflow-tls-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        for (name, sans) in [
            (
                "server",
                vec!["localhost".to_string(), "127.0.0.1".to_string()],
            ),
            ("client", vec!["tagflow-agent".to_string()]),
        ] {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(sans)
                .unwrap()
                .signed_by(&key, &ca)
                .unwrap();
            std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
            std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
        }
        Self { dir }
    }

    fn path(&self, f: &str) -> PathBuf {
        self.dir.join(f)
    }

    fn read(&self, f: &str) -> Vec<u8> {
        std::fs::read(self.path(f)).unwrap()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn span() -> SpanRecord {
    SpanRecord {
        trace_id: [7; 16],
        span_id: [1; 8],
        parent_span_id: None,
        parent_is_remote: false,
        name: "GET".into(),
        kind: SpanKind::Server,
        start_unix_ns: 1,
        end_unix_ns: 2,
        attributes: Default::default(),
        resource: Arc::new(Resource::default()),
        error: false,
    }
}

fn config(endpoint: String, protocol: Protocol, tls: TlsFiles) -> ExportConfig {
    ExportConfig {
        endpoint: Some(endpoint),
        protocol,
        gzip: false,
        timeout_ms: 3000,
        tls,
        ..ExportConfig::default()
    }
}

#[derive(Clone, Default)]
struct Count(Arc<AtomicUsize>);

#[tonic::async_trait]
impl TraceService for Count {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let n: usize = req
            .into_inner()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.0.fetch_add(n, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// A gRPC receiver that wants a client certificate signed by `pki`'s CA.
async fn grpc_receiver(pki: &Pki) -> (SocketAddr, Count) {
    let count = Count::default();
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            pki.read("server.pem"),
            pki.read("server.key"),
        ))
        .client_ca_root(Certificate::from_pem(pki.read("ca.pem")));
    let incoming = TcpIncoming::bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = incoming.local_addr().unwrap();
    let svc = TraceServiceServer::new(count.clone());
    let server = Server::builder().tls_config(tls).unwrap().add_service(svc);
    tokio::spawn(server.serve_with_incoming(incoming));
    (addr, count)
}

/// An OTLP/HTTP receiver over TLS (rustls directly, hyper on top).
async fn http_receiver(pki: &Pki) -> (SocketAddr, Count) {
    use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_file_iter(pki.path("server.pem"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(pki.path("server.key")).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Count::default();
    let c = count.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (acceptor, c) = (acceptor.clone(), c.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let c = c.clone();
                        async move {
                            use http_body_util::BodyExt;
                            assert_eq!(req.uri().path(), "/v1/traces");
                            let body = req.into_body().collect().await.unwrap().to_bytes();
                            let r = ExportTraceServiceRequest::decode(body).unwrap();
                            c.0.fetch_add(
                                r.resource_spans[0].scope_spans[0].spans.len(),
                                Ordering::Relaxed,
                            );
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(bytes::Bytes::new()),
                            ))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, count)
}

fn files(pki: &Pki, ca: &Path, client: bool) -> TlsFiles {
    TlsFiles {
        certificate: Some(ca.into()),
        client_certificate: client.then(|| pki.path("client.pem")),
        client_key: client.then(|| pki.path("client.key")),
    }
}

#[tokio::test]
async fn grpc_over_mtls_exports_and_refuses_without_the_client_certificate() {
    let pki = Pki::new("grpc");
    let (addr, count) = grpc_receiver(&pki).await;
    let endpoint = format!("https://localhost:{}", addr.port());
    let ca = pki.path("ca.pem");
    let mut sink = Sink::from_config(&config(
        endpoint.clone(),
        Protocol::Grpc,
        files(&pki, &ca, true),
    ))
    .unwrap();
    sink.send(&[span(), span()]).await.unwrap();
    assert_eq!(count.0.load(Ordering::Relaxed), 2);
    // No client certificate: the collector refuses the handshake.
    let mut anonymous =
        Sink::from_config(&config(endpoint, Protocol::Grpc, files(&pki, &ca, false))).unwrap();
    let e = anonymous.send(&[span()]).await.unwrap_err();
    assert!(matches!(e, SendError::Remote { .. }), "{e}");
    assert_eq!(count.0.load(Ordering::Relaxed), 2, "nothing got through");
}

#[tokio::test]
async fn http_over_tls_exports_and_refuses_a_server_another_ca_signed() {
    let pki = Pki::new("http");
    let (addr, count) = http_receiver(&pki).await;
    let endpoint = format!("https://localhost:{}/v1/traces", addr.port());
    let ca = pki.path("ca.pem");
    let mut sink = Sink::from_config(&config(
        endpoint.clone(),
        Protocol::HttpProtobuf,
        files(&pki, &ca, false),
    ))
    .unwrap();
    sink.send(&[span(), span(), span()]).await.unwrap();
    assert_eq!(count.0.load(Ordering::Relaxed), 3);
    // Trusting another CA: the server's certificate does not verify.
    let other = Pki::new("other");
    let other_ca = other.path("ca.pem");
    let mut wrong = Sink::from_config(&config(
        endpoint,
        Protocol::HttpProtobuf,
        files(&other, &other_ca, false),
    ))
    .unwrap();
    let e = wrong.send(&[span()]).await.unwrap_err();
    assert!(
        tagflow::report(&e).contains("TLS"),
        "{}",
        tagflow::report(&e)
    );
    assert_eq!(count.0.load(Ordering::Relaxed), 3);
}

#[test]
fn the_standard_variables_configure_tls() {
    let mut cfg = ExportConfig::default();
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4317"),
        ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/etc/otel/ca.pem"),
        (
            "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
            "/etc/otel/c.pem",
        ),
        ("OTEL_EXPORTER_OTLP_CLIENT_KEY", "/etc/otel/c.key"),
        ("OTEL_EXPORTER_OTLP_INSECURE", "false"),
    ];
    cfg.apply_env(|k| {
        env.iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.to_string())
    });
    assert_eq!(cfg.tls.certificate, Some("/etc/otel/ca.pem".into()));
    assert_eq!(cfg.tls.client_certificate, Some("/etc/otel/c.pem".into()));
    assert_eq!(cfg.tls.client_key, Some("/etc/otel/c.key".into()));
    assert!(!cfg.insecure);
    // Refused at start, clearly: a CA file that is not there (the bare
    // endpoint became https), then a client certificate without its key.
    let e = Sink::from_config(&cfg).err().expect("refused");
    let m = tagflow::report(&e);
    assert!(
        m.contains("https://collector:4317") && m.contains("/etc/otel/ca.pem"),
        "{m}"
    );
    cfg.tls.certificate = None;
    cfg.tls.client_key = None;
    let e = Sink::from_config(&cfg).err().expect("refused");
    assert!(tagflow::report(&e).contains("needs its key"), "{e}");
}
