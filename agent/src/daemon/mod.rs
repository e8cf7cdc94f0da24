//! The `tagflow run` daemon: load, attach to matching interfaces and follow
//! them, backfill owners, serve registrations, turn datapath events into
//! spans and export them, publish metrics, expire idle trace entries.
use std::{
    future::Future,
    sync::{atomic::Ordering, Arc, Mutex},
    time::Duration,
};

mod follow;
mod housekeeping;
mod pipeline;
mod relearn;
mod sampling;

use aya::maps::{MapData, RingBuf};
use tokio::io::unix::AsyncFd;
use tracing::{info, warn};

pub use follow::{resync_plan, Follower};
pub use pipeline::{AgentStats, Pipeline};

use crate::{
    backfill,
    clock::monotonic_ns,
    config::AgentConfig,
    conntrack::Services,
    events,
    export::{Exporter, SendError, Sink},
    loader::{AttachKind, Datapath, LoaderError},
    metrics::{Attachment, Ops, Snapshot},
    netlink::{self, LinkEvent},
    sources::registry::{self, Limits, Registry, RegistryStats},
    tables::TraceTable,
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error(transparent)]
    Netlink(#[from] netlink::NetlinkError),
    #[error("agent I/O")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Registry(#[from] registry::RegistryError),
    #[error(transparent)]
    Export(#[from] SendError),
}

/// How long heads of a connection whose head had no id are not copied.
const CAPTURE_SKIP_NS: u64 = 1_000_000_000;
/// Ring-buffer records handled per turn of the loop: under a flood the
/// other duties (sweeps, expiry, metrics, links) still run.
const EVENTS_PER_TURN: usize = 4096;
/// Turns a sweep may take to catch up with the events written before it
/// read the datapath's counters; beyond them (a backlog of more than
/// 64 k events) it goes on with what it has.
const SWEEP_DRAIN_TURNS: usize = 16;
/// Conntrack answers kept (one per connection to a non-local address):
/// 7/8 of 16 384, what a hash table of that many buckets holds before it
/// doubles (at 16 384 answers the table took 32 768 buckets).
const SERVICES_CACHED: usize = 14 * 1024;

fn snapshot(
    dp: &Datapath,
    table: &Mutex<TraceTable>,
    pipe: &Pipeline,
    maps: &[(String, u64, u64)],
    walk_took: Duration,
) -> Snapshot {
    let attachments = dp
        .attached()
        .into_iter()
        .map(|(ifindex, name, kind)| Attachment {
            ifindex,
            name,
            mode: match kind {
                AttachKind::Tcx => "tcx".into(),
                AttachKind::Netlink => "clsact".into(),
            },
        })
        .collect();
    let datapath = dp
        .counters()
        .map(|v| {
            v.into_iter()
                .map(|(c, n)| (c.name().to_string(), n))
                .collect()
        })
        .unwrap_or_default();
    let mut m = maps.to_vec();
    let quota_refused;
    {
        let t = table.lock().expect("table lock");
        quota_refused = t.quota_refusals().iter().map(|(k, v)| (*k, *v)).collect();
        m.push((
            "TRACES".into(),
            t.by_pid().len() as u64,
            t.by_pid().capacity() as u64,
        ));
        m.push((
            "FLOW_TRACES".into(),
            t.by_flow().len() as u64,
            t.by_flow().capacity() as u64,
        ));
        m.push(("NETNS_GEN".into(), t.gate().active_namespaces() as u64, 0));
    }
    Snapshot {
        attachments,
        loopbacks: dp.loopbacks() as u64,
        uplinks: dp.uplinks(),
        thread_hooks: dp.thread_hooks.iter().map(|h| h.to_string()).collect(),
        kernel: dp.kernel().to_string(),
        features: dp
            .features()
            .into_iter()
            .map(|(n, ok)| (n.to_string(), ok))
            .collect(),
        ingress: dp.ingress_name().to_string(),
        datapath,
        maps: m,
        map_walk_ms: walk_took.as_millis() as u64,
        quota_refused,
        agent: pipe.counters(),
        spans_open: pipe.assembler.open_spans() as u64,
        spans_held: pipe.held() as u64,
        capture_cached: pipe.capture.cached() as u64,
        capture_awaited: pipe.capture.awaited_spans() as u64,
        ready: true,
        pin_dir: dp.pins.dir.as_ref().map(|d| d.display().to_string()),
        pinned: dp.pins.maps.clone(),
    }
}

/// Handles up to `EVENTS_PER_TURN` ring-buffer records; whether the ring
/// ran empty.
fn drain(
    rb: &mut RingBuf<MapData>,
    pipe: &mut Pipeline,
    dp: &mut Datapath,
    follower: &mut Follower,
    table: &Mutex<TraceTable>,
) -> bool {
    for _ in 0..EVENTS_PER_TURN {
        let Some(item) = rb.next() else {
            return true;
        };
        let ev = events::decode(&item);
        drop(item);
        let pods = follower.pods();
        let receiver = |k: &agent_common::FlowKey| {
            pods.receiver(k, |p| dp.bound_port(p), |f| dp.flow_finished(f))
        };
        if let Some(k) = pipe.event(ev, table, receiver) {
            let until = monotonic_ns() + CAPTURE_SKIP_NS;
            if dp.skip_capture(&k, until).is_ok() {
                pipe.stats.capture_skips += 1;
            }
        }
    }
    false
}

/// Capture on the node's uplinks (never on a pod interface). A failure is
/// counted and logged: requests from other nodes then go unkeyed, as
/// before.
fn attach_uplinks(cfg: &AgentConfig, dp: &mut Datapath, stats: &mut AgentStats) {
    let names = cfg
        .uplinks
        .clone()
        .unwrap_or_else(crate::uplink::default_interfaces);
    for name in names {
        if cfg.ifaces.contains(&name) || cfg.iface_prefixes.iter().any(|p| name.starts_with(p)) {
            continue;
        }
        let Ok(c) = std::ffi::CString::new(name.as_str()) else {
            continue;
        };
        // SAFETY: a NUL-terminated name; the call only reads it.
        let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
        let res = if ifindex == 0 {
            Err(std::io::Error::last_os_error().to_string())
        } else {
            dp.attach_uplink(&name, ifindex)
                .map_err(|e| crate::report(&e))
        };
        if let Err(e) = res {
            stats.attach_failures += 1;
            warn!(
                uplink = name,
                "not capturing requests from other nodes here: {e}"
            );
        }
    }
}

/// Hands free heap pages back to the kernel. Span buffers fill and drain
/// with collector outages and trace bursts; glibc keeps the freed pages,
/// so RSS would show the high-water mark of fragmentation rather than what
/// the agent holds (the soak measured the difference). Once a second: one
/// call, and a burst's pages do not wait 10 s to go back.
fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Runs until `shutdown` resolves; flushes spans and detaches on the way out.
pub async fn run(cfg: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    let sink = Sink::from_config(&cfg.export)?;
    run_with(cfg, sink, shutdown).await
}

/// [`run`] with a given span sink (the demo collects spans in memory).
pub async fn run_with(
    cfg: AgentConfig,
    sink: Sink,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let mut dp = Datapath::load(&cfg, true)?;
    if cfg.backfill {
        let owners = tokio::task::block_in_place(backfill::scan);
        let n = owners
            .into_iter()
            .filter(|(k, pid)| dp.set_bound_port(*k, *pid).is_ok())
            .count();
        info!(sockets = n, "backfilled bound ports");
    }
    let table: Arc<Mutex<TraceTable>> = Arc::new(Mutex::new(
        dp.take_trace_table().expect("fresh datapath has its table"),
    ));
    let mut registry_stats: Option<Arc<RegistryStats>> = None;
    let mut _registry: Option<registry::Serving> = None;
    if cfg.registration.enabled {
        let r = &cfg.registration;
        let listener = Registry::bind(&r.socket, r.group.as_deref()).await?;
        registry::announce(&r.socket);
        let limits = Limits {
            max_connections: r.max_connections,
            max_connections_per_netns: r.max_connections_per_netns,
            rate_per_netns: r.rate_per_netns,
            ..Limits::default()
        };
        let reg = Registry::new(table.clone(), limits);
        registry_stats = Some(reg.stats.clone());
        _registry = Some(reg.serve_on_own_thread(listener)?);
    }
    let exporter = Exporter::start(&cfg.export, sink);
    let ops = Arc::new(Ops {
        snapshot: Mutex::new(Snapshot::default()),
        export: exporter.stats.clone(),
        registry: registry_stats,
    });
    if let Some(addr) = cfg.metrics_addr {
        let ops = ops.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::ops_http::serve(addr, ops).await {
                warn!("metrics endpoint {addr}: {e}");
            }
        });
    }
    // In a cluster: this node's pods, for span resources.
    let pods = crate::k8s::pods::start(std::env::var("NODE_NAME").ok()).await;
    let mut pipe = Pipeline::with_pods(&cfg, pods);
    pipe.stats.adopted = dp.pins.adopted as u64;
    pipe.stats.adopted_idle = dp.pins.expired as u64;
    if cfg.services {
        match Services::open(SERVICES_CACHED) {
            Ok(s) => pipe.services = s,
            Err(e) => warn!(
                "no conntrack lookups (calls through Services will not link): {}",
                crate::report(&e)
            ),
        }
    }

    // Subscribe before the dump so no link can slip between the two.
    let monitor = netlink::Socket::open(true)?;
    let links = netlink::Socket::open(false)?.dump_links()?;
    let mut follower = Follower::new(&cfg);
    for link in links {
        follower.handle(&mut dp, LinkEvent::New(link), &mut pipe.stats);
    }
    let mut link_rx = follow::monitor_links(monitor)?;
    attach_uplinks(&cfg, &mut dp, &mut pipe.stats);

    let rb = dp
        .take_events()
        .expect("fresh datapath has its ring buffer");
    // SAFETY: the ring buffer owns its map fd and keeps it open (and the
    // same) for as long as the AsyncFd owns the ring buffer.
    let mut events: AsyncFd<RingBuf<MapData>> =
        unsafe { AsyncFd::register(rb) }.map_err(|e| AgentError::Io(e.into()))?;
    let mut sweep = tokio::time::interval(Duration::from_millis(250));
    let mut second = tokio::time::interval(Duration::from_secs(1));
    let keeper = dp.housekeeper()?;
    let mut maps = keeper.map_fill();
    let mut walk_took = Duration::ZERO;
    let mut walks = housekeeping::Walks::start(keeper)?;
    let mut relearn = relearn::Relearn::new();
    info!(attached = dp.attached().len(), "tagflow running");
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(ev) = link_rx.recv() => follower.handle(&mut dp, ev, &mut pipe.stats),
            guard = events.readable_mut() => {
                let mut guard = guard?;
                let empty = drain(guard.get_inner_mut(), &mut pipe, &mut dp, &mut follower, &table);
                // A full turn: more may be waiting, and the ring stays
                // readable; the sweep, the link follower and the metrics
                // get their turn before the next batch.
                if empty {
                    guard.clear_ready();
                }
            }
            _ = sweep.tick() => {
                // The sweep acts on counters (FLOW_STATS) the datapath
                // keeps adding to: every event written before they were
                // read is handled first. A reader's response counted there
                // came after the head that keyed it, so the head is seen
                // before the span is judged (it can still move to that
                // request).
                drain(events.get_mut(), &mut pipe, &mut dp, &mut follower, &table);
                let look = pipe.look(&dp);
                for _ in 0..SWEEP_DRAIN_TURNS {
                    if drain(events.get_mut(), &mut pipe, &mut dp, &mut follower, &table) {
                        break;
                    }
                }
                pipe.sweep(look, &mut dp, &exporter, &table)
            }
            Some(owners) = relearn.next() => {
                let mut n = 0;
                for (k, pid) in owners {
                    if dp.bound_port(&k) != Some(pid) && dp.set_bound_port(k, pid).is_ok() {
                        n += 1;
                    }
                }
                pipe.stats.bound_ports_relearned += n as u64;
            }
            Some(walked) = walks.reports.recv() => {
                pipe.stats.flows_collected += walked.flows_collected;
                pipe.stats.skips_collected += walked.skips_collected;
                maps = walked.maps;
                walk_took = walked.took;
                if relearn.check(&maps) {
                    pipe.stats.bound_ports_scans += 1;
                }
            }
            _ = second.tick() => {
                follower.sync_addrs(&mut dp, &mut pipe.stats);
                match table.lock().expect("table lock").expire() {
                    Ok(n) => pipe.stats.expired += n as u64,
                    Err(e) => warn!("expiring trace entries: {}", crate::report(&e)),
                }
                release_free_memory();
                *ops.snapshot.lock().expect("snapshot lock") = snapshot(&dp, &table, &pipe, &maps, walk_took);
            }
        }
    }
    info!("shutting down: flushing spans, detaching");
    ops.snapshot.lock().expect("snapshot lock").ready = false;
    for s in pipe.drain_all() {
        exporter.send(s);
    }
    let stats = exporter.stats.clone();
    exporter.shutdown().await;
    info!(
        exported = stats.exported.load(Ordering::Relaxed),
        dropped = stats.dropped.load(Ordering::Relaxed),
        failed = stats.failed.load(Ordering::Relaxed),
        "spans"
    );
    if cfg.registration.enabled {
        let _ = std::fs::remove_file(&cfg.registration.socket);
    }
    drop(walks);
    drop(dp);
    Ok(())
}
