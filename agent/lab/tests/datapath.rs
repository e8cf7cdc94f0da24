//! BPF_PROG_TEST_RUN on crafted frames: every frame is handed on unchanged
//! with the pass-on verdict, the right counter moves, and traced flows come
//! out with the trace id in cb. Runs as root; skips only if the kernel refuses.
mod common;

use std::net::IpAddr;

use agent_common::*;
use common::{lock, run};
use tagflow::{
    config::AgentConfig,
    events::{self, Event},
    loader::Datapath,
    netns,
};
use tagflow_lab::frames::{self, Ext6, Frame, L4};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn tcp4() -> Frame {
    Frame::tcp(ip("10.1.0.1"), 40000, ip("10.2.0.1"), 80)
}

fn ctx(b: u8) -> TraceContext {
    TraceContext {
        trace_id: [b; 16],
        flags: TRACE_FLAG_SAMPLED | TraceSource::Api.to_flags(),
        ..Default::default()
    }
}

/// A loaded datapath plus a namespace standing in for a pod.
struct Bed {
    dp: Datapath,
    pod: std::fs::File,
    pod_ns: u64,
}

fn bed(cfg: &AgentConfig) -> Bed {
    let mut dp = common::load(cfg, false);
    let pod = netns::anonymous().expect("new netns");
    let pod_ns = netns::in_netns_file(&pod, netns::current_cookie)
        .unwrap()
        .unwrap();
    // Frames run from inside the pod on ifindex 1, as if on the pod's veth:
    // the interface is the pod's, as the agent records for a veth. (The
    // netns helper, where TC may call it, reads the same namespace from
    // test_run's socket.)
    dp.set_iface_netns(1, pod_ns).unwrap();
    Bed { dp, pod, pod_ns }
}

impl Bed {
    /// Runs a frame as if sent from the pod.
    fn run(&mut self, frame: &[u8]) -> common::Run {
        let pod = &self.pod;
        let prog = self.dp.ingress().unwrap();
        netns::in_netns_file(pod, || run(prog, frame))
            .unwrap()
            .unwrap_or_else(|e| panic!("test_run of a {}-byte frame: {e:?}", frame.len()))
    }

    fn counters(&self) -> Vec<u64> {
        self.dp
            .counters()
            .unwrap()
            .iter()
            .map(|(_, v)| *v)
            .collect()
    }

    /// Runs `frame`, asserts the verdict, the unchanged bytes, and that
    /// exactly `want` among the terminal counters moved (by one).
    fn expect(&mut self, frame: &[u8], want: Counter, what: &str) -> common::Run {
        let before = self.counters();
        let r = self.run(frame);
        assert_eq!(r.verdict, TCX_NEXT, "{what}: verdict");
        assert_eq!(r.data, frame, "{what}: bytes changed");
        let after = self.counters();
        for t in Counter::TERMINAL {
            let d = after[t as usize] - before[t as usize];
            assert_eq!(
                d,
                (t == want) as u64,
                "{what}: counter {} moved by {d}",
                t.name()
            );
        }
        assert_eq!(
            after[Counter::Seen as usize] - before[Counter::Seen as usize],
            1,
            "{what}: seen"
        );
        r
    }
}

/// A namespace gate is open only while the pod has some trace entry: give
/// the pod one for an unrelated process so frames go the whole way.
fn open_gate(b: &mut Bed, table: &mut tagflow::tables::TraceTable) {
    table
        .set_process(TraceKey::new(999_999, b.pod_ns), &ctx(0x99))
        .unwrap();
}

