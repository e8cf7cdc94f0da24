//! Span assembly: one span per (flow, trace) pair.
//!
//! A pair opens with the datapath's FLOW_NEW event and closes with FLOW_END
//! (the connection moved on to the next request's trace: request boundary),
//! a FIN/RST seen in FLOW_STATS, or no packet for `idle` (2 s). Closed spans
//! wait, per trace, until the trace is quiet (`settle`), then are linked:
//! - a SERVER span's parent is the CLIENT span on the reverse flow (the pod
//!   that called it, when that pod is on this node and traced);
//! - a CLIENT span's parent is the SERVER span of its own pod that was
//!   serving when the call started;
//! - anything else hangs off the remote parent from `traceparent`.
//!
//! Memory is bounded: at most `max_open` open spans (the stalest is closed
//! early and counted), at most `max_held` closed spans waiting (beyond it the
//! busiest traces are released early, counted), and a trace is held at most
//! `max_hold`.
use std::{collections::HashMap, sync::Arc};

use agent_common::*;

mod attributes;
mod bounded;
mod hold;
mod link;

use super::{resource::Resources, Resource, SpanKind};
use crate::{ids, sources::capture::HeadInfo, trim::Trim};
use bounded::Bounded;
use link::Closed;

#[derive(Debug, Clone)]
pub struct AssemblerConfig {
    pub idle_ns: u64,
    pub settle_ns: u64,
    pub max_hold_ns: u64,
    pub max_open: usize,
    pub max_held: usize,
}

impl Default for AssemblerConfig {
    fn default() -> Self {
        Self {
            idle_ns: 2_000_000_000,
            settle_ns: 200_000_000,
            max_hold_ns: 30_000_000_000,
            max_open: 65536,
            max_held: 65536,
        }
    }
}

#[derive(Debug, Default, Clone)]
pub struct AssemblerStats {
    pub opened: u64,
    pub closed_end: u64,
    pub closed_fin: u64,
    pub closed_idle: u64,
    /// Closed early because `max_open` was reached.
    pub evicted: u64,
    /// Closed spans released before their trace went quiet because
    /// `max_held` was reached (their links may be partial).
    pub released_early: u64,
    pub emitted: u64,
    /// Calls (CLIENT spans) whose trace came from their own connection's
    /// entry, and from their process's.
    pub calls_by_flow: u64,
    pub calls_by_process: u64,
    pub calls_by_thread: u64,
    /// Response statuses forgotten before a span of their request opened
    /// on their side (`MAX_WAITING_REPLIES` wait).
    pub replies_unmatched: u64,
}

impl AssemblerStats {
    /// As metrics: (name, help, value).
    pub fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        vec![
            (
                "linking_calls_by_flow_total",
                "Calls (client spans) that carried the trace of their own connection's entry.",
                self.calls_by_flow,
            ),
            (
                "linking_calls_by_process_total",
                "Calls (client spans) that carried the trace of their process's entry (shared by everything the process serves at once).",
                self.calls_by_process,
            ),
            (
                "linking_calls_by_thread_total",
                "Calls (client spans) that carried the trace of the connection their thread read last (the request it was serving).",
                self.calls_by_thread,
            ),
            ("spans_opened_total", "Spans started.", self.opened),
            (
                "spans_closed_end_total",
                "Spans finished by a request boundary.",
                self.closed_end,
            ),
            (
                "spans_closed_fin_total",
                "Spans finished by FIN/RST.",
                self.closed_fin,
            ),
            (
                "spans_closed_idle_total",
                "Spans finished by the idle timeout.",
                self.closed_idle,
            ),
            (
                "spans_evicted_total",
                "Spans finished early: open-span limit reached.",
                self.evicted,
            ),
            (
                "spans_released_early_total",
                "Spans sent before their trace went quiet: held-span limit reached (links may be partial).",
                self.released_early,
            ),
            ("spans_created_total", "Spans handed to export.", self.emitted),
            (
                "spans_replies_unmatched_total",
                "Response statuses (HTTP/2) forgotten before a span of their request opened on their side.",
                self.replies_unmatched,
            ),
        ]
    }
}

/// What a response said (HTTP/2 response headers and trailers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reply {
    /// `:status`.
    pub status: Option<u16>,
    /// `grpc-status`.
    pub grpc_status: Option<u32>,
    /// When the latest block passed the datapath (monotonic ns).
    pub last_ns: u64,
}

impl Reply {
    /// A later block (trailers) adds to what an earlier one said.
    fn add(&mut self, later: Reply) {
        self.status = later.status.or(self.status);
        self.grpc_status = later.grpc_status.or(self.grpc_status);
        self.last_ns = self.last_ns.max(later.last_ns);
    }
}

/// Statuses waiting for a span of their request to open.
const MAX_WAITING_REPLIES: usize = 4096;

struct Open {
    span_id: [u8; 8],
    trace_flags: u32,
    /// The current part of the connection under this trace.
    stats: FlowStats,
    /// Packets the connection sent before, under the trace it was
    /// re-attributed from (see `Assembler::continue_as`).
    earlier: Option<FlowStats>,
    /// The caller's span from this request's own `traceparent`.
    remote_parent: Option<[u8; 8]>,
    /// Boxed: most open spans have none, and the table is sized by its
    /// busiest moment.
    head: Option<Box<HeadInfo>>,
    /// The response's status, as far as it was seen.
    reply: Reply,
    /// The connection as its callee sees it, when the host translated it
    /// (a call through a Service address).
    via: Option<FlowKey>,
    resource: Arc<Resource>,
}

impl Open {
    /// Takes newer numbers of the pair. A datapath entry started by a
    /// packet without a socket (the last ACK, sent from TIME_WAIT after
    /// the app closed, once the pair's trace switched) names no owner: the
    /// span stays the process's it was.
    fn update(&mut self, s: FlowStats) {
        let (pid, owner) = (self.stats.pid, self.stats.owner);
        self.stats = s;
        if s.owner == OWNER_NONE {
            self.stats.owner = owner;
            if s.pid == 0 {
                self.stats.pid = pid;
            }
        }
    }

    /// The span's numbers: the earlier part, if any, and the current one.
    fn totals(&self) -> FlowStats {
        let Some(e) = &self.earlier else {
            return self.stats;
        };
        let s = &self.stats;
        FlowStats {
            packets: e.packets + s.packets,
            bytes: e.bytes + s.bytes,
            first_ns: e.first_ns.min(s.first_ns),
            last_ns: e.last_ns.max(s.last_ns),
            tcp_flags: e.tcp_flags | s.tcp_flags,
            ..*s
        }
    }
}

