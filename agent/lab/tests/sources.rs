//! Trace-context sources end to end: the registration protocol against a
//! live server, the sidecar, and passive capture of request heads.
mod common;

use std::{
    io::{Read, Write},
    net::SocketAddr,
    os::unix::net::UnixStream,
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use agent_common::{TraceKey, MATCH_FLOW};
use common::LiveAgent;
use tagflow::{
    config::AgentConfig,
    ids, netns,
    sidecar::{self, SidecarConfig, SidecarStats},
    sources::{
        protocol::{self, Code, Response},
        registry::Limits,
    },
};
use tagflow_lab::{
    procs,
    topo::{free_port, Lab, Proc, SidecarProc, ECHO_SERVER, HTTP_APP, HTTP_CLIENT},
};

fn send(s: &mut UnixStream, bytes: &[u8]) -> Option<Response> {
    s.write_all(bytes).ok()?;
    read_reply(s)
}

fn read_reply(s: &mut UnixStream) -> Option<Response> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let n = u32::from_be_bytes(len) as usize;
    let mut body = vec![0u8; n];
    s.read_exact(&mut body).ok()?;
    Some(protocol::decode_response(&body).expect("agent sends valid frames"))
}

fn code(r: Option<Response>) -> Code {
    match r {
        Some(Response::Error(e)) => e.code,
        other => panic!("expected an error reply, got {other:?}"),
    }
}

fn closed(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    matches!(s.read(&mut [0u8; 1]), Ok(0))
}

fn raw(ty: u8, json: &str) -> Vec<u8> {
    let mut f = ((4 + json.len()) as u32).to_be_bytes().to_vec();
    f.extend_from_slice(&[protocol::VERSION, ty, 0, 0]);
    f.extend_from_slice(json.as_bytes());
    f
}

fn ping(s: &mut UnixStream) -> bool {
    matches!(send(s, &raw(protocol::T_PING, "{}")), Some(Response::Ok(_)))
}

