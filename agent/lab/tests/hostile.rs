//! A corpus of hostile frames through BPF_PROG_TEST_RUN: seeded random
//! bytes, mutated valid frames, long IPv6 extension-header chains, VLAN
//! stacks, GRE and VXLAN encapsulations, zero-length TCP. Every frame the
//! kernel lets through must come back unchanged with the pass-on verdict,
//! and the terminal counters must account for every one of them.
mod common;

use std::net::IpAddr;

use agent_common::{Counter, TraceContext, TraceKey, TCX_NEXT};
use tagflow::{config::AgentConfig, netns};
use tagflow_lab::frames::{self, Ext6, Frame, L4};

/// xorshift64*: small, seeded, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn valid(r: &mut Rng) -> Frame {
    let v6 = r.below(2) == 0;
    let (src, dst) = if v6 {
        (ip("fd00::1"), ip("fd00::2"))
    } else {
        (ip("10.1.0.1"), ip("10.2.0.1"))
    };
    let mut f = if r.below(2) == 0 {
        Frame::tcp(src, 1024 + r.below(60000) as u16, dst, 80)
    } else {
        Frame::udp(src, 1024 + r.below(60000) as u16, dst, 53)
    };
    f.payload = (0..r.below(200)).map(|_| r.next() as u8).collect();
    for _ in 0..r.below(5) {
        let tpid = if r.below(2) == 0 {
            frames::ETH_P_8021Q
        } else {
            frames::ETH_P_8021AD
        };
        f.vlans.push((tpid, r.below(4096) as u16));
    }
    if v6 {
        for _ in 0..r.below(10) {
            f.ext6.push(match r.below(4) {
                0 => Ext6::HopByHop,
                1 => Ext6::Routing,
                2 => Ext6::DestOpts,
                _ => Ext6::Fragment(r.below(4) as u16),
            });
        }
    } else {
        f.ip4_options = (0..r.below(41)).map(|_| 1).collect();
        if r.below(8) == 0 {
            f.ip4_frag_offset = r.below(100) as u16;
        }
    }
    match r.below(6) {
        // GRE (47) carrying an inner frame, VXLAN (UDP 4789) likewise.
        0 => {
            f.l4 = L4::Other(47);
            f.payload = valid_inner(r);
        }
        1 if !v6 => {
            f.l4 = L4::Udp;
            f.dport = 4789;
            let mut p = vec![0x08, 0, 0, 0, 0, 0, 1, 0];
            p.extend(valid_inner(r));
            f.payload = p;
        }
        2 => {
            // Zero-length TCP (a bare ACK).
            f.l4 = L4::Tcp { flags: 0x10 };
            f.payload.clear();
        }
        _ => {}
    }
    f
}

fn valid_inner(r: &mut Rng) -> Vec<u8> {
    Frame::tcp(
        ip("192.168.0.1"),
        1000 + r.below(1000) as u16,
        ip("192.168.0.2"),
        443,
    )
    .build()
}

fn hostile(r: &mut Rng) -> Vec<u8> {
    match r.below(4) {
        // Pure noise.
        0 => (0..15 + r.below(300)).map(|_| r.next() as u8).collect(),
        // A valid frame with bytes flipped in its headers (bogus IHL,
        // lengths, next-header values, data offsets ...).
        1 | 2 => {
            let mut b = valid(r).build();
            for _ in 0..1 + r.below(4) {
                let i = r.below(b.len().min(80) as u64) as usize;
                b[i] = r.next() as u8;
            }
            b
        }
        // A valid frame cut short.
        _ => {
            let b = valid(r).build();
            let n = 15 + r.below(b.len().saturating_sub(15) as u64 + 1) as usize;
            b[..n.min(b.len())].to_vec()
        }
    }
}

