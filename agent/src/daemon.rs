//! The `tagflow run` daemon: load, attach to matching interfaces and follow
//! them, backfill owners, serve registrations, turn datapath events into
//! spans and export them, publish metrics, expire idle trace entries.
use std::{
    future::Future,
    sync::{atomic::Ordering, Arc, Mutex},
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, sync::mpsc};
use tracing::{debug, info, warn};

use crate::{
    backfill,
    clock::{monotonic_ns, WallClock},
    config::AgentConfig,
    events::{self, Event},
    export::{Exporter, SendError, Sink},
    loader::{AttachKind, Datapath, LoaderError},
    metrics::{self, Attachment, Ops, Snapshot},
    netlink::{self, Link, LinkEvent},
    netns::PeerResolver,
    sources::{
        capture::{Capture, HeadOutcome},
        registry::{self, Limits, Registry, RegistryStats},
    },
    spans::{
        assemble::{Assembler, AssemblerConfig},
        resource::Resources,
    },
    tables::TraceTable,
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error("netlink: {0}")]
    Netlink(#[from] netlink::NetlinkError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Registry(#[from] registry::RegistryError),
    #[error(transparent)]
    Export(#[from] SendError),
}

/// How long heads of a connection whose head had no id are not copied.
const CAPTURE_SKIP_NS: u64 = 1_000_000_000;
/// FLOW_STATS entries without a packet for this long are deleted ("no
/// trace" entries sooner: remaking one costs one slow-path lookup).
const FLOW_GC_NS: u64 = 60_000_000_000;
const NEGATIVE_GC_NS: u64 = 10_000_000_000;

/// Agent-side counters (exported as metrics).
#[derive(Default, Debug, Clone)]
pub struct AgentStats {
    pub capture_skips: u64,
    pub flow_new: u64,
    pub flow_end: u64,
    pub heads: u64,
    pub events_unknown: u64,
    pub events_truncated: u64,
    pub attach_failures: u64,
    /// Full link re-dumps after lost notifications (ENOBUFS).
    pub link_resyncs: u64,
    pub expired: u64,
    /// Trace entries taken over from a previous agent's pinned maps.
    pub adopted: u64,
    /// ... and those already idle, deleted instead.
    pub adopted_idle: u64,
    /// FLOW_TRACES entries removed because their connection closed.
    pub flows_closed: u64,
    /// FLOW_STATS entries of dead flows deleted (see `Datapath::gc`).
    pub flows_collected: u64,
    /// Expired CAPTURE_SKIP entries deleted.
    pub skips_collected: u64,
}

/// After lost link notifications: (links to attach — attaching is
/// idempotent, so every wanted one —, attached ifindexes that are gone).
pub fn resync_plan(
    attached: &[u32],
    links: &[Link],
    wants: impl Fn(&str) -> bool,
) -> (Vec<Link>, Vec<u32>) {
    let wanted: Vec<Link> = links.iter().filter(|l| wants(&l.name)).cloned().collect();
    let gone = attached
        .iter()
        .filter(|i| !wanted.iter().any(|l| l.index == **i))
        .copied()
        .collect();
    (wanted, gone)
}

/// Attaches to / forgets interfaces as links come and go.
pub struct Follower<'a> {
    cfg: &'a AgentConfig,
    peers: PeerResolver,
}

impl<'a> Follower<'a> {
    pub fn new(cfg: &'a AgentConfig) -> Self {
        Self {
            cfg,
            peers: PeerResolver::default(),
        }
    }

    pub fn handle(&mut self, dp: &mut Datapath, ev: LinkEvent, stats: &mut AgentStats) {
        match ev {
            LinkEvent::New(link) if self.cfg.wants_iface(&link.name) => {
                self.attach(dp, &link, stats)
            }
            LinkEvent::New(_) => {}
            LinkEvent::Del(link) => dp.detach(link.index),
            LinkEvent::Resync(links) => {
                stats.link_resyncs += 1;
                let attached: Vec<u32> = dp.attached().iter().map(|a| a.0).collect();
                let (attach, detach) = resync_plan(&attached, &links, |n| self.cfg.wants_iface(n));
                for i in detach {
                    dp.detach(i);
                }
                for link in attach {
                    self.attach(dp, &link, stats);
                }
            }
        }
    }