#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn malformed_frames_and_spoofed_targets_are_refused_and_others_still_served() {
    let _g = common::lock();
    let lab = Lab::new(1).unwrap();
    let agent = LiveAgent::start(&lab, &AgentConfig::default(), Limits::default());
    let mut good = UnixStream::connect(&agent.socket).unwrap();
    assert!(ping(&mut good));

    // Framing errors: error reply, then the connection is closed.
    let too_big = ((protocol::MAX_BODY + 1) as u32).to_be_bytes().to_vec();
    let mut bad_utf8 = raw(protocol::T_BEGIN, "");
    bad_utf8[0..4].copy_from_slice(&6u32.to_be_bytes());
    bad_utf8.extend_from_slice(&[0xff, 0xfe]);
    let mut unsupported = raw(protocol::T_PING, "{}");
    unsupported[4] = 9;
    for (what, bytes, want) in [
        ("length below the header", vec![0, 0, 0, 2], Code::BadFrame),
        ("oversized", too_big, Code::TooLarge),
        ("unknown version", unsupported, Code::UnsupportedVersion),
        ("bad utf-8", bad_utf8, Code::BadUtf8),
    ] {
        let mut s = UnixStream::connect(&agent.socket).unwrap();
        assert_eq!(code(send(&mut s, &bytes)), want, "{what}");
        assert!(closed(&mut s), "{what}: connection should be closed");
    }
    // Truncated frame: the length promises more than arrives.
    let mut s = UnixStream::connect(&agent.socket).unwrap();
    s.write_all(&[0, 0, 0, 100, 1, 1, 0, 0, b'{']).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(code(read_reply(&mut s)), Code::BadFrame, "truncated");

    // Message errors: error reply, the connection stays usable.
    let mut s = UnixStream::connect(&agent.socket).unwrap();
    let me = std::process::id();
    for (what, bytes, want) in [
        ("unknown type", raw(0x42, "{}"), Code::UnknownType),
        (
            "bad json",
            raw(protocol::T_BEGIN, "{\"headers\":"),
            Code::BadJson,
        ),
        (
            "invalid header value",
            raw(
                protocol::T_BEGIN,
                &format!(
                    r#"{{"headers":{{"x-request-id":"{}"}},"target":{{"pid":{me}}}}}"#,
                    "x".repeat(300)
                ),
            ),
            Code::BadHeader,
        ),
        (
            "no id at all",
            raw(
                protocol::T_BEGIN,
                &format!(r#"{{"headers":{{}},"target":{{"pid":{me}}}}}"#),
            ),
            Code::BadHeader,
        ),
        (
            "bad flow address",
            raw(
                protocol::T_BEGIN,
                &format!(
                    r#"{{"headers":{{"x-request-id":"a"}},"target":{{"pid":{me}}},"flows":[{{"local":"nope","remote":"1.2.3.4:5"}}]}}"#
                ),
            ),
            Code::BadTarget,
        ),
        (
            "nobody listens",
            raw(
                protocol::T_BEGIN,
                r#"{"headers":{"x-request-id":"a"},"target":{"port":1}}"#,
            ),
            Code::NoListener,
        ),
    ] {
        assert_eq!(code(send(&mut s, &bytes)), want, "{what}");
        assert!(ping(&mut s), "{what}: connection still usable");
    }

    // Spoofing: a process in another namespace (a pod) is not ours to tag.
    let pod_proc = Proc::python(&lab.pods[0], ECHO_SERVER, &["7000"]).unwrap();
    let spoof = raw(
        protocol::T_BEGIN,
        &format!(
            r#"{{"headers":{{"x-request-id":"a"}},"target":{{"pid":{}}}}}"#,
            pod_proc.pid
        ),
    );
    assert_eq!(code(send(&mut s, &spoof)), Code::NotYourNetns);
    assert!(
        agent.table.lock().unwrap().by_pid().is_empty(),
        "nothing written for a spoofed pid"
    );

    // Meanwhile a well-behaved peer is served: its own process, its netns.
    let host = netns::current_cookie().unwrap();
    let begin = raw(
        protocol::T_BEGIN,
        &format!(r#"{{"headers":{{"x-request-id":"req-7"}},"target":{{"pid":{me}}}}}"#),
    );
    match send(&mut good, &begin) {
        Some(Response::Ok(ok)) => {
            assert_eq!(ok.pids, vec![me]);
            assert_eq!(
                ok.trace_id.as_deref(),
                Some(ids::to_hex(&ids::hash_id("req-7")).as_str())
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        agent
            .table
            .lock()
            .unwrap()
            .by_pid()
            .get(&TraceKey::new(me, host)),
        Some(ids::hash_id("req-7"))
    );
    let end = raw(
        protocol::T_END,
        &format!(r#"{{"headers":{{"x-request-id":"req-7"}},"target":{{"pid":{me}}}}}"#),
    );
    assert!(matches!(send(&mut good, &end), Some(Response::Ok(_))));
    assert!(
        agent.table.lock().unwrap().by_pid().is_empty(),
        "END removed it"
    );
    let st = &agent.stats;
    use std::sync::atomic::Ordering::Relaxed;
    assert!(st.malformed.load(Relaxed) >= 7 && st.refused.load(Relaxed) >= 4);
    assert_eq!((st.begin_ok.load(Relaxed), st.end_ok.load(Relaxed)), (1, 1));
}

/// Frames written at once (a client that does not wait for each reply) are
/// answered in order, each exactly once, and the replies held for a batch
/// go out before an error that ends the connection.
#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn frames_sent_together_are_answered_in_order_before_a_closing_error() {
    let _g = common::lock();
    let lab = Lab::new(1).unwrap();
    let agent = LiveAgent::start(&lab, &AgentConfig::default(), Limits::default());
    let me = std::process::id();
    let host = netns::current_cookie().unwrap();
    let reg =
        |id: &str| format!(r#"{{"headers":{{"x-request-id":"{id}"}},"target":{{"pid":{me}}}}}"#);
    let mut batch = Vec::new();
    for f in [
        raw(protocol::T_BEGIN, &reg("one")),
        raw(protocol::T_END, &reg("one")),
        raw(protocol::T_BEGIN, "{\"headers\":"),
        raw(protocol::T_BEGIN, &reg("two")),
        raw(protocol::T_PING, "{}"),
    ] {
        batch.extend_from_slice(&f);
    }
    // Ends the connection: a length below the frame header.
    batch.extend_from_slice(&[0, 0, 0, 2]);
    let mut s = UnixStream::connect(&agent.socket).unwrap();
    s.write_all(&batch).unwrap();
    let trace = |r: Option<Response>| match r {
        Some(Response::Ok(ok)) => ok.trace_id,
        other => panic!("expected OK, got {other:?}"),
    };
    let hex = |id: &str| Some(ids::to_hex(&ids::hash_id(id)));
    assert_eq!(trace(read_reply(&mut s)), hex("one"), "BEGIN one");
    assert_eq!(trace(read_reply(&mut s)), hex("one"), "END one");
    assert_eq!(code(read_reply(&mut s)), Code::BadJson);
    assert_eq!(trace(read_reply(&mut s)), hex("two"), "BEGIN two");
    assert_eq!(trace(read_reply(&mut s)), None, "PING");
    assert_eq!(code(read_reply(&mut s)), Code::BadFrame);
    assert!(closed(&mut s));
    // BEGIN two was applied; its connection closed without END, and it
    // asked for nothing to outlive it (release_on_close is off by default),
    // so it stays until END or the idle timeout.
    let held = agent
        .table
        .lock()
        .unwrap()
        .by_pid()
        .get(&TraceKey::new(me, host));
    assert_eq!(held, Some(ids::hash_id("two")));
}

#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn rate_and_connection_limits_hold() {
    let _g = common::lock();
    let lab = Lab::new(1).unwrap();
    let limits = Limits {
        max_connections_per_netns: 2,
        rate_per_netns: 20,
        ..Limits::default()
    };
    let agent = LiveAgent::start(&lab, &AgentConfig::default(), limits);
    let mut a = UnixStream::connect(&agent.socket).unwrap();
    let mut b = UnixStream::connect(&agent.socket).unwrap();
    assert!(ping(&mut a) && ping(&mut b));
    let mut c = UnixStream::connect(&agent.socket).unwrap();
    assert_eq!(code(read_reply(&mut c)), Code::TooManyConnections);
    let limited = (0..100)
        .filter(|_| matches!(send(&mut a, &raw(protocol::T_PING, "{}")), Some(Response::Error(e)) if e.code == Code::RateLimited))
        .count();
    assert!(limited >= 70, "only {limited} of 100 rate-limited at 20/s");
    drop(b);
    std::thread::sleep(Duration::from_millis(100));
    // A slot is free again once a connection closes; tokens refill.
    std::thread::sleep(Duration::from_millis(200));
    let mut d = UnixStream::connect(&agent.socket).unwrap();
    assert!(ping(&mut d));
}

/// A GET with `headers`: (status, headers lowercased, body).
fn http_get(addr: SocketAddr, headers: &[(&str, &str)]) -> procs::Reply {
    procs::http_request(addr, "/", headers).unwrap()
}

fn header<'a>(hs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    hs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn field<'a>(body: &'a str, name: &str) -> &'a str {
    body.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
        .unwrap_or("")
}

#[test]
fn sidecar_keeps_or_makes_ids_and_never_fails_a_request_for_tagflow() {
    let _g = common::lock();
    let app_port = free_port();
    let _app = Proc::host_python(HTTP_APP, &[&app_port.to_string(), "-", "thread"]).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // No agent behind the socket: tagflow is down.
    let mut cfg = SidecarConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        format!("127.0.0.1:{app_port}").parse().unwrap(),
        "/nonexistent/agent.sock".into(),
    );
    cfg.register = true;
    let stats = Arc::new(SidecarStats::default());
    let (tx, rx) = tokio::sync::oneshot::channel();
    rt.spawn(sidecar::run(
        cfg,
        stats.clone(),
        Some(tx),
        std::future::pending(),
    ));
    let addr = rt.block_on(rx).unwrap();

    // An incoming id is kept, and the traceparent made for it carries its
    // mapping.
    let (st, hs, body) = http_get(addr, &[("X-Request-ID", "req-abc")]);
    assert_eq!(st, 200);
    assert_eq!(header(&hs, "x-request-id"), Some("req-abc"));
    assert_eq!(field(&body, "rid"), "req-abc");
    let tp = ids::parse_traceparent(field(&body, "tp")).expect("app got a valid traceparent");
    assert_eq!(tp.0, ids::hash_id("req-abc"));

    // A valid incoming traceparent is kept as it is.
    let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (_, _, body) = http_get(addr, &[("X-Request-ID", "r2"), ("traceparent", given)]);
    assert_eq!(field(&body, "tp"), given);

    // No id: a UUIDv4 is made, echoed, and the traceparent matches it.
    let (st, hs, body) = http_get(addr, &[]);
    assert_eq!(st, 200);
    let rid = header(&hs, "x-request-id").unwrap().to_string();
    assert_eq!(field(&body, "rid"), rid);
    let (mapped, kind) = ids::map_request_id(&rid).unwrap();
    assert_eq!(kind, ids::IdKind::Uuid);
    assert_eq!(
        ids::parse_traceparent(field(&body, "tp")).unwrap().0,
        mapped
    );

    // An invalid id is replaced.
    let (_, hs, _) = http_get(addr, &[("X-Request-ID", &"z".repeat(400))]);
    assert_eq!(
        ids::map_request_id(header(&hs, "x-request-id").unwrap())
            .unwrap()
            .1,
        ids::IdKind::Uuid
    );

    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(stats.requests.load(Relaxed), 4);
    assert!(
        stats.registrations_failed.load(Relaxed) >= 4,
        "agent down is counted"
    );
    assert_eq!(
        (
            stats.ids_kept.load(Relaxed),
            stats.ids_generated.load(Relaxed)
        ),
        (2, 2)
    );

    // Upstream down: 502, still with the request id.
    let dead = SidecarConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        format!("127.0.0.1:{}", free_port()).parse().unwrap(),
        "/nonexistent".into(),
    );
    let (tx, rx) = tokio::sync::oneshot::channel();
    rt.spawn(sidecar::run(
        dead,
        Arc::default(),
        Some(tx),
        std::future::pending(),
    ));
    let addr = rt.block_on(rx).unwrap();
    let (st, hs, _) = http_get(addr, &[("X-Request-ID", "q")]);
    assert_eq!((st, header(&hs, "x-request-id")), (502, Some("q")));
}

fn sidecar_pod_scenario(mode: &str) {
    let _g = common::lock();
    let lab = Lab::new(3).unwrap();
    let (a, b, c) = (&lab.pods[0], &lab.pods[1], &lab.pods[2]);
    let agent = LiveAgent::start(&lab, &AgentConfig::default(), Limits::default());
    let ns_b = agent.ns[1];
    let _echo = Proc::python(c, ECHO_SERVER, &["9000"]).unwrap();
    let app = Proc::python(b, HTTP_APP, &["8000", &format!("{}:9000", c.ip), mode]).unwrap();
    // The in-process agent does not capture on pod loopbacks.
    let _sidecar = SidecarProc::start_registering(b, "127.0.0.1:8000", &agent.socket).unwrap();
    let rid = ids::new_uuid();
    let url = format!("http://{}:15080/", b.ip);
    let mut client = Proc::python(a, HTTP_CLIENT, &[&url, &rid, "2"]).unwrap();
    let out = client.run_until_done().unwrap();
    assert_eq!(out.len(), 2, "{out:?}");
    let (want, _) = ids::map_request_id(&rid).unwrap();
    let tagged = agent.tagged();
    for line in &out {
        let (resp_rid, body) = line.split_once(' ').unwrap();
        assert_eq!(resp_rid, rid, "response carries the request id");
        assert_eq!(field(body, "rid"), rid, "the app received the same id");
        let served_by: u32 = field(body, "pid").parse().unwrap();
        if mode != "thread" {
            assert_ne!(served_by, app.pid, "a child/worker process served it");
        }
        // The app's call to C, made while serving, carries the trace.
        let calls: Vec<_> = tagged
            .iter()
            .filter(|(k, s)| k.netns == ns_b && k.remote_port == 9000 && s.pid == served_by)
            .collect();
        assert!(
            !calls.is_empty(),
            "no tagged call to C from pid {served_by}: {tagged:?}"
        );
        assert!(
            calls.iter().all(|(_, s)| s.trace_id == want),
            "calls carry the request's trace"
        );
    }
    // The sidecar's responses to the client carry it too (exact connection).
    let down: Vec<_> = tagged
        .iter()
        .filter(|(k, _)| {
            k.netns == ns_b && k.local_port == 15080 && k.remote_addr[..4] == a.ip.octets()
        })
        .collect();
    assert!(
        !down.is_empty()
            && down
                .iter()
                .all(|(_, s)| s.trace_id == want && s.matched == MATCH_FLOW),
        "{down:?}"
    );
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(agent.stats.begin_ok.load(Relaxed), 2);
    assert_eq!(agent.stats.refused.load(Relaxed), 0);
}

#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn sidecar_traces_a_threaded_apps_outgoing_calls() {
    sidecar_pod_scenario("thread");
}

#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn sidecar_traces_a_forking_apps_outgoing_calls() {
    sidecar_pod_scenario("fork");
}

