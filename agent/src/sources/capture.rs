//! Passive capture, userspace half: request heads copied by the datapath
//! become trace entries for their connection and their sender.
use std::collections::{HashMap, VecDeque};

use agent_common::{
    FlowKey, HttpHeadEvent, TraceContext, TraceKey, TraceSource, TRACE_FLAG_HAS_PARENT,
    TRACE_FLAG_SAMPLED,
};

use super::promised::Promised;
use crate::{
    ids,
    podnet::{Reader, Unresolved},
    tables::{Store, TraceTables},
    trim::Trim,
};

/// What the spans want to know about a captured request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadInfo {
    pub method: String,
    pub target: String,
    pub host: Option<String>,
    pub protocol: Protocol,
    pub request_id: Option<String>,
    pub trace_id: [u8; 16],
    pub parent_span_id: Option<[u8; 8]>,
    /// The caller's sampling decision (`traceparent` flags; true without).
    pub sampled: bool,
    pub pid: u32,
    pub ts_ns: u64,
    /// The connection as its receiver sees it, when the host translated
    /// it (a call through a Service address).
    pub via: Option<FlowKey>,
    /// The reader's end of the connection, when its reader was found.
    pub reader_end: Option<ReaderEnd>,
    /// The trace the sender's process carried until this head, when it
    /// was another (what it sent so far on this connection went out under
    /// it), and the context the head applied.
    pub sender_previous: Option<([u8; 16], TraceContext)>,
}

impl HeadInfo {
    /// The trace context the head gives its connection.
    pub fn context(&self) -> TraceContext {
        let mut flags = TraceSource::Passive.to_flags();
        if self.sampled {
            flags |= TRACE_FLAG_SAMPLED;
        }
        if self.parent_span_id.is_some() {
            flags |= TRACE_FLAG_HAS_PARENT;
        }
        TraceContext {
            trace_id: self.trace_id,
            parent_span_id: self.parent_span_id.unwrap_or_default(),
            flags,
            ..Default::default()
        }
    }
}

/// What a head changed for its reader: its end of the connection `conn`
/// now carries `ctx`; until now its process carried `previous`, when that
/// was another trace (so did whatever it sent on `conn` before the agent
/// got here: the handshake).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReaderEnd {
    pub conn: FlowKey,
    pub previous: Option<[u8; 16]>,
    pub ctx: TraceContext,
}

#[derive(Debug, PartialEq, Eq)]
pub enum HeadOutcome {
    Applied(Box<HeadInfo>),
    /// Not an HTTP/1.x request head after all.
    NotHttp,
    /// A head without any of the configured id headers (possibly because it
    /// was cut off: split across segments or longer than the capture).
    NoId {
        truncated: bool,
    },
    /// An id header was present but unusable.
    BadId,
}

/// Parses a captured head. A head cut off by the capture length or the
/// segment boundary is parsed up to its last complete line: ids in the
/// part we have are still found.
pub fn parse_head(data: &[u8], id_headers: &[String]) -> Result<(HeadInfo, bool), HeadOutcome> {
    let end = data.windows(4).position(|w| w == b"\r\n\r\n");
    let (buf, truncated) = match end {
        Some(e) => (data[..e + 4].to_vec(), false),
        None => {
            let last = data
                .windows(2)
                .rposition(|w| w == b"\r\n")
                .ok_or(HeadOutcome::NotHttp)?;
            let mut b = data[..last + 2].to_vec();
            b.extend_from_slice(b"\r\n");
            (b, true)
        }
    };
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(&buf) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(HeadOutcome::NotHttp),
    }
    let get = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    let request = Request {
        method: req.method.unwrap_or(""),
        target: req.path.unwrap_or(""),
        host: get("host"),
        protocol: Protocol::Http1,
    };
    head_info(
        request,
        id_headers.iter().find_map(|h| get(h)),
        get("traceparent"),
    )
    .map_err(|e| match e {
        HeadOutcome::NoId { .. } => HeadOutcome::NoId { truncated },
        e => e,
    })
}

/// What a request says about itself, whatever its HTTP version.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub method: &'a str,
    pub target: &'a str,
    /// `Host`, or HTTP/2's `:authority`.
    pub host: Option<&'a str>,
    pub protocol: Protocol,
}

