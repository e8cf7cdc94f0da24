//! The datapath's maps as the agent reads and writes them (besides the
//! trace tables, which `tables.rs` owns): owners, interface namespaces,
//! counters, per-flow stats, capture skips (their garbage collection and the
//! fill counts: housekeeping.rs).
use agent_common::{Counter, FlowKey, FlowStats, PortKey};

use super::{Datapath, LoaderError};

/// An address as `FlowKey` holds it: IPv4 in the first 4 bytes.
fn pod_addr_key(ip: std::net::IpAddr) -> [u8; 16] {
    let mut k = [0u8; 16];
    match ip {
        std::net::IpAddr::V4(v4) => k[..4].copy_from_slice(&v4.octets()),
        std::net::IpAddr::V6(v6) => k = v6.octets(),
    }
    k
}

impl Datapath {
    /// Records the namespace at the other end of an interface, for packets
    /// that carry no socket.
    pub fn set_iface_netns(&mut self, ifindex: u32, netns: u64) -> Result<(), LoaderError> {
        self.iface_netns
            .insert(ifindex, netns, 0)
            .map_err(|source| LoaderError::Map {
                name: "IFACE_NETNS",
                source,
            })
    }

    /// A pod's address and its namespace (`FlowKey`'s form of the address:
    /// see `pod_addr_key`), for the HTTP/2 walk to find a server's side.
    pub fn set_pod_addr(&mut self, ip: std::net::IpAddr, netns: u64) -> Result<(), LoaderError> {
        self.pod_addrs
            .insert(pod_addr_key(ip), netns, 0)
            .map_err(|source| LoaderError::Map {
                name: "POD_ADDRS",
                source,
            })
    }

    pub fn remove_pod_addr(&mut self, ip: std::net::IpAddr) {
        let _ = self.pod_addrs.remove(&pod_addr_key(ip));
    }

    pub fn set_bound_port(&mut self, key: PortKey, pid: u32) -> Result<(), LoaderError> {
        self.bound_ports
            .insert(key, pid, 0)
            .map_err(|source| LoaderError::Map {
                name: "BOUND_PORTS",
                source,
            })
    }

    pub fn bound_port(&self, key: &PortKey) -> Option<u32> {
        self.bound_ports.get(key, 0).ok()
    }

    pub fn sock_owner(&self, cookie: u64) -> Option<u32> {
        self.sock_owner.get(&cookie, 0).ok().map(|o| o.tgid)
    }

    /// Counters summed over CPUs, in `Counter` order; `Seen` is the sum of
    /// the terminal counters.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>, LoaderError> {
        let mut out = Counter::ALL
            .iter()
            .map(|c| {
                let v = self
                    .counters
                    .get(&(*c as u32), 0)
                    .map_err(|source| LoaderError::Map {
                        name: "COUNTERS",
                        source,
                    })?;
                Ok((*c, v.iter().sum()))
            })
            .collect::<Result<Vec<(Counter, u64)>, LoaderError>>()?;
        out[Counter::Seen as usize].1 = Counter::TERMINAL.iter().map(|t| out[*t as usize].1).sum();
        Ok(out)
    }

    pub fn counter(&self, c: Counter) -> u64 {
        self.counters().map(|v| v[c as usize].1).unwrap_or(0)
    }

    /// A snapshot of FLOW_STATS.
    pub fn flow_stats(&self) -> Vec<(FlowKey, FlowStats)> {
        self.flow_stats.iter().filter_map(Result::ok).collect()
    }

    /// FLOW_STATS entries for these flows only (cheaper than a full walk).
    pub fn flow_stats_for<'a>(
        &self,
        keys: impl Iterator<Item = &'a FlowKey>,
    ) -> std::collections::HashMap<FlowKey, FlowStats> {
        keys.filter_map(|k| self.flow_stats.get(k, 0).ok().map(|s| (*k, s)))
            .collect()
    }

    /// Deletes `key`'s FLOW_STATS entry if it still belongs to `trace` (its
    /// connection closed: no need to wait for the GC).
    pub fn forget_flow(&mut self, key: &FlowKey, trace: &[u8; 16]) -> bool {
        match self.flow_stats.get(key, 0) {
            Ok(s) if &s.trace_id == trace => self.flow_stats.remove(key).is_ok(),
            _ => false,
        }
    }

    /// Whether `key`'s connection already sent its FIN or RST (as far as the
    /// datapath followed it: a flow resolved to "no trace" keeps no flags).
    pub fn flow_finished(&self, key: &FlowKey) -> bool {
        const FIN_OR_RST: u8 = 0x01 | 0x04;
        self.flow_stats
            .get(key, 0)
            .is_ok_and(|s| s.tcp_flags & FIN_OR_RST != 0)
    }

    /// Stops copying request heads of `key` until `until_ns` (monotonic).
    pub fn skip_capture(&mut self, key: &FlowKey, until_ns: u64) -> Result<(), LoaderError> {
        self.capture_skip
            .insert(key, until_ns, 0)
            .map_err(|source| LoaderError::Map {
                name: "CAPTURE_SKIP",
                source,
            })
    }
}
