//! The one ABI shared by tagflow's eBPF programs and its userspace agent.
//!
//! Every type here is `#[repr(C)]`, has explicit padding, and its layout is
//! asserted by tests (`tests/layout.rs`) and by `const` checks below, so the
//! kernel side and the user side cannot drift apart silently.
//!
//! With the `user` feature the types implement `aya::Pod` and can be used as
//! map keys and values from userspace.
#![no_std]

pub mod cb;
pub mod config;
pub mod counters;
pub mod event;
pub mod flow;
pub mod trace;

#[cfg(feature = "user")]
mod user;

pub use cb::*;
pub use config::*;
pub use counters::*;
pub use event::*;
pub use flow::*;
pub use trace::*;

/// Bumped whenever a map key or value layout changes: pinned maps from an
/// older agent are recreated rather than reused.
pub const ABI_VERSION: u32 = 3;

/// TCX verdict "continue with the next program" (`TCX_NEXT`, Linux 6.6).
/// It has the same value as `TC_ACT_UNSPEC`, which under a netlink/clsact
/// filter also means "continue with the next filter". tagflow returns this for
/// every packet: it never ends the chain, drops or redirects.
pub const TCX_NEXT: i32 = -1;

/// Names of the maps in the eBPF object (kept ≤ 15 bytes: BPF_OBJ_NAME_LEN).
pub mod maps {
    pub const TRACES: &str = "TRACES";
    pub const FLOW_TRACES: &str = "FLOW_TRACES";
    pub const FLOW_STATS: &str = "FLOW_STATS";
    pub const SOCK_OWNER: &str = "SOCK_OWNER";
    pub const BOUND_PORTS: &str = "BOUND_PORTS";
    pub const IFACE_NETNS: &str = "IFACE_NETNS";
    pub const NETNS_GEN: &str = "NETNS_GEN";
    pub const NETNS_SLOTS: &str = "NETNS_SLOTS";
    pub const CAPTURE_SKIP: &str = "CAPTURE_SKIP";
    pub const EVENTS: &str = "EVENTS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const SOCK_FLOW: &str = "SOCK_FLOW";
    pub const THREAD_VIA: &str = "THREAD_VIA";
    pub const H2_FLOWS: &str = "H2_FLOWS";
    pub const H2_WALK: &str = "H2_WALK";
    pub const POD_ADDRS: &str = "POD_ADDRS";

    /// Default `max_entries` (bytes for `EVENTS`): the eBPF object declares
    /// these and the agent's `MapSizes` starts from them; most can be
    /// changed at load time (`[maps]` in the config file).
    pub mod size {
        pub const TRACES: u32 = 16384;
        pub const FLOW_TRACES: u32 = 16384;
        pub const FLOW_STATS: u32 = 32768;
        pub const SOCK_OWNER: u32 = 65536;
        pub const BOUND_PORTS: u32 = 16384;
        pub const IFACE_NETNS: u32 = 4096;
        /// One entry per namespace that has trace entries.
        pub const NETNS_GEN: u32 = 4096;
        pub const CAPTURE_SKIP: u32 = 8192;
        /// Accepted TCP sockets alive on the node.
        pub const SOCK_FLOW: u32 = 65536;
        /// Threads that read a connection (one entry per thread).
        pub const THREAD_VIA: u32 = 32768;
        /// HTTP/2 connections followed by the frame walk (LRU).
        pub const H2_FLOWS: u32 = 8192;
        /// Addresses of the node's pods (a few per pod).
        pub const POD_ADDRS: u32 = 4096;
        /// ≈ 1900 request heads (1.1 KB each): enough to ride out the agent
        /// being off-CPU for a while on a saturated node.
        pub const EVENTS_BYTES: u32 = 2 << 20;
    }
}

/// Names of the programs in the eBPF object.
pub mod programs {
    pub const INGRESS: &str = "tagflow_ingress";
    /// `INGRESS` for kernels that refuse `bpf_get_netns_cookie` in TC
    /// (before 6.14): the namespace comes from the interface or the
    /// socket's recorded owner. The kernel shows both as `tagflow_ingress`
    /// (names are cut at 15 bytes).
    pub const INGRESS_IFNS: &str = "tagflow_ingress_ifns";
    pub const UPLINK: &str = "tagflow_uplink";
    /// The HTTP/2 frame walk, tail-called by the ingress programs; its
    /// index in `H2_WALK` is 1 for this variant (the skb's clock), 0 for
    /// `H2_IFNS` (the kernel's).
    pub const H2: &str = "tagflow_h2";
    pub const H2_IFNS: &str = "tagflow_h2_ifns";
    pub const CONNECT4: &str = "tagflow_connect4";
    pub const CONNECT6: &str = "tagflow_connect6";
    pub const BIND4: &str = "tagflow_bind4";
    pub const BIND6: &str = "tagflow_bind6";
    pub const SENDMSG4: &str = "tagflow_sendmsg4";
    pub const SENDMSG6: &str = "tagflow_sendmsg6";
    pub const SOCK_RELEASE: &str = "tagflow_sock_release";
    pub const SOCKOPS: &str = "tagflow_sockops";
    pub const RECV: &str = "tagflow_recv";
    pub const THREAD_EXIT: &str = "tagflow_thread_exit";
    pub const FORK: &str = "tagflow_fork";
}
