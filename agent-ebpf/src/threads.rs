//! Which request a thread is serving, kept in the kernel: the connection it
//! read last. Accepted sockets are keyed to their connection when they are
//! established (`sock_ops`); the receive path (tp_btf
//! `tcp_rcv_space_adjust`, which `tcp_recvmsg` fires in the reading
//! thread's context for every read that copied data) records the
//! connection per thread; the
//! connect hook copies it onto the thread's new socket (`SockOwner::via`),
//! where the datapath looks up that connection's trace at the call's first
//! packet. No userspace round trip sits between a read and the next call.
use crate::maps::{count, SOCK_FLOW, SOCK_OWNER, THREAD_VIA};
use agent_common::{Counter, FlowKey, TaskOffsets};
use aya_ebpf::{
    helpers::{
        bpf_probe_read_kernel,
        generated::{bpf_get_current_pid_tgid, bpf_get_netns_cookie, bpf_get_socket_cookie},
    },
    programs::{BtfTracePointContext, SockOpsContext},
    EbpfContext,
};
use core::ffi::c_void;

/// `BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB`: a server's end of a new TCP
/// connection (softirq, on the accepted socket). Delivered without any
/// callback flag.
const PASSIVE_ESTABLISHED: u32 = 5;

/// sock_ops: an accepted socket's cookie → the connection as it sees it.
#[inline(always)]
pub fn established(ctx: &SockOpsContext) -> u32 {
    if ctx.op() != PASSIVE_ESTABLISHED {
        return 1;
    }
    // SAFETY: helpers called with the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let key = FlowKey::from_sock_ops(
        netns,
        ctx.family(),
        ctx.local_ip4(),
        ctx.remote_ip4(),
        ctx.local_ip6(),
        ctx.remote_ip6(),
        ctx.local_port(),
        ctx.remote_port(),
    );
    if SOCK_FLOW.insert(cookie, key, 0).is_err() {
        count(Counter::OwnerUpdateFailed);
    }
    1
}

/// tp_btf `tcp_rcv_space_adjust(struct sock *sk)`: the reading thread now serves
/// what this connection carries — the request of an accepted connection,
/// or, for a connection the thread's process opened, the request it was
/// opened for. Reads of sockets that carry neither leave the thread as it
/// was (a pool connection read while serving keeps the request).
#[inline(always)]
pub fn received(ctx: &BtfTracePointContext) -> u32 {
    let sk: *mut c_void = ctx.arg(0);
    // SAFETY: `sk` is the tracepoint's BTF-typed socket argument; the
    // helper accepts it (and NULL) in tracing programs.
    let cookie = unsafe { bpf_get_socket_cookie(sk) };
    if cookie == 0 {
        return 0;
    }
    let via = match unsafe { SOCK_FLOW.get(cookie) } {
        Some(f) => f,
        None => match unsafe { SOCK_OWNER.get(cookie) } {
            Some(o) if o.has_via() => &o.via,
            _ => return 0,
        },
    };
    let tid = unsafe { bpf_get_current_pid_tgid() } as u32;
    // Most reads repeat the thread's last connection: skip the write.
    if let Some(cur) = unsafe { THREAD_VIA.get(tid) } {
        if cur == via {
            return 0;
        }
    }
    if THREAD_VIA.insert(tid, via, 0).is_err() {
        count(Counter::OwnerUpdateFailed);
    }
    0
}

/// tp_btf `sched_process_fork(parent, child)`, in the forking thread: a
/// new process (not a thread: those read for themselves) serves the
/// request its parent thread was serving — a worker forked per request, a
/// `curl` spawned while serving. It holds the connection, not a copy of
/// the trace: once that connection carries another request, or closes,
/// the child's calls follow it or carry none. A prefork master reads no
/// requests, so its workers inherit nothing.
#[inline(always)]
pub fn forked(ctx: &BtfTracePointContext, off: &TaskOffsets) -> u32 {
    if off.pid == 0 {
        return 0;
    }
    let parent = unsafe { bpf_get_current_pid_tgid() } as u32;
    let Some(via) = (unsafe { THREAD_VIA.get(parent) }) else {
        return 0;
    };
    let child: *const u8 = ctx.arg(1);
    // SAFETY: reads of the child's task_struct at offsets its kernel's
    // BTF gave; a failed read is an error, not a fault.
    let pid = unsafe { bpf_probe_read_kernel(child.add(off.pid as usize) as *const u32) };
    let tgid = unsafe { bpf_probe_read_kernel(child.add(off.tgid as usize) as *const u32) };
    let (Ok(pid), Ok(tgid)) = (pid, tgid) else {
        return 0;
    };
    if pid != tgid || pid == 0 {
        return 0;
    }
    if THREAD_VIA.insert(pid, via, 0).is_err() {
        count(Counter::OwnerUpdateFailed);
    }
    0
}

/// tp_btf `sched_process_exit` (every exiting task, thread or not): its
/// entry goes with it, before the thread id can be reused.
#[inline(always)]
pub fn exited() -> u32 {
    let tid = unsafe { bpf_get_current_pid_tgid() } as u32;
    let _ = THREAD_VIA.remove(tid);
    0
}
