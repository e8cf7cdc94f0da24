//! Flows: `FLOW_STATS`, `FLOW_TRACES`, and the socket-owner maps.

/// `FlowKey.family`.
pub const FAMILY_IPV4: u8 = 4;
pub const FAMILY_IPV6: u8 = 6;
/// `FlowKey.proto` (IANA protocol numbers).
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// `FlowKey.netns` of a request head captured on the node's uplink: it came
/// from another node, no local pod sent it (namespace cookies start at 1).
pub const NETNS_WIRE: u64 = 0;

/// One direction-independent connection as seen from the pod.
///
/// "local" is the pod's end: on the ingress of the host-side veth the pod's
/// outgoing packets arrive, so local = source, remote = destination.
/// IPv4 addresses occupy the first 4 bytes of the 16-byte fields, the rest is
/// zero. Ports are in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub netns: u64,
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
    pub family: u8,
    pub proto: u8,
    pub _pad: [u8; 2],
}

impl FlowKey {
    /// The key of a connection seen from `local`'s side (the pod's end).
    /// Mixed families map the IPv4 end into IPv6, as the kernel does.
    pub fn new(
        netns: u64,
        proto: u8,
        local: core::net::SocketAddr,
        remote: core::net::SocketAddr,
    ) -> Self {
        use core::net::IpAddr;
        let mut k = Self {
            netns,
            local_port: local.port(),
            remote_port: remote.port(),
            proto,
            ..Self::default()
        };
        match (local.ip(), remote.ip()) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                k.family = FAMILY_IPV4;
                k.local_addr[..4].copy_from_slice(&a.octets());
                k.remote_addr[..4].copy_from_slice(&b.octets());
            }
            (a, b) => {
                let v6 = |ip: IpAddr| match ip {
                    IpAddr::V6(v) => v.octets(),
                    IpAddr::V4(v) => v.to_ipv6_mapped().octets(),
                };
                k.family = FAMILY_IPV6;
                k.local_addr = v6(a);
                k.remote_addr = v6(b);
            }
        }
        k
    }

    /// The same connection as its other end sees it, in `netns`.
    pub fn reversed_in(&self, netns: u64) -> Self {
        Self {
            netns,
            local_addr: self.remote_addr,
            remote_addr: self.local_addr,
            local_port: self.remote_port,
            remote_port: self.local_port,
            ..*self
        }
    }

    /// The remote end's address.
    pub fn remote_ip(&self) -> core::net::IpAddr {
        ip(self.family, &self.remote_addr)
    }

    /// The local end's address.
    pub fn local_ip(&self) -> core::net::IpAddr {
        ip(self.family, &self.local_addr)
    }
}

fn ip(family: u8, b: &[u8; 16]) -> core::net::IpAddr {
    use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    if family == FAMILY_IPV6 {
        IpAddr::V6(Ipv6Addr::from(*b))
    } else {
        IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
    }
}

/// `FlowStats.direction`: packets seen on the hook's ingress, i.e. leaving
/// the pod when the hook is the host-side end of its veth.
pub const DIRECTION_POD_EGRESS: u8 = 1;

/// `FlowStats.owner` / `FlowEvent.owner`: how the pid was found.
pub const OWNER_NONE: u8 = 0;
/// From `SOCK_OWNER`: the socket was `connect()`ed (or sent to) by the pid:
/// the pod opened this connection (span kind CLIENT).
pub const OWNER_CONNECTED: u8 = 1;
/// From `BOUND_PORTS`: the packet left from a port the pid bound: an accepted
/// connection or a server socket (span kind SERVER).
pub const OWNER_BOUND: u8 = 2;

/// `FlowStats.matched`: which table gave the trace context.
pub const MATCH_FLOW: u8 = 1;
pub const MATCH_PID: u8 = 2;
/// `FlowStats.matched`: the trace of the connection the calling thread read
/// last before it connected (`SockOwner::via`), i.e. the request it serves.
pub const MATCH_THREAD: u8 = 4;
/// `FlowStats.matched` of a "no trace" entry on which a request head was
/// captured: its packets are counted (as a traced flow's are), so userspace
/// can still file the connection under the head's trace when it ended
/// before the agent had keyed it.
pub const MATCH_WATCHED: u8 = 3;
/// `FlowStats.matched` of a span userspace made from a request head alone
/// (never written by the datapath): no packet was counted under its trace,
/// its connection having gone on to a later request, closed, or gone quiet
/// after the answer before the agent keyed it.
pub const MATCH_HEAD: u8 = 5;

