//! `tagflow sidecar` over HTTP/2 (h2c with prior knowledge) and its HTTP/1.1
//! answer to an h2c upgrade, against upstreams in this process (no agent:
//! the sidecar proxies anyway). Streams in flight at once each keep or get
//! their own id; trailers pass; a reset stream does not stop the others.
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::{
    body::{Frame, Incoming},
    service::service_fn,
    HeaderMap, Request, Response,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tagflow::{
    ids,
    sidecar::{self, SidecarConfig, SidecarStats},
};
use tokio::net::TcpListener;

/// What the upstream saw of each request: its headers.
type Seen = Arc<Mutex<Vec<HeaderMap>>>;

/// An upstream answering every request with its `x-request-id` as body
/// and `grpc-status: 0` as trailer, after `delay` for paths under /slow.
async fn upstream(h2: bool, seen: Seen) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            let seen = seen.clone();
            let svc = service_fn(move |req: Request<Incoming>| {
                let seen = seen.clone();
                async move {
                    seen.lock().unwrap().push(req.headers().clone());
                    if req.uri().path().starts_with("/slow") {
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    let rid = req
                        .headers()
                        .get("x-request-id")
                        .map(|v| v.as_bytes().to_vec())
                        .unwrap_or_default();
                    let mut trailers = HeaderMap::new();
                    trailers.insert("grpc-status", "0".parse().unwrap());
                    let frames = vec![
                        Ok::<_, Infallible>(Frame::data(Bytes::from(rid))),
                        Ok(Frame::trailers(trailers)),
                    ];
                    Ok::<_, Infallible>(Response::new(StreamBody::new(futures_util::stream::iter(
                        frames,
                    ))))
                }
            });
            tokio::spawn(async move {
                let io = TokioIo::new(s);
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, svc)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                }
            });
        }
    });
    addr
}

async fn sidecar(up: SocketAddr) -> (SocketAddr, Arc<SidecarStats>) {
    let cfg = SidecarConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        up,
        "/nonexistent/tagflow.sock".into(),
    );
    let stats = Arc::new(SidecarStats::default());
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(sidecar::run(
        cfg,
        stats.clone(),
        Some(tx),
        std::future::pending(),
    ));
    (rx.await.unwrap(), stats)
}

#[tokio::test]
async fn streams_in_flight_each_keep_or_get_their_own_id_and_trailers_pass() {
    let seen = Seen::default();
    let up = upstream(true, seen.clone()).await;
    let (addr, stats) = sidecar(up).await;
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .unwrap();
    tokio::spawn(conn);
    // 32 streams at once on one connection: half bring an id.
    let answered = Arc::new(AtomicUsize::new(0));
    let mut calls = Vec::new();
    for i in 0..32 {
        let mut sender = sender.clone();
        let answered = answered.clone();
        calls.push(tokio::spawn(async move {
            let mut b = Request::post(format!("http://svc/shop.Cart/Add{i}"))
                .header("content-type", "application/grpc");
            if i % 2 == 0 {
                b = b.header("x-request-id", format!("client-{i}"));
            }
            sender.ready().await.unwrap();
            let resp = sender
                .send_request(b.body(Full::new(Bytes::from_static(b"hi"))).unwrap())
                .await
                .unwrap();
            let rid = resp.headers()["x-request-id"].to_str().unwrap().to_string();
            let body = resp.into_body().collect().await.unwrap();
            let trailers = body.trailers().cloned().expect("trailers passed on");
            assert_eq!(trailers["grpc-status"], "0");
            // The upstream got the same id the client was answered with.
            assert_eq!(body.to_bytes(), Bytes::from(rid.clone()));
            answered.fetch_add(1, Ordering::Relaxed);
            (i, rid)
        }));
    }
    let mut ids_seen = std::collections::HashSet::new();
    for c in calls {
        let (i, rid) = c.await.unwrap();
        if i % 2 == 0 {
            assert_eq!(rid, format!("client-{i}"), "an id that came is kept");
        } else {
            assert!(ids::validate_request_id(&rid).is_ok());
        }
        assert!(ids_seen.insert(rid), "every stream its own id");
    }
    assert_eq!(answered.load(Ordering::Relaxed), 32);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 32);
    for h in seen.iter() {
        let tp = h["traceparent"].to_str().unwrap();
        let (trace, _, _) = ids::parse_traceparent(tp).expect("a valid traceparent");
        let rid = h["x-request-id"].to_str().unwrap();
        assert_eq!(trace, ids::map_request_id(rid).unwrap().0);
    }
    assert_eq!(stats.ids_kept.load(Ordering::Relaxed), 16);
    assert_eq!(stats.ids_generated.load(Ordering::Relaxed), 16);
}

