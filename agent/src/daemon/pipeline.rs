//! Datapath events → trace tables (captured heads) and spans → exporter,
//! with the agent-side counters that say what happened to each.
use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use agent_common::{
    FlowKey, FlowStats, NetnsSlot, TraceContext, TraceKey, MATCH_FLOW, MATCH_PID, MATCH_THREAD,
};
use tracing::warn;

use crate::{
    clock::{monotonic_ns, WallClock},
    config::AgentConfig,
    conntrack::{Services, Translation},
    events::Event,
    export::Exporter,
    loader::Datapath,
    podnet::{Reader, Unresolved},
    sources::{
        capture::{Capture, Check, HeadInfo, HeadOutcome, Sent},
        h2::H2Conns,
    },
    spans::{
        assemble::{Assembler, AssemblerConfig, End, Reply},
        resource::Resources,
        SpanRecord,
    },
    tables::{Store, TraceTable, TraceTables},
    trim::Trim,
};

mod recover;

/// Agent-side counters (exported as metrics).
#[derive(Default, Debug, Clone)]
pub struct AgentStats {
    pub capture_skips: u64,
    /// Responses on connections whose entry was written after their first
    /// packet (re-attributed to it).
    pub reattributed_flows: u64,
    pub flow_new: u64,
    pub flow_end: u64,
    pub heads: u64,
    pub events_unknown: u64,
    pub events_truncated: u64,
    pub attach_failures: u64,
    /// Pod addresses the datapath could not be told (`POD_ADDRS` full):
    /// HTTP/2 replies to that pod are not followed.
    pub pod_addr_failures: u64,
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
    /// /proc scans for listeners while BOUND_PORTS was near full, and the
    /// owners they put back (evicted, or never recorded).
    pub bound_ports_scans: u64,
    pub bound_ports_relearned: u64,
    /// Connections that ended before the agent had keyed them, made spans
    /// from what the datapath counted (see `Pipeline::recover`).
    pub spans_recovered: u64,
    /// Requests no packet was counted under (their connection went on to
    /// a later request, closed, or went quiet after the answer before the
    /// agent keyed it): spans made from their heads alone.
    pub spans_from_heads: u64,
    /// Calls by a thread serving a connection whose request the datapath
    /// did not know yet (the head's round trip through the agent was
    /// slower than the app): filed under that connection's trace.
    pub thread_races_lost: u64,
    /// Calls by a thread serving a connection without any trace.
    pub thread_calls_untraced: u64,
    /// Datapath entries started for a connection after its span ended
    /// (FIN/RST): its last packets, not a new span.
    pub flows_after_end: u64,
}

/// What a sweep read from the datapath (see `Pipeline::look`).
pub struct Look {
    now: u64,
    due: Vec<Check>,
    due_stats: HashMap<FlowKey, FlowStats>,
    open: HashMap<FlowKey, FlowStats>,
}

/// Datapath events → spans → exporter.
/// Unsampled traces remembered, at most (the oldest decisions go first).
const UNSAMPLED_TRACES: usize = 16384;

pub struct Pipeline {
    pub capture: Capture,
    /// HTTP/2 connections followed by passive capture.
    pub h2: H2Conns,
    /// Where the host sends calls to Service addresses (off until the
    /// daemon opens it).
    pub services: Services,
    pub assembler: Assembler,
    pub clock: WallClock,
    pub stats: AgentStats,
    /// Connections that ended (FIN/RST) and when their per-connection trace
    /// entry goes: a short grace lets the last ACKs through under the same
    /// trace instead of re-resolving them.
    closing: VecDeque<(u64, FlowKey, [u8; 16])>,
    /// The pairs in `closing`: a packet that straggles in after the FIN
    /// and makes the datapath start a new entry for one of them continues
    /// nothing (see `Event::FlowNew`).
    ended: HashSet<(FlowKey, [u8; 16])>,
    closing_cap: usize,
    /// Finished spans waiting for room in the export queue: a big trace
    /// released at once waits here instead of overflowing the queue.
    /// At most one export queue's worth; beyond it the oldest are dropped
    /// (counted with the exporter's drops).
    pending: VecDeque<SpanRecord>,
    pending_cap: usize,
    /// Traces their caller did not sample: not exported.
    pub unsampled: super::sampling::Unsampled,
    /// Connections re-attributed to their reader's trace, until the
    /// datapath switches them: (trace they were tagged with, right context).
    reattributed: HashMap<FlowKey, ([u8; 16], TraceContext)>,
    reattributed_cap: usize,
    /// Connections whose span opened under their sender's process trace
    /// (`MATCH_PID`) and no head: the trace it opened under. A head on one
    /// moves that span to its request, whatever the process's trace was by
    /// the time the agent got the head (it may have run behind by several
    /// requests). Until the span ends; bounded like `reattributed`.
    pid_tagged: HashMap<FlowKey, [u8; 16]>,
    /// Calls conntrack had no entry for at their first packet, with the
    /// trace they opened under: asked again at their end or at the next
    /// sweep, whichever comes first (bounded like `reattributed`).
    unconfirmed: HashMap<FlowKey, [u8; 16]>,
    span_idle_ns: u64,
}

