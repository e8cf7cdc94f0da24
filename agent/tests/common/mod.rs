//! Shared helpers for the kernel-level tests. They run for real as root;
//! they skip (and say why) only when the kernel refuses: EPERM or ENOSYS.
#![allow(dead_code)]

use std::sync::Mutex;

use agent::{config::AgentConfig, loader::Datapath};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};

/// Kernel tests share the host's cgroup root and TCX hooks: one at a time.
pub static SERIAL: Mutex<()> = Mutex::new(());

pub fn lock() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether an error means "the kernel refuses" (EPERM/ENOSYS) rather than a bug.
pub fn kernel_refuses(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&dyn std::error::Error> = Some(e);
    let text = format!("{e:?}");
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if matches!(io.raw_os_error(), Some(libc::EPERM) | Some(libc::ENOSYS)) {
                return true;
            }
        }
        cur = err.source();
    }
    text.contains("code: 1,") || text.contains("code: 38,")
}

/// Loads the datapath or returns None after printing why the kernel refused.
/// Nothing is pinned unless the test chose its own pin directory.
pub fn load(cfg: &AgentConfig, owner_hooks: bool) -> Option<Datapath> {
    let mut cfg = cfg.clone();
    if cfg.pin_dir == AgentConfig::default().pin_dir {
        cfg.pin_maps = false;
    }
    match Datapath::load(&cfg, owner_hooks) {
        Ok(dp) => Some(dp),
        Err(e) if kernel_refuses(&e) => {
            eprintln!("SKIP: the kernel refused to load tagflow's programs: {e}");
            None
        }
        Err(e) => panic!("loading the datapath failed: {e:?}"),
    }
}

pub struct Run {
    pub verdict: i32,
    pub data: Vec<u8>,
    pub mark: u32,
    pub cb: [u32; 5],
}

/// One BPF_PROG_TEST_RUN of `prog` on `frame` (ifindex 1 = lo).
pub fn run(prog: &SchedClassifier, frame: &[u8]) -> Result<Run, aya::programs::ProgramError> {
    run_ctx(prog, frame, &agent::frames::skb_ctx(1, 0, [0; 5]))
}

pub fn run_ctx(
    prog: &SchedClassifier,
    frame: &[u8],
    ctx: &[u8],
) -> Result<Run, aya::programs::ProgramError> {
    let mut data = vec![0u8; frame.len() + 256];
    let mut ctx_out = [0u8; agent::frames::SKB_CTX_LEN];
    let r = prog.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut data),
        ctx_in: Some(ctx),
        ctx_out: Some(&mut ctx_out),
        ..Default::default()
    })?;
    data.truncate(r.data_size_out as usize);
    let (mark, cb) = agent::frames::skb_ctx_out(&ctx_out);
    Ok(Run {
        verdict: r.return_value as i32,
        data,
        mark,
        cb,
    })
}

use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use agent::{
    events::{self, Event},
    netns,
    sources::{
        capture::Capture,
        registry::{Limits, Registry, RegistryStats},
    },
    tables::TraceTable,
    topo::Lab,
};
use agent_common::{FlowKey, FlowStats};

/// The agent's moving parts, in-process, around a lab: datapath attached to
/// every pod, registration socket served, ring buffer pumped (new-flow
/// events recorded, request heads applied).
pub struct LiveAgent {
    pub dp: Arc<Mutex<Datapath>>,
    pub table: Arc<Mutex<TraceTable>>,
    pub ns: Vec<u64>,
    pub socket: PathBuf,
    pub stats: Arc<RegistryStats>,
    pub flows: Arc<Mutex<Vec<(FlowKey, FlowStats)>>>,
    pub rt: tokio::runtime::Runtime,
    stop: Arc<AtomicBool>,
    pump: Option<std::thread::JoinHandle<()>>,
}

static SOCKETS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl LiveAgent {
    pub fn start(lab: &Lab, cfg: &AgentConfig, limits: Limits) -> Option<Self> {
        let mut dp = load(cfg, true)?;
        let mut ns = Vec::new();
        for p in &lab.pods {
            dp.attach(&p.host_if, p.host_ifindex).expect("attach");
            let c = netns::cookie_of(&p.netns_path()).unwrap();
            dp.set_iface_netns(p.host_ifindex, c).unwrap();
            ns.push(c);
        }
        let table = Arc::new(Mutex::new(dp.take_trace_table().unwrap()));
        let mut ring = dp.take_events().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let n = SOCKETS.fetch_add(1, Ordering::Relaxed);
        let socket = PathBuf::from(format!(
            "/tmp/tagflow-test-{}-{n}/agent.sock",
            std::process::id()
        ));
        let listener = rt
            .block_on(Registry::bind(&socket, None))
            .expect("bind registration socket");
        let reg = Registry::new(table.clone(), limits);
        let stats = reg.stats.clone();
        rt.spawn(reg.serve(listener));
        let stop = Arc::new(AtomicBool::new(false));
        let flows = Arc::new(Mutex::new(Vec::new()));
        let (t2, s2, f2) = (table.clone(), stop.clone(), flows.clone());
        let headers = cfg.capture_headers.clone();
        let pump = std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let mut capture = Capture::new(headers, 4096);
            while !s2.load(Ordering::Relaxed) {
                let mut pfd = libc::pollfd {
                    fd: ring.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                unsafe { libc::poll(&mut pfd, 1, 5) };
                while let Some(item) = ring.next() {
                    match events::decode(&item) {
                        Event::HttpHead(h) => {
                            capture.handle(&h, &mut t2.lock().unwrap());
                        }
                        Event::FlowNew(e) | Event::FlowEnd(e) => {
                            f2.lock().unwrap().push((e.key, e.stats))
                        }
                        _ => {}
                    }
                }
            }
        });
        Some(Self {
            dp: Arc::new(Mutex::new(dp)),
            table,
            ns,
            socket,
            stats,
            flows,
            rt,
            stop,
            pump: Some(pump),
        })
    }

    /// (flow, trace) pairs the datapath reported plus what FLOW_STATS holds.
    pub fn tagged(&self) -> Vec<(FlowKey, FlowStats)> {
        std::thread::sleep(Duration::from_millis(50));
        let mut v = self.flows.lock().unwrap().clone();
        v.extend(
            self.dp
                .lock()
                .unwrap()
                .flow_stats()
                .into_iter()
                .filter(|(_, s)| !s.is_negative()),
        );
        v
    }
}

