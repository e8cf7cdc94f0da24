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

/// `EventHeader.kind`: bytes of an HTTP/2 connection's HEADERS,
/// CONTINUATION or PUSH_PROMISE frames, or its start or loss
/// ([`H2FramesEvent`]).
pub const EVENT_H2_FRAMES: u32 = 4;

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

/// `H2FramesEvent.flags`: the connection's client preface was seen (no data
/// follows): whatever was known about this flow is from another connection.
pub const H2_PREFACE: u32 = 1;
/// The data starts at a frame header; without it, it continues the
/// previous record's bytes (the same frame, at `seq`).
pub const H2_FRAME_START: u32 = 2;
/// Bytes of header frames were missed (a gap in the stream, a full ring,
/// too many frames in a segment): the connection is no longer followed.
pub const H2_LOST: u32 = 4;
/// With `H2_PREFACE`: the key is the server's side of a connection whose
/// client preface was just seen; its replies are followed from `seq` (the
/// preface's acknowledgment number: before it the server can only have
/// sent settings, never a header block) or later. `data[..8]` holds the
/// client side's namespace cookie (native endian).
pub const H2_REPLIES: u32 = 8;

/// `EVENT_H2_FRAMES`: a run of an HTTP/2 connection's bytes that belong to
/// header-carrying frames, found by the datapath's frame walk (the bytes in
/// between were other frames). `seq` is the TCP sequence number of `data[0]`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct H2FramesEvent {
    pub header: EventHeader,
    pub key: FlowKey,
    pub ts_ns: u64,
    pub pid: u32,
    /// Bytes of `data` that are valid.
    pub len: u32,
    pub seq: u32,
    pub flags: u32,
    pub data: [u8; crate::config::MAX_CAPTURE],
}

const _: () = assert!(core::mem::size_of::<H2FramesEvent>() == 8 + 48 + 24 + 1024);

/// The datapath's position in one HTTP/2 connection's client stream (TCP
/// sequence numbers). Written by the datapath only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct H2Flow {
    /// Everything before this was looked at.
    pub seen: u32,
    /// Where the next frame header starts.
    pub next: u32,
    /// The header frame being copied ends here (`copied` == `copy_to`
    /// when none is).
    pub copy_to: u32,
    /// Bytes up to here were sent to userspace.
    pub copied: u32,
    /// Where that header frame starts.
    pub frame_start: u32,
    /// The first `part_len` bytes of the frame header at `next`, when it
    /// was cut by the end of a segment; the whole header once read.
    pub part_len: u32,
    pub part: [u8; 24],
    /// A server's side nothing of which was seen yet: its first segment
    /// may start after the mark (what it skips passed the hook before the
    /// preface did, so before any request reached the server: settings,
    /// never a header block).
    pub fresh: u32,
    pub _pad: u32,
}

impl H2Flow {
    /// A side followed from `seq`, where its next frame header starts.
    pub const fn at(seq: u32) -> Self {
        Self {
            seen: seq,
            next: seq,
            copy_to: seq,
            copied: seq,
            frame_start: seq,
            part_len: 0,
            part: [0; 24],
            fresh: 0,
            _pad: 0,
        }
    }
}

/// Where the HTTP/2 walk is in the current packet: written by the ingress
/// program in its CPU's slot, read by the tail-called walk.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct H2Walk {
    pub key: FlowKey,
    pub off: u32,
    pub seq: u32,
    pub local: u32,
    /// The segment starts with "PRI ": the walk checks the preface and
    /// starts the connection first.
    pub preface: u32,
    /// The segment's acknowledgment number: where, at the preface, the
    /// server's stream is (its replies are followed from there).
    pub ack: u32,
    pub _pad: u32,
}
