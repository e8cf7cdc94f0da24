//! `tagflow sidecar`: an HTTP/1.1 and HTTP/2 (h2c, gRPC) reverse proxy
//! beside the app in its pod. A connection that opens with the HTTP/2
//! client preface is served as HTTP/2 (`http2.rs`), any other as HTTP/1.x
//! (`http1.rs`); the upstream is spoken to in the same version.
//!
//! Per request (per stream in HTTP/2): keep a valid `x-request-id` or generate a UUIDv4; keep a
//! valid `traceparent` or create one whose trace id is the request id's
//! mapping, so the app and everything downstream propagate the same trace;
//! forward with streaming bodies; echo `x-request-id` on the response.
//!
//! The agent learns the rest from the datapath: the head this proxy sends
//! the app over loopback is captured there, which keys the connection, this
//! proxy and the app (the reader). A minted `traceparent` names as parent
//! the span the agent gives that loopback call (computable by both, see
//! `ids::call_span_id`), so the parent exists. With `register` (agents that
//! cannot capture on the pod's loopback) each request is also registered
//! with the agent: BEGIN for whoever listens on the upstream port plus the
//! exact upstream and downstream connections, END when the response body is
//! done. tagflow never fails a request: if the agent is unreachable the
//! request is proxied anyway and counted.
mod http1;
mod http2;
mod request;
mod stats;

pub use stats::{serve as serve_metrics, SidecarStats};

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{atomic::AtomicU64, Arc},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::{client::conn::http1::SendRequest, header::HeaderName, Response, StatusCode};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{oneshot, Mutex},
};
use tracing::{info, warn};

use crate::sources::client::Client;

const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

#[derive(Debug, Clone)]
pub struct SidecarConfig {
    pub listen: SocketAddr,
    pub upstream: SocketAddr,
    pub agent_socket: PathBuf,
    /// How long a registration may take before the request goes on without.
    pub register_timeout: Duration,
    pub connect_timeout: Duration,
    pub header_timeout: Duration,
    /// Largest request head accepted (hyper's read buffer).
    pub max_header_bytes: usize,
    /// Idle upstream connections kept for reuse.
    pub pool_size: usize,
    /// Register every request with the agent as well.
    pub register: bool,
}

impl SidecarConfig {
    pub fn new(listen: SocketAddr, upstream: SocketAddr, agent_socket: PathBuf) -> Self {
        Self {
            listen,
            upstream,
            agent_socket,
            register_timeout: Duration::from_millis(50),
            connect_timeout: Duration::from_secs(3),
            header_timeout: Duration::from_secs(30),
            max_header_bytes: 64 * 1024,
            pool_size: 64,
            register: false,
        }
    }
}

type Out = BoxBody<Bytes, hyper::Error>;

/// How long a connection may take to send its first request head.
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// The HTTP/2 client preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Agent connections a sidecar keeps: requests in flight register in
/// parallel instead of queueing behind one connection.
const AGENT_CONNECTIONS: usize = 8;

struct Shared {
    cfg: SidecarConfig,
    agent: Vec<Mutex<Client>>,
    next: AtomicU64,
    /// Idle HTTP/1.1 upstream connections.
    pool: Mutex<Vec<(SendRequest<hyper::body::Incoming>, SocketAddr)>>,
    stats: Arc<SidecarStats>,
}

/// Serves until `shutdown` resolves. Returns the bound address via `ready`.
pub async fn run(
    cfg: SidecarConfig,
    stats: Arc<SidecarStats>,
    ready: Option<oneshot::Sender<SocketAddr>>,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(cfg.listen).await?;
    let addr = listener.local_addr()?;
    info!(listen = %addr, upstream = %cfg.upstream, "sidecar ready");
    if let Some(r) = ready {
        let _ = r.send(addr);
    }
    let shared = Arc::new(Shared {
        agent: (0..AGENT_CONNECTIONS)
            .map(|_| Mutex::new(Client::new(cfg.agent_socket.clone(), cfg.register_timeout)))
            .collect(),
        next: AtomicU64::new(0),
        pool: Mutex::new(Vec::new()),
        stats,
        cfg,
    });
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => { warn!("accept: {e}"); continue; }
            },
        };
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().unwrap_or(addr);
        let shared = shared.clone();
        tokio::spawn(async move {
            if is_http2(&stream).await {
                http2::serve(shared, stream, local, peer).await
            } else {
                http1::serve(shared, stream, local, peer).await
            }
        });
    }
}

/// Whether the connection opens with the HTTP/2 preface (looked at, not
/// read). A connection that says nothing for `HEADER_TIMEOUT`, or closes,
/// goes to HTTP/1, which times it out or sees it end.
async fn is_http2(stream: &TcpStream) -> bool {
    let mut buf = [0u8; 24];
    let look = async {
        loop {
            match stream.peek(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) if n >= PREFACE.len() || !PREFACE.starts_with(&buf[..n]) => {
                    return buf[..n] == *PREFACE
                }
                // A prefix of the preface so far: wait for more.
                Ok(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    };
    tokio::time::timeout(HEADER_TIMEOUT, look)
        .await
        .unwrap_or(false)
}

/// A new upstream connection and its local address.
async fn connect(s: &Shared) -> Result<(TcpStream, SocketAddr), String> {
    let stream = tokio::time::timeout(s.cfg.connect_timeout, TcpStream::connect(s.cfg.upstream))
        .await
        .map_err(|_| "connect timeout".to_string())?
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let local = stream.local_addr().map_err(|e| e.to_string())?;
    Ok((stream, local))
}

fn full(status: StatusCode, msg: &'static str) -> Response<Out> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(msg.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r
}
