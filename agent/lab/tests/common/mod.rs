//! Shared helpers for the kernel-level tests. They run for real, as root,
//! under `cargo xtask test`; a plain `cargo test` lists them as ignored.
//! Under the xtask a kernel that refuses (EPERM, ENOSYS, …) fails the test:
//! it never passes silently.
#![allow(dead_code)]

use std::sync::Mutex;

use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use tagflow::{config::AgentConfig, loader::Datapath};
use tagflow_lab::frames;

/// Kernel tests share the host's cgroup root and TCX hooks: one at a time.
pub static SERIAL: Mutex<()> = Mutex::new(());

/// A runtime for the in-process receivers.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

pub fn lock() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Loads the datapath; any failure, the kernel's refusal included, fails
/// the test. Nothing is pinned unless the test chose its own pin directory.
pub fn load(cfg: &AgentConfig, owner_hooks: bool) -> Datapath {
    let mut cfg = cfg.clone();
    if cfg.pin_dir == AgentConfig::default().pin_dir {
        cfg.pin_maps = false;
    }
    Datapath::load(&cfg, owner_hooks).unwrap_or_else(|e| {
        panic!("loading the datapath failed (kernel-level tests need root and BPF): {e:?}")
    })
}

pub struct Run {
    pub verdict: i32,
    pub data: Vec<u8>,
    pub mark: u32,
    pub cb: [u32; 5],
}

/// One BPF_PROG_TEST_RUN of `prog` on `frame` (ifindex 1 = lo).
pub fn run(prog: &SchedClassifier, frame: &[u8]) -> Result<Run, aya::programs::ProgramError> {
    run_ctx(prog, frame, &frames::skb_ctx(1, 0, [0; 5]))
}

pub fn run_ctx(
    prog: &SchedClassifier,
    frame: &[u8],
    ctx: &[u8],
) -> Result<Run, aya::programs::ProgramError> {
    let mut data = vec![0u8; frame.len() + 256];
    let mut ctx_out = [0u8; frames::SKB_CTX_LEN];
    let r = prog.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut data),
        ctx_in: Some(ctx),
        ctx_out: Some(&mut ctx_out),
        ..Default::default()
    })?;
    data.truncate(r.data_size_out as usize);
    let (mark, cb) = frames::skb_ctx_out(&ctx_out);
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

use agent_common::{FlowKey, FlowStats};
use tagflow::{
    events::{self, Event},
    netns,
    sources::{
        capture::Capture,
        registry::{Limits, Registry, RegistryStats, Serving},
    },
    tables::TraceTable,
};
use tagflow_lab::topo::Lab;

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
    _registry: Serving,
    stop: Arc<AtomicBool>,
    pump: Option<std::thread::JoinHandle<()>>,
}

static SOCKETS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

impl LiveAgent {
    pub fn start(lab: &Lab, cfg: &AgentConfig, limits: Limits) -> Self {
        let mut dp = load(cfg, true);
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
        // As the daemon serves it: on a thread of its own.
        let registry = reg
            .serve_on_own_thread(listener)
            .expect("registration thread");
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
                            capture.handle(
                                &h,
                                &mut t2.lock().unwrap(),
                                |_| Err(tagflow::podnet::Unresolved::NotLocal),
                                |_| None,
                            );
                        }
                        Event::FlowNew(e) | Event::FlowEnd(e) => {
                            f2.lock().unwrap().push((e.key, e.stats))
                        }
                        _ => {}
                    }
                }
            }
        });
        Self {
            dp: Arc::new(Mutex::new(dp)),
            table,
            ns,
            socket,
            stats,
            flows,
            rt,
            _registry: registry,
            stop,
            pump: Some(pump),
        }
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

use std::collections::HashMap;
use tagflow_lab::{
    procs::{AgentProc, Server},
    topo::{free_port, Pod},
};

/// `tagflow run` as a process, as the tests run it: spans finish after
/// 300 ms idle, backfill on (servers started before the agent are the
/// realistic case), maps pinned in a directory of its own.
pub struct Agent(pub AgentProc);

impl std::ops::Deref for Agent {
    type Target = AgentProc;
    fn deref(&self) -> &AgentProc {
        &self.0
    }
}

impl std::ops::DerefMut for Agent {
    fn deref_mut(&mut self) -> &mut AgentProc {
        &mut self.0
    }
}

/// A pin directory of this test process's own (bpffs).
pub fn test_pin_dir(tag: &str) -> std::path::PathBuf {
    format!("/sys/fs/bpf/tagflow-test/{}-{tag}", std::process::id()).into()
}

impl Agent {
    pub fn start(lab: &Lab, extra: &[&str]) -> Self {
        Self::start_pinned(lab, extra, &test_pin_dir(&free_port().to_string()))
    }

    /// With its maps pinned in `pin_dir` (a restarted agent given its
    /// predecessor's directory takes over its tables).
    pub fn start_pinned(lab: &Lab, extra: &[&str], pin_dir: &std::path::Path) -> Self {
        let mut args = vec!["--span-idle-ms", "300"];
        args.extend_from_slice(extra);
        Self(AgentProc::start_pinned(lab, &args, pin_dir).expect("tagflow run"))
    }

    /// /metrics; every sample line must parse.
    pub fn metrics(&self) -> Option<HashMap<String, f64>> {
        self.0
            .metrics()
            .map(|m| m.unwrap_or_else(|e| panic!("{e}")))
    }

    /// `tagflow register ...` run inside a pod; must succeed.
    pub fn register(&self, pod: &Pod, args: &[&str]) -> String {
        self.0
            .register(pod, args)
            .unwrap_or_else(|e| panic!("register {args:?}: {e}"))
    }
}

pub fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let t0 = std::time::Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the agent has had nothing more to send for over a second
/// (`AgentProc::settled`, two of its readings): the collector then holds
/// every span it will get, however long the last ones took to close, go
/// quiet and be sent.
pub fn wait_settled(agent: &AgentProc, secs: u64) {
    let mut since: Option<std::time::Instant> = None;
    wait_for("the agent to send every span it holds", secs, || {
        if !agent.settled() {
            since = None;
            return false;
        }
        since.get_or_insert_with(std::time::Instant::now).elapsed() > Duration::from_millis(1100)
    });
}

/// Program ids of tagflow programs on an interface's TCX ingress hook.
pub fn tcx_ids(iface: &str) -> Vec<u32> {
    tagflow::loader::tcx_programs(iface)
        .map(|v| {
            v.into_iter()
                .filter(|p| p.0 == "tagflow_ingress")
                .map(|p| p.1)
                .collect()
        })
        .unwrap_or_default()
}

/// nginx in `pod` answering 200 on :8080, its files in `dir`.
pub fn nginx(pod: &Pod, dir: &std::path::Path) -> Server {
    tagflow_lab::procs::nginx_ok(pod, dir).expect("nginx")
}

/// Waits for a wrk run, stops the server, removes its directory, and
/// asserts no request failed. Returns the number of requests made.
pub fn finish_load(
    wrk: std::process::Child,
    server: Server,
    dir: &std::path::Path,
    when: &str,
) -> u64 {
    let out = wrk.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    drop(server);
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
