//! Benchmarks (`tagflow-lab bench`, run by `cargo xtask bench`). Every figure is a ratio against a baseline measured in the same run, with
//! the scenarios alternated round by round and medians reported.
pub mod floor;
pub mod h2;
pub mod linking;
pub mod node;
mod pin;
pub mod pipeline;
pub mod registration;
pub mod startup;
pub mod threads;
use std::net::{IpAddr, Ipv4Addr};

use agent_common::{FlowKey, PortKey, TraceContext, TraceKey, PROTO_TCP, TCX_NEXT};
use aya::{
    programs::{ProgramError, SchedClassifier, TestRun, TestRunOptions},
    Ebpf, EbpfError,
};
use serde::Serialize;

use crate::{
    frames::{self, Frame},
    TESTPROGS_OBJECT,
};
use tagflow::{
    config::{AgentConfig, NetnsSource},
    loader::{Datapath, LoaderError},
    netns,
    tables::TableError,
};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error(transparent)]
    Ebpf(#[from] EbpfError),
    #[error(transparent)]
    Program(#[from] ProgramError),
    #[error(transparent)]
    Map(#[from] aya::maps::MapError),
    #[error(transparent)]
    Table(#[from] TableError),
    #[error(transparent)]
    Netns(#[from] netns::NetnsError),
    #[error(transparent)]
    Topo(#[from] crate::topo::TopoError),
    #[error("{0}")]
    Other(String),
}

/// Every benchmark, one table (`quick`: fewer repetitions).
pub fn all(quick: bool) -> Result<Vec<Row>, BenchError> {
    let (repeat, rounds, messages, spans) = if quick {
        (300_000, 5, 40_000, 50_000)
    } else {
        (2_000_000, 7, 200_000, 200_000)
    };
    let mut rows = datapath(repeat, rounds)?;
    rows.extend(floor::floor(repeat, rounds)?);
    rows.extend(threads::recv_hook(repeat as usize / 20, rounds)?);
    rows.extend(startup::scaling(repeat / 2)?);
    rows.extend(registration::registration(messages, 4)?);
    rows.extend(pipeline::pipeline(spans)?);
    rows.extend(pipeline::span_memory(20_000));
    rows.extend(startup::startup(if quick { 3 } else { 5 })?);
    rows.extend(node::node(quick)?);
    rows.extend(h2::proxies(quick)?);
    rows.extend(h2::linking(if quick { 60 } else { 200 })?);
    rows.extend(linking::linking(if quick { 60 } else { 200 }, None)?);
    Ok(rows)
}

/// One measurement, in the JSON shape every tagflow benchmark writes.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub scenario: String,
    pub metric: String,
    pub unit: String,
    pub value: f64,
    pub baseline: Option<f64>,
    pub ratio: Option<f64>,
    pub target: String,
    /// Not part of the JSON shape: min and max over rounds, for the table.
    #[serde(skip)]
    pub spread: (f64, f64),
}

pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn v4(a: [u8; 4]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(a))
}

/// An IPv4 TCP connection's key.
fn flow_key(netns: u64, src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> FlowKey {
    FlowKey::new(netns, PROTO_TCP, (src, sport).into(), (dst, dport).into())
}

pub(crate) fn ns_per_run(
    p: &SchedClassifier,
    frame: &[u8],
    ctx: &[u8],
    repeat: u32,
) -> Result<f64, BenchError> {
    let r = p.test_run(TestRunOptions {
        data_in: Some(frame),
        ctx_in: Some(ctx),
        repeat,
        ..Default::default()
    })?;
    if r.return_value as i32 != TCX_NEXT {
        return Err(BenchError::Other(format!(
            "verdict {} != TCX_NEXT",
            r.return_value as i32
        )));
    }
    Ok(r.duration.as_nanos() as f64)
}

/// `tagflow_ingress` per packet against an empty program, in the situations
/// a pod's packet meets: its pod has no traces (gate), its pod has traces but
/// not this flow, and tagged by flow or by (pid, netns) — the last three in
/// steady state, i.e. served by the per-flow cache after the first packet.
/// The skbs are run inside two throw-away namespaces standing in for pods,
/// since the datapath treats host-namespace sockets differently.
/// Both variants: `tagflow_ingress` where this kernel allows it, and
/// `tagflow_ingress_ifns` (what kernels before 6.14 run), each against an
/// empty program measured in the same run.
/// Pinned to one CPU where the kernel allows (see `pin.rs`).
pub fn datapath(repeat: u32, rounds: usize) -> Result<Vec<Row>, BenchError> {
    let pinned = pin::Pinned::new();
    let mut rows = datapath_of(NetnsSource::Auto, repeat, rounds)?;
    rows.extend(datapath_of(NetnsSource::Interface, repeat, rounds)?);
    if let Some(p) = &pinned {
        for r in &mut rows {
            r.metric = format!("{} on CPU {}", r.metric, p.cpu);
        }
    }
    Ok(rows)
}

fn datapath_of(source: NetnsSource, repeat: u32, rounds: usize) -> Result<Vec<Row>, BenchError> {
    let cfg = AgentConfig {
        netns_source: source,
        ..AgentConfig::scratch()
    };
    let mut dp = Datapath::load(&cfg, false)?;
    let program = dp.ingress_name();
    let mut test = Ebpf::load(TESTPROGS_OBJECT)?;
    let empty: &mut SchedClassifier = test
        .program_mut("tagflow_empty")
        .ok_or_else(|| BenchError::Other("tagflow_empty missing".into()))?
        .try_into()?;
    empty.load()?;

    let quiet_pod = netns::anonymous()?;
    let traced_pod = netns::anonymous()?;
    // HTTP/2 connections start here: a pod that speaks it pays for
    // following it; the others must not.
    let h2_pod = netns::anonymous()?;
    let h2ns = netns::in_netns_file(&h2_pod, netns::current_cookie)??;
    let traced = netns::in_netns_file(&traced_pod, netns::current_cookie)??;
    let quiet = netns::in_netns_file(&quiet_pod, netns::current_cookie)??;
    // Runs are on ifindex 1 as if on the pod's veth: the program without the
    // helper reads the pod from IFACE_NETNS (set before each pod's runs).

    let mut table = dp.take_trace_table().expect("fresh datapath");
    let mut events = dp.take_events().expect("fresh datapath");
    let ctx = |b: u8| TraceContext {
        trace_id: [b; 16],
        flags: agent_common::TRACE_FLAG_SAMPLED,
        ..Default::default()
    };
    // Realistic fill: 1000 traced processes and connections in other pods.
    for i in 0..1000u32 {
        let other = 1_000_000 + i as u64;
        table.set_process(TraceKey::new(100_000 + i, other), &ctx(1))?;
        let k = flow_key(
            other,
            [10, 9, (i >> 8) as u8, i as u8],
            30000,
            [10, 8, 0, 1],
            80,
        );
        table.set_flow(k, &ctx(2))?;
    }
    // The traced pod has a traced process, but not the "untagged" flow's.
    table.set_process(TraceKey::new(999_999, traced), &ctx(5))?;
    // Mid-stream segments: one packet in many carries a request head.
    let frame = |last: u8, sport: u16| {
        let mut f = Frame::tcp(v4([10, 1, 0, last]), sport, v4([10, 2, 0, 1]), 80);
        f.payload = vec![b'x'; 100];
        f.build()
    };
    let head = Frame::tcp(v4([10, 1, 0, 9]), 40009, v4([10, 2, 0, 1]), 80).build();
    let h2_start = {
        let mut f = Frame::tcp(v4([10, 1, 0, 10]), 40010, v4([10, 2, 0, 1]), 50051);
        f.payload = h2_connection_start();
        f.build()
    };
    let untagged = frame(1, 40000);
    // The same connection's pure ACK: no payload to look at, so the
    // difference to "untagged" is what the HTTP method check costs.
    let ack = {
        let mut f = Frame::tcp(v4([10, 1, 0, 1]), 40000, v4([10, 2, 0, 1]), 80);
        f.l4 = frames::L4::Tcp { flags: 0x10 };
        f.payload = Vec::new();
        f.build()
    };
    let by_flow = frame(2, 40001);
    table.set_flow(
        flow_key(traced, [10, 1, 0, 2], 40001, [10, 2, 0, 1], 80),
        &ctx(3),
    )?;
    let by_pid = frame(3, 40002);
    dp.set_bound_port(PortKey::new(traced, PROTO_TCP, 40002), 4242)?;
    table.set_process(TraceKey::new(4242, traced), &ctx(4))?;

    let skb = frames::skb_ctx(1, 0, [0; 5]);
    // TCP segments carry a monotonic departure time; use one when the
    // kernel lets test_run set it, else measure the bpf_ktime_get_ns path.
    let stamped = frames::skb_ctx_tstamp(1, tagflow::clock::monotonic_ns());
    // The variant for older kernels never reads the stamp (test_run then
    // refuses one): its rows include bpf_ktime_get_ns by design.
    let tcp_skb = match netns::in_netns_file(&traced_pod, || {
        ns_per_run(dp_ingress_probe(&mut dp)?, &by_flow, &stamped, 1)
    })? {
        Ok(_) => stamped,
        Err(_) if program == agent_common::programs::INGRESS_IFNS => skb,
        Err(e) => {
            tracing::warn!(
                "test_run refuses skb timestamps ({e}); tagged rows include bpf_ktime_get_ns"
            );
            skb
        }
    };
    let names = [
        "empty program",
        "untagged, pod without traces",
        "untagged, traced pod",
        "tagged by flow",
        "tagged by (pid, netns)",
        "request head captured",
        "HTTP/2 connection start: preface, SETTINGS, HEADERS copied, server side started",
        "untagged, pod without traces, pure ACK (no payload: no method check)",
    ];
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for _ in 0..rounds.max(1) {
        dp.set_iface_netns(1, quiet)?;
        let ing = dp.ingress()?;
        let r = netns::in_netns_file(&quiet_pod, || -> Result<[f64; 3], BenchError> {
            Ok([
                ns_per_run(empty, &untagged, &skb, repeat)?,
                ns_per_run(ing, &untagged, &skb, repeat)?,
                ns_per_run(ing, &ack, &skb, repeat)?,
            ])
        })??;
        // Heads go to the ring buffer (256 KiB, ~1.1 KiB each): small
        // batches, drained in between, so the ring never fills and every
        // run pays for a real capture.
        let mut hs = Vec::new();
        for _ in 0..20 {
            hs.push(netns::in_netns_file(&quiet_pod, || {
                ns_per_run(ing, &head, &skb, 100)
            })??);
            while events.next().is_some() {}
        }
        let h = median(&mut hs);
        // Each run is a new connection (its preface resets the walk).
        dp.set_iface_netns(1, h2ns)?;
        let ing = dp.ingress()?;
        let mut h2 = Vec::new();
        for _ in 0..20 {
            h2.push(netns::in_netns_file(&h2_pod, || {
                ns_per_run(ing, &h2_start, &skb, 50)
            })??);
            while events.next().is_some() {}
        }
        let h2 = median(&mut h2);
        dp.set_iface_netns(1, traced)?;
        let ing = dp.ingress()?;
        let t = netns::in_netns_file(&traced_pod, || -> Result<[f64; 3], BenchError> {
            Ok([
                ns_per_run(ing, &untagged, &skb, repeat)?,
                ns_per_run(ing, &by_flow, &tcp_skb, repeat)?,
                ns_per_run(ing, &by_pid, &tcp_skb, repeat)?,
            ])
        })??;
        let once = [h, h2, r[2]];
        let order = r[..2].iter().chain(t.iter()).chain(once.iter());
        for (i, v) in order.enumerate() {
            samples[i].push(*v);
        }
    }
    if dp.counter(agent_common::Counter::Tagged) < 2 * repeat as u64 {
        return Err(BenchError::Other("tagged scenarios did not tag".into()));
    }
    let spread = |v: &[f64]| {
        (
            v.iter().copied().fold(f64::INFINITY, f64::min),
            v.iter().copied().fold(0.0, f64::max),
        )
    };
    let base = median(&mut samples[0].clone());
    Ok(names
        .iter()
        .zip(samples.iter_mut())
        .enumerate()
        .map(|(i, (name, s))| {
            let value = median(s);
            let (baseline, ratio, target) = match i {
                0 => (None, None, String::new()),
                1 | 2 | 7 => (Some(base), Some(value / base), "<= 2".into()),
                3 | 4 => (Some(base), Some(value / base), "<= 3".into()),
                // Once per request or connection, not per packet: shown,
                // no target.
                _ => (Some(base), Some(value / base), String::new()),
            };
            Row {
                scenario: format!("datapath ({program}): {name}"),
                metric: "time per packet (test_run)".into(),
                unit: "ns".into(),
                value,
                baseline,
                ratio,
                target,
                spread: spread(s),
            }
        })
        .collect())
}

/// A gRPC client's first segment: the preface, an empty SETTINGS, and a
/// request's HEADERS (HPACK: indexed and literal fields, a new id).
fn h2_connection_start() -> Vec<u8> {
    let mut block = vec![0x83, 0x86]; // :method POST, :scheme http
    for (name, value) in [
        (&b":path"[..], &b"/shop.Cart/Add"[..]),
        (b":authority", b"cart:50051"),
        (b"content-type", b"application/grpc"),
        (b"x-request-id", b"0af76519-16cd-43dd-8448-eb211c80319c"),
    ] {
        block.extend([0x00, name.len() as u8]);
        block.extend_from_slice(name);
        block.push(value.len() as u8);
        block.extend_from_slice(value);
    }
    let mut p = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    p.extend([0, 0, 0, 4, 0, 0, 0, 0, 0]);
    let n = block.len();
    p.extend([(n >> 16) as u8, (n >> 8) as u8, n as u8, 1, 0x4, 0, 0, 0, 1]);
    p.extend(block);
    p
}

fn dp_ingress_probe(dp: &mut Datapath) -> Result<&mut SchedClassifier, BenchError> {
    Ok(dp.ingress()?)
}

pub fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<52} {:<28} {:>12} {:<6} {:>10} {:>7} {:>9}  {}\n",
        "scenario", "metric", "value", "unit", "baseline", "ratio", "target", "min..max"
    );
    for r in rows {
        out += &format!(
            "{:<52} {:<28} {:>12.1} {:<6} {:>10} {:>7} {:>9}  {:.1}..{:.1}\n",
            r.scenario,
            r.metric,
            r.value,
            r.unit,
            r.baseline
                .map(|b| format!("{b:.1}"))
                .unwrap_or_else(|| "-".into()),
            r.ratio
                .map(|x| format!("{x:.2}"))
                .unwrap_or_else(|| "-".into()),
            if r.target.is_empty() { "-" } else { &r.target },
            r.spread.0,
            r.spread.1,
        );
    }
    out
}

pub fn json(rows: &[Row]) -> String {
    serde_json::json!({ "rows": rows }).to_string()
}
