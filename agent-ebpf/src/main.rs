//! tagflow's eBPF programs.
//!
//! `tagflow_ingress` (TC/TCX classifier, ingress of the host-side veth end =
//! the pod's outgoing packets) tags packets with the trace context of their
//! flow, of the request its connecting thread was serving, or of its
//! owning process. The cgroup hooks record socket owners in process
//! context; the thread hooks (threads.rs: sock_ops and raw BTF tracepoints
//! on the receive path, fork and exit) follow a request from the connection
//! a thread reads to the connections it opens. Minimum kernel: 5.15 (TCX
//! from 6.6, clsact before; `tagflow_ingress_ifns` where TC may not call
//! `bpf_get_netns_cookie`, before 6.14).
#![no_std]
#![no_main]
// BPF has atomic add (BPF_XADD) but core::sync::atomic offers no fetch_add
// on this target: use the intrinsic.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod capture;
mod h2;
mod maps;
mod owners;
mod parse;
mod resolve;
mod tag;
mod threads;

use agent_common::*;
use aya_ebpf::{
    macros::{btf_tracepoint, cgroup_sock, cgroup_sock_addr, classifier, sock_ops},
    programs::{BtfTracePointContext, SockAddrContext, SockContext, SockOpsContext, TcContext},
    Global,
};
use core::mem::MaybeUninit;
use maps::{count, FLOW_STATS, FLOW_TRACES, TRACES};
use parse::{Payload, Skip};

/// Load-time configuration (see `agent_common::config`).
#[unsafe(no_mangle)]
static CONFIG: Global<DatapathConfig> = Global::new(DatapathConfig::DEFAULT);

/// Where `pid` and `tgid` sit in `task_struct` (from the kernel's BTF).
#[unsafe(no_mangle)]
static TASK_OFFSETS: Global<TaskOffsets> = Global::new(TaskOffsets { pid: 0, tgid: 0 });

/// Kernels that allow `bpf_get_netns_cookie` in TC (6.14+).
#[classifier]
pub fn tagflow_ingress(ctx: TcContext) -> i32 {
    ingress::<true>(ctx)
}

/// Older kernels: the same program, the namespace from the interface or
/// the socket's record (resolve::netns_ifns). The loader picks one.
#[classifier]
pub fn tagflow_ingress_ifns(ctx: TcContext) -> i32 {
    ingress::<false>(ctx)
}

/// `NETNS_HELPER` also stands for "skb `tstamp_type` readable" (5.18): the
/// helper came in 6.14, and `tagflow_ingress_ifns` must load on 5.15.
#[inline(always)]
fn ingress<const NETNS_HELPER: bool>(mut ctx: TcContext) -> i32 {
    // Each path below ends in exactly one terminal counter (see Counter).
    let mut slot = MaybeUninit::uninit();
    let key = parse::zeroed_key(&mut slot);
    let parsed = match parse::parse(&ctx, key) {
        Ok(p) => p,
        Err(skip) => {
            count(match skip {
                Skip::NonIp => Counter::NonIp,
                Skip::Fragment => Counter::Fragment,
                Skip::OtherL4 => Counter::OtherL4,
                Skip::Malformed => Counter::ParseFailed,
            });
            return TCX_NEXT;
        }
    };
    let cfg = CONFIG.load();
    key.netns = if NETNS_HELPER {
        resolve::netns(&ctx, cfg.host_netns)
    } else {
        resolve::netns_ifns(&ctx, cfg.host_netns)
    };

    // Passive capture runs before the gate: heads from trace-free pods are
    // how traces start.
    let walk =
        cfg.capture_len != 0 && capture_payload::<NETNS_HELPER>(&ctx, &cfg, key, &parsed, true);
    tag_packet::<NETNS_HELPER>(&mut ctx, &cfg, key, &parsed);
    // Last: a tail call does not come back.
    if walk {
        h2::walk_on::<NETNS_HELPER>(&ctx);
    }
    TCX_NEXT
}

/// The gate, the flow cache, then resolution: the packet gets its trace.
#[inline(always)]
fn tag_packet<const NETNS_HELPER: bool>(
    ctx: &mut TcContext,
    cfg: &DatapathConfig,
    key: &FlowKey,
    parsed: &parse::Parsed,
) {
    // Gate: a namespace without trace entries stops here, after one lookup.
    let gen = match maps::netns_gen(key.netns) {
        Some(g) => g,
        None => {
            // A pod the agent has not keyed yet, whose serving thread opens
            // a call right after a request head reached it: handed over as
            // a pending call (generation 0, never current), which the
            // agent files under that request (it reads the head first).
            const SYN: u8 = 0x02;
            const ACK: u8 = 0x10;
            if parsed.tcp_flags & (SYN | ACK) == SYN
                && capture::head_passed_lately::<NETNS_HELPER>(ctx, key.netns)
            {
                let owner = resolve::owner(ctx, key);
                if owner.via.is_some() {
                    tag::resolved::<NETNS_HELPER>(
                        ctx,
                        cfg,
                        key,
                        None,
                        0,
                        None,
                        &owner,
                        0,
                        parsed.tcp_flags,
                    );
                    return;
                }
            }
            count(Counter::NoTrace);
            return;
        }
    };

    // Flow cache: resolved under the current generation → reuse it.
    let old = FLOW_STATS.get_ptr_mut(key);
    if let Some(s) = old {
        let s = unsafe { &mut *s };
        if s.gen == gen {
            if s.is_negative() {
                if s.matched == MATCH_WATCHED {
                    tag::account::<NETNS_HELPER>(ctx, s, parsed.tcp_flags);
                }
                count(Counter::NoTrace);
            } else {
                tag::mark_packet(ctx, cfg, &s.trace_id, s.cb_meta);
                tag::account::<NETNS_HELPER>(ctx, s, parsed.tcp_flags);
            }
            return;
        }
    }

    // Slow path: the exact connection first, then the request the
    // connecting thread was serving, then the owning process.
    count(Counter::Resolved);
    let owner = resolve::owner(ctx, key);
    let by_thread = match owner.via {
        Some(v) => unsafe { FLOW_TRACES.get(v) },
        None => None,
    };
    let (trace, matched) = match unsafe { FLOW_TRACES.get(key) } {
        Some(t) => (Some(t), MATCH_FLOW),
        None if by_thread.is_some() => (by_thread, MATCH_THREAD),
        None if owner.pid != 0 => (
            unsafe { TRACES.get(TraceKey::new(owner.pid, key.netns)) },
            MATCH_PID,
        ),
        None => (None, 0),
    };
    tag::resolved::<NETNS_HELPER>(
        ctx,
        cfg,
        key,
        old,
        gen,
        trace,
        &owner,
        matched,
        parsed.tcp_flags,
    );
}

