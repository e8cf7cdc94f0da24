//! Reference programs for the datapath benchmark's floor rows (`bench
//! floor`): the least a program must do to place a packet and tag it, with
//! nothing of tagflow's checks, counters or capture. Each one is a step of
//! a ladder measured against `ref_empty` in the same run, so the
//! product's rows can be read against what any design pays on this kernel
//! and machine. They favour themselves: IPv4 and TCP only, no VLAN, no
//! IPv6 extension walk, no counters.
//!
//! Every program ends by adding what it found to `REF_SINK` (one plain
//! per-CPU add), so the compiler keeps the work, and every ladder step
//! pays the same for it. A flow map miss inserts the key: the next run
//! hits, as a flow cache does after a connection's first packet.
//!
//! An object of its own (`tagflow-floor`): its socket-storage map (BTF,
//! 5.2+) stays out of the object every test loads.
#![no_std]
#![no_main]
// BPF has atomic add but core::sync::atomic offers no fetch_add on this
// target (as in agent-ebpf).
#![feature(core_intrinsics)]
#![allow(internal_features)]
use agent_common::{FlowKey, TCX_NEXT};
use aya_ebpf::{
    bindings::BPF_SK_STORAGE_GET_F_CREATE,
    btf_maps::SkStorage,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_sk_storage_get},
    macros::{btf_map, classifier, map},
    maps::{Array, LruHashMap, PerCpuArray},
    programs::TcContext,
    EbpfContext,
};
use core::{
    intrinsics::{atomic_xadd, AtomicOrdering},
    mem::size_of,
};

/// An IPv4-only flow key: 24 bytes, half of `FlowKey`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Key24 {
    pub netns: u64,
    pub local: u32,
    pub remote: u32,
    pub ports: u32,
    pub proto: u32,
}

#[map(name = "REF_FLOW48")]
static REF_FLOW48: LruHashMap<FlowKey, u64> = LruHashMap::with_max_entries(4096, 0);
#[map(name = "REF_FLOW24")]
static REF_FLOW24: LruHashMap<Key24, u64> = LruHashMap::with_max_entries(4096, 0);
/// Socket cookie → value. test_run gives each run a new socket (and so a
/// new cookie): the first packet of a run inserts, the rest hit.
#[map(name = "REF_COOKIE")]
static REF_COOKIE: LruHashMap<u64, u64> = LruHashMap::with_max_entries(4096, 0);
/// The gate: namespace slots, as `NETNS_SLOTS` keeps them (cookie, gen).
#[map(name = "REF_GATE")]
static REF_GATE: Array<[u64; 2]> = Array::with_max_entries(1024, 0);
/// Per-socket storage: the socket's own slot, no hash table at all.
#[btf_map]
static REF_SK: SkStorage<u64> = SkStorage::new();
#[map(name = "REF_SINK")]
static REF_SINK: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn sink(v: u64) {
    if let Some(p) = REF_SINK.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, one writer per CPU.
        unsafe { *p += v };
    }
}

/// Ethernet, IPv4 (any IHL) and TCP by direct access.
struct V4 {
    src: u32,
    dst: u32,
    /// Both ports as one word.
    ports: u32,
    /// Where the TCP payload starts (unused rungs drop its computation).
    payload: usize,
    /// The TCP flags byte.
    flags: u8,
}

#[inline(always)]
fn parse_v4(ctx: &TcContext) -> Option<V4> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + 14 + 20 > end {
        return None;
    }
    // SAFETY: bounds checked just above, and below for the TCP header.
    let eth_proto = unsafe { *((start + 12) as *const [u8; 2]) };
    if eth_proto != [0x08, 0x00] {
        return None;
    }
    let ip = unsafe { &*((start + 14) as *const [u8; 20]) };
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    if ip[9] != 6 || !(20..=60).contains(&ihl) {
        return None;
    }
    let l4 = start + 14 + ihl;
    if l4 + 20 > end {
        return None;
    }
    let th = unsafe { &*(l4 as *const [u8; 20]) };
    Some(V4 {
        src: u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]),
        dst: u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]),
        ports: u32::from_ne_bytes([th[0], th[1], th[2], th[3]]),
        payload: 14 + ihl + ((th[12] >> 4) as usize) * 4,
        flags: th[13],
    })
}

/// A flow cache's step: a hit adds its value to the sink, a miss inserts
/// the key (so the next run hits).
#[inline(always)]
fn hit_or_insert<K>(map: &LruHashMap<K, u64>, key: &K) {
    // SAFETY: the value is read at once, before any update of the map.
    match unsafe { map.get(key) } {
        Some(v) => sink(*v),
        None => {
            let _ = map.insert(key, 1, 0);
        }
    }
}

