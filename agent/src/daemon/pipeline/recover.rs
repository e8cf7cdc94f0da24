//! Spans for captured requests whose (connection, trace) pair never opened
//! one: the pair opens with the first packet tagged with the request's
//! trace, and on a slow or busy node none may come after the agent keyed
//! the connection.
use std::collections::HashMap;

use agent_common::{
    FlowEvent, FlowKey, FlowStats, MATCH_FLOW, MATCH_HEAD, MATCH_WATCHED, OWNER_CONNECTED,
    OWNER_NONE,
};

use super::Pipeline;
use crate::sources::capture::Check;

impl Pipeline {
    /// Heads whose pair opened no span by their look (`due`), at either
    /// end of their connection:
    /// - the connection ended (or went idle) before the agent keyed it —
    ///   the whole exchange fit in the head's round trip through userspace:
    ///   the datapath still counted it (`MATCH_WATCHED`, in `stats`), and
    ///   it becomes a span under the head's trace;
    /// - the connection's entry (`current`) names another trace: it went on
    ///   to a later request before a packet carried this one (keep-alive,
    ///   HTTP/2 streams), and never will; or it closed (FIN/RST) while its
    ///   packets still went under the request before; or its answer was
    ///   seen whole (gRPC status) and the connection stayed quiet: a span
    ///   from the head alone;
    /// - otherwise it is looked at again later.
    pub(super) fn recover(
        &mut self,
        due: Vec<Check>,
        stats: &HashMap<FlowKey, FlowStats>,
        current: &HashMap<FlowKey, [u8; 16]>,
        now: u64,
    ) {
        const FIN_OR_RST: u8 = 0x01 | 0x04;
        for c in due {
            let over = |s: &FlowStats| {
                s.tcp_flags & FIN_OR_RST != 0 || now.saturating_sub(s.last_ns) >= self.span_idle_ns
            };
            let ended = match stats.get(&c.key) {
                Some(s) if s.is_negative() && s.matched == MATCH_WATCHED && over(s) => Some(*s),
                _ => None,
            };
            // No packet will carry this trace: the entry names a later
            // request, or the connection closed under another trace; or
            // none that belongs to it: its answer was seen whole.
            let passed = current.get(&c.key).is_some_and(|t| *t != c.ctx.trace_id)
                || stats.get(&c.key).is_some_and(|s| {
                    !s.is_negative()
                        && s.trace_id != c.ctx.trace_id
                        && s.tcp_flags & FIN_OR_RST != 0
                })
                || self.assembler.answered(&c.key, &c.ctx.trace_id);
            if ended.is_none() && !passed {
                self.capture.again(c, now);
                continue;
            }
            let Some(head) = self.capture.take_head(&c.key, &c.ctx.trace_id) else {
                continue;
            };
            if let Some(s) = ended {
                let mut st = FlowStats {
                    trace_id: c.ctx.trace_id,
                    matched: MATCH_FLOW,
                    ..s
                };
                if st.owner == OWNER_NONE {
                    st.owner = OWNER_CONNECTED;
                }
                if st.pid == 0 {
                    st.pid = head.pid;
                }
                let f = event(&c, st);
                self.assembler.flow_new(&f, Some(head), now);
                self.assembler.flow_end(&f, now);
                self.stats.spans_recovered += 1;
                // Its connection entry goes like any closed connection's.
                self.close_later(now, c.key, c.ctx.trace_id);
                continue;
            }
            // Who and where from the connection's current numbers (they
            // belong to the later request); when and what from the head.
            let sender = head.reader_end.is_none_or(|r| r.conn != c.key);
            let now_on = stats.get(&c.key).copied().unwrap_or_default();
            let st = FlowStats {
                trace_id: c.ctx.trace_id,
                packets: 0,
                bytes: 0,
                tcp_flags: 0,
                first_ns: head.ts_ns,
                last_ns: head.ts_ns,
                matched: MATCH_HEAD,
                pid: match (now_on.pid, sender) {
                    (0, true) => head.pid,
                    (pid, _) => pid,
                },
                owner: match (now_on.owner, sender) {
                    (OWNER_NONE, true) => OWNER_CONNECTED,
                    (owner, _) => owner,
                },
                ..now_on
            };
            if self.assembler.from_head(&event(&c, st), head, now) {
                self.stats.spans_from_heads += 1;
                // Packets still tagged with it (queued, or a keep-alive's
                // last ACKs) open no second span.
                self.close_later(now, c.key, c.ctx.trace_id);
            }
        }
    }
}