    fn attach(&mut self, dp: &mut Datapath, link: &Link, stats: &mut AgentStats) {
        if let Err(e) = dp.attach(&link.name, link.index) {
            // A link can vanish between the notification and the attach.
            stats.attach_failures += 1;
            warn!("{e}");
            return;
        }
        if let Some(nsid) = link.link_netnsid {
            match self.peers.cookie_for_nsid(nsid) {
                Some(cookie) => {
                    if let Err(e) = dp.set_iface_netns(link.index, cookie) {
                        warn!(iface = link.name, "{e}");
                    } else {
                        debug!(iface = link.name, nsid, cookie, "peer netns recorded");
                    }
                }
                None => debug!(iface = link.name, nsid, "peer netns not found"),
            }
        }
    }
}

/// Datapath events → spans → exporter.
pub struct Pipeline {
    pub capture: Capture,
    pub assembler: Assembler,
    pub clock: WallClock,
    pub stats: AgentStats,
    /// Connections that ended (FIN/RST) and when their per-connection trace
    /// entry goes: a short grace lets the last ACKs through under the same
    /// trace instead of re-resolving them.
    closing: std::collections::VecDeque<(u64, agent_common::FlowKey, [u8; 16])>,
    closing_cap: usize,
    /// Finished spans waiting for room in the export queue: a big trace
    /// released at once waits here instead of overflowing the queue.
    /// At most one export queue's worth; beyond it the oldest are dropped
    /// (counted with the exporter's drops).
    pending: std::collections::VecDeque<crate::spans::SpanRecord>,
    pending_cap: usize,
}

/// How long a closed connection keeps its FLOW_TRACES entry.
const CLOSED_FLOW_GRACE_NS: u64 = 2_000_000_000;

impl Pipeline {
    pub fn new(cfg: &AgentConfig) -> Self {
        Self::with_pods(cfg, None)
    }

    /// With pod metadata for span resources (in a cluster).
    pub fn with_pods(cfg: &AgentConfig, pods: Option<Arc<crate::k8s::pods::PodCache>>) -> Self {
        Self {
            capture: Capture::new(cfg.capture_headers.clone(), 16384),
            assembler: Assembler::new(
                AssemblerConfig {
                    idle_ns: cfg.span_idle_ms * 1_000_000,
                    max_open: cfg.max_open_spans,
                    max_held: cfg.max_held_spans,
                    ..AssemblerConfig::default()
                },
                Resources::new(std::env::var("OTEL_SERVICE_NAME").ok())
                    .with_pods(pods, std::env::var("NODE_NAME").ok()),
            ),
            clock: WallClock::measure(),
            stats: AgentStats::default(),
            closing: Default::default(),
            closing_cap: cfg.maps.flow_traces as usize,
            pending: Default::default(),
            pending_cap: cfg.export.queue,
        }
    }

    /// Handles one ring-buffer record. Returns a connection whose request
    /// heads the datapath should stop copying for a while (its head had no
    /// id header).
    pub fn event(&mut self, ev: Event, table: &Mutex<TraceTable>) -> Option<agent_common::FlowKey> {
        let now = monotonic_ns();
        match ev {
            Event::FlowNew(f) => {
                self.stats.flow_new += 1;
                let head = self.capture.take_head(&f.key, &f.stats.trace_id);
                self.assembler.flow_new(&f, head, now);
            }
            Event::FlowEnd(f) => {
                self.stats.flow_end += 1;
                self.assembler.flow_end(&f, now);
            }
            Event::HttpHead(h) => {
                self.stats.heads += 1;
                let out = self
                    .capture
                    .handle(&h, &mut table.lock().expect("table lock"));
                match out {
                    HeadOutcome::Applied(info) => self.assembler.head(&h.key, *info),
                    HeadOutcome::NoId { truncated: false } => return Some(h.key),
                    _ => {}
                }
            }
            Event::Unknown(_) => self.stats.events_unknown += 1,
            Event::Truncated => self.stats.events_truncated += 1,
        }
        None
    }