fn corpus() -> Vec<(String, Frame, Counter)> {
    let mut v = Vec::new();
    v.push(("ipv4/tcp".into(), tcp4(), Counter::NoTrace));
    let mut f = tcp4();
    f.ip4_options = vec![0x94, 0x04, 0, 0, 1, 1, 1, 0]; // router alert + NOPs
    v.push(("ipv4 with options".into(), f, Counter::NoTrace));
    v.push((
        "ipv4/udp".into(),
        Frame::udp(ip("10.1.0.1"), 5353, ip("10.2.0.1"), 53),
        Counter::NoTrace,
    ));
    let mut f = tcp4();
    f.vlans = vec![(frames::ETH_P_8021Q, 7)];
    v.push(("vlan".into(), f, Counter::NoTrace));
    let mut f = tcp4();
    f.vlans = vec![(frames::ETH_P_8021AD, 7), (frames::ETH_P_8021Q, 8)];
    v.push(("qinq".into(), f, Counter::NoTrace));
    let v6 = Frame::tcp(ip("fd00::1"), 40000, ip("fd00::2"), 80);
    v.push(("ipv6/tcp".into(), v6.clone(), Counter::NoTrace));
    for (name, e) in [
        ("hop-by-hop", Ext6::HopByHop),
        ("routing", Ext6::Routing),
        ("dest-opts", Ext6::DestOpts),
        ("first fragment", Ext6::Fragment(0)),
    ] {
        let mut f = v6.clone();
        f.ext6 = vec![e];
        v.push((format!("ipv6 + {name}"), f, Counter::NoTrace));
    }
    let mut f = Frame::udp(ip("fd00::1"), 1, ip("fd00::2"), 2);
    f.ext6 = vec![
        Ext6::HopByHop,
        Ext6::DestOpts,
        Ext6::Routing,
        Ext6::DestOpts,
    ];
    v.push((
        "ipv6 + 4 extension headers / udp".into(),
        f,
        Counter::NoTrace,
    ));
    let mut f = v6.clone();
    f.ext6 = vec![Ext6::DestOpts; 7];
    v.push((
        "ipv6 + 7 extension headers (over the bound)".into(),
        f,
        Counter::ParseFailed,
    ));
    let mut f = v6.clone();
    f.ext6 = vec![Ext6::Fragment(3)];
    v.push(("ipv6 non-first fragment".into(), f, Counter::Fragment));
    let mut f = tcp4();
    f.ip4_frag_offset = 5;
    v.push(("ipv4 non-first fragment".into(), f, Counter::Fragment));
    let mut f = tcp4();
    f.l4 = L4::Other(1);
    v.push(("icmp".into(), f, Counter::OtherL4));
    v
}

#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn every_frame_is_handed_on_unchanged_and_counted() {
    let _g = lock();
    let mut b = bed(&AgentConfig::default());
    let mut table = b.dp.take_trace_table().unwrap();
    // Gate closed first (pod without traces), then open (full resolution).
    for round in 0..2 {
        if round == 1 {
            open_gate(&mut b, &mut table);
        }
        for (name, f, want) in corpus() {
            b.expect(&f.build(), want, &format!("{name} (round {round})"));
        }
        b.expect(&frames::arp(), Counter::NonIp, "arp");
        // Bogus IHL (4 words).
        let mut bad = tcp4().build();
        bad[14] = 0x44;
        b.expect(&bad, Counter::ParseFailed, "ihl 4");
        // TCP data offset below 5.
        let mut bad = tcp4().build();
        bad[14 + 20 + 12] = 0x40;
        b.expect(&bad, Counter::ParseFailed, "tcp doff 4");
    }
}

