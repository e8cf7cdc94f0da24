//! Every map of the tagflow object. Sizes are the defaults of
//! `agent_common::maps::size`; the loader may override `max_entries` at
//! load time (the config file's `[maps]`).
use agent_common::{
    maps::size, FlowKey, FlowStats, H2Flow, H2Walk, NetnsSlot, PortKey, SockOwner, TraceContext,
    TraceKey,
};
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
};

/// Trace context per (pid, netns cookie). Written by userspace only.
#[map(name = "TRACES")]
pub static TRACES: HashMap<TraceKey, TraceContext> = HashMap::with_max_entries(size::TRACES, 0);

/// Trace context per exact connection; beats `TRACES`. Written by userspace.
#[map(name = "FLOW_TRACES")]
pub static FLOW_TRACES: HashMap<FlowKey, TraceContext> =
    HashMap::with_max_entries(size::FLOW_TRACES, 0);

/// Per (flow, trace) accounting of tagged packets. LRU: never fails a packet.
#[map(name = "FLOW_STATS")]
pub static FLOW_STATS: LruHashMap<FlowKey, FlowStats> =
    LruHashMap::with_max_entries(size::FLOW_STATS, 0);

/// Socket cookie → the process and thread that connect()ed / sent with it,
/// and the connection that thread was serving.
#[map(name = "SOCK_OWNER")]
pub static SOCK_OWNER: LruHashMap<u64, SockOwner> =
    LruHashMap::with_max_entries(size::SOCK_OWNER, 0);

/// Accepted TCP socket's cookie → its connection as it sees it (reader's
/// end, as `FLOW_TRACES` keys it). Written by `sock_ops`, removed at
/// `sock_release`.
#[map(name = "SOCK_FLOW")]
pub static SOCK_FLOW: LruHashMap<u64, FlowKey> = LruHashMap::with_max_entries(size::SOCK_FLOW, 0);

/// Thread id → the connection it read last (see `threads.rs`). Removed when
/// the thread exits.
#[map(name = "THREAD_VIA")]
pub static THREAD_VIA: LruHashMap<u32, FlowKey> = LruHashMap::with_max_entries(size::THREAD_VIA, 0);

/// (netns, proto, local port) → tgid of the process that bound it.
#[map(name = "BOUND_PORTS")]
pub static BOUND_PORTS: LruHashMap<PortKey, u32> =
    LruHashMap::with_max_entries(size::BOUND_PORTS, 0);

/// ifindex → netns cookie at the other end of the interface (veth peer).
/// Used for packets without a socket. Written by the loader.
#[map(name = "IFACE_NETNS")]
pub static IFACE_NETNS: HashMap<u32, u64> = HashMap::with_max_entries(size::IFACE_NETNS, 0);

/// New (flow, trace) pairs for userspace.
#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(size::EVENTS_BYTES, 0);

/// Loss and activity counters, indexed by `agent_common::Counter`.
#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(agent_common::Counter::COUNT, 0);

#[inline(always)]
pub fn count(c: agent_common::Counter) {
    if let Some(v) = COUNTERS.get_ptr_mut(c as u32) {
        // Per-CPU slot: no other CPU writes it; softirq does not nest on one
        // CPU for the same hook, so a plain add is enough.
        unsafe { *v += 1 };
    }
}

/// netns cookie → generation of that namespace's trace entries, for
/// namespaces that share a `NETNS_SLOTS` slot (read only behind a shared
/// slot; a namespace alone in its slot has its generation there). Userspace
/// bumps the generation whenever the namespace's entries change.
#[map(name = "NETNS_GEN")]
pub static NETNS_GEN: HashMap<u64, u64> = HashMap::with_max_entries(size::NETNS_GEN, 0);

/// Connections whose last request head carried no id header → monotonic ns
/// until which their heads are not copied. Written by userspace; LRU.
#[map(name = "CAPTURE_SKIP")]
pub static CAPTURE_SKIP: LruHashMap<FlowKey, u64> =
    LruHashMap::with_max_entries(size::CAPTURE_SKIP, 0);

/// HTTP/2 connections followed from their preface (see `h2.rs`). Written
/// by the datapath only; LRU.
#[map(name = "H2_FLOWS")]
pub static H2_FLOWS: LruHashMap<FlowKey, H2Flow> = LruHashMap::with_max_entries(size::H2_FLOWS, 0);

/// Per namespace slot (`NetnsSlot::index`): non-zero once an HTTP/2
/// preface was seen there. Segments of pods that never spoke HTTP/2 skip
/// the `H2_FLOWS` lookup after this inlined array read. Never cleared
/// (a slot shared or kept costs a lookup, not a loss).
#[map(name = "H2_NETNS")]
pub static H2_NETNS: Array<u32> = Array::with_max_entries(agent_common::NETNS_SLOTS, 0);

/// Per namespace slot (`NetnsSlot::index`): when (monotonic ns) a request
/// head to a process there last passed. Written by the datapath only. A
/// pod the agent has not keyed yet is shut at the gate; a call its serving
/// thread opens right after a head is still handed to userspace with the
/// connection the thread read (`capture::head_passed_lately`), which the
/// agent knows by the time it reads the call. A slot two pods share costs
/// the other one such hand-overs, never a trace.
#[map(name = "HEAD_NETNS")]
pub static HEAD_NETNS: Array<u64> = Array::with_max_entries(agent_common::NETNS_SLOTS, 0);

/// The HTTP/2 walk programs (see `agent_common::programs::H2`). Written by
/// the loader.
#[map(name = "H2_WALK")]
pub static H2_WALK: ProgramArray = ProgramArray::with_max_entries(2, 0);

/// A pod's address (as `FlowKey` holds it: IPv4 in the first 4 bytes) →
/// its namespace cookie: where a connection's server side leaves the
/// node's pods (`h2::replies`). Written by userspace (`podnet`).
#[map(name = "POD_ADDRS")]
pub static POD_ADDRS: HashMap<[u8; 16], u64> = HashMap::with_max_entries(size::POD_ADDRS, 0);

/// Per CPU: the packet the walk is for (see `agent_common::H2Walk`).
#[map(name = "WALK_AT")]
pub static WALK_AT: PerCpuArray<H2Walk> = PerCpuArray::with_max_entries(1, 0);

/// The fast front of `NETNS_GEN` (see `agent_common::NetnsSlot`).
#[map(name = "NETNS_SLOTS")]
pub static NETNS_SLOTS: Array<NetnsSlot> = Array::with_max_entries(agent_common::NETNS_SLOTS, 0);

/// The generation of `netns`'s trace entries, or None when it has none.
#[inline(always)]
pub fn netns_gen(netns: u64) -> Option<u64> {
    let slot = NETNS_SLOTS.get(NetnsSlot::index(netns))?;
    if slot.cookie == netns {
        return Some(slot.gen);
    }
    if slot.cookie == agent_common::SLOT_SHARED {
        return unsafe { NETNS_GEN.get(netns) }.copied();
    }
    None
}