/// The request's details and ids, or why it sets no trace.
pub fn head_info(
    r: Request<'_>,
    request_id: Option<&str>,
    traceparent: Option<&str>,
) -> Result<(HeadInfo, bool), HeadOutcome> {
    let id = match ids::identify(request_id, traceparent) {
        Ok(id) => id,
        Err(ids::IdError::Missing) => return Err(HeadOutcome::NoId { truncated: false }),
        Err(_) => return Err(HeadOutcome::BadId),
    };
    Ok((
        HeadInfo {
            method: r.method.to_string(),
            target: r.target.to_string(),
            host: r.host.map(str::to_string),
            protocol: r.protocol,
            request_id: id.request_id.clone(),
            trace_id: id.trace_id,
            parent_span_id: id.parent_span_id,
            sampled: id.sampled,
            pid: 0,
            ts_ns: 0,
            via: None,
            reader_end: None,
            sender_previous: None,
        },
        id.sampled,
    ))
}

/// The protocol a head was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    /// gRPC over HTTP/2 (`content-type: application/grpc…`).
    Grpc,
}

/// Where a head was seen: its connection (as its sender's end), its
/// sender and when.
#[derive(Debug, Clone, Copy)]
pub struct Sent {
    pub key: FlowKey,
    pub pid: u32,
    pub ts_ns: u64,
}

/// Applies captured heads to the trace tables and remembers the request
/// details per (connection, trace), bounded.
pub struct Capture {
    id_headers: Vec<String>,
    heads: HashMap<(FlowKey, [u8; 16]), Box<HeadInfo>>,
    /// Those of `heads` sent from this node whose span has not opened.
    promised: Promised,
    /// Insertion order with the head's (monotonic) time.
    order: VecDeque<(u64, (FlowKey, [u8; 16]))>,
    cap: usize,
    pub applied: u64,
    pub no_id: u64,
    pub truncated_no_id: u64,
    pub bad_id: u64,
    pub not_http: u64,
    pub table_errors: u64,
    pub evicted: u64,
    /// Details no span asked for within `UNCLAIMED_NS` (the pair never
    /// carried another packet: e.g. the next request followed at once).
    pub unclaimed: u64,
    /// Heads whose receiving process was found and keyed.
    pub receivers_keyed: u64,
    /// Heads addressed to no pod of this node.
    pub receivers_not_local: u64,
    /// Heads addressed to a local pod with nothing bound to the port.
    pub receivers_no_listener: u64,
    /// Heads handled after their reader had already answered and closed
    /// (their connection entries wait for the idle timeout).
    pub receivers_late: u64,
    /// Calls a reader made after its request's head passed the datapath
    /// but before the agent had keyed it: they went out under the reader's
    /// previous trace (the userspace round trip lost the race).
    pub receiver_races_lost: u64,
    /// The latest head per reader: (head time, context), bounded by `cap`.
    readers: HashMap<TraceKey, (u64, TraceContext)>,
    readers_order: VecDeque<TraceKey>,
    /// The last two heads per reader's end of a connection (latest
    /// first), bounded by `cap`: which request a keep-alive connection
    /// carried when a call by its reading thread started.
    ends: HashMap<FlowKey, [(u64, TraceContext); 2]>,
    ends_order: VecDeque<FlowKey>,
    /// Heads, in order, to look at again at either end of their
    /// connection once it should have opened a span (see `overdue`).
    checks: VecDeque<Check>,
    /// When the agent last looked (its clock): a head it applied after its
    /// look was due (running behind its datapath) gets a full interval
    /// from then, for the events still queued behind it to come first.
    looked_ns: u64,
}

/// A head, to look at again at `due` (monotonic ns) at one end (`key`) of
/// its connection: the sender's (a head sent from this node) or the
/// reader's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Check {
    pub due: u64,
    /// Looks taken so far.
    pub looks: u32,
    pub key: FlowKey,
    pub ctx: TraceContext,
}

/// Request details wait this long for their span to open (which happens
/// with the pair's next packet, normally within a round trip).
const UNCLAIMED_NS: u64 = 3_000_000_000;
/// A head's connection without a span this long after the head is looked
/// at (and again as often while its details are kept).
const CHECK_AFTER_NS: u64 = 300_000_000;
/// Looks a head gets: as long as its details are kept.
const LOOKS: u32 = (UNCLAIMED_NS / CHECK_AFTER_NS) as u32;

