//! gRPC processes for the lab, on Python's `grpcio` (PyPI; `cargo xtask
//! test` installs it): a server app that calls a downstream while serving
//! and forwards nothing, and a client that sends calls over one channel
//! (one HTTP/2 connection), several at once. Raw bytes: no stubs needed.
//! The app says which request it served and from which port it called:
//! `linking` holds the spans to that.
use std::collections::HashMap;

use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

use crate::{
    collector::{attr_str, Collector},
    topo::{Proc, TopoError},
};

/// The downstream port `GRPC_APP` calls.
pub const DOWN_PORT: u16 = 9000;

/// What the app served: (x-request-id, local port of its downstream call),
/// `n` lines of its output.
pub fn served(app: &mut Proc, n: usize) -> Result<Vec<(String, u16)>, TopoError> {
    (0..n)
        .map(|_| {
            let l = app.line()?;
            l.split_once(' ')
                .and_then(|(rid, port)| Some((rid.to_string(), port.parse().ok()?)))
                .ok_or(TopoError::NotReady(format!("the app said {l:?}")))
        })
        .collect()
}

/// The app's downstream calls against what it served: correct (under the
/// served request's trace), wrong (another trace) or missing (no span).
#[derive(Debug, Default, Clone, Copy)]
pub struct Linking {
    pub correct: usize,
    pub wrong: usize,
    pub missing: usize,
}

pub fn linking(got: &Collector, app_pid: u32, served: &[(String, u16)]) -> Linking {
    let attr = |s: &opentelemetry_proto::tonic::trace::v1::Span, key: &str| {
        s.attributes
            .iter()
            .find(|a| a.key == key)
            .map(|a| attr_str(&a.value))
    };
    let by_port: HashMap<String, Vec<u8>> = got
        .spans()
        .iter()
        .filter(|(_, s)| {
            s.kind == SpanKind::Client as i32
                && attr(s, "process.pid") == Some(app_pid.to_string())
                && attr(s, "network.peer.port") == Some(DOWN_PORT.to_string())
        })
        .filter_map(|(_, s)| Some((attr(s, "network.local.port")?, s.trace_id.clone())))
        .collect();
    let mut l = Linking::default();
    for (rid, port) in served {
        let want = tagflow::ids::map_request_id(rid).map(|m| m.0.to_vec());
        match (by_port.get(&port.to_string()), want) {
            (Some(t), Ok(w)) if *t == w => l.correct += 1,
            (Some(_), _) => l.wrong += 1,
            (None, _) => l.missing += 1,
        }
    }
    l
}

/// `python3 -c GRPC_APP LISTEN DOWNSTREAM` where LISTEN is `host:port` and
/// DOWNSTREAM the `host:port` of an echo server. Serves `/shop.Cart/Add`
/// from a pool of 8 threads: sleeps 5 ms, calls the downstream (4 bytes
/// and their echo), answers the request's bytes, or fails with NOT_FOUND
/// (gRPC status 5) when they are `fail`. Prints `ready <pid>`,
/// then per call `<x-request-id or -> <local port of its downstream call>`.
pub const GRPC_APP: &str = r#"
import os, socket, sys, threading, time, grpc
from concurrent import futures
listen, down = sys.argv[1], sys.argv[2]
out = threading.Lock()
dhost, dport = down.rsplit(":", 1)
def add(req, ctx):
    rid = dict(ctx.invocation_metadata()).get("x-request-id", "-")
    time.sleep(0.005)
    with socket.create_connection((dhost, int(dport)), timeout=5) as s:
        port = s.getsockname()[1]
        s.sendall(b"ping")
        s.recv(16)
    with out:
        sys.stdout.write(f"{rid} {port}\n")
        sys.stdout.flush()
    if req == b"fail":
        ctx.abort(grpc.StatusCode.NOT_FOUND, "no such cart")
    return req
h = grpc.method_handlers_generic_handler(
    "shop.Cart", {"Add": grpc.unary_unary_rpc_method_handler(add)})
server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
server.add_generic_rpc_handlers((h,))
server.add_insecure_port(listen)
server.start()
print("ready", os.getpid(), flush=True)
server.wait_for_termination()
"#;

/// `python3 -c GRPC_CLIENT TARGET N CONCURRENCY PREFIX [FAIL_EVERY]`:
/// prints `ready <pid>`, waits for a line, makes N calls to
/// `/shop.Cart/Add` on one channel, CONCURRENCY at a time, each with
/// `x-request-id: PREFIX-<i>` (none when PREFIX is `-`); every
/// FAIL_EVERY-th call (i % FAIL_EVERY == FAIL_EVERY - 1) asks the app to
/// fail. Prints `ok <i>` per call answered as asked, then `done`.
pub const GRPC_CLIENT: &str = r#"
import os, sys, grpc
from concurrent import futures
target, n, conc, prefix = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
every = int(sys.argv[5]) if len(sys.argv) > 5 else 0
ch = grpc.insecure_channel(target)
call = ch.unary_unary("/shop.Cart/Add")
print("ready", os.getpid(), flush=True)
sys.stdin.readline()
def one(i):
    md = [] if prefix == "-" else [("x-request-id", f"{prefix}-{i}")]
    if every and i % every == every - 1:
        try:
            call(b"fail", metadata=md, timeout=10)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return i
            raise
        raise SystemExit(f"call {i} should have failed")
    call(b"hello", metadata=md, timeout=10)
    return i
with futures.ThreadPoolExecutor(conc) as ex:
    for i in ex.map(one, range(n)):
        print("ok", i, flush=True)
print("done", flush=True)
sys.stdin.readline()
"#;
