//! Datapath events → trace tables (captured heads) and spans → exporter,
//! with the agent-side counters that say what happened to each.
use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::Duration,
};

use agent_common::{FlowKey, NetnsSlot, TraceContext, TraceKey};
use tracing::warn;

use crate::{
    clock::{monotonic_ns, WallClock},
    config::AgentConfig,
    events::Event,
    export::Exporter,
    loader::Datapath,
    sources::capture::{Capture, HeadOutcome},
    spans::{
        assemble::{Assembler, AssemblerConfig},
        resource::Resources,
        SpanRecord,
    },
    tables::{Store, TraceTable, TraceTables},
};

/// Agent-side counters (exported as metrics).
#[derive(Default, Debug, Clone)]
pub struct AgentStats {
    pub capture_skips: u64,
    pub flow_new: u64,
    pub flow_end: u64,
    pub heads: u64,
    pub events_unknown: u64,
    pub events_truncated: u64,
    pub attach_failures: u64,
    /// Full link re-dumps after lost notifications (ENOBUFS).
    pub link_resyncs: u64,
    pub expired: u64,
    /// Trace entries taken over from a previous agent's pinned maps.
    pub adopted: u64,
    /// ... and those already idle, deleted instead.
    pub adopted_idle: u64,
    /// FLOW_TRACES entries removed because their connection closed.
    pub flows_closed: u64,
    /// FLOW_STATS entries of dead flows deleted (see `Datapath::gc`).
    pub flows_collected: u64,
    /// Expired CAPTURE_SKIP entries deleted.
    pub skips_collected: u64,
}

/// Datapath events → spans → exporter.
pub struct Pipeline {
    pub capture: Capture,
    pub assembler: Assembler,
    pub clock: WallClock,
    pub stats: AgentStats,
    /// Connections that ended (FIN/RST) and when their per-connection trace
    /// entry goes: a short grace lets the last ACKs through under the same
    /// trace instead of re-resolving them.
    closing: VecDeque<(u64, FlowKey, [u8; 16])>,
    closing_cap: usize,
    /// Finished spans waiting for room in the export queue: a big trace
    /// released at once waits here instead of overflowing the queue.
    /// At most one export queue's worth; beyond it the oldest are dropped
    /// (counted with the exporter's drops).
    pending: VecDeque<SpanRecord>,
    pending_cap: usize,
}

/// How long a closed connection keeps its FLOW_TRACES entry.
const CLOSED_FLOW_GRACE_NS: u64 = 2_000_000_000;

impl Pipeline {
    pub fn new(cfg: &AgentConfig) -> Self {
        Self::with_pods(cfg, None)
    }

    /// With pod metadata for span resources (in a cluster).
    pub fn with_pods(cfg: &AgentConfig, pods: Option<Arc<crate::k8s::pods::PodCache>>) -> Self {
        Self {
            capture: Capture::new(cfg.capture_headers.clone(), 16384),
            assembler: Assembler::new(
                AssemblerConfig {
                    idle_ns: cfg.span_idle_ms * 1_000_000,
                    max_open: cfg.max_open_spans,
                    max_held: cfg.max_held_spans,
                    ..AssemblerConfig::default()
                },
                Resources::new(std::env::var("OTEL_SERVICE_NAME").ok())
                    .with_pods(pods, std::env::var("NODE_NAME").ok()),
            ),
            clock: WallClock::measure(),
            stats: AgentStats::default(),
            closing: Default::default(),
            closing_cap: cfg.maps.flow_traces as usize,
            pending: Default::default(),
            pending_cap: cfg.export.queue,
        }
    }