#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn every_truncation_is_handed_on_and_counted() {
    let _g = lock();
    let mut b = bed(&AgentConfig::default());
    let mut table = b.dp.take_trace_table().unwrap();
    open_gate(&mut b, &mut table);
    let mut v6 = Frame::udp(ip("fd00::1"), 1, ip("fd00::2"), 2);
    v6.ext6 = vec![Ext6::HopByHop, Ext6::Fragment(0)];
    let mut qinq = tcp4();
    qinq.vlans = vec![(frames::ETH_P_8021AD, 1), (frames::ETH_P_8021Q, 2)];
    let mut opts = tcp4();
    opts.ip4_options = vec![1, 1, 1, 1];
    for (name, f) in [
        ("ipv4/tcp", tcp4()),
        ("ipv6+ext/udp", v6),
        ("qinq", qinq),
        ("ipv4 options", opts),
    ] {
        let full = f.build();
        let need = f.headers_len();
        let mut ran = 0;
        for len in 0..=full.len() {
            let cut = &full[..len];
            let prog = b.dp.ingress().unwrap();
            let refused = netns::in_netns_file(&b.pod, || run(prog, cut))
                .unwrap()
                .is_err();
            if refused {
                // test_run refuses frames without a byte past Ethernet, and
                // IP frames shorter than their fixed IP header: such frames
                // never reach a program. Only truncated ones may be refused.
                assert!(len < need, "{name}: kernel refused the {len}-byte frame");
                continue;
            }
            ran += 1;
            let want = if len < need {
                Counter::ParseFailed
            } else {
                Counter::NoTrace
            };
            b.expect(cut, want, &format!("{name} cut to {len}"));
        }
        assert!(
            ran > need / 4,
            "{name}: only {ran} truncations reached the program"
        );
    }
    let arp = frames::arp();
    for len in 14..=arp.len() {
        b.expect(&arp[..len], Counter::NonIp, &format!("arp cut to {len}"));
    }
}

#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn flow_trace_is_written_to_cb_and_counted() {
    let _g = lock();
    let mut b = bed(&AgentConfig::default());
    let mut table = b.dp.take_trace_table().unwrap();
    let mut events = b.dp.take_events().unwrap();
    for (name, f) in [
        ("ipv4", tcp4()),
        ("ipv6", Frame::udp(ip("fd00::1"), 7, ip("fd00::2"), 9)),
    ] {
        let key = f.flow_key(b.pod_ns);
        let id = if name == "ipv4" { 0x41 } else { 0x61 };
        table.set_flow(key, &ctx(id)).unwrap();
        for i in 0..3 {
            let r = b.expect(&f.build(), Counter::Tagged, name);
            let (got, flags) = decode_cb(&r.cb).expect("tagflow magic in cb[4]");
            assert_eq!(got, [id; 16], "{name}: trace id in cb");
            assert_ne!(flags & CB_FLAG_FLOW_MATCH, 0, "{name}: flow-match flag");
            assert_ne!(flags & CB_FLAG_SAMPLED, 0, "{name}: sampled flag");
            assert_eq!(r.mark, 0, "{name}: mark untouched by default");
            let stats = b.dp.flow_stats();
            let (_, s) = stats
                .iter()
                .find(|(k, _)| *k == key)
                .expect("FLOW_STATS entry");
            assert_eq!(s.trace_id, [id; 16]);
            assert_eq!(s.packets, i + 1, "{name}: packets accounted");
            assert_eq!(s.bytes, (i + 1) * f.build().len() as u64);
            assert_eq!(s.matched, MATCH_FLOW);
            assert!(s.first_ns > 0 && s.last_ns >= s.first_ns);
        }
        // One new-flow event for the pair, not one per packet.
        let mut news = 0;
        while let Some(item) = events.next() {
            match events::decode(&item) {
                Event::HttpHead(_) => {}
                Event::FlowNew(e) => {
                    assert_eq!(e.key, key);
                    assert_eq!(e.stats.trace_id, [id; 16]);
                    news += 1;
                }
                other => panic!("unexpected event {other:?}"),
            }
        }
        assert_eq!(news, 1, "{name}: events");
    }
    // The slow path ran once per flow; the rest came from the flow cache.
    assert_eq!(b.dp.counter(Counter::Resolved), 2);
}

