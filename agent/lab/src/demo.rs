//! `cargo xtask demo` (`tagflow-lab demo`): a small node, end to end. Three pods: `client`,
//! `frontend` (tagflow sidecar + an app that calls the backend while it
//! serves) and `backend` (tagflow sidecar + an app). The agent runs
//! in-process; requests go out with and without an incoming `x-request-id`;
//! each resulting trace is printed as a tree. Everything is torn down on
//! exit, on failure and on Ctrl-C.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use crate::topo::{Lab, Pod, Proc, SidecarProc, TopoError, HTTP_APP, HTTP_CLIENT};
use tagflow::{
    config::AgentConfig,
    daemon::{run_with, AgentError},
    export::{ExportConfig, SendError, Sink},
    ids,
    spans::{SpanRecord, Value},
};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Topo(#[from] TopoError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Export(#[from] SendError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("interrupted")]
    Interrupted,
    #[error("{0}")]
    Other(String),
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn check() -> Result<(), DemoError> {
    if STOP.load(Ordering::SeqCst) {
        Err(DemoError::Interrupted)
    } else {
        Ok(())
    }
}

const PODS: [&str; 3] = ["client", "frontend", "backend"];

pub fn run(keep: bool, otlp: Option<String>) -> Result<(), DemoError> {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    println!("tagflow demo: pods {PODS:?} as network namespaces with veths");
    let lab = Lab::new(3)?;
    let (client, frontend, backend) = (&lab.pods[0], &lab.pods[1], &lab.pods[2]);
    let dir = std::env::temp_dir().join(format!("tagflow-demo-{}", std::process::id()));
    let socket: PathBuf = dir.join("agent.sock");
    let mut cfg = AgentConfig {
        iface_prefixes: vec![lab.prefix.clone()],
        backfill: false,
        metrics_addr: None,
        span_idle_ms: 500,
        ..AgentConfig::scratch()
    };
    cfg.registration.socket = socket.clone();
    let collected: Arc<Mutex<Vec<SpanRecord>>> = Arc::default();
    let mut sink = Sink::Collect(collected.clone());
    if let Some(endpoint) = &otlp {
        let mut e = ExportConfig::default();
        e.apply_env(|k| std::env::var(k).ok());
        e.endpoint = Some(endpoint.clone());
        sink = Sink::Tee(vec![sink, Sink::from_config(&e)?]);
        println!("  also exporting to {endpoint} ({:?})", e.protocol);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let agent = rt.spawn(run_with(cfg, sink, async {
        let _ = stop_rx.await;
    }));
    let result = scenario(&lab, client, frontend, backend, &socket, keep);
    // Stop the agent: it flushes the spans it still holds.
    let _ = stop_tx.send(());
    let agent_result = rt.block_on(agent);
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    match agent_result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e.into()),
        Err(e) => return Err(DemoError::Other(format!("agent task: {e}"))),
    }
    let spans = collected.lock().expect("collect lock").clone();
    if spans.is_empty() {
        return Err(DemoError::Other("no spans were produced".into()));
    }
    print!("{}", render(&spans, &lab));
    println!("\ntearing down");
    Ok(())
}

