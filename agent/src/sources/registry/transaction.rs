//! BEGIN and END as table transactions: a BEGIN writes one context for
//! every process and connection it names and remembers what it wrote; END
//! (or the connection closing) undoes exactly that, compare-and-delete, so a
//! late END for request 1 never removes request 2's context.
use agent_common::{
    FlowKey, NetnsSlot, TraceContext, TraceKey, TraceSource, TRACE_FLAG_HAS_PARENT,
    TRACE_FLAG_SAMPLED,
};

use std::collections::HashMap;

use super::Refusal;
use crate::{
    ids::TraceIdentity,
    tables::{SetOutcome, Store, TraceTables},
};

/// What a BEGIN wrote, so END (or the connection closing) can undo it.
#[derive(Default, Debug, Clone, PartialEq, Eq)]
pub struct Open {
    pub pids: Vec<TraceKey>,
    pub flows: Vec<FlowKey>,
    pub release_on_close: bool,
}

impl Open {
    fn keys(&self) -> usize {
        self.pids.len() + self.flows.len()
    }
}

/// Why a connection may not hold another registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    Records(usize),
    Keys(usize),
}

/// A trace's open BEGINs on one connection: grouped by the connections
/// they name (END names the same), each with a repeat count; and how many
/// of them hold each key.
#[derive(Debug, Default)]
struct Trace {
    by_flows: HashMap<Vec<FlowKey>, Vec<(Open, u32)>>,
    pids: HashMap<TraceKey, u32>,
    flows: HashMap<FlowKey, u32>,
}

impl Trace {
    fn hold(&mut self, o: &Open, d: i32) -> Open {
        let mut freed = Open::default();
        for k in &o.pids {
            if bump(&mut self.pids, *k, d) {
                freed.pids.push(*k);
            }
        }
        for k in &o.flows {
            if bump(&mut self.flows, *k, d) {
                freed.flows.push(*k);
            }
        }
        freed
    }
}

/// Adds `d` to `key`'s count; true when it dropped to zero (and went).
fn bump<K: Copy + Eq + std::hash::Hash>(m: &mut HashMap<K, u32>, key: K, d: i32) -> bool {
    let n = m.entry(key).or_insert(0);
    *n = n.saturating_add_signed(d);
    if *n == 0 {
        m.remove(&key);
        return true;
    }
    false
}

/// A connection's open registrations. Each BEGIN is a record of its own,
/// so two requests sharing an id on one connection end separately (an END
/// undoes only the keys no other open BEGIN of that trace holds), and a
/// repeated identical BEGIN adds a count, not memory.
#[derive(Debug)]
pub struct Ledger {
    traces: HashMap<[u8; 16], Trace>,
    records: usize,
    keys: usize,
    max_records: usize,
    max_keys: usize,
}

impl Ledger {
    pub fn new(max_records: usize) -> Self {
        Self {
            traces: HashMap::new(),
            records: 0,
            keys: 0,
            max_records,
            // A record holds a few processes and at most 2 × MAX_FLOWS
            // connection keys; this bounds the pathological mixes.
            max_keys: max_records.saturating_mul(8),
        }
    }

    #[cfg(test)]
    fn records(&self) -> usize {
        self.records
    }

    fn is_repeat(&self, trace: &[u8; 16], o: &Open) -> bool {
        let same = |r: &(Open, u32)| r.0.pids == o.pids;
        self.traces
            .get(trace)
            .and_then(|t| t.by_flows.get(&o.flows))
            .is_some_and(|rs| rs.iter().any(same))
    }

    /// Whether a BEGIN of `trace` naming `o`'s keys fits: a repeat of an
    /// open BEGIN always does. Ask before writing the tables.
    pub fn fits(&self, trace: &[u8; 16], o: &Open) -> Result<(), Full> {
        if self.is_repeat(trace, o) {
            return Ok(());
        }
        if self.records >= self.max_records {
            return Err(Full::Records(self.records));
        }
        if self.keys + o.keys() > self.max_keys {
            return Err(Full::Keys(self.keys));
        }
        Ok(())
    }

    /// Records a BEGIN of `trace` that wrote `o`.
    pub fn add(&mut self, trace: [u8; 16], o: Open) -> Result<(), Full> {
        self.fits(&trace, &o)?;
        let t = self.traces.entry(trace).or_default();
        let group = t.by_flows.entry(o.flows.clone()).or_default();
        if let Some((r, n)) = group.iter_mut().find(|(r, _)| r.pids == o.pids) {
            *n = n.saturating_add(1);
            r.release_on_close |= o.release_on_close;
            return Ok(());
        }
        self.records += 1;
        self.keys += o.keys();
        group.push((o.clone(), 1));
        t.hold(&o, 1);
        Ok(())
    }