#[derive(Default)]
struct Group {
    open: usize,
    closed: Vec<Closed>,
    first: u64,
    last_change: u64,
}

pub struct Assembler {
    cfg: AssemblerConfig,
    open: HashMap<(FlowKey, [u8; 16]), Open>,
    groups: HashMap<[u8; 16], Group>,
    /// Closed spans across all groups.
    held: usize,
    resources: Resources,
    ifnames: HashMap<u32, String>,
    /// Server spans whose request came from another node: the span id of
    /// the call there, by (the server's end, trace). Bounded.
    callers: Bounded<(FlowKey, [u8; 16]), [u8; 8]>,
    /// Call span ids computed from (trace, connection) lately: a second
    /// span of the same pair gets a random id instead of a duplicate.
    issued: Bounded<[u8; 8], ()>,
    /// Statuses that came before a span of their request opened on that
    /// side (a request's own packets left before its head was read).
    replies: Bounded<(FlowKey, [u8; 16]), Reply>,
    pub stats: AssemblerStats,
}

/// Which end of a connection `Assembler::retrace` looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Sender,
    Reader,
}

enum Why {
    End,
    Fin,
    Idle,
    Evicted,
}

impl Assembler {
    pub fn new(cfg: AssemblerConfig, resources: Resources) -> Self {
        Self {
            cfg: cfg.clone(),
            open: HashMap::new(),
            groups: HashMap::new(),
            held: 0,
            resources,
            ifnames: HashMap::new(),
            callers: Bounded::new(cfg.max_open),
            issued: Bounded::new(cfg.max_open),
            replies: Bounded::new(MAX_WAITING_REPLIES),
            stats: AssemblerStats::default(),
        }
    }

    /// Gives back table memory a burst of flows left unused.
    pub fn trim(&mut self) {
        self.open.trim();
        self.groups.trim();
        self.callers.trim();
        self.issued.trim();
        self.replies.trim();
    }

    pub fn open_spans(&self) -> usize {
        self.open.len()
    }

    /// Whether the pair has an open span.
    pub fn is_open(&self, key: &FlowKey, trace: &[u8; 16]) -> bool {
        self.open.contains_key(&(*key, *trace))
    }

    /// Flows with an open span (what a sweep must read from FLOW_STATS).
    pub fn open_keys(&self) -> Vec<FlowKey> {
        self.open.keys().map(|k| k.0).collect()
    }

    /// FLOW_NEW: a (flow, trace) pair's first packet.
    pub fn flow_new(&mut self, ev: &FlowEvent, head: Option<Box<HeadInfo>>, now: u64) {
        let k = (ev.key, ev.stats.trace_id);
        if let Some(o) = self.open.get_mut(&k) {
            o.update(ev.stats);
            if let Some(h) = head {
                o.via = o.via.or(h.via);
                o.head = Some(h);
            }
            return;
        }
        if self.open.len() >= self.cfg.max_open {
            let stalest = self
                .open
                .iter()
                .min_by_key(|(_, o)| o.stats.last_ns)
                .map(|(k, _)| *k);
            if let Some(s) = stalest {
                self.close(s, Why::Evicted, now);
            }
        }
        let mut span_id = ids::random::<8>();
        span_id[0] |= 1;
        let remote_parent =
            (ev.trace_flags & TRACE_FLAG_HAS_PARENT != 0).then_some(ev.parent_span_id);
        self.open.insert(
            k,
            Open {
                span_id,
                trace_flags: ev.trace_flags,
                stats: ev.stats,
                earlier: None,
                remote_parent,
                via: head.as_ref().and_then(|h| h.via),
                head,
                reply: self.replies.remove(&k).unwrap_or_default(),
                resource: self.resources.for_pid(ev.stats.pid),
            },
        );
        let g = self.groups.entry(k.1).or_default();
        if g.open == 0 && g.closed.is_empty() {
            g.first = now;
        }
        g.open += 1;
        g.last_change = now;
        self.stats.opened += 1;
    }

    /// FLOW_END: the pair's final numbers.
    pub fn flow_end(&mut self, ev: &FlowEvent, now: u64) {
        let k = (ev.key, ev.stats.trace_id);
        if let Some(o) = self.open.get_mut(&k) {
            o.update(ev.stats);
            self.close(k, Why::End, now);
        }
    }

    /// A new datapath entry for a pair the agent filed first from a "no
    /// trace" entry (a call that beat the agent, see the pipeline): what
    /// that entry counted stays, the new one adds to it.
    pub fn continue_from_untraced(&mut self, ev: &FlowEvent, now: u64) {
        match self.open.get_mut(&(ev.key, ev.stats.trace_id)) {
            Some(o) => {
                o.earlier = Some(o.totals());
                o.update(ev.stats);
            }
            None => self.flow_new(ev, None, now),
        }
    }

    /// FLOW_END of a connection whose packets so far belong to the trace of
    /// `ev` (re-attributed: the datapath had tagged them with an older
    /// trace): the span stays open, and the packets that follow under the
    /// right trace continue it.
    pub fn continue_as(&mut self, ev: &FlowEvent) {
        let Some(o) = self.open.get_mut(&(ev.key, ev.stats.trace_id)) else {
            return;
        };
        o.update(ev.stats);
        o.earlier = Some(o.totals());
        o.stats = FlowStats {
            packets: 0,
            bytes: 0,
            tcp_flags: 0,
            first_ns: ev.stats.last_ns,
            ..ev.stats
        };
    }

