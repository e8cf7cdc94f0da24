//! The sampled flag of an incoming `traceparent`, honoured: a trace whose
//! caller chose not to sample it (`-00`) is not exported, as every OTel
//! SDK's default parent-based sampler would do in the app itself. The
//! decision is the trace's, learnt from its captured request heads (which
//! include a sidecar's loopback hop); its spans are counted, not sent.
use std::collections::{HashSet, VecDeque};

use crate::spans::SpanRecord;

pub struct Unsampled {
    traces: HashSet<[u8; 16]>,
    /// Oldest first: the set is bounded, the oldest decision goes first.
    order: VecDeque<[u8; 16]>,
    cap: usize,
    pub spans_skipped: u64,
}

impl Unsampled {
    pub fn new(cap: usize) -> Self {
        Self {
            traces: HashSet::new(),
            order: VecDeque::new(),
            cap,
            spans_skipped: 0,
        }
    }

    /// A head of `trace` said whether it is sampled.
    pub fn note(&mut self, trace: [u8; 16], sampled: bool) {
        if sampled || !self.traces.insert(trace) {
            return;
        }
        self.order.push_back(trace);
        if self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.traces.remove(&old);
            }
        }
    }

    /// Whether `span` goes to the exporter (counted when not).
    pub fn keep(&mut self, span: &SpanRecord) -> bool {
        let keep = !self.traces.contains(&span.trace_id);
        if !keep {
            self.spans_skipped += 1;
        }
        keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spans::{Resource, SpanKind};

    fn span(trace: u8) -> SpanRecord {
        SpanRecord {
            trace_id: [trace; 16],
            span_id: [1; 8],
            parent_span_id: None,
            parent_is_remote: false,
            name: "GET".into(),
            kind: SpanKind::Server,
            start_unix_ns: 0,
            end_unix_ns: 1,
            attributes: Default::default(),
            resource: std::sync::Arc::new(Resource::default()),
            error: false,
        }
    }

    #[test]
    fn an_unsampled_trace_is_not_exported_and_the_set_is_bounded() {
        let mut u = Unsampled::new(2);
        u.note([1; 16], false);
        u.note([2; 16], true);
        assert!(!u.keep(&span(1)) && u.keep(&span(2)));
        assert_eq!(u.spans_skipped, 1);
        u.note([3; 16], false);
        u.note([4; 16], false);
        assert!(u.keep(&span(1)), "the oldest decision went");
        assert!(!u.keep(&span(3)) && !u.keep(&span(4)));
    }
}