/// tagflow's 48-byte key for an IPv4 TCP packet, zeroed word by word as
/// the product does (see `agent-ebpf/src/parse.rs`).
#[inline(always)]
fn key48(k: &mut core::mem::MaybeUninit<FlowKey>, src: u32, dst: u32, ports: u32) -> &mut FlowKey {
    let w = k.as_mut_ptr().cast::<u64>();
    for i in 0..size_of::<FlowKey>() / 8 {
        // SAFETY: in bounds; FlowKey is 8-aligned and all-zero is valid.
        unsafe { w.add(i).write_volatile(0) };
    }
    // SAFETY: every byte was written just above.
    let key = unsafe { k.assume_init_mut() };
    key.local_addr[..4].copy_from_slice(&src.to_ne_bytes());
    key.remote_addr[..4].copy_from_slice(&dst.to_ne_bytes());
    key.local_port = ports as u16;
    key.remote_port = (ports >> 16) as u16;
    key.family = 2;
    key.proto = 6;
    key
}

/// The baseline: nothing (as `tagflow_empty`).
#[classifier]
pub fn ref_empty(_ctx: TcContext) -> i32 {
    TCX_NEXT
}

/// Parsing alone.
#[classifier]
pub fn ref_parse(ctx: TcContext) -> i32 {
    if let Some(V4 {
        src, dst, ports, ..
    }) = parse_v4(&ctx)
    {
        sink((src ^ dst ^ ports) as u64);
    }
    TCX_NEXT
}

/// Parsing, the namespace helper and the gate (an inlined array read):
/// what a packet of a pod without traces needs at the least.
#[classifier]
pub fn ref_gate(ctx: TcContext) -> i32 {
    if let Some(V4 {
        src, dst, ports, ..
    }) = parse_v4(&ctx)
    {
        // SAFETY: helper called with the program's own context.
        let ns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
        if let Some(slot) = REF_GATE.get((ns as u32) & 1023) {
            if slot[0] == ns {
                sink(slot[1]);
                return TCX_NEXT;
            }
        }
        sink((src ^ dst ^ ports) as u64);
    }
    TCX_NEXT
}

/// `ref_gate` and the look for a request head every capturing agent makes
/// on a segment with payload: its first 4 bytes, read with the helper
/// (a socket's payload sits in page fragments, out of direct reach).
#[classifier]
pub fn ref_gate_head(ctx: TcContext) -> i32 {
    let Some(p) = parse_v4(&ctx) else {
        return TCX_NEXT;
    };
    let Some(head) = head_look(&ctx, p.payload) else {
        return TCX_NEXT;
    };
    // SAFETY: helper called with the program's own context.
    let ns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if let Some(slot) = REF_GATE.get((ns as u32) & 1023) {
        if slot[0] == ns {
            sink(slot[1]);
            return TCX_NEXT;
        }
    }
    sink(head);
    TCX_NEXT
}

/// The first 4 payload bytes, read with the helper: 1 for a request
/// head's start, 2 for anything else; None without 4 payload bytes.
#[inline(always)]
fn head_look(ctx: &TcContext, payload: usize) -> Option<u64> {
    if payload > 1024 || (ctx.len() as usize) < payload + 4 {
        return None;
    }
    match ctx.load::<[u8; 4]>(payload) {
        Ok(b) if &b == b"GET " || &b == b"POST" => Some(1),
        Ok(_) => Some(2),
        Err(_) => None,
    }
}

/// Parsing and one flow-cache lookup with tagflow's 48-byte key.
#[classifier]
pub fn ref_flow48(ctx: TcContext) -> i32 {
    if let Some(V4 {
        src, dst, ports, ..
    }) = parse_v4(&ctx)
    {
        let mut slot = core::mem::MaybeUninit::uninit();
        hit_or_insert(&REF_FLOW48, key48(&mut slot, src, dst, ports));
    }
    TCX_NEXT
}

/// tagflow's design with nothing else: parsing, the namespace and its
/// gate, the flow cache by the 48-byte key, and the trace id written to
/// cb. No counters, no accounting, no capture or method check.
#[classifier]
pub fn ref_tag48(ctx: TcContext) -> i32 {
    tag48::<false, false>(ctx)
}

/// `ref_tag48` and the look for a request head: the least an agent that
/// both tags and captures does for a tagged segment with payload.
#[classifier]
pub fn ref_tag48_head(ctx: TcContext) -> i32 {
    tag48::<true, false>(ctx)
}

/// `ref_tag48_head` and the (flow, trace) accounting flow spans need:
/// packets and bytes (two atomic adds, as two CPUs may send on one
/// flow), the TCP flags, and the packet's time from `skb->tstamp`, which
/// real TCP segments carry (test_run's do not: tagflow's rows there pay
/// `bpf_ktime_get_ns` instead).
#[classifier]
pub fn ref_tag48_account(ctx: TcContext) -> i32 {
    tag48::<true, true>(ctx)
}

/// A flow's accounting, as `FlowStats` keeps it (the fields that change
/// per packet).
#[repr(C)]
pub struct RefStats {
    pub trace: u64,
    pub packets: u64,
    pub bytes: u64,
    pub last_ns: u64,
    pub tcp_flags: u8,
}

