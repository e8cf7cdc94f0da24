//! A closed flow as a span: kind, name and the OTel attributes.
use std::{fmt, net::IpAddr};

use agent_common::*;

use super::{
    link::{Answer, Closed},
    Assembler, Open, Reply,
};
use crate::{
    sources::capture::{HeadInfo, Protocol},
    spans::{Attributes, SpanKind, SpanRecord},
};

impl Assembler {
    fn ifname(&mut self, ifindex: u32) -> &str {
        self.ifnames.entry(ifindex).or_insert_with(|| {
            let mut buf = [0u8; libc::IF_NAMESIZE];
            // SAFETY: buffer of IF_NAMESIZE bytes as the call requires.
            let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr().cast()) };
            if p.is_null() {
                format!("if{ifindex}")
            } else {
                let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
                String::from_utf8_lossy(&buf[..end]).into_owned()
            }
        })
    }

    pub(super) fn build(
        &mut self,
        key: &FlowKey,
        trace_id: [u8; 16],
        o: &Open,
        evicted: bool,
    ) -> (SpanRecord, Option<Answer>) {
        let totals = o.totals();
        let s = &totals;
        let (local, peer) = (key.local_ip(), key.remote_ip());
        // Through a Service: the peer is the pod the host sent the call to.
        let via = o.via;
        let (peer_ip, peer_port) = match &via {
            Some(v) => (v.remote_ip(), v.remote_port),
            None => (peer, key.remote_port),
        };
        let transport = if key.proto == PROTO_UDP { "udp" } else { "tcp" };
        let kind = match (s.owner, o.head.as_deref()) {
            (OWNER_CONNECTED, _) => SpanKind::Client,
            (OWNER_BOUND, _) => SpanKind::Server,
            // Packets without a socket (a close's RST, TIME_WAIT's ACK)
            // name no owner: the request head says which end this is.
            (_, Some(h)) if h.reader_end.is_some_and(|r| r.conn == *key) => SpanKind::Server,
            (_, Some(_)) => SpanKind::Client,
            _ if key.local_port < key.remote_port => SpanKind::Server,
            _ => SpanKind::Client,
        };
        // OTel names: `{method}` for HTTP (no route is known here),
        // `{service}/{method}` for gRPC.
        let rpc = o.head.as_deref().and_then(grpc_method);
        let name = match (&o.head, rpc) {
            (Some(_), Some((service, method))) => format!("{service}/{method}"),
            (Some(h), None) => h.method.clone(),
            (None, _) => format!("{transport} {}", fmt_hostport(peer, key.remote_port)),
        };
        // An HTTP call span's attributes take ~400 bytes here.
        let mut a = Attributes::with_capacity(512);
        a.push_str("network.transport", transport);
        let family = if key.family == FAMILY_IPV6 {
            "ipv6"
        } else {
            "ipv4"
        };
        a.push_str("network.type", family);
        a.push_display("network.peer.address", peer_ip);
        a.push_int("network.peer.port", peer_port.into());
        a.push_display("network.local.address", local);
        a.push_int("network.local.port", key.local_port.into());
        a.push_str("network.interface.name", self.ifname(s.ifindex));
        a.push_str("network.interface.direction", "ingress");
        a.push_int("process.pid", s.pid.into());
        a.push_int("tagflow.packets", s.packets as i64);
        a.push_int("tagflow.bytes", s.bytes as i64);
        a.push_display("tagflow.tcp_flags", TcpFlags(s.tcp_flags));
        a.push_str("tagflow.source", source(o.trace_flags));
        let matched = match s.matched {
            MATCH_FLOW => "flow",
            MATCH_THREAD => "thread",
            MATCH_HEAD => "head",
            _ => "pid",
        };
        a.push_str("tagflow.match", matched);
        // The pod (namespace cookie): what pod metadata keys on.
        a.push_int("tagflow.netns", key.netns as i64);
        if evicted {
            a.push_str("tagflow.evicted", "true");
        }
        if let (None, Some(_)) = (&o.head, via) {
            // Through a Service, no request head seen: the Service address
            // is what the caller dialled.
            a.push_display("server.address", peer);
            a.push_int("server.port", key.remote_port.into());
        }
        if let Some(h) = &o.head {
            a.push_str("http.request.method", &h.method);
            let path = h.target.split('?').next().unwrap_or("");
            a.push_str("url.path", path);
            a.push_str("network.protocol.name", "http");
            let version = match h.protocol {
                Protocol::Http1 => "1.1",
                Protocol::Http2 | Protocol::Grpc => "2",
            };
            a.push_str("network.protocol.version", version);
            if let Some((service, method)) = rpc {
                a.push_str("rpc.system", "grpc");
                a.push_str("rpc.service", service);
                a.push_str("rpc.method", method);
            }
            // The server's port: the one dialled (a client's remote port, a
            // server's local one) unless the Host names another.
            let port = if kind == SpanKind::Server {
                key.local_port
            } else {
                key.remote_port
            };
            match (&h.host, via) {
                // The Service address: what the caller dialled.
                (host, Some(_)) => {
                    a.push_display("server.address", peer);
                    a.push_int("server.port", key.remote_port.into());
                    if let Some(host) = host {
                        a.push_str_array("http.request.header.host", &[host]);
                    }
                }
                (Some(host), None) => {
                    let (host, named) = split_host(host);
                    a.push_str("server.address", host);
                    a.push_int("server.port", named.unwrap_or(port).into());
                }
                (None, None) => {}
            }
            push_status(&mut a, &Reply::default(), &o.reply, rpc.is_some());
            if let Some(rid) = &h.request_id {
                a.push_str_array("http.request.header.x-request-id", &[rid]);
                a.push_str("tagflow.request_id", rid);
            }
        }
        // Held and queued spans are what the agent's memory is made of.
        a.shrink_to_fit();
        let error = failed(kind, o.reply.status, rpc.and(o.reply.grpc_status));
        // A request's span: a status read after it closes still reaches it.
        let answer = o.head.as_ref().map(|_| Answer {
            reply: o.reply,
            grpc: rpc.is_some(),
        });
        let record = SpanRecord {
            trace_id,
            span_id: o.span_id,
            parent_span_id: None,
            parent_is_remote: false,
            name,
            kind,
            start_unix_ns: 0,
            end_unix_ns: 0,
            attributes: a,
            resource: o.resource.clone(),
            error,
        };
        (record, answer)
    }
}

