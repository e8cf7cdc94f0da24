//! The `tagflow run` daemon: load, attach to matching interfaces and follow
//! them, backfill owners, expire idle trace entries, drain new-flow events.
use std::{
    future::Future,
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use tokio::{io::unix::AsyncFd, sync::mpsc};
use tracing::{debug, info, warn};

use crate::{
    backfill,
    config::AgentConfig,
    events::{self, Event},
    loader::{Datapath, LoaderError},
    netlink::{self, Link, LinkEvent},
    netns::PeerResolver,
    sources::{
        capture::Capture,
        registry::{self, Limits, Registry},
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
}

/// Userspace-side counters of what the agent itself dropped or skipped.
#[derive(Default, Debug)]
pub struct AgentStats {
    pub events: u64,
    pub events_unknown: u64,
    pub events_truncated: u64,
    pub attach_failures: u64,
    pub expired: u64,
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

/// Runs until `shutdown` resolves; detaches everything on the way out.
pub async fn run(cfg: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    let mut dp = Datapath::load(&cfg, true)?;
    if cfg.backfill {
        let owners = tokio::task::block_in_place(backfill::scan);
        let mut n = 0;
        for (key, pid) in owners {
            if dp.set_bound_port(key, pid).is_ok() {
                n += 1;
            }
        }
        info!(sockets = n, "backfilled bound ports");
    }
    let table: Arc<Mutex<TraceTable>> = Arc::new(Mutex::new(
        dp.take_trace_table().expect("fresh datapath has its table"),
    ));
    let mut stats = AgentStats::default();
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
        tokio::spawn(Registry::new(table.clone(), limits).serve(listener));
    }
    let mut capture = Capture::new(cfg.capture_headers.clone(), 65536);

    // Subscribe before the dump so no link can slip between the two.
    let monitor = netlink::Socket::open(true)?;
    let links = netlink::Socket::open(false)?.dump_links()?;
    let mut follower = Follower::new(&cfg);
    for link in links {
        follower.handle(&mut dp, LinkEvent::New(link), &mut stats);
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
                    // ENOBUFS: we missed notifications; keep going (a
                    // missed link is picked up by the next restart).
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
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    info!(attached = dp.attached().len(), "tagflow running");
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(ev) = link_rx.recv() => follower.handle(&mut dp, ev, &mut stats),
            guard = events.readable_mut() => {
                let mut guard = guard?;
                let rb = guard.get_inner_mut();
                while let Some(item) = rb.next() {
                    match events::decode(&item) {
                        Event::FlowNew(f) => {
                            stats.events += 1;
                            debug!(pid = f.stats.pid, ifindex = f.stats.ifindex, trace = %hex(&f.stats.trace_id), "flow tagged");
                        }
                        Event::FlowEnd(f) => {
                            stats.events += 1;
                            debug!(pid = f.stats.pid, packets = f.stats.packets, trace = %hex(&f.stats.trace_id), "flow moved on");
                        }
                        Event::HttpHead(h) => {
                            let out = capture.handle(&h, &mut table.lock().expect("table lock"));
                            debug!(pid = h.pid, ?out, "request head");
                        }
                        Event::Unknown(_) => stats.events_unknown += 1,
                        Event::Truncated => stats.events_truncated += 1,
                    }
                }
                guard.clear_ready();
            }
            _ = tick.tick() => {
                match table.lock().expect("table lock").expire() {
                    Ok(n) => stats.expired += n as u64,
                    Err(e) => warn!("expiring trace entries: {e}"),
                }
            }
        }
    }
    info!(?stats, "shutting down; detaching");
    if cfg.registration.enabled {
        let _ = std::fs::remove_file(&cfg.registration.socket);
    }
    drop(dp);
    Ok(())
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
