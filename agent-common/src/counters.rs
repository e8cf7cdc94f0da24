//! Per-CPU datapath counters: `COUNTERS` is a `PERCPU_ARRAY<u64>` indexed by
//! [`Counter`]. Every place in the datapath that skips or loses something
//! moves one of these; the agent exports them summed over CPUs.
//!
//! Every packet ends in exactly one *terminal* counter ([`Counter::TERMINAL`]);
//! "seen" is their sum, which saves an increment on every packet.

#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Every packet the classifier ran on: not incremented by the datapath,
    /// the agent reports the sum of the terminal counters here.
    Seen = 0,
    /// Packets that got a trace context (cb written, stats updated).
    Tagged = 1,
    /// Packets without a pod socket (none, or one in the host namespace):
    /// their namespace comes from `IFACE_NETNS`. Counted by
    /// `tagflow_ingress` only: `tagflow_ingress_ifns` (kernels that refuse
    /// the netns helper in TC) takes every veth packet's namespace there.
    NoSocket = 2,
    /// Packets whose owning pid could not be resolved.
    NoOwner = 3,
    /// Packets with no trace context for their flow or owner (including
    /// every packet of a namespace that has no trace entries at all).
    NoTrace = 4,
    /// IP packets that failed to parse (truncated, bogus lengths, too many
    /// extension headers). Passed on untouched.
    ParseFailed = 5,
    /// Frames that are not IPv4/IPv6 (ARP, LLDP, ...). Passed on untouched.
    NonIp = 6,
    /// Non-first IP fragments (no L4 header). Passed on untouched.
    Fragment = 7,
    /// IP packets that are neither TCP nor UDP. Passed on untouched.
    OtherL4 = 8,
    /// New-flow events lost because the ring buffer was full.
    RingbufFull = 9,
    /// `FLOW_STATS` inserts that failed (flow accounting lost).
    StatsUpdateFailed = 10,
    /// Owner-hook map updates that failed (`SOCK_OWNER`/`BOUND_PORTS`).
    OwnerUpdateFailed = 11,
    /// Packets that went through full resolution (owner, both trace tables)
    /// because their flow had no valid cache entry.
    Resolved = 12,
    /// HTTP request heads copied to userspace (passive capture).
    HeadCaptured = 13,
    /// Request heads not copied: their connection's last head carried no
    /// id header (see `CAPTURE_SKIP`).
    HeadSkipped = 14,
    /// Calls whose trace came from the connection their thread read last
    /// (`MATCH_THREAD`).
    ThreadMatched = 15,
    /// Calls by a thread that had read a connection without a trace entry
    /// yet (the head's round trip was slower than the app), or opened in a
    /// pod the agent had not keyed at all right after a head reached it:
    /// handed to userspace with the connection (`FlowEvent::via`).
    ThreadPending = 16,
    /// HTTP/2 connections whose client preface was seen (followed from
    /// their first frame).
    H2Started = 17,
    /// Runs of HTTP/2 header-frame bytes copied to userspace.
    H2Copied = 18,
    /// HTTP/2 connections given up: a gap in their stream, a full ring or
    /// more frames in one segment than the walk takes.
    H2Lost = 19,
}

impl Counter {
    pub const COUNT: u32 = 20;
    pub const ALL: [Counter; Self::COUNT as usize] = [
        Self::Seen,
        Self::Tagged,
        Self::NoSocket,
        Self::NoOwner,
        Self::NoTrace,
        Self::ParseFailed,
        Self::NonIp,
        Self::Fragment,
        Self::OtherL4,
        Self::RingbufFull,
        Self::StatsUpdateFailed,
        Self::OwnerUpdateFailed,
        Self::Resolved,
        Self::HeadCaptured,
        Self::HeadSkipped,
        Self::ThreadMatched,
        Self::ThreadPending,
        Self::H2Started,
        Self::H2Copied,
        Self::H2Lost,
    ];

    /// The outcomes: each packet increments exactly one of these.
    pub const TERMINAL: [Counter; 6] = [
        Self::Tagged,
        Self::NoTrace,
        Self::ParseFailed,
        Self::NonIp,
        Self::Fragment,
        Self::OtherL4,
    ];

    /// Stable metric-friendly name.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Seen => "seen",
            Self::Tagged => "tagged",
            Self::NoSocket => "no_socket",
            Self::NoOwner => "no_owner",
            Self::NoTrace => "no_trace",
            Self::ParseFailed => "parse_failed",
            Self::NonIp => "non_ip",
            Self::Fragment => "fragment",
            Self::OtherL4 => "other_l4",
            Self::RingbufFull => "ringbuf_full",
            Self::StatsUpdateFailed => "stats_update_failed",
            Self::OwnerUpdateFailed => "owner_update_failed",
            Self::Resolved => "resolved",
            Self::HeadCaptured => "head_captured",
            Self::HeadSkipped => "head_skipped",
            Self::ThreadMatched => "thread_matched",
            Self::ThreadPending => "thread_pending",
            Self::H2Started => "h2_started",
            Self::H2Copied => "h2_copied",
            Self::H2Lost => "h2_lost",
        }
    }
}
