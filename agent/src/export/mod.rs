//! Span export: a bounded queue in front of one sink (stdout JSON lines,
//! OTLP/gRPC or OTLP/HTTP-protobuf). Up to `IN_FLIGHT` batches are sent at
//! once to a collector, so encoding and compressing one batch overlaps the
//! collector's work on the last. When the collector is unreachable the
//! batches are retried with backoff while new spans queue up to the
//! bound; beyond it they are dropped and counted. Nothing here can block
//! the agent's event loop.
pub mod encode;
pub mod otlp;
pub mod stdout;
pub mod tls;

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::{sync::mpsc, task::JoinSet};
use tracing::{debug, warn};

use crate::spans::SpanRecord;

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("exporter configuration: {0}")]
    Config(String),
    #[error("collector: {message}")]
    Remote {
        retry: bool,
        /// How long the collector asked us to wait (Retry-After).
        after: Option<Duration>,
        message: String,
    },
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Protocol {
    #[default]
    #[serde(rename = "grpc")]
    #[value(name = "grpc")]
    Grpc,
    #[serde(rename = "http/protobuf")]
    #[value(name = "http/protobuf")]
    HttpProtobuf,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExportConfig {
    /// OTLP endpoint; none = JSON lines on stdout.
    pub endpoint: Option<String>,
    pub protocol: Protocol,
    pub headers: Vec<(String, String)>,
    pub gzip: bool,
    pub timeout_ms: u64,
    /// Spans waiting for export, at most.
    pub queue: usize,
    pub batch: usize,
    pub batch_delay_ms: u64,
    /// How long shutdown waits for the queue to drain.
    pub shutdown_ms: u64,
    /// CA and client identity for `https://` endpoints.
    pub tls: tls::TlsFiles,
    /// An endpoint given without a scheme is plain http (gRPC), not https.
    pub insecure: bool,
}

impl Default for ExportConfig {
    fn default() -> Self {
        Self {
            endpoint: None,
            protocol: Protocol::Grpc,
            headers: Vec::new(),
            gzip: true,
            timeout_ms: 10_000,
            queue: 2048,
            batch: 512,
            batch_delay_ms: 1000,
            shutdown_ms: 15_000,
            tls: tls::TlsFiles::default(),
            insecure: false,
        }
    }
}

impl ExportConfig {
    /// Applies the standard `OTEL_EXPORTER_OTLP_*` variables (the
    /// `_TRACES_` forms win). Flags applied afterwards override these.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) {
        let var = |name: &str| {
            get(&format!("OTEL_EXPORTER_OTLP_TRACES_{name}"))
                .or_else(|| get(&format!("OTEL_EXPORTER_OTLP_{name}")))
        };
        if let Some(p) = var("PROTOCOL") {
            match p.trim() {
                "grpc" => self.protocol = Protocol::Grpc,
                "http/protobuf" => self.protocol = Protocol::HttpProtobuf,
                other => warn!(
                    "OTEL_EXPORTER_OTLP_PROTOCOL={other} not supported; using {:?}",
                    self.protocol
                ),
            }
        }
        if let Some(e) = get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            // The signal-specific endpoint is used as given.
            self.endpoint = Some(e);
        } else if let Some(e) = get("OTEL_EXPORTER_OTLP_ENDPOINT") {
            self.endpoint = Some(match self.protocol {
                Protocol::HttpProtobuf => format!("{}/v1/traces", e.trim_end_matches('/')),
                Protocol::Grpc => e,
            });
        }
        if let Some(h) = var("HEADERS") {
            self.headers = parse_headers(&h);
        }
        if let Some(c) = var("COMPRESSION") {
            self.gzip = c.trim() == "gzip";
        }
        if let Some(t) = var("TIMEOUT").and_then(|t| t.trim().parse().ok()) {
            self.timeout_ms = t;
        }
        if let Some(p) = var("CERTIFICATE") {
            self.tls.certificate = Some(p.into());
        }
        if let Some(p) = var("CLIENT_CERTIFICATE") {
            self.tls.client_certificate = Some(p.into());
        }
        if let Some(p) = var("CLIENT_KEY") {
            self.tls.client_key = Some(p.into());
        }
        if let Some(v) = var("INSECURE") {
            self.insecure = v.trim().eq_ignore_ascii_case("true");
        }
    }
}