impl Capture {
    pub fn new(id_headers: Vec<String>, cap: usize) -> Self {
        Self {
            id_headers,
            heads: HashMap::new(),
            promised: Promised::default(),
            order: VecDeque::new(),
            cap,
            applied: 0,
            no_id: 0,
            truncated_no_id: 0,
            bad_id: 0,
            not_http: 0,
            table_errors: 0,
            evicted: 0,
            unclaimed: 0,
            receivers_keyed: 0,
            receivers_not_local: 0,
            receivers_no_listener: 0,
            receivers_late: 0,
            receiver_races_lost: 0,
            readers: HashMap::new(),
            readers_order: VecDeque::new(),
            ends: HashMap::new(),
            ends_order: VecDeque::new(),
            checks: VecDeque::new(),
            looked_ns: 0,
        }
    }

    /// A call the datapath tagged with another trace than the one its
    /// process was reading when the call started (`first_ns`): the agent
    /// keyed the reader too late. Counted; returns the right context.
    pub fn lost_race(
        &mut self,
        caller: TraceKey,
        first_ns: u64,
        trace: &[u8; 16],
    ) -> Option<TraceContext> {
        let (ts, ctx) = self.readers.get(&caller)?;
        if *ts <= first_ns && ctx.trace_id != *trace {
            self.receiver_races_lost += 1;
            return Some(*ctx);
        }
        None
    }

    /// The request the reader's end `end` of a connection carried at
    /// `at_ns` (a call's first packet): None when no head on it was seen,
    /// `Some(None)` when the heads seen all came later.
    pub fn carried(&self, end: &FlowKey, at_ns: u64) -> Option<Option<TraceContext>> {
        let heads = self.ends.get(end)?;
        Some(
            heads
                .iter()
                .find(|(ts, c)| *ts <= at_ns && c.trace_id != [0; 16])
                .map(|(_, c)| *c),
        )
    }

    fn remember_end(&mut self, end: FlowKey, ts_ns: u64, ctx: TraceContext) {
        match self.ends.get_mut(&end) {
            Some(h) => *h = [(ts_ns, ctx), h[0]],
            None => {
                self.ends
                    .insert(end, [(ts_ns, ctx), (u64::MAX, TraceContext::default())]);
                self.ends_order.push_back(end);
                while self.ends_order.len() > self.cap {
                    if let Some(old) = self.ends_order.pop_front() {
                        self.ends.remove(&old);
                    }
                }
            }
        }
    }

    fn remember_reader(&mut self, r: TraceKey, ts_ns: u64, ctx: TraceContext) {
        if self.readers.insert(r, (ts_ns, ctx)).is_none() {
            self.readers_order.push_back(r);
            while self.readers_order.len() > self.cap {
                if let Some(old) = self.readers_order.pop_front() {
                    self.readers.remove(&old);
                }
            }
        }
    }

    /// Applies a captured head: its connection, its sender and the process
    /// that will read it (found by `receiver`, asked only for heads with an
    /// id) carry the request's trace from now on. A head addressed to no
    /// local pod may be going to a Service: `translate` says where the host
    /// sends it, and the receiver is looked for there.
    pub fn handle<P, F, G, A>(
        &mut self,
        ev: &HttpHeadEvent,
        table: &mut TraceTables<P, F, G, A>,
        receiver: impl FnMut(&FlowKey) -> Result<Reader, Unresolved>,
        translate: impl FnOnce(&FlowKey) -> Option<FlowKey>,
    ) -> HeadOutcome
    where
        P: Store<TraceKey, TraceContext>,
        F: Store<FlowKey, TraceContext>,
        G: Store<u64, u64>,
        A: Store<u32, agent_common::NetnsSlot>,
    {
        let data = &ev.data[..(ev.len as usize).min(ev.data.len())];
        let sent = Sent {
            key: ev.key,
            pid: ev.pid,
            ts_ns: ev.ts_ns,
        };
        let parsed = parse_head(data, &self.id_headers);
        self.apply(sent, parsed, table, receiver, translate)
    }

    /// The id headers heads are read for, in order of preference.
    pub fn id_headers(&self) -> &[String] {
        &self.id_headers
    }

