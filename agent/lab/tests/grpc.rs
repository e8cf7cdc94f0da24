//! gRPC (HTTP/2) end to end through `tagflow run`, with software not
//! written here: Python `grpcio` apps and nginx's `grpc_pass`. The agent
//! reads request ids from HTTP/2 HEADERS frames it captures in the
//! datapath (HPACK decoded per connection) and must hang each call an app
//! makes while serving under the request it serves. The app says which
//! request it served and from which port it called: that is the truth the
//! spans are held to.
mod common;

use std::{collections::HashMap, net::SocketAddr, time::Duration};

use common::{wait_for, Agent};
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, Span};
use tagflow::ids;
use tagflow_lab::{
    collector::{attr_str, Collector, Wire},
    grpc::{self, linking, GRPC_APP, GRPC_CLIENT},
    procs,
    topo::{free_port, Lab, Pod, Proc, SidecarProc, ECHO_SERVER},
};

fn attr(s: &Span, key: &str) -> Option<String> {
    s.attributes
        .iter()
        .find(|a| a.key == key)
        .map(|a| attr_str(&a.value))
}

fn served(app: &mut Proc, n: usize) -> Vec<(String, u16)> {
    grpc::served(app, n).unwrap()
}

/// Three pods (client, app, downstream), the agent exporting to a
/// collector. Dropped in field order: the agent before its pods.
struct Bed {
    agent: Agent,
    got: Collector,
    lab: Lab,
    _rt: tokio::runtime::Runtime,
}

fn bed() -> Bed {
    let rt = common::runtime();
    let lab = Lab::new(3).unwrap();
    let otlp: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let got = Collector::start(&rt, otlp, Wire::Grpc, true);
    let agent = Agent::start(&lab, &["--otlp-endpoint", &format!("http://{otlp}")]);
    Bed {
        agent,
        got,
        lab,
        _rt: rt,
    }
}

/// The gRPC app in `app` on `listen`, calling the echo server in `down`.
fn app(app: &Pod, down: &Pod, listen: &str) -> (Proc, Proc) {
    let echo = Proc::python(down, ECHO_SERVER, &["9000"]).unwrap();
    let downstream = format!("{}:9000", down.ip);
    let a = Proc::python(app, GRPC_APP, &[listen, &downstream]).unwrap();
    (echo, a)
}

fn client(pod: &Pod, target: &str, n: usize, conc: usize, prefix: &str) {
    failing_client(pod, target, n, conc, prefix, 0)
}

/// Every `fail_every`-th call fails with gRPC status 5 (0: none).
fn failing_client(pod: &Pod, target: &str, n: usize, conc: usize, prefix: &str, fail_every: usize) {
    let mut c = Proc::python(
        pod,
        GRPC_CLIENT,
        &[
            target,
            &n.to_string(),
            &conc.to_string(),
            prefix,
            &fail_every.to_string(),
        ],
    )
    .unwrap();
    let out = c.run_until_done().unwrap();
    assert_eq!(out.len(), n, "every call answered: {out:?}");
}

/// The agent's counters that moved, for a failure to name (histograms and
/// registration aside).
fn metrics_seen(agent: &Agent) -> std::collections::BTreeMap<String, f64> {
    agent
        .metrics()
        .unwrap()
        .into_iter()
        .filter(|(k, v)| *v != 0.0 && !k.contains("bucket") && !k.contains("registr"))
        .collect()
}

fn no_h2_losses(agent: &Agent) -> HashMap<String, f64> {
    let m = agent.metrics().unwrap();
    for k in [
        "tagflow_capture_h2_lost_total",
        "tagflow_capture_h2_gaps_total",
        "tagflow_capture_h2_malformed_total",
        "tagflow_capture_h2_hpack_errors_total",
        "tagflow_datapath_packets_total{counter=\"h2_lost\"}",
    ] {
        assert_eq!(m[k], 0.0, "{k}");
    }
    m
}