    /// Refreshes open spans from FLOW_STATS, closes finished ones and hands
    /// complete traces to the exporter.
    /// Per-connection trace entries of connections that closed are removed
    /// (after a grace), not left to the idle timeout: under connection churn
    /// FLOW_TRACES then holds live connections only.
    pub fn sweep(&mut self, dp: &mut Datapath, exporter: &Exporter, table: &Mutex<TraceTable>) {
        let now = monotonic_ns();
        self.clock.refresh(Duration::from_secs(10));
        let keys = self.assembler.open_keys();
        let snapshot = dp.flow_stats_for(keys.iter());
        for (key, trace) in self.assembler.sweep(&snapshot, now) {
            self.closing
                .push_back((now + CLOSED_FLOW_GRACE_NS, key, trace));
        }
        let mut t = table.lock().expect("table lock");
        while let Some((due, key, trace)) = self.closing.front().copied() {
            if due > now && self.closing.len() <= self.closing_cap {
                break;
            }
            self.closing.pop_front();
            if dp.forget_flow(&key, &trace) {
                self.stats.flows_collected += 1;
            }
            match t.clear_flow(&key, &trace) {
                Ok(true) => self.stats.flows_closed += 1,
                Ok(false) => {}
                Err(e) => warn!("clearing a closed connection's trace: {e}"),
            }
        }
        drop(t);
        self.pending.extend(self.assembler.ready(&self.clock, now));
        while let Some(s) = self.pending.pop_front() {
            if let Err(s) = exporter.offer(s) {
                self.pending.push_front(s);
                break;
            }
        }
        let over = self.pending.len().saturating_sub(self.pending_cap);
        if over > 0 {
            self.pending.drain(..over);
            exporter.count_dropped(over as u64);
        }
    }

    /// Finished spans not yet queued for export: held for linking or
    /// waiting for room.
    pub fn held(&self) -> usize {
        self.assembler.held_spans() + self.pending.len()
    }

    /// Everything still in the pipeline, for the exporter at shutdown.
    pub fn drain_all(&mut self) -> Vec<crate::spans::SpanRecord> {
        let mut out: Vec<_> = self.pending.drain(..).collect();
        out.extend(self.assembler.flush_all(&self.clock, monotonic_ns()));
        out
    }

