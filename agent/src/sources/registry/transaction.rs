//! BEGIN and END as table transactions: a BEGIN writes one context for
//! every process and connection it names and remembers what it wrote; END
//! (or the connection closing) undoes exactly that, compare-and-delete, so a
//! late END for request 1 never removes request 2's context.
use agent_common::{
    FlowKey, NetnsSlot, TraceContext, TraceKey, TraceSource, TRACE_FLAG_HAS_PARENT,
    TRACE_FLAG_SAMPLED,
};

use super::Refusal;
use crate::{
    ids::TraceIdentity,
    tables::{SetOutcome, Store, TraceTables},
};

/// What a BEGIN wrote, so END (or the connection closing) can undo it.
#[derive(Default, Debug)]
pub struct Open {
    pub pids: Vec<TraceKey>,
    pub flows: Vec<FlowKey>,
    pub release_on_close: bool,
}

impl Open {
    /// A repeated BEGIN for the same trace adds to what END must undo.
    pub fn merge(&mut self, other: Open) {
        self.pids.extend(other.pids);
        self.flows.extend(other.flows);
        self.release_on_close |= other.release_on_close;
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
}