    /// Ends one BEGIN of `trace`: one naming exactly `flows` if there is
    /// one, else any. Returns the keys to undo (none while another open
    /// BEGIN still holds them); `None` when nothing of `trace` is open
    /// here.
    pub fn end(&mut self, trace: &[u8; 16], flows: &[FlowKey]) -> Option<Open> {
        let t = self.traces.get_mut(trace)?;
        let group = match t.by_flows.contains_key(flows) {
            true => flows.to_vec(),
            false => t.by_flows.keys().next()?.clone(),
        };
        let records = t.by_flows.get_mut(&group).expect("key found above");
        let last = records.len() - 1;
        records[last].1 -= 1;
        if records[last].1 > 0 {
            return Some(Open::default());
        }
        let (done, _) = records.pop().expect("not empty");
        if records.is_empty() {
            t.by_flows.remove(&group);
        }
        self.records -= 1;
        self.keys -= done.keys();
        let freed = t.hold(&done, -1);
        if t.by_flows.is_empty() {
            self.traces.remove(trace);
        }
        Some(freed)
    }

    /// What to undo when the connection closes: per trace, the keys of the
    /// BEGINs that asked for it (the others live on until their idle
    /// timeout), and how many BEGINs that drops.
    pub fn close(self) -> Vec<([u8; 16], Open, u64)> {
        self.traces
            .into_iter()
            .filter_map(|(trace, t)| {
                let mut pids = std::collections::HashSet::new();
                let mut flows = std::collections::HashSet::new();
                let mut n = 0u64;
                for (o, count) in t.by_flows.into_values().flatten() {
                    if o.release_on_close {
                        n += u64::from(count);
                        pids.extend(o.pids);
                        flows.extend(o.flows);
                    }
                }
                let keys = Open {
                    pids: pids.into_iter().collect(),
                    flows: flows.into_iter().collect(),
                    release_on_close: true,
                };
                (n > 0).then_some((trace, keys, n))
            })
            .collect()
    }
}

/// The datapath context of a registered request.
pub fn context(id: &TraceIdentity) -> TraceContext {
    let mut flags = TraceSource::Registration.to_flags();
    if id.parent_span_id.is_some() {
        flags |= TRACE_FLAG_HAS_PARENT;
    }
    if id.sampled {
        flags |= TRACE_FLAG_SAMPLED;
    }
    TraceContext {
        trace_id: id.trace_id,
        parent_span_id: id.parent_span_id.unwrap_or_default(),
        flags,
        ..Default::default()
    }
}

/// Writes `ctx` for every process and connection; returns what was written
/// and how many processes had another trace before (overlaps). Stops at the
/// first table error, leaving what it wrote to the idle timeout.
pub fn begin<P, F, G, A>(
    table: &mut TraceTables<P, F, G, A>,
    ctx: &TraceContext,
    pids: impl IntoIterator<Item = TraceKey>,
    flows: impl IntoIterator<Item = FlowKey>,
) -> Result<(Open, usize), Refusal>
where
    P: Store<TraceKey, TraceContext>,
    F: Store<FlowKey, TraceContext>,
    G: Store<u64, u64>,
    A: Store<u32, NetnsSlot>,
{
    let mut o = Open::default();
    let mut overlaps = 0;
    for k in pids {
        if let SetOutcome::Replaced { .. } = table.set_process(k, ctx)? {
            overlaps += 1;
        }
        o.pids.push(k);
    }
    for k in flows {
        table.set_flow(k, ctx)?;
        o.flows.push(k);
    }
    Ok((o, overlaps))
}

