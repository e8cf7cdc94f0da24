//! Records sent from the datapath to userspace through the `EVENTS` ring buffer.
use crate::flow::{FlowKey, FlowStats};

/// `EventHeader.kind`: a (flow, trace) pair was tagged for the first time.
/// `stats` is the pair's initial entry.
pub const EVENT_FLOW_NEW: u32 = 1;
/// `EventHeader.kind`: the flow moved on from a (flow, trace) pair (the next
/// request on a keep-alive connection, or the trace ended) and the datapath
/// overwrote its entry. `stats` holds the pair's final numbers, so nothing
/// is lost between userspace sweeps.
pub const EVENT_FLOW_END: u32 = 2;

/// `EventHeader.kind`: a TCP payload that starts like an HTTP/1.x request
/// head ([`HttpHeadEvent`]).
pub const EVENT_HTTP_HEAD: u32 = 3;

/// First field of every record, so readers can dispatch on `kind`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventHeader {
    pub kind: u32,
    /// Size of the whole record in bytes (lets readers skip unknown kinds).
    pub len: u32,
}

/// `EVENT_FLOW_NEW` and `EVENT_FLOW_END`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    pub header: EventHeader,
    pub key: FlowKey,
    pub stats: FlowStats,
    /// From the trace context (valid with `TRACE_FLAG_HAS_PARENT`).
    pub parent_span_id: [u8; 8],
    /// `TraceContext.flags` of the trace.
    pub trace_flags: u32,
    pub _pad: u32,
    /// `EVENT_FLOW_NEW` of a call: the connection its thread read last
    /// (`SockOwner::via`), zero when unknown. With an all-zero trace id the
    /// datapath found no trace for the call: userspace may know the one of
    /// `via` (its head's round trip lost the race).
    pub via: FlowKey,
}

impl FlowEvent {
    /// `via`, when the datapath set it.
    pub fn via(&self) -> Option<FlowKey> {
        (self.via != FlowKey::default()).then_some(self.via)
    }
}

const _: () = assert!(core::mem::size_of::<FlowEvent>() == 192);

/// `EVENT_HTTP_HEAD`: the first `len` bytes of a segment's payload that
/// begins with an HTTP method token, with its flow and sender.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct HttpHeadEvent {
    pub header: EventHeader,
    pub key: FlowKey,
    pub ts_ns: u64,
    pub pid: u32,
    /// Bytes of `data` that are valid.
    pub len: u32,
    pub data: [u8; crate::config::MAX_CAPTURE],
}

const _: () = assert!(core::mem::size_of::<HttpHeadEvent>() == 8 + 48 + 16 + 1024);