/// The status attributes `now` has and `before` had not (a request's
/// span; `grpc`: a gRPC call).
fn push_status(a: &mut Attributes, before: &Reply, now: &Reply, grpc: bool) {
    if let (None, Some(code)) = (before.status, now.status) {
        a.push_int("http.response.status_code", code.into());
    }
    if let (None, Some(code), true) = (before.grpc_status, now.grpc_status, grpc) {
        a.push_int("rpc.grpc.status_code", code.into());
    }
}

impl Closed {
    /// Whether `later` says what this request's span does not know yet (a
    /// span that has its status is an earlier request's, on a connection
    /// that reused the trace).
    pub(super) fn lacks(&self, later: &Reply) -> bool {
        self.answer.is_some_and(|a| {
            (a.reply.status.is_none() && later.status.is_some())
                || (a.reply.grpc_status.is_none() && later.grpc_status.is_some())
        })
    }

    /// What a response block read after the span closed (the agent ran
    /// behind) adds to a request's span: the status it lacked, and its
    /// time. What it already had stays.
    pub(super) fn late_reply(&mut self, later: Reply) {
        let Some(answer) = &mut self.answer else {
            return;
        };
        let before = answer.reply;
        answer.reply = Reply {
            status: before.status.or(later.status),
            grpc_status: before.grpc_status.or(later.grpc_status),
            last_ns: before.last_ns.max(later.last_ns),
        };
        let (now, grpc) = (answer.reply, answer.grpc);
        let r = &mut self.record;
        push_status(&mut r.attributes, &before, &now, grpc);
        r.error = failed(r.kind, now.status, now.grpc_status.filter(|_| grpc));
        self.end = self.end.max(now.last_ns);
    }
}

