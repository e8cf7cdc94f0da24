//! `TraceTable`: the only writer of `TRACES` and `FLOW_TRACES`.
//!
//! Userspace keeps a shadow of every entry it wrote (trace id + last refresh)
//! so that clearing can be compare-and-delete (a late `end` for request 1
//! must not remove request 2's context) and idle entries can expire without
//! walking the kernel maps.
use std::{
    collections::HashMap,
    hash::Hash,
    time::{Duration, Instant},
};

use agent_common::{FlowKey, NetnsSlot, TraceContext, TraceKey, SLOT_SHARED};
use aya::maps::Array as BpfArray;

use crate::clock::monotonic_ns;
use aya::maps::{HashMap as BpfHashMap, MapData, MapError};

#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("map update failed")]
    Map(#[from] MapError),
    #[error("table full ({0} entries)")]
    Full(usize),
    #[error("namespace {netns} holds its quota of {quota} entries")]
    Quota { netns: u64, quota: usize },
}

/// Where entries really live: a BPF hash map, or memory in unit tests.
pub trait Store<K, V> {
    fn put(&mut self, key: &K, value: &V) -> Result<(), TableError>;
    fn delete(&mut self, key: &K) -> Result<(), TableError>;
}

impl<K: aya::Pod, V: aya::Pod> Store<K, V> for BpfHashMap<MapData, K, V> {
    fn put(&mut self, key: &K, value: &V) -> Result<(), TableError> {
        Ok(self.insert(key, value, 0)?)
    }
    fn delete(&mut self, key: &K) -> Result<(), TableError> {
        match self.remove(key) {
            Ok(()) => Ok(()),
            // Already gone is what we wanted.
            Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Stores whose entries can be listed (to adopt a previous agent's).
pub trait Scan<K, V> {
    fn entries(&self) -> Vec<(K, V)>;
}

impl<K: aya::Pod, V: aya::Pod> Scan<K, V> for BpfHashMap<MapData, K, V> {
    fn entries(&self) -> Vec<(K, V)> {
        self.iter().filter_map(Result::ok).collect()
    }
}

impl<K: Clone, V: Clone> Scan<K, V> for HashMap<K, V> {
    fn entries(&self) -> Vec<(K, V)> {
        self.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

impl<V: aya::Pod> Store<u32, V> for BpfArray<MapData, V> {
    fn put(&mut self, key: &u32, value: &V) -> Result<(), TableError> {
        Ok(self.set(*key, value, 0)?)
    }
    fn delete(&mut self, key: &u32) -> Result<(), TableError> {
        // Array slots cannot be deleted; zero means empty.
        Ok(self.set(*key, unsafe { std::mem::zeroed::<V>() }, 0)?)
    }
}

impl<K: Clone + Eq + Hash, V: Clone> Store<K, V> for HashMap<K, V> {
    fn put(&mut self, key: &K, value: &V) -> Result<(), TableError> {
        self.insert(key.clone(), value.clone());
        Ok(())
    }
    fn delete(&mut self, key: &K) -> Result<(), TableError> {
        self.remove(key);
        Ok(())
    }
}

struct Shadow {
    ctx: TraceContext,
    touched: Instant,
}

/// What `set` replaced.
#[derive(Debug, PartialEq, Eq)]
pub enum SetOutcome {
    New,
    /// Same trace again: the entry was refreshed.
    Refreshed,
    /// Another trace was active for the key; the new one wins.
    Replaced {
        previous: [u8; 16],
    },
}

/// One keyed table with idle expiry.
pub struct Table<K, S> {
    store: S,
    shadow: HashMap<K, Shadow>,
    capacity: usize,
    idle: Duration,
}

impl<K: Copy + Eq + Hash, S: Store<K, TraceContext>> Table<K, S> {
    pub fn new(store: S, capacity: usize, idle: Duration) -> Self {
        Self {
            store,
            shadow: HashMap::new(),
            capacity,
            idle,
        }
    }

    fn set(&mut self, key: K, ctx: &TraceContext, now: Instant) -> Result<SetOutcome, TableError> {
        let previous = self.shadow.get(&key).map(|s| s.ctx.trace_id);
        if previous.is_none() && self.shadow.len() >= self.capacity {
            return Err(TableError::Full(self.capacity));
        }
        let mut ctx = *ctx;
        ctx.updated_ns = monotonic_ns();
        self.store.put(&key, &ctx)?;
        self.shadow.insert(key, Shadow { ctx, touched: now });
        Ok(match previous {
            None => SetOutcome::New,
            Some(p) if p == ctx.trace_id => SetOutcome::Refreshed,
            Some(previous) => SetOutcome::Replaced { previous },
        })
    }

    /// Removes the entry only if it still holds `trace_id`. Returns whether
    /// something was removed.
    fn clear(&mut self, key: &K, trace_id: &[u8; 16]) -> Result<bool, TableError> {
        match self.shadow.get(key) {
            Some(s) if &s.ctx.trace_id == trace_id => {
                self.store.delete(key)?;
                self.shadow.remove(key);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Removes entries not set or refreshed within the idle timeout.
    /// Returns the removed keys.
    fn expire(&mut self, now: Instant) -> Result<Vec<K>, TableError> {
        let stale: Vec<K> = self
            .shadow
            .iter()
            .filter(|(_, s)| now.saturating_duration_since(s.touched) >= self.idle)
            .map(|(k, _)| *k)
            .collect();
        for k in &stale {
            self.store.delete(k)?;
            self.shadow.remove(k);
        }
        Ok(stale)
    }

    /// Takes over the entries already in the store (pinned by a previous
    /// agent): each keeps the idle time it had, measured from its
    /// `updated_ns` stamp; entries already idle, or beyond capacity, are
    /// deleted. Returns the adopted keys and how many were deleted.
    fn adopt(&mut self, now: Instant, now_ns: u64) -> Result<(Vec<K>, usize), TableError>
    where
        S: Scan<K, TraceContext>,
    {
        let mut adopted = Vec::new();
        let mut deleted = 0;
        for (key, ctx) in self.store.entries() {
            let age = Duration::from_nanos(now_ns.saturating_sub(ctx.updated_ns));
            let touched = now.checked_sub(age);
            match touched {
                Some(t) if age < self.idle && self.shadow.len() < self.capacity => {
                    self.shadow.insert(key, Shadow { ctx, touched: t });
                    adopted.push(key);
                }
                _ => {
                    self.store.delete(&key)?;
                    deleted += 1;
                }
            }
        }
        Ok((adopted, deleted))
    }

    pub fn get(&self, key: &K) -> Option<[u8; 16]> {
        self.shadow.get(key).map(|s| s.ctx.trace_id)
    }

    /// The whole context of `key`'s entry.
    pub fn context(&self, key: &K) -> Option<TraceContext> {
        self.shadow.get(key).map(|s| s.ctx)
    }

    pub fn len(&self) -> usize {
        self.shadow.len()
    }

    pub fn is_empty(&self) -> bool {
        self.shadow.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// The backing store (the BPF map, for its id or a direct read).
    pub fn store(&self) -> &S {
        &self.store
    }
}

pub type BpfTable<K> = Table<K, BpfHashMap<MapData, K, TraceContext>>;

/// Keys that belong to a network namespace.
pub trait InNetns {
    fn netns(&self) -> u64;
}
impl InNetns for TraceKey {
    fn netns(&self) -> u64 {
        self.netns
    }
}
impl InNetns for FlowKey {
    fn netns(&self) -> u64 {
        self.netns
    }
}

/// Maintains `NETNS_SLOTS` and, behind its shared slots, `NETNS_GEN`:
/// which namespaces have trace entries, and a generation that changes
/// whenever one of their entries is added, replaced or removed (the
/// datapath's per-flow cache is valid for one generation). The generation is global and only
/// grows, so a namespace that empties and fills again can never match a
/// cache entry from its earlier life.
pub struct Gate<G, A> {
    gens: G,
    slots: A,
    entries: HashMap<u64, (usize, u64)>,
    /// Active namespaces per slot index.
    occupants: HashMap<u32, Vec<u64>>,
    /// What the hash holds: the generations written for namespaces that
    /// shared a slot (kept after the slot is theirs alone again).
    hashed: HashMap<u64, u64>,
    gen: u64,
}

impl<G: Store<u64, u64>, A: Store<u32, NetnsSlot>> Gate<G, A> {
    pub fn new(gens: G, slots: A) -> Self {
        Self {
            gens,
            slots,
            entries: HashMap::new(),
            occupants: HashMap::new(),
            hashed: HashMap::new(),
            gen: 0,
        }
    }

    /// Records that `netns`'s entries changed (`delta` entries added or
    /// removed). Call after the table itself was written.
    fn changed(&mut self, netns: u64, delta: isize) -> Result<(), TableError> {
        self.gen += 1;
        let idx = NetnsSlot::index(netns);
        let (n, g) = self.entries.entry(netns).or_insert((0, 0));
        *n = n.saturating_add_signed(delta);
        *g = self.gen;
        let live = *n > 0;
        let occ = self.occupants.entry(idx).or_default();
        match (live, occ.contains(&netns)) {
            (true, false) => occ.push(netns),
            (false, true) => occ.retain(|c| *c != netns),
            _ => {}
        }
        let slot = match occ.as_slice() {
            [] => NetnsSlot::default(),
            [only] => NetnsSlot {
                cookie: *only,
                gen: self.entries[only].1,
            },
            _ => NetnsSlot {
                cookie: SLOT_SHARED,
                gen: 0,
            },
        };
        let sharers = match slot.cookie == SLOT_SHARED {
            true => occ.clone(),
            false => Vec::new(),
        };
        if occ.is_empty() {
            self.occupants.remove(&idx);
        }
        // Opening: hash first, then the slot that points readers at it.
        // Closing: the slot first, then the hash.
        if live {
            // The datapath reads the hash only behind a shared slot; a
            // namespace alone in its slot has its generation there, so a
            // change costs one map write instead of two. When the slot is
            // shared, each sharer's current generation goes to the hash
            // first (the one that just changed, or all of them when the
            // slot has just become shared).
            for ns in sharers {
                let gen = self.entries[&ns].1;
                if self.hashed.get(&ns) != Some(&gen) {
                    self.gens.put(&ns, &gen)?;
                    self.hashed.insert(ns, gen);
                }
            }
            self.slots.put(&idx, &slot)
        } else {
            self.entries.remove(&netns);
            self.slots.put(&idx, &slot)?;
            match self.hashed.remove(&netns) {
                Some(_) => self.gens.delete(&netns),
                None => Ok(()),
            }
        }
    }

    pub fn active_namespaces(&self) -> usize {
        self.entries.len()
    }

    /// Entries `netns` holds in both tables.
    pub fn entries_of(&self, netns: u64) -> usize {
        self.entries.get(&netns).map_or(0, |e| e.0)
    }
}

/// The per-process and per-connection trace tables, as used by the sources,
/// with their namespace gate. The only way to write either table: every
/// change goes through here, so the gate and the namespace generation the
/// datapath caches by always follow (a write that skipped them would never
/// be seen by flows already cached).
pub struct TraceTables<P, F, G, A> {
    by_pid: Table<TraceKey, P>,
    by_flow: Table<FlowKey, F>,
    gate: Gate<G, A>,
    /// Entries one namespace may hold in both tables together once a table
    /// is three quarters full: below that a busy pod may use the room
    /// nobody needs, above it no pod can take the last quarter from the
    /// rest.
    quota: usize,
    /// Refusals by quota, per namespace (bounded: see `refuse`).
    refused: HashMap<u64, u64>,
}

/// Namespaces whose quota refusals are kept apart; the rest add up under 0.
const REFUSED_NAMESPACES: usize = 256;

pub type TraceTable = TraceTables<
    BpfHashMap<MapData, TraceKey, TraceContext>,
    BpfHashMap<MapData, FlowKey, TraceContext>,
    BpfHashMap<MapData, u64, u64>,
    BpfArray<MapData, NetnsSlot>,
>;

/// Tables held in memory: unit tests of the sources and the pipeline.
pub type MemoryTables = TraceTables<
    HashMap<TraceKey, TraceContext>,
    HashMap<FlowKey, TraceContext>,
    HashMap<u64, u64>,
    HashMap<u32, NetnsSlot>,
>;

impl MemoryTables {
    pub fn in_memory(capacity: usize, idle: Duration) -> Self {
        Self::new(
            Table::new(HashMap::new(), capacity, idle),
            Table::new(HashMap::new(), capacity, idle),
            Gate::new(HashMap::new(), HashMap::new()),
        )
    }
}

fn delta(o: &SetOutcome) -> Option<isize> {
    match o {
        SetOutcome::New => Some(1),
        SetOutcome::Replaced { .. } => Some(0),
        // Same trace: cached flow results stay valid.
        SetOutcome::Refreshed => None,
    }
}

impl<P, F, G, A> TraceTables<P, F, G, A>
where
    P: Store<TraceKey, TraceContext>,
    F: Store<FlowKey, TraceContext>,
    G: Store<u64, u64>,
    A: Store<u32, NetnsSlot>,
{
    pub fn new(by_pid: Table<TraceKey, P>, by_flow: Table<FlowKey, F>, gate: Gate<G, A>) -> Self {
        Self {
            by_pid,
            by_flow,
            gate,
            quota: usize::MAX,
            refused: HashMap::new(),
        }
    }

    /// Sets the per-namespace quota (entries in both tables together).
    pub fn with_quota(mut self, quota: usize) -> Self {
        self.quota = quota;
        self
    }

    /// Quota refusals per namespace cookie (0: namespaces beyond the
    /// first `REFUSED_NAMESPACES`).
    pub fn quota_refusals(&self) -> &HashMap<u64, u64> {
        &self.refused
    }

    /// Refuses a new entry for `netns` when it holds its quota and the
    /// table it goes into (`len` of `capacity`) is at least 3/4 full.
    fn admit(
        &mut self,
        netns: u64,
        exists: bool,
        len: usize,
        capacity: usize,
    ) -> Result<(), TableError> {
        if exists || self.gate.entries_of(netns) < self.quota || len < capacity / 4 * 3 {
            return Ok(());
        }
        let slot = match self.refused.len() < REFUSED_NAMESPACES {
            true => netns,
            false if self.refused.contains_key(&netns) => netns,
            false => 0,
        };
        *self.refused.entry(slot).or_default() += 1;
        Err(TableError::Quota {
            netns,
            quota: self.quota,
        })
    }

    /// The per-process table (read only).
    pub fn by_pid(&self) -> &Table<TraceKey, P> {
        &self.by_pid
    }

    /// The per-connection table (read only).
    pub fn by_flow(&self) -> &Table<FlowKey, F> {
        &self.by_flow
    }

    /// The namespace gate (read only).
    pub fn gate(&self) -> &Gate<G, A> {
        &self.gate
    }

    pub fn set_process(
        &mut self,
        key: TraceKey,
        ctx: &TraceContext,
    ) -> Result<SetOutcome, TableError> {
        let (len, cap) = (self.by_pid.len(), self.by_pid.capacity());
        self.admit(key.netns, self.by_pid.get(&key).is_some(), len, cap)?;
        let o = self.by_pid.set(key, ctx, Instant::now())?;
        if let Some(d) = delta(&o) {
            self.gate.changed(key.netns, d)?;
        }
        Ok(o)
    }
    pub fn clear_process(
        &mut self,
        key: &TraceKey,
        trace_id: &[u8; 16],
    ) -> Result<bool, TableError> {
        let removed = self.by_pid.clear(key, trace_id)?;
        if removed {
            self.gate.changed(key.netns, -1)?;
        }
        Ok(removed)
    }
    pub fn set_flow(&mut self, key: FlowKey, ctx: &TraceContext) -> Result<SetOutcome, TableError> {
        let (len, cap) = (self.by_flow.len(), self.by_flow.capacity());
        self.admit(key.netns, self.by_flow.get(&key).is_some(), len, cap)?;
        let o = self.by_flow.set(key, ctx, Instant::now())?;
        if let Some(d) = delta(&o) {
            self.gate.changed(key.netns, d)?;
        }
        Ok(o)
    }
    pub fn clear_flow(&mut self, key: &FlowKey, trace_id: &[u8; 16]) -> Result<bool, TableError> {
        let removed = self.by_flow.clear(key, trace_id)?;
        if removed {
            self.gate.changed(key.netns, -1)?;
        }
        Ok(removed)
    }
    /// Adopts what a previous agent left in the (pinned) tables and opens
    /// the gate for their namespaces. Returns (adopted, deleted as idle).
    pub fn adopt(&mut self) -> Result<(usize, usize), TableError>
    where
        P: Scan<TraceKey, TraceContext>,
        F: Scan<FlowKey, TraceContext>,
    {
        let (now, now_ns) = (Instant::now(), monotonic_ns());
        let (pids, dp) = self.by_pid.adopt(now, now_ns)?;
        let (flows, df) = self.by_flow.adopt(now, now_ns)?;
        for ns in pids
            .iter()
            .map(InNetns::netns)
            .chain(flows.iter().map(InNetns::netns))
        {
            self.gate.changed(ns, 1)?;
        }
        Ok((pids.len() + flows.len(), dp + df))
    }

    /// Expires idle entries in both tables; returns how many were removed.
    pub fn expire(&mut self) -> Result<usize, TableError> {
        self.expire_at(Instant::now())
    }
    pub fn expire_at(&mut self, now: Instant) -> Result<usize, TableError> {
        let pids = self.by_pid.expire(now)?;
        let flows = self.by_flow.expire(now)?;
        for ns in pids
            .iter()
            .map(InNetns::netns)
            .chain(flows.iter().map(InNetns::netns))
        {
            self.gate.changed(ns, -1)?;
        }
        Ok(pids.len() + flows.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(b: u8) -> TraceContext {
        TraceContext {
            trace_id: [b; 16],
            ..Default::default()
        }
    }

    fn table() -> Table<TraceKey, HashMap<TraceKey, TraceContext>> {
        Table::new(HashMap::new(), 3, Duration::from_secs(30))
    }

    #[test]
    fn set_reports_new_refresh_and_replace() {
        let mut t = table();
        let k = TraceKey::new(10, 1);
        let now = Instant::now();
        assert_eq!(t.set(k, &ctx(1), now).unwrap(), SetOutcome::New);
        assert_eq!(t.set(k, &ctx(1), now).unwrap(), SetOutcome::Refreshed);
        assert_eq!(
            t.set(k, &ctx(2), now).unwrap(),
            SetOutcome::Replaced { previous: [1; 16] }
        );
        assert_eq!(t.store[&k].trace_id, [2; 16]);
        assert!(t.store[&k].updated_ns > 0);
    }

    #[test]
    fn clear_is_compare_and_delete() {
        let mut t = table();
        let k = TraceKey::new(10, 1);
        t.set(k, &ctx(1), Instant::now()).unwrap();
        t.set(k, &ctx(2), Instant::now()).unwrap();
        // A late clear for trace 1 must not remove trace 2.
        assert!(!t.clear(&k, &[1; 16]).unwrap());
        assert_eq!(t.store[&k].trace_id, [2; 16]);
        assert!(t.clear(&k, &[2; 16]).unwrap());
        assert!(t.store.is_empty() && t.is_empty());
        assert!(!t.clear(&k, &[2; 16]).unwrap());
    }

    #[test]
    fn idle_entries_expire_and_refresh_keeps_them() {
        let mut t = table();
        let t0 = Instant::now();
        let (a, b) = (TraceKey::new(1, 1), TraceKey::new(2, 1));
        t.set(a, &ctx(1), t0).unwrap();
        t.set(b, &ctx(2), t0).unwrap();
        assert!(t.expire(t0 + Duration::from_secs(29)).unwrap().is_empty());
        // b is refreshed at 20 s, a is not.
        t.set(b, &ctx(2), t0 + Duration::from_secs(20)).unwrap();
        assert_eq!(t.expire(t0 + Duration::from_secs(31)).unwrap(), vec![a]);
        assert!(t.get(&a).is_none() && t.get(&b).is_some());
        assert!(!t.store.contains_key(&a));
        assert_eq!(t.expire(t0 + Duration::from_secs(51)).unwrap(), vec![b]);
        assert!(t.store.is_empty());
    }

    fn tables() -> MemoryTables {
        MemoryTables::in_memory(100, Duration::from_secs(30))
    }

    /// The generation the datapath reads for `ns` (`maps::netns_gen`).
    fn seen(t: &MemoryTables, ns: u64) -> Option<u64> {
        let slot = t.gate.slots.get(&NetnsSlot::index(ns)).copied()?;
        match slot.cookie {
            c if c == ns => Some(slot.gen),
            SLOT_SHARED => t.gate.gens.get(&ns).copied(),
            _ => None,
        }
    }

    #[test]
    fn gate_opens_with_the_first_entry_and_closes_with_the_last() {
        let mut t = tables();
        let (ns1, ns2) = (11, 22);
        t.set_process(TraceKey::new(1, ns1), &ctx(1)).unwrap();
        let g1 = seen(&t, ns1).unwrap();
        let flow = FlowKey {
            netns: ns1,
            local_port: 5,
            ..Default::default()
        };
        t.set_flow(flow, &ctx(2)).unwrap();
        let g2 = seen(&t, ns1).unwrap();
        assert!(g2 > g1, "a new entry invalidates cached flow results");
        // A refresh of the same trace keeps the generation.
        t.set_process(TraceKey::new(1, ns1), &ctx(1)).unwrap();
        assert_eq!(seen(&t, ns1), Some(g2));
        // A replaced trace bumps it.
        t.set_process(TraceKey::new(1, ns1), &ctx(3)).unwrap();
        assert!(seen(&t, ns1).unwrap() > g2);
        assert_eq!(seen(&t, ns2), None);
        // A compare-and-delete that does not match changes nothing.
        let g3 = seen(&t, ns1).unwrap();
        assert!(!t.clear_process(&TraceKey::new(1, ns1), &[1; 16]).unwrap());
        assert_eq!(seen(&t, ns1), Some(g3));
        assert!(t.clear_process(&TraceKey::new(1, ns1), &[3; 16]).unwrap());
        assert!(seen(&t, ns1).unwrap() > g3, "the flow entry remains");
        assert!(t.clear_flow(&flow, &[2; 16]).unwrap());
        assert_eq!(seen(&t, ns1), None, "gate closed with the last entry");
        assert_eq!(t.gate.active_namespaces(), 0);
        assert!(t.gate.gens.is_empty(), "alone in its slot: never hashed");
    }

    #[test]
    fn slots_point_at_the_one_namespace_or_say_shared() {
        let mut t = tables();
        let n = agent_common::NETNS_SLOTS as u64;
        let (a, b) = (5, 5 + n); // same slot
        let slot = |t: &MemoryTables| {
            t.gate
                .slots
                .get(&NetnsSlot::index(a))
                .copied()
                .unwrap_or_default()
        };
        t.set_process(TraceKey::new(1, a), &ctx(1)).unwrap();
        t.set_process(TraceKey::new(2, a), &ctx(2)).unwrap();
        let ga = seen(&t, a).unwrap();
        assert_eq!(slot(&t), NetnsSlot { cookie: a, gen: ga });
        assert!(t.gate.gens.is_empty(), "one namespace: the slot suffices");
        t.set_process(TraceKey::new(1, b), &ctx(1)).unwrap();
        assert_eq!(
            slot(&t).cookie,
            SLOT_SHARED,
            "two live namespaces share the slot"
        );
        // The first one's generation, never hashed while it was alone,
        // is there now that readers look it up.
        assert_eq!(seen(&t, a), Some(ga));
        assert!(seen(&t, b).unwrap() > ga);
        // While shared, every change reaches the hash.
        t.set_process(TraceKey::new(2, a), &ctx(3)).unwrap();
        assert!(seen(&t, a).unwrap() > seen(&t, b).unwrap());
        t.clear_process(&TraceKey::new(1, a), &[1; 16]).unwrap();
        t.clear_process(&TraceKey::new(2, a), &[3; 16]).unwrap();
        let gb = seen(&t, b).unwrap();
        assert_eq!(slot(&t), NetnsSlot { cookie: b, gen: gb });
        assert_eq!(seen(&t, a), None);
        // Alone again, b changes in its slot only; a later sharer brings
        // b's current generation back to the hash.
        t.set_process(TraceKey::new(2, b), &ctx(4)).unwrap();
        let gb2 = seen(&t, b).unwrap();
        assert!(gb2 > gb);
        t.set_process(TraceKey::new(3, a), &ctx(5)).unwrap();
        assert_eq!(slot(&t).cookie, SLOT_SHARED);
        assert_eq!(seen(&t, b), Some(gb2), "not the stale hash entry");
        t.clear_process(&TraceKey::new(3, a), &[5; 16]).unwrap();
        t.clear_process(&TraceKey::new(1, b), &[1; 16]).unwrap();
        t.clear_process(&TraceKey::new(2, b), &[4; 16]).unwrap();
        assert_eq!(slot(&t), NetnsSlot::default());
        assert!(t.gate.gens.is_empty());
    }

    #[test]
    fn expiry_closes_the_gate() {
        let mut t = tables();
        t.set_process(TraceKey::new(1, 7), &ctx(1)).unwrap();
        t.set_process(TraceKey::new(2, 8), &ctx(1)).unwrap();
        assert_eq!(
            t.expire_at(Instant::now() + Duration::from_secs(31))
                .unwrap(),
            2
        );
        assert!(t.gate.gens.is_empty());
        // Generations only grow: a namespace that fills again gets a new one.
        let before = t.gate.gen;
        t.set_process(TraceKey::new(1, 7), &ctx(1)).unwrap();
        assert!(seen(&t, 7).unwrap() > before);
    }

    #[test]
    fn adoption_keeps_fresh_entries_with_their_age_and_drops_idle_ones() {
        let mut t = tables();
        let now_ns = monotonic_ns();
        let at = |secs_ago: u64, b: u8| TraceContext {
            trace_id: [b; 16],
            updated_ns: now_ns - secs_ago * 1_000_000_000,
            ..Default::default()
        };
        let flow = FlowKey {
            netns: 8,
            local_port: 9,
            ..Default::default()
        };
        // What a killed agent left behind.
        t.by_pid.store.insert(TraceKey::new(1, 7), at(1, 1));
        t.by_pid.store.insert(TraceKey::new(2, 7), at(40, 2));
        t.by_flow.store.insert(flow, at(20, 3));
        assert_eq!(t.adopt().unwrap(), (2, 1));
        assert!(!t.by_pid.store.contains_key(&TraceKey::new(2, 7)));
        assert_eq!(t.by_pid.get(&TraceKey::new(1, 7)), Some([1; 16]));
        assert_eq!(t.by_flow.get(&flow), Some([3; 16]));
        // The gate is open for both namespaces.
        assert!(seen(&t, 7).is_some() && seen(&t, 8).is_some());
        // The flow entry was 20 s idle: it expires 10 s from now, the other
        // one later; then the gate closes.
        let now = Instant::now();
        assert_eq!(t.expire_at(now + Duration::from_secs(11)).unwrap(), 1);
        assert_eq!(t.by_pid.len(), 1);
        assert_eq!(t.expire_at(now + Duration::from_secs(30)).unwrap(), 1);
        assert!(t.gate.gens.is_empty());
    }

    #[test]
    fn capacity_is_enforced_for_new_keys_only() {
        let mut t = table();
        let now = Instant::now();
        for pid in 0..3 {
            t.set(TraceKey::new(pid, 1), &ctx(1), now).unwrap();
        }
        assert!(matches!(
            t.set(TraceKey::new(9, 1), &ctx(1), now),
            Err(TableError::Full(3))
        ));
        // Replacing an existing key still works at capacity.
        t.set(TraceKey::new(0, 1), &ctx(5), now).unwrap();
    }

    #[test]
    fn one_namespace_cannot_fill_the_tables_for_the_others() {
        // 8 slots per table, a quota of 2 once a table is 3/4 full.
        let mut t = MemoryTables::in_memory(8, Duration::from_secs(30)).with_quota(2);
        let (hostile, neighbour) = (7, 8);
        let flow = |netns, port| FlowKey {
            netns,
            local_port: port,
            ..Default::default()
        };
        // While the table has room a busy namespace may use it...
        for port in 0..6 {
            t.set_flow(flow(hostile, port), &ctx(1)).unwrap();
        }
        // ...not beyond 3/4 of it.
        let e = t.set_flow(flow(hostile, 6), &ctx(1)).unwrap_err();
        assert!(matches!(e, TableError::Quota { netns: 7, quota: 2 }), "{e}");
        assert_eq!(t.quota_refusals().get(&hostile), Some(&1));
        // Its own entries can still be refreshed or taken over; the other
        // namespaces get the last quarter.
        t.set_flow(flow(hostile, 0), &ctx(2)).unwrap();
        t.set_flow(flow(neighbour, 0), &ctx(3)).unwrap();
        t.set_flow(flow(neighbour, 1), &ctx(3)).unwrap();
        // The other table has its own room.
        t.set_process(TraceKey::new(1, hostile), &ctx(1)).unwrap();
        // Once the table is below 3/4 full again, it may grow again.
        assert!(t.clear_flow(&flow(hostile, 0), &[2; 16]).unwrap());
        assert!(
            t.set_flow(flow(hostile, 6), &ctx(1)).is_err(),
            "still 3/4 full"
        );
        assert!(t.clear_flow(&flow(neighbour, 0), &[3; 16]).unwrap());
        assert!(t.clear_flow(&flow(neighbour, 1), &[3; 16]).unwrap());
        assert!(t.set_flow(flow(hostile, 6), &ctx(1)).is_ok());
    }
}