/// nginx in the app's pod stamps `X-Request-ID` (`grpc_set_header`) and
/// hands each call to the app over 127.0.0.1 with HTTP/2 keep-alive (the
/// sidecar-proxy shape); the app forwards nothing. Calls one at a time;
/// every fourth fails (NOT_FOUND), and the loopback hop's spans say so.
#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn calls_behind_nginx_grpc_pass_carry_the_id_nginx_stamped() {
    const N: usize = 20;
    let _g = common::lock();
    let Bed {
        agent, got, lab, ..
    } = &bed();
    let (cl, ap, down) = (&lab.pods[0], &lab.pods[1], &lab.pods[2]);
    let (_echo, mut app_proc) = app(ap, down, "127.0.0.1:50051");
    let dir = std::env::temp_dir().join(format!("tagflow-grpc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let body = "upstream grpcapp { server 127.0.0.1:50051; keepalive 8; }
  server {
    listen 8080 http2;
    location / {
      grpc_set_header X-Request-ID $request_id;
      grpc_pass grpc://grpcapp;
    }
  }";
    let nginx = procs::nginx(ap, &dir, body).unwrap();
    wait_for("nginx", 10, || dir.join("nginx.pid").exists());

    const FAIL_EVERY: usize = 4;
    failing_client(cl, &format!("{}:8080", ap.ip), N, 1, "-", FAIL_EVERY);
    let served = served(&mut app_proc, N);
    wait_for("the app's calls as spans", 20, || {
        let l = linking(got, app_proc.pid, &served);
        l.correct + l.wrong >= N - 1
    });
    common::wait_settled(agent, 30);
    // nginx's keep-alive connection to the app ends with it: the spans
    // still open on it close, then wait to settle and for a batch (on a
    // slow VM, seconds).
    drop(nginx);
    let _ = std::fs::remove_dir_all(&dir);
    let grpc_spans = |kind: SpanKind| {
        got.spans()
            .iter()
            .filter(|(_, s)| {
                attr(s, "rpc.system").as_deref() == Some("grpc") && s.kind == kind as i32
            })
            .count()
    };
    // Up to 20 s; the assertions below name what is missing.
    let t0 = std::time::Instant::now();
    while (grpc_spans(SpanKind::Client) < N - 1 || grpc_spans(SpanKind::Server) < N - 1)
        && t0.elapsed() < Duration::from_secs(20)
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let l = linking(got, app_proc.pid, &served);
    eprintln!("nginx grpc_pass, one call at a time: {l:?}");
    // As for HTTP/1.x behind nginx (tests/shapes.rs): the very first call
    // may beat an agent that has not keyed the app yet, and go untraced.
    assert_eq!(l.wrong, 0, "{l:?}");
    assert!(l.missing <= 1, "{l:?}");

    // The calls nginx made to the app over loopback are gRPC spans named
    // as OTel says, from both ends.
    let spans = got.spans();
    let rpc: Vec<_> = spans
        .iter()
        .filter(|(_, s)| attr(s, "rpc.system").as_deref() == Some("grpc"))
        .collect();
    assert!(rpc.len() >= N, "{} gRPC spans", rpc.len());
    for (_, s) in &rpc {
        assert_eq!(s.name, "shop.Cart/Add");
        assert_eq!(attr(s, "rpc.service").as_deref(), Some("shop.Cart"));
        assert_eq!(attr(s, "rpc.method").as_deref(), Some("Add"));
        assert_eq!(attr(s, "network.protocol.version").as_deref(), Some("2"));
    }
    let kinds = |k: SpanKind| rpc.iter().filter(|(_, s)| s.kind == k as i32).count();
    let (clients, servers) = (kinds(SpanKind::Client), kinds(SpanKind::Server));
    // The loopback hop's spans in time order, each named by the call it
    // carries (its index in what the app served): named in the failure.
    let call = |t: &[u8]| {
        served
            .iter()
            .position(|(rid, _)| ids::map_request_id(rid).is_ok_and(|(w, _)| w[..] == *t))
            .map_or("?".into(), |i| i.to_string())
    };
    let mut hop: Vec<_> = spans
        .iter()
        .filter(|(_, s)| {
            [attr(s, "network.peer.port"), attr(s, "network.local.port")]
                .contains(&Some("50051".into()))
        })
        .collect();
    hop.sort_by_key(|(_, s)| s.start_time_unix_nano);
    let t0 = hop.first().map_or(0, |(_, s)| s.start_time_unix_nano);
    let hop: Vec<String> = hop
        .iter()
        .map(|(_, s)| {
            let a = |k| attr(s, k).unwrap_or_default();
            format!(
                "+{}ms call {} ({}) {} {} match {} packets {} flags {} ports {}->{}",
                (s.start_time_unix_nano - t0) / 1_000_000,
                call(&s.trace_id),
                &ids::to_hex(&s.trace_id)[..4],
                if s.kind == SpanKind::Client as i32 {
                    "client"
                } else {
                    "server"
                },
                if a("rpc.system").is_empty() {
                    "bare"
                } else {
                    "grpc"
                },
                a("tagflow.match"),
                a("tagflow.packets"),
                a("tagflow.tcp_flags"),
                a("network.local.port"),
                a("network.peer.port"),
            )
        })
        .collect();
    assert!(
        clients >= N - 1 && servers >= N - 1,
        "{clients} client and {servers} server gRPC spans of {N} calls; the hop's spans: {hop:#?}; {:#?}",
        metrics_seen(agent)
    );
    // The loopback hop (nginx → app): the server's side passes the same
    // hook, so each call's response and trailers are read too. Both ends
    // of a call carry its status: 0, or 5 for every fourth.
    let mut codes: HashMap<Vec<u8>, Vec<(String, String)>> = HashMap::new();
    for (_, s) in rpc.iter().filter(|(_, s)| {
        [attr(s, "network.peer.port"), attr(s, "network.local.port")]
            .contains(&Some("50051".into()))
    }) {
        let code = attr(s, "rpc.grpc.status_code").unwrap_or_default();
        let http = attr(s, "http.response.status_code").unwrap_or_default();
        // NOT_FOUND fails the call for nginx, its client; not for the app.
        let error = s.status.as_ref().is_some_and(|st| st.code == 2);
        let client = s.kind == SpanKind::Client as i32;
        assert_eq!(error, client && code == "5", "span status of {s:?}");
        codes
            .entry(s.trace_id.clone())
            .or_default()
            .push((code, http));
    }
    let calls = |code: &str| {
        codes
            .values()
            .filter(|v| v.iter().all(|(c, h)| c == code && h == "200"))
            .count()
    };
    let (failed, ok) = (N / FAIL_EVERY, N - N / FAIL_EVERY);
    // The first call may go untraced (above); nothing may be mixed up.
    assert!(
        calls("5") + calls("0") == codes.len()
            && (failed - 1..=failed).contains(&calls("5"))
            && (ok - 1..=ok).contains(&calls("0"))
            && codes.len() >= N - 1,
        "status per call on the loopback hop: {codes:?}; the hop's spans: {hop:#?}; {:#?}",
        metrics_seen(agent)
    );
    let m = no_h2_losses(agent);
    assert!(
        m["tagflow_capture_h2_connections_total"] >= 2.0,
        "client→nginx and nginx→app"
    );
    assert!(m["tagflow_capture_h2_requests_total"] >= 2.0 * N as f64);
}

/// `tagflow sidecar` in front of the gRPC app (h2c both ways): calls that
/// come with an id keep it, calls without get one; the app forwards
/// nothing, and every downstream call carries the id of the call it serves,
/// learnt from the sidecar's HEADERS on the pod's loopback. (gRPC's
/// status travels in trailers: a call answered is a trailer passed on.)
#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn calls_through_the_sidecar_carry_its_ids_over_http2() {
    const N: usize = 20;
    let _g = common::lock();
    let Bed {
        agent, got, lab, ..
    } = &bed();
    let (cl, ap, down) = (&lab.pods[0], &lab.pods[1], &lab.pods[2]);
    let (_echo, mut app_proc) = app(ap, down, "127.0.0.1:50051");
    let sidecar = SidecarProc::start(ap, "127.0.0.1:50051", &agent.socket).unwrap();
    let target = format!("{}:15080", ap.ip);
    client(cl, &target, N, 1, "kept");
    client(cl, &target, N, 1, "-");
    let served = served(&mut app_proc, 2 * N);
    let kept = served
        .iter()
        .filter(|(r, _)| r.starts_with("kept-"))
        .count();
    assert_eq!(kept, N, "ids that came are kept");
    assert!(
        served[N..]
            .iter()
            .all(|(r, _)| ids::validate_request_id(r).is_ok()),
        "the sidecar gave the others one: {served:?}"
    );
    wait_for("the app's calls as spans", 20, || {
        let l = linking(got, app_proc.pid, &served);
        l.correct + l.wrong >= 2 * N - 1
    });
    common::wait_settled(agent, 30);
    let l = linking(got, app_proc.pid, &served);
    eprintln!("sidecar over h2c, one call at a time: {l:?}");
    assert_eq!(l.wrong, 0, "{l:?}");
    assert!(l.missing <= 1, "{l:?}");
    no_h2_losses(agent);
    drop(sidecar);
}

