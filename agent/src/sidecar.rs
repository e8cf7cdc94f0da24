//! `tagflow sidecar`: an HTTP/1.1 reverse proxy beside the app in its pod.
//!
//! Per request: keep a valid `x-request-id` or generate a UUIDv4; keep a
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
use std::{
    net::SocketAddr,
    path::PathBuf,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::{
    body::{Body, Frame, Incoming},
    client::conn::http1::SendRequest,
    header::{HeaderName, HeaderValue},
    server::conn::http1,
    service::service_fn,
    Request, Response, StatusCode,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{oneshot, Mutex},
};
use tracing::{debug, info, warn};

use crate::{
    ids,
    sources::{
        client::Client,
        protocol::{Flow, Proto, Registration, Target},
    },
};

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

#[derive(Default, Debug)]
pub struct SidecarStats {
    pub requests: AtomicU64,
    pub ids_kept: AtomicU64,
    pub ids_generated: AtomicU64,
    pub traceparents_created: AtomicU64,
    pub registrations_failed: AtomicU64,
    pub upstream_errors: AtomicU64,
}

type Out = BoxBody<Bytes, hyper::Error>;

/// A downstream connection's upstream connection, between its requests.
type Slot = Arc<std::sync::Mutex<Option<(SendRequest<Incoming>, SocketAddr)>>>;

/// Agent connections a sidecar keeps: requests in flight register in
/// parallel instead of queueing behind one connection.
const AGENT_CONNECTIONS: usize = 8;

struct Shared {
    cfg: SidecarConfig,
    agent: Vec<Mutex<Client>>,
    next: AtomicU64,
    pool: Mutex<Vec<(SendRequest<Incoming>, SocketAddr)>>,
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
            // HTTP/1 serves one request at a time per connection: each
            // downstream connection keeps its own upstream connection (no
            // shared pool on the hot path); it goes to the pool when the
            // downstream connection ends.
            let slot: Slot = Arc::default();
            let svc = {
                let (shared, slot) = (shared.clone(), slot.clone());
                service_fn(move |req| {
                    let (shared, slot) = (shared.clone(), slot.clone());
                    async move {
                        Ok::<_, std::convert::Infallible>(
                            handle(shared, &slot, req, local, peer).await,
                        )
                    }
                })
            };
            let mut b = http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(shared_header_timeout())
                .max_buf_size(64 * 1024)
                .keep_alive(true);
            if let Err(e) = b.serve_connection(TokioIo::new(stream), svc).await {
                debug!(%peer, "downstream connection: {e}");
            }
            let kept = slot.lock().expect("slot lock").take();
            if let Some((mut c, up_local)) = kept {
                if c.ready().await.is_ok() {
                    let mut pool = shared.pool.lock().await;
                    if pool.len() < shared.cfg.pool_size {
                        pool.push((c, up_local));
                    }
                }
            }
        });
    }
}