    /// Applies a parsed head (HTTP/1.x or one HTTP/2 stream's headers),
    /// counting the ones that do not apply.
    pub fn apply<P, F, G, A>(
        &mut self,
        ev: Sent,
        parsed: Result<(HeadInfo, bool), HeadOutcome>,
        table: &mut TraceTables<P, F, G, A>,
        mut receiver: impl FnMut(&FlowKey) -> Result<Reader, Unresolved>,
        translate: impl FnOnce(&FlowKey) -> Option<FlowKey>,
    ) -> HeadOutcome
    where
        P: Store<TraceKey, TraceContext>,
        F: Store<FlowKey, TraceContext>,
        G: Store<u64, u64>,
        A: Store<u32, agent_common::NetnsSlot>,
    {
        let (mut info, _) = match parsed {
            Ok(x) => x,
            Err(o) => {
                match o {
                    HeadOutcome::NotHttp => self.not_http += 1,
                    HeadOutcome::NoId { truncated: true } => self.truncated_no_id += 1,
                    HeadOutcome::NoId { truncated: false } => self.no_id += 1,
                    HeadOutcome::BadId => self.bad_id += 1,
                    HeadOutcome::Applied(_) => {}
                }
                return o;
            }
        };
        info.pid = ev.pid;
        info.ts_ns = ev.ts_ns;
        let ctx = info.context();
        // This connection carries this request from now on; the sender's
        // other traffic (its own outgoing calls) too. A head from the wire
        // has no sender here, only a reader.
        let from_wire = ev.key.netns == agent_common::NETNS_WIRE;
        if !from_wire && table.set_flow(ev.key, &ctx).is_err() {
            self.table_errors += 1;
        }
        if !from_wire && ev.pid != 0 {
            info.sender_previous = table
                .by_pid()
                .context(&TraceKey::new(ev.pid, ev.key.netns))
                .map(|p| p.trace_id)
                .filter(|t| *t != ctx.trace_id)
                .map(|t| (t, ctx));
        }
        // The head's parent is the sender's own span: not a parent of the
        // sender's other traffic (its server span would hang below its call).
        let sender_ctx = TraceContext {
            parent_span_id: [0; 8],
            flags: ctx.flags & !TRACE_FLAG_HAS_PARENT,
            ..ctx
        };
        if !from_wire
            && ev.pid != 0
            && table
                .set_process(TraceKey::new(ev.pid, ev.key.netns), &sender_ctx)
                .is_err()
        {
            self.table_errors += 1;
        }
        // The reader: its own calls while serving, and its end of this
        // connection (the response), carry the request's trace too.
        let mut found = receiver(&ev.key);
        let mut target = ev.key;
        if found == Err(Unresolved::NotLocal) {
            if let Some(via) = translate(&ev.key) {
                info.via = Some(via);
                target = via;
                found = receiver(&via);
            }
        }
        match found {
            Ok(Reader { key: r, late }) => {
                self.receivers_keyed += 1;
                self.receivers_late += late as u64;
                self.remember_reader(r, ev.ts_ns, ctx);
                let reverse = target.reversed_in(r.netns);
                self.remember_end(reverse, ev.ts_ns, ctx);
                info.reader_end = Some(ReaderEnd {
                    conn: reverse,
                    previous: table
                        .by_pid()
                        .context(&r)
                        .map(|p| p.trace_id)
                        .filter(|t| *t != ctx.trace_id),
                    ctx,
                });
                if table.set_process(r, &ctx).is_err() || table.set_flow(reverse, &ctx).is_err() {
                    self.table_errors += 1;
                }
            }
            Err(Unresolved::NotLocal) => self.receivers_not_local += 1,
            Err(Unresolved::NoListener) => self.receivers_no_listener += 1,
        }
        let due = ev.ts_ns.max(self.looked_ns) + CHECK_AFTER_NS;
        let check = |key| Check {
            due,
            looks: 0,
            key,
            ctx,
        };
        // The reader's span (its end of the connection) is named by the
        // request as well.
        if let Some(r) = info.reader_end {
            if self.keep_head((r.conn, info.trace_id), &info, ev.ts_ns) {
                self.check_later(check(r.conn));
            }
        }
        if self.keep_head((ev.key, info.trace_id), &info, ev.ts_ns) && !from_wire {
            // Until the first look its trace waits for the span.
            self.promised.add((ev.key, info.trace_id));
            self.check_later(check(ev.key));
        }
        self.applied += 1;
        HeadOutcome::Applied(Box::new(info))
    }

