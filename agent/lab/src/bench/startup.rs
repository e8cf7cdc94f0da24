//! Start-up cost: loading the programs (and owner hooks) and attaching to 1
//! and to 100 interfaces; the scaling of the datapath with table size.
use std::time::Instant;

use agent_common::{FlowKey, PortKey, TraceContext, TraceKey, PROTO_TCP};

use super::{median, BenchError, Row};
use crate::{frames, topo::run};
use tagflow::{
    config::{AgentConfig, AttachMode},
    loader::Datapath,
    netns,
};

struct Veths(Vec<String>);

impl Drop for Veths {
    fn drop(&mut self) {
        for v in &self.0 {
            let _ = run(&["ip", "link", "del", v]);
        }
    }
}

fn veths(n: usize) -> Result<Veths, BenchError> {
    let tag = std::process::id() % 100_000;
    let mut v = Veths(Vec::new());
    for i in 0..n {
        let name = format!("tfs{tag}x{i}");
        run(&[
            "ip",
            "link",
            "add",
            &name,
            "type",
            "veth",
            "peer",
            "name",
            &format!("{name}p"),
        ])?;
        run(&["ip", "link", "set", &name, "up"])?;
        v.0.push(name);
    }
    Ok(v)
}

fn ifindex(name: &str) -> u32 {
    std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Load + attach wall time in ms for `n` interfaces.
fn load_and_attach(ifaces: &[String], mode: AttachMode) -> Result<f64, BenchError> {
    let cfg = AgentConfig {
        attach_mode: mode,
        ..AgentConfig::scratch()
    };
    let t0 = Instant::now();
    let mut dp = Datapath::load(&cfg, true)?;
    for name in ifaces {
        dp.attach(name, ifindex(name))?;
    }
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    drop(dp);
    Ok(ms)
}

pub fn startup(rounds: usize) -> Result<Vec<Row>, BenchError> {
    let all = veths(100)?;
    let (mut one, mut hundred, mut by_netlink) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds.max(1) {
        one.push(load_and_attach(&all.0[..1], AttachMode::Auto)?);
        hundred.push(load_and_attach(&all.0, AttachMode::Auto)?);
        // The kernel's TCX attach waits out an RCU grace period per
        // interface (docs/BENCHMARKS.md); clsact filters do not.
        by_netlink.push(load_and_attach(&all.0, AttachMode::Netlink)?);
    }
    let (o, h, n) = (
        median(&mut one),
        median(&mut hundred),
        median(&mut by_netlink),
    );
    let spread = |v: &[f64]| {
        (
            v.iter().copied().fold(f64::INFINITY, f64::min),
            v.iter().copied().fold(0.0, f64::max),
        )
    };
    Ok(vec![
        Row {
            scenario: "start-up: load + attach 1 interface".into(),
            metric: "wall time".into(),
            unit: "ms".into(),
            value: o,
            baseline: None,
            ratio: None,
            target: "<= 200".into(),
            spread: spread(&one),
        },
        Row {
            scenario: "start-up: load + attach 100 interfaces".into(),
            metric: "wall time".into(),
            unit: "ms".into(),
            value: h,
            // Linear would be 100 × the per-interface share of the 1-interface run.
            baseline: Some(o),
            ratio: Some(h / o),
            target: "<= 100".into(),
            spread: spread(&hundred),
        },
        Row {
            scenario: "start-up: load + attach 100 interfaces, attach_mode = netlink".into(),
            metric: "wall time".into(),
            unit: "ms".into(),
            value: n,
            baseline: Some(h),
            ratio: Some(n / h),
            target: String::new(),
            spread: spread(&by_netlink),
        },
    ])
}

fn key(netns: u64, i: u32, port: u16) -> FlowKey {
    let local = [10, (i >> 16) as u8, (i >> 8) as u8, i as u8];
    FlowKey::new(
        netns,
        PROTO_TCP,
        (local, port).into(),
        ([10, 200, 0, 1], 80).into(),
    )
}

/// Datapath cost and map memory with 10, 1k and 100k entries in each table.
pub fn scaling(repeat: u32) -> Result<Vec<Row>, BenchError> {
    let mut rows = Vec::new();
    let pod = netns::anonymous()?;
    let ns = netns::in_netns_file(&pod, netns::current_cookie)??;
    let mut base = Vec::new();
    for n in [10u32, 1_000, 100_000] {
        let mut cfg = AgentConfig::scratch();
        let cap = (n + 1024).next_power_of_two();
        cfg.maps.traces = cap;
        cfg.maps.flow_traces = cap;
        cfg.maps.flow_stats = cap;
        cfg.maps.sock_owner = cap;
        cfg.maps.bound_ports = cap;
        let mut dp = Datapath::load(&cfg, false)?;
        let mut t = dp.take_trace_table().expect("fresh datapath");
        let ctx = TraceContext {
            trace_id: [3; 16],
            ..Default::default()
        };
        for i in 0..n {
            // Other pods' entries, plus one traced process in this pod.
            t.set_process(TraceKey::new(100_000 + i, 1_000_000 + i as u64 % 512), &ctx)?;
            t.set_flow(key(1_000_000 + i as u64 % 512, i, 30000), &ctx)?;
            dp.set_bound_port(
                PortKey::new(1_000_000 + i as u64 % 512, PROTO_TCP, (i % 60000) as u16),
                i,
            )?;
        }
        t.set_process(TraceKey::new(1, ns), &ctx)?;
        let tagged = key(ns, 7, 40001);
        t.set_flow(tagged, &ctx)?;
        let frame = |i: u32, port: u16| {
            let mut f = frames::Frame::tcp(
                std::net::IpAddr::from([10, (i >> 16) as u8, (i >> 8) as u8, i as u8]),
                port,
                std::net::IpAddr::from([10, 200, 0, 1]),
                80,
            );
            f.payload = vec![b'x'; 100];
            f.build()
        };
        let (tf, uf) = (frame(7, 40001), frame(8, 40002));
        let skb = frames::skb_ctx(1, 0, [0; 5]);
        let (mut tv, mut uv) = (Vec::new(), Vec::new());
        for _ in 0..5 {
            let ing = dp.ingress()?;
            let (a, b) = netns::in_netns_file(&pod, || -> Result<(f64, f64), BenchError> {
                Ok((
                    super::ns_per_run(ing, &tf, &skb, repeat)?,
                    super::ns_per_run(ing, &uf, &skb, repeat)?,
                ))
            })??;
            tv.push(a);
            uv.push(b);
        }
        let (tvm, uvm) = (median(&mut tv), median(&mut uv));
        if base.is_empty() {
            base = vec![tvm, uvm];
        }
        let mem = crate::procs::map_memlock_kib(std::process::id()) as f64 / 1024.0;
        for (what, v, b) in [
            ("tagged", tvm, base[0]),
            ("untagged, traced pod", uvm, base[1]),
        ] {
            rows.push(Row {
                scenario: format!("scaling: {what}, {n} entries/table"),
                metric: "time per packet (test_run)".into(),
                unit: "ns".into(),
                value: v,
                baseline: Some(b),
                ratio: Some(v / b),
                target: "<= 1.2".into(),
                spread: (v, v),
            });
        }
        rows.push(Row {
            scenario: format!("scaling: BPF maps sized for {n} entries"),
            metric: "map memory".into(),
            unit: "MiB".into(),
            value: mem,
            baseline: None,
            ratio: None,
            target: String::new(),
            spread: (mem, mem),
        });
        drop(t);
        drop(dp);
    }
    Ok(rows)
}
