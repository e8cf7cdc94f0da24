//! Benchmarks that run inside the agent binary (they need its eBPF object).
//! Every figure is a ratio against a baseline measured in the same run, with
//! the scenarios alternated round by round and medians reported.
use std::net::{IpAddr, Ipv4Addr};

use agent_common::{FlowKey, PortKey, TraceContext, TraceKey, FAMILY_IPV4, PROTO_TCP, TCX_NEXT};
use aya::{
    programs::{ProgramError, SchedClassifier, TestRun, TestRunOptions},
    Ebpf, EbpfError,
};
use serde::Serialize;

use crate::{
    config::AgentConfig,
    frames::{self, Frame},
    loader::{Datapath, LoaderError, TESTPROGS_OBJECT},
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
    Table(#[from] TableError),
    #[error(transparent)]
    Netns(#[from] netns::NetnsError),
    #[error("{0}")]
    Other(String),
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

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn v4(a: [u8; 4]) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(a))
}

fn flow_key(netns: u64, src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16) -> FlowKey {
    let mut k = FlowKey {
        netns,
        local_port: sport,
        remote_port: dport,
        family: FAMILY_IPV4,
        proto: PROTO_TCP,
        ..Default::default()
    };
    k.local_addr[..4].copy_from_slice(&src);
    k.remote_addr[..4].copy_from_slice(&dst);
    k
}

fn ns_per_run(
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
pub fn datapath(repeat: u32, rounds: usize) -> Result<Vec<Row>, BenchError> {
    let mut dp = Datapath::load(&AgentConfig::default(), false)?;
    let mut test = Ebpf::load(TESTPROGS_OBJECT)?;
    let empty: &mut SchedClassifier = test
        .program_mut("tagflow_empty")
        .ok_or_else(|| BenchError::Other("tagflow_empty missing".into()))?
        .try_into()?;
    empty.load()?;

    let quiet_pod = netns::anonymous()?;
    let traced_pod = netns::anonymous()?;
    let traced = netns::in_netns_file(&traced_pod, netns::current_cookie)??;

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
    let untagged = frame(1, 40000);
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
    let stamped = frames::skb_ctx_tstamp(1, crate::tables::monotonic_ns());
    let tcp_skb = match netns::in_netns_file(&traced_pod, || {
        ns_per_run(dp_ingress_probe(&mut dp)?, &by_flow, &stamped, 1)
    })? {
        Ok(_) => stamped,
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
    ];
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for _ in 0..rounds.max(1) {
        let ing = dp.ingress()?;
        let r = netns::in_netns_file(&quiet_pod, || -> Result<[f64; 2], BenchError> {
            Ok([
                ns_per_run(empty, &untagged, &skb, repeat)?,
                ns_per_run(ing, &untagged, &skb, repeat)?,
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
        let t = netns::in_netns_file(&traced_pod, || -> Result<[f64; 3], BenchError> {
            Ok([
                ns_per_run(ing, &untagged, &skb, repeat)?,
                ns_per_run(ing, &by_flow, &tcp_skb, repeat)?,
                ns_per_run(ing, &by_pid, &tcp_skb, repeat)?,
            ])
        })??;
        for (i, v) in r.iter().chain(t.iter()).chain([h].iter()).enumerate() {
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
                1 | 2 => (Some(base), Some(value / base), "<= 2".into()),
                3 | 4 => (Some(base), Some(value / base), "<= 3".into()),
                // Once per request, not per packet: shown, no target.
                _ => (Some(base), Some(value / base), String::new()),
            };
            Row {
                scenario: format!("datapath: {name}"),
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

fn dp_ingress_probe(dp: &mut Datapath) -> Result<&mut SchedClassifier, BenchError> {
    Ok(dp.ingress()?)
}

pub fn table(rows: &[Row]) -> String {
    let mut out = format!(
        "{:<34} {:>9} {:>9} {:>7} {:>7}  {}\n",
        "scenario", "value", "baseline", "ratio", "target", "min..max"
    );
    for r in rows {
        out += &format!(
            "{:<34} {:>6.1} {:<2} {:>9} {:>7} {:>7}  {:.1}..{:.1}\n",
            r.scenario,
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