/// `k1=v1,k2=v2` with percent-encoded values (the OTEL convention).
pub fn parse_headers(s: &str) -> Vec<(String, String)> {
    s.split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), percent_decode(v.trim())))
        .filter(|(k, _)| !k.is_empty())
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Where spans go.
pub enum Sink {
    Stdout,
    Grpc(otlp::Grpc),
    Http(otlp::Http),
    /// Kept in memory (the demo, tests).
    Collect(Arc<Mutex<Vec<SpanRecord>>>),
    /// Every sink in turn (the demo prints and exports).
    Tee(Vec<Sink>),
}

/// Batches sent to a collector at once.
const IN_FLIGHT: usize = 2;

impl Sink {
    /// Another sender to the same place, usable while this one waits for
    /// an answer; None where batches must go one by one (stdout lines,
    /// the in-memory list keep their order).
    fn lane(&self) -> Option<Sink> {
        match self {
            Sink::Grpc(g) => Some(Sink::Grpc(g.clone())),
            Sink::Http(h) => Some(Sink::Http(h.lane())),
            Sink::Stdout | Sink::Collect(_) | Sink::Tee(_) => None,
        }
    }

    pub fn from_config(cfg: &ExportConfig) -> Result<Self, SendError> {
        Ok(match (&cfg.endpoint, cfg.protocol) {
            (None, _) => Sink::Stdout,
            (Some(e), Protocol::Grpc) => {
                Sink::Grpc(otlp::Grpc::new(&tls::with_scheme(e, cfg.insecure), cfg)?)
            }
            (Some(e), Protocol::HttpProtobuf) => Sink::Http(otlp::Http::new(e, cfg)?),
        })
    }

    /// Sends one batch, once (the exporter task retries).
    pub async fn send(&mut self, spans: &[SpanRecord]) -> Result<(), SendError> {
        match self {
            Sink::Stdout => {
                stdout::write(spans);
                Ok(())
            }
            Sink::Grpc(g) => g.send(spans).await,
            Sink::Http(h) => h.send(spans).await,
            Sink::Collect(v) => {
                v.lock().expect("collect lock").extend_from_slice(spans);
                Ok(())
            }
            Sink::Tee(sinks) => {
                let mut result = Ok(());
                for s in sinks {
                    if let Err(e) = Box::pin(s.send(spans)).await {
                        result = Err(e);
                    }
                }
                result
            }
        }
    }
}

/// Upper bounds (seconds) of the export-latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 8] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0];

#[derive(Default, Debug)]
pub struct ExportStats {
    pub enqueued: AtomicU64,
    /// Dropped because the queue was full.
    pub dropped: AtomicU64,
    pub exported: AtomicU64,
    /// Gave up on (non-retryable error, or still failing at shutdown).
    pub failed: AtomicU64,
    pub retries: AtomicU64,
    pub batches: AtomicU64,
    /// Cumulative histogram of successful export calls.
    pub latency_buckets: [AtomicU64; 8],
    pub latency_count: AtomicU64,
    pub latency_sum_us: AtomicU64,
    /// Unix seconds of the last success and the last failure (0 = never).
    pub last_ok: AtomicU64,
    pub last_err: AtomicU64,
}

impl ExportStats {
    pub fn healthy(&self) -> bool {
        let (ok, err) = (
            self.last_ok.load(Ordering::Relaxed),
            self.last_err.load(Ordering::Relaxed),
        );
        err == 0 || ok >= err
    }

    fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
            if s <= *b {
                self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub struct Exporter {
    tx: Option<mpsc::Sender<SpanRecord>>,
    /// Set at shutdown: failing batches stop retrying.
    closing: Arc<AtomicBool>,
    pub stats: Arc<ExportStats>,
    worker: Option<tokio::task::JoinHandle<()>>,
    shutdown: Duration,
}

impl Exporter {
    /// Starts the export worker on the current tokio runtime.
    pub fn start(cfg: &ExportConfig, sink: Sink) -> Self {
        let (tx, rx) = mpsc::channel(cfg.queue.max(1));
        let stats = Arc::new(ExportStats::default());
        let closing = Arc::new(AtomicBool::new(false));
        let worker = tokio::spawn(work(
            rx,
            sink,
            stats.clone(),
            closing.clone(),
            cfg.batch.max(1),
            Duration::from_millis(cfg.batch_delay_ms),
        ));
        Self {
            tx: Some(tx),
            closing,
            stats,
            worker: Some(worker),
            shutdown: Duration::from_millis(cfg.shutdown_ms),
        }
    }

    /// Never blocks: a full queue drops the span (counted).
    pub fn send(&self, span: SpanRecord) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(span) {
            Ok(()) => {
                self.stats.enqueued.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Queues the span if there is room, else hands it back (not counted:
    /// the caller still holds it and may offer it again).
    pub fn offer(&self, span: SpanRecord) -> Result<(), SpanRecord> {
        let Some(tx) = &self.tx else { return Ok(()) };
        match tx.try_send(span) {
            Ok(()) => {
                self.stats.enqueued.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(s)) => Err(s),
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        }
    }

    /// Spans the caller had to give up on before queueing them.
    pub fn count_dropped(&self, n: u64) {
        self.stats.dropped.fetch_add(n, Ordering::Relaxed);
    }

    pub fn queued(&self) -> usize {
        self.tx
            .as_ref()
            .map(|t| t.max_capacity() - t.capacity())
            .unwrap_or(0)
    }

    /// Closes the queue and waits (bounded) for it to drain.
    pub async fn shutdown(mut self) {
        self.tx = None;
        self.closing.store(true, Ordering::Relaxed);
        if let Some(w) = self.worker.take() {
            let abort = w.abort_handle();
            if tokio::time::timeout(self.shutdown, w).await.is_err() {
                abort.abort();
                warn!("span export did not drain within {:?}", self.shutdown);
            }
        }
    }
}

async fn work(
    mut rx: mpsc::Receiver<SpanRecord>,
    sink: Sink,
    stats: Arc<ExportStats>,
    closing: Arc<AtomicBool>,
    batch: usize,
    delay: Duration,
) {
    let mut idle: Vec<Sink> = (1..IN_FLIGHT).filter_map(|_| sink.lane()).collect();
    idle.push(sink);
    let mut sending: JoinSet<Sink> = JoinSet::new();
    let mut buf: Vec<SpanRecord> = Vec::with_capacity(batch);
    loop {
        // A free sender first (or the first one to finish): spans stay in
        // the bounded queue, not in a batch waiting here, so what is held
        // outside the queue is at most IN_FLIGHT batches.
        while idle.is_empty() {
            match sending.join_next().await {
                Some(Ok(s)) => idle.push(s),
                Some(Err(e)) => warn!("span export task: {e}"),
                None => break,
            }
        }
        // Wait for the first span, then fill the batch for up to `delay`.
        match rx.recv().await {
            Some(s) => buf.push(s),
            None => break,
        }
        let deadline = tokio::time::Instant::now() + delay;
        while buf.len() < batch {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(s)) => buf.push(s),
                _ => break,
            }
        }
        let Some(mut s) = idle.pop() else {
            // Every sender's task panicked: nothing can send any more.
            stats.failed.fetch_add(buf.len() as u64, Ordering::Relaxed);
            buf.clear();
            continue;
        };
        let mut out = std::mem::replace(&mut buf, Vec::with_capacity(batch));
        let (stats, closing) = (stats.clone(), closing.clone());
        sending.spawn(async move {
            export(&mut s, &mut out, &stats, &closing).await;
            s
        });
    }
    // Queue closed (shutdown): batches under way get a last attempt, and
    // whatever is left goes out too.
    closing.store(true, Ordering::Relaxed);
    while let Some(r) = sending.join_next().await {
        if let Ok(s) = r {
            idle.push(s);
        }
    }
    let Some(mut sink) = idle.pop() else { return };
    while let Ok(s) = rx.try_recv() {
        buf.push(s);
        if buf.len() >= batch {
            export(&mut sink, &mut buf, &stats, &closing).await;
        }
    }
    if !buf.is_empty() {
        export(&mut sink, &mut buf, &stats, &closing).await;
    }
}

/// Attempts per batch: with the backoff below a batch is given up after
/// about 25 s of failures (counted as failed); the queue behind it keeps
/// its spans for the next batches.
const ATTEMPTS: u32 = 10;

/// The wait before retry `n` (1-based): 100 ms doubling to 5 s, spread
/// over ±50 % so a node's agents do not retry in step; a collector's
/// Retry-After wins when longer.
fn backoff(n: u32, after: Option<Duration>) -> Duration {
    let base = Duration::from_millis(100) * 2u32.saturating_pow(n.saturating_sub(1).min(6));
    let base = base.min(Duration::from_secs(5));
    let mut r = [0u8; 2];
    let _ = getrandom::fill(&mut r);
    let spread = 0.5 + f64::from(u16::from_le_bytes(r)) / f64::from(u16::MAX);
    base.mul_f64(spread).max(after.unwrap_or_default())
}

/// Sends one batch; retries retryable failures with `backoff` until it
/// succeeds, the error is permanent, `ATTEMPTS` ran out, or the queue is
/// closed and a last attempt failed.
async fn export(
    sink: &mut Sink,
    buf: &mut Vec<SpanRecord>,
    stats: &ExportStats,
    closing: &AtomicBool,
) {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let t0 = Instant::now();
        match sink.send(buf).await {
            Ok(()) => {
                stats.observe(t0.elapsed());
                stats
                    .exported
                    .fetch_add(buf.len() as u64, Ordering::Relaxed);
                stats.batches.fetch_add(1, Ordering::Relaxed);
                stats.last_ok.store(unix_now(), Ordering::Relaxed);
                buf.clear();
                return;
            }
            Err(e) => {
                stats.last_err.store(unix_now(), Ordering::Relaxed);
                let (retry, after) = match &e {
                    SendError::Remote { retry, after, .. } => (*retry, *after),
                    SendError::Config(_) => (false, None),
                };
                if !retry || closing.load(Ordering::Relaxed) || attempt >= ATTEMPTS {
                    warn!(spans = buf.len(), "export failed, spans dropped: {e}");
                    stats.failed.fetch_add(buf.len() as u64, Ordering::Relaxed);
                    buf.clear();
                    return;
                }
                let wait = backoff(attempt, after);
                debug!("export failed, retrying in {wait:?}: {e}");
                stats.retries.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(wait).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_with_jitter_and_honour_retry_after() {
        for n in 1..=ATTEMPTS {
            let base = Duration::from_millis(100 * 2u64.pow(n - 1)).min(Duration::from_secs(5));
            let w = backoff(n, None);
            assert!(w >= base / 2 && w <= base * 3 / 2, "try {n}: {w:?}");
        }
        let waits: std::collections::HashSet<_> = (0..20).map(|_| backoff(3, None)).collect();
        assert!(waits.len() > 1, "jittered");
        assert_eq!(
            backoff(1, Some(Duration::from_secs(9))),
            Duration::from_secs(9)
        );
    }

    #[test]
    fn env_variables_are_honoured() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let mut c = ExportConfig::default();
        c.apply_env(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=a%20b,x=1"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "none"),
            ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "2500"),
        ]));
        assert_eq!(
            c.endpoint.as_deref(),
            Some("http://collector:4318/v1/traces")
        );
        assert_eq!(c.protocol, Protocol::HttpProtobuf);
        assert_eq!(
            c.headers,
            vec![("api-key".into(), "a b".into()), ("x".into(), "1".into())]
        );
        assert!(!c.gzip);
        assert_eq!(c.timeout_ms, 2500);
        let mut c = ExportConfig::default();
        c.apply_env(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://a:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://b:4317"),
        ]));
        assert_eq!(
            c.endpoint.as_deref(),
            Some("http://b:4317"),
            "signal-specific wins, verbatim"
        );
        assert_eq!(c.protocol, Protocol::Grpc);
    }
}