    /// Keeps a head's details for the span its pair will open; false when
    /// the pair already had some.
    fn keep_head(&mut self, k: (FlowKey, [u8; 16]), info: &HeadInfo, ts_ns: u64) -> bool {
        while let Some((ts, old)) = self.order.front().copied() {
            if ts_ns.saturating_sub(ts) < UNCLAIMED_NS {
                break;
            }
            self.order.pop_front();
            if self.forget(&old) {
                self.unclaimed += 1;
            }
        }
        if self.heads.insert(k, Box::new(info.clone())).is_some() {
            return false;
        }
        self.order.push_back((ts_ns, k));
        // `order` may name pairs already taken: those cost nothing to drop;
        // only details never used count as evicted.
        while self.order.len() > self.cap {
            if let Some((_, old)) = self.order.pop_front() {
                if self.forget(&old) {
                    self.evicted += 1;
                }
            }
        }
        true
    }

    /// The request details for a (connection, trace) pair, handed over
    /// once: the span that opens with the pair keeps them from then on.
    pub fn take_head(&mut self, key: &FlowKey, trace: &[u8; 16]) -> Option<Box<HeadInfo>> {
        self.promised.settle(&(*key, *trace));
        self.heads.remove(&(*key, *trace))
    }

    /// Gives back table memory a burst of heads left unused.
    pub fn trim(&mut self) {
        self.heads.trim();
        self.order.trim();
        self.readers.trim();
        self.readers_order.trim();
        self.ends.trim();
        self.ends_order.trim();
        self.checks.trim();
        self.promised.trim();
    }

    /// Drops a head's details; whether there were any.
    fn forget(&mut self, pair: &(FlowKey, [u8; 16])) -> bool {
        self.promised.settle(pair);
        self.heads.remove(pair).is_some()
    }

    /// The span of a pair whose head was kept opened before the head came,
    /// and the details went straight to it: nothing waits on it, and the
    /// kept copy is used (not unclaimed; its memory goes now, not when it
    /// ages out).
    pub fn span_open(&mut self, key: &FlowKey, trace: &[u8; 16]) {
        self.forget(&(*key, *trace));
    }

    /// Whether a head sent from this node for `trace` still waits for its
    /// connection's span: the trace is not complete yet.
    pub fn awaits_span(&self, trace: &[u8; 16]) -> bool {
        self.promised.awaits(trace)
    }

    /// Heads sent from this node whose span has not opened yet.
    pub fn awaited_spans(&self) -> usize {
        self.promised.len()
    }

    fn check_later(&mut self, c: Check) {
        self.checks.push_back(c);
        while self.checks.len() > self.cap {
            // No look left for it: its trace no longer waits on it.
            if let Some(old) = self.checks.pop_front() {
                self.promised.settle(&(old.key, old.ctx.trace_id));
            }
        }
    }

    /// Heads due for a look whose connection has opened no span yet: it
    /// may have ended before the agent keyed it (see `Pipeline::recover`).
    pub fn overdue(&mut self, now_ns: u64) -> Vec<Check> {
        self.looked_ns = now_ns;
        let mut out = Vec::new();
        while let Some(c) = self.checks.front().copied() {
            if c.due > now_ns {
                break;
            }
            self.checks.pop_front();
            if self.heads.contains_key(&(c.key, c.ctx.trace_id)) {
                out.push(c);
            }
        }
        out
    }

    /// Looks at an overdue head again later, while its details are kept
    /// (`LOOKS` times: counted, not timed from the head, so that an agent
    /// running behind its datapath still looks for as long).
    /// Its trace waits no longer: the connection is alive and may stay
    /// quiet (keep-alive), and holding the trace costs every span of it
    /// that latency.
    pub fn again(&mut self, c: Check, now_ns: u64) {
        self.promised.settle(&(c.key, c.ctx.trace_id));
        if c.looks + 1 < LOOKS {
            self.check_later(Check {
                due: now_ns + CHECK_AFTER_NS,
                looks: c.looks + 1,
                ..c
            });
        }
    }

    /// Request details waiting for their span.
    pub fn cached(&self) -> usize {
        self.heads.len()
    }

