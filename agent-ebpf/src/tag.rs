//! What happens to a packet once its trace is known: cb ABI, optional mark,
//! per-flow stats and events. Never touches packet bytes.
use crate::{
    maps::{count, EVENTS, FLOW_STATS},
    resolve::Owner,
};
use agent_common::*;
use aya_ebpf::{helpers::generated::bpf_ktime_get_ns, programs::TcContext};
use core::intrinsics::{atomic_xadd, AtomicOrdering};

/// Packet time on the `CLOCK_MONOTONIC` scale. TCP stamps every segment with
/// its (monotonic) departure time and the kernel keeps it across the veth;
/// reading it is free, while `bpf_ktime_get_ns` costs ~30 ns in a VM.
/// `BPF_SKB_TSTAMP_DELIVERY_MONO` (Linux 5.18; an unnamed enum in the
/// bindings).
const TSTAMP_DELIVERY_MONO: u8 = 1;

/// `STAMP`: the kernel has `__sk_buff.tstamp_type` (5.18); a program built
/// with `false` never touches it, so older verifiers accept it.
#[inline(always)]
pub fn now<const STAMP: bool>(ctx: &TcContext) -> u64 {
    let skb = unsafe { &*ctx.skb.skb };
    if STAMP && skb.tstamp_type == TSTAMP_DELIVERY_MONO && skb.tstamp != 0 {
        return skb.tstamp;
    }
    unsafe { bpf_ktime_get_ns() }
}

/// The cb[4] word for a trace.
#[inline(always)]
pub fn cb_meta(trace_flags: u32, matched: u8) -> u32 {
    let mut meta = CB_MAGIC;
    if trace_flags & TRACE_FLAG_SAMPLED != 0 {
        meta |= CB_FLAG_SAMPLED;
    }
    if trace_flags & TRACE_FLAG_HAS_PARENT != 0 {
        meta |= CB_FLAG_HAS_PARENT;
    }
    if matched == MATCH_FLOW {
        meta |= CB_FLAG_FLOW_MATCH;
    }
    meta | (((trace_flags & TRACE_SOURCE_MASK) >> TRACE_SOURCE_SHIFT) << CB_SOURCE_SHIFT)
}

/// cb ABI and optional mark on a tagged packet.
#[inline(always)]
pub fn mark_packet(ctx: &mut TcContext, cfg: &DatapathConfig, id: &[u8; 16], meta: u32) {
    if cfg.features & FEATURE_CB != 0 {
        let cb = ctx.cb_mut();
        if cb.len() >= 5 {
            cb[0] = u32::from_ne_bytes([id[0], id[1], id[2], id[3]]);
            cb[1] = u32::from_ne_bytes([id[4], id[5], id[6], id[7]]);
            cb[2] = u32::from_ne_bytes([id[8], id[9], id[10], id[11]]);
            cb[3] = u32::from_ne_bytes([id[12], id[13], id[14], id[15]]);
            cb[4] = meta;
        }
    }
    if cfg.mark_mask != 0 {
        let mark = unsafe { (*ctx.skb.skb).mark };
        ctx.set_mark((mark & !cfg.mark_mask) | (cfg.mark_value & cfg.mark_mask));
    }
    count(Counter::Tagged);
}

/// Accounts one more packet to a live entry of the same (flow, trace).
#[inline(always)]
pub fn account<const STAMP: bool>(ctx: &TcContext, s: &mut FlowStats, tcp_flags: u8) {
    let len = ctx.len() as u64;
    // The same flow can be processed on two CPUs at once.
    unsafe {
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&mut s.packets, 1);
        atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&mut s.bytes, len);
    }
    s.last_ns = now::<STAMP>(ctx);
    s.tcp_flags |= tcp_flags;
}