fn shared_header_timeout() -> Duration {
    Duration::from_secs(30)
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

async fn handle(
    s: Arc<Shared>,
    slot: &Slot,
    mut req: Request<Incoming>,
    local: SocketAddr,
    peer: SocketAddr,
) -> Response<Out> {
    s.stats.requests.fetch_add(1, Ordering::Relaxed);
    // x-request-id: keep a valid one, else a new UUIDv4.
    let rid = match req
        .headers()
        .get(&X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .map(ids::validate_request_id)
    {
        Some(Ok(v)) => {
            s.stats.ids_kept.fetch_add(1, Ordering::Relaxed);
            v.to_string()
        }
        _ => {
            s.stats.ids_generated.fetch_add(1, Ordering::Relaxed);
            ids::new_uuid()
        }
    };
    let rid_value = HeaderValue::from_str(&rid).expect("printable ASCII");
    let kept = slot.lock().expect("slot lock").take();
    let (mut sender, up_local) = match upstream(&s, kept).await {
        Ok(x) => x,
        Err(e) => {
            s.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
            warn!("upstream {}: {e}", s.cfg.upstream);
            let mut r = full(StatusCode::BAD_GATEWAY, "upstream unavailable\n");
            r.headers_mut().insert(X_REQUEST_ID, rid_value);
            return r;
        }
    };
    let valid_tp = req
        .headers()
        .get(&TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .filter(|v| ids::parse_traceparent(v).is_some())
        .map(str::to_string);
    let minted = valid_tp.is_none();
    let tp = match valid_tp {
        Some(tp) => tp,
        None => {
            s.stats.traceparents_created.fetch_add(1, Ordering::Relaxed);
            let (id, _) = ids::map_request_id(&rid).expect("validated above");
            minted_traceparent(&id, up_local, s.cfg.upstream)
        }
    };
    req.headers_mut().insert(X_REQUEST_ID, rid_value.clone());
    req.headers_mut()
        .insert(TRACEPARENT, HeaderValue::from_str(&tp).expect("ascii"));
    // END goes over the same connection as BEGIN (the agent pairs them).
    let registered = if s.cfg.register {
        let reg = Registration {
            headers: registration_headers(&rid, tp, minted),
            target: Target::Port {
                port: s.cfg.upstream.port(),
                proto: Proto::Tcp,
            },
            flows: vec![
                Flow {
                    proto: Proto::Tcp,
                    local: up_local.to_string(),
                    remote: s.cfg.upstream.to_string(),
                },
                Flow {
                    proto: Proto::Tcp,
                    local: local.to_string(),
                    remote: peer.to_string(),
                },
            ],
            // If this sidecar dies mid-request, its registrations go with it.
            release_on_close: true,
        };
        let slot = s.next.fetch_add(1, Ordering::Relaxed) as usize % s.agent.len();
        match s.agent[slot].lock().await.begin(reg.clone()).await {
            Ok(_) => Some((slot, reg)),
            Err(e) => {
                s.stats.registrations_failed.fetch_add(1, Ordering::Relaxed);
                debug!("registration failed (request proxied anyway): {e}");
                None
            }
        }
    } else {
        None
    };
    let result = sender.send_request(req).await;
    // The next request on this connection reuses it (`ready` waits until
    // this response's body is through).
    *slot.lock().expect("slot lock") = Some((sender, up_local));
    match result {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            parts.headers.insert(X_REQUEST_ID, rid_value);
            let body = match registered {
                Some((agent, reg)) => {
                    // END once the response body is finished (or dropped).
                    let (done_tx, done_rx) = oneshot::channel::<()>();
                    let s2 = s.clone();
                    tokio::spawn(async move {
                        let _ = done_rx.await;
                        if let Err(e) = s2.agent[agent].lock().await.end(reg).await {
                            s2.stats
                                .registrations_failed
                                .fetch_add(1, Ordering::Relaxed);
                            debug!("end registration: {e}");
                        }
                    });
                    Tracked {
                        inner: body,
                        done: Some(done_tx),
                    }
                    .boxed()
                }
                None => body.boxed(),
            };
            Response::from_parts(parts, body)
        }
        Err(e) => {
            s.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
            warn!("upstream request: {e}");
            let mut r = full(StatusCode::BAD_GATEWAY, "upstream failed\n");
            r.headers_mut().insert(X_REQUEST_ID, rid_value);
            r
        }
    }
}

/// The connection's own upstream connection, an idle pooled one, or a new
/// one.
async fn upstream(
    s: &Shared,
    kept: Option<(SendRequest<Incoming>, SocketAddr)>,
) -> Result<(SendRequest<Incoming>, SocketAddr), String> {
    if let Some((mut c, local)) = kept {
        if c.ready().await.is_ok() {
            return Ok((c, local));
        }
    }
    while let Some((mut c, local)) = s.pool.lock().await.pop() {
        if c.ready().await.is_ok() {
            return Ok((c, local));
        }
    }
    let stream = tokio::time::timeout(s.cfg.connect_timeout, TcpStream::connect(s.cfg.upstream))
        .await
        .map_err(|_| "connect timeout".to_string())?
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let local = stream.local_addr().map_err(|e| e.to_string())?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!("upstream connection: {e}");
        }
    });
    Ok((sender, local))
}

/// A response body that says when it is finished or dropped.
struct Tracked {
    inner: Incoming,
    done: Option<oneshot::Sender<()>>,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(r, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            if let Some(d) = self.done.take() {
                let _ = d.send(());
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let Some(d) = self.done.take() {
            let _ = d.send(());
        }
    }
}

/// A `traceparent` for a request that came without one: its parent is the
/// span the agent gives the call on `up_local → upstream` (the loopback
/// leg to the app), which the agent exports.
fn minted_traceparent(trace_id: &[u8; 16], up_local: SocketAddr, upstream: SocketAddr) -> String {
    let conn = agent_common::FlowKey::new(0, agent_common::PROTO_TCP, up_local, upstream);
    let span = ids::call_span_id(trace_id, &conn);
    format!("00-{}-{}-01", ids::to_hex(trace_id), ids::to_hex(&span))
}

/// What the sidecar registers (without loopback capture). The agent then
/// never sees the loopback call's head, so it does not give that call the
/// computed span id: a minted `traceparent`'s parent would be a span
/// nobody exports. The request id alone gives the same trace id.
fn registration_headers(
    rid: &str,
    traceparent: String,
    minted: bool,
) -> std::collections::BTreeMap<String, String> {
    let mut h = std::collections::BTreeMap::from([("x-request-id".to_string(), rid.to_string())]);
    if !minted {
        h.insert("traceparent".to_string(), traceparent);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minted_traceparent_is_not_registered_as_a_parent() {
        let rid = "0af7651916cd43dd8448eb211c80319c";
        let (id, _) = ids::map_request_id(rid).unwrap();
        let minted = ids::new_traceparent(&id);
        let h = registration_headers(rid, minted.clone(), true);
        let got = ids::identify(
            h.get("x-request-id").map(String::as_str),
            h.get("traceparent").map(String::as_str),
        )
        .unwrap();
        assert_eq!(got.parent_span_id, None, "no parent claimed");
        assert_eq!(
            ids::parse_traceparent(&minted).unwrap().0,
            got.trace_id,
            "the same trace id the minted header carries downstream"
        );
        let given = registration_headers(rid, minted, false);
        let got = ids::identify(
            given.get("x-request-id").map(String::as_str),
            given.get("traceparent").map(String::as_str),
        )
        .unwrap();
        assert!(
            got.parent_span_id.is_some(),
            "a caller's traceparent is kept"
        );
    }
}
