//! The sidecar's counters and the endpoint that serves them to Prometheus
//! (`tagflow sidecar --metrics`): what it did, and every request it had to
//! pass on without telling the agent or without reaching the app.
use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{server::conn::http1, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::{debug, info};

use crate::metrics::counter;

#[derive(Default, Debug)]
pub struct SidecarStats {
    pub requests: AtomicU64,
    pub ids_kept: AtomicU64,
    pub ids_generated: AtomicU64,
    pub traceparents_created: AtomicU64,
    pub registrations_failed: AtomicU64,
    pub upstream_errors: AtomicU64,
    /// HTTP/1.1 requests that asked to upgrade to h2c and went on as
    /// HTTP/1.1.
    pub h2c_upgrades_declined: AtomicU64,
}

impl SidecarStats {
    /// Prometheus text, `tagflow_sidecar_*`.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        for (name, help, v) in [
            (
                "sidecar_requests_total",
                "Requests (HTTP/2 streams) proxied, answered or not.",
                l(&self.requests),
            ),
            (
                "sidecar_ids_kept_total",
                "Requests whose valid x-request-id was kept.",
                l(&self.ids_kept),
            ),
            (
                "sidecar_ids_generated_total",
                "Requests given a new x-request-id (none, or an invalid one).",
                l(&self.ids_generated),
            ),
            (
                "sidecar_traceparents_created_total",
                "Requests given a traceparent (none, or an invalid one).",
                l(&self.traceparents_created),
            ),
            (
                "sidecar_registrations_failed_total",
                "Registrations that failed: a BEGIN (the request passed on without one) or an END (not sent, or refused); agent unreachable, slow or refusing. --register only.",
                l(&self.registrations_failed),
            ),
            (
                "sidecar_upstream_errors_total",
                "Requests answered 502: the app could not be reached or broke the connection.",
                l(&self.upstream_errors),
            ),
            (
                "sidecar_h2c_upgrades_declined_total",
                "HTTP/1.1 requests that offered an h2c upgrade and went on as HTTP/1.1.",
                l(&self.h2c_upgrades_declined),
            ),
        ] {
            counter(&mut out, name, help, v);
        }
        out
    }
}

/// A scraper gets this long per connection: the endpoint never holds up
/// the proxy's event loop.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `GET /metrics` on `listener` until the process ends.
pub async fn serve(listener: TcpListener, stats: Arc<SidecarStats>) -> std::io::Result<()> {
    info!(addr = %listener.local_addr()?, "sidecar metrics ready");
    loop {
        let (stream, _) = listener.accept().await?;
        let stats = stats.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                let r = if req.uri().path() == "/metrics" {
                    let mut r = Response::new(Full::new(Bytes::from(stats.render())));
                    r.headers_mut().insert(
                        "content-type",
                        hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
                    );
                    r
                } else {
                    let mut r = Response::new(Full::new(Bytes::from_static(b"not found\n")));
                    *r.status_mut() = StatusCode::NOT_FOUND;
                    r
                };
                async move { Ok::<_, std::convert::Infallible>(r) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(SCRAPE_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc);
            if let Ok(Err(e)) = tokio::time::timeout(SCRAPE_TIMEOUT, conn).await {
                debug!("sidecar metrics connection: {e}");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_counter_is_rendered_with_its_value() {
        let s = SidecarStats::default();
        s.upstream_errors.fetch_add(3, Ordering::Relaxed);
        let text = s.render();
        assert!(text.contains("\ntagflow_sidecar_upstream_errors_total 3\n"));
        assert_eq!(text.matches("# TYPE tagflow_sidecar_").count(), 7);
    }
}