#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn process_trace_via_bound_port_and_flow_beats_process() {
    let _g = lock();
    let mut b = bed(&AgentConfig::default());
    let mut table = b.dp.take_trace_table().unwrap();
    let f = tcp4();
    let key = f.flow_key(b.pod_ns);
    // The server bound port 40000 in the pod: its packets belong to pid 4242.
    b.dp.set_bound_port(PortKey::new(b.pod_ns, PROTO_TCP, 40000), 4242)
        .unwrap();
    table
        .set_process(TraceKey::new(4242, b.pod_ns), &ctx(0x42))
        .unwrap();
    let r = b.expect(&f.build(), Counter::Tagged, "by pid");
    assert_eq!(decode_cb(&r.cb).unwrap().0, [0x42; 16]);
    let s =
        b.dp.flow_stats()
            .into_iter()
            .find(|(k, _)| *k == key)
            .unwrap()
            .1;
    assert_eq!((s.pid, s.owner, s.matched), (4242, OWNER_BOUND, MATCH_PID));
    // An exact flow entry wins over the process's context.
    table.set_flow(key, &ctx(0x77)).unwrap();
    let r = b.expect(&f.build(), Counter::Tagged, "by flow");
    assert_eq!(decode_cb(&r.cb).unwrap().0, [0x77; 16]);
    // Another process in the same pod is not tagged.
    let other = Frame::tcp(ip("10.1.0.1"), 40100, ip("10.2.0.1"), 80);
    b.expect(&other.build(), Counter::NoTrace, "unowned flow");
    // Clearing with the wrong trace id leaves the entry; the right one removes it.
    assert!(!table.clear_flow(&key, &[0x42; 16]).unwrap());
    assert!(table.clear_flow(&key, &[0x77; 16]).unwrap());
    let r = b.expect(&f.build(), Counter::Tagged, "back to pid");
    assert_eq!(decode_cb(&r.cb).unwrap().0, [0x42; 16]);
    assert!(table
        .clear_process(&TraceKey::new(4242, b.pod_ns), &[0x42; 16])
        .unwrap());
    b.expect(&f.build(), Counter::NoTrace, "cleared");
}

#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn a_new_trace_on_a_flow_hands_over_the_old_pairs_final_numbers() {
    let _g = lock();
    let mut b = bed(&AgentConfig::default());
    let mut table = b.dp.take_trace_table().unwrap();
    let mut events = b.dp.take_events().unwrap();
    let f = tcp4();
    let key = f.flow_key(b.pod_ns);
    table.set_flow(key, &ctx(1)).unwrap();
    for _ in 0..3 {
        b.expect(&f.build(), Counter::Tagged, "request 1");
    }
    // Next request on the keep-alive connection.
    table.set_flow(key, &ctx(2)).unwrap();
    b.expect(&f.build(), Counter::Tagged, "request 2");
    let got: Vec<Event> = std::iter::from_fn(|| events.next().map(|i| events::decode(&i)))
        .filter(|e| !matches!(e, Event::HttpHead(_)))
        .collect();
    match got.as_slice() {
        [Event::FlowNew(a), Event::FlowEnd(end), Event::FlowNew(c)] => {
            assert_eq!(a.stats.trace_id, [1; 16]);
            assert_eq!(end.stats.trace_id, [1; 16]);
            assert_eq!(end.stats.packets, 3, "final packet count of request 1");
            assert_eq!(c.stats.trace_id, [2; 16]);
        }
        other => panic!("events: {other:?}"),
    }
}

#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn mark_bits_are_applied_only_when_configured() {
    let _g = lock();
    let cfg = AgentConfig {
        mark_value: 0x0a00,
        mark_mask: 0x0f00,
        ..Default::default()
    };
    let mut b = bed(&cfg);
    let mut table = b.dp.take_trace_table().unwrap();
    let f = tcp4();
    table.set_flow(f.flow_key(b.pod_ns), &ctx(3)).unwrap();
    let pod = &b.pod;
    let prog = b.dp.ingress().unwrap();
    let frame = f.build();
    let r = netns::in_netns_file(pod, || {
        common::run_ctx(prog, &frame, &frames::skb_ctx(1, 0xf0f0_f1f1, [0; 5]))
    })
    .unwrap()
    .unwrap();
    assert_eq!(r.mark, 0xf0f0_faf1, "only the masked bits change");
    assert_eq!(r.data, frame);
}

