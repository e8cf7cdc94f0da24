//! HTTP/1.1 downstream connections: one request at a time, each connection
//! with its own upstream connection (no shared pool on the hot path),
//! which goes to the pool when the downstream connection ends.
use std::{
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
};

use hyper::{
    body::Incoming, client::conn::http1::SendRequest, header::HeaderValue, server::conn::http1,
    service::service_fn, Request, Response,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::{
    request::{request_id, respond, stamp, unavailable},
    Out, Shared, HEADER_TIMEOUT,
};

/// A downstream connection's upstream connection, between its requests.
type Slot = Arc<std::sync::Mutex<Option<(SendRequest<Incoming>, SocketAddr)>>>;

pub(super) async fn serve(
    shared: Arc<Shared>,
    stream: TcpStream,
    local: SocketAddr,
    peer: SocketAddr,
) {
    let slot: Slot = Arc::default();
    let svc = {
        let (shared, slot) = (shared.clone(), slot.clone());
        service_fn(move |req| {
            let (shared, slot) = (shared.clone(), slot.clone());
            async move {
                Ok::<_, std::convert::Infallible>(handle(shared, &slot, req, local, peer).await)
            }
        })
    };
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
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
}

async fn handle(
    s: Arc<Shared>,
    slot: &Slot,
    mut req: Request<Incoming>,
    local: SocketAddr,
    peer: SocketAddr,
) -> Response<Out> {
    let kept = slot.lock().expect("slot lock").take();
    let (mut sender, up_local) = match upstream(&s, kept).await {
        Ok(x) => x,
        Err(e) => {
            s.stats.requests.fetch_add(1, Ordering::Relaxed);
            s.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
            warn!("upstream {}: {e}", s.cfg.upstream);
            let rid = HeaderValue::from_str(&request_id(&s, &req)).expect("printable ASCII");
            return unavailable(rid, "upstream unavailable\n");
        }
    };
    let st = stamp(&s, &mut req, up_local, (local, peer)).await;
    let result = sender.send_request(req).await;
    // The next request on this connection reuses it (`ready` waits until
    // this response's body is through).
    *slot.lock().expect("slot lock") = Some((sender, up_local));
    respond(&s, st, result)
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
    let (stream, local) = super::connect(s).await?;
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
