//! The span pipeline: flow events → assembly → export → an in-process
//! OTLP/gRPC receiver. Spans per second end to end, and that nothing is lost
//! while the queue is not full.
use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use super::{median, BenchError, Row};
use crate::collector::{Collector, Wire};
use agent_common::{FlowEvent, FlowKey, FlowStats, OWNER_CONNECTED, PROTO_TCP};
use tagflow::{
    clock::{monotonic_ns, WallClock},
    export::{ExportConfig, Exporter, Sink},
    sources::capture::{HeadInfo, Protocol},
    spans::{
        assemble::{Assembler, AssemblerConfig},
        resource::Resources,
    },
};

/// Flow `i`'s events: a call with an HTTP request head, as a pod's
/// outgoing request becomes a span (its attributes are what a real span
/// carries).
fn call(i: usize, now: u64) -> (FlowEvent, HeadInfo) {
    let local = ((i as u32).to_be_bytes(), (i % 60000) as u16);
    let key = FlowKey::new(1, PROTO_TCP, local.into(), ([0; 4], 80).into());
    let mut trace = [0u8; 16];
    trace[..8].copy_from_slice(&(i as u64 + 1).to_be_bytes());
    let ev = FlowEvent {
        key,
        stats: FlowStats {
            trace_id: trace,
            pid: std::process::id(),
            packets: 10,
            bytes: 1000,
            first_ns: now,
            last_ns: now + 1000,
            owner: OWNER_CONNECTED,
            ..Default::default()
        },
        ..Default::default()
    };
    let head = HeadInfo {
        method: "GET".into(),
        target: format!("/api/v1/items/{i}?page=2"),
        host: Some("catalog.shop.svc:8080".into()),
        protocol: Protocol::Http1,
        request_id: Some(format!("{i:08x}-16cd-43dd-8448-eb211c80319c")),
        trace_id: trace,
        parent_span_id: None,
        sampled: true,
        pid: std::process::id(),
        ts_ns: now,
        via: None,
        reader_end: None,
        sender_previous: None,
    };
    (ev, head)
}

/// Heap bytes a finished span takes while it waits (held for linking, or
/// queued for export): `n` spans held in an assembler, measured from the
/// allocator's statistics. With the span bounds this is what sets the
/// agent's memory under load.
pub fn span_memory(n: usize) -> Vec<Row> {
    let heap = || {
        // SAFETY: mallinfo2 only reads the allocator's statistics.
        let m = unsafe { libc::mallinfo2() };
        (m.uordblks + m.hblkhd) as f64
    };
    let mut asm = Assembler::new(
        AssemblerConfig {
            settle_ns: u64::MAX / 4,
            max_hold_ns: u64::MAX / 4,
            max_open: n + 1,
            max_held: n + 1,
            ..AssemblerConfig::default()
        },
        Resources::new(None),
    );
    let now = monotonic_ns();
    let before = heap();
    for i in 0..n {
        let (ev, head) = call(i, now);
        asm.flow_new(&ev, Some(Box::new(head)), now);
        asm.flow_end(&ev, now);
    }
    let per = (heap() - before) / asm.held_spans().max(1) as f64;
    vec![Row {
        scenario: format!("span memory: {n} finished spans held"),
        metric: "heap per span".into(),
        unit: "bytes".into(),
        value: per,
        baseline: None,
        ratio: None,
        target: String::new(),
        spread: (per, per),
    }]
}

/// Rounds of each kind, alternated; medians reported with min..max. One
/// run swings by a third on this machine (the receiver shares its two
/// vCPUs), so a single figure was not worth reading.
const ROUNDS: usize = 3;

/// Both kinds of span: bare flows (as the figures before HTTP heads were
/// kept), and calls whose request head was read (what a traced request
/// makes: ~25 attributes).
pub fn pipeline(spans: usize) -> Result<Vec<Row>, BenchError> {
    let mut runs: [Vec<Run>; 2] = Default::default();
    for _ in 0..ROUNDS {
        for (heads, r) in runs.iter_mut().enumerate() {
            r.push(pipeline_of(spans, heads == 1)?);
        }
    }
    let mut rows = Vec::new();
    for (heads, r) in runs.iter().enumerate() {
        let what = if heads == 1 {
            "HTTP call spans"
        } else {
            "spans"
        };
        let mut rates: Vec<f64> = r.iter().map(|r| r.rate).collect();
        let spread = (
            rates.iter().copied().fold(f64::MAX, f64::min),
            rates.iter().copied().fold(0.0, f64::max),
        );
        // The worst round: a loss in any of them is a loss.
        let lost = r.iter().map(|r| r.lost).fold(0.0, f64::max);
        rows.push(Row {
            scenario: format!("span pipeline: {spans} {what}, events → OTLP/gRPC receiver"),
            metric: "throughput".into(),
            unit: "spans/s".into(),
            value: median(&mut rates),
            baseline: None,
            ratio: None,
            target: ">= 100000".into(),
            spread,
        });
        rows.push(Row {
            scenario: format!("span pipeline: {what} lost below the queue bound"),
            metric: "lost (not received)".into(),
            unit: "spans".into(),
            value: lost,
            baseline: None,
            ratio: None,
            target: "<= 0".into(),
            spread: (lost, lost),
        });
    }
    Ok(rows)
}

/// One run: spans per second, and spans lost (not received, or dropped or
/// failed by the exporter).
struct Run {
    rate: f64,
    lost: f64,
}

fn pipeline_of(spans: usize, heads: bool) -> Result<Run, BenchError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| BenchError::Other(e.to_string()))?;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", crate::topo::free_port())
        .parse()
        .expect("addr");
    let got = Collector::start(&rt, addr, Wire::Grpc, false);
    std::thread::sleep(Duration::from_millis(200));
    let cfg = ExportConfig {
        endpoint: Some(format!("http://{addr}")),
        queue: spans + 1,
        batch: 512,
        batch_delay_ms: 50,
        ..ExportConfig::default()
    };
    let (elapsed, stats) = rt.block_on(async {
        let sink = Sink::from_config(&cfg).map_err(|e| BenchError::Other(e.to_string()))?;
        let exporter = Exporter::start(&cfg, sink);
        let mut asm = Assembler::new(
            AssemblerConfig {
                settle_ns: 0,
                max_open: spans + 1,
                ..AssemblerConfig::default()
            },
            Resources::new(None),
        );
        let clock = WallClock::measure();
        let t0 = Instant::now();
        let now = monotonic_ns();
        for i in 0..spans {
            let (ev, head) = call(i, now);
            asm.flow_new(&ev, heads.then(|| Box::new(head)), now);
            asm.flow_end(&ev, now);
            if i % 1024 == 1023 {
                for s in asm.ready(&clock, now + 1, |_| false) {
                    exporter.send(s);
                }
            }
        }
        for s in asm.ready(&clock, now + 1, |_| false) {
            exporter.send(s);
        }
        while (got.received() as usize) < spans && t0.elapsed() < Duration::from_secs(60) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let elapsed = t0.elapsed();
        let stats = exporter.stats.clone();
        exporter.shutdown().await;
        Ok::<_, BenchError>((elapsed, stats))
    })?;
    let received = got.received() as f64;
    let dropped =
        (stats.dropped.load(Ordering::Relaxed) + stats.failed.load(Ordering::Relaxed)) as f64;
    Ok(Run {
        rate: received / elapsed.as_secs_f64(),
        lost: (spans as f64 - received).max(dropped),
    })
}