/// HTTP/2 connections decoded at once (each holds an HPACK table of
/// usually 4 KiB, at most `h2::MAX_TABLE`).
const H2_CONNECTIONS: usize = 2048;

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
            h2: H2Conns::new(H2_CONNECTIONS),
            services: Services::disabled(),
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
            ended: Default::default(),
            // Entries waiting out their grace hold table slots: under
            // churn they may take a quarter of the table, no more (a head
            // writes two entries: its connection seen from each end).
            closing_cap: cfg.maps.flow_traces as usize / 4,
            pending: Default::default(),
            pending_cap: cfg.export.queue,
            unsampled: super::sampling::Unsampled::new(UNSAMPLED_TRACES),
            reattributed: HashMap::new(),
            reattributed_cap: cfg.max_open_spans,
            pid_tagged: HashMap::new(),
            unconfirmed: HashMap::new(),
            span_idle_ns: cfg.span_idle_ms * 1_000_000,
        }
    }

    /// Handles one ring-buffer record. Returns a connection whose request
    /// heads the datapath should stop copying for a while (its head had no
    /// id header).
    /// `receiver` finds the process that will read a captured head (see
    /// `PodNets::receiver`).
    pub fn event<P, F, G, A>(
        &mut self,
        ev: Event,
        table: &Mutex<TraceTables<P, F, G, A>>,
        receiver: impl FnMut(&FlowKey) -> Result<Reader, Unresolved>,
    ) -> Option<FlowKey>
    where
        P: Store<TraceKey, TraceContext>,
        F: Store<FlowKey, TraceContext>,
        G: Store<u64, u64>,
        A: Store<u32, NetnsSlot>,
    {
        let now = monotonic_ns();
        match ev {
            Event::FlowNew(mut f) => {
                self.stats.flow_new += 1;
                // The datapath caught up with a call the agent filed from
                // its "no trace" entry: the same span goes on.
                let untraced_before = matches!(
                    self.reattributed.get(&f.key),
                    Some((old, ctx)) if *old == [0; 16] && ctx.trace_id == f.stats.trace_id
                );
                if untraced_before {
                    self.reattributed.remove(&f.key);
                    self.assembler.continue_from_untraced(&f, now);
                    return None;
                }
                self.reattribute(&mut f, table);
                // A call the datapath found no trace for, and neither did
                // the agent: nothing to file.
                if f.stats.is_negative() {
                    return None;
                }
                // The last ACK of a connection whose span the FIN closed,
                // in a new datapath entry (it was counted under "no trace"
                // while the agent keyed it): no new span. A SYN is a new
                // connection on the same ports.
                const SYN: u8 = 0x02;
                if f.stats.tcp_flags & SYN == 0 && self.ended.contains(&(f.key, f.stats.trace_id)) {
                    self.stats.flows_after_end += 1;
                    return None;
                }
                let head = self.capture.take_head(&f.key, &f.stats.trace_id);
                if head.is_none()
                    && f.stats.matched == MATCH_PID
                    && f.stats.owner == agent_common::OWNER_CONNECTED
                {
                    if self.pid_tagged.len() >= self.reattributed_cap {
                        self.pid_tagged.clear();
                    }
                    self.pid_tagged.insert(f.key, f.stats.trace_id);
                }
                let known = head.as_ref().is_some_and(|h| h.via.is_some());
                self.assembler.flow_new(&f, head, now);
                // A call to a Service address: its pod, from conntrack
                // (the SYN passed netfilter right after this hook).
                if !known
                    && f.stats.owner == agent_common::OWNER_CONNECTED
                    && !f.key.remote_ip().is_loopback()
                {
                    match self.services.find(&f.key) {
                        Translation::Via(via) => {
                            self.assembler.translated(&f.key, &f.stats.trace_id, via)
                        }
                        Translation::Unknown if self.services.stats.worth_rechecking() => {
                            self.recheck_later(f.key, f.stats.trace_id)
                        }
                        Translation::Unknown | Translation::Direct => {}
                    }
                }
            }
            Event::FlowEnd(mut f) => {
                self.stats.flow_end += 1;
                // A short call ends long before the next sweep, and its
                // span closes now: it is asked again first.
                if let Some(trace) = self.unconfirmed.remove(&f.key) {
                    self.confirm(f.key, trace);
                }
                if self.pid_tagged.get(&f.key) == Some(&f.stats.trace_id) {
                    self.pid_tagged.remove(&f.key);
                }
                let switched = match self.reattributed.get(&f.key) {
                    Some((old, ctx)) if *old == f.stats.trace_id => Some(*ctx),
                    _ => None,
                };
                match switched {
                    // The datapath caught up: the rest of the connection
                    // goes on under the right trace, in the same span.
                    Some(ctx) => {
                        self.reattributed.remove(&f.key);
                        relabel(&mut f, &ctx);
                        self.assembler.continue_as(&f);
                    }
                    None => self.assembler.flow_end(&f, now),
                }
            }
            Event::HttpHead(h) => {
                self.stats.heads += 1;
                let services = &mut self.services;
                let out = self.capture.handle(
                    &h,
                    &mut table.lock().expect("table lock"),
                    receiver,
                    |k| services.recheck(k),
                );
                match out {
                    HeadOutcome::Applied(info) => self.applied(&h.key, info, now),
                    // Anything else is copied again on the connection's
                    // next segment that looks like a request: skipped for a
                    // while, so no pod can fill the shared ring with heads
                    // that never apply (a bad or missing id, not HTTP).
                    _ => return Some(h.key),
                }
            }
            Event::H2Frames(h) => {
                let mut receiver = receiver;
                let decoded = self.h2.event(&h, self.capture.id_headers());
                for s in decoded.requests {
                    self.stats.heads += 1;
                    let sent = Sent {
                        key: h.key,
                        pid: h.pid,
                        ts_ns: h.ts_ns,
                    };
                    let services = &mut self.services;
                    let out = self.capture.apply(
                        sent,
                        s.head,
                        &mut table.lock().expect("table lock"),
                        &mut receiver,
                        |k| services.recheck(k),
                    );
                    // A stream without an id skips nothing: the next one
                    // on the connection may have one, and its table must
                    // see every block.
                    if let HeadOutcome::Applied(info) = out {
                        self.h2.traced(&h.key, s.stream, info.trace_id);
                        self.applied(&h.key, info, now);
                    }
                }
                // A status goes to its request's spans: the client's side
                // and the server's (this record's key).
                for r in decoded.replies {
                    let Some(trace) = r.trace else { continue };
                    let reply = Reply {
                        status: r.status,
                        grpc_status: r.grpc_status,
                        last_ns: h.ts_ns,
                    };
                    self.assembler.reply(&r.request, &h.key, &trace, reply);
                }
            }
            Event::Unknown(_) => self.stats.events_unknown += 1,
            Event::Truncated => self.stats.events_truncated += 1,
        }
        None
    }

    /// What a head that set a trace changes for spans.
    fn applied(&mut self, key: &FlowKey, info: Box<HeadInfo>, now: u64) {
        let key = *key;
        // What the sender sent on this connection before the agent got the
        // head went out under its process's previous trace: it is this
        // request's.
        // So did what it sent under whatever its process carried when the
        // connection's span opened (the agent ran behind).
        let opened_under = self.pid_tagged.remove(&key);
        let previous = info.sender_previous.map(|(t, _)| t);
        let ctx = info.context();
        for from in [previous, opened_under.filter(|t| Some(*t) != previous)]
            .into_iter()
            .flatten()
        {
            if from != ctx.trace_id && self.assembler.retrace(&key, &from, &ctx, End::Sender, now) {
                self.stats.reattributed_flows += 1;
                self.remember_reattributed(key, from, ctx);
                break;
            }
        }
        if let Some(r) = info.reader_end {
            // The reader's handshake went out under its process's previous
            // trace: it is this request's.
            if let Some(previous) = r.previous {
                if self
                    .assembler
                    .retrace(&r.conn, &previous, &r.ctx, End::Reader, now)
                {
                    self.stats.reattributed_flows += 1;
                    self.remember_reattributed(r.conn, previous, r.ctx);
                }
            }
            // A span at that end already under the request (moved just now:
            // the datapath's switch may never come, the exchange having
            // ended under the old trace; or opened under it, the reader's
            // process carrying it already) takes the details now: no
            // FLOW_NEW will come for it.
            if self.assembler.is_open(&r.conn, &r.ctx.trace_id) {
                if let Some(h) = self.capture.take_head(&r.conn, &r.ctx.trace_id) {
                    self.assembler.head(&r.conn, h);
                }
            }
            // From another node: its caller's span id is one both agents
            // compute.
            if key.netns == agent_common::NETNS_WIRE {
                let conn = info.via.unwrap_or(key);
                self.assembler.expect_caller(
                    r.conn,
                    info.trace_id,
                    crate::ids::call_span_id(&info.trace_id, &conn),
                );
            }
        }
        self.unsampled.note(info.trace_id, info.sampled);
        let trace = info.trace_id;
        if self.assembler.head(&key, info) {
            self.capture.span_open(&key, &trace);
        }
    }

    /// A flow the datapath tagged before the agent had written what it
    /// learnt from a captured head (the round trip through the ring buffer
    /// lost the race): a response on a connection whose reader end was
    /// keyed, or a call its reader made while serving. The connection gets
    /// the right trace in the datapath from now on, and its span carries
    /// the right trace from its first packet.
    fn reattribute<P, F, G, A>(
        &mut self,
        f: &mut agent_common::FlowEvent,
        table: &Mutex<TraceTables<P, F, G, A>>,
    ) where
        P: Store<TraceKey, TraceContext>,
        F: Store<FlowKey, TraceContext>,
        G: Store<u64, u64>,
        A: Store<u32, NetnsSlot>,
    {
        let mut t = table.lock().expect("table lock");
        let via = f.via();
        // The connection has its own entry, written after this packet left
        // (events come in order: the head that set it came first). The
        // datapath switches at the next packet; the span starts right.
        let ctx = match t.by_flow().context(&f.key) {
            Some(c) if c.trace_id != f.stats.trace_id => {
                self.stats.reattributed_flows += 1;
                // Its trace is its connection's own now, not its process's:
                // no later head moves it (see `Assembler::retrace`).
                f.stats.matched = MATCH_FLOW;
                c
            }
            Some(_) => return,
            None if via.is_some() => {
                let v = via.unwrap_or_default();
                let c = match self.capture.carried(&v, f.stats.first_ns) {
                    Some(Some(c)) => Some(c),
                    // Its heads all came after the call started.
                    Some(None) => return,
                    // No head seen on it: the kernel's answer stands.
                    None if f.stats.matched == MATCH_THREAD => return,
                    None => t.by_flow().context(&v),
                };
                let Some(c) = c else {
                    if f.stats.is_negative() {
                        self.stats.thread_calls_untraced += 1;
                    }
                    return;
                };
                if c.trace_id == f.stats.trace_id {
                    return;
                }
                self.stats.thread_races_lost += 1;
                if t.set_flow(f.key, &c).is_err() {
                    self.capture.table_errors += 1;
                }
                f.stats.matched = MATCH_THREAD;
                c
            }
            None if f.stats.owner == agent_common::OWNER_CONNECTED => {
                let caller = TraceKey::new(f.stats.pid, f.key.netns);
                let Some(c) = self
                    .capture
                    .lost_race(caller, f.stats.first_ns, &f.stats.trace_id)
                else {
                    return;
                };
                if t.set_flow(f.key, &c).is_err() {
                    self.capture.table_errors += 1;
                }
                c
            }
            None => return,
        };
        drop(t);
        self.remember_reattributed(f.key, f.stats.trace_id, ctx);
        relabel(f, &ctx);
    }

    pub(super) fn close_later(&mut self, now: u64, key: FlowKey, trace: [u8; 16]) {
        self.closing
            .push_back((now + CLOSED_FLOW_GRACE_NS, key, trace));
        self.ended.insert((key, trace));
    }

    /// Asks conntrack again about a call it had no entry for; the answer
    /// goes to the call's span, open under the trace it opened under or,
    /// re-attributed since, under its request's.
    fn confirm(&mut self, key: FlowKey, trace: [u8; 16]) {
        let Some(via) = self.services.recheck(&key) else {
            return;
        };
        self.assembler.translated(&key, &trace, via);
        if let Some((old, ctx)) = self.reattributed.get(&key) {
            if *old == trace {
                self.assembler.translated(&key, &ctx.trace_id, via);
            }
        }
    }

    /// A call whose Service translation conntrack could not tell yet.
    fn recheck_later(&mut self, key: FlowKey, trace: [u8; 16]) {
        // Bounded: beyond it a call keeps the address it dialled (counted
        // in `linking_services_not_found_total`).
        if self.unconfirmed.len() < self.reattributed_cap {
            self.unconfirmed.insert(key, trace);
        }
    }

    /// `key`'s packets still come tagged `old` until the datapath switches
    /// to `ctx`; they continue the span already filed under `ctx`.
    fn remember_reattributed(&mut self, key: FlowKey, old: [u8; 16], ctx: TraceContext) {
        if self.reattributed.len() >= self.reattributed_cap {
            // Bounded: the oldest connections lose their continuation (a
            // second span), never their trace.
            self.reattributed.clear();
        }
        self.reattributed.insert(key, (old, ctx));
    }

    /// Reads what a sweep needs from the datapath: the numbers of the
    /// connections with an open span or a head due for a look. The caller
    /// handles the events queued up to now before it hands them to
    /// `sweep`: those numbers count packets that came after events the
    /// agent has not read yet (a head, when the app answered at once), and
    /// acted on first they would judge a span by its future (a reader's
    /// handshake that answered the head would look like an earlier
    /// exchange and stay under the previous request).
    pub fn look(&mut self, dp: &Datapath) -> Look {
        let now = monotonic_ns();
        let due = self.capture.overdue(now);
        let due_stats = if due.is_empty() {
            HashMap::new()
        } else {
            dp.flow_stats_for(due.iter().map(|c| &c.key))
        };
        let keys = self.assembler.open_keys();
        let open = dp.flow_stats_for(keys.iter());
        Look {
            now,
            due,
            due_stats,
            open,
        }
    }

    /// Refreshes open spans from FLOW_STATS, closes finished ones and hands
    /// complete traces to the exporter.
    /// Per-connection trace entries of connections that closed are removed
    /// (after a grace), not left to the idle timeout: under connection churn
    /// FLOW_TRACES then holds live connections only.
    pub fn sweep(
        &mut self,
        look: Look,
        dp: &mut Datapath,
        exporter: &Exporter,
        table: &Mutex<TraceTable>,
    ) {
        let now = self.refresh(look, table);
        let mut t = table.lock().expect("table lock");
        while let Some((due, key, trace)) = self.closing.front().copied() {
            if due > now && self.closing.len() <= self.closing_cap {
                break;
            }
            self.closing.pop_front();
            self.ended.remove(&(key, trace));
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
        let capture = &self.capture;
        let ready = self
            .assembler
            .ready(&self.clock, now, |t| capture.awaits_span(t));
        let unsampled = &mut self.unsampled;
        self.pending
            .extend(ready.into_iter().filter(|s| unsampled.keep(s)));
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
        // A burst's tables give back what it made them grow to.
        self.capture.trim();
        self.assembler.trim();
        self.services.trim();
        self.h2.trim();
        self.closing.trim();
        self.ended.trim();
        self.pending.trim();
        self.reattributed.trim();
        self.pid_tagged.trim();
    }

    /// The part of a sweep the datapath's numbers (`look`) decide: heads
    /// due a look, spans refreshed, and those that ended closed. Returns
    /// the look's time.
    fn refresh<P, F, G, A>(&mut self, look: Look, table: &Mutex<TraceTables<P, F, G, A>>) -> u64
    where
        P: Store<TraceKey, TraceContext>,
        F: Store<FlowKey, TraceContext>,
        G: Store<u64, u64>,
        A: Store<u32, NetnsSlot>,
    {
        let Look {
            now,
            due,
            due_stats,
            open: mut snapshot,
        } = look;
        self.clock.refresh(Duration::from_secs(10));
        if !due.is_empty() {
            let current = {
                let t = table.lock().expect("table lock");
                due.iter()
                    .filter_map(|c| Some((c.key, t.by_flow().context(&c.key)?.trace_id)))
                    .collect()
            };
            self.recover(due, &due_stats, &current, now);
        }
        // Before spans close: a short call may have ended by now.
        for (key, trace) in std::mem::take(&mut self.unconfirmed) {
            self.confirm(key, trace);
        }
        // Until the datapath switches a re-attributed connection, its
        // numbers are filed under the old trace.
        for (k, s) in snapshot.iter_mut() {
            if let Some((old, ctx)) = self.reattributed.get(k) {
                if s.trace_id == *old {
                    // A call counted under "no trace" while its thread's
                    // request was being keyed (see `reattribute`).
                    if s.is_negative() {
                        s.matched = MATCH_THREAD;
                    }
                    s.trace_id = ctx.trace_id;
                }
            }
        }
        for (key, trace) in self.assembler.sweep(&snapshot, now) {
            self.reattributed.remove(&key);
            self.close_later(now, key, trace);
        }
        now
    }

    /// Finished spans not yet queued for export: held for linking or
    /// waiting for room.
    pub fn held(&self) -> usize {
        self.assembler.held_spans() + self.pending.len()
    }

    /// Everything still in the pipeline, for the exporter at shutdown.
    pub fn drain_all(&mut self) -> Vec<SpanRecord> {
        let mut out: Vec<_> = self.pending.drain(..).collect();
        let rest = self.assembler.flush_all(&self.clock, monotonic_ns());
        out.extend(rest.into_iter().filter(|s| self.unsampled.keep(s)));
        out
    }

    pub fn counters(&self) -> Vec<(String, String, u64)> {
        let s = &self.stats;
        [
            ("events_flow_new_total", "FLOW_NEW events read.", s.flow_new),
            (
                "spans_unsampled_total",
                "Spans not exported: their trace's traceparent said not sampled.",
                self.unsampled.spans_skipped,
            ),
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
                "pod_addr_failures_total",
                "Pod addresses the datapath could not be told (POD_ADDRS full): HTTP/2 replies of those pods go unread.",
                s.pod_addr_failures,
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
                "bound_ports_scans_total",
                "Listener scans of /proc because BOUND_PORTS ran near full.",
                s.bound_ports_scans,
            ),
            (
                "bound_ports_relearned_total",
                "Listeners put back into BOUND_PORTS by those scans (evicted or lost).",
                s.bound_ports_relearned,
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
                "linking_flows_reattributed_total",
                "Flows that left before the agent wrote their connection's entry, filed under it.",
                s.reattributed_flows,
            ),
            (
                "linking_thread_races_lost_total",
                "Calls made before the agent had keyed the request their thread was reading (the datapath knew the connection, not its trace yet), filed under it.",
                s.thread_races_lost,
            ),
            (
                "linking_thread_calls_untraced_total",
                "Calls by a thread whose last read connection carried no trace.",
                s.thread_calls_untraced,
            ),
            (
                "spans_flows_after_end_total",
                "Packets of a connection whose span had ended (FIN/RST) that reached the agent as a new datapath entry; not made a span.",
                s.flows_after_end,
            ),
            (
                "linking_spans_recovered_total",
                "Connections that ended before the agent had keyed them, filed under their request's trace from what the datapath counted.",
                s.spans_recovered,
            ),
            (
                "linking_spans_from_heads_total",
                "Requests no packet was counted under (their connection went on to a later request, closed, or went quiet after the answer before the agent keyed it): spans made from the request head alone, without packet numbers.",
                s.spans_from_heads,
            ),
        ]
        .into_iter()
        .chain(self.capture.counters())
        .chain(self.h2.stats.counters())
        .chain(self.assembler.stats.counters())
        .chain(self.services.stats.counters())
        .map(|(n, h, v)| (n.to_string(), h.to_string(), v))
        .collect()
    }
}