#[map(name = "REF_STATS48")]
static REF_STATS48: LruHashMap<FlowKey, RefStats> = LruHashMap::with_max_entries(4096, 0);

#[inline(always)]
fn tag48<const HEAD: bool, const ACCOUNT: bool>(mut ctx: TcContext) -> i32 {
    let Some(p) = parse_v4(&ctx) else {
        return TCX_NEXT;
    };
    let head = if HEAD {
        match head_look(&ctx, p.payload) {
            Some(h) => h,
            None => return TCX_NEXT,
        }
    } else {
        0
    };
    // SAFETY: helper called with the program's own context.
    let ns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    match REF_GATE.get((ns as u32) & 1023) {
        Some(slot) if slot[0] == ns => {}
        _ => return TCX_NEXT,
    }
    let mut slot = core::mem::MaybeUninit::uninit();
    let key = key48(&mut slot, p.src, p.dst, p.ports);
    key.netns = ns;
    let key: &FlowKey = key;
    if ACCOUNT {
        let Some(s) = REF_STATS48.get_ptr_mut(key) else {
            let fresh = RefStats {
                trace: 1,
                packets: 0,
                bytes: 0,
                last_ns: 0,
                tcp_flags: 0,
            };
            let _ = REF_STATS48.insert(key, fresh, 0);
            return TCX_NEXT;
        };
        // SAFETY: a live entry of this map.
        let s = unsafe { &mut *s };
        write_cb(&mut ctx, s.trace);
        let skb = unsafe { &*ctx.skb.skb };
        unsafe {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&mut s.packets, 1);
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&mut s.bytes, ctx.len() as u64);
        }
        s.last_ns = skb.tstamp;
        s.tcp_flags |= p.flags;
        sink(s.trace + head);
        return TCX_NEXT;
    }
    match unsafe { REF_FLOW48.get(key) } {
        Some(v) => {
            write_cb(&mut ctx, *v);
            sink(*v + head);
        }
        None => {
            let _ = REF_FLOW48.insert(key, 1, 0);
        }
    }
    TCX_NEXT
}

/// The trace id and its meta word, as tagflow's cb ABI has them.
#[inline(always)]
fn write_cb(ctx: &mut TcContext, v: u64) {
    let cb = ctx.cb_mut();
    if cb.len() >= 5 {
        cb[0] = v as u32;
        cb[1] = (v >> 32) as u32;
        cb[2] = v as u32;
        cb[3] = (v >> 32) as u32;
        cb[4] = agent_common::CB_MAGIC;
    }
}

/// Parsing and one flow-cache lookup with a 24-byte IPv4 key.
#[classifier]
pub fn ref_flow24(ctx: TcContext) -> i32 {
    if let Some(V4 {
        src, dst, ports, ..
    }) = parse_v4(&ctx)
    {
        let key = &Key24 {
            netns: 0,
            local: src,
            remote: dst,
            ports,
            proto: 6,
        };
        hit_or_insert(&REF_FLOW24, key);
    }
    TCX_NEXT
}

/// No parsing: the socket cookie (one helper) and one lookup by it, then
/// the trace id written to cb as tagflow's ABI has it: the least any
/// design that tags by connection does, for packets that have a socket.
#[classifier]
pub fn ref_cookie_tag(mut ctx: TcContext) -> i32 {
    // SAFETY: helper called with the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    match unsafe { REF_COOKIE.get(cookie) } {
        Some(v) => {
            write_cb(&mut ctx, *v);
            sink(*v);
        }
        None => {
            let _ = REF_COOKIE.insert(cookie, 1, 0);
        }
    }
    TCX_NEXT
}

/// No parsing and no hash table: the socket's own storage slot (created on
/// its first packet), then the trace id to cb. What a design keyed by
/// socket-local storage would pay, for packets that have a socket.
#[classifier]
pub fn ref_sk_storage(mut ctx: TcContext) -> i32 {
    // SAFETY: reading the context's socket pointer field.
    let sk = unsafe { (*ctx.skb.skb).__bindgen_anon_2.sk };
    if sk.is_null() {
        return TCX_NEXT;
    }
    let map = core::ptr::from_ref(&REF_SK).cast_mut().cast();
    // SAFETY: the map is a socket storage map; sk was checked non-null.
    let v = unsafe {
        bpf_sk_storage_get(
            map,
            sk.cast(),
            core::ptr::null_mut(),
            BPF_SK_STORAGE_GET_F_CREATE.into(),
        )
    }
    .cast::<u64>();
    if v.is_null() {
        return TCX_NEXT;
    }
    // SAFETY: the helper returned this socket's slot.
    let v = unsafe { &mut *v };
    if *v == 0 {
        *v = 2;
    }
    write_cb(&mut ctx, *v);
    sink(*v);
    TCX_NEXT
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