    /// Handles one ring-buffer record. Returns a connection whose request
    /// heads the datapath should stop copying for a while (its head had no
    /// id header).
    pub fn event<P, F, G, A>(
        &mut self,
        ev: Event,
        table: &Mutex<TraceTables<P, F, G, A>>,
    ) -> Option<FlowKey>
    where
        P: Store<TraceKey, TraceContext>,
        F: Store<FlowKey, TraceContext>,
        G: Store<u64, u64>,
        A: Store<u32, NetnsSlot>,
    {
        let now = monotonic_ns();
        match ev {
            Event::FlowNew(f) => {
                self.stats.flow_new += 1;
                let head = self.capture.take_head(&f.key, &f.stats.trace_id);
                self.assembler.flow_new(&f, head, now);
            }
            Event::FlowEnd(f) => {
                self.stats.flow_end += 1;
                self.assembler.flow_end(&f, now);
            }
            Event::HttpHead(h) => {
                self.stats.heads += 1;
                let out = self
                    .capture
                    .handle(&h, &mut table.lock().expect("table lock"));
                match out {
                    HeadOutcome::Applied(info) => self.assembler.head(&h.key, *info),
                    HeadOutcome::NoId { truncated: false } => return Some(h.key),
                    _ => {}
                }
            }
            Event::Unknown(_) => self.stats.events_unknown += 1,
            Event::Truncated => self.stats.events_truncated += 1,
        }
        None
    }

    /// Refreshes open spans from FLOW_STATS, closes finished ones and hands
    /// complete traces to the exporter.
    /// Per-connection trace entries of connections that closed are removed
    /// (after a grace), not left to the idle timeout: under connection churn
    /// FLOW_TRACES then holds live connections only.
    pub fn sweep(&mut self, dp: &mut Datapath, exporter: &Exporter, table: &Mutex<TraceTable>) {
        let now = monotonic_ns();
        self.clock.refresh(Duration::from_secs(10));
        let keys = self.assembler.open_keys();
        let snapshot = dp.flow_stats_for(keys.iter());
        for (key, trace) in self.assembler.sweep(&snapshot, now) {
            self.closing
                .push_back((now + CLOSED_FLOW_GRACE_NS, key, trace));
        }
        let mut t = table.lock().expect("table lock");
        while let Some((due, key, trace)) = self.closing.front().copied() {
            if due > now && self.closing.len() <= self.closing_cap {
                break;
            }
            self.closing.pop_front();
            if dp.forget_flow(&key, &trace) {
                self.stats.flows_collected += 1;
            }
            match t.clear_flow(&key, &trace) {
                Ok(true) => self.stats.flows_closed += 1,
                Ok(false) => {}
                Err(e) => warn!(
                    "clearing a closed connection's trace: {}",
                    crate::report(&e)
                ),
            }
        }
        drop(t);
        self.pending.extend(self.assembler.ready(&self.clock, now));
        while let Some(s) = self.pending.pop_front() {
            if let Err(s) = exporter.offer(s) {
                self.pending.push_front(s);
                break;
            }
        }
        let over = self.pending.len().saturating_sub(self.pending_cap);
        if over > 0 {
            self.pending.drain(..over);
            exporter.count_dropped(over as u64);
        }
    }

    /// Finished spans not yet queued for export: held for linking or
    /// waiting for room.
    pub fn held(&self) -> usize {
        self.assembler.held_spans() + self.pending.len()
    }

    /// Everything still in the pipeline, for the exporter at shutdown.
    pub fn drain_all(&mut self) -> Vec<SpanRecord> {
        let mut out: Vec<_> = self.pending.drain(..).collect();
        out.extend(self.assembler.flush_all(&self.clock, monotonic_ns()));
        out
    }