/// Compare-and-delete of everything a BEGIN wrote; returns the pids whose
/// entry still held this trace.
pub fn undo<P, F, G, A>(table: &mut TraceTables<P, F, G, A>, trace: &[u8; 16], o: &Open) -> Vec<u32>
where
    P: Store<TraceKey, TraceContext>,
    F: Store<FlowKey, TraceContext>,
    G: Store<u64, u64>,
    A: Store<u32, NetnsSlot>,
{
    let cleared = o
        .pids
        .iter()
        .filter(|k| table.clear_process(k, trace).unwrap_or(false))
        .map(|k| k.pid)
        .collect();
    for k in &o.flows {
        let _ = table.clear_flow(k, trace);
    }
    cleared
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ids, tables::MemoryTables};
    use std::time::Duration;

    fn ctx(rid: &str) -> TraceContext {
        context(&ids::identify(Some(rid), None).unwrap())
    }

    fn flow(port: u16) -> FlowKey {
        FlowKey {
            netns: 9,
            local_port: port,
            ..Default::default()
        }
    }

    #[test]
    fn end_undoes_only_its_own_begin() {
        let mut t = MemoryTables::in_memory(16, Duration::from_secs(30));
        let (one, two) = (ctx("req-1"), ctx("req-2"));
        let pid = TraceKey::new(42, 9);
        let (o1, overlaps) = begin(&mut t, &one, [pid], [flow(1)]).unwrap();
        assert_eq!(overlaps, 0);
        assert_eq!(t.gate().active_namespaces(), 1);
        // Request 2 takes the same process over before request 1 ends.
        let (o2, overlaps) = begin(&mut t, &two, [pid], [flow(2)]).unwrap();
        assert_eq!(overlaps, 1, "the process held another request's trace");
        // Request 1's late END leaves request 2's context in place.
        assert!(undo(&mut t, &one.trace_id, &o1).is_empty());
        assert_eq!(t.by_pid().get(&pid), Some(two.trace_id));
        assert_eq!(t.by_flow().get(&flow(1)), None, "its own connection went");
        assert_eq!(undo(&mut t, &two.trace_id, &o2), [42]);
        assert!(t.by_pid().is_empty() && t.by_flow().is_empty());
        assert_eq!(t.gate().active_namespaces(), 0, "the gate closes again");
    }

    #[test]
    fn a_full_table_refuses_and_the_context_carries_the_parent() {
        let mut t = MemoryTables::in_memory(1, Duration::from_secs(30));
        let c = ctx("req-1");
        begin(&mut t, &c, [TraceKey::new(1, 9)], []).unwrap();
        let e = begin(&mut t, &c, [TraceKey::new(2, 9)], []).unwrap_err();
        assert!(matches!(e, Refusal::Table(_)), "{e}");
        let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let with_parent = context(&ids::identify(None, Some(tp)).unwrap());
        assert_ne!(with_parent.flags & TRACE_FLAG_HAS_PARENT, 0);
        assert_ne!(with_parent.flags & TRACE_FLAG_SAMPLED, 0);
        assert_eq!(with_parent.parent_span_id[0], 0xb7);
    }

    fn open(pids: &[u32], ports: &[u16], release: bool) -> Open {
        Open {
            pids: pids.iter().map(|p| TraceKey::new(*p, 9)).collect(),
            flows: ports.iter().map(|p| flow(*p)).collect(),
            release_on_close: release,
        }
    }

    #[test]
    fn a_repeated_begin_counts_instead_of_growing() {
        let mut l = Ledger::new(4);
        let t = [1u8; 16];
        for _ in 0..100_000 {
            l.add(t, open(&[7], &[1, 2], true)).unwrap();
        }
        assert_eq!((l.records(), l.keys), (1, 3));
        // Each END takes one repeat; only the last frees the keys.
        for _ in 0..99_999 {
            assert_eq!(l.end(&t, &[flow(1), flow(2)]), Some(Open::default()));
        }
        let last = l.end(&t, &[flow(1), flow(2)]).unwrap();
        assert_eq!((last.pids.len(), last.flows.len()), (1, 2));
        assert_eq!(l.end(&t, &[]), None, "nothing open any more");
        assert_eq!((l.records(), l.keys), (0, 0));
    }

    #[test]
    fn two_requests_sharing_an_id_end_separately() {
        let mut l = Ledger::new(4);
        let t = [2u8; 16];
        // Same trace, same app process, each request its own connections.
        l.add(t, open(&[7], &[1], true)).unwrap();
        l.add(t, open(&[7], &[2], true)).unwrap();
        let first = l.end(&t, &[flow(1)]).unwrap();
        assert!(first.pids.is_empty(), "the other request still holds pid 7");
        assert_eq!(first.flows, [flow(1)], "its own connection goes");
        let second = l.end(&t, &[flow(2)]).unwrap();
        assert_eq!((second.pids.len(), second.flows), (1, vec![flow(2)]));
    }

    #[test]
    fn a_connection_holds_a_bounded_number_of_registrations() {
        let mut l = Ledger::new(2);
        l.add([1; 16], open(&[1], &[], false)).unwrap();
        l.add([2; 16], open(&[2], &[], false)).unwrap();
        assert_eq!(
            l.fits(&[3; 16], &open(&[3], &[], false)),
            Err(Full::Records(2))
        );
        assert_eq!(
            l.fits(&[1; 16], &open(&[1], &[], false)),
            Ok(()),
            "a repeat fits"
        );
        let l = Ledger::new(1);
        let many: Vec<u16> = (0..9).collect();
        assert_eq!(
            l.fits(&[1; 16], &open(&[], &many, false)),
            Err(Full::Keys(0))
        );
    }

    #[test]
    fn closing_undoes_only_what_asked_for_it() {
        let mut l = Ledger::new(8);
        l.add([1; 16], open(&[1], &[1], true)).unwrap();
        l.add([1; 16], open(&[1], &[2], true)).unwrap();
        l.add([1; 16], open(&[1], &[2], true)).unwrap();
        l.add([2; 16], open(&[2], &[3], false)).unwrap();
        let closed = l.close();
        assert_eq!(closed.len(), 1, "trace 2 lives on until its timeout");
        let (trace, keys, n) = &closed[0];
        assert_eq!((trace, n), (&[1u8; 16], &3));
        assert_eq!((keys.pids.len(), keys.flows.len()), (1, 2), "each key once");
    }
}