/// Whether a call failed as the semantic conventions read its status: a
/// gRPC call on any code but OK for its client, on the codes that mean the
/// server failed for its server; HTTP from 400 for a client, from 500 for
/// a server.
fn failed(kind: SpanKind, http: Option<u16>, grpc: Option<u32>) -> bool {
    // UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE,
    // DATA_LOSS.
    const SERVER_FAULTS: [u32; 6] = [2, 4, 12, 13, 14, 15];
    match (kind, grpc, http) {
        (SpanKind::Server, Some(g), _) => SERVER_FAULTS.contains(&g),
        (_, Some(g), _) => g != 0,
        (SpanKind::Server, None, Some(h)) => h >= 500,
        (_, None, Some(h)) => h >= 400,
        _ => false,
    }
}

/// TCP flags as names, "SYN,ACK": formatted where the span is written.
struct TcpFlags(u8);

impl fmt::Display for TcpFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names = ["FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"];
        let mut sep = "";
        for (i, n) in names.iter().enumerate() {
            if self.0 & (1 << i) != 0 {
                write!(f, "{sep}{n}")?;
                sep = ",";
            }
        }
        Ok(())
    }
}

fn source(flags: u32) -> &'static str {
    match TraceSource::from_flags(flags) {
        TraceSource::Registration => "sidecar",
        TraceSource::Passive => "passive",
        TraceSource::Api => "api",
        TraceSource::Unknown => "unknown",
    }
}

fn fmt_hostport(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V6(v6) => format!("[{v6}]:{port}"),
        v4 => format!("{v4}:{port}"),
    }
}

/// A gRPC request's service and method, from its path
/// (`/package.Service/Method`).
fn grpc_method(h: &HeadInfo) -> Option<(&str, &str)> {
    if h.protocol != Protocol::Grpc {
        return None;
    }
    let (service, method) = h.target.strip_prefix('/')?.split_once('/')?;
    (!service.is_empty() && !method.is_empty() && !method.contains('/'))
        .then_some((service, method))
}

/// A `Host` or `:authority` value as (host, port): `[::1]:8080` gives
/// `::1` and 8080; a port that is not a number is left out.
fn split_host(host: &str) -> (&str, Option<u16>) {
    if let Some(rest) = host.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((h, tail)) => (h, tail.strip_prefix(':').and_then(|p| p.parse().ok())),
            None => (host, None),
        };
    }
    match host.rsplit_once(':') {
        // One colon: host:port. More: a bare IPv6 address.
        Some((h, p)) if !h.contains(':') => (h, p.parse().ok()),
        _ => (host, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_read_as_the_semantic_conventions_say() {
        use SpanKind::{Client, Server};
        // gRPC: any code but OK for a client; NOT_FOUND is the caller's
        // problem, not the server's; INTERNAL is the server's.
        assert!(!failed(Client, Some(200), Some(0)));
        assert!(failed(Client, Some(200), Some(5)));
        assert!(!failed(Server, Some(200), Some(5)));
        assert!(failed(Server, Some(200), Some(13)));
        // HTTP: 4xx fails a client, not a server; 5xx both.
        assert!(failed(Client, Some(404), None));
        assert!(!failed(Server, Some(404), None));
        assert!(failed(Server, Some(503), None));
        assert!(!failed(Client, None, None));
    }

    #[test]
    fn hosts_keep_ipv6_addresses_whole() {
        assert_eq!(split_host("[::1]:8080"), ("::1", Some(8080)));
        assert_eq!(split_host("[::1]"), ("::1", None));
        assert_eq!(split_host("::1"), ("::1", None));
        assert_eq!(split_host("example.com:443"), ("example.com", Some(443)));
        assert_eq!(split_host("example.com"), ("example.com", None));
        assert_eq!(split_host("example.com:x"), ("example.com", None));
    }
}