/// Files a flow event under `ctx`'s trace.
fn relabel(f: &mut agent_common::FlowEvent, ctx: &TraceContext) {
    f.stats.trace_id = ctx.trace_id;
    f.trace_flags = ctx.flags;
    f.parent_span_id = ctx.parent_span_id;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tables::MemoryTables;
    use agent_common::{FlowEvent, FlowStats, HttpHeadEvent, MATCH_WATCHED};

    fn not_local(_: &FlowKey) -> Result<Reader, Unresolved> {
        Err(Unresolved::NotLocal)
    }

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
        assert_eq!(pipe.event(with_id, &table, not_local), None);
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
        assert_eq!(
            pipe.event(no_id, &table, not_local).map(|k| k.local_port),
            Some(2)
        );
        // Not HTTP, or an unusable id: counted, nothing set, skipped too
        // (a pod sending heads that never apply must not flood the ring).
        assert_eq!(
            pipe.event(head(3, "\x16\x03\x01 tls"), &table, not_local)
                .map(|k| k.local_port),
            Some(3)
        );
        let bad = head(
            4,
            &format!(
                "GET / HTTP/1.1\r\nX-Request-Id: {}\r\n\r\n",
                "x".repeat(300)
            ),
        );
        assert_eq!(
            pipe.event(bad, &table, not_local).map(|k| k.local_port),
            Some(4)
        );
        let c = &pipe.capture;
        assert_eq!(
            (pipe.stats.heads, c.applied, c.no_id, c.not_http, c.bad_id),
            (4, 1, 1, 1, 1)
        );
        assert_eq!(table.lock().unwrap().by_flow().len(), 1);
    }

    /// A head with `X-Request-Id: id`, sent by `pid` from `port`.
    fn sent(port: u16, id: &str, pid: u32) -> Event {
        let text = format!("GET / HTTP/1.1\r\nX-Request-Id: {id}\r\n\r\n");
        let Event::HttpHead(mut h) = head(port, &text) else {
            unreachable!()
        };
        h.pid = pid;
        Event::HttpHead(h)
    }

    /// The spans whose local port is `port`.
    fn on_port(spans: &[SpanRecord], port: u16) -> Vec<&SpanRecord> {
        spans
            .iter()
            .filter(|s| s.attr("network.local.port") == Some(crate::spans::Value::Int(port.into())))
            .collect()
    }

    fn flow(key: FlowKey, trace: u8, packets: u64, first: u64, last: u64) -> FlowEvent {
        FlowEvent {
            key,
            stats: agent_common::FlowStats {
                trace_id: [trace; 16],
                pid: 22,
                packets,
                bytes: packets * 100,
                first_ns: first,
                last_ns: last,
                owner: agent_common::OWNER_CONNECTED,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// A server's answer on `key` under `trace`: data, then FIN.
    fn answer(key: FlowKey, trace: [u8; 16], packets: u64, first: u64, last: u64) -> FlowEvent {
        let mut f = flow(key, 0, packets, first, last);
        f.stats.trace_id = trace;
        f.stats.owner = agent_common::OWNER_BOUND;
        f.stats.tcp_flags = 0x19;
        f
    }

    #[test]
    fn a_call_that_beat_the_agent_gets_its_readers_trace_in_one_span() {
        let table = Mutex::new(MemoryTables::in_memory(16, Duration::from_secs(30)));
        let mut pipe = Pipeline::new(&AgentConfig::default());
        // The head reaches reader (22, netns 2) at t = 100 ...
        let Event::HttpHead(mut h) = head(8000, "GET / HTTP/1.1\r\nX-Request-Id: req-n\r\n\r\n")
        else {
            unreachable!()
        };
        h.ts_ns = 100;
        let reader = TraceKey::new(22, 2);
        pipe.event(Event::HttpHead(h), &table, |_| {
            Ok(Reader {
                key: reader,
                late: false,
            })
        });
        let want = crate::ids::map_request_id("req-n").unwrap().0;
        // ... whose call at t = 150 went out under its previous trace.
        let call = FlowKey::new(
            2,
            agent_common::PROTO_TCP,
            ([10, 0, 0, 2], 5000).into(),
            ([10, 0, 0, 3], 9000).into(),
        );
        let old = 0x0d;
        pipe.event(
            Event::FlowNew(flow(call, old, 3, 150, 160)),
            &table,
            not_local,
        );
        assert_eq!(pipe.capture.receiver_races_lost, 1);
        assert_eq!(
            table.lock().unwrap().by_flow().get(&call),
            Some(want),
            "the datapath tags the rest of the call with the right trace"
        );
        // The datapath switches: FLOW_END of the old pair, FLOW_NEW of the new.
        pipe.event(
            Event::FlowEnd(flow(call, old, 3, 150, 160)),
            &table,
            not_local,
        );
        let mut next = flow(call, 0, 2, 170, 180);
        next.stats.trace_id = want;
        pipe.event(Event::FlowNew(next), &table, not_local);
        next.stats.packets = 4;
        next.stats.last_ns = 200;
        pipe.event(Event::FlowEnd(next), &table, not_local);
        let spans = pipe.drain_all();
        assert_eq!(spans.len(), 1, "one connection, one span");
        assert_eq!(spans[0].trace_id, want);
        assert_eq!(
            spans[0].attr("tagflow.packets"),
            Some(crate::spans::Value::Int(7)),
            "both parts of the connection counted"
        );
    }

    #[test]
    fn calls_go_under_the_request_their_thread_was_reading_not_the_process_s_last() {
        let table = Mutex::new(MemoryTables::in_memory(16, Duration::from_secs(30)));
        let mut pipe = Pipeline::new(&AgentConfig::default());
        let reader = TraceKey::new(22, 2);
        // Two requests in flight to one process, on two connections.
        let mut via = Vec::new();
        for (port, id) in [(8001, "req-a"), (8002, "req-b")] {
            let Event::HttpHead(h) = head(
                port,
                &format!("GET / HTTP/1.1\r\nX-Request-Id: {id}\r\n\r\n"),
            ) else {
                unreachable!()
            };
            via.push(h.key.reversed_in(reader.netns));
            pipe.event(Event::HttpHead(h), &table, |_| {
                Ok(Reader {
                    key: reader,
                    late: false,
                })
            });
        }
        let a = crate::ids::map_request_id("req-a").unwrap().0;
        let b = crate::ids::map_request_id("req-b").unwrap().0;
        let call = |port: u16| {
            FlowKey::new(
                2,
                agent_common::PROTO_TCP,
                ([10, 0, 0, 2], port).into(),
                ([10, 0, 0, 3], 9000).into(),
            )
        };
        // The thread serving A called before the agent keyed A's
        // connection: the datapath fell back to the process (last: B).
        let mut c1 = flow(call(5001), 0, 3, 150, 160);
        c1.stats.trace_id = b;
        c1.stats.matched = agent_common::MATCH_PID;
        c1.via = via[0];
        pipe.event(Event::FlowNew(c1), &table, not_local);
        // The thread serving B found no trace at all: a "pending" call.
        let mut c2 = flow(call(5002), 0, 1, 170, 170);
        c2.stats.matched = MATCH_WATCHED;
        c2.via = via[1];
        pipe.event(Event::FlowNew(c2), &table, not_local);
        // A thread serving a connection nobody traced: nothing to file.
        let mut c3 = flow(call(5003), 0, 1, 180, 180);
        c3.via = FlowKey {
            local_port: 1,
            ..via[1]
        };
        pipe.event(Event::FlowNew(c3), &table, not_local);
        assert_eq!(
            (
                pipe.stats.thread_races_lost,
                pipe.stats.thread_calls_untraced
            ),
            (2, 1)
        );
        let t = table.lock().unwrap();
        assert_eq!(t.by_flow().get(&call(5001)), Some(a));
        assert_eq!(t.by_flow().get(&call(5002)), Some(b));
        assert_eq!(t.by_flow().get(&call(5003)), None);
        drop(t);
        // The datapath switches the pending call: same span, both parts.
        let mut c2b = flow(call(5002), 0, 2, 190, 200);
        c2b.stats.trace_id = b;
        c2b.stats.matched = MATCH_FLOW;
        pipe.event(Event::FlowNew(c2b), &table, not_local);
        let mut spans = pipe.drain_all();
        spans.sort_by_key(|s| s.trace_id);
        let got: Vec<_> = spans.iter().map(|s| s.trace_id).collect();
        let mut want = vec![a, b];
        want.sort();
        assert_eq!(got, want, "one span per call, each under its request");
        let b_span = spans.iter().find(|s| s.trace_id == b).unwrap();
        assert_eq!(
            b_span.attr("tagflow.packets"),
            Some(crate::spans::Value::Int(3)),
            "what the datapath counted before and after the switch"
        );
    }

    /// A keep-alive call whose only packet after the agent keyed it is
    /// the RST of its close, sent without a socket (no owner), from a
    /// port below the server's: the head it sent makes it the client.
    #[test]
    fn a_call_whose_only_keyed_packet_is_its_close_is_still_a_client_span() {
        let table = Mutex::new(MemoryTables::in_memory(16, Duration::from_secs(30)));
        let mut pipe = Pipeline::new(&AgentConfig::default());
        let Event::HttpHead(mut h) = sent(38924, "req-r", 11) else {
            unreachable!()
        };
        h.key.remote_port = 50051;
        let key = h.key;
        pipe.event(Event::HttpHead(h), &table, not_local);
        let mut rst = flow(key, 0, 1, 500, 500);
        rst.stats.trace_id = crate::ids::map_request_id("req-r").unwrap().0;
        rst.stats.pid = 0;
        rst.stats.owner = agent_common::OWNER_NONE;
        rst.stats.matched = MATCH_FLOW;
        rst.stats.tcp_flags = 0x14;
        pipe.event(Event::FlowNew(rst), &table, not_local);
        let spans = pipe.drain_all();
        assert_eq!(spans.len(), 1, "{spans:?}");
        assert_eq!(spans[0].kind, crate::spans::SpanKind::Client);
    }

    /// A call that beat the agent by its whole exchange: the datapath
    /// switched it to its request only at the last ACK, which the kernel
    /// sends from TIME_WAIT (no socket: no owner, no pid). The span is
    /// still the app's call, under the request its thread was reading.
    #[test]
    fn a_call_switched_at_its_last_ack_stays_the_callers() {
        let table = Mutex::new(MemoryTables::in_memory(16, Duration::from_secs(30)));
        let mut pipe = Pipeline::new(&AgentConfig::default());
        let reader = TraceKey::new(22, 2);
        // Two requests in turn on one keep-alive connection.
        let mut via = FlowKey::default();
        for (ts, id) in [(100, "req-1"), (200, "req-2")] {
            let Event::HttpHead(mut h) = head(
                8001,
                &format!("GET / HTTP/1.1\r\nX-Request-Id: {id}\r\n\r\n"),
            ) else {
                unreachable!()
            };
            h.ts_ns = ts;
            via = h.key.reversed_in(reader.netns);
            pipe.event(Event::HttpHead(h), &table, |_| {
                Ok(Reader {
                    key: reader,
                    late: false,
                })
            });
        }
        let (first, second) = (
            crate::ids::map_request_id("req-1").unwrap().0,
            crate::ids::map_request_id("req-2").unwrap().0,
        );
        let call = FlowKey::new(
            2,
            agent_common::PROTO_TCP,
            ([10, 0, 0, 2], 5001).into(),
            ([10, 0, 0, 3], 9000).into(),
        );
        // Serving req-2, its thread called while the datapath still had
        // req-1 for the connection: SYN to FIN under req-1.
        let mut c = flow(call, 0, 1, 210, 210);
        c.stats.trace_id = first;
        c.stats.owner = agent_common::OWNER_CONNECTED;
        c.stats.matched = MATCH_THREAD;
        c.stats.tcp_flags = 0x02;
        c.via = via;
        pipe.event(Event::FlowNew(c), &table, not_local);
        assert_eq!(pipe.stats.thread_races_lost, 1);
        let mut whole = c;
        whole.stats.packets = 7;
        whole.stats.last_ns = 240;
        whole.stats.tcp_flags = 0x1b;
        pipe.event(Event::FlowEnd(whole), &table, not_local);
        // The last ACK, from TIME_WAIT, under the call's own entry.
        let mut ack = flow(call, 0, 1, 250, 250);
        ack.stats.trace_id = second;
        ack.stats.pid = 0;
        ack.stats.owner = agent_common::OWNER_NONE;
        ack.stats.matched = MATCH_FLOW;
        ack.stats.tcp_flags = 0x10;
        pipe.event(Event::FlowNew(ack), &table, not_local);
        let spans = pipe.drain_all();
        let calls = on_port(&spans, 5001);
        assert_eq!(calls.len(), 1, "{spans:?}");
        let s = calls[0];
        assert_eq!(s.trace_id, second);
        assert_eq!(s.kind, crate::spans::SpanKind::Client);
        assert_eq!(s.attr("process.pid"), Some(crate::spans::Value::Int(22)));
        assert_eq!(s.attr("tagflow.packets"), Some(crate::spans::Value::Int(8)));
    }

    /// A head of request `id` to the server process (22 in netns 2, port
    /// 8000) from `port`, sent at `ts`.
    fn serve(pipe: &mut Pipeline, table: &Mutex<MemoryTables>, port: u16, id: &str, ts: u64) {
        let text = format!("GET / HTTP/1.1\r\nX-Request-Id: {id}\r\n\r\n");
        let Event::HttpHead(mut h) = head(port, &text) else {
            unreachable!()
        };
        h.key.remote_port = 8000;
        h.ts_ns = ts;
        pipe.event(Event::HttpHead(h), table, |_| {
            Ok(Reader {
                key: TraceKey::new(22, 2),
                late: false,
            })
        });
    }

    /// The server's SYN-ACK (at 300) on the connection from `port`, tagged
    /// by its process while that still carried `trace`.
    fn handshake(port: u16, trace: [u8; 16]) -> (FlowKey, FlowEvent) {
        let conn = FlowKey {
            netns: 2,
            local_port: 8000,
            remote_port: port,
            ..Default::default()
        };
        let mut syn_ack = flow(conn, 0, 1, 300, 300);
        syn_ack.stats.trace_id = trace;
        syn_ack.stats.owner = agent_common::OWNER_BOUND;
        syn_ack.stats.matched = agent_common::MATCH_PID;
        syn_ack.stats.tcp_flags = 0x12;
        (conn, syn_ack)
    }

    #[test]
    fn a_readers_handshake_under_its_previous_trace_joins_the_next_request() {
        let table = Mutex::new(MemoryTables::in_memory(16, Duration::from_secs(30)));
        let mut pipe = Pipeline::new(&AgentConfig::default());
        serve(&mut pipe, &table, 40001, "req-1", 0);
        let first = crate::ids::map_request_id("req-1").unwrap().0;
        let second = crate::ids::map_request_id("req-2").unwrap().0;
        // The server accepts the next connection while its process still
        // carries req-1: its SYN-ACK is tagged by process.
        let (conn, syn_ack) = handshake(40002, first);
        pipe.event(Event::FlowNew(syn_ack), &table, not_local);
        serve(&mut pipe, &table, 40002, "req-2", 0);
        assert_eq!(pipe.stats.reattributed_flows, 1);
        // The datapath switches to the connection's own entry.
        pipe.event(Event::FlowEnd(syn_ack), &table, not_local);
        let rest = answer(conn, second, 3, 310, 320);
        pipe.event(Event::FlowNew(rest), &table, not_local);
        pipe.event(Event::FlowEnd(rest), &table, not_local);
        let spans = pipe.drain_all();
        assert_eq!(spans.len(), 1, "one connection, one span: {spans:?}");
        assert_eq!(spans[0].trace_id, second);
        // A response already sent (PSH) is never moved: a keep-alive
        // connection's earlier request keeps its span.
        let conn3 = FlowKey {
            local_port: 8000,
            remote_port: 40003,
            netns: 2,
            ..Default::default()
        };
        let mut answered = syn_ack;
        answered.key = conn3;
        answered.stats.trace_id = second;
        answered.stats.tcp_flags = 0x18;
        pipe.event(Event::FlowNew(answered), &table, not_local);
        serve(&mut pipe, &table, 40003, "req-3", 0);
        assert_eq!(pipe.stats.reattributed_flows, 1);
    }

    /// A sweep reads the datapath's numbers while events written before
    /// them may still wait in the ring: here the server's SYN-ACK was
    /// handled, the head that followed not yet, and its answer (PSH) is
    /// already counted. The head is handled before those numbers are
    /// applied, so the handshake still moves to its request, and the
    /// numbers with it.
    #[test]
    fn numbers_read_before_a_head_was_handled_do_not_keep_its_handshake_from_it() {
        let table = Mutex::new(MemoryTables::in_memory(16, Duration::from_secs(30)));
        let mut pipe = Pipeline::new(&AgentConfig::default());
        serve(&mut pipe, &table, 40001, "req-1", 305);
        let first = crate::ids::map_request_id("req-1").unwrap().0;
        let second = crate::ids::map_request_id("req-2").unwrap().0;
        let (conn, syn_ack) = handshake(40002, first);
        pipe.event(Event::FlowNew(syn_ack), &table, not_local);
        // Read now: the answer is counted, still under req-1.
        let mut answered = syn_ack.stats;
        answered.packets = 3;
        answered.last_ns = 320;
        answered.tcp_flags = 0x1a;
        let look = Look {
            now: 400,
            due: Vec::new(),
            due_stats: HashMap::new(),
            open: HashMap::from([(conn, answered)]),
        };
        serve(&mut pipe, &table, 40002, "req-2", 305);
        assert_eq!(pipe.stats.reattributed_flows, 1, "the handshake moved");
        pipe.refresh(look, &table);
        // The datapath switches to the connection's own entry.
        let mut old = syn_ack;
        old.stats = answered;
        pipe.event(Event::FlowEnd(old), &table, not_local);
        let rest = answer(conn, second, 2, 330, 340);
        pipe.event(Event::FlowNew(rest), &table, not_local);
        pipe.event(Event::FlowEnd(rest), &table, not_local);
        let spans = pipe.drain_all();
        assert_eq!(spans.len(), 1, "one connection, one span: {spans:?}");
        assert_eq!(spans[0].trace_id, second);
        assert_eq!(
            spans[0].attr("tagflow.packets"),
            Some(crate::spans::Value::Int(5))
        );
        assert_eq!(
            spans[0].attr("url.path"),
            Some(crate::spans::Value::Str("/".into()))
        );
    }

    #[test]
    fn a_request_from_another_node_hangs_its_server_span_off_the_call_there() {
        let table = Mutex::new(MemoryTables::in_memory(16, Duration::from_secs(30)));
        let mut pipe = Pipeline::new(&AgentConfig::default());
        // Captured on the uplink: 10.1.0.2:40000 (node 1) → 10.2.0.3:80.
        let wire = FlowKey::new(
            agent_common::NETNS_WIRE,
            agent_common::PROTO_TCP,
            ([10, 1, 0, 2], 40000).into(),
            ([10, 2, 0, 3], 80).into(),
        );
        let Event::HttpHead(mut h) = head(1, "GET / HTTP/1.1\r\nX-Request-Id: req-w\r\n\r\n")
        else {
            unreachable!()
        };
        h.key = wire;
        let reader = TraceKey::new(33, 3);
        pipe.event(Event::HttpHead(h), &table, |_| {
            Ok(Reader {
                key: reader,
                late: false,
            })
        });
        let trace = crate::ids::map_request_id("req-w").unwrap().0;
        let t = table.lock().unwrap();
        assert_eq!(t.by_flow().get(&wire), None, "no sender here");
        assert_eq!(t.by_flow().get(&wire.reversed_in(3)), Some(trace));
        assert_eq!(t.by_pid().get(&reader), Some(trace));
        drop(t);
        let mut answer = flow(wire.reversed_in(3), 0, 2, 100, 200);
        answer.stats.trace_id = trace;
        answer.stats.owner = agent_common::OWNER_BOUND;
        pipe.event(Event::FlowNew(answer), &table, not_local);
        pipe.event(Event::FlowEnd(answer), &table, not_local);
        let spans = pipe.drain_all();
        assert_eq!(spans.len(), 1);
        assert_eq!(
            spans[0].parent_span_id,
            Some(crate::ids::call_span_id(&trace, &wire)),
            "the id node 1's agent gives its client span"
        );
        assert!(spans[0].parent_is_remote);
    }

    #[test]
    fn a_connection_that_ended_before_the_agent_keyed_it_still_becomes_a_span() {
        let table = Mutex::new(MemoryTables::in_memory(16, Duration::from_secs(30)));
        let mut pipe = Pipeline::new(&AgentConfig::default());
        let send = |pipe: &mut Pipeline, port: u16, id: &str| {
            let text = format!("GET / HTTP/1.1\r\nX-Request-Id: {id}\r\n\r\n");
            let Event::HttpHead(mut h) = head(port, &text) else {
                unreachable!()
            };
            h.ts_ns = 1_000;
            h.pid = 11;
            let key = h.key;
            pipe.event(Event::HttpHead(h), &table, not_local);
            key
        };
        let (done, open) = (send(&mut pipe, 1, "req-d"), send(&mut pipe, 2, "req-o"));
        assert!(pipe.capture.overdue(1_000).is_empty(), "not due yet");
        let due = pipe.capture.overdue(1_000 + 300_000_000);
        assert_eq!(due.len(), 2);
        let watched = |flags: u8| FlowStats {
            packets: 4,
            first_ns: 900,
            last_ns: 2_000,
            tcp_flags: flags,
            matched: MATCH_WATCHED,
            ..Default::default()
        };
        // One connection sent its FIN before the agent got to its head; the
        // other is still open (its next packet will carry the trace).
        let stats = HashMap::from([(done, watched(0x11)), (open, watched(0x10))]);
        let now = 1_000 + 300_000_000;
        assert_eq!(pipe.capture.awaited_spans(), 2, "both wait for a look");
        pipe.recover(due, &stats, &HashMap::new(), now);
        assert_eq!(pipe.stats.spans_recovered, 1);
        let spans = pipe.drain_all();
        assert_eq!(spans.len(), 1);
        assert_eq!(
            spans[0].trace_id,
            crate::ids::map_request_id("req-d").unwrap().0
        );
        assert_eq!(spans[0].kind, crate::spans::SpanKind::Client);
        // The open one is looked at again; its trace waits no longer (a
        // live connection may stay quiet).
        let again = pipe.capture.overdue(now + 300_000_000);
        assert_eq!(again.iter().map(|c| c.key).collect::<Vec<_>>(), [open]);
        let o = crate::ids::map_request_id("req-o").unwrap().0;
        assert!(!pipe.capture.awaits_span(&o));
        assert_eq!(pipe.capture.awaited_spans(), 0);
        // It still becomes a span once it goes idle.
        let mut t = now + 300_000_000;
        let mut due = again;
        while !due.is_empty() {
            pipe.recover(due, &stats, &HashMap::new(), t);
            t += 300_000_000;
            due = pipe.capture.overdue(t);
        }
        assert_eq!(pipe.stats.spans_recovered, 2, "recovered once idle");
    }

    /// The whole exchange fit in the head's round trip through userspace:
    /// the callee's span (keyed by the head) closes at once, the caller's
    /// comes only from `recover`. The trace must wait for it, or the
    /// callee's span goes out without its parent.
    #[test]
    fn a_trace_waits_for_the_span_its_senders_head_promised() {
        let table = Mutex::new(MemoryTables::in_memory(16, Duration::from_secs(30)));
        let mut pipe = Pipeline::new(&AgentConfig::default());
        let text = "GET / HTTP/1.1\r\nX-Request-Id: req-p\r\n\r\n";
        let Event::HttpHead(mut h) = head(40001, text) else {
            unreachable!()
        };
        h.key.remote_port = 8000;
        (h.ts_ns, h.pid) = (1_000, 11);
        let (caller, callee) = (h.key, h.key.reversed_in(2));
        pipe.event(Event::HttpHead(h), &table, |_| {
            Ok(Reader {
                key: TraceKey::new(22, 2),
                late: false,
            })
        });
        let trace = crate::ids::map_request_id("req-p").unwrap().0;
        let served = answer(callee, trace, 3, 1_100, 1_900);
        pipe.event(Event::FlowNew(served), &table, not_local);
        pipe.event(Event::FlowEnd(served), &table, not_local);
        let t0 = monotonic_ns();
        let settle = AssemblerConfig::default().settle_ns;
        let capture = &pipe.capture;
        let early = pipe
            .assembler
            .ready(&pipe.clock, t0 + settle, |t| capture.awaits_span(t));
        assert!(early.is_empty(), "the caller's span is still to come");
        // The caller's connection had ended when the agent got its head.
        let due = pipe.capture.overdue(1_000 + 300_000_000);
        let done = FlowStats {
            packets: 5,
            first_ns: 900,
            last_ns: 2_000,
            tcp_flags: 0x19,
            matched: MATCH_WATCHED,
            ..Default::default()
        };
        let now = t0 + 300_000_000;
        pipe.recover(due, &HashMap::from([(caller, done)]), &HashMap::new(), now);
        assert_eq!(pipe.stats.spans_recovered, 1);
        assert_eq!(pipe.capture.awaited_spans(), 0);
        let capture = &pipe.capture;
        let spans = pipe
            .assembler
            .ready(&pipe.clock, now + settle, |t| capture.awaits_span(t));
        assert_eq!(spans.len(), 2, "{spans:?}");
        let of = |k| spans.iter().find(|s| s.kind == k).expect("both kinds");
        let (client, server) = (
            of(crate::spans::SpanKind::Client),
            of(crate::spans::SpanKind::Server),
        );
        assert_eq!(server.parent_span_id, Some(client.span_id));
    }

    /// A reader's first packet on a connection, tagged by its process's
    /// stale trace but filed under the connection's own entry (request 1)
    /// when it reached the agent, stays request 1's when the head of
    /// request 2 keys the reader: it is no handshake of request 2's.
    #[test]
    fn a_readers_packet_filed_under_its_connections_request_stays_there() {
        let table = Mutex::new(MemoryTables::in_memory(16, Duration::from_secs(30)));
        let mut pipe = Pipeline::new(&AgentConfig::default());
        let reader = |_: &FlowKey| {
            Ok(Reader {
                key: TraceKey::new(22, 2),
                late: false,
            })
        };
        let send = |pipe: &mut Pipeline, id: &str| {
            let text = format!("GET / HTTP/1.1\r\nX-Request-Id: {id}\r\n\r\n");
            let Event::HttpHead(mut h) = head(40003, &text) else {
                unreachable!()
            };
            (h.key.remote_port, h.pid) = (8000, 11);
            let key = h.key;
            pipe.event(Event::HttpHead(h), &table, reader);
            key
        };
        let id = |r: &str| crate::ids::map_request_id(r).unwrap().0;
        let conn = send(&mut pipe, "req-1");
        let served = conn.reversed_in(2);
        let mut ack = answer(served, [5; 16], 1, 100, 100);
        ack.stats.matched = agent_common::MATCH_PID;
        ack.stats.tcp_flags = 0x10;
        pipe.event(Event::FlowNew(ack), &table, reader);
        send(&mut pipe, "req-2");
        let spans = pipe.drain_all();
        let server: Vec<_> = spans
            .iter()
            .filter(|s| s.kind == crate::spans::SpanKind::Server)
            .collect();
        assert_eq!(server.len(), 1, "{spans:?}");
        assert_eq!(server[0].trace_id, id("req-1"));
    }

    /// The agent ran behind: a new connection opened under the trace its
    /// process carried then (req-1), and by the time its own head (req-3)
    /// came, the process had been keyed for req-2 on another connection.
    /// The span still moves to req-3.
    #[test]
    fn a_senders_connection_opened_several_requests_back_joins_its_request() {
        let table = Mutex::new(MemoryTables::in_memory(16, Duration::from_secs(30)));
        let mut pipe = Pipeline::new(&AgentConfig::default());
        let send = |pipe: &mut Pipeline, port: u16, id: &str| {
            pipe.event(sent(port, id, 22), &table, not_local);
        };
        let id = |r: &str| crate::ids::map_request_id(r).unwrap().0;
        send(&mut pipe, 1, "req-1");
        let conn = FlowKey {
            netns: 7,
            local_port: 3,
            ..Default::default()
        };
        let mut early = flow(conn, 0, 3, 100, 110);
        early.stats.trace_id = id("req-1");
        early.stats.matched = agent_common::MATCH_PID;
        early.stats.tcp_flags = 0x1a;
        pipe.event(Event::FlowNew(early), &table, not_local);
        send(&mut pipe, 2, "req-2");
        assert_eq!(pipe.stats.reattributed_flows, 0, "not req-2's connection");
        send(&mut pipe, 3, "req-3");
        assert_eq!(pipe.stats.reattributed_flows, 1);
        assert!(!pipe.capture.awaits_span(&id("req-3")), "its span is open");
        pipe.event(Event::FlowEnd(early), &table, not_local);
        let mut rest = flow(conn, 0, 2, 120, 130);
        rest.stats.trace_id = id("req-3");
        pipe.event(Event::FlowNew(rest), &table, not_local);
        pipe.event(Event::FlowEnd(rest), &table, not_local);
        let spans = pipe.drain_all();
        let on_conn = on_port(&spans, 3);
        assert_eq!(on_conn.len(), 1, "one connection, one span: {on_conn:?}");
        assert_eq!(on_conn[0].trace_id, id("req-3"));
        assert_eq!(
            on_conn[0].attr("tagflow.packets"),
            Some(crate::spans::Value::Int(5))
        );
    }

    /// Both ends of a connection already carried the request's trace when
    /// its head came (the sender's process and the reader's were keyed
    /// for it by an earlier connection): no FLOW_NEW comes for either
    /// span, so the head's details go to both at once, and nothing is
    /// left cached to age out as unclaimed.
    #[test]
    fn a_head_whose_spans_are_open_gives_both_its_details_and_keeps_no_copy() {
        let table = Mutex::new(MemoryTables::in_memory(16, Duration::from_secs(30)));
        let mut pipe = Pipeline::new(&AgentConfig::default());
        let want = crate::ids::map_request_id("req-o").unwrap().0;
        let conn = FlowKey::new(
            7,
            agent_common::PROTO_TCP,
            ([10, 0, 0, 7], 40000).into(),
            ([10, 0, 0, 2], 8000).into(),
        );
        let server_end = conn.reversed_in(2);
        let mut call = flow(conn, 0, 3, 100, 110);
        call.stats.trace_id = want;
        call.stats.matched = agent_common::MATCH_PID;
        pipe.event(Event::FlowNew(call), &table, not_local);
        let mut reply = flow(server_end, 0, 2, 105, 115);
        reply.stats.trace_id = want;
        reply.stats.owner = agent_common::OWNER_BOUND;
        pipe.event(Event::FlowNew(reply), &table, not_local);
        let Event::HttpHead(mut h) = sent(0, "req-o", 21) else {
            unreachable!()
        };
        h.key = conn;
        h.ts_ns = 120;
        let reader = TraceKey::new(22, 2);
        pipe.event(Event::HttpHead(h), &table, |_| {
            Ok(Reader {
                key: reader,
                late: false,
            })
        });
        assert_eq!(pipe.capture.cached(), 0, "no copy kept for open spans");
        assert!(!pipe.capture.awaits_span(&want));
        call.stats.tcp_flags = 0x19;
        reply.stats.tcp_flags = 0x19;
        pipe.event(Event::FlowEnd(call), &table, not_local);
        pipe.event(Event::FlowEnd(reply), &table, not_local);
        let spans = pipe.drain_all();
        assert_eq!(spans.len(), 2, "{spans:?}");
        for s in &spans {
            assert_eq!(s.trace_id, want);
            assert_eq!(
                s.attr("http.request.method"),
                Some(crate::spans::Value::Str("GET".into())),
                "{s:?}"
            );
        }
        // A later head ages the cache out: nothing was left unclaimed.
        let Event::HttpHead(mut h) = sent(1, "req-l", 23) else {
            unreachable!()
        };
        h.ts_ns = 120 + 4_000_000_000;
        pipe.event(Event::HttpHead(h), &table, not_local);
        assert_eq!((pipe.capture.unclaimed, pipe.capture.cached()), (0, 1));
    }

    #[test]
    fn a_senders_connection_tagged_under_its_previous_trace_joins_its_request() {
        let table = Mutex::new(MemoryTables::in_memory(16, Duration::from_secs(30)));
        let mut pipe = Pipeline::new(&AgentConfig::default());
        let send = |pipe: &mut Pipeline, port: u16, id: &str| {
            pipe.event(sent(port, id, 22), &table, not_local);
        };
        send(&mut pipe, 1, "req-1");
        let (first, second) = (
            crate::ids::map_request_id("req-1").unwrap().0,
            crate::ids::map_request_id("req-2").unwrap().0,
        );
        // A new connection of the same process, tagged by its process's key
        // (still req-1) before the agent handled its own head.
        let conn = FlowKey {
            netns: 7,
            local_port: 2,
            ..Default::default()
        };
        let mut early = flow(conn, 0, 3, 100, 110);
        early.stats.trace_id = first;
        early.stats.matched = agent_common::MATCH_PID;
        early.stats.tcp_flags = 0x1a;
        pipe.event(Event::FlowNew(early), &table, not_local);
        send(&mut pipe, 2, "req-2");
        assert_eq!(pipe.stats.reattributed_flows, 1);
        // Its span was open when the head came: nothing waits on it (the
        // head of req-1 still does, its connection never sent again).
        assert!(!pipe.capture.awaits_span(&second));
        assert!(pipe.capture.awaits_span(&first));
        pipe.event(Event::FlowEnd(early), &table, not_local);
        let mut rest = flow(conn, 0, 2, 120, 130);
        rest.stats.trace_id = second;
        pipe.event(Event::FlowNew(rest), &table, not_local);
        pipe.event(Event::FlowEnd(rest), &table, not_local);
        let spans = pipe.drain_all();
        let on_conn = on_port(&spans, 2);
        assert_eq!(on_conn.len(), 1, "one connection, one span: {on_conn:?}");
        assert_eq!(on_conn[0].trace_id, second);
    }
}
