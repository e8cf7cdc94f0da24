//! What a registration names, checked against the peer's own network
//! namespace: the processes (a pid, or whoever serves a port) and the exact
//! connections. A pod can only name its own.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use agent_common::{FlowKey, PROTO_TCP, PROTO_UDP};

use super::{Peer, Refusal};
use crate::sources::{
    protocol::{Proto, Registration, Target},
    targets::{self, ListenerCache, NsId},
};

/// At most this many connections per registration.
pub const MAX_FLOWS: usize = 16;
/// Polls for the holder of a freshly accepted connection (2 ms apart).
const ACCEPT_RETRIES: usize = 8;
/// How long a connection's serving process is trusted without a new look.
const SERVED_BY_TTL: Duration = Duration::from_secs(30);
/// Entries of the serving-process cache, at most.
const SERVED_BY_CAP: usize = 16384;

/// A connection from a registration: (local, remote, IP protocol).
pub type FlowSpec = (SocketAddr, SocketAddr, u8);

/// A connection in a namespace: (namespace, client end, server end).
type ConnKey = (NsId, SocketAddr, SocketAddr);

/// Finds the processes a registration is for, with two caches: listeners
/// per port, and who serves a given (pooled) connection.
pub struct Resolver {
    listeners: Mutex<ListenerCache>,
    /// Who serves a connection does not change while it lives: the process
    /// found behind a (namespace, client end, server end) is reused for
    /// later requests on the same connection.
    served_by: Mutex<HashMap<ConnKey, (Vec<u32>, Instant)>>,
}

impl Default for Resolver {
    fn default() -> Self {
        Self {
            listeners: Mutex::new(ListenerCache::new(Duration::from_secs(2))),
            served_by: Mutex::default(),
        }
    }
}

impl Resolver {
    /// Whether resolving `target` walks /proc (or may sleep waiting for an
    /// accept): a port, or a pid the peer sees in a pid namespace of its own.
    pub fn walks_proc(&self, target: &Target, peer: Peer) -> bool {
        match target {
            Target::Pid(_) => !peer.shares_pids,
            Target::Port { .. } => true,
        }
    }

    /// The processes `target` names, all in the peer's namespace. A pid is
    /// the one the peer sees (its own pid namespace).
    pub fn processes(
        &self,
        target: &Target,
        flows: &[FlowSpec],
        peer: Peer,
    ) -> Result<Vec<u32>, Refusal> {
        match target {
            Target::Pid(pid) => {
                let host = match peer.shares_pids {
                    true => *pid,
                    false => targets::host_pid(peer.pid, *pid).ok_or(Refusal::NoProcess(*pid))?,
                };
                match targets::netns_id_of(host) {
                    Some(ns) if ns == peer.ns => Ok(vec![host]),
                    Some(_) => Err(Refusal::NotYourNetns(*pid)),
                    None => Err(Refusal::NoProcess(*pid)),
                }
            }
            Target::Port { port, proto } => {
                let p = proto_num(*proto);
                // The exact server-side sockets of the given connections
                // name the process that serves this request.
                let to_port: Vec<_> = flows
                    .iter()
                    .filter(|(_, remote, fp)| *fp == p && p == PROTO_TCP && remote.port() == *port)
                    .collect();
                let mut pids = self.server_of(&to_port, peer);
                if pids.is_empty() {
                    pids = self
                        .listeners
                        .lock()
                        .expect("listener cache lock")
                        .get(peer.ns, peer.pid, *port, p);
                }
                if pids.is_empty() {
                    return Err(Refusal::NoListener(*port));
                }
                Ok(pids)
            }
        }
    }