/// TC ingress of the node's uplink: requests from other nodes, on their
/// way to a local pod, never pass that pod's veth ingress. Capture only:
/// their heads go to userspace under `NETNS_WIRE` (no pod sent them), and
/// nothing here tags, counts or changes a packet.
#[classifier]
pub fn tagflow_uplink(ctx: TcContext) -> i32 {
    let cfg = CONFIG.load();
    if cfg.capture_len == 0 {
        return TCX_NEXT;
    }
    let mut slot = MaybeUninit::uninit();
    let key = parse::zeroed_key(&mut slot);
    key.netns = NETNS_WIRE;
    if let Ok(parsed) = parse::parse(&ctx, key) {
        // Heads only (a few per connection): the kernel's clock, which
        // every kernel offers, costs little here.
        if capture_payload::<false>(&ctx, &cfg, key, &parsed, false) {
            h2::walk_on::<false>(&ctx);
        }
    }
    TCX_NEXT
}

/// The HTTP/2 frame walk, in its own program: the ingress programs tail-
/// call it when a segment has frames to look at, and it calls itself
/// while there are more (`h2.rs`). The clock as in the ingress variant.
#[classifier]
pub fn tagflow_h2(ctx: TcContext) -> i32 {
    h2::resume::<true>(&ctx);
    TCX_NEXT
}

#[classifier]
pub fn tagflow_h2_ifns(ctx: TcContext) -> i32 {
    h2::resume::<false>(&ctx);
    TCX_NEXT
}

/// An HTTP/1.x request head is copied; an HTTP/2 connection is followed
/// from its preface (`h2.rs`). True when the segment has HTTP/2 frames to
/// walk (after the packet is tagged: `h2::walk_on`).
#[inline(always)]
fn capture_payload<const STAMP: bool>(
    ctx: &TcContext,
    cfg: &DatapathConfig,
    key: &FlowKey,
    parsed: &parse::Parsed,
    local: bool,
) -> bool {
    match parse::payload_kind(ctx, parsed.payload_off) {
        Payload::Http1 => {
            capture::maybe_head::<STAMP>(ctx, cfg, key, parsed.payload_off, local);
            false
        }
        Payload::H2Preface => h2::preface(key, parsed.payload_off, parsed.seq, parsed.ack, local),
        Payload::Other => h2::segment(ctx, key, parsed.payload_off, parsed.seq, local),
        Payload::None => false,
    }
}

#[cgroup_sock_addr(connect4)]
pub fn tagflow_connect4(ctx: SockAddrContext) -> i32 {
    owners::record_socket(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn tagflow_connect6(ctx: SockAddrContext) -> i32 {
    owners::record_socket(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn tagflow_sendmsg4(ctx: SockAddrContext) -> i32 {
    owners::record_socket(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn tagflow_sendmsg6(ctx: SockAddrContext) -> i32 {
    owners::record_socket(&ctx)
}

#[cgroup_sock_addr(bind4)]
pub fn tagflow_bind4(ctx: SockAddrContext) -> i32 {
    owners::record_bind(&ctx)
}

#[cgroup_sock_addr(bind6)]
pub fn tagflow_bind6(ctx: SockAddrContext) -> i32 {
    owners::record_bind(&ctx)
}

#[cgroup_sock(sock_release)]
pub fn tagflow_sock_release(ctx: SockContext) -> i32 {
    owners::forget_socket(&ctx)
}

/// Accepted sockets → their connection (see threads.rs).
#[sock_ops]
pub fn tagflow_sockops(ctx: SockOpsContext) -> u32 {
    threads::established(&ctx)
}

/// The reading thread takes the connection it reads (see threads.rs).
#[btf_tracepoint(function = "tcp_rcv_space_adjust")]
pub fn tagflow_recv(ctx: BtfTracePointContext) -> i32 {
    threads::received(&ctx) as i32
}

/// A new process takes the request its parent thread is serving.
#[btf_tracepoint(function = "sched_process_fork")]
pub fn tagflow_fork(ctx: BtfTracePointContext) -> i32 {
    threads::forked(&ctx, &TASK_OFFSETS.load()) as i32
}

#[btf_tracepoint(function = "sched_process_exit")]
pub fn tagflow_thread_exit(_ctx: BtfTracePointContext) -> i32 {
    threads::exited() as i32
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