#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn socketless_or_host_packets_take_the_interfaces_namespace() {
    let _g = lock();
    let mut dp = common::load(&AgentConfig::default(), false);
    let mut table = dp.take_trace_table().unwrap();
    // test_run skbs from the host namespace look like socket-less packets on
    // a pod's veth: their namespace must come from IFACE_NETNS.
    let fake_pod = 0x7a67_0000_0001;
    dp.set_iface_netns(1, fake_pod).unwrap();
    let f = tcp4();
    table.set_flow(f.flow_key(fake_pod), &ctx(9)).unwrap();
    let before = dp.counter(Counter::NoSocket);
    let r = run(dp.ingress().unwrap(), &f.build()).unwrap();
    assert_eq!(r.verdict, TCX_NEXT);
    assert_eq!(decode_cb(&r.cb).map(|c| c.0), Some([9; 16]));
    // Only the helper variant tells socket-less packets apart; without the
    // helper every veth packet takes the interface's namespace.
    let counted = (dp.ingress_name() == agent_common::programs::INGRESS) as u64;
    assert_eq!(dp.counter(Counter::NoSocket), before + counted);
}

#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn http_request_heads_are_captured_even_in_pods_without_traces() {
    let _g = lock();
    let cfg = AgentConfig {
        capture_len: 64,
        ..Default::default()
    };
    let mut b = bed(&cfg);
    let mut events = b.dp.take_events().unwrap();
    let mut f = tcp4();
    f.payload = b"POST /orders HTTP/1.1\r\nHost: shop\r\nX-Request-Id: 0123456789abcdef0123456789abcdef\r\n\r\n".to_vec();
    // The gate is closed (no traces in the pod): the packet is untagged,
    // but its head still reaches userspace.
    b.expect(&f.build(), Counter::NoTrace, "head");
    let mut not_http = tcp4();
    not_http.payload = b"\x16\x03\x01 TLS hello".to_vec();
    b.expect(&not_http.build(), Counter::NoTrace, "tls");
    let mut udp = Frame::udp(ip("10.1.0.1"), 1, ip("10.2.0.1"), 2);
    udp.payload = b"GET / HTTP/1.1\r\n\r\n".to_vec();
    b.expect(
        &udp.build(),
        Counter::NoTrace,
        "udp is never an HTTP/1 head",
    );
    let heads: Vec<_> = std::iter::from_fn(|| events.next().map(|i| events::decode(&i))).collect();
    assert_eq!(heads.len(), 1, "{heads:?}");
    let Event::HttpHead(h) = &heads[0] else {
        panic!("{heads:?}")
    };
    assert_eq!(h.key, f.flow_key(b.pod_ns));
    assert_eq!(h.len, 64, "capture_len bounds the copy");
    assert_eq!(&h.data[..64], &f.payload[..64]);
    assert_eq!(b.dp.counter(Counter::HeadCaptured), 1);
    // A short payload is copied whole.
    let mut short = tcp4();
    short.payload = b"GET /x HTTP/1.1\r\n".to_vec();
    b.expect(&short.build(), Counter::NoTrace, "short head");
    let Some(Event::HttpHead(h)) = events.next().map(|i| events::decode(&i)) else {
        panic!("no head")
    };
    assert_eq!(&h.data[..h.len as usize], &short.payload[..]);
}

#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn capture_can_be_turned_off() {
    let _g = lock();
    let cfg = AgentConfig {
        capture_len: 0,
        ..Default::default()
    };
    let mut b = bed(&cfg);
    let mut events = b.dp.take_events().unwrap();
    b.expect(&tcp4().build(), Counter::NoTrace, "head, capture off");
    assert!(events.next().is_none());
    assert_eq!(b.dp.counter(Counter::HeadCaptured), 0);
}

#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn heads_of_connections_told_to_skip_are_not_copied() {
    let _g = lock();
    let mut b = bed(&AgentConfig::default());
    let mut events = b.dp.take_events().unwrap();
    let f = tcp4();
    // The agent saw a head without an id on this connection.
    b.dp.skip_capture(&f.flow_key(b.pod_ns), u64::MAX).unwrap();
    b.expect(&f.build(), Counter::NoTrace, "skipped head");
    assert!(events.next().is_none(), "nothing copied");
    assert_eq!(b.dp.counter(Counter::HeadSkipped), 1);
    // Other connections are still captured, and an expired skip lets heads through.
    let other = Frame::tcp(ip("10.1.0.1"), 40001, ip("10.2.0.1"), 80);
    b.expect(&other.build(), Counter::NoTrace, "other connection");
    assert!(matches!(
        events.next().map(|i| events::decode(&i)),
        Some(Event::HttpHead(_))
    ));
    b.dp.skip_capture(&f.flow_key(b.pod_ns), 1).unwrap();
    b.expect(&f.build(), Counter::NoTrace, "skip expired");
    assert!(matches!(
        events.next().map(|i| events::decode(&i)),
        Some(Event::HttpHead(_))
    ));
    assert_eq!(b.dp.counter(Counter::HeadCaptured), 2);
}

