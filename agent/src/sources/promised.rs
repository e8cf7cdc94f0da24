//! Spans that captured heads promise: a head sent from this node names a
//! connection whose span has not opened yet. Until it opens, or the first
//! look at it (300 ms) finds the connection alive, its trace is not
//! complete, and linking it early would leave the callee's span without
//! its caller (the whole exchange can fit in the head's round trip through
//! userspace: the span then comes from `Pipeline::recover`, at that look).
use std::collections::{HashMap, HashSet};

use agent_common::FlowKey;

use crate::trim::Trim;

/// (connection, trace) pairs awaited, counted per trace. Every pair is also
/// a kept head (`Capture::heads`), so this is bounded as they are.
#[derive(Default)]
pub(super) struct Promised {
    pairs: HashSet<(FlowKey, [u8; 16])>,
    traces: HashMap<[u8; 16], u32>,
}

impl Promised {
    pub fn add(&mut self, pair: (FlowKey, [u8; 16])) {
        if self.pairs.insert(pair) {
            *self.traces.entry(pair.1).or_default() += 1;
        }
    }

    /// The pair's span opened, or its head was given up.
    pub fn settle(&mut self, pair: &(FlowKey, [u8; 16])) {
        if !self.pairs.remove(pair) {
            return;
        }
        if let Some(n) = self.traces.get_mut(&pair.1) {
            *n -= 1;
            if *n == 0 {
                self.traces.remove(&pair.1);
            }
        }
    }

    pub fn trim(&mut self) {
        self.pairs.trim();
        self.traces.trim();
    }

    pub fn awaits(&self, trace: &[u8; 16]) -> bool {
        self.traces.contains_key(trace)
    }

    pub fn len(&self) -> usize {
        self.pairs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_is_awaited_until_each_of_its_pairs_settles_once() {
        let k = |p: u16| FlowKey::new(1, 6, ([10, 0, 0, 1], p).into(), ([10, 0, 0, 2], 80).into());
        let (t, u) = ([1; 16], [2; 16]);
        let mut p = Promised::default();
        p.add((k(1), t));
        p.add((k(1), t));
        p.add((k(2), t));
        p.add((k(1), u));
        p.settle(&(k(1), t));
        p.settle(&(k(1), t));
        assert!(p.awaits(&t), "k(2) still awaited");
        p.settle(&(k(2), t));
        assert!(!p.awaits(&t));
        assert!(p.awaits(&u));
        p.settle(&(k(3), u));
        assert!(p.awaits(&u), "an unknown pair settles nothing");
        p.settle(&(k(1), u));
        assert!(!p.awaits(&u));
        assert_eq!(p.len(), 0);
    }
}
