//! HTTP/2 downstream connections (h2c with prior knowledge: gRPC's way):
//! every stream is a request of its own, stamped and forwarded on one
//! HTTP/2 connection to the upstream that this downstream connection owns
//! (streams, trailers, flow control and resets go through hyper on both
//! sides). The upstream connection is made again if it fails.
use std::{net::SocketAddr, sync::Arc};

use hyper::{
    body::Incoming, client::conn::http2::SendRequest, server::conn::http2, service::service_fn,
    Request, Response,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{net::TcpStream, sync::Mutex};
use tracing::debug;

use super::{
    request::{no_upstream, respond, stamp},
    Out, Shared,
};

/// The upstream connection of one downstream connection: a sender each
/// stream clones.
type Upstream = Arc<Mutex<Option<(SendRequest<Incoming>, SocketAddr)>>>;

pub(super) async fn serve(
    shared: Arc<Shared>,
    stream: TcpStream,
    local: SocketAddr,
    peer: SocketAddr,
) {
    let up: Upstream = Arc::default();
    let svc = service_fn(move |req| {
        let (shared, up) = (shared.clone(), up.clone());
        async move { Ok::<_, std::convert::Infallible>(handle(shared, &up, req, local, peer).await) }
    });
    let mut b = http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .max_header_list_size(64 * 1024)
        .max_concurrent_streams(256);
    if let Err(e) = b.serve_connection(TokioIo::new(stream), svc).await {
        debug!(%peer, "downstream h2 connection: {e}");
    }
}

async fn handle(
    s: Arc<Shared>,
    up: &Upstream,
    mut req: Request<Incoming>,
    local: SocketAddr,
    peer: SocketAddr,
) -> Response<Out> {
    let (mut sender, up_local) = match upstream(&s, up).await {
        Ok(x) => x,
        Err(e) => return no_upstream(&s, &req, &e),
    };
    let st = stamp(&s, &mut req, up_local, (local, peer)).await;
    // A stream slot on the upstream connection (its concurrency limit).
    let result = match sender.ready().await {
        Ok(()) => sender.send_request(req).await,
        Err(e) => Err(e),
    };
    respond(&s, st, result)
}

/// The live upstream connection, or a new one.
async fn upstream(
    s: &Shared,
    up: &Upstream,
) -> Result<(SendRequest<Incoming>, SocketAddr), String> {
    let mut g = up.lock().await;
    if let Some((c, local)) = g.as_ref() {
        if !c.is_closed() {
            return Ok((c.clone(), *local));
        }
    }
    let (stream, local) = super::connect(s).await?;
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!("upstream h2 connection: {e}");
        }
    });
    *g = Some((sender.clone(), local));
    Ok((sender, local))
}