/// A bed whose pod has one traced UDP flow (the frame), its gate open.
fn bed_with_a_traced_flow() -> (Bed, tagflow::tables::TraceTable, Frame) {
    let mut b = bed(&AgentConfig::default());
    let mut table = b.dp.take_trace_table().unwrap();
    open_gate(&mut b, &mut table);
    let traced = Frame::udp(ip("10.1.0.1"), 7, ip("10.2.0.1"), 9);
    table
        .set_flow(traced.flow_key(b.pod_ns), &ctx(0x33))
        .unwrap();
    (b, table, traced)
}

#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn flows_idle_past_the_gc_age_leave_flow_stats_traced_or_not() {
    let _g = lock();
    let (mut b, _table, traced) = bed_with_a_traced_flow();
    b.expect(&traced.build(), Counter::Tagged, "traced");
    b.expect(&tcp4().build(), Counter::NoTrace, "untraced");
    let stats = b.dp.flow_stats();
    assert_eq!(stats.len(), 2);
    assert!(
        stats.iter().all(|(_, s)| s.last_ns > 0),
        "\"no trace\" entries are stamped too: {stats:?}"
    );
    let newest = stats.iter().map(|(_, s)| s.last_ns).max().unwrap();
    let mut keeper = b.dp.housekeeper().unwrap();
    // Younger than the age: kept.
    let (traced_age, negative_age) = (60_000_000_000, 10_000_000_000);
    assert_eq!(keeper.gc(newest + 1_000, traced_age, negative_age), (0, 0));
    assert_eq!(b.dp.flow_stats().len(), 2);
    // "No trace" entries go first; the traced one after its own age.
    assert_eq!(
        keeper
            .gc(newest + 11_000_000_000, traced_age, negative_age)
            .0,
        1
    );
    assert_eq!(b.dp.flow_stats().len(), 1);
    assert!(!b.dp.flow_stats()[0].1.is_negative());
    assert_eq!(
        keeper
            .gc(newest + 61_000_000_000, traced_age, negative_age)
            .0,
        1
    );
    assert!(b.dp.flow_stats().is_empty());
    let before = b.dp.counter(Counter::Resolved);
    b.expect(&traced.build(), Counter::Tagged, "traced again");
    assert_eq!(b.dp.counter(Counter::Resolved), before + 1);
    assert_eq!(b.dp.flow_stats().len(), 1);
}

#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn the_flow_gc_and_the_fill_count_walk_thousands_of_flows() {
    let _g = lock();
    let (mut b, _table, traced) = bed_with_a_traced_flow();
    b.expect(&traced.build(), Counter::Tagged, "traced");
    // Untraced connections, as a pod opening many would leave them.
    let n = 2_600u16;
    for port in 0..n {
        b.run(&Frame::tcp(ip("10.1.0.1"), 20_000 + port, ip("10.2.0.1"), 80).build());
    }
    let stats = b.dp.flow_stats();
    let keys: std::collections::HashSet<_> = stats.iter().map(|(k, _)| *k).collect();
    assert_eq!(stats.len(), n as usize + 1);
    assert_eq!(keys.len(), stats.len(), "an entry read twice");
    // The daemon walks on a thread of its own, with its own handles.
    let mut keeper = b.dp.housekeeper().unwrap();
    let fill = keeper.map_fill();
    let flow_fill = fill.iter().find(|(m, ..)| m == "FLOW_STATS").unwrap();
    assert_eq!(flow_fill.1, n as u64 + 1);
    let newest = stats.iter().map(|(_, s)| s.last_ns).max().unwrap();
    let (traced_age, negative_age) = (60_000_000_000, 10_000_000_000);
    let walk =
        std::thread::spawn(move || keeper.gc(newest + 11_000_000_000, traced_age, negative_age));
    assert_eq!(walk.join().unwrap().0, n as u64);
    let left = b.dp.flow_stats();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].0, traced.flow_key(b.pod_ns));
}

