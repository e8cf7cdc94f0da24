//! What the sidecar does to every request, whatever its HTTP version: keep
//! or create `x-request-id` and `traceparent`, register it with the agent
//! when asked to, and answer with the id.
use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{atomic::Ordering, Arc},
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::{
    body::{Body, Frame, Incoming},
    header::HeaderValue,
    Request, Response, StatusCode,
};
use tokio::sync::oneshot;
use tracing::{debug, warn};

use super::{full, Out, Shared, TRACEPARENT, X_REQUEST_ID};
use crate::{
    ids,
    sources::protocol::{Flow, Proto, Registration, Target},
};

/// A request on its way upstream, its ids in place.
pub(super) struct Stamped {
    pub rid: HeaderValue,
    /// The agent connection that took its BEGIN, and what it registered.
    registered: Option<(usize, Registration)>,
}

/// Keeps a valid `x-request-id` or makes one; keeps a valid `traceparent`
/// or mints one whose parent is the span the agent gives the call on
/// `up_local` → upstream; registers the request when configured.
pub(super) async fn stamp(
    s: &Arc<Shared>,
    req: &mut Request<Incoming>,
    up_local: SocketAddr,
    downstream: (SocketAddr, SocketAddr),
) -> Stamped {
    s.stats.requests.fetch_add(1, Ordering::Relaxed);
    let rid = request_id(s, req);
    let rid_value = HeaderValue::from_str(&rid).expect("printable ASCII");
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
    let registered = if s.cfg.register {
        begin(s, &rid, tp, minted, up_local, downstream).await
    } else {
        None
    };
    Stamped {
        rid: rid_value,
        registered,
    }
}

/// A request id that was refused or never sent is replaced.
fn request_id(s: &Shared, req: &Request<Incoming>) -> String {
    match req
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
    }
}

/// BEGIN for whoever listens on the upstream port plus both connections.
/// END goes over the same agent connection (the agent pairs them).
async fn begin(
    s: &Arc<Shared>,
    rid: &str,
    tp: String,
    minted: bool,
    up_local: SocketAddr,
    (local, peer): (SocketAddr, SocketAddr),
) -> Option<(usize, Registration)> {
    let reg = Registration {
        headers: registration_headers(rid, tp, minted),
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
    let mut c = s.agent[slot].lock().await;
    let begun = c.begin(reg.clone()).await;
    let late = c.take_late_refusals();
    drop(c);
    s.stats
        .registrations_failed
        .fetch_add(late, Ordering::Relaxed);
    match begun {
        Ok(_) => Some((slot, reg)),
        Err(e) => {
            s.stats.registrations_failed.fetch_add(1, Ordering::Relaxed);
            debug!("registration failed (request proxied anyway): {e}");
            None
        }
    }
}

/// The upstream's answer with the request id on it (END once its body is
/// through), or a 502.
pub(super) fn respond(
    s: &Arc<Shared>,
    st: Stamped,
    result: Result<Response<Incoming>, hyper::Error>,
) -> Response<Out> {
    match result {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            parts.headers.insert(X_REQUEST_ID, st.rid);
            let body = match st.registered {
                Some((agent, reg)) => {
                    // END once the response body is finished (or dropped).
                    let (done_tx, done_rx) = oneshot::channel::<()>();
                    let s2 = s.clone();
                    tokio::spawn(async move {
                        let _ = done_rx.await;
                        // Not awaited: the client slot is free for the
                        // next BEGIN a round trip sooner.
                        let mut c = s2.agent[agent].lock().await;
                        let sent = c.end_unawaited(reg).await;
                        let mut failed = c.take_late_refusals();
                        drop(c);
                        if let Err(e) = sent {
                            failed += 1;
                            debug!("end registration: {e}");
                        }
                        s2.stats
                            .registrations_failed
                            .fetch_add(failed, Ordering::Relaxed);
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
            unavailable(st.rid, "upstream failed\n")
        }
    }
}

/// No upstream connection: a 502 with the request id (counted as a
/// request and an upstream error).
pub(super) fn no_upstream(s: &Shared, req: &Request<Incoming>, e: &str) -> Response<Out> {
    s.stats.requests.fetch_add(1, Ordering::Relaxed);
    s.stats.upstream_errors.fetch_add(1, Ordering::Relaxed);
    warn!("upstream {}: {e}", s.cfg.upstream);
    let rid = HeaderValue::from_str(&request_id(s, req)).expect("printable ASCII");
    unavailable(rid, "upstream unavailable\n")
}

/// A 502 that still carries the request id.
fn unavailable(rid: HeaderValue, msg: &'static str) -> Response<Out> {
    let mut r = full(StatusCode::BAD_GATEWAY, msg);
    r.headers_mut().insert(X_REQUEST_ID, rid);
    r
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
