//! The registration path: BEGIN/END pairs over the Unix socket from several
//! clients at once (messages/s), against a baseline in the same run: the
//! same clients and socket, answered by a server that only reads each frame
//! and writes a canned reply (what the transport alone allows on this
//! machine). Then BEGIN → entry visible in the kernel's `TRACES` map, read
//! through a second handle (p50/p99).
//!
//! Clients are other processes in real life (sidecars, the CLI): each runs
//! on a thread and runtime of its own, apart from the server's, which is
//! served as the daemon serves it (`Registry::serve_on_own_thread`).
use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use agent_common::{TraceContext, TraceKey};
use aya::maps::{HashMap as BpfHashMap, IterableMap, Map, MapData};
use tagflow::{
    config::AgentConfig,
    loader::Datapath,
    netns,
    sources::{
        client::Client,
        protocol::{self, Registration, Response, Target},
        registry::{Limits, Registry},
    },
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{UnixListener, UnixStream},
};

use super::{median, BenchError, Row};

/// Alternating rounds of baseline and registration; medians reported.
const ROUNDS: usize = 3;

fn other(e: impl std::fmt::Display) -> BenchError {
    BenchError::Other(e.to_string())
}

fn client_rt() -> Result<tokio::runtime::Runtime, BenchError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(other)
}

fn registration_of(i: usize) -> Registration {
    Registration {
        headers: [("x-request-id".to_string(), format!("{i:032x}"))].into(),
        target: Target::Pid(std::process::id()),
        flows: Vec::new(),
        release_on_close: true,
    }
}

/// `clients` clients, each on its own thread, `per` BEGIN+END pairs each
/// (END not awaited, as the sidecar sends it): messages per second, every
/// reply read.
fn drive(socket: &Path, clients: usize, per: usize, base: usize) -> Result<f64, BenchError> {
    let t0 = Instant::now();
    let results: Vec<Result<(), String>> = std::thread::scope(|s| {
        let tasks: Vec<_> = (0..clients)
            .map(|c| {
                let socket = socket.to_path_buf();
                s.spawn(move || {
                    let rt = client_rt().map_err(|e| e.to_string())?;
                    rt.block_on(async move {
                        let mut cl = Client::new(socket, Duration::from_secs(5));
                        for i in 0..per {
                            let r = registration_of(base + c * per + i + 1);
                            cl.begin(r.clone()).await.map_err(|e| e.to_string())?;
                            // As the sidecar does: END's reply is read
                            // before the next BEGIN's.
                            cl.end_unawaited(r).await.map_err(|e| e.to_string())?;
                        }
                        cl.settle().await.map_err(|e| e.to_string())?;
                        match cl.take_late_refusals() {
                            0 => Ok(()),
                            n => Err(format!("{n} ENDs refused")),
                        }
                    })
                })
            })
            .collect();
        tasks
            .into_iter()
            .map(|t| t.join().unwrap_or_else(|_| Err("client panicked".into())))
            .collect()
    });
    let elapsed = t0.elapsed().as_secs_f64();
    if let Some(Err(e)) = results.into_iter().find(|r| r.is_err()) {
        return Err(BenchError::Other(format!("registration failed: {e}")));
    }
    Ok((per * clients * 2) as f64 / elapsed)
}