/// Value of `FLOW_STATS` (LRU): per (flow, trace) accounting, and the
/// datapath's per-flow resolution cache.
///
/// The entry remembers which trace the flow resolved to under generation
/// `gen` of its namespace (`NETNS_GEN`). While the namespace's generation is
/// unchanged, later packets reuse the result instead of resolving the owner
/// and looking up both trace tables again. An all-zero `trace_id` caches
/// "no trace" (userspace ignores such entries).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowStats {
    pub trace_id: [u8; 16],
    pub pid: u32,
    pub ifindex: u32,
    pub packets: u64,
    pub bytes: u64,
    /// `CLOCK_MONOTONIC` ns of the first and last tagged packet.
    pub first_ns: u64,
    pub last_ns: u64,
    /// `NETNS_GEN` value the resolution was made under.
    pub gen: u64,
    /// The cb[4] word written on this flow's packets (magic + flags).
    pub cb_meta: u32,
    /// OR of the TCP flags of every tagged packet (FIN=1, SYN=2, RST=4, ...).
    pub tcp_flags: u8,
    pub direction: u8,
    pub owner: u8,
    pub matched: u8,
}

impl FlowStats {
    /// Whether this entry only caches a "no trace" result.
    pub fn is_negative(&self) -> bool {
        self.trace_id == [0; 16]
    }
}

/// Value of `SOCK_OWNER`: who connected (or sent with) a socket, recorded
/// in the calling thread's context.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockOwner {
    pub tgid: u32,
    /// The calling thread (the kernel's pid).
    pub tid: u32,
    /// The connection that thread read last before it connected: an
    /// accepted connection as its reader sees it (the request being
    /// served), or what an outgoing connection it read was itself made
    /// for. All zero when the thread had read nothing traced.
    pub via: FlowKey,
    /// The socket's network namespace (cookie): where the kernel refuses
    /// `bpf_get_netns_cookie` in TC, a pod loopback's packets take their
    /// namespace from here (every pod's `lo` is ifindex 1).
    pub netns: u64,
}

impl SockOwner {
    pub fn has_via(&self) -> bool {
        self.via.family != 0
    }
}

/// `AF_INET`/`AF_INET6` as `bpf_sock_ops.family` reports them.
pub const AF_INET: u32 = 2;
pub const AF_INET6: u32 = 10;

impl FlowKey {
    /// An established TCP socket as its own end sees it, from the fields of
    /// `struct bpf_sock_ops`: addresses in network byte order word by word,
    /// `local_port` in host order, `remote_port` in network order in the
    /// upper half (little-endian kernels) or the lower half. A v4-mapped
    /// IPv6 socket carries IPv4 packets and is keyed as IPv4, as the
    /// datapath parses them.
    #[allow(clippy::too_many_arguments)]
    pub fn from_sock_ops(
        netns: u64,
        family: u32,
        local4: u32,
        remote4: u32,
        local6: [u32; 4],
        remote6: [u32; 4],
        local_port: u32,
        remote_port: u32,
    ) -> Self {
        let rp = if remote_port >> 16 != 0 {
            remote_port >> 16
        } else {
            remote_port
        };
        let mut k = Self {
            netns,
            local_port: local_port as u16,
            remote_port: u16::from_be(rp as u16),
            proto: PROTO_TCP,
            ..Self::default()
        };
        let bytes = |w: [u32; 4]| {
            let mut b = [0u8; 16];
            let mut i = 0;
            while i < 4 {
                let x = w[i].to_ne_bytes();
                b[i * 4] = x[0];
                b[i * 4 + 1] = x[1];
                b[i * 4 + 2] = x[2];
                b[i * 4 + 3] = x[3];
                i += 1;
            }
            b
        };
        let mapped =
            |b: &[u8; 16]| b[..10].iter().all(|x| *x == 0) && b[10] == 0xff && b[11] == 0xff;
        if family == AF_INET6 {
            let (l, r) = (bytes(local6), bytes(remote6));
            if mapped(&l) && mapped(&r) {
                k.family = FAMILY_IPV4;
                k.local_addr[..4].copy_from_slice(&l[12..]);
                k.remote_addr[..4].copy_from_slice(&r[12..]);
            } else {
                k.family = FAMILY_IPV6;
                k.local_addr = l;
                k.remote_addr = r;
            }
        } else {
            k.family = FAMILY_IPV4;
            k.local_addr[..4].copy_from_slice(&local4.to_ne_bytes());
            k.remote_addr[..4].copy_from_slice(&remote4.to_ne_bytes());
        }
        k
    }
}

/// Key of `BOUND_PORTS`: a port bound by a process in a namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortKey {
    pub netns: u64,
    /// Host byte order.
    pub port: u16,
    pub proto: u8,
    pub _pad: [u8; 5],
}

impl PortKey {
    pub const fn new(netns: u64, proto: u8, port: u16) -> Self {
        Self {
            netns,
            port,
            proto,
            _pad: [0; 5],
        }
    }
}

const _: () = assert!(core::mem::size_of::<FlowKey>() == 48);
const _: () = assert!(core::mem::size_of::<FlowStats>() == 72);
const _: () = assert!(core::mem::size_of::<PortKey>() == 16);
const _: () = assert!(core::mem::size_of::<SockOwner>() == 64);
