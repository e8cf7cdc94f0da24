//! Packet → (netns cookie, owning pid). Never `bpf_get_current_pid_tgid()`:
//! TC runs in softirq and that names whichever task was interrupted.
use crate::maps::{count, BOUND_PORTS, IFACE_NETNS, SOCK_FLOW, SOCK_OWNER};
use agent_common::{
    Counter, FlowKey, PortKey, OWNER_BOUND, OWNER_CONNECTED, OWNER_NONE, PROTO_UDP,
};
use aya_ebpf::{
    helpers::generated::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::TcContext,
    EbpfContext,
};

pub struct Owner {
    pub pid: u32,
    /// `OWNER_*`: how the pid was found.
    pub how: u8,
    /// The connection the connecting thread was serving (see threads.rs).
    pub via: Option<&'static FlowKey>,
}

/// The namespace of the packet's socket. Without a socket the helper reports
/// init_net; a host-namespace socket on a pod's veth is no better. Both take
/// the namespace the loader recorded for the interface (the veth peer's).
#[inline(always)]
pub fn netns(ctx: &TcContext, host_netns: u64) -> u64 {
    // SAFETY: helper called with the program's own context pointer.
    let ns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if ns != host_netns {
        return ns;
    }
    count(Counter::NoSocket);
    iface_netns(ctx).unwrap_or(ns)
}

/// The namespace without the helper (kernels that refuse it in TC): a
/// pod's veth names it; elsewhere (a pod's `lo`, ifindex 1 in every pod)
/// the socket's record from the owner hooks or sock_ops does. Packets of
/// sockets recorded by neither are taken as the host's.
#[inline(always)]
pub fn netns_ifns(ctx: &TcContext, host_netns: u64) -> u64 {
    if let Some(n) = iface_netns(ctx) {
        return n;
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if cookie != 0 {
        if let Some(o) = unsafe { SOCK_OWNER.get(cookie) } {
            if o.netns != 0 {
                return o.netns;
            }
        }
        if let Some(f) = unsafe { SOCK_FLOW.get(cookie) } {
            return f.netns;
        }
    }
    host_netns
}

#[inline(always)]
fn iface_netns(ctx: &TcContext) -> Option<u64> {
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    unsafe { IFACE_NETNS.get(ifindex) }.copied()
}

/// Socket owner first (client sockets, recorded at connect/sendmsg), then the
/// bound local port (servers: accepted sockets are born in softirq and have
/// no recorded owner, but their packets leave from the listening port).
/// UDP the other way round: a UDP server answers with sendto from its bound
/// socket, which the sendmsg hook records like any client's.
#[inline(always)]
pub fn owner(ctx: &TcContext, key: &FlowKey) -> Owner {
    if key.proto == PROTO_UDP {
        if let Some(o) = bound(key) {
            return o;
        }
    }
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if cookie != 0 {
        if let Some(o) = unsafe { SOCK_OWNER.get(cookie) } {
            return Owner {
                pid: o.tgid,
                how: OWNER_CONNECTED,
                via: if o.has_via() { Some(&o.via) } else { None },
            };
        }
    }
    if let Some(o) = bound(key) {
        return o;
    }
    count(Counter::NoOwner);
    Owner {
        pid: 0,
        how: OWNER_NONE,
        via: None,
    }
}

/// The process that bound the packet's local port in its namespace.
#[inline(always)]
fn bound(key: &FlowKey) -> Option<Owner> {
    let pk = PortKey::new(key.netns, key.proto, key.local_port);
    unsafe { BOUND_PORTS.get(pk) }.map(|pid| Owner {
        pid: *pid,
        how: OWNER_BOUND,
        via: None,
    })
}
