//! Linking accuracy: does each call an app makes while serving a request
//! carry that request's trace? Real shapes (a gateway pod, a proxy in the
//! app's pod over loopback, the tagflow sidecar), apps that forward no
//! header and sleep 0–20 ms, requests in flight at once. The app names the
//! id it received in its downstream path, the downstream logs (peer port,
//! id), and each app → downstream span is matched by its local port:
//! correct (the request's trace), wrong (another trace) or missing (no
//! span for a logged call).
use std::{
    collections::HashMap,
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use tagflow::ids;

use super::{BenchError, Row};
use crate::{
    collector::{attr_str, Collector, Wire},
    procs::{self, AgentProc, Server},
    topo::{free_port, Lab, Proc, SidecarProc},
};

/// The app: `python3 -c LINK_APP PORT DOWN MODE` (MODE thread or fork).
/// Serves each request after 0–20 ms, calling `http://DOWN/<x-request-id>`
/// without forwarding any header.
const LINK_APP: &str = r#"
import os, random, socketserver, sys, time, urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer
port, down, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        rid = self.headers.get("x-request-id", "none")
        time.sleep(random.random() * 0.02)
        urllib.request.urlopen(f"http://{down}/{rid}", timeout=10).read()
        self.send_response(200)
        self.send_header("content-length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")
class S(HTTPServer):
    allow_reuse_address = True
    request_queue_size = 256
    def server_bind(self):
        socketserver.TCPServer.server_bind(self)
class T(socketserver.ThreadingMixIn, S):
    daemon_threads = True
class F(socketserver.ForkingMixIn, S):
    pass
srv = (F if mode == "fork" else T)(("0.0.0.0", port), H)
print("ready", os.getpid(), flush=True)
srv.serve_forever()
"#;

/// The downstream: `python3 -c LINK_DOWN PORT LOG`; appends
/// `<peer port> <path without />` per request to LOG.
const LINK_DOWN: &str = r#"
import os, socketserver, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
port, log = int(sys.argv[1]), open(sys.argv[2], "a", buffering=1)
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def do_GET(self):
        log.write(f"{self.client_address[1]} {self.path[1:]}\n")
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()
class T(socketserver.ThreadingMixIn, HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256
    def server_bind(self):
        socketserver.TCPServer.server_bind(self)
srv = T(("0.0.0.0", port), H)
print("ready", os.getpid(), flush=True)
srv.serve_forever()
"#;

/// The load: `python3 -c LINK_CLIENT URL N CONC`: N GETs without an id,
/// CONC at a time; prints `done`.
const LINK_CLIENT: &str = r#"
import os, sys, urllib.request
from concurrent.futures import ThreadPoolExecutor
url, n, conc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
print("ready", os.getpid(), flush=True)
sys.stdin.readline()
def one(_):
    with urllib.request.urlopen(url, timeout=30) as r:
        r.read()
with ThreadPoolExecutor(conc) as ex:
    list(ex.map(one, range(n)))
print("done", flush=True)
"#;

const APP_PORT: &str = "8081";
const DOWN_PORT: u16 = 9100;

#[derive(Clone, Copy, PartialEq)]
enum Shape {
    /// nginx in its own pod stamps the id, the app's pod has no proxy.
    Gateway,
    /// nginx inside the app's pod, to the app over 127.0.0.1 (Envoy/Istio).
    InPod,
    /// `tagflow sidecar` inside the app's pod.
    Sidecar,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Gateway => "nginx gateway pod",
            Shape::InPod => "nginx in the app's pod (lo)",
            Shape::Sidecar => "tagflow sidecar",
        }
    }
}

/// Every shape × app × concurrency: `requests` each.
pub fn linking(requests: usize) -> Result<Vec<Row>, BenchError> {
    let mut rows = Vec::new();
    for shape in [Shape::Gateway, Shape::InPod, Shape::Sidecar] {
        rows.extend(shape_rows(shape, requests)?);
    }
    Ok(rows)
}