    /// One end of a connection whose request head just arrived, open under
    /// `from`: the trace its process carried before the agent keyed it for
    /// this request. Only what cannot belong to an earlier request moves to
    /// `ctx`. The reader's end (`End::Reader`): a handshake (the server
    /// cannot have answered a request it had not been sent), not a span
    /// that carried data (PSH). The sender's end (`End::Sender`): a span
    /// that carried no other identified request (the head itself is data).
    /// Neither if it ended (FIN, RST) or was tagged by its own connection's
    /// entry. Returns whether it moved; the datapath's switch then continues
    /// it (`continue_as`).
    pub fn retrace(
        &mut self,
        key: &FlowKey,
        from: &[u8; 16],
        ctx: &TraceContext,
        end: End,
        now: u64,
    ) -> bool {
        let movable = |o: &Open| {
            let flags = o.totals().tcp_flags;
            o.stats.matched == MATCH_PID
                && o.earlier.is_none()
                && flags & (TCP_FIN | TCP_RST) == 0
                && match end {
                    End::Reader => flags & TCP_PSH == 0,
                    End::Sender => o.head.is_none(),
                }
        };
        if !self.open.get(&(*key, *from)).is_some_and(movable)
            || self.open.contains_key(&(*key, ctx.trace_id))
        {
            return false;
        }
        let Some(mut o) = self.open.remove(&(*key, *from)) else {
            return false;
        };
        o.trace_flags = ctx.flags;
        o.remote_parent = (ctx.flags & TRACE_FLAG_HAS_PARENT != 0).then_some(ctx.parent_span_id);
        o.stats.trace_id = ctx.trace_id;
        self.open.insert((*key, ctx.trace_id), o);
        if let Some(g) = self.groups.get_mut(from) {
            g.open = g.open.saturating_sub(1);
            g.last_change = now;
        }
        let g = self.groups.entry(ctx.trace_id).or_default();
        if g.open == 0 && g.closed.is_empty() {
            g.first = now;
        }
        g.open += 1;
        g.last_change = now;
        true
    }

    /// A request whose (connection, trace) pair can no longer carry a
    /// packet: its connection went on to a later request before the agent
    /// keyed it, and its packets were counted under another request. It
    /// becomes a span of its own from its head, `f` saying where (no packet
    /// numbers): from the head to the last response block seen (HTTP/2), or
    /// the head alone. Returns false if the pair has a span after all: open
    /// (it takes the head) or closed and held.
    pub fn from_head(&mut self, f: &FlowEvent, head: Box<HeadInfo>, now: u64) -> bool {
        let k = (f.key, f.stats.trace_id);
        if self.open.contains_key(&k) {
            self.head(&f.key, head);
            return false;
        }
        // A span of the pair that closed before its head was read (and is
        // still held) is the request's span: no second one.
        if self
            .groups
            .get(&k.1)
            .is_some_and(|g| g.closed.iter().any(|c| c.key == k.0))
        {
            return false;
        }
        self.flow_new(f, Some(head), now);
        if let Some(o) = self.open.get_mut(&k) {
            o.stats.last_ns = o.stats.last_ns.max(o.reply.last_ns);
        }
        self.close(k, Why::End, now);
        true
    }

    /// The server end `conn` of a request that came from another node
    /// serves a call whose span id there is `caller`: its parent, unless
    /// the request named one itself (`traceparent`).
    pub fn expect_caller(&mut self, conn: FlowKey, trace: [u8; 16], caller: [u8; 8]) {
        self.callers.insert((conn, trace), caller);
    }

    /// A request head seen after its span opened. Whether it was.
    pub fn head(&mut self, key: &FlowKey, info: Box<HeadInfo>) -> bool {
        let Some(o) = self.open.get_mut(&(*key, info.trace_id)) else {
            return false;
        };
        o.via = o.via.or(info.via);
        o.head = Some(info);
        true
    }

    /// The response to the request of `trace` said this, on the
    /// connection its client side keys as `client` and its server side as
    /// `server`: both spans carry it. A later block (trailers) adds to what
    /// an earlier one said.
    /// A side whose span closed without it and waits for its trace gets
    /// it too; one with no such span gets it when its span opens (or is
    /// renamed to this pair, and closes).
    pub fn reply(&mut self, client: &FlowKey, server: &FlowKey, trace: &[u8; 16], reply: Reply) {
        for key in [*client, *server] {
            let k = (key, *trace);
            if let Some(o) = self.open.get_mut(&k) {
                o.reply.add(reply);
            } else if let Some(c) = self.groups.get_mut(trace).and_then(|g| {
                g.closed
                    .iter_mut()
                    .rev()
                    .find(|c| c.key == key && c.lacks(&reply))
            }) {
                c.late_reply(reply);
            } else if let Some(r) = self.replies.get_mut(&k) {
                r.add(reply);
            } else {
                self.stats.replies_unmatched += self.replies.insert(k, reply) as u64;
            }
        }
    }

    /// Whether the response to `trace`'s request was seen whole on `key`
    /// (gRPC's status: its trailers, or a trailers-only answer) while no
    /// span of it was open there.
    pub fn answered(&self, key: &FlowKey, trace: &[u8; 16]) -> bool {
        self.replies
            .get(&(*key, *trace))
            .is_some_and(|r| r.grpc_status.is_some())
    }

    /// The open span of (`key`, `trace`) went through a Service: `via` is
    /// its connection as the callee sees it.
    pub fn translated(&mut self, key: &FlowKey, trace: &[u8; 16], via: FlowKey) {
        if let Some(o) = self.open.get_mut(&(*key, *trace)) {
            o.via = Some(via);
        }
    }