/// An HTTP/2 frame (9-byte header + payload).
fn h2_frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let n = payload.len() as u32;
    let mut f = vec![(n >> 16) as u8, (n >> 8) as u8, n as u8, ty, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn http2_header_frames_are_walked_from_the_preface_and_decoded_in_userspace() {
    use tagflow::sources::h2::H2Conns;
    let _g = lock();
    let cfg = AgentConfig {
        capture_len: 64,
        ..Default::default()
    };
    let mut b = bed(&cfg);
    let mut events = b.dp.take_events().unwrap();
    let mut enc = loona_hpack::Encoder::new();
    let mut request = |stream: u32| {
        let rid = format!("{stream:08}-1111-4222-8333-444455556666");
        let block = enc.encode([
            (&b":method"[..], &b"POST"[..]),
            (b":scheme", b"http"),
            (b":path", b"/shop.Cart/Add"),
            (b":authority", b"cart:50051"),
            (b"content-type", b"application/grpc"),
            (b"x-request-id", rid.as_bytes()),
        ]);
        h2_frame(1, 0x4, stream, &block)
    };
    // The client's stream as it goes out: the preface, SETTINGS, a request
    // with its message, a 300-byte message cut over two segments, a request
    // whose frame header the segment boundary cuts, then 30 requests in
    // one segment (more frames than one run of the walk takes).
    let mut stream = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    stream.extend(h2_frame(4, 0, 0, &[0, 3, 0, 0, 0, 100]));
    stream.extend(request(1));
    stream.extend(h2_frame(0, 0x1, 1, &[7; 10]));
    stream.extend(h2_frame(0, 0x1, 1, &[8; 300]));
    let cut1 = stream.len() - 200;
    let cut2 = stream.len() + 4;
    stream.extend(request(3));
    let mut n = 5;
    let cut3 = stream.len();
    while n < 5 + 60 {
        stream.extend(request(n));
        n += 2;
    }
    let seq0 = 1_000_000u32;
    // The server's stream: where its settings ended when the preface left.
    let ack0 = 7_000_000u32;
    let mut f = tcp4();
    f.ack = ack0;
    for (from, to) in [(0, cut1), (cut1, cut2), (cut2, cut3), (cut3, stream.len())] {
        f.seq = seq0 + from as u32;
        f.payload = stream[from..to].to_vec();
        b.expect(&f.build(), Counter::NoTrace, "h2 segment");
    }
    // A retransmission changes nothing.
    f.seq = seq0 + cut1 as u32;
    f.payload = stream[cut1..cut2].to_vec();
    b.expect(&f.build(), Counter::NoTrace, "retransmitted segment");
    let records: Vec<_> = std::iter::from_fn(|| events.next().map(|i| events::decode(&i)))
        .map(|e| match e {
            Event::H2Frames(h) => h,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(records[0].flags, H2_PREFACE);
    // On a loopback (test runs are on ifindex 1), the server's side is
    // followed too, from the preface's acknowledgment number.
    let server_key = f.flow_key(b.pod_ns).reversed_in(b.pod_ns);
    assert_eq!(records[1].flags, H2_PREFACE | H2_REPLIES);
    assert_eq!((records[1].key, records[1].seq), (server_key, ack0));
    assert_eq!(b.dp.counter(Counter::H2Started), 1);
    assert_eq!(b.dp.counter(Counter::H2Lost), 0);
    // Every byte sent is a header frame's, at its place in the stream.
    for r in &records[2..] {
        let at = r.seq.wrapping_sub(seq0) as usize;
        assert_eq!(&r.data[..r.len as usize], &stream[at..at + r.len as usize]);
        assert_eq!(r.key, f.flow_key(b.pod_ns));
    }
    // The decoder reads every request's id with the connection's table.
    let mut conns = H2Conns::new(4);
    let ids = vec!["x-request-id".to_string()];
    let heads: Vec<_> = records
        .iter()
        .flat_map(|r| conns.event(r, &ids).requests)
        .collect();
    let want: Vec<String> = std::iter::once(1)
        .chain(std::iter::once(3))
        .chain((5..65).step_by(2))
        .map(|s| format!("{s:08}-1111-4222-8333-444455556666"))
        .collect();
    let got: Vec<String> = heads
        .iter()
        .map(|h| {
            let (info, _) = h.head.as_ref().expect("a request with an id");
            info.request_id.clone().unwrap()
        })
        .collect();
    assert_eq!(got, want, "{:?}", conns.stats);
    // The server answers stream 3 (a response, a message, its trailers,
    // in one segment after its SETTINGS ACK): the walk copies the two
    // header blocks of the server's side, decoded with the server's table.
    let mut enc = loona_hpack::Encoder::new();
    let mut answer = h2_frame(4, 0x1, 0, &[]);
    let block = enc.encode([
        (&b":status"[..], &b"200"[..]),
        (b"content-type", b"application/grpc"),
    ]);
    answer.extend(h2_frame(1, 0x4, 3, &block));
    answer.extend(h2_frame(0, 0, 3, &[5; 40]));
    let block = enc.encode([(&b"grpc-status"[..], &b"7"[..])]);
    answer.extend(h2_frame(1, 0x4 | 0x1, 3, &block));
    let mut s = tcp4();
    (s.src, s.dst, s.sport, s.dport) = (f.dst, f.src, f.dport, f.sport);
    s.seq = ack0;
    s.payload = answer;
    b.expect(&s.build(), Counter::NoTrace, "the server's answer");
    let replies: Vec<_> = std::iter::from_fn(|| events.next().map(|i| events::decode(&i)))
        .map(|e| match e {
            Event::H2Frames(h) => h,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(replies.len(), 2, "two header frames copied");
    assert!(replies.iter().all(|r| r.key == server_key));
    conns.traced(&f.flow_key(b.pod_ns), 3, [3; 16]);
    let got: Vec<_> = replies
        .iter()
        .flat_map(|r| conns.event(r, &ids).replies)
        .map(|r| (r.stream, r.trace, r.status, r.grpc_status))
        .collect();
    assert_eq!(
        got,
        vec![
            (3, Some([3; 16]), Some(200), None),
            (3, Some([3; 16]), None, Some(7))
        ]
    );
    // A gap (a segment the datapath never saw) gives the connection up.
    f.seq = seq0 + stream.len() as u32 + 100;
    f.payload = request(201);
    b.expect(&f.build(), Counter::NoTrace, "after a gap");
    let lost = events.next().map(|i| events::decode(&i));
    assert!(
        matches!(&lost, Some(Event::H2Frames(h)) if h.flags == H2_LOST),
        "{lost:?}"
    );
    assert_eq!(b.dp.counter(Counter::H2Lost), 1);
    f.seq += f.payload.len() as u32;
    b.expect(&f.build(), Counter::NoTrace, "given up");
    assert!(events.next().is_none());
}

/// The bench's floor ladder (`bench::floor`): every reference program the
/// kernel offers loads and does its work (the ladder fails when a rung
/// returns before its lookup), so the floor rows stay measurable.
#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn the_floor_ladder_runs_every_rung_this_kernel_offers() {
    let _g = lock();
    let rows = tagflow_lab::bench::floor::floor(10_000, 1).expect("floor ladder");
    // Empty, parse, both key sizes and the cookie need nothing past 5.15.
    assert!(rows.len() >= 5, "{} rows", rows.len());
    assert!(rows[0].scenario.ends_with("empty program"));
    assert!(rows[1..].iter().all(|r| r.value > 0.0 && r.ratio.is_some()));
}
