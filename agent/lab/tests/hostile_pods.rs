//! One pod cannot hurt the node: a hostile pod (an unprivileged process in
//! a lab namespace) attacks the agent through each thing it can reach —
//! the registration socket, the operations endpoint, the capture path, the
//! node-wide owner map — and each attack must fail and be counted while a
//! well-behaved neighbour (curl → nginx with X-Request-ID, in two other
//! pods) keeps being traced. docs/THREAT-MODEL.md maps each to its threat.
mod common;

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    process::Output,
    time::{Duration, Instant},
};

use common::wait_for;
use tagflow::ids;
use tagflow_lab::{
    collector::{Collector, Wire},
    procs::{self, AgentProc},
    topo::{free_port, Lab, Pod},
};

/// nobody:nogroup, the registration socket's group in these tests.
const NOBODY: &str = "65534";
/// The system's interpreter (Debian's python3, bootstrapped): a per-user
/// one under /root is not nobody's to run.
const PYTHON: &str = "/usr/bin/python3";

struct Bed {
    _rt: tokio::runtime::Runtime,
    lab: Lab,
    got: Collector,
    agent: AgentProc,
    /// The node's address as pods see it (the operations endpoint's).
    gw: Ipv4Addr,
    _nginx: procs::Server,
    dir: std::path::PathBuf,
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Pods: 0 hostile, 1 the neighbour's client, 2 its nginx (:8000, also
/// the hostile pod's target where it needs a server).
fn bed(tag: &str, extra: &[&str]) -> Bed {
    let rt = common::runtime();
    let lab = Lab::new(3).unwrap();
    let gw = lab.route_via_host().unwrap();
    let otlp: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let got = Collector::start(&rt, otlp, Wire::Grpc, true);
    let endpoint = format!("http://{otlp}");
    let mut args = vec![
        "--span-idle-ms",
        "300",
        "--otlp-endpoint",
        &endpoint,
        "--socket-group",
        NOBODY,
    ];
    args.extend_from_slice(extra);
    let agent = AgentProc::start_at(&lab, &args, gw).expect("tagflow run");
    let dir = std::env::temp_dir().join(format!("tagflow-hostile-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let body = "server { listen 8000; location / { return 200 \"ok\\n\"; } }";
    let nginx = procs::nginx(&lab.pods[2], &dir, body).unwrap();
    wait_for("nginx", 10, || dir.join("nginx.pid").exists());
    Bed {
        _rt: rt,
        lab,
        got,
        agent,
        gw,
        _nginx: nginx,
        dir,
    }
}

impl Bed {
    fn hostile(&self) -> &Pod {
        &self.lab.pods[0]
    }

    fn metrics(&self) -> HashMap<String, f64> {
        self.agent
            .metrics()
            .expect("metrics answer")
            .expect("parse")
    }

    /// Sum of a metric over its labels.
    fn total(&self, name: &str) -> f64 {
        self.metrics()
            .iter()
            .filter(|(k, _)| *k == name || k.starts_with(&format!("{name}{{")))
            .map(|(_, v)| v)
            .sum()
    }

    /// Five requests from the neighbour, each with its own id; every one
    /// must come back 200 and reach the collector as a trace. A warm-up
    /// request goes first, unchecked: a pod's very first request can end
    /// before the agent has keyed anything of it, attack or not (see
    /// tests/shapes.rs, which allows it the same way).
    fn neighbour_is_traced(&self, tag: &str) {
        let url = format!("http://{}:8000/", self.lab.pods[2].ip);
        let warm = self.lab.pods[1]
            .command("curl")
            .args(["-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(["-H", &format!("X-Request-ID: {tag}-warm-up"), &url])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&warm.stdout), "200", "warm-up");
        std::thread::sleep(Duration::from_millis(200));
        let ids: Vec<String> = (0..5).map(|i| format!("{tag}-{i}")).collect();
        for id in &ids {
            let out = self.lab.pods[1]
                .command("curl")
                .args(["-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}"])
                .args(["-H", &format!("X-Request-ID: {id}"), &url])
                .output()
                .unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout), "200", "{id}");
        }
        let want: Vec<[u8; 16]> = ids
            .iter()
            .map(|i| ids::map_request_id(i).unwrap().0)
            .collect();
        let missing = || {
            let spans = self.got.spans();
            ids.iter()
                .zip(&want)
                .filter(|(_, t)| !spans.iter().any(|(_, s)| s.trace_id.as_slice() == *t))
                .map(|(i, _)| i.clone())
                .collect::<Vec<_>>()
        };
        let t0 = std::time::Instant::now();
        while !missing().is_empty() {
            if t0.elapsed() > Duration::from_secs(20) {
                let m = self.metrics();
                let pick = |k: &str| {
                    m.iter()
                        .filter(|(n, _)| n.starts_with(k))
                        .map(|(n, v)| format!("{n}={v}"))
                        .collect::<Vec<_>>()
                };
                panic!(
                    "no trace for {:?} after 20 s; {} spans received; agent: {:?} {:?} {:?}",
                    missing(),
                    self.got.spans().len(),
                    pick("tagflow_spans_"),
                    pick("tagflow_capture_applied"),
                    pick("tagflow_events_http_heads"),
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `python3 -c script args` in the hostile pod as nobody, in the
    /// background.
    fn spawn_unprivileged(&self, script: &str, args: &[&str]) -> std::thread::JoinHandle<Output> {
        let mut cmd = self.hostile().command("setpriv");
        cmd.args(["--reuid", NOBODY, "--regid", NOBODY, "--clear-groups"])
            .args([PYTHON, "-c", script])
            .args(args);
        std::thread::spawn(move || cmd.output().unwrap())
    }

    /// `python3 -c script args` in the hostile pod as nobody; must succeed.
    fn unprivileged(&self, script: &str, args: &[&str]) -> Output {
        let out = self.spawn_unprivileged(script, args).join().unwrap();
        assert!(
            out.status.success(),
            "hostile script: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// Speaks the registration protocol; `call(type, obj)` → "ok" or the
/// error code.
const PROTOCOL: &str = r#"
import socket, struct, json, sys, os, collections, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
def rx(n):
    b = b''
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            raise SystemExit('agent closed the connection')
        b += c
    return b
def call(ty, obj):
    body = json.dumps(obj).encode()
    s.sendall(struct.pack('>I', 4 + len(body)) + bytes([1, ty, 0, 0]) + body)
    b = rx(struct.unpack('>I', rx(4))[0])
    return ('ok', json.loads(b[4:])) if b[1] == 0x81 else (json.loads(b[4:])['code'], None)
"#;

/// Items 1 and 5 of the threat list: BEGIN repeated 100 000 times for one
/// id (memory must not grow with it), then 2 000 distinct ids (the pod may
/// use the free room of a table, then its quota holds; the last quarter
/// stays for the others).
#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn a_registration_flood_is_bounded_and_counted() {
    let _g = common::lock();
    let cfg = std::env::temp_dir().join(format!("tagflow-quota-{}.toml", std::process::id()));
    // Tables of 1024: the quota holds once one is 3/4 full.
    let maps = "[maps]\ntraces = 1024\nflow_traces = 1024\nentries_per_netns = 64\n";
    std::fs::write(&cfg, maps).unwrap();
    let b = bed("flood", &["--config", cfg.to_str().unwrap()]);
    b.neighbour_is_traced("before-flood");
    let rss0 = b.agent.usage().1;
    let script = format!(
        "{PROTOCOL}{}",
        r#"
pid = os.getpid()
n = collections.Counter()
flow = [{"local": "10.0.0.1:1000", "remote": "10.0.0.2:80"}]
for i in range(100000):
    n[call(1, {"headers": {"x-request-id": "same"}, "target": {"pid": pid}, "flows": flow})[0]] += 1
time.sleep(1.1)  # a full rate bucket again: what refuses now is the quota
for i in range(2000):
    f = [{"local": "10.0.0.1:%d" % (2000 + i), "remote": "10.0.0.2:80"}]
    n["distinct " + call(1, {"headers": {"x-request-id": "id-%d" % i}, "target": {"pid": pid}, "flows": f})[0]] += 1
print(json.dumps(n))
"#
    );
    let out = b.unprivileged(&script, &[b.agent.socket.to_str().unwrap()]);
    let n = json(&out);
    let count = |k: &str| n[k].as_u64().unwrap_or(0);
    eprintln!("hostile registrations: {n}");
    assert!(count("ok") >= 20_000, "the repeated BEGIN is accepted: {n}");
    // Each BEGIN writes both ends of one connection: 2 FLOW_TRACES entries.
    assert!(
        count("distinct ok") >= 300,
        "the pod gets the free room: {n}"
    );
    assert!(count("distinct table_full") >= 1500, "then refusals: {n}");
    let grown = b.agent.usage().1.saturating_sub(rss0);
    assert!(grown < 6 * 1024, "agent RSS grew {grown} KiB");
    // Published with the next snapshot (every second).
    wait_for("the quota refusals in /metrics", 5, || {
        b.total("tagflow_table_quota_refusals_total") >= 1500.0
    });
    let flow_traces = b.metrics()["tagflow_map_entries{map=\"FLOW_TRACES\"}"];
    assert!(
        flow_traces <= 768.0 + 20.0,
        "FLOW_TRACES holds {flow_traces}"
    );
    b.neighbour_is_traced("after-flood");
    let _ = std::fs::remove_file(&cfg);
}

/// Item 2: 50 connections that never finish their request head, and
/// `/status` asked from a pod. Prometheus (another address) still scrapes;
/// the slow ones are refused or cut at the head deadline; `/status` is the
/// node's only.
#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn slow_clients_cannot_take_the_operations_endpoint() {
    let _g = common::lock();
    let b = bed("ops", &[]);
    let port = b.agent.metrics.port().to_string();
    let gw = b.gw.to_string();
    let script = r#"
import socket, sys, time, json
held = []
for i in range(50):
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
    s.settimeout(0.05)
    held.append(s)
t0 = time.time(); closed = {}
while time.time() - t0 < 9 and len(closed) < len(held):
    for i, s in enumerate(held):
        if i in closed: continue
        try:
            if s.recv(1) == b"": closed[i] = time.time() - t0
        except socket.timeout: pass
        except OSError: closed[i] = time.time() - t0
print(json.dumps({"opened": len(held), "closed": len(closed), "last": max(closed.values(), default=0)}))
"#;
    let hostile = b.spawn_unprivileged(script, &[&gw, &port]);
    std::thread::sleep(Duration::from_secs(1));
    // Prometheus, from the node, while the pod holds its connections.
    let t0 = Instant::now();
    let text = procs::http_get(b.agent.metrics, "/metrics").expect("/metrics answers");
    assert!(text.contains("tagflow_ops_connections_refused_total"));
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    let status = procs::http_get(b.agent.metrics, "/status").expect("/status on the node");
    assert!(status.contains("attachments"), "{status}");
    // Another pod (the hostile one has used up its own address's slots).
    let from_pod = b.lab.pods[1]
        .command("curl")
        .args(["-s", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("http://{gw}:{port}/status"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&from_pod.stdout), "403");
    let out = hostile.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = json(&out);
    eprintln!("slow clients: {r}");
    assert_eq!(r["opened"], 50);
    assert_eq!(r["closed"], 50, "every slow connection was closed: {r}");
    assert!(
        r["last"].as_f64().unwrap() < 8.0,
        "cut at the head deadline: {r}"
    );
    let m = b.metrics();
    assert!(m["tagflow_ops_connections_refused_total"] >= 40.0, "{m:?}");
    assert!(m["tagflow_ops_connections_cut_total"] >= 1.0);
    assert!(m["tagflow_ops_status_denied_total"] >= 1.0);
    b.neighbour_is_traced("ops");
}

/// Item 7: requests whose id is unusable, 3 000 on keep-alive connections.
/// Their heads are copied to the shared ring once per connection and
/// second, not per request, so no pod can crowd others' records out.
#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn heads_that_never_apply_are_not_copied_on_every_request() {
    let _g = common::lock();
    let b = bed("heads", &[]);
    let heads0 = b.total("tagflow_events_http_heads_total");
    let script = r#"
import socket, sys, time, json
bad = "x" * 300  # over the 256-byte limit of an id
sent = 0; conns = 0; t0 = time.time()
while sent < 3000:
    s = socket.create_connection((sys.argv[1], 8000)); conns += 1
    f = s.makefile("rb")
    try:
        while sent < 3000:
            s.sendall(("GET / HTTP/1.1\r\nHost: x\r\nX-Request-ID: %s\r\n\r\n" % bad).encode())
            line = f.readline()
            if not line: break
            assert line.startswith(b"HTTP/1.1 200"), line
            length = 0
            while True:
                h = f.readline()
                if h in (b"\r\n", b""): break
                if h.lower().startswith(b"content-length:"): length = int(h.split(b":")[1])
            f.read(length); sent += 1
    except (ConnectionError, BrokenPipeError):
        pass
    s.close()
print(json.dumps({"sent": sent, "connections": conns, "seconds": time.time() - t0}))
"#;
    let out = b.unprivileged(script, &[&b.lab.pods[2].ip.to_string()]);
    let r = json(&out);
    wait_for("the heads to be read", 5, || {
        b.total("tagflow_capture_bad_id_total") >= 1.0
            || b.total("tagflow_events_http_heads_total") > heads0
    });
    std::thread::sleep(Duration::from_millis(500));
    let heads = b.total("tagflow_events_http_heads_total") - heads0;
    let (conns, secs) = (
        r["connections"].as_f64().unwrap(),
        r["seconds"].as_f64().unwrap(),
    );
    eprintln!("bad-id requests: {r}; heads copied: {heads}");
    assert_eq!(r["sent"], 3000);
    // One per connection and per skip period (1 s), with slack, plus the
    // requests sent while the agent had not yet read the first head: at
    // 15 k requests/s a busy two-core machine has held it off for 3–6 ms
    // (38 and 86 copies), where it usually answers within a request or two.
    // Copying every request would be 3000.
    assert!(
        heads <= 2.0 * (conns + secs + 2.0) + 3000.0 / 10.0,
        "{heads} heads copied for {r}"
    );
    assert!(b.total("tagflow_datapath_packets_total{counter=\"ringbuf_full\"}") == 0.0);
    b.neighbour_is_traced("heads");
}

/// Item 5: a bind loop over every port (most fail: privileged or taken)
/// fills the node-wide owner map; the agent notices the pressure and
/// re-learns the listeners from /proc.
#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn a_bind_flood_cannot_lose_other_pods_listeners() {
    let _g = common::lock();
    let b = bed("binds", &[]);
    let script = r#"
import socket, json
tried = 0; failed = 0
for port in range(1, 65536):
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        s = socket.socket(socket.AF_INET, kind); tried += 1
        try: s.bind(("0.0.0.0", port))
        except OSError: failed += 1
        s.close()
print(json.dumps({"tried": tried, "failed": failed}))
"#;
    let r = json(&b.unprivileged(script, &[]));
    eprintln!("bind flood: {r}");
    assert!(
        r["failed"].as_u64().unwrap() >= 1000,
        "privileged ports fail: {r}"
    );
    let fill = |b: &Bed| b.metrics()["tagflow_map_entries{map=\"BOUND_PORTS\"}"];
    wait_for("BOUND_PORTS near full", 15, || {
        let m = b.metrics();
        m["tagflow_map_entries{map=\"BOUND_PORTS\"}"]
            >= 0.9 * m["tagflow_map_capacity{map=\"BOUND_PORTS\"}"]
    });
    eprintln!("BOUND_PORTS holds {}", fill(&b));
    // The map is sampled every 10 s; a scan follows the first full sample.
    // Which listeners the LRU evicted varies, so what the scan put back is
    // reported, and the neighbour's tracing is what must hold.
    wait_for("a listener scan", 40, || {
        b.total("tagflow_bound_ports_scans_total") >= 1.0
    });
    std::thread::sleep(Duration::from_secs(1));
    eprintln!(
        "listeners re-learnt: {}",
        b.total("tagflow_bound_ports_relearned_total")
    );
    b.neighbour_is_traced("binds");
}

/// Item 9: a pod with its own pid namespace names its process by the pid
/// it sees (1 here), and a dual-stack socket's IPv4-mapped addresses; the
/// agent finds the process and keys the wire's IPv4.
#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn a_pid_is_read_in_the_pods_own_pid_namespace() {
    let _g = common::lock();
    let b = bed("pidns", &[]);
    let script = format!(
        "{PROTOCOL}{}",
        r#"
flow = [{"local": "[::ffff:10.0.0.1]:1000", "remote": "[::ffff:10.0.0.2]:80"}]
code, ok = call(1, {"headers": {"x-request-id": "pidns"}, "target": {"pid": os.getpid()}, "flows": flow})
print(json.dumps({"me": os.getpid(), "code": code, "reply": ok}))
"#
    );
    let out = b
        .hostile()
        .command("unshare")
        .args(["--pid", "--fork", "--mount-proc", "python3", "-c", &script])
        .arg(&b.agent.socket)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = json(&out);
    eprintln!("own pid namespace: {r}");
    assert_eq!(r["me"], 1, "the script is its namespace's pid 1");
    assert_eq!(r["code"], "ok", "{r}");
    let pid = r["reply"]["pids"][0].as_u64().unwrap();
    assert_ne!(pid, 1, "the node's pid 1 is not the pod's");
    assert_eq!(r["reply"]["flows"], 1);
    b.neighbour_is_traced("pidns");
}

/// Item 6: ten connections sending registrations that make the agent walk
/// /proc and wait for an accept that never comes. The walks run on the
/// blocking pool, two at a time for the pod: health checks, export and
/// the neighbour's tracing do not wait for them.
#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn slow_registrations_do_not_stall_the_agent() {
    let _g = common::lock();
    let b = bed("walks", &[]);
    let script = format!(
        "{PROTOCOL}{}",
        r#"
import threading
codes = collections.Counter(); lock = threading.Lock()
def worker(k):
    c = socket.socket(socket.AF_UNIX); c.connect(sys.argv[1])
    for i in range(20):
        # A connection to port 9 that nobody accepted: the agent polls for
        # its server, then finds no listener.
        f = [{"local": "10.0.0.1:%d" % (3000 + 100 * k + i), "remote": "10.0.0.2:9"}]
        body = json.dumps({"headers": {"x-request-id": "w"}, "target": {"port": 9}, "flows": f}).encode()
        c.sendall(struct.pack('>I', 4 + len(body)) + bytes([1, 1, 0, 0]) + body)
        n = struct.unpack('>I', c.recv(4, socket.MSG_WAITALL))[0]
        b = c.recv(n, socket.MSG_WAITALL)
        with lock: codes['ok' if b[1] == 0x81 else json.loads(b[4:])['code']] += 1
ts = [threading.Thread(target=worker, args=(k,)) for k in range(10)]
t0 = time.time()
[t.start() for t in ts]; [t.join() for t in ts]
codes['seconds'] = time.time() - t0
print(json.dumps(codes))
"#
    );
    let socket = b.agent.socket.to_str().unwrap().to_string();
    let hostile = b.spawn_unprivileged(&script, &[&socket]);
    std::thread::sleep(Duration::from_millis(300));
    let mut worst = Duration::ZERO;
    while !hostile.is_finished() {
        let t0 = Instant::now();
        assert!(procs::http_get(b.agent.metrics, "/healthz").is_some());
        worst = worst.max(t0.elapsed());
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = hostile.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = json(&out);
    eprintln!("slow registrations: {r}; worst /healthz {worst:?}");
    assert_eq!(r["no_listener"], 200, "{r}");
    assert!(
        worst < Duration::from_millis(250),
        "/healthz took {worst:?}"
    );
    assert!(b.total("tagflow_registration_proc_walks_total") >= 200.0);
    b.neighbour_is_traced("walks");
}
