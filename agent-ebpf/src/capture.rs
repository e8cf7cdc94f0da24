//! Passive capture: the start of every TCP payload that looks like an
//! HTTP/1.x request head goes to userspace, which reads its request id.
//! Bounded work: one fixed-size ring-buffer reservation and one copy.
use crate::{
    maps::{count, CAPTURE_SKIP, EVENTS, FLOW_STATS, HEAD_NETNS, POD_ADDRS},
    resolve,
};
use agent_common::{
    Counter, DatapathConfig, EventHeader, FlowKey, HttpHeadEvent, NetnsSlot, EVENT_HTTP_HEAD,
    FAMILY_IPV4, MATCH_WATCHED, MAX_CAPTURE,
};
use aya_ebpf::{helpers::generated::bpf_skb_load_bytes, programs::TcContext, EbpfContext};
use core::ffi::c_void;

/// Copies the head unless userspace asked to skip this connection for a
/// while (its last head had no id header: keep-alive traffic without ids
/// then costs one lookup per request instead of a copy and a parse).
/// `local`: the sender is on this host (a pod), so its owner is looked up;
/// heads from the wire have none.
#[inline(always)]
pub fn maybe_head<const STAMP: bool>(
    ctx: &TcContext,
    cfg: &DatapathConfig,
    key: &FlowKey,
    payload_off: usize,
    local: bool,
) {
    if let Some(until) = unsafe { CAPTURE_SKIP.get(key) } {
        if crate::tag::now::<STAMP>(ctx) < *until {
            count(Counter::HeadSkipped);
            return;
        }
    }
    head::<STAMP>(ctx, cfg, key, payload_off, local);
}

#[inline(always)]
pub fn head<const STAMP: bool>(
    ctx: &TcContext,
    cfg: &DatapathConfig,
    key: &FlowKey,
    payload_off: usize,
    local: bool,
) {
    let Some(mut entry) = EVENTS.reserve::<HttpHeadEvent>(0) else {
        count(Counter::RingbufFull);
        return;
    };
    let e = entry.as_mut_ptr();
    let avail = (ctx.len() as usize).saturating_sub(payload_off);
    let mut want = cfg.capture_len as usize;
    if want > MAX_CAPTURE {
        want = MAX_CAPTURE;
    }
    if avail < want {
        want = avail;
    }
    // SAFETY: e points at a reservation of size_of::<HttpHeadEvent>().
    let data = unsafe { &mut (*e).data };
    let n = if want == 0 {
        0
    } else {
        // Masked into [1, MAX_CAPTURE] so the verifier can prove the length
        // (MAX_CAPTURE is a power of two; `want` is already in range).
        let len = ((want - 1) & (MAX_CAPTURE - 1)) + 1;
        // SAFETY: data has MAX_CAPTURE bytes; len ≤ MAX_CAPTURE.
        let rc = unsafe {
            bpf_skb_load_bytes(
                ctx.as_ptr(),
                payload_off as u32,
                data.as_mut_ptr().cast::<c_void>(),
                len as u32,
            )
        };
        if rc < 0 {
            0
        } else {
            len
        }
    };
    let pid = if local {
        resolve::owner(ctx, key).pid
    } else {
        0
    };
    let ts = crate::tag::now::<STAMP>(ctx);
    unsafe {
        (*e).header = EventHeader {
            kind: EVENT_HTTP_HEAD,
            len: core::mem::size_of::<HttpHeadEvent>() as u32,
        };
        (*e).key = *key;
        (*e).ts_ns = ts;
        (*e).pid = pid;
        (*e).len = n as u32;
    }
    entry.submit(0);
    count(Counter::HeadCaptured);
    mark_reader(key, ts);
    // An untraced connection carrying a request: count its packets from
    // here on, in case it ends before the agent has keyed it.
    if local {
        if let Some(s) = FLOW_STATS.get_ptr_mut(key) {
            // SAFETY: a live entry of our own map; racing writers only
            // store the same flag.
            let s = unsafe { &mut *s };
            if s.is_negative() {
                s.matched = MATCH_WATCHED;
            }
        }
    }
}

/// How long after a head its reader's pod hands a serving thread's calls to
/// userspace while the agent has not keyed the pod (its round trip through
/// the agent, with room for a busy node).
const HEAD_LEAD_NS: u64 = 1_000_000_000;

/// The head's reader is in the sender's own pod (loopback) or in the pod
/// its destination address names: that pod's slot learns a head passed.
/// A head to no pod of this node (a Service address) marks nothing.
#[inline(always)]
fn mark_reader(key: &FlowKey, ts: u64) {
    let a = &key.remote_addr;
    let loopback = if key.family == FAMILY_IPV4 {
        a[0] == 127
    } else {
        a[..15].iter().all(|b| *b == 0) && a[15] == 1
    };
    let reader = if loopback {
        key.netns
    } else {
        match unsafe { POD_ADDRS.get(*a) } {
            Some(n) => *n,
            None => return,
        }
    };
    if let Some(t) = HEAD_NETNS.get_ptr_mut(NetnsSlot::index(reader)) {
        // SAFETY: an array slot of our own map; racing writers store times.
        unsafe { *t = ts };
    }
}

/// Whether a request head to a process in `netns` passed within
/// `HEAD_LEAD_NS` (see `HEAD_NETNS`).
#[inline(always)]
pub fn head_passed_lately<const STAMP: bool>(ctx: &TcContext, netns: u64) -> bool {
    match HEAD_NETNS.get(NetnsSlot::index(netns)) {
        Some(t) if *t != 0 => crate::tag::now::<STAMP>(ctx).wrapping_sub(*t) < HEAD_LEAD_NS,
        _ => false,
    }
}

const _: () = assert!(MAX_CAPTURE.is_power_of_two());