    pub fn counters(&self) -> Vec<(String, String, u64)> {
        let c = &self.capture;
        let a = &self.assembler.stats;
        let s = &self.stats;
        [
            ("events_flow_new_total", "FLOW_NEW events read.", s.flow_new),
            ("events_flow_end_total", "FLOW_END events read.", s.flow_end),
            (
                "events_http_heads_total",
                "Captured request heads read.",
                s.heads,
            ),
            (
                "events_unknown_total",
                "Ring-buffer records of an unknown kind (skipped).",
                s.events_unknown,
            ),
            (
                "events_truncated_total",
                "Ring-buffer records shorter than their kind (dropped).",
                s.events_truncated,
            ),
            (
                "link_resyncs_total",
                "Link notifications lost (ENOBUFS) and re-read with a full dump.",
                s.link_resyncs,
            ),
            (
                "attach_failures_total",
                "Interfaces that could not be attached.",
                s.attach_failures,
            ),
            (
                "trace_entries_expired_total",
                "Trace entries removed after the idle timeout.",
                s.expired,
            ),
            (
                "flow_traces_closed_total",
                "Per-connection trace entries removed when their connection closed.",
                s.flows_closed,
            ),
            (
                "flow_stats_collected_total",
                "FLOW_STATS entries of closed or idle flows, deleted.",
                s.flows_collected,
            ),
            (
                "capture_skips_collected_total",
                "Expired CAPTURE_SKIP entries deleted.",
                s.skips_collected,
            ),
            (
                "trace_entries_adopted_total",
                "Trace entries taken over from the previous agent's pinned maps.",
                s.adopted,
            ),
            (
                "trace_entries_adopted_idle_total",
                "Pinned trace entries found already idle at start (deleted).",
                s.adopted_idle,
            ),
            (
                "capture_applied_total",
                "Request heads that set a trace.",
                c.applied,
            ),
            (
                "capture_no_id_total",
                "Complete request heads without an id header.",
                c.no_id,
            ),
            (
                "capture_truncated_no_id_total",
                "Cut-off request heads without an id in the part seen.",
                c.truncated_no_id,
            ),
            (
                "capture_bad_id_total",
                "Request heads with an unusable id.",
                c.bad_id,
            ),
            (
                "capture_not_http_total",
                "Captured payloads that were not HTTP/1 heads.",
                c.not_http,
            ),
            (
                "capture_table_errors_total",
                "Trace-table writes from capture that failed.",
                c.table_errors,
            ),
            (
                "capture_unclaimed_total",
                "Request details no span asked for within 3 s (dropped).",
                c.unclaimed,
            ),
            (
                "capture_evicted_total",
                "Request details evicted before their span closed.",
                c.evicted,
            ),
            ("spans_opened_total", "Spans started.", a.opened),
            (
                "spans_closed_end_total",
                "Spans finished by a request boundary.",
                a.closed_end,
            ),
            (
                "spans_closed_fin_total",
                "Spans finished by FIN/RST.",
                a.closed_fin,
            ),
            (
                "spans_closed_idle_total",
                "Spans finished by the idle timeout.",
                a.closed_idle,
            ),
            (
                "spans_evicted_total",
                "Spans finished early: open-span limit reached.",
                a.evicted,
            ),
            (
                "spans_released_early_total",
                "Spans sent before their trace went quiet: held-span limit reached (links may be partial).",
                a.released_early,
            ),
            ("spans_created_total", "Spans handed to export.", a.emitted),
        ]
        .into_iter()
        .map(|(n, h, v)| (n.to_string(), h.to_string(), v))
        .collect()
    }
}

fn snapshot(
    dp: &Datapath,
    table: &Mutex<TraceTable>,
    pipe: &Pipeline,
    maps: &[(String, u64, u64)],
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
    {
        let t = table.lock().expect("table lock");
        m.push((
            "TRACES".into(),
            t.by_pid.len() as u64,
            t.by_pid.capacity() as u64,
        ));
        m.push((
            "FLOW_TRACES".into(),
            t.by_flow.len() as u64,
            t.by_flow.capacity() as u64,
        ));
        m.push(("NETNS_GEN".into(), t.gate.active_namespaces() as u64, 0));
    }
    Snapshot {
        attachments,
        datapath,
        maps: m,
        agent: pipe.counters(),
        spans_open: pipe.assembler.open_spans() as u64,
        spans_held: pipe.held() as u64,
        capture_cached: pipe.capture.cached() as u64,
        ready: true,
        pin_dir: dp.pins.dir.as_ref().map(|d| d.display().to_string()),
        pinned: dp.pins.maps.clone(),
    }
}