/// Slow path result for a flow whose cache entry was missing or stale.
/// `old` is the entry found (if any); `trace` is None when no table had a
/// context for the flow. Writes the new cache entry and the events.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn resolved<const STAMP: bool>(
    ctx: &mut TcContext,
    cfg: &DatapathConfig,
    key: &FlowKey,
    old: Option<*mut FlowStats>,
    gen: u64,
    trace: Option<&TraceContext>,
    owner: &Owner,
    matched: u8,
    tcp_flags: u8,
) {
    let stats_on = cfg.features & FEATURE_FLOW_STATS != 0;
    let Some(trace) = trace else {
        count(Counter::NoTrace);
        // A call by a thread serving a connection the agent has not keyed
        // yet: counted from here on, and handed to userspace with that
        // connection, which it will know by the time it reads this.
        let pending = owner.via.is_some();
        if stats_on {
            if let Some(o) = old {
                let o = unsafe { &mut *o };
                if o.is_negative() {
                    o.gen = gen;
                    if o.matched == MATCH_WATCHED {
                        account::<STAMP>(ctx, o, tcp_flags);
                    }
                    return;
                }
                // The flow's trace ended: hand its final numbers over.
                emit(cfg, EVENT_FLOW_END, key, o, &[0; 8], 0, None);
            }
            // Stamped so that userspace can age it out (flow GC): a dead
            // flow's "no trace" entry would otherwise sit until LRU eviction.
            // Who and where too, for when a head makes the connection worth
            // a span after all (MATCH_WATCHED: counted from then on).
            let t = now::<STAMP>(ctx);
            let neg = FlowStats {
                gen,
                pid: owner.pid,
                ifindex: unsafe { (*ctx.skb.skb).ifindex },
                packets: 1,
                bytes: ctx.len() as u64,
                first_ns: t,
                last_ns: t,
                tcp_flags,
                direction: DIRECTION_POD_EGRESS,
                owner: owner.how,
                matched: if pending { MATCH_WATCHED } else { 0 },
                ..FlowStats::default()
            };
            if FLOW_STATS.insert(key, neg, 0).is_err() {
                count(Counter::StatsUpdateFailed);
            }
            if pending {
                count(Counter::ThreadPending);
                emit(cfg, EVENT_FLOW_NEW, key, &neg, &[0; 8], 0, owner.via);
            }
        }
        return;
    };
    if matched == MATCH_THREAD {
        count(Counter::ThreadMatched);
    }
    let meta = cb_meta(trace.flags, matched);
    mark_packet(ctx, cfg, &trace.trace_id, meta);
    if !stats_on {
        return;
    }
    if let Some(o) = old {
        let o = unsafe { &mut *o };
        if o.trace_id == trace.trace_id {
            // Same pair, the namespace just changed generation.
            o.gen = gen;
            o.cb_meta = meta;
            account::<STAMP>(ctx, o, tcp_flags);
            return;
        }
        if !o.is_negative() {
            emit(cfg, EVENT_FLOW_END, key, o, &[0; 8], 0, None);
        }
    }
    let t = now::<STAMP>(ctx);
    let stats = FlowStats {
        trace_id: trace.trace_id,
        pid: owner.pid,
        ifindex: unsafe { (*ctx.skb.skb).ifindex },
        packets: 1,
        bytes: ctx.len() as u64,
        first_ns: t,
        last_ns: t,
        gen,
        cb_meta: meta,
        tcp_flags,
        direction: DIRECTION_POD_EGRESS,
        owner: owner.how,
        matched,
    };
    if FLOW_STATS.insert(key, stats, 0).is_err() {
        count(Counter::StatsUpdateFailed);
    }
    emit(
        cfg,
        EVENT_FLOW_NEW,
        key,
        &stats,
        &trace.parent_span_id,
        trace.flags,
        owner.via,
    );
}

#[inline(always)]
fn emit(
    cfg: &DatapathConfig,
    kind: u32,
    key: &FlowKey,
    stats: &FlowStats,
    parent: &[u8; 8],
    flags: u32,
    via: Option<&FlowKey>,
) {
    if cfg.features & FEATURE_EVENTS == 0 {
        return;
    }
    match EVENTS.reserve::<FlowEvent>(0) {
        Some(mut entry) => {
            // Field by field into the reservation: a whole FlowEvent on the
            // stack would not fit the 512-byte BPF stack next to the rest.
            let e = entry.as_mut_ptr();
            unsafe {
                (*e).header = EventHeader {
                    kind,
                    len: core::mem::size_of::<FlowEvent>() as u32,
                };
                (*e).key = *key;
                (*e).stats = *stats;
                (*e).parent_span_id = *parent;
                (*e).trace_flags = flags;
                (*e)._pad = 0;
                match via {
                    Some(v) => (*e).via = *v,
                    None => core::ptr::write_bytes(&mut (*e).via, 0, 1),
                }
            }
            entry.submit(0);
        }
        None => count(Counter::RingbufFull),
    }
}