    /// The holders of the server side of the first connection, cached.
    fn server_of(&self, to_port: &[&FlowSpec], peer: Peer) -> Vec<u32> {
        let Some((l, r, _)) = to_port.first() else {
            return Vec::new();
        };
        let now = Instant::now();
        let key = (peer.ns, *l, *r);
        if let Some((p, t)) = self.served_by.lock().expect("cache lock").get(&key) {
            if now.duration_since(*t) < SERVED_BY_TTL
                && p.iter()
                    .all(|pid| targets::netns_id_of(*pid) == Some(peer.ns))
            {
                return p.clone();
            }
        }
        // A connection just made may not be accepted yet (or its forked
        // handler not born): give the server a moment.
        for attempt in 0..ACCEPT_RETRIES {
            let accepted: Vec<u64> = to_port
                .iter()
                .filter_map(|(l, r, _)| targets::accepted_inode(peer.pid, *l, *r))
                .collect();
            let pids = targets::holders(peer.ns, &accepted);
            if !pids.is_empty() {
                let mut cache = self.served_by.lock().expect("cache lock");
                if cache.len() >= SERVED_BY_CAP {
                    cache.retain(|_, (_, t)| now.duration_since(*t) < SERVED_BY_TTL);
                    // Still full of fresh entries: start over (a miss costs
                    // one /proc walk; growth would be unbounded memory).
                    if cache.len() >= SERVED_BY_CAP {
                        cache.clear();
                    }
                }
                cache.insert(key, (pids.clone(), now));
                return pids;
            }
            if attempt + 1 < ACCEPT_RETRIES {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        Vec::new()
    }
}

pub fn proto_num(p: Proto) -> u8 {
    match p {
        Proto::Tcp => PROTO_TCP,
        Proto::Udp => PROTO_UDP,
    }
}

/// The connections a registration names, parsed and checked.
pub fn parse_flows(reg: &Registration) -> Result<Vec<FlowSpec>, Refusal> {
    if reg.flows.len() > MAX_FLOWS {
        return Err(Refusal::TooManyFlows);
    }
    reg.flows
        .iter()
        .map(|f| {
            let parse = |s: &str| {
                s.parse::<SocketAddr>()
                    .map_err(|e| Refusal::BadFlowAddress(s.to_string(), e))
            };
            let (l, r) = (wire(parse(&f.local)?), wire(parse(&f.remote)?));
            if l.is_ipv4() != r.is_ipv4() {
                return Err(Refusal::MixedFamilies);
            }
            Ok((l, r, proto_num(f.proto)))
        })
        .collect()
}

/// The address as the packet carries it: a dual-stack socket (`[::]`)
/// reports IPv4 peers as `::ffff:a.b.c.d`, but the wire (and the datapath's
/// key) is IPv4.
fn wire(a: SocketAddr) -> SocketAddr {
    match a {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => a,
        },
        v4 => v4,
    }
}

/// Keys for both ends of each flow: the caller's, and the peer's for when
/// it is in the same namespace (a sidecar and its app).
pub fn both_ways(netns: u64, flows: &[FlowSpec]) -> Vec<FlowKey> {
    flows
        .iter()
        .flat_map(|(l, r, p)| {
            [
                FlowKey::new(netns, *p, *l, *r),
                FlowKey::new(netns, *p, *r, *l),
            ]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::protocol::Flow;

    fn me() -> Peer {
        let pid = std::process::id();
        Peer {
            pid,
            ns: targets::netns_id_of(pid).expect("own netns"),
            cookie: 1,
            shares_pids: true,
        }
    }

    #[test]
    fn a_pod_can_name_only_processes_of_its_own_namespace() {
        let r = Resolver::default();
        let own = me();
        let pid = own.pid;
        assert_eq!(r.processes(&Target::Pid(pid), &[], own).unwrap(), [pid]);
        // The same process seen from another namespace is not the caller's.
        let stranger = Peer {
            ns: (own.ns.0, own.ns.1 ^ 1),
            ..own
        };
        let e = r.processes(&Target::Pid(pid), &[], stranger).unwrap_err();
        assert!(matches!(e, Refusal::NotYourNetns(p) if p == pid), "{e}");
        let e = r.processes(&Target::Pid(u32::MAX), &[], own).unwrap_err();
        assert!(matches!(e, Refusal::NoProcess(_)), "{e}");
    }

    #[test]
    fn a_port_nobody_listens_on_names_nobody() {
        let r = Resolver::default();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let tcp = Target::Port {
            port,
            proto: Proto::Tcp,
        };
        let e = r.processes(&tcp, &[], me()).unwrap_err();
        assert!(matches!(e, Refusal::NoListener(p) if p == port), "{e}");
        // Listening: the listener's holder (this process) is named.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let tcp = Target::Port {
            port,
            proto: Proto::Tcp,
        };
        assert_eq!(r.processes(&tcp, &[], me()).unwrap(), [std::process::id()]);
    }

    #[test]
    fn flows_are_checked_before_anything_is_written() {
        let reg = |flows: Vec<(&str, &str)>| Registration {
            headers: Default::default(),
            target: Target::Pid(1),
            flows: flows
                .into_iter()
                .map(|(l, r)| Flow {
                    proto: Proto::Tcp,
                    local: l.into(),
                    remote: r.into(),
                })
                .collect(),
            release_on_close: false,
        };
        let ok = parse_flows(&reg(vec![("10.0.0.1:1", "10.0.0.2:80")])).unwrap();
        // A dual-stack listener's view of an IPv4 connection keys as IPv4.
        let mapped = parse_flows(&reg(vec![("[::ffff:10.0.0.1]:1", "10.0.0.2:80")])).unwrap();
        assert_eq!(mapped, ok);
        assert_eq!(both_ways(7, &ok).len(), 2, "both ends of the connection");
        let bad = parse_flows(&reg(vec![("10.0.0.1:1", "nowhere")])).unwrap_err();
        assert!(matches!(bad, Refusal::BadFlowAddress(..)), "{bad}");
        let mixed = parse_flows(&reg(vec![("10.0.0.1:1", "[::1]:80")])).unwrap_err();
        assert!(matches!(mixed, Refusal::MixedFamilies), "{mixed}");
        let many = parse_flows(&reg(vec![("10.0.0.1:1", "10.0.0.2:80"); MAX_FLOWS + 1]));
        assert!(matches!(many, Err(Refusal::TooManyFlows)));
    }
}
