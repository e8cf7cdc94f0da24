//! The operations endpoint's HTTP server: `/metrics`, `/healthz`, `/readyz`
//! and `/status`. On a DaemonSet with `hostNetwork` every pod on the node
//! can reach it, so it is built for hostile clients: a cap on connections,
//! a deadline for the request head and for the whole connection, small
//! buffers, and `/status` (the node's interfaces) only for callers on the
//! node itself.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{server::conn::http1, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tracing::{debug, info};

use crate::metrics::{counter, Ops, Snapshot};

/// Connections served at once (Prometheus, kubelet's probes and an
/// operator need a handful), and from one address: more are closed at
/// once, counted, so one pod cannot take the slots Prometheus needs.
pub const MAX_CONNECTIONS: usize = 32;
pub const MAX_PER_ADDRESS: usize = 4;
/// A request head must arrive within this.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// No connection lives longer (keep-alive included).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(30);
/// hyper's smallest read buffer: a request head must fit.
const MAX_BUF: usize = 8192;

static REFUSED: AtomicU64 = AtomicU64::new(0);
static CUT: AtomicU64 = AtomicU64::new(0);
static STATUS_DENIED: AtomicU64 = AtomicU64::new(0);

/// This server's counters, appended to `/metrics`.
pub fn render(out: &mut String) {
    let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
    counter(
        out,
        "ops_connections_refused_total",
        "Operations endpoint connections closed at once: too many open.",
        l(&REFUSED),
    );
    counter(
        out,
        "ops_connections_cut_total",
        "Operations endpoint connections closed for a slow head or their lifetime.",
        l(&CUT),
    );
    counter(
        out,
        "ops_status_denied_total",
        "/status requests refused: not from the node itself.",
        l(&STATUS_DENIED),
    );
}

fn text(status: StatusCode, ctype: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static(ctype),
    );
    r
}

/// Whether the caller is on this node: loopback, or the node's own address
/// (a connection from the address it arrived at). A pod's address is not.
fn on_node(peer: IpAddr, local: IpAddr) -> bool {
    peer.is_loopback() || peer == local || peer.to_canonical().is_loopback()
}

fn route(ops: &Ops, path: &str, local_caller: bool) -> Response<Full<Bytes>> {
    match path {
        "/metrics" => text(StatusCode::OK, "text/plain; version=0.0.4", ops.render()),
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" if ops.ready() => text(StatusCode::OK, "text/plain", "ready\n".into()),
        "/readyz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready\n".into(),
        ),
        "/status" if local_caller => text(StatusCode::OK, "application/json", ops.status_json()),
        "/status" => {
            STATUS_DENIED.fetch_add(1, Ordering::Relaxed);
            text(
                StatusCode::FORBIDDEN,
                "text/plain",
                "/status is served to the node only\n".into(),
            )
        }
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// Open connections per client address; a slot is given back on drop.
#[derive(Default)]
struct Slots(Mutex<HashMap<IpAddr, usize>>);

struct Slot(Arc<Slots>, IpAddr);

impl Slots {
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let mut m = self.0.lock().expect("slots lock");
        let total: usize = m.values().sum();
        let n = m.entry(ip).or_default();
        if total >= MAX_CONNECTIONS || *n >= MAX_PER_ADDRESS {
            return None;
        }
        *n += 1;
        Some(Slot(self.clone(), ip))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = self.0 .0.lock().expect("slots lock");
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

/// Serves the operations endpoint until the process exits.
pub async fn serve(addr: SocketAddr, ops: Arc<Ops>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    info!(addr = %listener.local_addr()?, "metrics, health and status endpoint ready");
    let slots = Arc::new(Slots::default());
    loop {
        let (stream, peer) = listener.accept().await?;
        let Some(permit) = slots.take(peer.ip()) else {
            REFUSED.fetch_add(1, Ordering::Relaxed);
            drop(stream);
            continue;
        };
        let local = stream.local_addr().map(|a| a.ip()).unwrap_or(addr.ip());
        let local_caller = on_node(peer.ip(), local);
        let ops = ops.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let r = route(&ops, req.uri().path(), local_caller);
                async move { Ok::<_, std::convert::Infallible>(r) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .max_buf_size(MAX_BUF)
                .serve_connection(TokioIo::new(stream), svc);
            match tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    if e.is_timeout() {
                        CUT.fetch_add(1, Ordering::Relaxed);
                    }
                    debug!("metrics connection: {e}");
                }
                Err(_) => {
                    CUT.fetch_add(1, Ordering::Relaxed);
                }
            }
            drop(permit);
        });
    }
}

/// `tagflow status`: fetch /status and print it readably.
pub async fn fetch_status(addr: SocketAddr) -> Result<Snapshot, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("agent at {addr}: {e}"))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::get("/status")
        .header("host", addr.to_string())
        .body(http_body_util::Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("agent at {addr} answered {}", resp.status()));
    }
    use http_body_util::BodyExt;
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    serde_json::from_slice(&body).map_err(|e| format!("bad /status reply: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_for_the_node_only() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(on_node(ip("127.0.0.1"), ip("127.0.0.1")));
        assert!(on_node(ip("::1"), ip("::1")));
        assert!(on_node(ip("::ffff:127.0.0.1"), ip("::")));
        assert!(
            on_node(ip("10.0.0.5"), ip("10.0.0.5")),
            "the node's own address"
        );
        assert!(!on_node(ip("10.244.1.7"), ip("10.0.0.5")), "a pod");
    }

    #[test]
    fn one_address_cannot_take_every_slot() {
        let s = Arc::new(Slots::default());
        let (pod, prometheus): (IpAddr, IpAddr) =
            ("10.244.1.7".parse().unwrap(), "10.0.0.9".parse().unwrap());
        let held: Vec<Slot> = (0..MAX_PER_ADDRESS).map_while(|_| s.take(pod)).collect();
        assert_eq!(held.len(), MAX_PER_ADDRESS);
        assert!(s.take(pod).is_none());
        assert!(s.take(prometheus).is_some(), "another client still gets in");
        drop(held);
        assert!(s.take(pod).is_some(), "slots come back");
    }
}