/// Many calls in flight on one HTTP/2 connection, each with its own id:
/// every stream's headers are decoded with the connection's one HPACK
/// table, whatever order the streams interleave in. Which call an app's
/// worker thread makes for which stream is not visible on the wire (one
/// thread reads the connection, others serve): the linking figures are
/// printed, and only ids that were sent may appear.
#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn concurrent_streams_on_one_connection_each_keep_their_own_id() {
    const N: usize = 64;
    let _g = common::lock();
    let Bed {
        agent, got, lab, ..
    } = &bed();
    let (cl, ap, down) = (&lab.pods[0], &lab.pods[1], &lab.pods[2]);
    let (_echo, mut app_proc) = app(ap, down, "0.0.0.0:50051");
    client(cl, &format!("{}:50051", ap.ip), N, 16, "conc");
    let served = served(&mut app_proc, N);
    wait_for("every stream decoded", 20, || {
        agent
            .metrics()
            .map(|m| m["tagflow_capture_applied_total"] >= N as f64)
            .unwrap_or(false)
    });
    let m = no_h2_losses(agent);
    assert_eq!(m["tagflow_capture_h2_connections_total"], 1.0);
    assert_eq!(m["tagflow_capture_h2_requests_total"], N as f64);
    // The app's side leaves its own pod's veth (POD_ADDRS names it): each
    // call's response headers and trailers are read with the app's table.
    wait_for("every reply decoded", 10, || {
        agent
            .metrics()
            .map(|m| m["tagflow_capture_h2_replies_total"] >= 2.0 * N as f64)
            .unwrap_or(false)
    });
    let m = no_h2_losses(agent);
    assert_eq!(m["tagflow_capture_h2_reply_connections_total"], 1.0);
    assert_eq!(m["tagflow_capture_h2_replies_total"], 2.0 * N as f64);
    common::wait_settled(agent, 30);
    let sent: Vec<Vec<u8>> = (0..N)
        .map(|i| {
            ids::map_request_id(&format!("conc-{i}"))
                .unwrap()
                .0
                .to_vec()
        })
        .collect();
    let spans = got.spans();
    let foreign: Vec<_> = spans
        .iter()
        .filter(|(_, s)| !sent.contains(&s.trace_id))
        .map(|(_, s)| s.name.clone())
        .collect();
    assert!(foreign.is_empty(), "spans under no sent id: {foreign:?}");
    // Every call succeeded: no span says otherwise.
    let codes: Vec<_> = spans
        .iter()
        .filter_map(|(_, s)| attr(s, "rpc.grpc.status_code"))
        .collect();
    assert!(codes.iter().all(|c| c == "0"), "{codes:?}");
    assert!(
        !codes.is_empty(),
        "some spans of the calls carry their status"
    );
    let named: std::collections::HashSet<_> = spans
        .iter()
        .filter_map(|(_, s)| attr(s, "tagflow.request_id"))
        .collect();
    let l = linking(got, app_proc.pid, &served);
    eprintln!(
        "{N} calls, 16 at a time on one connection: {} ids on spans, app's calls {l:?}",
        named.len()
    );
    assert!(!named.is_empty());
}