    /// Refreshes open spans from a FLOW_STATS snapshot and closes those that
    /// saw FIN/RST or went idle.
    /// Returns the pairs closed by FIN/RST: their connections are over.
    pub fn sweep(
        &mut self,
        snapshot: &HashMap<FlowKey, FlowStats>,
        now: u64,
    ) -> Vec<(FlowKey, [u8; 16])> {
        let mut done = Vec::new();
        for (k, o) in self.open.iter_mut() {
            // Read before the last events were handled: numbers older
            // than the ones an event brought are left alone.
            if let Some(s) = snapshot.get(&k.0) {
                if s.trace_id == k.1 && s.last_ns >= o.stats.last_ns {
                    o.update(*s);
                }
            }
            let t = o.totals();
            if t.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
                done.push((*k, Why::Fin));
            } else if now.saturating_sub(t.last_ns) >= self.cfg.idle_ns {
                done.push((*k, Why::Idle));
            }
        }
        let mut finished = Vec::new();
        for (k, why) in done {
            if matches!(why, Why::Fin) {
                finished.push(k);
            }
            self.close(k, why, now);
        }
        finished
    }

    fn close(&mut self, k: (FlowKey, [u8; 16]), why: Why, now: u64) {
        let Some(mut o) = self.open.remove(&k) else {
            return;
        };
        // A status that waited for this pair while its span was open under
        // another name (re-attributed, continued).
        if let Some(r) = self.replies.remove(&k) {
            o.reply.add(r);
        }
        match why {
            Why::End => self.stats.closed_end += 1,
            Why::Fin => self.stats.closed_fin += 1,
            Why::Idle => self.stats.closed_idle += 1,
            Why::Evicted => self.stats.evicted += 1,
        }
        let (mut record, answer) = self.build(&k.0, k.1, &o, matches!(why, Why::Evicted));
        if record.kind == SpanKind::Client {
            match o.stats.matched {
                MATCH_PID => self.stats.calls_by_process += 1,
                MATCH_THREAD => self.stats.calls_by_thread += 1,
                _ => self.stats.calls_by_flow += 1,
            }
        }
        if let (SpanKind::Client, Some(h)) = (record.kind, &o.head) {
            // A call: an id the callee's node can compute too.
            let id = ids::call_span_id(&k.1, &o.via.or(h.via).unwrap_or(k.0));
            if !self.issued.contains_key(&id) {
                self.issued.insert(id, ());
                record.span_id = id;
            }
        }
        let remote_parent = o
            .remote_parent
            .or_else(|| self.callers.remove(&(k.0, k.1)))
            // A traceparent minted for this very call (our sidecar names
            // the call's computed id) is no parent of it.
            .filter(|p| *p != record.span_id);
        let t = o.totals();
        // The captured head's own packet went out before the flow was
        // tagged: the request starts there.
        let start = match &o.head {
            Some(h) if h.ts_ns != 0 => t.first_ns.min(h.ts_ns),
            _ => t.first_ns,
        };
        let g = self.groups.entry(k.1).or_default();
        g.open = g.open.saturating_sub(1);
        g.last_change = now;
        // Most traces close a few spans here: room for exactly those (the
        // first push alone would reserve four of ~250 bytes each).
        if g.closed.len() == g.closed.capacity() && g.closed.len() < 4 {
            g.closed.reserve_exact(1);
        }
        g.closed.push(Closed {
            key: k.0,
            via: o.via,
            remote_parent,
            pid: o.stats.pid,
            start,
            end: t.last_ns.max(start),
            record,
            answer,
        });
        self.held += 1;
    }
}