#[tokio::test]
async fn a_reset_stream_leaves_the_others_on_the_connection() {
    let seen = Seen::default();
    let up = upstream(true, seen.clone()).await;
    let (addr, _) = sidecar(up).await;
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = |path: &str| {
        Request::get(format!("http://svc{path}"))
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    // A slow call given up by its client (its stream reset), then another.
    let mut s1 = sender.clone();
    let slow = tokio::spawn(async move { s1.send_request(req("/slow")).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    slow.abort();
    let mut s2 = sender.clone();
    let resp = tokio::time::timeout(Duration::from_secs(5), s2.send_request(req("/fast")))
        .await
        .expect("answered")
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("x-request-id"));
}

#[tokio::test]
async fn an_h2c_upgrade_goes_on_as_http_1_1() {
    let seen = Seen::default();
    let up = upstream(false, seen.clone()).await;
    let (addr, stats) = sidecar(up).await;
    let s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get("/")
        .header("host", "svc")
        .header("connection", "Upgrade, HTTP2-Settings, keep-alive")
        .header("upgrade", "h2c")
        .header("http2-settings", "AAMAAABkAAQAoAAAAAIAAAAA")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200, "answered in HTTP/1.1, not 101");
    assert!(resp.headers().contains_key("x-request-id"));
    let seen = seen.lock().unwrap();
    let h = &seen[0];
    assert!(h.get("upgrade").is_none() && h.get("http2-settings").is_none());
    assert_eq!(h["connection"], "keep-alive");
    assert_eq!(stats.h2c_upgrades_declined.load(Ordering::Relaxed), 1);
}

/// The `tagflow sidecar` binary serves its counters: a request the app
/// cannot take (nothing listens upstream) is answered 502 and counted.
#[tokio::test]
async fn the_binary_serves_its_counters_for_prometheus() {
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let (listen, metrics, dead) = (free(), free(), free());
    /// Killed however the test ends.
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _child = Killed(
        std::process::Command::new(env!("CARGO_BIN_EXE_tagflow"))
            .args(["sidecar", "--listen", &listen.to_string()])
            .args(["--upstream", &dead.to_string()])
            .args(["--metrics", &metrics.to_string()])
            .args(["--agent-socket", "/nonexistent/tagflow.sock"])
            .spawn()
            .unwrap(),
    );
    let get = |addr: SocketAddr, path: &'static str| async move {
        let s = tokio::net::TcpStream::connect(addr).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(conn);
        let req = Request::get(path)
            .header("host", "svc")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = sender
            .send_request(req)
            .await
            .map_err(std::io::Error::other)?;
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Ok::<_, std::io::Error>((status, String::from_utf8_lossy(&body).into_owned()))
    };
    let mut tries = 0;
    let (status, _) = loop {
        match get(listen, "/").await {
            Ok(r) => break r,
            Err(_) if tries < 100 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("the sidecar never answered: {e}"),
        }
    };
    assert_eq!(status, 502);
    let (status, text) = get(metrics, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    assert!(
        text.contains("\ntagflow_sidecar_upstream_errors_total 1\n"),
        "{text}"
    );
    assert!(
        text.contains("\ntagflow_sidecar_requests_total 1\n"),
        "{text}"
    );
    assert!(
        text.contains("\ntagflow_sidecar_ids_generated_total 1\n"),
        "{text}"
    );
}
