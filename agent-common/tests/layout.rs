//! Layout of the shared ABI: offsets that the eBPF programs, the agent and
//! third-party cb readers rely on.
use agent_common::*;
use core::mem::{offset_of, size_of};

#[test]
fn trace_types() {
    assert_eq!(size_of::<TraceKey>(), 16);
    assert_eq!(offset_of!(TraceKey, pid), 0);
    assert_eq!(offset_of!(TraceKey, netns), 8);
    assert_eq!(size_of::<TraceContext>(), 40);
    assert_eq!(offset_of!(TraceContext, trace_id), 0);
    assert_eq!(offset_of!(TraceContext, parent_span_id), 16);
    assert_eq!(offset_of!(TraceContext, flags), 24);
    assert_eq!(offset_of!(TraceContext, updated_ns), 32);
}

#[test]
fn flow_types() {
    assert_eq!(size_of::<FlowKey>(), 48);
    assert_eq!(offset_of!(FlowKey, netns), 0);
    assert_eq!(offset_of!(FlowKey, local_addr), 8);
    assert_eq!(offset_of!(FlowKey, remote_addr), 24);
    assert_eq!(offset_of!(FlowKey, local_port), 40);
    assert_eq!(offset_of!(FlowKey, remote_port), 42);
    assert_eq!(offset_of!(FlowKey, family), 44);
    assert_eq!(offset_of!(FlowKey, proto), 45);
    assert_eq!(size_of::<FlowStats>(), 72);
    assert_eq!(offset_of!(FlowStats, packets), 24);
    assert_eq!(offset_of!(FlowStats, gen), 56);
    assert_eq!(offset_of!(FlowStats, cb_meta), 64);
    assert_eq!(offset_of!(FlowStats, tcp_flags), 68);
    assert_eq!(size_of::<PortKey>(), 16);
    assert_eq!(offset_of!(PortKey, port), 8);
    assert_eq!(offset_of!(PortKey, proto), 10);
    assert_eq!(size_of::<SockOwner>(), 64);
    assert_eq!(offset_of!(SockOwner, tid), 4);
    assert_eq!(offset_of!(SockOwner, via), 8);
    assert_eq!(offset_of!(SockOwner, netns), 56);
}

#[test]
fn sock_ops_fields_make_the_key_the_datapath_parses() {
    use std::net::SocketAddr;
    // 10.0.0.2:8080 ← 10.0.0.1:40000, as a little-endian kernel reports
    // them: addresses in network order, the remote port shifted up.
    let be = |a: [u8; 4]| u32::from_ne_bytes(a);
    let rp = (40000u16.to_be() as u32) << 16;
    let k = FlowKey::from_sock_ops(
        7,
        AF_INET,
        be([10, 0, 0, 2]),
        be([10, 0, 0, 1]),
        [0; 4],
        [0; 4],
        8080,
        rp,
    );
    let want = FlowKey::new(
        7,
        PROTO_TCP,
        "10.0.0.2:8080".parse::<SocketAddr>().unwrap(),
        "10.0.0.1:40000".parse::<SocketAddr>().unwrap(),
    );
    assert_eq!(k, want);
    // A v4-mapped IPv6 socket (a dual-stack listener) is keyed as IPv4.
    let m = |a: [u8; 4]| [0, 0, be([0, 0, 0xff, 0xff]), be(a)];
    let k6 = FlowKey::from_sock_ops(
        7,
        AF_INET6,
        0,
        0,
        m([10, 0, 0, 2]),
        m([10, 0, 0, 1]),
        8080,
        rp,
    );
    assert_eq!(k6, want);
    // A real IPv6 one stays IPv6.
    let l: std::net::Ipv6Addr = "fd00::2".parse().unwrap();
    let r: std::net::Ipv6Addr = "fd00::1".parse().unwrap();
    let w = |a: std::net::Ipv6Addr| {
        let o = a.octets();
        [0, 1, 2, 3].map(|i| be([o[i * 4], o[i * 4 + 1], o[i * 4 + 2], o[i * 4 + 3]]))
    };
    let k6 = FlowKey::from_sock_ops(7, AF_INET6, 0, 0, w(l), w(r), 8080, rp);
    assert_eq!(
        k6,
        FlowKey::new(
            7,
            PROTO_TCP,
            SocketAddr::new(l.into(), 8080),
            SocketAddr::new(r.into(), 40000)
        )
    );
}

#[test]
fn event_and_config() {
    assert_eq!(size_of::<FlowEvent>(), 192);
    assert_eq!(offset_of!(FlowEvent, via), 144);
    assert_eq!(offset_of!(FlowEvent, key), 8);
    assert_eq!(offset_of!(FlowEvent, stats), 56);
    assert_eq!(offset_of!(FlowEvent, parent_span_id), 128);
    assert_eq!(size_of::<DatapathConfig>(), 32);
    assert_eq!(offset_of!(DatapathConfig, capture_len), 24);
    assert_eq!(size_of::<HttpHeadEvent>(), 1096);
    assert_eq!(offset_of!(HttpHeadEvent, data), 72);
    assert_eq!(offset_of!(DatapathConfig, host_netns), 16);
    assert_eq!(
        DatapathConfig::default().mark_mask,
        0,
        "mark untouched by default"
    );
}

#[test]
fn counters_are_dense_and_named_uniquely() {
    for (i, c) in Counter::ALL.iter().enumerate() {
        assert_eq!(*c as u32, i as u32);
    }
    let mut names: Vec<_> = Counter::ALL.iter().map(|c| c.name()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), Counter::COUNT as usize);
}

#[test]
fn cb_round_trip_and_magic() {
    let id: [u8; 16] = core::array::from_fn(|i| (i as u8).wrapping_mul(17).wrapping_add(1));
    let cb = encode_cb(&id, CB_FLAG_SAMPLED | CB_FLAG_FLOW_MATCH);
    assert_eq!(cb[4] & CB_MAGIC_MASK, CB_MAGIC);
    // The memory of cb[0..4] is the trace id.
    let bytes: Vec<u8> = cb[..4].iter().flat_map(|w| w.to_ne_bytes()).collect();
    assert_eq!(bytes, id);
    assert_eq!(
        decode_cb(&cb),
        Some((id, CB_FLAG_SAMPLED | CB_FLAG_FLOW_MATCH))
    );
    assert_eq!(decode_cb(&[1, 2, 3, 4, 0x1234_0001]), None);
}

#[test]
fn trace_source_round_trip() {
    for s in [
        TraceSource::Unknown,
        TraceSource::Registration,
        TraceSource::Passive,
        TraceSource::Api,
    ] {
        assert_eq!(
            TraceSource::from_flags(s.to_flags() | TRACE_FLAG_SAMPLED),
            s
        );
    }
}