/// The datapath-like record of `c`'s connection under its head's trace.
fn event(c: &Check, stats: FlowStats) -> FlowEvent {
    FlowEvent {
        key: c.key,
        stats,
        parent_span_id: c.ctx.parent_span_id,
        trace_flags: c.ctx.flags,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Mutex, time::Duration};

    use agent_common::{HttpHeadEvent, TraceKey};

    use super::*;
    use crate::{
        config::AgentConfig,
        events::Event,
        podnet::Reader,
        spans::{assemble::Reply, SpanKind, Value},
        tables::MemoryTables,
    };

    const MS: u64 = 1_000_000;

    /// A request head for `path` with `X-Request-Id: id`, sent by `pid` on
    /// `key` at `ts`.
    fn sent(key: FlowKey, ts: u64, pid: u32, id: &str, path: &str) -> Event {
        let text = format!("GET {path} HTTP/1.1\r\nX-Request-Id: {id}\r\n\r\n");
        let mut h = HttpHeadEvent {
            key,
            header: Default::default(),
            ts_ns: ts,
            pid,
            len: text.len() as u32,
            data: [0; agent_common::MAX_CAPTURE],
        };
        h.data[..text.len()].copy_from_slice(text.as_bytes());
        Event::HttpHead(Box::new(h))
    }

    fn not_local(_: &FlowKey) -> Result<Reader, crate::podnet::Unresolved> {
        Err(crate::podnet::Unresolved::NotLocal)
    }

    /// Two requests on one keep-alive connection (nginx → app in one pod),
    /// the second sent before any packet carried the first's trace: the
    /// agent keyed the connection for each in turn, and the first's pairs
    /// never opened. Both ends still get its span, from the head: named
    /// by it, timed to its response, no packets; the second waits for its
    /// own packets.
    #[test]
    fn a_request_its_connection_went_past_before_the_agent_keyed_it_is_a_span_at_both_ends() {
        let table = Mutex::new(MemoryTables::in_memory(16, Duration::from_secs(30)));
        let mut pipe = Pipeline::new(&AgentConfig::default());
        let conn = FlowKey::new(
            2,
            agent_common::PROTO_TCP,
            ([127, 0, 0, 1], 40000).into(),
            ([127, 0, 0, 1], 8081).into(),
        );
        let reader = TraceKey::new(22, 2);
        let send = |pipe: &mut Pipeline, ts: u64, id: &str, path: &str| {
            pipe.event(sent(conn, ts, 11, id, path), &table, |_| {
                Ok(Reader {
                    key: reader,
                    late: false,
                })
            });
        };
        let t0 = 10 * MS;
        send(&mut pipe, t0, "req-1", "/a");
        send(&mut pipe, t0 + 2 * MS, "req-2", "/b");
        let (first, second) = (
            crate::ids::map_request_id("req-1").unwrap().0,
            crate::ids::map_request_id("req-2").unwrap().0,
        );
        let served = conn.reversed_in(2);
        let answered = Reply {
            status: Some(200),
            grpc_status: None,
            last_ns: t0 + MS,
        };
        pipe.assembler.reply(&conn, &served, &first, answered);
        // The connection's numbers now belong to the second request.
        let later = |owner, pid| FlowStats {
            trace_id: second,
            pid,
            packets: 3,
            first_ns: t0 + 3 * MS,
            last_ns: t0 + 4 * MS,
            owner,
            matched: MATCH_FLOW,
            ..Default::default()
        };
        let stats = HashMap::from([
            (conn, later(OWNER_CONNECTED, 11)),
            (served, later(agent_common::OWNER_BOUND, 22)),
        ]);
        let now = t0 + 2 * MS + 300 * MS;
        let due = pipe.capture.overdue(now);
        assert_eq!(due.len(), 4, "two heads, each at both ends: {due:?}");
        let current: HashMap<_, _> = {
            let t = table.lock().unwrap();
            due.iter()
                .filter_map(|c| Some((c.key, t.by_flow().context(&c.key)?.trace_id)))
                .collect()
        };
        assert_eq!(current[&conn], second);
        assert_eq!(current[&served], second);
        pipe.recover(due, &stats, &current, now);
        assert_eq!(pipe.stats.spans_from_heads, 2);
        let spans = pipe.drain_all();
        assert_eq!(spans.len(), 2, "{spans:?}");
        for (kind, key, pid) in [(SpanKind::Client, conn, 11), (SpanKind::Server, served, 22)] {
            let s = spans.iter().find(|s| s.kind == kind).expect("both ends");
            assert_eq!(s.trace_id, first);
            assert_eq!(s.name, "GET");
            assert_eq!(s.attr("url.path"), Some(Value::Str("/a".into())));
            assert_eq!(s.attr("tagflow.match"), Some(Value::Str("head".into())));
            assert_eq!(s.attr("tagflow.packets"), Some(Value::Int(0)));
            assert_eq!(
                s.attr("network.local.port"),
                Some(Value::Int(key.local_port.into()))
            );
            assert_eq!(s.attr("process.pid"), Some(Value::Int(pid)));
            assert_eq!(s.attr("http.response.status_code"), Some(Value::Int(200)));
            assert_eq!(s.end_unix_ns - s.start_unix_ns, MS, "head to response");
        }
        let server = spans.iter().find(|s| s.kind == SpanKind::Server).unwrap();
        let client = spans.iter().find(|s| s.kind == SpanKind::Client).unwrap();
        assert_eq!(server.parent_span_id, Some(client.span_id));
        // The second request's pairs can still open: looked at again.
        assert_eq!(pipe.capture.cached(), 2);
        let again = pipe.capture.overdue(now + 300 * MS);
        assert!(again.iter().all(|c| c.ctx.trace_id == second) && again.len() == 2);
    }

    /// A gRPC call answered whole (its status seen) on a connection that
    /// then stayed quiet: no packet of its own will come, so it is a span
    /// from its head at the first look, and packets tagged with it later
    /// (a keep-alive's ACK) open no second one.
    #[test]
    fn an_answered_call_on_a_quiet_connection_is_a_span_at_the_first_look() {
        let table = Mutex::new(MemoryTables::in_memory(16, Duration::from_secs(30)));
        let mut pipe = Pipeline::new(&AgentConfig::default());
        let key = FlowKey {
            netns: 7,
            local_port: 40002,
            ..Default::default()
        };
        pipe.event(sent(key, MS, 11, "req-q", "/"), &table, not_local);
        let trace = crate::ids::map_request_id("req-q").unwrap().0;
        let status = |grpc_status| Reply {
            status: Some(200),
            grpc_status,
            last_ns: 2 * MS,
        };
        // Headers alone say nothing of the end: it waits.
        pipe.assembler
            .reply(&key, &key.reversed_in(8), &trace, status(None));
        let due = pipe.capture.overdue(301 * MS);
        let current = HashMap::from([(key, trace)]);
        pipe.recover(due, &HashMap::new(), &current, 301 * MS);
        assert_eq!(pipe.stats.spans_from_heads, 0);
        // The trailers: the call is over.
        pipe.assembler
            .reply(&key, &key.reversed_in(8), &trace, status(Some(0)));
        let due = pipe.capture.overdue(601 * MS);
        pipe.recover(due, &HashMap::new(), &current, 601 * MS);
        assert_eq!(pipe.stats.spans_from_heads, 1);
        let late = FlowEvent {
            key,
            stats: FlowStats {
                trace_id: trace,
                pid: 11,
                packets: 1,
                tcp_flags: 0x10,
                owner: OWNER_CONNECTED,
                matched: MATCH_FLOW,
                ..Default::default()
            },
            ..Default::default()
        };
        pipe.event(Event::FlowNew(late), &table, not_local);
        let spans = pipe.drain_all();
        assert_eq!(spans.len(), 1, "{spans:?}");
        assert_eq!(spans[0].attr("rpc.system"), None);
        assert_eq!(
            spans[0].attr("tagflow.match"),
            Some(Value::Str("head".into()))
        );
        assert_eq!(pipe.stats.flows_after_end, 1);
    }

    /// A connection whose entry still names the request is not given up
    /// (its next packet opens the pair) until it closes.
    #[test]
    fn a_request_whose_connection_still_carries_it_waits_for_its_packets_until_it_closes() {
        let table = Mutex::new(MemoryTables::in_memory(16, Duration::from_secs(30)));
        let mut pipe = Pipeline::new(&AgentConfig::default());
        let key = FlowKey {
            netns: 7,
            local_port: 40001,
            ..Default::default()
        };
        pipe.event(sent(key, MS, 11, "req-w", "/"), &table, not_local);
        let trace = crate::ids::map_request_id("req-w").unwrap().0;
        let due = pipe.capture.overdue(301 * MS);
        assert_eq!(due.len(), 1);
        pipe.recover(
            due,
            &HashMap::new(),
            &HashMap::from([(key, trace)]),
            301 * MS,
        );
        assert_eq!(pipe.stats.spans_from_heads, 0);
        assert!(pipe.drain_all().is_empty());
        let due = pipe.capture.overdue(601 * MS);
        assert_eq!(due.len(), 1, "looked at again");
        // Then the connection closed, its packets still under the request
        // before (the agent keyed it too late): none will carry this one.
        let closed = FlowStats {
            trace_id: [9; 16],
            pid: 11,
            packets: 4,
            tcp_flags: 0x11,
            owner: OWNER_CONNECTED,
            matched: MATCH_FLOW,
            ..Default::default()
        };
        let stats = HashMap::from([(key, closed)]);
        pipe.recover(due, &stats, &HashMap::from([(key, trace)]), 601 * MS);
        assert_eq!(pipe.stats.spans_from_heads, 1);
        let spans = pipe.drain_all();
        assert_eq!(spans.len(), 1);
        assert_eq!(spans[0].trace_id, trace);
        assert_eq!(spans[0].kind, SpanKind::Client);
        assert_eq!(
            spans[0].attr("tagflow.match"),
            Some(Value::Str("head".into()))
        );
    }
}