fn scenario(
    lab: &Lab,
    client: &Pod,
    frontend: &Pod,
    backend: &Pod,
    socket: &Path,
    keep: bool,
) -> Result<(), DemoError> {
    let t0 = Instant::now();
    while !socket.exists() {
        check()?;
        if t0.elapsed() > Duration::from_secs(30) {
            return Err(DemoError::Other("agent did not start".into()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    let backend_url = format!("http://{}:15080/", backend.ip);
    let _backend_app = Proc::python(backend, HTTP_APP, &["8080", "-", "thread", "backend"])?;
    let _backend_sidecar = SidecarProc::start(backend, "127.0.0.1:8080", socket)?;
    let _frontend_app = Proc::python(
        frontend,
        HTTP_APP,
        &["8080", &backend_url, "thread", "frontend"],
    )?;
    let _frontend_sidecar = SidecarProc::start(frontend, "127.0.0.1:8080", socket)?;
    println!("  frontend and backend: app on :8080 behind tagflow sidecar on :15080");
    let url = format!("http://{}:15080/", frontend.ip);
    for (what, rid) in [
        ("with a UUID x-request-id", ids::new_uuid()),
        (
            "with an nginx-style x-request-id",
            ids::to_hex(&ids::random::<16>()),
        ),
        ("without x-request-id", "-".to_string()),
    ] {
        check()?;
        let mut c = Proc::python(client, HTTP_CLIENT, &[&url, &rid, "1", "client"])?;
        let out = c.run_until_done()?;
        let got = out
            .first()
            .and_then(|l| l.split_whitespace().next())
            .unwrap_or("?");
        println!("  request {what}: response x-request-id {got}");
    }
    // Spans finish 0.5 s after their last packet, then the trace settles.
    std::thread::sleep(Duration::from_millis(1800));
    if keep {
        let names: Vec<&String> = lab.pods.iter().map(|p| &p.name).collect();
        println!("\n--keep: pods stay up (ip netns: {names:?}); Ctrl-C to tear down");
        while check().is_ok() {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(())
}

fn int(s: &SpanRecord, k: &str) -> i64 {
    match s.attr(k) {
        Some(Value::Int(i)) => i,
        _ => 0,
    }
}

/// Traces as indented trees: service, kind, span name, duration, packets
/// and bytes, children under the span they belong to.
pub fn render(spans: &[SpanRecord], lab: &Lab) -> String {
    let pod_of = |ip: &str| {
        lab.pods
            .iter()
            .position(|p| p.ip.to_string() == ip)
            .map(|i| PODS[i].to_string())
            .unwrap_or_else(|| ip.to_string())
    };
    // Loopback spans are named by their namespace: every pod is 127.0.0.1.
    let netns: HashMap<i64, String> = lab
        .pods
        .iter()
        .enumerate()
        .filter_map(|(i, p)| {
            let c = tagflow::netns::cookie_of(&p.netns_path()).ok()?;
            Some((c as i64, PODS[i].to_string()))
        })
        .collect();
    let pod_of = |ip: &str, s: &SpanRecord| {
        let lo = ip
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback());
        match s.attr("tagflow.netns") {
            Some(Value::Int(c)) if lo => netns
                .get(&c)
                .map(|p| format!("{p}(lo)"))
                .unwrap_or_else(|| ip.to_string()),
            _ => pod_of(ip),
        }
    };
    let mut by_trace: HashMap<[u8; 16], Vec<&SpanRecord>> = HashMap::new();
    for s in spans {
        by_trace.entry(s.trace_id).or_default().push(s);
    }
    let mut traces: Vec<_> = by_trace.into_iter().collect();
    traces.sort_by_key(|(_, v)| v.iter().map(|s| s.start_unix_ns).min().unwrap_or(0));
    let mut out = String::from("\ntraces (service  kind  span  duration  packets/bytes):\n");
    for (id, list) in traces {
        let rid = list
            .iter()
            .find_map(|s| match s.attr("tagflow.request_id") {
                Some(Value::Str(r)) => Some(r.to_string()),
                _ => None,
            });
        out += &format!(
            "\ntrace {}{}\n",
            ids::to_hex(&id),
            rid.map(|r| format!("  (x-request-id {r})"))
                .unwrap_or_default()
        );
        let ids_here: Vec<[u8; 8]> = list.iter().map(|s| s.span_id).collect();
        let mut roots: Vec<&&SpanRecord> = list
            .iter()
            .filter(|s| !s.parent_span_id.is_some_and(|p| ids_here.contains(&p)))
            .collect();
        roots.sort_by_key(|s| s.start_unix_ns);
        for r in roots {
            walk(&mut out, r, &list, 0, &pod_of);
        }
    }
    out
}

fn walk(
    out: &mut String,
    s: &SpanRecord,
    all: &[&SpanRecord],
    depth: usize,
    pod_of: &dyn Fn(&str, &SpanRecord) -> String,
) {
    let local = match s.attr("network.local.address") {
        Some(Value::Str(a)) => pod_of(&a, s),
        _ => "?".into(),
    };
    let peer = match s.attr("network.peer.address") {
        Some(Value::Str(a)) => pod_of(&a, s),
        _ => "?".into(),
    };
    *out += &format!(
        "{:indent$}└─ {}/{} {:<6} {:<28} {:>8.3} ms {:>3} pkts {:>6} B\n",
        "",
        local,
        s.resource.service_name(),
        s.kind.as_str(),
        format!("{} → {}", s.name, peer),
        s.end_unix_ns.saturating_sub(s.start_unix_ns) as f64 / 1e6,
        int(s, "tagflow.packets"),
        int(s, "tagflow.bytes"),
        indent = depth * 3
    );
    let mut kids: Vec<&&SpanRecord> = all
        .iter()
        .filter(|c| c.parent_span_id == Some(s.span_id))
        .collect();
    kids.sort_by_key(|c| c.start_unix_ns);
    for k in kids {
        walk(out, k, all, depth + 1, pod_of);
    }
}
