//! Linking the spans of one trace: a SERVER span under the CLIENT span on
//! the reverse flow, a CLIENT span under its pod's SERVER span that was
//! serving when the call started, the rest under the remote parent.
use std::collections::HashMap;

use agent_common::FlowKey;

use crate::spans::{SpanKind, SpanRecord};

#[derive(Clone)]
pub(super) struct Closed {
    pub key: FlowKey,
    /// The connection as its receiver sees it, when the host translated it
    /// (a call through a Service address): what the server span is on.
    pub via: Option<FlowKey>,
    /// The caller's span from this span's own `traceparent`, for when no
    /// span of this node is its parent.
    pub remote_parent: Option<[u8; 8]>,
    /// The process that sent the flow (0: unknown).
    pub pid: u32,
    pub start: u64,
    pub end: u64,
    pub record: SpanRecord,
    /// A request's span (its head was read): its response so far, and
    /// whether it is a gRPC call. A status read late still reaches it.
    pub answer: Option<Answer>,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Answer {
    pub reply: super::Reply,
    pub grpc: bool,
}

#[cfg(test)]
fn reverse_of(a: &FlowKey, b: &FlowKey) -> bool {
    a.proto == b.proto
        && a.local_addr == b.remote_addr
        && a.remote_addr == b.local_addr
        && a.local_port == b.remote_port
        && a.remote_port == b.local_port
}

/// Slack when deciding that a call happened while a server span was open.
const CONTAIN_SLACK_NS: u64 = 5_000_000;

/// Links the spans of one trace (see the module docs). Never makes a cycle.
///
/// A server-side flow is often tagged only once its process was registered,
/// after the request arrived: its first packet says little about when
/// serving began. So a call is attributed to the first server span of its
/// pod still open when the call started, and parents are then stretched to
/// cover their children.
///
/// O(n log n): a busy trace can hold tens of thousands of spans, and this
/// runs on the loop that drains the ring buffer.
pub(super) fn link(spans: &mut [Closed]) {
    let n = spans.len();
    // Client spans by their connection as the other end sees it (within
    // the namespace for loopback, where every pod has the same addresses).
    type Conn = (u64, u8, [u8; 16], [u8; 16], u16, u16);
    let scope = |k: &FlowKey| {
        if k.remote_ip().is_loopback() {
            k.netns
        } else {
            0
        }
    };
    let mut clients: HashMap<Conn, usize> = HashMap::new();
    // Server spans per namespace and per (namespace, process), by end.
    let mut servers: HashMap<u64, Vec<(u64, usize)>> = HashMap::new();
    let mut by_process: HashMap<(u64, u32), Vec<(u64, usize)>> = HashMap::new();
    for (j, s) in spans.iter().enumerate() {
        let k = &s.key;
        match s.record.kind {
            SpanKind::Client => {
                let k = s.via.as_ref().unwrap_or(k);
                clients
                    .entry((
                        scope(k),
                        k.proto,
                        k.local_addr,
                        k.remote_addr,
                        k.local_port,
                        k.remote_port,
                    ))
                    .or_insert(j);
            }
            SpanKind::Server => {
                servers.entry(k.netns).or_default().push((s.end, j));
                if s.pid != 0 {
                    by_process
                        .entry((k.netns, s.pid))
                        .or_default()
                        .push((s.end, j));
                }
            }
            _ => {}
        }
    }
    for v in servers.values_mut().chain(by_process.values_mut()) {
        v.sort_unstable();
    }
    // The server span ending first among those that had not ended (give or
    // take the slack) when a call started at `start`.
    let serving = |v: &Vec<(u64, usize)>, start: u64| {
        let from = start.saturating_sub(CONTAIN_SLACK_NS);
        v.get(v.partition_point(|(end, _)| *end < from))
            .map(|(_, j)| *j)
    };
    // A remote parent that is a span of this trace (a call's computed id)
    // is linked like a local one, so the cycle check below sees it.
    let by_id: HashMap<[u8; 8], usize> = spans
        .iter()
        .enumerate()
        .map(|(j, s)| (s.record.span_id, j))
        .collect();
    let mut parent: Vec<Option<usize>> = vec![None; n];
    for (i, si) in spans.iter().enumerate() {
        let k = &si.key;
        parent[i] = match si.record.kind {
            SpanKind::Server => clients
                .get(&(
                    scope(&k.reversed_in(k.netns)),
                    k.proto,
                    k.remote_addr,
                    k.local_addr,
                    k.remote_port,
                    k.local_port,
                ))
                .copied(),
            // A call hangs off what its own process was serving when it
            // started (an in-pod proxy and its app both serve, over
            // loopback); else off whatever its pod was serving.
            _ => by_process
                .get(&(k.netns, si.pid))
                .and_then(|v| serving(v, si.start))
                .or_else(|| servers.get(&k.netns).and_then(|v| serving(v, si.start))),
        }
        .or_else(|| {
            si.remote_parent
                .and_then(|r| by_id.get(&r).copied())
                .filter(|j| *j != i)
        });
    }
    // Break cycles: walk up from each span not yet known to reach a root;
    // meeting the current walk again means a cycle, whose last link goes.
    let mut walk = vec![usize::MAX; n];
    let mut rooted = vec![false; n];
    for i in 0..n {
        let mut cur = i;
        while !rooted[cur] {
            walk[cur] = i;
            match parent[cur] {
                Some(p) if walk[p] == i => {
                    parent[cur] = None;
                    break;
                }
                Some(p) => cur = p,
                None => break,
            }
        }
        let mut cur = i;
        while !rooted[cur] {
            rooted[cur] = true;
            match parent[cur] {
                Some(p) => cur = p,
                None => break,
            }
        }
    }
    // Parents cover their children (a few passes settle any depth we make).
    for _ in 0..4 {
        for i in 0..n {
            if let Some(p) = parent[i] {
                let (cs, ce) = (spans[i].start, spans[i].end);
                spans[p].start = spans[p].start.min(cs);
                spans[p].end = spans[p].end.max(ce);
            }
        }
    }
    for i in 0..n {
        match parent[i] {
            Some(p) => {
                spans[i].record.parent_span_id = Some(spans[p].record.span_id);
                spans[i].record.parent_is_remote = false;
            }
            None => {
                // Its own request's caller, not another request's; never a
                // span of this trace (that link was dropped as a cycle).
                let remote = spans[i].remote_parent.filter(|r| !by_id.contains_key(r));
                spans[i].record.parent_span_id = remote;
                spans[i].record.parent_is_remote = remote.is_some();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::key;
    use super::*;
    use crate::spans::Resource;
    use std::sync::Arc;

    /// The quadratic linking this replaced, kept as the reference.
    fn link_reference(spans: &mut [Closed]) {
        let n = spans.len();
        let mut parent: Vec<Option<usize>> = vec![None; n];
        for i in 0..n {
            let si = &spans[i];
            parent[i] = match si.record.kind {
                SpanKind::Server => (0..n).find(|&j| {
                    spans[j].record.kind == SpanKind::Client && reverse_of(&spans[j].key, &si.key)
                }),
                _ => {
                    let serving = |same_pid: bool| {
                        (0..n)
                            .filter(|&j| {
                                let sj = &spans[j];
                                j != i
                                    && sj.record.kind == SpanKind::Server
                                    && sj.key.netns == si.key.netns
                                    && (!same_pid || (sj.pid != 0 && sj.pid == si.pid))
                                    && si.start <= sj.end + CONTAIN_SLACK_NS
                            })
                            .min_by_key(|&j| (spans[j].end, j))
                    };
                    serving(true).or_else(|| serving(false))
                }
            }
            .or_else(|| {
                (0..n).find(|&j| j != i && Some(spans[j].record.span_id) == spans[i].remote_parent)
            });
        }
        for i in 0..n {
            let mut seen = vec![false; n];
            let mut cur = i;
            seen[cur] = true;
            while let Some(p) = parent[cur] {
                if seen[p] {
                    parent[cur] = None;
                    break;
                }
                seen[p] = true;
                cur = p;
            }
        }
        for i in 0..n {
            spans[i].record.parent_span_id = match parent[i] {
                Some(p) => Some(spans[p].record.span_id),
                None => spans[i]
                    .remote_parent
                    .filter(|r| !spans.iter().any(|s| s.record.span_id == *r)),
            };
        }
    }

    #[test]
    fn a_remote_parent_naming_a_span_of_the_trace_never_makes_a_cycle() {
        let mk = |server: bool, id: u8, remote: Option<[u8; 8]>| Closed {
            key: if server {
                key(1, [10, 0, 0, 1], 80, [10, 0, 0, 9], 40000)
            } else {
                key(1, [127, 0, 0, 1], 41000, [127, 0, 0, 1], 8080)
            },
            via: None,
            answer: None,
            remote_parent: remote,
            pid: 5,
            start: 10,
            end: 100,
            record: SpanRecord {
                trace_id: [1; 16],
                span_id: [id; 8],
                parent_span_id: None,
                parent_is_remote: false,
                name: String::new(),
                kind: if server {
                    SpanKind::Server
                } else {
                    SpanKind::Client
                },
                start_unix_ns: 0,
                end_unix_ns: 0,
                attributes: Default::default(),
                resource: Arc::new(Resource { attributes: vec![] }),
                error: false,
            },
        };
        // A proxy's server span that inherited its own call's id as remote
        // parent, and that call, made while it served.
        for order in [false, true] {
            let mut spans = vec![mk(true, 1, Some([2; 8])), mk(false, 2, None)];
            if order {
                spans.reverse();
            }
            link(&mut spans);
            let p: Vec<_> = spans.iter().map(|s| s.record.parent_span_id).collect();
            assert!(p.contains(&None), "a root remains: {p:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn fast_linking_matches_the_reference(
            shape in proptest::collection::vec(
                (proptest::bool::ANY, 1u64..3, 0u8..3, 0u8..3, 0u64..50_000_000, 0u64..50_000_000, proptest::option::of(0u8..3), 0u32..3),
                1..24,
            )
        ) {
            let mut spans: Vec<Closed> = shape
                .iter()
                .enumerate()
                .map(|(i, (server, ns, a, b, start, len, remote, pid))| {
                    // Servers listen on 80; clients call it from port 40000 + a.
                    let k = if *server {
                        key(*ns, [10, 0, 0, *a], 80, [10, 0, 0, *b], 40000 + *b as u16)
                    } else {
                        key(*ns, [10, 0, 0, *a], 40000 + *a as u16, [10, 0, 0, *b], 80)
                    };
                    Closed {
                        key: k,
                        via: None,
                        answer: None,
                        remote_parent: remote.map(|r| [r; 8]),
                        pid: *pid,
                        start: *start,
                        end: start + len,
                        record: SpanRecord {
                            trace_id: [1; 16],
                            span_id: [i as u8 + 1; 8],
                            parent_span_id: None,
                            parent_is_remote: false,
                            name: String::new(),
                            kind: if *server { SpanKind::Server } else { SpanKind::Client },
                            start_unix_ns: 0,
                            end_unix_ns: 0,
                            attributes: Default::default(),
                            resource: Arc::new(Resource { attributes: vec![] }),
                            error: false,
                        },
                    }
                })
                .collect();
            let mut reference = spans.clone();
            link(&mut spans);
            link_reference(&mut reference);
            let parents = |v: &[Closed]| v.iter().map(|c| c.record.parent_span_id).collect::<Vec<_>>();
            proptest::prop_assert_eq!(parents(&spans), parents(&reference));
        }
    }
}