#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn sidecar_traces_a_prefork_apps_outgoing_calls() {
    sidecar_pod_scenario("prefork");
}

#[test]
#[ignore = "needs root and BPF: cargo xtask test runs it"]
fn passive_capture_tags_flows_with_the_ids_nginx_logged() {
    let _g = common::lock();
    assert!(
        Command::new("nginx").arg("-v").output().is_ok(),
        "nginx missing: `cargo xtask test` installs it (apt nginx)"
    );
    let lab = Lab::new(3).unwrap();
    let (a, b, c) = (&lab.pods[0], &lab.pods[1], &lab.pods[2]);
    let agent = LiveAgent::start(&lab, &AgentConfig::default(), Limits::default());
    let ns_a = agent.ns[0];
    let _upstream = Proc::python(b, HTTP_APP, &["9000", "-", "thread"]).unwrap();
    let dir = std::env::temp_dir().join(format!("tagflow-nginx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let d = dir.display();
    let body = format!(
        "log_format rid '$request_id';
  server {{
    listen 8080;
    access_log {d}/access.log rid;
    location / {{ proxy_set_header X-Request-ID $request_id; proxy_pass http://{}:9000; }}
  }}",
        b.ip
    );
    let nginx = procs::nginx(a, &dir, &body).unwrap();
    let t0 = Instant::now();
    while !dir.join("nginx.pid").exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "nginx did not start: {:?}",
            std::fs::read_to_string(dir.join("error.log"))
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let url = format!("http://{}:8080/", a.ip);
    let mut client = Proc::python(c, HTTP_CLIENT, &[&url, "-", "3"]).unwrap();
    let out = client.run_until_done().unwrap();
    assert_eq!(out.len(), 3, "{out:?}");
    std::thread::sleep(Duration::from_millis(300));
    drop(nginx);
    let logged: Vec<String> = std::fs::read_to_string(dir.join("access.log"))
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(logged.len(), 3, "{logged:?}");
    let mut want: Vec<[u8; 16]> = logged
        .iter()
        .map(|r| ids::map_request_id(r).unwrap().0)
        .collect();
    want.sort();
    // Every flow out of pod A towards the upstream carries one of the
    // logged ids, and every logged id shows up: no sidecar involved.
    let mut got: Vec<[u8; 16]> = agent
        .tagged()
        .into_iter()
        .filter(|(k, _)| k.netns == ns_a && k.remote_port == 9000)
        .map(|(_, s)| s.trace_id)
        .collect();
    got.sort();
    got.dedup();
    assert_eq!(
        got,
        want,
        "flows out of A vs nginx's $request_id log; counters {:?}",
        agent.dp.lock().unwrap().counters()
    );
}
