//! The datapath's periodic map walks, the FLOW_STATS / CAPTURE_SKIP
//! garbage collection and the fill count of every map, on map handles of
//! their own. Aya walks a map with two syscalls an entry: at ~17 000 flows
//! the collection took 130–220 ms, longer than the event ring holds under
//! load (docs/BENCHMARKS.md, "Events lost under the soak"), so the daemon
//! runs these walks on a thread other than the one draining the ring.
use std::os::fd::AsFd;

use agent_common::{maps as m, FlowKey, FlowStats};
use aya::{
    maps::{HashMap as BpfHashMap, Map, MapData},
    Pod,
};

use super::{Datapath, LoaderError};

type Count = Box<dyn Fn() -> u64 + Send>;

/// The walks' own handles on the datapath's maps (duplicated descriptors:
/// the maps live as long as either side holds them).
pub struct Housekeeper {
    flow_stats: BpfHashMap<MapData, FlowKey, FlowStats>,
    capture_skip: BpfHashMap<MapData, FlowKey, u64>,
    /// (map, count of its entries, capacity).
    fill: Vec<(&'static str, Count, u64)>,
}

impl Datapath {
    /// Handles on the maps for the periodic walks, to move to another
    /// thread.
    pub fn housekeeper(&self) -> Result<Housekeeper, LoaderError> {
        Ok(Housekeeper {
            flow_stats: duplicate(&self.flow_stats, m::FLOW_STATS)?,
            capture_skip: duplicate(&self.capture_skip, m::CAPTURE_SKIP)?,
            fill: vec![
                counted(&self.flow_stats, m::FLOW_STATS)?,
                counted(&self.sock_owner, m::SOCK_OWNER)?,
                counted(&self.sock_flow, m::SOCK_FLOW)?,
                counted(&self.thread_via, m::THREAD_VIA)?,
                counted(&self.bound_ports, m::BOUND_PORTS)?,
                counted(&self.iface_netns, m::IFACE_NETNS)?,
                counted(&self.pod_addrs, m::POD_ADDRS)?,
                counted(&self.capture_skip, m::CAPTURE_SKIP)?,
            ],
        })
    }
}

impl Housekeeper {
    /// (map, entries, capacity) of the maps the datapath fills. Walks every
    /// map: every few seconds, not per event.
    pub fn map_fill(&self) -> Vec<(String, u64, u64)> {
        self.fill
            .iter()
            .map(|(name, count, cap)| (name.to_string(), count(), *cap))
            .collect()
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
}

/// A second handle on `map`, through a duplicate of its descriptor.
fn duplicate<K: Pod, V: Pod>(
    map: &BpfHashMap<MapData, K, V>,
    name: &'static str,
) -> Result<BpfHashMap<MapData, K, V>, LoaderError> {
    use aya::maps::IterableMap;
    let fd = map
        .map()
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| LoaderError::Duplicate { name, source })?;
    MapData::from_fd(fd)
        .and_then(Map::from_map_data)
        .and_then(BpfHashMap::try_from)
        .map_err(|source| LoaderError::Map { name, source })
}

/// A count of `map`'s entries on its own handle, and the map's capacity.
fn counted<K: Pod + Send, V: Pod + Send>(
    map: &BpfHashMap<MapData, K, V>,
    name: &'static str,
) -> Result<(&'static str, Count, u64), LoaderError> {
    use aya::maps::IterableMap;
    let own = duplicate(map, name)?;
    let info = own
        .map()
        .info()
        .map_err(|source| LoaderError::Map { name, source })?;
    let cap = info.max_entries() as u64;
    Ok((name, Box::new(move || own.keys().count() as u64), cap))
}

/// Deletes the entries whose value matches; returns how many went. Keys
/// are collected first: deleting while walking a BPF hash restarts the walk.
fn remove_where<K: Pod, V: Pod>(
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