    pub fn counters(&self) -> Vec<(String, String, u64)> {
        let c = &self.capture;
        let a = &self.assembler.stats;
        let s = &self.stats;
        [
            ("events_flow_new_total", "FLOW_NEW events read.", s.flow_new),
            ("events_flow_end_total", "FLOW_END events read.", s.flow_end),
            (
                "events_http_heads_total",
                "Captured request heads read.",
                s.heads,
            ),
            (
                "events_unknown_total",
                "Ring-buffer records of an unknown kind (skipped).",
                s.events_unknown,
            ),
            (
                "events_truncated_total",
                "Ring-buffer records shorter than their kind (dropped).",
                s.events_truncated,
            ),
            (
                "link_resyncs_total",
                "Link notifications lost (ENOBUFS) and re-read with a full dump.",
                s.link_resyncs,
            ),
            (
                "attach_failures_total",
                "Interfaces that could not be attached.",
                s.attach_failures,
            ),
            (
                "trace_entries_expired_total",
                "Trace entries removed after the idle timeout.",
                s.expired,
            ),
            (
                "flow_traces_closed_total",
                "Per-connection trace entries removed when their connection closed.",
                s.flows_closed,
            ),
            (
                "flow_stats_collected_total",
                "FLOW_STATS entries of closed or idle flows, deleted.",
                s.flows_collected,
            ),
            (
                "capture_skips_collected_total",
                "Expired CAPTURE_SKIP entries deleted.",
                s.skips_collected,
            ),
            (
                "trace_entries_adopted_total",
                "Trace entries taken over from the previous agent's pinned maps.",
                s.adopted,
            ),
            (
                "trace_entries_adopted_idle_total",
                "Pinned trace entries found already idle at start (deleted).",
                s.adopted_idle,
            ),
            (
                "capture_applied_total",
                "Request heads that set a trace.",
                c.applied,
            ),
            (
                "capture_no_id_total",
                "Complete request heads without an id header.",
                c.no_id,
            ),
            (
                "capture_truncated_no_id_total",
                "Cut-off request heads without an id in the part seen.",
                c.truncated_no_id,
            ),
            (
                "capture_bad_id_total",
                "Request heads with an unusable id.",
                c.bad_id,
            ),
            (
                "capture_not_http_total",
                "Captured payloads that were not HTTP/1 heads.",
                c.not_http,
            ),
            (
                "capture_table_errors_total",
                "Trace-table writes from capture that failed.",
                c.table_errors,
            ),
            (
                "capture_unclaimed_total",
                "Request details no span asked for within 3 s (dropped).",
                c.unclaimed,
            ),
            (
                "capture_evicted_total",
                "Request details evicted before their span closed.",
                c.evicted,
            ),
            ("spans_opened_total", "Spans started.", a.opened),
            (
                "spans_closed_end_total",
                "Spans finished by a request boundary.",
                a.closed_end,
            ),
            (
                "spans_closed_fin_total",
                "Spans finished by FIN/RST.",
                a.closed_fin,
            ),
            (
                "spans_closed_idle_total",
                "Spans finished by the idle timeout.",
                a.closed_idle,
            ),
            (
                "spans_evicted_total",
                "Spans finished early: open-span limit reached.",
                a.evicted,
            ),
            (
                "spans_released_early_total",
                "Spans sent before their trace went quiet: held-span limit reached (links may be partial).",
                a.released_early,
            ),
            ("spans_created_total", "Spans handed to export.", a.emitted),
        ]
        .into_iter()
        .map(|(n, h, v)| (n.to_string(), h.to_string(), v))
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tables::MemoryTables;
    use agent_common::HttpHeadEvent;

    fn head(port: u16, text: &str) -> Event {
        let mut ev = HttpHeadEvent {
            key: FlowKey {
                netns: 7,
                local_port: port,
                ..Default::default()
            },
            header: Default::default(),
            ts_ns: 0,
            pid: 0,
            len: text.len() as u32,
            data: [0; agent_common::MAX_CAPTURE],
        };
        ev.data[..text.len()].copy_from_slice(text.as_bytes());
        Event::HttpHead(Box::new(ev))
    }

    #[test]
    fn a_captured_head_sets_its_connections_trace_and_one_without_id_is_skipped() {
        let table = Mutex::new(MemoryTables::in_memory(16, Duration::from_secs(30)));
        let mut pipe = Pipeline::new(&AgentConfig::default());
        let with_id = head(1, "GET / HTTP/1.1\r\nX-Request-Id: req-1\r\n\r\n");
        assert_eq!(pipe.event(with_id, &table), None);
        let want = crate::ids::map_request_id("req-1").unwrap().0;
        let key = FlowKey {
            netns: 7,
            local_port: 1,
            ..Default::default()
        };
        assert_eq!(table.lock().unwrap().by_flow().get(&key), Some(want));
        assert_eq!(table.lock().unwrap().gate().active_namespaces(), 1);
        // No id: the datapath is told to stop copying this connection's heads.
        let no_id = head(2, "GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(pipe.event(no_id, &table).map(|k| k.local_port), Some(2));
        // Not HTTP: counted, nothing set, nothing skipped.
        assert_eq!(pipe.event(head(3, "\x16\x03\x01 tls"), &table), None);
        let c = &pipe.capture;
        assert_eq!(
            (pipe.stats.heads, c.applied, c.no_id, c.not_http),
            (3, 1, 1, 1)
        );
        assert_eq!(table.lock().unwrap().by_flow().len(), 1);
    }
}
