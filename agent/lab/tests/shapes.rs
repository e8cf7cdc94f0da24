//! Traces in the shapes real clusters have, end to end through `tagflow
//! run`: third-party proxies stamp `X-Request-ID`, apps forward nothing,
//! and every call an app makes while serving must carry the id of the
//! request it serves.
mod common;

use std::{net::SocketAddr, time::Duration};

use common::{wait_for, Agent};
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, Span};
use tagflow::ids;
use tagflow_lab::{
    collector::{attr_str, Collector, Wire},
    node::{self, Node},
    procs::{self, AgentProc},
    service::Service,
    topo::{free_port, Lab, Proc, SidecarProc, ECHO_SERVER, HTTP_APP, HTTP_CLIENT},
};

const REQUESTS: usize = 20;

fn attr(s: &Span, key: &str) -> Option<String> {
    s.attributes
        .iter()
        .find(|a| a.key == key)
        .map(|a| attr_str(&a.value))
}

/// The spans of `trace`, one per line, for a failure message: a wrong
/// link is diagnosed from which spans there were and what each saw.
fn trace_spans(got: &Collector, trace: &[u8]) -> String {
    let mut out = String::new();
    for (_, s) in got.spans().iter().filter(|(_, s)| s.trace_id == trace) {
        let attrs: Vec<String> = s
            .attributes
            .iter()
            .map(|a| format!("{}={}", a.key, attr_str(&a.value)))
            .collect();
        out += &format!(
            "\n  kind {} id {:02x?} parent {:02x?} {}..{} {}",
            s.kind,
            s.span_id,
            s.parent_span_id,
            s.start_time_unix_nano,
            s.end_time_unix_nano,
            attrs.join(" ")
        );
    }
    out
}

/// Trace ids (hex) of the CLIENT spans that `pid` opened to port `port`.
fn calls(got: &Collector, pid: u32, port: u16) -> Vec<String> {
    got.spans()
        .iter()
        .filter(|(_, s)| {
            s.kind == SpanKind::Client as i32
                && attr(s, "network.peer.port") == Some(port.to_string())
                && attr(s, "process.pid") == Some(pid.to_string())
        })
        .map(|(_, s)| ids::to_hex(&s.trace_id))
        .collect()
}

/// What a failed linking check needs to be read: the process's spans by
/// kind and peer port, and the agent's counters of what it gave up or
/// re-attributed.
fn diagnosis(got: &Collector, agent: &Agent, pid: u32) -> String {
    let mut spans = std::collections::BTreeMap::<_, usize>::new();
    for (_, s) in got.spans().iter() {
        if attr(s, "process.pid") == Some(pid.to_string()) {
            *spans
                .entry((s.kind, attr(s, "network.peer.port")))
                .or_default() += 1;
        }
    }
    let counters: Vec<String> = agent
        .metrics()
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, v)| {
            *v != 0.0
                && [
                    "lost",
                    "missing",
                    "unclaimed",
                    "untraced",
                    "reattributed",
                    "after_end",
                    "full",
                    "races",
                    "dropped",
                    "pending",
                    "evicted",
                    "no_listener",
                ]
                .iter()
                .any(|w| k.contains(w))
        })
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    format!("the app's spans by (kind, peer port) {spans:?}; agent counters {counters:?}")
}

/// nginx's `$request_id` of every request it proxied, as trace ids, in
/// the order served.
fn logged_ids(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("access.log"))
        .unwrap_or_default()
        .lines()
        .map(|r| ids::to_hex(&ids::map_request_id(r).unwrap().0))
        .collect()
}

/// nginx in `pod` answering 200 on `port`; its directory goes with it.
struct Answering {
    _nginx: procs::Server,
    dir: std::path::PathBuf,
}