/// A pod address set after the agent started (as a CNI sets it after the
/// veth appears) is learnt: calls to it soon have their replies read.
/// Each try is a new connection (a new client process); the first ones may
/// precede the agent's re-read of the pod's addresses.
#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn replies_to_a_pod_address_set_after_the_agent_started_are_read() {
    let _g = common::lock();
    let Bed { agent, lab, .. } = &bed();
    let (cl, ap, down) = (&lab.pods[0], &lab.pods[1], &lab.pods[2]);
    let (_echo, _app) = app(ap, down, "0.0.0.0:50051");
    let [a, b, c, _] = ap.ip.octets();
    let late = std::net::Ipv4Addr::new(a, b, c, 200);
    let st = ap
        .command("ip")
        .args(["addr", "add", &format!("{late}/24"), "dev", "eth0"])
        .status()
        .unwrap();
    assert!(st.success(), "ip addr add");
    let replies = || {
        agent
            .metrics()
            .map(|m| m["tagflow_capture_h2_reply_connections_total"])
            .unwrap_or(0.0)
    };
    let mut tries = 0;
    while replies() < 1.0 {
        tries += 1;
        assert!(tries <= 40, "no reply read in 40 connections to {late}");
        client(cl, &format!("{late}:50051"), 1, 1, "late");
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!("replies read from connection {tries} on");
    wait_for("the call's response and trailers", 10, || {
        agent
            .metrics()
            .map(|m| m["tagflow_capture_h2_replies_total"] >= 2.0)
            .unwrap_or(false)
    });
    no_h2_losses(agent);
}
