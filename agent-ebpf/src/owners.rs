//! Owner hooks: cgroup `sock_addr` programs on the cgroup v2 root. They run in
//! the calling process's context, so `bpf_get_current_pid_tgid()` is the
//! owner here (unlike in TC). They always return 1 (allow): tagflow never
//! refuses a connect, bind or send.
use crate::maps::{count, BOUND_PORTS, SOCK_FLOW, SOCK_OWNER, THREAD_VIA};
use agent_common::{Counter, FlowKey, PortKey, SockOwner};
use aya_ebpf::{
    helpers::generated::{bpf_get_current_pid_tgid, bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::{SockAddrContext, SockContext},
    EbpfContext,
};

const ALLOW: i32 = 1;

/// connect4/6, sendmsg4/6: socket cookie → tgid, thread, the connection
/// that thread read last (the request it is serving) and the namespace.
#[inline(always)]
pub fn record_socket(ctx: &SockAddrContext) -> i32 {
    let id = unsafe { bpf_get_current_pid_tgid() };
    let (tgid, tid) = ((id >> 32) as u32, id as u32);
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let via = unsafe { THREAD_VIA.get(tid) };
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // sendmsg runs per datagram: skip the write when nothing changed.
    if let Some(p) = unsafe { SOCK_OWNER.get(cookie) } {
        let same_via = match via {
            Some(v) => p.via == *v,
            None => !p.has_via(),
        };
        if p.tgid == tgid && p.tid == tid && same_via && p.netns == netns {
            return ALLOW;
        }
    }
    let owner = SockOwner {
        tgid,
        tid,
        via: match via {
            Some(v) => *v,
            None => FlowKey::default(),
        },
        netns,
    };
    if let Err(e) = SOCK_OWNER.insert(cookie, owner, 0) {
        count(Counter::OwnerUpdateFailed);
        // Process context and rare: worth a log line (bridged into tracing).
        aya_log_ebpf::warn!(ctx, "SOCK_OWNER update failed: {}", e);
    }
    ALLOW
}

/// bind4/6: (netns, proto, port) → tgid. Port 0 (kernel picks) is unknown
/// here; the start-up backfill and later connects cover those sockets.
#[inline(always)]
pub fn record_bind(ctx: &SockAddrContext) -> i32 {
    let sa = unsafe { &*ctx.sock_addr };
    let port = u16::from_be(sa.user_port as u16);
    if port == 0 {
        return ALLOW;
    }
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let key = PortKey::new(netns, sa.protocol as u8, port);
    let tgid = (unsafe { bpf_get_current_pid_tgid() } >> 32) as u32;
    if let Err(e) = BOUND_PORTS.insert(key, tgid, 0) {
        count(Counter::OwnerUpdateFailed);
        aya_log_ebpf::warn!(ctx, "BOUND_PORTS update failed: {}", e);
    }
    ALLOW
}

/// sock_release: forget the socket's owner so cookies of dead sockets do not
/// crowd out live ones (the map is LRU anyway).
#[inline(always)]
pub fn forget_socket(ctx: &SockContext) -> i32 {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = SOCK_OWNER.remove(cookie);
    let _ = SOCK_FLOW.remove(cookie);
    ALLOW
}