#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn a_hundred_thousand_hostile_frames_pass_unchanged_and_are_all_counted() {
    let _g = common::lock();
    let mut dp = common::load(&AgentConfig::default(), false);
    let pod = netns::anonymous().unwrap();
    let pod_ns = netns::in_netns_file(&pod, netns::current_cookie)
        .unwrap()
        .unwrap();
    // Traces in the pod so frames go all the way through resolution.
    let mut table = dp.take_trace_table().unwrap();
    let ctx = TraceContext {
        trace_id: [5; 16],
        ..Default::default()
    };
    table
        .set_process(TraceKey::new(4242, pod_ns), &ctx)
        .unwrap();
    let mut events = dp.take_events().unwrap();
    let terminal = |dp: &tagflow::loader::Datapath| -> u64 {
        let c = dp.counters().unwrap();
        Counter::TERMINAL.iter().map(|t| c[*t as usize].1).sum()
    };
    let before = terminal(&dp);
    let prog = dp.ingress().unwrap();
    let (accepted, refused) = netns::in_netns_file(&pod, || {
        let mut r = Rng(0x7a67_f10e_2026_1127);
        let (mut ok, mut refused) = (0u64, 0u64);
        while ok < 100_000 {
            let frame = if r.below(3) == 0 {
                valid(&mut r).build()
            } else {
                hostile(&mut r)
            };
            match common::run(prog, &frame) {
                Ok(out) => {
                    assert_eq!(out.verdict, TCX_NEXT, "frame {frame:02x?}");
                    assert_eq!(out.data, frame, "bytes changed");
                    ok += 1;
                }
                // The kernel's own checks (too short for Ethernet or an IP
                // header) keep such frames from ever reaching a program.
                Err(_) => refused += 1,
            }
            if ok % 2000 == 0 {
                while events.next().is_some() {}
            }
        }
        (ok, refused)
    })
    .unwrap();
    let counted = terminal(&dp) - before;
    eprintln!("{accepted} frames through the program, {refused} refused by the kernel");
    assert_eq!(
        counted, accepted,
        "every frame ends in exactly one terminal counter"
    );
    let c = dp.counters().unwrap();
    for must_move in [
        Counter::ParseFailed,
        Counter::NonIp,
        Counter::Fragment,
        Counter::OtherL4,
        Counter::NoTrace,
    ] {
        assert!(
            c[must_move as usize].1 > 0,
            "{} never moved: corpus too tame",
            must_move.name()
        );
    }
}

fn tcp_flow(i: u32, payload: &[u8]) -> Frame {
    let mut f = Frame::tcp(
        IpAddr::from([10, 1, (i >> 8) as u8, i as u8]),
        1024 + (i % 60000) as u16,
        ip("10.2.0.1"),
        80,
    );
    f.payload = payload.to_vec();
    f
}

#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn a_full_ring_buffer_and_full_maps_never_fail_a_packet_and_are_counted() {
    let _g = common::lock();
    let mut cfg = AgentConfig::default();
    cfg.maps.events_bytes = 4096; // a page: three head records fit
    cfg.maps.flow_stats = 16; // far fewer than the flows below
    let mut dp = common::load(&cfg, false);
    let pod = netns::anonymous().unwrap();
    let pod_ns = netns::in_netns_file(&pod, netns::current_cookie)
        .unwrap()
        .unwrap();
    let mut table = dp.take_trace_table().unwrap();
    let ctx = TraceContext {
        trace_id: [6; 16],
        ..Default::default()
    };
    // Every connection of the pod's process 4242 is traced.
    for i in 0..1000u32 {
        dp.set_bound_port(agent_common::PortKey::new(pod_ns, 6, 1024 + i as u16), 4242)
            .unwrap();
    }
    table
        .set_process(TraceKey::new(4242, pod_ns), &ctx)
        .unwrap();
    let _events = dp.take_events().unwrap(); // never read: the ring stays full
    let prog = dp.ingress().unwrap();
    netns::in_netns_file(&pod, || {
        for i in 0..1000u32 {
            // New flows (FLOW_NEW records) with request heads (HTTP_HEAD).
            let f = tcp_flow(i, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").build();
            let out = common::run(prog, &f).unwrap();
            assert_eq!(out.verdict, TCX_NEXT);
            assert_eq!(out.data, f);
            assert!(
                agent_common::decode_cb(&out.cb).is_some(),
                "flow {i} tagged despite full maps"
            );
        }
    })
    .unwrap();
    let c = |k: Counter| dp.counter(k);
    assert_eq!(c(Counter::Tagged), 1000, "every packet tagged");
    assert!(
        c(Counter::RingbufFull) > 900,
        "lost records are counted ({})",
        c(Counter::RingbufFull)
    );
    assert!(c(Counter::HeadCaptured) <= 4, "only what fit was captured");
    // The 16-entry LRU keeps the newest flows; inserts evict, they do not fail.
    assert_eq!(c(Counter::StatsUpdateFailed), 0);
    assert!(dp.flow_stats().len() <= 16);
}

#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn a_full_trace_table_is_refused_not_grown() {
    let _g = common::lock();
    let mut cfg = AgentConfig::default();
    cfg.maps.traces = 8;
    let mut dp = common::load(&cfg, false);
    let mut table = dp.take_trace_table().unwrap();
    let ctx = TraceContext {
        trace_id: [7; 16],
        ..Default::default()
    };
    for pid in 0..8 {
        table.set_process(TraceKey::new(pid, 1), &ctx).unwrap();
    }
    let err = table.set_process(TraceKey::new(99, 1), &ctx).unwrap_err();
    assert!(matches!(err, tagflow::tables::TableError::Full(8)), "{err}");
    assert_eq!(table.by_pid().len(), 8);
}
