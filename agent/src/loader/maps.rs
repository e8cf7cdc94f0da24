//! The datapath's maps as the agent reads and writes them (besides the
//! trace tables, which `tables.rs` owns): owners, interface namespaces,
//! counters, per-flow stats and their garbage collection, capture skips.
use agent_common::{Counter, FlowKey, FlowStats, PortKey};
use aya::maps::{HashMap as BpfHashMap, MapData};

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

    /// (map, entries, capacity) of the maps the datapath fills. Walks the
    /// maps: call it every few seconds, not per event.
    pub fn map_fill(&self) -> Vec<(String, u64, u64)> {
        let cap = |m: &aya::maps::MapData| m.info().map(|i| i.max_entries() as u64).unwrap_or(0);
        use aya::maps::IterableMap;
        vec![
            (
                "FLOW_STATS".into(),
                self.flow_stats.keys().count() as u64,
                cap(self.flow_stats.map()),
            ),
            (
                "SOCK_OWNER".into(),
                self.sock_owner.keys().count() as u64,
                cap(self.sock_owner.map()),
            ),
            (
                "SOCK_FLOW".into(),
                self.sock_flow.keys().count() as u64,
                cap(self.sock_flow.map()),
            ),
            (
                "THREAD_VIA".into(),
                self.thread_via.keys().count() as u64,
                cap(self.thread_via.map()),
            ),
            (
                "BOUND_PORTS".into(),
                self.bound_ports.keys().count() as u64,
                cap(self.bound_ports.map()),
            ),
            (
                "IFACE_NETNS".into(),
                self.iface_netns.keys().count() as u64,
                cap(self.iface_netns.map()),
            ),
            (
                "POD_ADDRS".into(),
                self.pod_addrs.keys().count() as u64,
                cap(self.pod_addrs.map()),
            ),
            (
                "CAPTURE_SKIP".into(),
                self.capture_skip.keys().count() as u64,
                cap(self.capture_skip.map()),
            ),
        ]
    }

    /// Deletes FLOW_STATS entries whose last packet is older than
    /// `traced_age_ns` ("no trace" entries: `negative_age_ns`, they are cheap
    /// to make again), and CAPTURE_SKIP entries past their time, so both maps
    /// hold live connections rather than filling to their LRU capacity with
    /// dead ones. A live flow that was idle that long simply resolves again
    /// on its next packet. Returns (flows, skips) removed.
    pub fn gc(&mut self, now_ns: u64, traced_age_ns: u64, negative_age_ns: u64) -> (u64, u64) {
        let flows = remove_where(&mut self.flow_stats, |s| {
            let age = if s.is_negative() {
                negative_age_ns
            } else {
                traced_age_ns
            };
            now_ns.saturating_sub(s.last_ns.max(s.first_ns)) > age
        });
        let skips = remove_where(&mut self.capture_skip, |until| *until < now_ns);
        (flows, skips)
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

/// Deletes the entries whose value matches; returns how many went. Keys
/// are collected first: deleting while walking a BPF hash restarts the walk.
fn remove_where<K: aya::Pod, V: aya::Pod>(
    map: &mut BpfHashMap<MapData, K, V>,
    stale: impl Fn(&V) -> bool,
) -> u64 {
    let keys: Vec<K> = map
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, v)| stale(v))
        .map(|(k, _)| k)
        .collect();
    keys.iter().filter(|k| map.remove(k).is_ok()).count() as u64
}