impl Drop for LiveAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(p) = self.pump.take() {
            let _ = p.join();
        }
        if let Some(dir) = self.socket.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

// ---- `tagflow run` as a process ----

use agent::topo::{free_port, Pod};
use std::{
    collections::HashMap,
    io::Read,
    net::SocketAddr,
    process::{Child, Command, Stdio},
    time::Instant,
};

/// `tagflow run` as a process.
pub struct Agent {
    pub child: Child,
    pub metrics: SocketAddr,
    pub socket: std::path::PathBuf,
    pub pin_dir: std::path::PathBuf,
}

/// A pin directory of this test process's own (bpffs).
pub fn test_pin_dir(tag: &str) -> std::path::PathBuf {
    format!("/sys/fs/bpf/tagflow-test/{}-{tag}", std::process::id()).into()
}

impl Agent {
    /// Starts an agent with pin directory of its own.
    pub fn start(lab: &Lab, extra: &[&str]) -> Self {
        let port = free_port();
        Self::start_with(lab, extra, port, &test_pin_dir(&port.to_string()))
    }

    /// Starts an agent whose maps are pinned in `pin_dir` (a restarted
    /// agent given its predecessor's directory takes over its tables).
    pub fn start_pinned(lab: &Lab, extra: &[&str], pin_dir: &std::path::Path) -> Self {
        Self::start_with(lab, extra, free_port(), pin_dir)
    }

    fn start_with(lab: &Lab, extra: &[&str], port: u16, pin_dir: &std::path::Path) -> Self {
        let metrics: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let socket = std::env::temp_dir().join(format!(
            "tagflow-spans-{}-{}/agent.sock",
            std::process::id(),
            metrics.port()
        ));
        let child = Command::new(env!("CARGO_BIN_EXE_tagflow"))
            .args([
                "run",
                // Backfill on: servers started before the agent are the
                // realistic case.
                "--span-idle-ms",
                "300",
                "--iface-prefix",
                &lab.prefix,
            ])
            .arg("--socket")
            .arg(&socket)
            .args(["--metrics-addr", &metrics.to_string()])
            .arg("--pin-dir")
            .arg(pin_dir)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let a = Self {
            child,
            metrics,
            socket,
            pin_dir: pin_dir.into(),
        };
        let t0 = Instant::now();
        loop {
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "agent did not become ready"
            );
            if let Some(m) = a.metrics() {
                if m.get("tagflow_attached_interfaces").copied().unwrap_or(0.0)
                    >= lab.pods.len() as f64
                {
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        a
    }

    /// /metrics parsed as Prometheus text: every sample line must parse.
    pub fn metrics(&self) -> Option<HashMap<String, f64>> {
        let text = http_get(self.metrics, "/metrics")?;
        let mut m = HashMap::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (name, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad sample line {line:?}"));
            let v: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}"));
            assert!(
                name.chars().next().unwrap().is_ascii_alphabetic(),
                "bad metric name {name:?}"
            );
            m.insert(name.to_string(), v);
        }
        Some(m)
    }

    pub fn metric(&self, name: &str) -> f64 {
        self.metrics()
            .and_then(|m| m.get(name).copied())
            .unwrap_or(-1.0)
    }

    /// `tagflow register ...` run inside a pod (its own namespace).
    pub fn register(&self, pod: &Pod, args: &[&str]) -> String {
        let out = pod
            .command(env!("CARGO_BIN_EXE_tagflow"))
            .arg("register")
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "register {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        if let Some(d) = self.socket.parent() {
            let _ = std::fs::remove_dir_all(d);
        }
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

/// GET over a plain TcpStream; Some(body) on 200.
pub fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let (head, body) = resp.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

pub fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Program ids of tagflow programs on an interface's TCX ingress hook.
pub fn tcx_ids(iface: &str) -> Vec<u32> {
    agent::loader::tcx_programs(iface)
        .map(|v| {
            v.into_iter()
                .filter(|p| p.0 == "tagflow_ingress")
                .map(|p| p.1)
                .collect()
        })
        .unwrap_or_default()
}

/// nginx in `pod` answering 200 on :8080, its files in `dir`.
pub fn nginx(pod: &Pod, dir: &std::path::Path) -> std::process::Child {
    let d = dir.display();
    let conf = format!(
        "worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log; daemon off;
events {{}}
http {{ access_log off; client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d}; uwsgi_temp_path {d}; scgi_temp_path {d};
  server {{ listen 8080; location / {{ return 200 \"ok\\n\"; }} }} }}
"
    );
    std::fs::write(dir.join("nginx.conf"), conf).unwrap();
    pod.command("nginx")
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Waits for a wrk run, stops the server, removes its directory, and
/// asserts no request failed. Returns the number of requests made.
pub fn finish_load(wrk: Child, server: &mut Child, dir: &std::path::Path, when: &str) -> u64 {
    let out = wrk.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(dir);
    assert!(
        out.status.success(),
        "wrk: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("Socket errors") && !text.contains("Non-2xx"),
        "requests failed {when}:\n{text}"
    );
    text.lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
