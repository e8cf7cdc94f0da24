//! Trace context maps: `TRACES[(pid, netns)]` and `FLOW_TRACES[FlowKey]`.

/// Key of `TRACES`: a process (thread-group id) in a network namespace.
///
/// `netns` is the netns *cookie*: the kernel's 64-bit namespace id, read with
/// `getsockopt(SOL_SOCKET, SO_NETNS_COOKIE)` in userspace and
/// `bpf_get_netns_cookie` in eBPF. Cookies are never reused, unlike pids.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TraceKey {
    pub pid: u32,
    pub _pad: u32,
    pub netns: u64,
}

impl TraceKey {
    pub const fn new(pid: u32, netns: u64) -> Self {
        Self {
            pid,
            _pad: 0,
            netns,
        }
    }
}

/// `TraceContext.flags`: the trace is sampled (W3C trace-flags bit 0).
pub const TRACE_FLAG_SAMPLED: u32 = 1 << 0;
/// `TraceContext.flags`: `parent_span_id` is valid.
pub const TRACE_FLAG_HAS_PARENT: u32 = 1 << 1;
/// Bits 8..12 of `TraceContext.flags` hold a [`TraceSource`].
pub const TRACE_SOURCE_SHIFT: u32 = 8;
pub const TRACE_SOURCE_MASK: u32 = 0xf << TRACE_SOURCE_SHIFT;

/// Where a trace context came from.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TraceSource {
    Unknown = 0,
    /// A registration over the agent's Unix socket (e.g. `tagflow sidecar`).
    Registration = 1,
    /// An HTTP request head captured in the datapath.
    Passive = 2,
    /// Set through the library API directly (tests, embedders).
    Api = 3,
}

impl TraceSource {
    pub const fn from_flags(flags: u32) -> Self {
        match (flags & TRACE_SOURCE_MASK) >> TRACE_SOURCE_SHIFT {
            1 => Self::Registration,
            2 => Self::Passive,
            3 => Self::Api,
            _ => Self::Unknown,
        }
    }
    pub const fn to_flags(self) -> u32 {
        (self as u32) << TRACE_SOURCE_SHIFT
    }
}

/// Value of `TRACES` and `FLOW_TRACES`. May grow; stays one struct.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TraceContext {
    /// W3C trace id (never all zero for a valid context).
    pub trace_id: [u8; 16],
    /// Span id of the remote parent, valid with [`TRACE_FLAG_HAS_PARENT`].
    pub parent_span_id: [u8; 8],
    /// `TRACE_FLAG_*` bits and a [`TraceSource`].
    pub flags: u32,
    pub _pad: u32,
    /// `CLOCK_MONOTONIC` ns when userspace last set the entry.
    pub updated_ns: u64,
}

const _: () = assert!(core::mem::size_of::<TraceKey>() == 16);
const _: () = assert!(core::mem::size_of::<TraceContext>() == 40);

/// Slots of `NETNS_SLOTS`, the array in front of `NETNS_GEN` (power of two).
pub const NETNS_SLOTS: u32 = 16384;
/// `NetnsSlot.cookie` when several active namespaces share the slot: the
/// datapath then asks `NETNS_GEN`.
pub const SLOT_SHARED: u64 = u64::MAX;

/// Value of `NETNS_SLOTS[cookie % NETNS_SLOTS]`: the one active namespace
/// that maps to this slot and its generation, 0 when none, or
/// [`SLOT_SHARED`]. An array lookup is inlined by the verifier, so pods
/// without traces cost no hash lookup at all.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetnsSlot {
    pub cookie: u64,
    pub gen: u64,
}

impl NetnsSlot {
    pub const fn index(cookie: u64) -> u32 {
        (cookie & (NETNS_SLOTS as u64 - 1)) as u32
    }
}

const _: () = assert!(NETNS_SLOTS.is_power_of_two());