/// The baseline server: per connection, read a frame (length, then body,
/// as the registry does) and write the canned reply. Stops when `stop`
/// fires (or is dropped).
fn answering_server(
    socket: &Path,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> Result<std::thread::JoinHandle<()>, BenchError> {
    let reply = protocol::encode_response(&Response::Ok(protocol::Ok {
        trace_id: Some(format!("{:032x}", 1)),
        pids: vec![std::process::id()],
        ..Default::default()
    }));
    let listener = std::os::unix::net::UnixListener::bind(socket).map_err(other)?;
    listener.set_nonblocking(true).map_err(other)?;
    let rt = client_rt()?;
    Ok(std::thread::spawn(move || {
        rt.block_on(async move {
            let Ok(l) = UnixListener::from_std(listener) else {
                return;
            };
            let serve = async {
                while let Ok((s, _)) = l.accept().await {
                    tokio::spawn(answer(s, reply.clone()));
                }
            };
            tokio::select! {
                _ = serve => {}
                _ = stop => {}
            }
        });
    }))
}

async fn answer(mut s: UnixStream, reply: Vec<u8>) {
    let mut len = [0u8; 4];
    while s.read_exact(&mut len).await.is_ok() {
        let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
        if s.read_exact(&mut body).await.is_err() || s.write_all(&reply).await.is_err() {
            return;
        }
    }
}

pub fn registration(messages: usize, clients: usize) -> Result<Vec<Row>, BenchError> {
    let clients = clients.max(1);
    let mut dp = Datapath::load(&AgentConfig::scratch(), false)?;
    let table = dp.take_trace_table().expect("fresh datapath");
    let id = table.by_pid().store().map().info().map_err(other)?.id();
    let reader: BpfHashMap<MapData, TraceKey, TraceContext> =
        BpfHashMap::try_from(Map::HashMap(MapData::from_id(id).map_err(other)?)).map_err(other)?;
    let rt = client_rt()?;
    let dir = std::env::temp_dir().join(format!("tagflow-bench-{}", std::process::id()));
    let socket = dir.join("agent.sock");
    let listener = rt.block_on(Registry::bind(&socket, None)).map_err(other)?;
    let echo_socket = dir.join("echo.sock");
    let _ = std::fs::remove_file(&echo_socket);
    let (stop_echo, stop) = tokio::sync::oneshot::channel();
    let echo = answering_server(&echo_socket, stop)?;
    // Server capacity is measured: no rate limit in the way.
    let limits = Limits {
        rate_per_netns: u32::MAX,
        ..Limits::default()
    };
    let reg = Registry::new(Arc::new(Mutex::new(table)), limits);
    let serving = reg.serve_on_own_thread(listener).map_err(other)?;

    let per = messages / 2 / clients;
    let (mut base, mut ours, mut server_ns) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        base.push(drive(&echo_socket, clients, per, 0)?);
        let cpu = serving_cpu_ns();
        ours.push(drive(&socket, clients, per, round * clients * per)?);
        if let (Some(a), Some(b)) = (cpu, serving_cpu_ns()) {
            server_ns.push((b - a) as f64 / (per * clients * 2) as f64);
        }
    }

    // Latency: begin sent → the kernel map holds the entry.
    let key = TraceKey::new(std::process::id(), netns::current_cookie()?);
    let mut lat: Vec<f64> = rt.block_on(async {
        let mut cl = Client::new(socket.clone(), Duration::from_secs(5));
        let mut v = Vec::new();
        for i in 0..2000usize {
            let r = registration_of(1_000_000_000 + i);
            let want = tagflow::ids::map_request_id(&format!("{:032x}", 1_000_000_000 + i))
                .expect("an id")
                .0;
            let t = Instant::now();
            let _ = cl.begin(r.clone()).await;
            while reader.get(&key, 0).ok().map(|c| c.trace_id) != Some(want) {
                std::hint::spin_loop();
                if t.elapsed() > Duration::from_secs(1) {
                    break;
                }
            }
            v.push(t.elapsed().as_secs_f64() * 1e6);
            let _ = cl.end(r).await;
        }
        v
    });
    drop(serving);
    let _ = stop_echo.send(());
    let _ = echo.join();
    let _ = std::fs::remove_dir_all(&dir);
    lat.sort_by(|a, b| a.total_cmp(b));
    let p = |q: f64| lat[((lat.len() - 1) as f64 * q) as usize];
    let spread = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::MAX, f64::min);
        let hi = v.iter().copied().fold(f64::MIN, f64::max);
        (lo, hi)
    };
    let (ours_spread, base_spread) = (spread(&ours), spread(&base));
    let (rate, base_rate) = (median(&mut ours), median(&mut base));
    let row = |metric: &str, unit: &str, value: f64, target: &str| Row {
        scenario: "registration: begin -> map visible".into(),
        metric: metric.into(),
        unit: unit.into(),
        value,
        baseline: None,
        ratio: None,
        target: target.into(),
        spread: (lat[0], lat[lat.len() - 1]),
    };
    let mut rows = vec![
        Row {
            scenario: format!(
                "registration: Unix socket, canned replies (baseline), {clients} clients"
            ),
            metric: "throughput".into(),
            unit: "msg/s".into(),
            value: base_rate,
            baseline: None,
            ratio: None,
            target: String::new(),
            spread: base_spread,
        },
        Row {
            scenario: format!("registration: begin+end, {clients} clients"),
            metric: "throughput".into(),
            unit: "msg/s".into(),
            value: rate,
            baseline: Some(base_rate),
            ratio: Some(rate / base_rate),
            target: ">= 200000".into(),
            spread: ours_spread,
        },
        row("p50", "us", p(0.5), ""),
        row("p99", "us", p(0.99), "<= 50"),
    ];
    if server_ns.len() == ROUNDS {
        let (lo, hi) = spread(&server_ns);
        let ns = median(&mut server_ns);
        rows.push(Row {
            scenario: format!(
                "registration: the serving thread's CPU per message, {clients} clients"
            ),
            metric: "CPU time per message".into(),
            unit: "us".into(),
            value: ns / 1e3,
            baseline: None,
            ratio: None,
            target: String::new(),
            spread: (lo / 1e3, hi / 1e3),
        });
        // What one CPU given to the serving thread sustains, its clients on
        // other CPUs (here they share the two vCPUs with it).
        rows.push(Row {
            scenario: "registration: messages one CPU of the serving thread sustains (1 / CPU per message)".into(),
            metric: "throughput".into(),
            unit: "msg/s".into(),
            value: 1e9 / ns,
            baseline: None,
            ratio: None,
            target: ">= 200000".into(),
            spread: (1e9 / hi, 1e9 / lo),
        });
    }
    Ok(rows)
}

/// The serving thread's name ("tagflow-registry") as comm keeps it: 15 bytes.
const SERVING_COMM: &str = "tagflow-registr";

/// CPU time the registration thread (`tagflow-registry`) has run so far,
/// from its schedstat (nanoseconds). `None` when it cannot be read.
fn serving_cpu_ns() -> Option<u64> {
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).ok()?;
        if comm.trim_end() == SERVING_COMM {
            let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
            return stat.split_whitespace().next()?.parse().ok();
        }
    }
    None
}
