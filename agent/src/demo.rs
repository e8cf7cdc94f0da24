//! `tagflow demo`: a small node with three pods (client, api, db), real
//! processes and traffic, trace contexts registered for the processes that
//! serve each request, and the tagged flows the datapath recorded, grouped
//! by trace. Everything is torn down on exit, on failure and on Ctrl-C.
use std::{
    collections::BTreeMap,
    io::Read,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use agent_common::{Counter, TraceContext, TraceKey, TraceSource, OWNER_BOUND, TRACE_FLAG_SAMPLED};

use crate::{
    agent::hex,
    config::AgentConfig,
    loader::{Datapath, LoaderError},
    netns,
    tables::TableError,
    topo::{Lab, Proc, TopoError, CLIENT, ECHO_SERVER},
};

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error(transparent)]
    Topo(#[from] TopoError),
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error(transparent)]
    Table(#[from] TableError),
    #[error(transparent)]
    Netns(#[from] netns::NetnsError),
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

fn random_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut id);
    }
    id[0] |= 1; // never all zero
    id
}

const PODS: [&str; 3] = ["client", "api", "db"];

pub fn run(keep: bool) -> Result<(), DemoError> {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    println!("tagflow demo: creating pods {PODS:?} (network namespaces + veths)");
    let lab = Lab::new(3)?;
    let mut dp = Datapath::load(&AgentConfig::default(), true)?;
    let mut ns = Vec::new();
    for p in &lab.pods {
        dp.attach(&p.host_if, p.host_ifindex)?;
        let cookie = netns::cookie_of(&p.netns_path())?;
        dp.set_iface_netns(p.host_ifindex, cookie)?;
        ns.push(cookie);
    }
    let mut table = dp.take_trace_table().expect("fresh datapath");
    let (client_pod, api_pod, db_pod) = (&lab.pods[0], &lab.pods[1], &lab.pods[2]);
    let api = Proc::python(api_pod, ECHO_SERVER, &["8080"])?;
    let db = Proc::python(db_pod, ECHO_SERVER, &["5432"])?;
    let (api_ip, db_ip) = (api_pod.ip.to_string(), db_pod.ip.to_string());
    println!(
        "  api listens on {api_ip}:8080 (pid {}), db on {db_ip}:5432 (pid {})",
        api.pid, db.pid
    );

    let mut traces = Vec::new();
    for i in 0..3 {
        check()?;
        let id = random_id();
        let ctx = TraceContext {
            trace_id: id,
            flags: TRACE_FLAG_SAMPLED | TraceSource::Api.to_flags(),
            ..Default::default()
        };
        // A request from the client pod; while the api serves it, the api
        // calls the db. Each process handling the request is registered
        // under (pid, its pod's netns), as a sidecar registration does.
        let mut client = Proc::python(client_pod, CLIENT, &[&api_ip, "8080", "0", "4"])?;
        let mut call = Proc::python(api_pod, CLIENT, &[&db_ip, "5432", "0", "2"])?;
        let keys = [
            TraceKey::new(client.pid, ns[0]),
            TraceKey::new(api.pid, ns[1]),
            TraceKey::new(call.pid, ns[1]),
        ];
        for k in keys {
            table.set_process(k, &ctx)?;
        }
        expect_done(client.step()?)?;
        expect_done(call.step()?)?;
        for k in keys {
            table.clear_process(&k, &id)?;
        }
        println!("  request {} done, trace {}", i + 1, hex(&id));
        traces.push(id);
    }
    // Traffic nobody registered: never tagged.
    let mut stranger = Proc::python(client_pod, CLIENT, &[&api_ip, "8080", "0", "4"])?;
    expect_done(stranger.step()?)?;
    println!("  one more request without a trace context (must stay untagged)");

    print_flows(&dp, &lab, &ns, &traces);
    let c = dp.counters()?;
    println!("\ndatapath counters:");
    for (k, v) in c.iter().filter(|(_, v)| *v > 0) {
        println!("  {:<20} {v}", k.name());
    }
    if c[Counter::Tagged as usize].1 == 0 {
        return Err(DemoError::Other("nothing was tagged".into()));
    }
    if keep {
        println!(
            "\n--keep: pods stay up (namespaces {:?}); Ctrl-C to tear down",
            lab.pods.iter().map(|p| &p.name).collect::<Vec<_>>()
        );
        while check().is_ok() {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    println!("\ntearing down");
    Ok(())
}

fn expect_done(line: String) -> Result<(), DemoError> {
    if line == "done" {
        Ok(())
    } else {
        Err(DemoError::Other(format!("client said {line:?}")))
    }
}

fn print_flows(dp: &Datapath, lab: &Lab, ns: &[u64], traces: &[[u8; 16]]) {
    let pod_of = |cookie: u64| {
        ns.iter()
            .position(|n| *n == cookie)
            .map(|i| PODS[i])
            .unwrap_or("?")
    };
    let peer_of = |addr: &[u8]| {
        lab.pods
            .iter()
            .position(|p| p.ip.octets() == addr[..4])
            .map(|i| PODS[i])
            .unwrap_or("?")
    };
    let mut by_trace: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for (k, s) in dp
        .flow_stats()
        .into_iter()
        .filter(|(_, s)| !s.is_negative())
    {
        let Some(t) = traces.iter().position(|t| *t == s.trace_id) else {
            continue;
        };
        let role = if s.owner == OWNER_BOUND {
            "server"
        } else {
            "client"
        };
        by_trace.entry(t).or_default().push(format!(
            "{:<6} pid {:<7} {:<6} :{:<5} -> {:<6} :{:<5} {:>3} packets {:>6} bytes {:>8.3} ms",
            pod_of(k.netns),
            s.pid,
            role,
            k.local_port,
            peer_of(&k.remote_addr),
            k.remote_port,
            s.packets,
            s.bytes,
            s.last_ns.saturating_sub(s.first_ns) as f64 / 1e6,
        ));
    }
    println!(
        "\ntagged flows, by trace (pod, owner, local port -> peer, counts, first..last packet):"
    );
    for (i, id) in traces.iter().enumerate() {
        println!("trace {}", hex(id));
        for line in by_trace.get(&i).map(|v| v.as_slice()).unwrap_or(&[]) {
            println!("  {line}");
        }
    }
}