impl Answering {
    fn start(pod: &tagflow_lab::topo::Pod, port: u16, tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("tagflow-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let body = format!("server {{ listen {port}; location / {{ return 200 \"ok\\n\"; }} }}");
        let nginx = procs::nginx(pod, &dir, &body).unwrap();
        wait_for("nginx", 10, || dir.join("nginx.pid").exists());
        Self { _nginx: nginx, dir }
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `REQUESTS` curls from `client` to `url`, one process and connection
/// each, with `X-Request-ID: <prefix>-<i>`; every one must get a 200.
fn curl_each(client: &tagflow_lab::topo::Pod, url: &str, prefix: &str) {
    for i in 0..REQUESTS {
        let out = client
            .command("curl")
            .args(["-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}"])
            .args(["-H", &format!("X-Request-ID: {prefix}-{i}"), url])
            .output()
            .unwrap();
        let code = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            code,
            "200",
            "curl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Where nginx stamps the ids: a gateway pod in front of the app's pod,
/// or inside the app's pod, handing requests over on 127.0.0.1 with
/// keep-alive (the Envoy/Istio shape).
#[derive(Clone, Copy, PartialEq)]
enum Nginx {
    GatewayPod,
    InPod,
}

fn every_call_carries_the_request_id_nginx_stamped(shape: Nginx) {
    let _g = common::lock();
    let rt = common::runtime();
    let lab = Lab::new(4).unwrap();
    let (client, gw, app, down) = (&lab.pods[0], &lab.pods[1], &lab.pods[2], &lab.pods[3]);
    let otlp: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let got = Collector::start(&rt, otlp, Wire::Grpc, true);
    let agent = Agent::start(&lab, &["--otlp-endpoint", &format!("http://{otlp}")]);

    let _echo = Proc::python(down, ECHO_SERVER, &["9000"]).unwrap();
    // The app calls the downstream while serving and forwards no header.
    let app_port = if shape == Nginx::InPod {
        "8081"
    } else {
        "8000"
    };
    let downstream = format!("{}:9000", down.ip);
    let app_proc = Proc::python(app, HTTP_APP, &[app_port, &downstream, "thread"]).unwrap();
    let dir =
        std::env::temp_dir().join(format!("tagflow-shapes-{}-{app_port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (nginx_pod, upstream) = match shape {
        Nginx::GatewayPod => (gw, format!("{}:8000", app.ip)),
        Nginx::InPod => (app, "app".to_string()),
    };
    let body = format!(
        "log_format rid '$request_id';
  server {{
    listen 8080;
    access_log {}/access.log rid;
    location / {{
      proxy_http_version 1.1; proxy_set_header Connection \"\";
      proxy_set_header X-Request-ID $request_id; proxy_pass http://{upstream};
    }}
  }}",
        dir.display(),
    );
    let nginx = procs::nginx(nginx_pod, &dir, &body).unwrap();
    wait_for("nginx", 10, || dir.join("nginx.pid").exists());

    let url = format!("http://{}:8080/", nginx_pod.ip);
    let mut c = Proc::python(client, HTTP_CLIENT, &[&url, "-", &REQUESTS.to_string()]).unwrap();
    assert_eq!(c.run_until_done().unwrap().len(), REQUESTS);
    // Every request is exact at the span level: a call that beats the
    // agent is re-attributed, and one that beats the agent's first look at
    // the pod (its gate still shut) is handed over by the datapath because
    // a head just reached that pod.
    let t0 = std::time::Instant::now();
    while calls(&got, app_proc.pid, 9000).len() < REQUESTS {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "timed out waiting for the app's calls as spans: {}",
            diagnosis(&got, &agent, app_proc.pid)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    common::wait_settled(&agent, 30);
    drop(nginx);
    let logged = logged_ids(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(logged.len(), REQUESTS, "nginx logged one id per request");

    let traces = calls(&got, app_proc.pid, 9000);
    let m = agent.metrics().unwrap();
    let races = m["tagflow_linking_receiver_races_lost_total"];
    let per_request: Vec<usize> = logged
        .iter()
        .map(|id| traces.iter().filter(|t| *t == id).count())
        .collect();
    let context = format!(
        "{} call spans, races lost and re-attributed: {races}; calls per request in order {per_request:?}; {}",
        traces.len(),
        diagnosis(&got, &agent, app_proc.pid)
    );
    let wrong: Vec<_> = traces.iter().filter(|t| !logged.contains(*t)).collect();
    assert!(
        wrong.is_empty(),
        "calls under no nginx id: {wrong:?} ({context})"
    );
    for (i, id) in logged.iter().enumerate() {
        let n = traces.iter().filter(|t| *t == id).count();
        assert_eq!(
            n,
            1,
            "request {}: call spans under its id ({context})",
            i + 1
        );
    }
    eprintln!("{context}");
    assert!(m["tagflow_linking_receivers_keyed_total"] >= REQUESTS as f64);
    if shape == Nginx::InPod {
        assert_eq!(m["tagflow_attached_loopbacks"], lab.pods.len() as f64);
    }
}

#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn an_app_behind_an_nginx_gateway_pod_carries_its_ids_into_its_calls() {
    every_call_carries_the_request_id_nginx_stamped(Nginx::GatewayPod);
}

#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn an_app_behind_nginx_in_its_own_pod_over_loopback_carries_its_ids_into_its_calls() {
    every_call_carries_the_request_id_nginx_stamped(Nginx::InPod);
}

/// kube-proxy's shape: curl in pod A calls a ClusterIP that the host DNATs
/// (and masquerades) to nginx in pod C. The caller's veth sees the
/// ClusterIP, C's the node's address: only conntrack joins the two ends.
/// Every request's client span must parent C's server span, name the
/// Service as `server.address` and the pod as the peer.
#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn a_call_through_a_service_address_parents_the_server_span_of_the_pod_behind_it() {
    let _g = common::lock();
    let rt = common::runtime();
    let lab = Lab::new(2).unwrap();
    lab.route_via_host().unwrap();
    let (client, callee) = (&lab.pods[0], &lab.pods[1]);
    let vip = lab.service_ip();
    let _svc = Service::new(vip, 80, callee.ip, 9100, &lab.cidr()).unwrap();
    let otlp: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let got = Collector::start(&rt, otlp, Wire::Grpc, true);
    let agent = Agent::start(&lab, &["--otlp-endpoint", &format!("http://{otlp}")]);
    let nginx = Answering::start(callee, 9100, "svc");
    curl_each(client, &format!("http://{vip}/"), "svc");
    let trace = |i: usize| ids::map_request_id(&format!("svc-{i}")).unwrap().0.to_vec();
    let pair = |i: usize| {
        let spans = got.spans();
        let t = trace(i);
        let of = |kind: SpanKind| {
            spans
                .iter()
                .filter(|(_, s)| s.trace_id == t && s.kind == kind as i32)
                .map(|(_, s)| s.clone())
                .collect::<Vec<_>>()
        };
        // The server span of the request's own connection; a later
        // connection's handshake may also carry the trace (the reader's
        // process key still holds it: issue "precise attribution").
        let c = of(SpanKind::Client).into_iter().next()?;
        let servers = of(SpanKind::Server);
        let s = servers
            .iter()
            .find(|s| s.parent_span_id == c.span_id)
            .or(servers.first())?;
        Some((c, s.clone()))
    };
    // The first request may be answered and closed before the agent keys
    // nginx (nothing of it carries the trace, so it has no server span:
    // never a wrong one); the process key makes every later one exact.
    let t0 = std::time::Instant::now();
    while !(1..REQUESTS).all(|i| pair(i).is_some()) {
        if t0.elapsed() > Duration::from_secs(20) {
            // Which requests, and what their trace and the one before got.
            let mut spans = String::new();
            for i in (1..REQUESTS).filter(|i| pair(*i).is_none()) {
                spans += &format!("\nrequest {i}:{}", trace_spans(&got, &trace(i)));
                spans += &format!("\nrequest {}:{}", i - 1, trace_spans(&got, &trace(i - 1)));
            }
            panic!(
                "timed out waiting for a client and a server span per request{spans}\n{:?}",
                agent.metrics()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    drop(nginx);
    for i in 0..REQUESTS {
        let Some((c, s)) = pair(i) else {
            assert_eq!(i, 0, "request {i}: no client or server span");
            continue;
        };
        let servers = got
            .spans()
            .iter()
            .filter(|(_, x)| x.trace_id == c.trace_id && x.kind == SpanKind::Server as i32)
            .count();
        assert_eq!(
            servers,
            1,
            "request {i}: server spans under its trace:{}",
            trace_spans(&got, &c.trace_id)
        );
        assert_eq!(
            s.parent_span_id,
            c.span_id,
            "request {i}: server under client; the trace's spans:{}",
            trace_spans(&got, &c.trace_id)
        );
        assert_eq!(attr(&c, "server.address"), Some(vip.to_string()));
        assert_eq!(attr(&c, "server.port").as_deref(), Some("80"));
        assert_eq!(
            attr(&c, "network.peer.address"),
            Some(callee.ip.to_string())
        );
        assert_eq!(attr(&c, "network.peer.port").as_deref(), Some("9100"));
        assert_eq!(attr(&s, "network.local.port").as_deref(), Some("9100"));
    }
    let m = agent.metrics().unwrap();
    assert!(
        m["tagflow_linking_services_translated_total"] >= REQUESTS as f64,
        "{:?}",
        m.get("tagflow_linking_services_errors_total")
    );
}

/// Two nodes, each a namespace with its own bridge, pod and agent, joined
/// by a veth standing for the wire; both agents export to one receiver.
/// curl on node 1 calls nginx on node 2 by pod address. Node 2's agent
/// sees the request only on its uplink; the agents never talk, yet node
/// 2's server span must hang off node 1's client span.
#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn a_request_served_on_another_node_links_both_agents_spans() {
    let _g = common::lock();
    let rt = common::runtime();
    let (n1, n2) = (Node::new().unwrap(), Node::new().unwrap());
    let (w1, w2) = node::wire(&n1, &n2).unwrap();
    let (lab1, lab2) = (
        Lab::on_node(&n1.name, 1).unwrap(),
        Lab::on_node(&n2.name, 1).unwrap(),
    );
    lab1.route_via_host().unwrap();
    lab2.route_via_host().unwrap();
    n1.route(&lab2.cidr(), w2).unwrap();
    n2.route(&lab1.cidr(), w1).unwrap();
    let (client, callee) = (&lab1.pods[0], &lab2.pods[0]);

    let port = free_port();
    let got = Collector::start(&rt, ([0, 0, 0, 0], port).into(), Wire::Grpc, true);
    let agent = |n: &Node, lab: &Lab| {
        let otlp = format!("http://{}:{port}", n.host_mgmt);
        AgentProc::start_on(
            n,
            lab,
            &[
                "--uplink",
                "wire0",
                "--span-idle-ms",
                "300",
                "--otlp-endpoint",
                &otlp,
            ],
        )
        .unwrap()
    };
    let (a1, a2) = (agent(&n1, &lab1), agent(&n2, &lab2));
    assert_eq!(a2.metric("tagflow_attached_uplinks"), 1.0);

    let nginx = Answering::start(callee, 9100, "nodes");
    curl_each(client, &format!("http://{}:9100/", callee.ip), "node");
    let trace = |i: usize| {
        ids::map_request_id(&format!("node-{i}"))
            .unwrap()
            .0
            .to_vec()
    };
    let spans_of = |i: usize, kind: SpanKind| {
        got.spans()
            .into_iter()
            .filter(|(_, s)| s.trace_id == trace(i) && s.kind == kind as i32)
            .map(|(_, s)| s)
            .collect::<Vec<_>>()
    };
    // A request can be over before an agent has keyed it (curl is a new
    // process per request and its whole exchange takes well under a
    // millisecond): the datapath counts such connections once their head
    // passed, and the agent files them under the head's trace afterwards.
    // Only the very first request on node 2 may go without a server span
    // (nginx is not keyed yet and its pod's namespace carries no trace:
    // nothing was counted) — missing, never wrong.
    let linked = |i: usize| {
        let (c, s) = (spans_of(i, SpanKind::Client), spans_of(i, SpanKind::Server));
        c.len() == 1 && s.len() == 1 && s[0].parent_span_id == c[0].span_id
    };
    let t0 = std::time::Instant::now();
    while (0..REQUESTS).filter(|&i| linked(i)).count() < REQUESTS
        && t0.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(500));
    drop(nginx);
    let mut missing = Vec::new();
    for i in 0..REQUESTS {
        let (c, s) = (spans_of(i, SpanKind::Client), spans_of(i, SpanKind::Server));
        assert!(c.len() <= 1 && s.len() <= 1, "request {i}: {c:?} {s:?}");
        let (Some(c), Some(s)) = (c.first(), s.first()) else {
            missing.push(i);
            continue;
        };
        assert_eq!(
            attr(c, "network.local.address"),
            Some(client.ip.to_string())
        );
        assert_eq!(
            attr(s, "network.local.address"),
            Some(callee.ip.to_string())
        );
        assert_eq!(
            s.parent_span_id,
            c.span_id,
            "request {i}: server under client; the trace's spans:{}",
            trace_spans(&got, &c.trace_id)
        );
    }
    eprintln!("requests with a span missing on one side: {missing:?}");
    assert!(
        missing.iter().all(|&i| i == 0),
        "requests with a span missing: {missing:?}"
    );
    let m = a2.metrics().unwrap().unwrap();
    assert!(m["tagflow_linking_receivers_keyed_total"] >= (REQUESTS - 1) as f64);
    drop(a1);
}

/// `tagflow sidecar` without per-request registration: it mints the ids,
/// the agent learns the rest from the head it sends the app over loopback.
/// Each request's trace must be one tree: the app's call to pod C under the
/// app's server span, that under the sidecar's loopback call, and every
/// parent named in the trace (the minted `traceparent`'s too) exported.
#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn a_sidecar_that_registers_nothing_still_yields_whole_trees() {
    let _g = common::lock();
    let rt = common::runtime();
    let lab = Lab::new(3).unwrap();
    let (client, app, down) = (&lab.pods[0], &lab.pods[1], &lab.pods[2]);
    let otlp: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let got = Collector::start(&rt, otlp, Wire::Grpc, true);
    let agent = Agent::start(&lab, &["--otlp-endpoint", &format!("http://{otlp}")]);
    let _echo = Proc::python(down, ECHO_SERVER, &["9000"]).unwrap();
    let downstream = format!("{}:9000", down.ip);
    let app_proc = Proc::python(app, HTTP_APP, &["8000", &downstream, "thread"]).unwrap();
    let _sidecar = SidecarProc::start(app, "127.0.0.1:8000", &agent.socket).unwrap();
    let url = format!("http://{}:15080/", app.ip);
    let mut c = Proc::python(client, HTTP_CLIENT, &[&url, "-", &REQUESTS.to_string()]).unwrap();
    let out = c.run_until_done().unwrap();
    assert_eq!(out.len(), REQUESTS, "{out:?}");
    let traces: Vec<Vec<u8>> = out
        .iter()
        .map(|l| {
            let rid = l.split_whitespace().next().unwrap();
            ids::map_request_id(rid).unwrap().0.to_vec()
        })
        .collect();
    let of = |t: &[u8]| {
        got.spans()
            .into_iter()
            .map(|(_, s)| s)
            .filter(|s| s.trace_id == t)
            .collect::<Vec<_>>()
    };
    let call = |spans: &[Span]| {
        spans
            .iter()
            .find(|s| {
                s.kind == SpanKind::Client as i32
                    && attr(s, "process.pid") == Some(app_proc.pid.to_string())
                    && attr(s, "network.peer.port").as_deref() == Some("9000")
            })
            .cloned()
    };
    // The very first call may beat the agent (see above); every other
    // request's tree is whole.
    wait_for("the app's calls", 20, || {
        traces[1..].iter().all(|t| call(&of(t)).is_some())
    });
    common::wait_settled(&agent, 30);
    for (i, t) in traces.iter().enumerate().skip(1) {
        let spans = of(t);
        let by_id = |id: &[u8]| spans.iter().find(|s| s.span_id == id);
        let c = call(&spans).unwrap();
        let served = by_id(&c.parent_span_id)
            .unwrap_or_else(|| panic!("request {i}: call's parent missing"));
        assert_eq!(served.kind, SpanKind::Server as i32, "request {i}");
        assert_eq!(attr(served, "network.local.port").as_deref(), Some("8000"));
        let leg = by_id(&served.parent_span_id)
            .unwrap_or_else(|| panic!("request {i}: the app's server span has no exported parent"));
        assert_eq!(leg.kind, SpanKind::Client as i32);
        assert_eq!(attr(leg, "network.peer.port").as_deref(), Some("8000"));
        for s in &spans {
            assert!(
                s.parent_span_id.is_empty() || by_id(&s.parent_span_id).is_some(),
                "request {i}: span {:?} names a parent nobody exported",
                s.name
            );
        }
    }
    let m = agent.metrics().unwrap();
    assert_eq!(
        m["tagflow_registrations_begin_total"], 0.0,
        "nothing registered"
    );
}
