//! The pod network namespaces the agent follows: for each attached veth,
//! the namespace at its other end (an open handle, so it can be entered),
//! its cookie, and its addresses. This is how a captured request head
//! addressed to a pod on this node finds the process that will read it.
use std::{
    collections::HashMap,
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use agent_common::{FlowKey, PortKey, TraceKey};

use crate::netns;

/// Addresses are re-read on a miss at most this often: a pod's address is
/// set after its veth appears, and a miss for a foreign address must not
/// cost a walk of every namespace per request head.
const REFRESH_EVERY: Duration = Duration::from_secs(1);
/// For this long after a pod appears its addresses are re-read every
/// `REFRESH_EVERY` (`refresh_recent`): they are set after its veth appears.
const NEW_POD_WINDOW: Duration = Duration::from_secs(30);

/// Why no receiving process was found for a request head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unresolved {
    /// The destination is no pod of this node (another node, a Service
    /// address, the outside world).
    NotLocal,
    /// The destination pod has nothing bound to the port.
    NoListener,
}

/// The process that will read a head, and whether its end of the
/// connection had already finished when the head was handled (the agent
/// lagged behind the traffic: the connection's entry can no longer be
/// released by its FIN, only by the idle timeout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reader {
    pub key: TraceKey,
    pub late: bool,
}

struct Pod {
    cookie: u64,
    ns: File,
}

/// Pod namespaces by host-side ifindex, and their addresses.
#[derive(Default)]
pub struct PodNets {
    pods: HashMap<u32, Pod>,
    addrs: HashMap<IpAddr, u64>,
    refreshed: Option<Instant>,
    /// Pods that appeared within `NEW_POD_WINDOW`, and when; with when
    /// their addresses were last re-read.
    recent: Vec<(u64, Instant)>,
    recent_read: Option<Instant>,
    /// Address re-reads done (a miss after the last one was older than
    /// `REFRESH_EVERY`).
    refreshes: u64,
}

impl PodNets {
    /// The veth `ifindex` leads to the namespace `ns` (cookie `cookie`).
    pub fn add(&mut self, ifindex: u32, cookie: u64, ns: File) {
        self.pods.insert(ifindex, Pod { cookie, ns });
        self.learn(cookie);
        self.recent.push((cookie, Instant::now()));
    }

    /// Every pod address known, with its namespace.
    pub fn addrs(&self) -> &HashMap<IpAddr, u64> {
        &self.addrs
    }

    /// Re-reads the addresses of the pods that appeared lately (each at
    /// most once per `REFRESH_EVERY`; the others' are known).
    pub fn refresh_recent(&mut self) {
        let now = Instant::now();
        self.recent
            .retain(|(_, t)| now.duration_since(*t) < NEW_POD_WINDOW);
        if self.recent.is_empty()
            || self
                .recent_read
                .is_some_and(|t| now.duration_since(t) < REFRESH_EVERY)
        {
            return;
        }
        self.recent_read = Some(now);
        let cookies: Vec<u64> = self.recent.iter().map(|(c, _)| *c).collect();
        for c in cookies {
            self.learn(c);
        }
    }

    fn refreshed_lately(&self, now: Instant) -> bool {
        self.refreshed
            .is_some_and(|t| now.duration_since(t) < REFRESH_EVERY)
    }

    fn refresh(&mut self, now: Instant) {
        self.refreshed = Some(now);
        self.refreshes += 1;
        let cookies: Vec<u64> = self.pods.values().map(|p| p.cookie).collect();
        self.addrs.clear();
        for c in cookies {
            self.learn(c);
        }
    }

    /// The veth `ifindex` is gone. When no other veth leads to its
    /// namespace, the namespace's addresses are forgotten and its handle
    /// is returned (dropping it lets the namespace go).
    pub fn remove(&mut self, ifindex: u32) -> Option<(u64, File)> {
        let p = self.pods.remove(&ifindex)?;
        if self.pods.values().any(|o| o.cookie == p.cookie) {
            return None;
        }
        self.addrs.retain(|_, c| *c != p.cookie);
        Some((p.cookie, p.ns))
    }

    /// Whether a veth already leads to the namespace `cookie`.
    pub fn has(&self, cookie: u64) -> bool {
        self.pods.values().any(|p| p.cookie == cookie)
    }