const TCP_FIN: u8 = 0x01;
const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        clock::WallClock,
        sources::capture::Protocol,
        spans::{SpanKind, Value},
    };

    const T1: [u8; 16] = [1; 16];
    const T2: [u8; 16] = [2; 16];

    pub(super) fn key(
        netns: u64,
        local: [u8; 4],
        lport: u16,
        remote: [u8; 4],
        rport: u16,
    ) -> FlowKey {
        FlowKey::new(
            netns,
            PROTO_TCP,
            (local, lport).into(),
            (remote, rport).into(),
        )
    }

    fn ev(
        k: FlowKey,
        trace: [u8; 16],
        owner: u8,
        first: u64,
        last: u64,
        packets: u64,
    ) -> FlowEvent {
        FlowEvent {
            key: k,
            stats: FlowStats {
                trace_id: trace,
                pid: 0,
                packets,
                bytes: packets * 100,
                first_ns: first,
                last_ns: last,
                owner,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// A request's details as capture hands them over (HTTP/1.1 unless
    /// `protocol` says otherwise; the fields a test does not name empty).
    fn head(method: &str, target: &str, host: &str, protocol: Protocol) -> Box<HeadInfo> {
        Box::new(HeadInfo {
            method: method.into(),
            target: target.into(),
            host: Some(host.into()),
            protocol,
            request_id: None,
            trace_id: T1,
            parent_span_id: None,
            sampled: true,
            pid: 0,
            ts_ns: 0,
            via: None,
            reader_end: None,
            sender_previous: None,
        })
    }

    fn asm(idle_ns: u64) -> Assembler {
        Assembler::new(
            AssemblerConfig {
                idle_ns,
                settle_ns: 10,
                max_hold_ns: 1_000_000,
                max_open: 100,
                max_held: 100,
            },
            Resources::new(None),
        )
    }

    const CLOCK: fn() -> WallClock = || WallClock::with_offset(1_000_000_000);

    #[test]
    fn a_span_without_a_local_parent_hangs_off_its_own_requests_caller() {
        let mut a = asm(1_000_000);
        // Two requests of one trace reach two pods, each from its own
        // caller span (two traceparents): neither is the other's parent.
        let from_caller = |k: FlowKey, parent: u8, t: u64| {
            let mut e = ev(k, T1, OWNER_BOUND, t, t + 100, 2);
            e.trace_flags = TRACE_FLAG_HAS_PARENT;
            e.parent_span_id = [parent; 8];
            e
        };
        let k1 = key(7, [10, 0, 0, 1], 80, [10, 9, 0, 1], 41000);
        let k2 = key(8, [10, 0, 0, 2], 80, [10, 9, 0, 1], 42000);
        a.flow_new(&from_caller(k1, 0xa1, 100), None, 100);
        a.flow_end(&from_caller(k1, 0xa1, 100), 200);
        a.flow_new(&from_caller(k2, 0xb2, 300), None, 300);
        a.flow_end(&from_caller(k2, 0xb2, 300), 400);
        let spans = a.ready(&CLOCK(), 1_000, |_| false);
        let parent = |k: FlowKey| {
            let want = k.local_port;
            let s = spans
                .iter()
                .find(|s| {
                    s.attr("network.local.address")
                        == Some(Value::Str(k.local_ip().to_string().into()))
                        && s.attr("network.local.port") == Some(Value::Int(want as i64))
                })
                .unwrap();
            (s.parent_span_id, s.parent_is_remote)
        };
        assert_eq!(parent(k1), (Some([0xa1; 8]), true));
        assert_eq!(
            parent(k2),
            (Some([0xb2; 8]), true),
            "not the first request's caller"
        );
    }

    #[test]
    fn an_in_pod_proxy_and_its_app_each_parent_their_own_calls() {
        let mut a = asm(1_000_000);
        let lo = [127, 0, 0, 1];
        let by = |k: FlowKey, owner: u8, pid: u32, t: u64| {
            let mut e = ev(k, T1, owner, t, t + 1_000, 2);
            e.stats.pid = pid;
            e
        };
        let (proxy, app) = (10, 20);
        let spans = [
            // Client → proxy (veth), proxy → app (lo, both ends), app → downstream.
            by(
                key(5, [10, 0, 0, 2], 15080, [10, 0, 0, 1], 41000),
                OWNER_BOUND,
                proxy,
                100,
            ),
            by(key(5, lo, 42000, lo, 8080), OWNER_CONNECTED, proxy, 200),
            by(key(5, lo, 8080, lo, 42000), OWNER_BOUND, app, 300),
            by(
                key(5, [10, 0, 0, 2], 50000, [10, 0, 0, 3], 9000),
                OWNER_CONNECTED,
                app,
                400,
            ),
        ];
        for e in &spans {
            a.flow_new(e, None, 500);
            a.flow_end(e, 600);
        }
        let out = a.ready(&CLOCK(), 10_000, |_| false);
        let find = |port: u16| {
            out.iter()
                .find(|s| s.attr("network.local.port") == Some(Value::Int(port as i64)))
                .unwrap()
        };
        let (front, to_app, in_app, call) = (find(15080), find(42000), find(8080), find(50000));
        assert_eq!(
            to_app.parent_span_id,
            Some(front.span_id),
            "the proxy's own call"
        );
        assert_eq!(
            in_app.parent_span_id,
            Some(to_app.span_id),
            "reverse flow on lo"
        );
        assert_eq!(
            call.parent_span_id,
            Some(in_app.span_id),
            "the app's call, not the proxy's"
        );
    }

    #[test]
    fn keep_alive_request_boundaries_make_one_span_each() {
        let mut a = asm(1_000_000);
        let k = key(7, [10, 0, 0, 1], 40000, [10, 0, 0, 2], 80);
        a.flow_new(&ev(k, T1, OWNER_CONNECTED, 100, 100, 1), None, 100);
        a.flow_end(&ev(k, T1, OWNER_CONNECTED, 100, 400, 5), 400);
        a.flow_new(&ev(k, T2, OWNER_CONNECTED, 500, 500, 1), None, 500);
        a.flow_end(&ev(k, T2, OWNER_CONNECTED, 500, 900, 3), 900);
        let spans = a.ready(&CLOCK(), 1_000, |_| false);
        assert_eq!(spans.len(), 2);
        let s1 = spans.iter().find(|s| s.trace_id == T1).unwrap();
        assert_eq!(
            (s1.start_unix_ns, s1.end_unix_ns),
            (1_000_000_100, 1_000_000_400)
        );
        assert_eq!(s1.attr("tagflow.packets"), Some(Value::Int(5)));
        assert_eq!(s1.kind, SpanKind::Client);
        assert_eq!(s1.name, "tcp 10.0.0.2:80");
        assert_ne!(
            s1.span_id,
            spans.iter().find(|s| s.trace_id == T2).unwrap().span_id
        );
        assert_eq!(a.stats.closed_end, 2);
    }

    #[test]
    fn idle_and_fin_close_spans_and_sweeps_refresh_counts() {
        let mut a = asm(1_000);
        let k1 = key(7, [10, 0, 0, 1], 40000, [10, 0, 0, 2], 80);
        let k2 = key(7, [10, 0, 0, 1], 40001, [10, 0, 0, 2], 80);
        a.flow_new(&ev(k1, T1, OWNER_CONNECTED, 100, 100, 1), None, 100);
        a.flow_new(&ev(k2, T2, OWNER_CONNECTED, 100, 100, 1), None, 100);
        let mut snap = HashMap::new();
        let mut s1 = ev(k1, T1, OWNER_CONNECTED, 100, 600, 9).stats;
        s1.tcp_flags = TCP_FIN | 0x10;
        snap.insert(k1, s1);
        snap.insert(k2, ev(k2, T2, OWNER_CONNECTED, 100, 600, 4).stats);
        a.sweep(&snap, 700);
        assert_eq!(
            (a.stats.closed_fin, a.open_spans()),
            (1, 1),
            "FIN closes at once"
        );
        a.sweep(&snap, 1_599);
        assert_eq!(a.open_spans(), 1, "999 ns idle: still open");
        a.sweep(&snap, 1_600);
        assert_eq!(
            (a.stats.closed_idle, a.open_spans()),
            (1, 0),
            "idle after 1000 ns"
        );
        let spans = a.ready(&CLOCK(), 2_000, |_| false);
        let s = spans.iter().find(|s| s.trace_id == T1).unwrap();
        assert_eq!(s.attr("tagflow.packets"), Some(Value::Int(9)));
        assert_eq!(
            s.attr("tagflow.tcp_flags"),
            Some(Value::Str("FIN,ACK".into()))
        );
    }

    #[test]
    fn spans_are_linked_across_pods_and_within_a_pod() {
        // Pod A (ns 1, 10.0.0.1) calls pod B (ns 2, 10.0.0.2:8080); while
        // serving, B calls C (10.0.0.3:9000). The request came with a
        // traceparent whose parent span is P.
        let p = [9u8; 8];
        let mut a = asm(1_000_000);
        let a_call = key(1, [10, 0, 0, 1], 40000, [10, 0, 0, 2], 8080);
        let b_serve = key(2, [10, 0, 0, 2], 8080, [10, 0, 0, 1], 40000);
        let b_call = key(2, [10, 0, 0, 2], 50000, [10, 0, 0, 3], 9000);
        let with_parent = |mut e: FlowEvent| {
            e.parent_span_id = p;
            e.trace_flags = TRACE_FLAG_HAS_PARENT;
            e
        };
        a.flow_new(
            &with_parent(ev(a_call, T1, OWNER_CONNECTED, 100, 100, 1)),
            None,
            100,
        );
        a.flow_new(
            &with_parent(ev(b_serve, T1, OWNER_BOUND, 110, 110, 1)),
            None,
            110,
        );
        a.flow_new(
            &with_parent(ev(b_call, T1, OWNER_CONNECTED, 120, 120, 1)),
            None,
            120,
        );
        a.flow_end(&ev(b_call, T1, OWNER_CONNECTED, 120, 200, 4), 200);
        // The trace is not complete yet: nothing is emitted.
        assert!(a.ready(&CLOCK(), 1_000, |_| false).is_empty());
        a.flow_end(&ev(b_serve, T1, OWNER_BOUND, 110, 250, 4), 250);
        a.flow_end(&ev(a_call, T1, OWNER_CONNECTED, 100, 260, 4), 260);
        let spans = a.ready(&CLOCK(), 1_000, |_| false);
        let by = |k: &FlowKey| {
            let want = k.remote_ip().to_string();
            spans
                .iter()
                .find(|s| {
                    s.attr("network.peer.address") == Some(Value::Str(want.clone().into()))
                        && s.attr("network.local.port") == Some(Value::Int(k.local_port as i64))
                })
                .unwrap()
        };
        let (sa, sb, sc) = (by(&a_call), by(&b_serve), by(&b_call));
        assert_eq!(
            (sa.parent_span_id, sa.parent_is_remote),
            (Some(p), true),
            "entry span hangs off traceparent"
        );
        assert_eq!(sb.kind, SpanKind::Server);
        assert_eq!(
            sb.parent_span_id,
            Some(sa.span_id),
            "server's parent is the caller's client span"
        );
        assert_eq!(
            sc.parent_span_id,
            Some(sb.span_id),
            "call made while serving"
        );
        assert!(!sb.parent_is_remote && !sc.parent_is_remote);
    }

    #[test]
    fn a_late_tagged_server_span_still_parents_the_calls_made_while_serving() {
        // The sidecar's response flow is tagged only after registration:
        // its packets come after the app's call to the backend.
        let mut a = asm(1_000_000);
        let serve = key(2, [10, 0, 0, 2], 15080, [10, 0, 0, 1], 40000);
        let call = key(2, [10, 0, 0, 2], 50000, [10, 0, 0, 3], 15080);
        const MS: u64 = 1_000_000;
        a.flow_new(
            &ev(call, T1, OWNER_CONNECTED, 100 * MS, 100 * MS, 1),
            None,
            100 * MS,
        );
        a.flow_end(
            &ev(call, T1, OWNER_CONNECTED, 100 * MS, 300 * MS, 5),
            300 * MS,
        );
        a.flow_new(
            &ev(serve, T1, OWNER_BOUND, 350 * MS, 350 * MS, 1),
            None,
            350 * MS,
        );
        a.flow_end(&ev(serve, T1, OWNER_BOUND, 350 * MS, 400 * MS, 2), 400 * MS);
        let spans = a.ready(&CLOCK(), 10_000 * MS, |_| false);
        let s = spans.iter().find(|s| s.kind == SpanKind::Server).unwrap();
        let c = spans.iter().find(|s| s.kind == SpanKind::Client).unwrap();
        assert_eq!(c.parent_span_id, Some(s.span_id));
        assert!(
            s.start_unix_ns <= c.start_unix_ns && s.end_unix_ns >= c.end_unix_ns,
            "parent covers child"
        );
    }

    #[test]
    fn sidecar_chain_forms_one_tree() {
        // client (ns 1) → frontend sidecar (ns 2) → frontend app calls
        // backend sidecar (ns 3), as in the demo, with the demo's timing:
        // only the app's call is tagged early.
        let mut a = asm(1_000_000);
        let c_call = key(1, [10, 0, 0, 1], 40000, [10, 0, 0, 2], 15080);
        let f_serve = key(2, [10, 0, 0, 2], 15080, [10, 0, 0, 1], 40000);
        let f_call = key(2, [10, 0, 0, 2], 50000, [10, 0, 0, 3], 15080);
        let b_serve = key(3, [10, 0, 0, 3], 15080, [10, 0, 0, 2], 50000);
        const MS: u64 = 1_000_000;
        a.flow_new(
            &ev(f_call, T1, OWNER_CONNECTED, 200 * MS, 200 * MS, 1),
            None,
            200 * MS,
        );
        a.flow_new(
            &ev(b_serve, T1, OWNER_BOUND, 700 * MS, 700 * MS, 1),
            None,
            700 * MS,
        );
        a.flow_new(
            &ev(f_serve, T1, OWNER_BOUND, 900 * MS, 900 * MS, 1),
            None,
            900 * MS,
        );
        a.flow_new(
            &ev(c_call, T1, OWNER_CONNECTED, 950 * MS, 950 * MS, 1),
            None,
            950 * MS,
        );
        a.flow_end(
            &ev(f_call, T1, OWNER_CONNECTED, 200 * MS, 800 * MS, 5),
            1000 * MS,
        );
        a.flow_end(
            &ev(b_serve, T1, OWNER_BOUND, 700 * MS, 750 * MS, 2),
            1000 * MS,
        );
        a.flow_end(
            &ev(f_serve, T1, OWNER_BOUND, 900 * MS, 960 * MS, 2),
            1000 * MS,
        );
        a.flow_end(
            &ev(c_call, T1, OWNER_CONNECTED, 950 * MS, 990 * MS, 2),
            1000 * MS,
        );
        let spans = a.ready(&CLOCK(), 10_000 * MS, |_| false);
        let by_port = |k: &FlowKey| {
            spans
                .iter()
                .find(|s| {
                    s.attr("network.local.port") == Some(Value::Int(k.local_port as i64))
                        && s.attr("network.peer.port") == Some(Value::Int(k.remote_port as i64))
                })
                .unwrap()
        };
        let (c, fs, fc, bs) = (
            by_port(&c_call),
            by_port(&f_serve),
            by_port(&f_call),
            by_port(&b_serve),
        );
        assert_eq!(fs.parent_span_id, Some(c.span_id));
        assert_eq!(
            fc.parent_span_id,
            Some(fs.span_id),
            "the app's call belongs to the request the sidecar served"
        );
        assert_eq!(bs.parent_span_id, Some(fc.span_id));
        assert_eq!(c.parent_span_id, None);
    }

    #[test]
    fn open_spans_are_bounded_and_evictions_counted() {
        let mut a = Assembler::new(
            AssemblerConfig {
                max_open: 3,
                ..AssemblerConfig::default()
            },
            Resources::new(None),
        );
        for i in 0..5u16 {
            let k = key(1, [10, 0, 0, 1], 40000 + i, [10, 0, 0, 2], 80);
            a.flow_new(
                &ev(
                    k,
                    [i as u8 + 1; 16],
                    OWNER_CONNECTED,
                    100 + i as u64,
                    100 + i as u64,
                    1,
                ),
                None,
                100,
            );
        }
        assert_eq!(a.open_spans(), 3);
        assert_eq!(a.stats.evicted, 2);
        let all = a.flush_all(&CLOCK(), 1_000);
        assert_eq!(all.len(), 5, "evicted spans are still emitted");
        assert_eq!(
            all.iter()
                .filter(|s| s.attr("tagflow.evicted").is_some())
                .count(),
            2
        );
    }

    #[test]
    fn held_spans_are_bounded_and_the_busiest_trace_is_released_first() {
        let mut a = Assembler::new(
            AssemblerConfig {
                max_held: 4,
                ..AssemblerConfig::default()
            },
            Resources::new(None),
        );
        // A busy trace (5 spans) that never goes quiet (one span stays
        // open) and a small one (1 span).
        let mut n = 0u16;
        let mut span = |a: &mut Assembler, trace: u8, close: bool| {
            n += 1;
            let k = key(1, [10, 0, 0, 1], 40000 + n, [10, 0, 0, 2], 80);
            let e = ev(k, [trace; 16], OWNER_CONNECTED, 100, 100, 1);
            a.flow_new(&e, None, 100);
            if close {
                a.flow_end(&e, 100);
            }
        };
        for _ in 0..5 {
            span(&mut a, 1, true);
        }
        span(&mut a, 1, false);
        span(&mut a, 2, true);
        span(&mut a, 2, false);
        assert_eq!(a.held_spans(), 6);
        // Before settle and max_hold: only the bound releases anything.
        let out = a.ready(&CLOCK(), 101, |_| false);
        assert_eq!(out.len(), 2, "just enough of the busy trace went out early");
        assert!(out.iter().all(|s| s.trace_id == [1; 16]));
        assert_eq!(a.stats.released_early, 2);
        assert_eq!(a.held_spans(), 4);
        assert!(
            a.ready(&CLOCK(), 102, |_| false).is_empty(),
            "at the bound again"
        );
        // The rest of both traces still goes out whole once they are quiet.
        let rest = a.flush_all(&CLOCK(), 1_000_000_000);
        assert_eq!(rest.len(), 6);
    }

    #[test]
    fn head_details_name_the_span() {
        let mut a = asm(1_000_000);
        let k = key(1, [10, 0, 0, 1], 40000, [10, 0, 0, 2], 80);
        let head = HeadInfo {
            request_id: Some("req-9".into()),
            ..*head("POST", "/orders?id=1", "shop:80", Protocol::Http1)
        };
        a.flow_new(&ev(k, T1, OWNER_CONNECTED, 100, 100, 1), None, 100);
        a.head(&k, Box::new(head));
        a.flow_end(&ev(k, T1, OWNER_CONNECTED, 100, 200, 2), 200);
        let s = &a.ready(&CLOCK(), 1_000, |_| false)[0];
        assert_eq!(s.name, "POST");
        assert_eq!(s.attr("url.path"), Some(Value::Str("/orders".into())));
        assert_eq!(s.attr("server.address"), Some(Value::Str("shop".into())));
        assert_eq!(
            s.attr("http.request.header.x-request-id"),
            Some(Value::StrArray(vec!["req-9".into()]))
        );
        assert_eq!(
            s.attr("tagflow.request_id"),
            Some(Value::Str("req-9".into()))
        );
    }

    #[test]
    fn a_call_through_a_service_parents_the_pods_server_span() {
        let mut a = asm(1_000_000);
        // The caller dialled 10.96.0.10:80; the host sent it to 10.0.0.3:9100
        // and masqueraded it as 10.0.0.254.
        let caller = key(1, [10, 0, 0, 1], 40000, [10, 96, 0, 10], 80);
        let via = key(1, [10, 0, 0, 254], 40000, [10, 0, 0, 3], 9100);
        let callee = via.reversed_in(3);
        let head = HeadInfo {
            via: Some(via),
            ..*head("GET", "/", "shop", Protocol::Http1)
        };
        a.flow_new(
            &ev(caller, T1, OWNER_CONNECTED, 100, 100, 1),
            Some(Box::new(head)),
            100,
        );
        a.flow_new(&ev(callee, T1, OWNER_BOUND, 110, 110, 1), None, 110);
        a.flow_end(&ev(callee, T1, OWNER_BOUND, 110, 150, 2), 150);
        a.flow_end(&ev(caller, T1, OWNER_CONNECTED, 100, 160, 3), 160);
        let out = a.ready(&CLOCK(), 1_000, |_| false);
        let client = out.iter().find(|s| s.kind == SpanKind::Client).unwrap();
        let server = out.iter().find(|s| s.kind == SpanKind::Server).unwrap();
        assert_eq!(server.parent_span_id, Some(client.span_id));
        assert_eq!(
            client.span_id,
            ids::call_span_id(&T1, &via),
            "a call's id is computable at the callee's node"
        );
        let str_attr = |s: &crate::spans::SpanRecord, k: &str| s.attr(k);
        assert_eq!(
            str_attr(client, "network.peer.address"),
            Some(Value::Str("10.0.0.3".into()))
        );
        assert_eq!(
            str_attr(client, "network.peer.port"),
            Some(Value::Int(9100))
        );
        assert_eq!(
            str_attr(client, "server.address"),
            Some(Value::Str("10.96.0.10".into()))
        );
        assert_eq!(str_attr(client, "server.port"), Some(Value::Int(80)));
    }

    #[test]
    fn spans_are_named_as_otel_says_and_grpc_calls_carry_rpc_attributes() {
        let mut a = asm(1_000_000);
        let caller = key(1, [10, 0, 0, 1], 40000, [10, 0, 0, 3], 50051);
        // The response's headers are read before the call's span opens
        // (its request left before its head was read); trailers after.
        let server = caller.reversed_in(2);
        let status = |status, grpc_status| Reply {
            status,
            grpc_status,
            last_ns: 0,
        };
        a.reply(&caller, &server, &T1, status(Some(200), None));
        a.flow_new(
            &ev(caller, T1, OWNER_CONNECTED, 100, 100, 1),
            Some(head(
                "POST",
                "/shop.Cart/Add",
                "[::1]:50051",
                Protocol::Grpc,
            )),
            100,
        );
        a.reply(&caller, &server, &T1, status(None, Some(5)));
        a.flow_end(&ev(caller, T1, OWNER_CONNECTED, 100, 160, 3), 160);
        let plain = key(1, [10, 0, 0, 1], 40001, [10, 0, 0, 4], 8080);
        a.flow_new(
            &ev(plain, T1, OWNER_CONNECTED, 100, 100, 1),
            Some(head("GET", "/a?b=c", "[::1]", Protocol::Http1)),
            100,
        );
        a.flow_end(&ev(plain, T1, OWNER_CONNECTED, 100, 160, 3), 160);
        let out = a.ready(&CLOCK(), 1_000, |_| false);
        let at = |s: &crate::spans::SpanRecord, k: &str| s.attr(k);
        let grpc = out.iter().find(|s| s.name == "shop.Cart/Add").unwrap();
        assert_eq!(at(grpc, "rpc.system"), Some(Value::Str("grpc".into())));
        assert_eq!(
            at(grpc, "rpc.service"),
            Some(Value::Str("shop.Cart".into()))
        );
        assert_eq!(at(grpc, "rpc.method"), Some(Value::Str("Add".into())));
        assert_eq!(
            at(grpc, "network.protocol.version"),
            Some(Value::Str("2".into()))
        );
        assert_eq!(at(grpc, "server.address"), Some(Value::Str("::1".into())));
        assert_eq!(at(grpc, "server.port"), Some(Value::Int(50051)));
        assert_eq!(at(grpc, "http.response.status_code"), Some(Value::Int(200)));
        assert_eq!(at(grpc, "rpc.grpc.status_code"), Some(Value::Int(5)));
        // NOT_FOUND fails the call for its client.
        assert!(grpc.error);
        let get = out.iter().find(|s| s.name == "GET").unwrap();
        assert_eq!(at(get, "url.path"), Some(Value::Str("/a".into())));
        assert_eq!(at(get, "server.address"), Some(Value::Str("::1".into())));
        // No port in the Host: the one dialled.
        assert_eq!(at(get, "server.port"), Some(Value::Int(8080)));
        assert_eq!(
            at(get, "network.protocol.version"),
            Some(Value::Str("1.1".into()))
        );
        assert_eq!(at(get, "rpc.system"), None);
        assert_eq!(at(get, "http.response.status_code"), None);
        // The server's side never opened: its status waits, bounded; what
        // the bound forgets is counted.
        assert_eq!(a.stats.replies_unmatched, 0);
        for i in 0..MAX_WAITING_REPLIES as u16 {
            let c = key(1, [10, 0, 0, 1], i, [10, 0, 0, 3], 50051);
            let r = c.reversed_in(2);
            a.reply(&c, &r, &T2, status(Some(200), Some(0)));
        }
        assert_eq!(a.stats.replies_unmatched, MAX_WAITING_REPLIES as u64 + 1);
    }

    /// On a slow node a response can be read before its request's span
    /// has its name (it opened under the process's previous trace, and is
    /// renamed when the head is read), or after the span closed: either
    /// way the span carries the status.
    #[test]
    fn a_status_read_late_or_early_reaches_its_span() {
        let mut a = asm(1_000_000);
        let status = |status, grpc_status, last_ns| Reply {
            status,
            grpc_status,
            last_ns,
        };
        let grpc = || head("POST", "/shop.Cart/Add", "[::1]:50051", Protocol::Grpc);
        // The caller's span opened under T2; the status of T1's request is
        // read before its head renames the span.
        let caller = key(1, [127, 0, 0, 1], 40000, [127, 0, 0, 1], 50051);
        let server = caller.reversed_in(1);
        let mut e = ev(caller, T2, OWNER_CONNECTED, 100, 100, 1);
        e.stats.matched = MATCH_PID;
        a.flow_new(&e, None, 100);
        a.reply(&caller, &server, &T1, status(Some(200), Some(0), 150));
        let ctx = TraceContext {
            trace_id: T1,
            ..Default::default()
        };
        assert!(a.retrace(&caller, &T2, &ctx, End::Sender, 120));
        assert!(a.head(&caller, grpc()));
        a.flow_end(&ev(caller, T1, OWNER_CONNECTED, 100, 160, 3), 160);
        // Another call's server span closed before its status was read;
        // trailers come later still.
        let caller2 = key(1, [127, 0, 0, 1], 40001, [127, 0, 0, 1], 50051);
        let server2 = caller2.reversed_in(1);
        a.flow_new(
            &ev(server2, T2, OWNER_BOUND, 110, 110, 1),
            Some(grpc()),
            110,
        );
        a.flow_end(&ev(server2, T2, OWNER_BOUND, 110, 140, 2), 140);
        a.reply(&caller2, &server2, &T2, status(Some(200), None, 170));
        a.reply(&caller2, &server2, &T2, status(None, Some(13), 180));
        // The next request on the caller's connection reuses the trace: the
        // status of the one that closed stays, the new one gets its own.
        a.reply(&caller, &server, &T1, status(Some(503), None, 200));
        a.flow_new(
            &ev(caller, T1, OWNER_CONNECTED, 190, 190, 1),
            Some(grpc()),
            190,
        );
        a.flow_end(&ev(caller, T1, OWNER_CONNECTED, 190, 210, 2), 210);
        let out = a.ready(&CLOCK(), 1_000, |_| false);
        let calls: Vec<_> = out
            .iter()
            .filter(|s| s.kind == SpanKind::Client)
            .map(|s| s.attr("http.response.status_code"))
            .collect();
        assert_eq!(calls.len(), 2);
        assert!(calls.contains(&Some(Value::Int(503))), "{calls:?}");
        let c = out
            .iter()
            .filter(|s| s.kind == SpanKind::Client)
            .min_by_key(|s| s.start_unix_ns)
            .unwrap();
        let s = out
            .iter()
            .find(|s| s.kind == SpanKind::Server && s.trace_id == T2)
            .unwrap();
        assert_eq!(c.attr("http.response.status_code"), Some(Value::Int(200)));
        assert_eq!(c.attr("rpc.grpc.status_code"), Some(Value::Int(0)));
        assert!(!c.error);
        assert_eq!(s.attr("http.response.status_code"), Some(Value::Int(200)));
        assert_eq!(s.attr("rpc.grpc.status_code"), Some(Value::Int(13)));
        assert!(s.error, "INTERNAL is the server's failure");
        assert_eq!(
            s.attributes
                .iter()
                .filter(|(k, _)| k.contains("status"))
                .count(),
            2,
            "each status once"
        );
        // The server's span lasts until its trailers.
        assert_eq!(
            s.end_unix_ns - s.start_unix_ns,
            180 - 110,
            "{} {}",
            s.start_unix_ns,
            s.end_unix_ns
        );
    }
}
