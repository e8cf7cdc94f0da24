//! A closed flow as a span: kind, name and the OTel attributes.
use std::{borrow::Cow, net::IpAddr};

use agent_common::*;

use super::{Assembler, Open};
use crate::{
    sources::capture::{HeadInfo, Protocol},
    spans::{kv, KeyValue, SpanKind, SpanRecord, Value},
};

impl Assembler {
    fn ifname(&mut self, ifindex: u32) -> String {
        self.ifnames
            .entry(ifindex)
            .or_insert_with(|| {
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
            .clone()
    }

    pub(super) fn build(
        &mut self,
        key: &FlowKey,
        trace_id: [u8; 16],
        o: &Open,
        evicted: bool,
    ) -> SpanRecord {
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
        let kind = match s.owner {
            OWNER_CONNECTED => SpanKind::Client,
            OWNER_BOUND => SpanKind::Server,
            _ if key.local_port < key.remote_port => SpanKind::Server,
            _ => SpanKind::Client,
        };
        // OTel names: `{method}` for HTTP (no route is known here),
        // `{service}/{method}` for gRPC.
        let rpc = o.head.as_ref().and_then(grpc_method);
        let name = match (&o.head, rpc) {
            (Some(_), Some((service, method))) => format!("{service}/{method}"),
            (Some(h), None) => h.method.clone(),
            (None, _) => format!("{transport} {}", fmt_hostport(peer, key.remote_port)),
        };
        let mut a: Vec<KeyValue> = vec![
            kv("network.transport", Value::Str(transport.into())),
            kv(
                "network.type",
                Value::Str(
                    if key.family == FAMILY_IPV6 {
                        "ipv6"
                    } else {
                        "ipv4"
                    }
                    .into(),
                ),
            ),
            kv(
                "network.peer.address",
                Value::Str(peer_ip.to_string().into()),
            ),
            kv("network.peer.port", Value::Int(peer_port as i64)),
            kv(
                "network.local.address",
                Value::Str(local.to_string().into()),
            ),
            kv("network.local.port", Value::Int(key.local_port as i64)),
            kv(
                "network.interface.name",
                Value::Str(self.ifname(s.ifindex).into()),
            ),
            kv("network.interface.direction", Value::Str("ingress".into())),
            kv("process.pid", Value::Int(s.pid as i64)),
            kv("tagflow.packets", Value::Int(s.packets as i64)),
            kv("tagflow.bytes", Value::Int(s.bytes as i64)),
            kv(
                "tagflow.tcp_flags",
                Value::Str(tcp_flags(s.tcp_flags).into()),
            ),
            kv("tagflow.source", Value::Str(source(o.trace_flags).into())),
            kv(
                "tagflow.match",
                Value::Str(
                    match s.matched {
                        MATCH_FLOW => "flow",
                        MATCH_THREAD => "thread",
                        _ => "pid",
                    }
                    .into(),
                ),
            ),
            // The pod (namespace cookie): what pod metadata keys on.
            kv("tagflow.netns", Value::Int(key.netns as i64)),
        ];
        if evicted {
            a.push(kv("tagflow.evicted", Value::Str("true".into())));
        }
        if let (None, Some(_)) = (&o.head, via) {
            // Through a Service, no request head seen: the Service address
            // is what the caller dialled.
            a.push(kv("server.address", Value::Str(peer.to_string().into())));
            a.push(kv("server.port", Value::Int(key.remote_port as i64)));
        }
        if let Some(h) = &o.head {
            a.push(kv("http.request.method", Value::Str(method(&h.method))));
            let path = h.target.split('?').next().unwrap_or("");
            a.push(kv("url.path", Value::Str(path.to_string().into())));
            a.push(kv("network.protocol.name", Value::Str("http".into())));
            let version = match h.protocol {
                Protocol::Http1 => "1.1",
                Protocol::Http2 | Protocol::Grpc => "2",
            };
            a.push(kv("network.protocol.version", Value::Str(version.into())));
            if let Some((service, method)) = rpc {
                a.push(kv("rpc.system", Value::Str("grpc".into())));
                a.push(kv("rpc.service", Value::Str(service.to_string().into())));
                a.push(kv("rpc.method", Value::Str(method.to_string().into())));
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
                    a.push(kv("server.address", Value::Str(peer.to_string().into())));
                    a.push(kv("server.port", Value::Int(key.remote_port as i64)));
                    if let Some(host) = host {
                        a.push(kv(
                            "http.request.header.host",
                            Value::StrArray(vec![host.clone()]),
                        ));
                    }
                }
                (Some(host), None) => {
                    let (host, named) = split_host(host);
                    a.push(kv("server.address", Value::Str(host.to_string().into())));
                    a.push(kv("server.port", Value::Int(named.unwrap_or(port) as i64)));
                }
                (None, None) => {}
            }
            if let Some(code) = o.reply.status {
                a.push(kv("http.response.status_code", Value::Int(code as i64)));
            }
            if let (Some(code), Some(_)) = (o.reply.grpc_status, rpc) {
                a.push(kv("rpc.grpc.status_code", Value::Int(code as i64)));
            }
            if let Some(rid) = &h.request_id {
                a.push(kv(
                    "http.request.header.x-request-id",
                    Value::StrArray(vec![rid.clone()]),
                ));
                a.push(kv("tagflow.request_id", Value::Str(rid.clone().into())));
            }
        }
        // Held and queued spans are what the agent's memory is made of.
        a.shrink_to_fit();
        let error = failed(kind, o.reply.status, rpc.and(o.reply.grpc_status));
        SpanRecord {
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
        }
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

/// The standard methods as static words (no allocation per span).
fn method(m: &str) -> Cow<'static, str> {
    const KNOWN: [&str; 9] = [
        "GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS", "CONNECT", "TRACE",
    ];
    match KNOWN.iter().find(|k| **k == m) {
        Some(k) => Cow::Borrowed(k),
        None => Cow::Owned(m.to_string()),
    }
}

fn tcp_flags(f: u8) -> String {
    let names = ["FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"];
    names
        .iter()
        .enumerate()
        .filter(|(i, _)| f & (1 << i) != 0)
        .map(|(_, n)| *n)
        .collect::<Vec<_>>()
        .join(",")
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
