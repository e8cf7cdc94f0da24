//! HTTP/1.1 downstream connections: one request at a time, each connection
//! with its own upstream connection (no shared pool on the hot path),
//! which goes to the pool when the downstream connection ends.
use std::{
    net::SocketAddr,
    sync::{atomic::Ordering, Arc},
};

use hyper::{
    body::Incoming,
    client::conn::http1::SendRequest,
    header::{HeaderValue, CONNECTION, UPGRADE},
    server::conn::http1,
    service::service_fn,
    Request, Response,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tracing::debug;

use super::{
    request::{no_upstream, respond, stamp},
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
        Err(e) => return no_upstream(&s, &req, &e),
    };
    decline_h2c_upgrade(&s, &mut req);
    let st = stamp(&s, &mut req, up_local, (local, peer)).await;
    let result = sender.send_request(req).await;
    // The next request on this connection reuses it (`ready` waits until
    // this response's body is through).
    *slot.lock().expect("slot lock") = Some((sender, up_local));
    respond(&s, st, result)
}

/// An `Upgrade: h2c` request goes on as HTTP/1.1: the upgrade is taken off
/// (a server may ignore it, RFC 9110 §7.8; RFC 9113 deprecates h2c
/// upgrades). Clients that want HTTP/2 without TLS speak it from the
/// first byte, which `http2.rs` serves.
fn decline_h2c_upgrade(s: &Shared, req: &mut Request<Incoming>) {
    let h2c = req
        .headers()
        .get_all(UPGRADE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("h2c")));
    if !h2c {
        return;
    }
    s.stats
        .h2c_upgrades_declined
        .fetch_add(1, Ordering::Relaxed);
    let h = req.headers_mut();
    h.remove(UPGRADE);
    h.remove("http2-settings");
    let rest: Vec<String> = h
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| {
            !t.is_empty()
                && !t.eq_ignore_ascii_case("upgrade")
                && !t.eq_ignore_ascii_case("http2-settings")
        })
        .map(str::to_string)
        .collect();
    h.remove(CONNECTION);
    if !rest.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&rest.join(", ")) {
            h.insert(CONNECTION, v);
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