/// Hands free heap pages back to the kernel. Span buffers fill and drain
/// with collector outages and trace bursts; glibc keeps the freed pages,
/// so RSS would show the high-water mark of fragmentation rather than what
/// the agent holds (the soak measured the difference).
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
        tokio::spawn(reg.serve(listener));
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
            if let Err(e) = metrics::serve(addr, ops).await {
                warn!("metrics endpoint {addr}: {e}");
            }
        });
    }
    // In a cluster: this node's pods, for span resources.
    let pods = crate::k8s::pods::start(std::env::var("NODE_NAME").ok()).await;
    let mut pipe = Pipeline::with_pods(&cfg, pods);
    pipe.stats.adopted = dp.pins.adopted as u64;
    pipe.stats.adopted_idle = dp.pins.expired as u64;

    // Subscribe before the dump so no link can slip between the two.
    let monitor = netlink::Socket::open(true)?;
    let links = netlink::Socket::open(false)?.dump_links()?;
    let mut follower = Follower::new(&cfg);
    for link in links {
        follower.handle(&mut dp, LinkEvent::New(link), &mut pipe.stats);
    }
    let (tx, mut link_rx) = mpsc::channel::<LinkEvent>(1024);
    std::thread::Builder::new()
        .name("tagflow-netlink".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match netlink::read_events(&monitor, &mut buf) {
                    Ok(evs) => {
                        for ev in evs {
                            if tx.blocking_send(ev).is_err() {
                                return;
                            }
                        }
                    }
                    // ENOBUFS: notifications were lost. A full dump puts the
                    // attachments right (new links attached, gone ones
                    // forgotten).
                    Err(netlink::NetlinkError::Io(e))
                        if e.raw_os_error() == Some(libc::ENOBUFS) =>
                    {
                        warn!("link notifications lost; re-reading every link");
                        let dump = netlink::Socket::open(false).and_then(|mut s| s.dump_links());
                        match dump {
                            Ok(links) => {
                                if tx.blocking_send(LinkEvent::Resync(links)).is_err() {
                                    return;
                                }
                            }
                            Err(e) => warn!("link re-read: {e}"),
                        }
                    }
                    Err(e) => warn!("link monitor: {e}"),
                }
            }
        })?;

    let rb = dp
        .take_events()
        .expect("fresh datapath has its ring buffer");
    // SAFETY: the ring buffer owns its map fd and keeps it open (and the
    // same) for as long as the AsyncFd owns the ring buffer.
    let mut events: AsyncFd<RingBuf<MapData>> =
        unsafe { AsyncFd::register(rb) }.map_err(|e| AgentError::Io(e.into()))?;
    let mut sweep = tokio::time::interval(Duration::from_millis(250));
    let mut second = tokio::time::interval(Duration::from_secs(1));
    let mut maps = dp.map_fill();
    let mut maps_at = Instant::now();
    info!(attached = dp.attached().len(), "tagflow running");
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(ev) = link_rx.recv() => follower.handle(&mut dp, ev, &mut pipe.stats),
            guard = events.readable_mut() => {
                let mut guard = guard?;
                let rb = guard.get_inner_mut();
                while let Some(item) = rb.next() {
                    let ev = events::decode(&item);
                    drop(item);
                    if let Some(k) = pipe.event(ev, &table) {
                        let until = monotonic_ns() + CAPTURE_SKIP_NS;
                        if dp.skip_capture(&k, until).is_ok() {
                            pipe.stats.capture_skips += 1;
                        }
                    }
                }
                guard.clear_ready();
            }
            _ = sweep.tick() => pipe.sweep(&mut dp, &exporter, &table),
            _ = second.tick() => {
                match table.lock().expect("table lock").expire() {
                    Ok(n) => pipe.stats.expired += n as u64,
                    Err(e) => warn!("expiring trace entries: {e}"),
                }
                if maps_at.elapsed() >= Duration::from_secs(10) {
                    let (f, c) = dp.gc(monotonic_ns(), FLOW_GC_NS, NEGATIVE_GC_NS);
                    pipe.stats.flows_collected += f;
                    pipe.stats.skips_collected += c;
                    maps = dp.map_fill();
                    maps_at = Instant::now();
                    release_free_memory();
                }
                *ops.snapshot.lock().expect("snapshot lock") = snapshot(&dp, &table, &pipe, &maps);
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
    drop(dp);
    Ok(())
}

pub fn hex(b: &[u8]) -> String {
    crate::ids::to_hex(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str) -> Link {
        Link {
            index,
            name: name.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_resync_attaches_what_is_wanted_and_forgets_what_is_gone() {
        // Attached: 3 (still there), 4 (deleted while notifications were lost).
        let links = [link(1, "lo"), link(3, "veth3"), link(5, "veth5")];
        let (attach, detach) = resync_plan(&[3, 4], &links, |n| n.starts_with("veth"));
        let names: Vec<_> = attach.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["veth3", "veth5"], "attach is idempotent for veth3");
        assert_eq!(detach, [4]);
    }
}
