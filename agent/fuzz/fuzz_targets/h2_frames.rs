//! Passive HTTP/2 capture in userspace: any run of records (frames cut
//! anywhere, flags in any order, HPACK of any bytes) gives heads, counts or
//! a given-up connection, never a panic, and memory stays bounded.
#![no_main]
use agent_common::{
    FlowKey, H2FramesEvent, H2_FRAME_START, H2_PREFACE, H2_REPLIES, MAX_CAPTURE,
};
use libfuzzer_sys::fuzz_target;
use tagflow::sources::h2::{H2Conns, MAX_BLOCK};

fuzz_target!(|data: &[u8]| {
    let ids = vec!["x-request-id".to_string()];
    let mut conns = H2Conns::new(2);
    let mut seq = 0u32;
    let mut rest = data;
    // Each record: a control byte (flags; which of 3 connections, server
    // side or not), a
    // length byte, then that many bytes (up to what is left).
    while rest.len() >= 2 {
        let (ctl, n) = (rest[0], rest[1] as usize * 4);
        let n = n.min(rest.len() - 2).min(MAX_CAPTURE);
        let body = &rest[2..2 + n];
        rest = &rest[2 + n..];
        let mut ev = H2FramesEvent {
            header: Default::default(),
            key: FlowKey {
                local_port: (ctl >> 6) as u16,
                ..Default::default()
            },
            ts_ns: 0,
            pid: 1,
            len: n as u32,
            seq,
            flags: 0,
            data: [0; MAX_CAPTURE],
        };
        ev.data[..n].copy_from_slice(body);
        ev.flags = match ctl & 3 {
            0 if ctl & 8 != 0 => H2_PREFACE | H2_REPLIES,
            0 => H2_PREFACE,
            1 => H2_FRAME_START,
            _ => 0,
        };
        // Mostly contiguous, sometimes not.
        if ctl & 4 == 0 {
            seq = seq.wrapping_add(n as u32);
        } else {
            seq = seq.wrapping_add(n as u32 + 1);
        }
        let decoded = conns.event(&ev, &ids);
        for (i, h) in decoded.requests.into_iter().enumerate() {
            if let Ok((info, _)) = h.head {
                assert_ne!(info.trace_id, [0; 16]);
                assert!(info.target.len() <= MAX_BLOCK * 2);
                // Some requests wait for their replies.
                if i % 2 == 0 {
                    conns.traced(&ev.key, h.stream, info.trace_id);
                }
            }
        }
        for r in decoded.replies {
            assert_eq!(r.request.local_port, ev.key.remote_port);
        }
        assert!(conns.len() <= 2);
    }
});