    /// As metrics: (name, help, value).
    pub fn counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        vec![
            (
                "capture_applied_total",
                "Request heads that set a trace.",
                self.applied,
            ),
            (
                "capture_no_id_total",
                "Complete request heads without an id header.",
                self.no_id,
            ),
            (
                "capture_truncated_no_id_total",
                "Cut-off request heads without an id in the part seen.",
                self.truncated_no_id,
            ),
            (
                "capture_bad_id_total",
                "Request heads with an unusable id.",
                self.bad_id,
            ),
            (
                "capture_not_http_total",
                "Captured payloads that were not HTTP/1 heads.",
                self.not_http,
            ),
            (
                "capture_table_errors_total",
                "Trace-table writes from capture that failed.",
                self.table_errors,
            ),
            (
                "capture_unclaimed_total",
                "Request details no span asked for within 3 s (dropped).",
                self.unclaimed,
            ),
            (
                "capture_evicted_total",
                "Request details evicted before their span closed.",
                self.evicted,
            ),
            (
                "linking_receivers_keyed_total",
                "Request heads whose reading process was found and keyed.",
                self.receivers_keyed,
            ),
            (
                "linking_receivers_not_local_total",
                "Request heads addressed to no pod of this node.",
                self.receivers_not_local,
            ),
            (
                "linking_receivers_no_listener_total",
                "Request heads addressed to a local pod port nothing is bound to.",
                self.receivers_no_listener,
            ),
            (
                "linking_receivers_late_total",
                "Request heads handled after their reader had answered and closed (entries wait for the idle timeout).",
                self.receivers_late,
            ),
            (
                "linking_receiver_races_lost_total",
                "Calls that left under the reader's previous trace: made before the agent had keyed the reader.",
                self.receiver_races_lost,
            ),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn not_local(_: &FlowKey) -> Result<Reader, Unresolved> {
        Err(Unresolved::NotLocal)
    }

    fn no_nat(_: &FlowKey) -> Option<FlowKey> {
        None
    }

    fn hdrs() -> Vec<String> {
        vec!["x-request-id".into()]
    }

    #[test]
    fn complete_head_with_request_id() {
        let h = b"GET /api/v1?x=1 HTTP/1.1\r\nHost: api:8080\r\nX-Request-ID: 0123456789abcdef0123456789abcdef\r\n\r\nbody";
        let (info, sampled) = parse_head(h, &hdrs()).unwrap();
        assert_eq!(info.method, "GET");
        assert_eq!(info.target, "/api/v1?x=1");
        assert_eq!(info.host.as_deref(), Some("api:8080"));
        assert_eq!(
            ids::to_hex(&info.trace_id),
            "0123456789abcdef0123456789abcdef"
        );
        assert!(sampled);
    }

    #[test]
    fn traceparent_wins_and_custom_header_names_work() {
        let h = b"POST /x HTTP/1.1\r\nx-correlation-id: abc\r\ntraceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00\r\n\r\n";
        let (info, sampled) = parse_head(h, &["x-correlation-id".to_string()]).unwrap();
        assert_eq!(
            ids::to_hex(&info.trace_id),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(info.request_id.as_deref(), Some("abc"));
        assert!(!sampled);
        assert!(info.parent_span_id.is_some());
    }

    #[test]
    fn truncated_heads_keep_the_ids_they_contain() {
        let mut h = b"GET / HTTP/1.1\r\nX-Request-Id: req-1\r\nCookie: ".to_vec();
        h.extend(std::iter::repeat_n(b'a', 600));
        let (info, _) = parse_head(&h[..512], &hdrs()).unwrap();
        assert_eq!(info.request_id.as_deref(), Some("req-1"));
        // The id itself cut off: no id, reported as truncated.
        let h2 = b"GET / HTTP/1.1\r\nHost: a\r\nX-Request-Id: req-";
        assert_eq!(
            parse_head(h2, &hdrs()).unwrap_err(),
            HeadOutcome::NoId { truncated: true }
        );
    }

    #[test]
    fn not_http_and_bad_ids() {
        assert_eq!(
            parse_head(b"GETTING STARTED\r\n\r\n", &hdrs()).unwrap_err(),
            HeadOutcome::NotHttp
        );
        assert_eq!(
            parse_head(b"GET / HTTP/1.1", &hdrs()).unwrap_err(),
            HeadOutcome::NotHttp
        );
        assert_eq!(
            parse_head(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", &hdrs()).unwrap_err(),
            HeadOutcome::NoId { truncated: false }
        );
        let long = format!(
            "GET / HTTP/1.1\r\nX-Request-Id: {}\r\n\r\n",
            "x".repeat(300)
        );
        assert_eq!(
            parse_head(long.as_bytes(), &hdrs()).unwrap_err(),
            HeadOutcome::BadId
        );
    }

    #[test]
    fn details_are_handed_over_once_and_unclaimed_ones_age_out() {
        let mut t = crate::tables::MemoryTables::in_memory(100, std::time::Duration::from_secs(30));
        let mut c = Capture::new(hdrs(), 100);
        let head = |port: u16, id: &str, ts_ns: u64| {
            let text = format!("GET / HTTP/1.1\r\nX-Request-Id: {id}\r\n\r\n");
            let mut ev = HttpHeadEvent {
                header: Default::default(),
                key: FlowKey {
                    netns: 1,
                    local_port: port,
                    ..Default::default()
                },
                ts_ns,
                pid: 0,
                len: text.len() as u32,
                data: [0; agent_common::MAX_CAPTURE],
            };
            ev.data[..text.len()].copy_from_slice(text.as_bytes());
            ev
        };
        let s = 1_000_000_000;
        let a = head(1, "req-a", 100 * s);
        assert!(matches!(
            c.handle(&a, &mut t, not_local, no_nat),
            HeadOutcome::Applied(_)
        ));
        let trace = ids::map_request_id("req-a").unwrap().0;
        assert_eq!(t.by_flow().get(&a.key), Some(trace));
        assert!(c.take_head(&a.key, &trace).is_some());
        assert!(c.take_head(&a.key, &trace).is_none(), "handed over once");
        // Never claimed: dropped once 3 s older than the newest head.
        c.handle(&head(2, "req-b", 101 * s), &mut t, not_local, no_nat);
        c.handle(&head(3, "req-c", 102 * s), &mut t, not_local, no_nat);
        assert_eq!(c.cached(), 2);
        c.handle(
            &head(4, "req-d", 104 * s + s / 2),
            &mut t,
            not_local,
            no_nat,
        );
        assert_eq!((c.cached(), c.unclaimed, c.evicted), (2, 1, 0));
        // Their traces waited for their spans while the details were kept.
        let id = |r: &str| ids::map_request_id(r).unwrap().0;
        assert!(!c.awaits_span(&id("req-a")), "claimed");
        assert!(!c.awaits_span(&id("req-b")), "aged out");
        assert!(c.awaits_span(&id("req-c")) && c.awaits_span(&id("req-d")));
        // A look at req-c that finds its connection alive ends the wait.
        let due = c.overdue(103 * s);
        assert_eq!(due.len(), 1);
        c.again(due[0], 103 * s);
        assert!(!c.awaits_span(&id("req-c")));
        assert_eq!(c.awaited_spans(), 1);
    }

    /// An agent running seconds behind its datapath: a head it applies
    /// long after it passed gets its first look a full interval after the
    /// agent's last look (the events queued behind it come first), and as
    /// many looks as any other.
    #[test]
    fn a_head_applied_late_gets_every_look() {
        let mut t = crate::tables::MemoryTables::in_memory(16, std::time::Duration::from_secs(30));
        let mut c = Capture::new(hdrs(), 16);
        let s = 1_000_000_000;
        let text = "GET / HTTP/1.1\r\nX-Request-Id: req-l\r\n\r\n";
        let mut ev = HttpHeadEvent {
            header: Default::default(),
            key: FlowKey {
                netns: 1,
                local_port: 5,
                ..Default::default()
            },
            ts_ns: 10 * s,
            pid: 0,
            len: text.len() as u32,
            data: [0; agent_common::MAX_CAPTURE],
        };
        ev.data[..text.len()].copy_from_slice(text.as_bytes());
        // The agent looked at 20 s; the head passed at 10 s.
        assert!(c.overdue(20 * s).is_empty());
        c.handle(&ev, &mut t, not_local, no_nat);
        assert!(
            c.overdue(20 * s + CHECK_AFTER_NS - 1).is_empty(),
            "not at once"
        );
        let mut now = 20 * s + CHECK_AFTER_NS;
        let mut looks = 0;
        loop {
            let due = c.overdue(now);
            if due.is_empty() {
                break;
            }
            looks += 1;
            c.again(due[0], now);
            now += CHECK_AFTER_NS;
        }
        assert_eq!(looks, LOOKS);
    }
}

#[cfg(test)]
mod receiver_tests {
    use super::*;

    #[test]
    fn the_reader_of_a_head_and_its_end_of_the_connection_are_keyed() {
        let mut t = crate::tables::MemoryTables::in_memory(16, std::time::Duration::from_secs(30));
        let mut c = Capture::new(vec!["x-request-id".into()], 16);
        let text = b"GET / HTTP/1.1\r\nX-Request-Id: req-r\r\n\r\n";
        let mut ev = HttpHeadEvent {
            header: Default::default(),
            key: FlowKey::new(
                1,
                agent_common::PROTO_TCP,
                ([10, 0, 0, 1], 40000).into(),
                ([10, 0, 0, 2], 8000).into(),
            ),
            ts_ns: 0,
            pid: 11,
            len: text.len() as u32,
            data: [0; agent_common::MAX_CAPTURE],
        };
        ev.data[..text.len()].copy_from_slice(text);
        let reader = TraceKey::new(22, 2);
        let out = c.handle(
            &ev,
            &mut t,
            |k| {
                assert_eq!(k, &ev.key, "asked about the head's own connection");
                Ok(Reader {
                    key: reader,
                    late: false,
                })
            },
            |_| panic!("a local receiver needs no translation"),
        );
        assert!(matches!(out, HeadOutcome::Applied(_)));
        let want = ids::map_request_id("req-r").unwrap().0;
        assert_eq!(t.by_pid().get(&reader), Some(want), "the reader");
        assert_eq!(
            t.by_pid().get(&TraceKey::new(11, 1)),
            Some(want),
            "the sender"
        );
        let reply = ev.key.reversed_in(2);
        assert_eq!(reply.local_port, 8000);
        assert_eq!(t.by_flow().get(&reply), Some(want), "the reader's end");
        assert_eq!(t.gate().active_namespaces(), 2);
        assert_eq!(c.receivers_keyed, 1);
        // A head without an id never asks for its reader.
        let text = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        ev.data = [0; agent_common::MAX_CAPTURE];
        ev.data[..text.len()].copy_from_slice(text);
        ev.len = text.len() as u32;
        c.handle(&ev, &mut t, |_| panic!("no id, no reader"), |_| None);
    }

    #[test]
    fn a_head_to_a_service_address_keys_the_pod_the_host_sends_it_to() {
        let mut t = crate::tables::MemoryTables::in_memory(16, std::time::Duration::from_secs(30));
        let mut c = Capture::new(vec!["x-request-id".into()], 16);
        let text = b"GET / HTTP/1.1\r\nX-Request-Id: req-s\r\n\r\n";
        let vip = FlowKey::new(
            1,
            agent_common::PROTO_TCP,
            ([10, 0, 0, 1], 40000).into(),
            ([10, 96, 0, 10], 80).into(),
        );
        // DNAT to the pod and masquerade: the callee sees the node.
        let via = FlowKey::new(
            1,
            agent_common::PROTO_TCP,
            ([10, 0, 0, 254], 40000).into(),
            ([10, 0, 0, 3], 9100).into(),
        );
        let mut ev = HttpHeadEvent {
            header: Default::default(),
            key: vip,
            ts_ns: 0,
            pid: 11,
            len: text.len() as u32,
            data: [0; agent_common::MAX_CAPTURE],
        };
        ev.data[..text.len()].copy_from_slice(text);
        let reader = TraceKey::new(33, 3);
        let out = c.handle(
            &ev,
            &mut t,
            |k| {
                if k.remote_port == 9100 {
                    Ok(Reader {
                        key: reader,
                        late: false,
                    })
                } else {
                    Err(Unresolved::NotLocal)
                }
            },
            |k| {
                assert_eq!(k, &vip);
                Some(via)
            },
        );
        let HeadOutcome::Applied(info) = out else {
            panic!("{out:?}")
        };
        assert_eq!(info.via, Some(via), "the span learns the real peer");
        let want = ids::map_request_id("req-s").unwrap().0;
        assert_eq!(t.by_pid().get(&reader), Some(want));
        assert_eq!(
            t.by_flow().get(&via.reversed_in(3)),
            Some(want),
            "the callee's end"
        );
        assert_eq!(t.by_flow().get(&vip), Some(want), "the caller's end");
        assert_eq!((c.receivers_keyed, c.receivers_not_local), (1, 0));
    }
}