    /// The cookie of the pod namespace that holds `ip`; re-reads every
    /// namespace's addresses on a miss (at most once per `REFRESH_EVERY`).
    pub fn netns_of(&mut self, ip: IpAddr) -> Option<u64> {
        if let Some(c) = self.addrs.get(&ip) {
            return Some(*c);
        }
        let now = Instant::now();
        if self.refreshed_lately(now) {
            return None;
        }
        self.refresh(now);
        self.addrs.get(&ip).copied()
    }

    fn learn(&mut self, cookie: u64) {
        let Some(p) = self.pods.values().find(|p| p.cookie == cookie) else {
            return;
        };
        if let Ok(list) = netns::in_netns_file(&p.ns, addresses) {
            for ip in list.into_iter().filter(|ip| !ip.is_loopback()) {
                self.addrs.insert(ip, cookie);
            }
        }
    }

    /// The process that will read what was sent on `key` (a connection
    /// seen from its sender): the destination pod's holder of the port, in
    /// the sender's own namespace for loopback.
    pub fn receiver(
        &mut self,
        key: &FlowKey,
        bound_port: impl Fn(&PortKey) -> Option<u32>,
        finished: impl Fn(&FlowKey) -> bool,
    ) -> Result<Reader, Unresolved> {
        let dst = key.remote_ip();
        let netns = if dst.is_loopback() {
            key.netns
        } else {
            self.netns_of(dst).ok_or(Unresolved::NotLocal)?
        };
        let pid = bound_port(&PortKey::new(netns, key.proto, key.remote_port))
            .ok_or(Unresolved::NoListener)?;
        Ok(Reader {
            key: TraceKey::new(pid, netns),
            late: finished(&key.reversed_in(netns)),
        })
    }
}

/// The calling thread's namespace's interface addresses.
fn addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we walk read-only and free once; each
    // ifa_addr is checked for null and read as the family it declares.
    unsafe {
        if libc::getifaddrs(&mut ifap) != 0 {
            return out;
        }
        let mut p = ifap;
        while !p.is_null() {
            let a = (*p).ifa_addr;
            if !a.is_null() {
                match i32::from((*a).sa_family) {
                    libc::AF_INET => {
                        let sin = a.cast::<libc::sockaddr_in>();
                        let v4 = Ipv4Addr::from(u32::from_be((*sin).sin_addr.s_addr));
                        out.push(IpAddr::V4(v4));
                    }
                    libc::AF_INET6 => {
                        let sin6 = a.cast::<libc::sockaddr_in6>();
                        out.push(IpAddr::V6(Ipv6Addr::from((*sin6).sin6_addr.s6_addr)));
                    }
                    _ => {}
                }
            }
            p = (*p).ifa_next;
        }
        libc::freeifaddrs(ifap);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent_common::PROTO_TCP;

    fn key(netns: u64, dst: [u8; 4], dport: u16) -> FlowKey {
        FlowKey::new(
            netns,
            PROTO_TCP,
            ([10, 0, 0, 1], 40000).into(),
            (dst, dport).into(),
        )
    }

    #[test]
    fn loopback_is_read_in_the_senders_namespace_and_strangers_are_not_local() {
        let mut p = PodNets::default();
        let bound = |k: &PortKey| (k.netns == 7 && k.port == 8081).then_some(42);
        let open = |_: &FlowKey| false;
        let lo = key(7, [127, 0, 0, 1], 8081);
        let reader = TraceKey::new(42, 7);
        let got = p.receiver(&lo, bound, open);
        assert_eq!(
            got,
            Ok(Reader {
                key: reader,
                late: false
            })
        );
        // The reader already answered and closed before the agent got here.
        let closed = |k: &FlowKey| k.local_port == 8081 && k.netns == 7;
        let got = p.receiver(&lo, bound, closed);
        assert_eq!(
            got,
            Ok(Reader {
                key: reader,
                late: true
            })
        );
        let other_port = key(7, [127, 0, 0, 1], 9);
        assert_eq!(
            p.receiver(&other_port, bound, open),
            Err(Unresolved::NoListener)
        );
        let away = key(7, [192, 0, 2, 1], 8081);
        assert_eq!(p.receiver(&away, bound, open), Err(Unresolved::NotLocal));
        // The miss re-read the (no) namespaces once; a second miss within
        // the interval does not.
        assert_eq!(p.receiver(&away, bound, open), Err(Unresolved::NotLocal));
        assert_eq!(p.refreshes, 1);
    }

    #[test]
    fn this_namespaces_addresses_are_listed() {
        let list = addresses();
        assert!(list.iter().any(|ip| ip.is_loopback()), "{list:?}");
    }
}