fn shape_rows(shape: Shape, requests: usize) -> Result<Vec<Row>, BenchError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| BenchError::Other(e.to_string()))?;
    let lab = Lab::new(4)?;
    let (client, gw, app, down) = (&lab.pods[0], &lab.pods[1], &lab.pods[2], &lab.pods[3]);
    let otlp: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let got = Collector::start(&rt, otlp, Wire::Grpc, true);
    let agent = AgentProc::start(&lab, &["--otlp-endpoint", &format!("http://{otlp}")])?;
    let app_ns = tagflow::netns::cookie_of(&app.netns_path())?;
    let dir = std::env::temp_dir().join(format!("tagflow-linking-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| BenchError::Other(e.to_string()))?;
    let log = dir.join("down.log");
    let _down = Proc::python(
        down,
        LINK_DOWN,
        &[&DOWN_PORT.to_string(), &log.to_string_lossy()],
    )?;
    let proxy = format!(
        "server {{ listen 8080; location / {{
           proxy_http_version 1.1; proxy_set_header Connection \"\";
           proxy_set_header X-Request-ID $request_id; proxy_pass http://{}; }} }}",
        if shape == Shape::Gateway {
            format!("{}:{APP_PORT}", app.ip)
        } else {
            "app".into()
        }
    );
    let (_front, url): (Option<Server>, String) = match shape {
        Shape::Gateway => (
            Some(procs::nginx(gw, &dir, &proxy)?),
            format!("http://{}:8080/", gw.ip),
        ),
        Shape::InPod => (
            Some(procs::nginx(app, &dir, &proxy)?),
            format!("http://{}:8080/", app.ip),
        ),
        Shape::Sidecar => (None, format!("http://{}:15080/", app.ip)),
    };
    let _sidecar = match shape {
        Shape::Sidecar => Some(SidecarProc::start(
            app,
            &format!("127.0.0.1:{APP_PORT}"),
            &agent.socket,
        )?),
        _ => None,
    };
    let downstream = format!("{}:{DOWN_PORT}", down.ip);
    let mut rows = Vec::new();
    for mode in ["thread", "fork"] {
        // The previous app's last forked children may hold the port a
        // moment longer.
        let mut tries = 0;
        let _app = loop {
            match Proc::python(app, LINK_APP, &[APP_PORT, &downstream, mode]) {
                Ok(p) => break p,
                Err(_) if tries < 25 => tries += 1,
                Err(e) => return Err(e.into()),
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        std::thread::sleep(Duration::from_millis(300));
        for conc in [1usize, 8] {
            // Truncated, not removed: the downstream appends to its open file.
            std::fs::File::create(&log).map_err(|e| BenchError::Other(e.to_string()))?;
            let t0 = unix_ns();
            let mut c = Proc::python(
                client,
                LINK_CLIENT,
                &[&url, &requests.to_string(), &conc.to_string()],
            )?;
            if c.step()? != "done" {
                return Err(BenchError::Other(format!("{}: load failed", shape.name())));
            }
            let calls = logged_calls(&log);
            let (right, wrong, missing) = score(&got, &calls, app_ns, t0);
            let n = calls.len();
            rows.push(Row {
                scenario: format!("linking: {}, {mode} app, {conc} in flight", shape.name()),
                metric: format!("correct (wrong {wrong}, missing {missing} of {n})"),
                unit: "%".into(),
                value: if n == 0 {
                    0.0
                } else {
                    right as f64 * 100.0 / n as f64
                },
                baseline: None,
                ratio: None,
                target: if conc == 1 || mode == "fork" {
                    if conc == 1 { "== 100" } else { ">= 99" }.into()
                } else {
                    "-".into()
                },
                spread: (right as f64, right as f64),
            });
        }
    }
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(rows)
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// (peer port of the app's call → the request id it served).
fn logged_calls(log: &Path) -> HashMap<u16, String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (port, rid) = l.split_once(' ')?;
            Some((port.parse().ok()?, rid.to_string()))
        })
        .collect()
}

/// Waits for the app's call spans (those started since `t0`) to settle,
/// then scores them against the calls the downstream logged.
fn score(
    got: &Collector,
    calls: &HashMap<u16, String>,
    app_ns: u64,
    t0: u64,
) -> (usize, usize, usize) {
    let spans = |got: &Collector| -> HashMap<u16, [u8; 16]> {
        got.spans()
            .into_iter()
            .filter(|(_, s)| {
                let attr = |k: &str| {
                    s.attributes
                        .iter()
                        .find(|a| a.key == k)
                        .map(|a| attr_str(&a.value))
                };
                s.kind == SpanKind::Client as i32
                    && s.start_time_unix_nano >= t0
                    && attr("tagflow.netns") == Some(app_ns.to_string())
                    && attr("network.peer.port") == Some(DOWN_PORT.to_string())
            })
            .filter_map(|(_, s)| {
                let port = s
                    .attributes
                    .iter()
                    .find(|a| a.key == "network.local.port")
                    .map(|a| attr_str(&a.value))?
                    .parse()
                    .ok()?;
                Some((port, s.trace_id.as_slice().try_into().ok()?))
            })
            .collect()
    };
    // Spans are exported once their trace is quiet: wait until all came,
    // or none came for two looks in a row.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = spans(got);
    let mut still = 0;
    while seen.len() < calls.len() && still < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1500));
        let now = spans(got);
        still = if now.len() == seen.len() {
            still + 1
        } else {
            0
        };
        seen = now;
    }
    let (mut right, mut wrong, mut missing) = (0, 0, 0);
    for (port, rid) in calls {
        let want = ids::map_request_id(rid).map(|(t, _)| t);
        match (seen.get(port), want) {
            (None, _) => missing += 1,
            (Some(t), Ok(w)) if *t == w => right += 1,
            _ => wrong += 1,
        }
    }
    (right, wrong, missing)
}
