//! Loads tagflow's eBPF object, attaches the owner hooks to the cgroup v2
//! root and `tagflow_ingress` to interfaces, and hands out the maps.
//!
//! Minimum kernel: 6.6 for TCX links (older kernels get a clsact/netlink
//! filter), 5.7 for cgroup links, and `bpf_get_netns_cookie` must be allowed
//! in TC programs (≈ 6.13).
use std::{
    collections::HashMap,
    fs::File,
    io,
    path::{Path, PathBuf},
    time::Duration,
};

use agent_common::{programs as prog, Counter, FlowKey, FlowStats, PortKey};
use aya::{
    include_bytes_aligned,
    maps::{HashMap as BpfHashMap, MapData, MapError, PerCpuArray, RingBuf},
    programs::{
        links::CgroupAttachMode,
        tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions},
        CgroupSock, CgroupSockAddr, LinkOrder, ProgramError, SchedClassifier, TcAttachType,
    },
    Ebpf, EbpfError, EbpfLoader,
};
use tracing::{debug, info, warn};

use crate::{
    config::{AgentConfig, AttachMode, MapSizes, TcxOrder},
    pin::{Expect, PinDir},
    tables::{Gate, Table, TableError, TraceTable},
};

/// The tagflow eBPF object, built by build.rs.
pub static TAGFLOW_OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tagflow"));

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("loading the eBPF object: {0}")]
    Ebpf(#[from] EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("map {0} missing from the object (or already taken)")]
    MissingMap(&'static str),
    #[error("program {0} missing from the object")]
    MissingProgram(&'static str),
    #[error("no cgroup v2 mount found in /proc/self/mountinfo")]
    NoCgroup2,
    #[error("opening cgroup {path}: {source}")]
    Cgroup { path: PathBuf, source: io::Error },
    #[error("attaching to {iface}: {reason}")]
    Attach { iface: String, reason: String },
    #[error("adopting pinned trace entries: {0}")]
    Adopt(#[from] TableError),
}

/// The maps pinned across restarts, with what they must be to be reused.
pub fn pinned_maps(sizes: &MapSizes) -> Vec<Expect> {
    use agent_common::{maps as m, TraceContext, TraceKey};
    use aya::maps::MapType;
    use std::mem::size_of;
    let e = |name, map_type, key: usize, value: usize, max_entries| Expect {
        name,
        map_type,
        key_size: key as u32,
        value_size: value as u32,
        max_entries,
    };
    vec![
        e(
            m::TRACES,
            MapType::Hash,
            size_of::<TraceKey>(),
            size_of::<TraceContext>(),
            sizes.traces,
        ),
        e(
            m::FLOW_TRACES,
            MapType::Hash,
            size_of::<FlowKey>(),
            size_of::<TraceContext>(),
            sizes.flow_traces,
        ),
        e(m::SOCK_OWNER, MapType::LruHash, 8, 4, sizes.sock_owner),
        e(
            m::BOUND_PORTS,
            MapType::LruHash,
            size_of::<PortKey>(),
            4,
            sizes.bound_ports,
        ),
    ]
}

/// What pinning did at start (for logs and /status).
#[derive(Clone, Debug, Default)]
pub struct PinReport {
    /// The pin directory in use; none when maps are not pinned.
    pub dir: Option<PathBuf>,
    /// (map, "created" | "reused" | "replaced: why").
    pub maps: Vec<(String, String)>,
    /// Trace entries taken over from the previous agent.
    pub adopted: usize,
    /// Trace entries the previous agent left that were already idle.
    pub expired: usize,
}

/// How an interface ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum AttachKind {
    Tcx,
    Netlink,
}

struct Attachment {
    name: String,
    kind: AttachKind,
    link: SchedClassifierLinkId,
}

/// The loaded datapath. Dropping it detaches everything it attached (TCX
/// and cgroup links close; netlink filters are removed by aya).
pub struct Datapath {
    ebpf: Ebpf,
    // Keeps the aya-log ring buffer open; dropping it breaks log delivery.
    _logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    attachments: HashMap<u32, Attachment>,
    mode: AttachMode,
    order: TcxOrder,
    counters: PerCpuArray<MapData, u64>,
    flow_stats: BpfHashMap<MapData, FlowKey, FlowStats>,
    iface_netns: BpfHashMap<MapData, u32, u64>,
    bound_ports: BpfHashMap<MapData, PortKey, u32>,
    sock_owner: BpfHashMap<MapData, u64, u32>,
    events: Option<RingBuf<MapData>>,
    capture_skip: BpfHashMap<MapData, FlowKey, u64>,
    table: Option<TraceTable>,
    pub owner_hooks: Vec<&'static str>,
    pub pins: PinReport,
    // Holds the pin directory's lock for the datapath's life.
    _pin_dir: Option<PinDir>,
}

fn take<T: TryFrom<aya::maps::Map, Error = MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, LoaderError> {
    let map = ebpf.take_map(name).ok_or(LoaderError::MissingMap(name))?;
    T::try_from(map).map_err(|source| LoaderError::Map { name, source })
}

impl Datapath {
    /// Loads the object with `cfg`'s globals and map sizes, loads the ingress
    /// classifier, and (with `owner_hooks`) attaches the cgroup owner hooks.
    pub fn load(cfg: &AgentConfig, owner_hooks: bool) -> Result<Self, LoaderError> {
        use agent_common::maps as m;
        let mut dp_cfg = cfg.datapath_config();
        // Sockets in our own namespace are not pods' (see resolve::netns).
        dp_cfg.host_netns = crate::netns::current_cookie().map_err(|e| LoaderError::Attach {
            iface: "-".into(),
            reason: e.to_string(),
        })?;
        let sizes = &cfg.maps;
        // A datapath without pins still tags; it only forgets on restart.
        let pin_dir = cfg
            .pin_maps
            .then(|| {
                PinDir::prepare(&cfg.pin_dir, agent_common::ABI_VERSION, &pinned_maps(sizes))
                    .map_err(|e| warn!("maps not pinned, a restart will start empty: {e}"))
                    .ok()
            })
            .flatten();
        let mut loader = EbpfLoader::new();
        if let Some(p) = &pin_dir {
            for e in pinned_maps(sizes) {
                loader.map_pin_path(e.name, p.path(e.name));
            }
        }
        let mut ebpf = loader
            .override_global(agent_common::CONFIG_SYMBOL, &dp_cfg, true)
            .map_max_entries(m::TRACES, sizes.traces)
            .map_max_entries(m::FLOW_TRACES, sizes.flow_traces)
            .map_max_entries(m::FLOW_STATS, sizes.flow_stats)
            .map_max_entries(m::SOCK_OWNER, sizes.sock_owner)
            .map_max_entries(m::BOUND_PORTS, sizes.bound_ports)
            .map_max_entries(m::IFACE_NETNS, sizes.iface_netns)
            .map_max_entries(m::NETNS_GEN, sizes.netns_gen)
            .map_max_entries(m::EVENTS, sizes.events_bytes)
            .load(TAGFLOW_OBJECT)?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                warn!("eBPF log bridge unavailable: {e}");
                None
            }
        };
        let ingress: &mut SchedClassifier = program(&mut ebpf, prog::INGRESS)?;
        ingress.load().map_err(|source| LoaderError::Program {
            name: prog::INGRESS,
            source,
        })?;

        let idle = Duration::from_secs(cfg.trace_idle_secs);
        let traces = take(&mut ebpf, m::TRACES)?;
        let flow_traces = take(&mut ebpf, m::FLOW_TRACES)?;
        let mut table = TraceTable {
            by_pid: Table::new(traces, sizes.traces as usize, idle),
            by_flow: Table::new(flow_traces, sizes.flow_traces as usize, idle),
            gate: Gate::new(
                take(&mut ebpf, m::NETNS_GEN)?,
                take(&mut ebpf, m::NETNS_SLOTS)?,
            ),
        };
        let mut pins = PinReport::default();
        if let Some(p) = &pin_dir {
            // Before any attachment: the gate must be open for adopted
            // entries by the time the first packet looks.
            let (adopted, expired) = table.adopt()?;
            pins = PinReport {
                dir: Some(p.dir().into()),
                maps: p
                    .fates
                    .iter()
                    .map(|(n, f)| (n.to_string(), f.to_string()))
                    .collect(),
                adopted,
                expired,
            };
            info!(adopted, expired, "trace entries from the previous agent");
        }
        let mut dp = Self {
            counters: take(&mut ebpf, m::COUNTERS)?,
            flow_stats: take(&mut ebpf, m::FLOW_STATS)?,
            iface_netns: take(&mut ebpf, m::IFACE_NETNS)?,
            bound_ports: take(&mut ebpf, m::BOUND_PORTS)?,
            sock_owner: take(&mut ebpf, m::SOCK_OWNER)?,
            events: Some(take(&mut ebpf, m::EVENTS)?),
            capture_skip: take(&mut ebpf, m::CAPTURE_SKIP)?,
            table: Some(table),
            ebpf,
            _logger: logger,
            attachments: HashMap::new(),
            mode: cfg.attach_mode,
            order: cfg.tcx_order,
            owner_hooks: Vec::new(),
            pins,
            _pin_dir: pin_dir,
        };
        if owner_hooks {
            let root = match &cfg.cgroup_root {
                Some(p) => p.clone(),
                None => cgroup2_root()?,
            };
            dp.attach_owner_hooks(&root)?;
        }
        Ok(dp)
    }

    fn attach_owner_hooks(&mut self, root: &Path) -> Result<(), LoaderError> {
        let cgroup = File::open(root).map_err(|source| LoaderError::Cgroup {
            path: root.into(),
            source,
        })?;
        for name in [
            prog::CONNECT4,
            prog::CONNECT6,
            prog::SENDMSG4,
            prog::SENDMSG6,
            prog::BIND4,
            prog::BIND6,
        ] {
            let p: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
            p.load()
                .map_err(|source| LoaderError::Program { name, source })?;
            // On ≥ 5.7 aya attaches with a cgroup *link*: always multi-attach
            // (coexists with Cilium's socket LB and others), detached when
            // our fd closes. BPF_LINK_CREATE takes no ALLOW_MULTI flag.
            p.attach(&cgroup, CgroupAttachMode::Single)
                .map_err(|source| LoaderError::Program { name, source })?;
            self.owner_hooks.push(name);
        }
        // Housekeeping only: the LRU map copes without it.
        let release = program::<CgroupSock>(&mut self.ebpf, prog::SOCK_RELEASE).and_then(|p| {
            p.load().map_err(|source| LoaderError::Program {
                name: prog::SOCK_RELEASE,
                source,
            })?;
            p.attach(&cgroup, CgroupAttachMode::Single)
                .map_err(|source| LoaderError::Program {
                    name: prog::SOCK_RELEASE,
                    source,
                })
        });
        match release {
            Ok(_) => self.owner_hooks.push(prog::SOCK_RELEASE),
            Err(e) => warn!("sock_release hook unavailable (owners expire by LRU only): {e:?}"),
        }
        info!(cgroup = %root.display(), hooks = ?self.owner_hooks, "owner hooks attached");
        Ok(())
    }

    /// Attaches `tagflow_ingress` to the ingress of `name`. Idempotent per
    /// ifindex. Stale netlink filters named `tagflow_ingress` (left by a
    /// killed agent) are removed first, so a hook never carries two.
    pub fn attach(&mut self, name: &str, ifindex: u32) -> Result<AttachKind, LoaderError> {
        if let Some(a) = self.attachments.get(&ifindex) {
            if a.name == name {
                return Ok(a.kind);
            }
        }
        let err = |reason: String| LoaderError::Attach {
            iface: name.into(),
            reason,
        };
        remove_stale_filters(name);
        let order = self.order;
        let mode = self.mode;
        let p: &mut SchedClassifier = program(&mut self.ebpf, prog::INGRESS)?;
        let tcx = || match order {
            TcxOrder::First => LinkOrder::first(),
            TcxOrder::Last => LinkOrder::last(),
        };
        let (kind, link) = match mode {
            AttachMode::Tcx => (
                AttachKind::Tcx,
                p.attach_with_options(
                    name,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(tcx()),
                )
                .map_err(|e| err(e.to_string()))?,
            ),
            AttachMode::Netlink => (AttachKind::Netlink, attach_netlink(p, name).map_err(err)?),
            AttachMode::Auto => {
                match p.attach_with_options(
                    name,
                    TcAttachType::Ingress,
                    TcAttachOptions::TcxOrder(tcx()),
                ) {
                    Ok(l) => (AttachKind::Tcx, l),
                    Err(e) => {
                        debug!(iface = name, "TCX attach failed ({e}); using clsact");
                        (AttachKind::Netlink, attach_netlink(p, name).map_err(err)?)
                    }
                }
            }
        };
        self.attachments.insert(
            ifindex,
            Attachment {
                name: name.into(),
                kind,
                link,
            },
        );
        info!(iface = name, ifindex, ?kind, "attached");
        Ok(kind)
    }

    /// Detaches from an interface (also used when it disappeared: then the
    /// kernel already dropped the hook and errors are ignored).
    pub fn detach(&mut self, ifindex: u32) {
        if let Some(a) = self.attachments.remove(&ifindex) {
            if let Ok(p) = program::<SchedClassifier>(&mut self.ebpf, prog::INGRESS) {
                if let Err(e) = p.detach(a.link) {
                    debug!(iface = a.name, "detach: {e}");
                }
            }
            let _ = self.iface_netns.remove(&ifindex);
            info!(iface = a.name, ifindex, "detached");
        }
    }

    pub fn attached(&self) -> Vec<(u32, String, AttachKind)> {
        let mut v: Vec<_> = self
            .attachments
            .iter()
            .map(|(i, a)| (*i, a.name.clone(), a.kind))
            .collect();
        v.sort();
        v
    }

    /// Records the namespace at the other end of an interface, for packets
    /// that carry no socket.
    pub fn set_iface_netns(&mut self, ifindex: u32, netns: u64) -> Result<(), LoaderError> {
        self.iface_netns
            .insert(ifindex, netns, 0)
            .map_err(|source| LoaderError::Map {
                name: "IFACE_NETNS",
                source,
            })
    }

    pub fn set_bound_port(&mut self, key: PortKey, pid: u32) -> Result<(), LoaderError> {
        self.bound_ports
            .insert(key, pid, 0)
            .map_err(|source| LoaderError::Map {
                name: "BOUND_PORTS",
                source,
            })
    }

    pub fn bound_port(&self, key: &PortKey) -> Option<u32> {
        self.bound_ports.get(key, 0).ok()
    }

    pub fn sock_owner(&self, cookie: u64) -> Option<u32> {
        self.sock_owner.get(&cookie, 0).ok()
    }

    /// Counters summed over CPUs, in `Counter` order; `Seen` is the sum of
    /// the terminal counters.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>, LoaderError> {
        let mut out = Counter::ALL
            .iter()
            .map(|c| {
                let v = self
                    .counters
                    .get(&(*c as u32), 0)
                    .map_err(|source| LoaderError::Map {
                        name: "COUNTERS",
                        source,
                    })?;
                Ok((*c, v.iter().sum()))
            })
            .collect::<Result<Vec<(Counter, u64)>, LoaderError>>()?;
        out[Counter::Seen as usize].1 = Counter::TERMINAL.iter().map(|t| out[*t as usize].1).sum();
        Ok(out)
    }

    pub fn counter(&self, c: Counter) -> u64 {
        self.counters().map(|v| v[c as usize].1).unwrap_or(0)
    }

    /// A snapshot of FLOW_STATS.
    pub fn flow_stats(&self) -> Vec<(FlowKey, FlowStats)> {
        self.flow_stats.iter().filter_map(Result::ok).collect()
    }

    /// FLOW_STATS entries for these flows only (cheaper than a full walk).
    pub fn flow_stats_for<'a>(
        &self,
        keys: impl Iterator<Item = &'a FlowKey>,
    ) -> std::collections::HashMap<FlowKey, FlowStats> {
        keys.filter_map(|k| self.flow_stats.get(k, 0).ok().map(|s| (*k, s)))
            .collect()
    }

    /// (map, entries, capacity) of the maps the datapath fills. Walks the
    /// maps: call it every few seconds, not per event.
    pub fn map_fill(&self) -> Vec<(String, u64, u64)> {
        let cap = |m: &aya::maps::MapData| m.info().map(|i| i.max_entries() as u64).unwrap_or(0);
        use aya::maps::IterableMap;
        vec![
            (
                "FLOW_STATS".into(),
                self.flow_stats.keys().count() as u64,
                cap(self.flow_stats.map()),
            ),
            (
                "SOCK_OWNER".into(),
                self.sock_owner.keys().count() as u64,
                cap(self.sock_owner.map()),
            ),
            (
                "BOUND_PORTS".into(),
                self.bound_ports.keys().count() as u64,
                cap(self.bound_ports.map()),
            ),
            (
                "IFACE_NETNS".into(),
                self.iface_netns.keys().count() as u64,
                cap(self.iface_netns.map()),
            ),
            (
                "CAPTURE_SKIP".into(),
                self.capture_skip.keys().count() as u64,
                cap(self.capture_skip.map()),
            ),
        ]
    }

    /// Deletes FLOW_STATS entries whose last packet is older than
    /// `traced_age_ns` ("no trace" entries: `negative_age_ns`, they are cheap
    /// to make again), and CAPTURE_SKIP entries past their time, so both maps
    /// hold live connections rather than filling to their LRU capacity with
    /// dead ones. A live flow that was idle that long simply resolves again
    /// on its next packet. Returns (flows, skips) removed.
    pub fn gc(&mut self, now_ns: u64, traced_age_ns: u64, negative_age_ns: u64) -> (u64, u64) {
        let flows = remove_where(&mut self.flow_stats, |s| {
            let age = if s.is_negative() {
                negative_age_ns
            } else {
                traced_age_ns
            };
            now_ns.saturating_sub(s.last_ns.max(s.first_ns)) > age
        });
        let skips = remove_where(&mut self.capture_skip, |until| *until < now_ns);
        (flows, skips)
    }

    /// Deletes `key`'s FLOW_STATS entry if it still belongs to `trace` (its
    /// connection closed: no need to wait for the GC).
    pub fn forget_flow(&mut self, key: &FlowKey, trace: &[u8; 16]) -> bool {
        match self.flow_stats.get(key, 0) {
            Ok(s) if &s.trace_id == trace => self.flow_stats.remove(key).is_ok(),
            _ => false,
        }
    }

    /// Stops copying request heads of `key` until `until_ns` (monotonic).
    pub fn skip_capture(&mut self, key: &FlowKey, until_ns: u64) -> Result<(), LoaderError> {
        self.capture_skip
            .insert(key, until_ns, 0)
            .map_err(|source| LoaderError::Map {
                name: "CAPTURE_SKIP",
                source,
            })
    }

    /// The trace tables (once; the sources own them from then on).
    pub fn take_trace_table(&mut self) -> Option<TraceTable> {
        self.table.take()
    }

    /// The new-flow ring buffer (once).
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// The loaded ingress classifier (test_run, benchmarks).
    pub fn ingress(&mut self) -> Result<&mut SchedClassifier, LoaderError> {
        program(&mut self.ebpf, prog::INGRESS)
    }
}

/// Deletes the entries whose value matches; returns how many went. Keys
/// are collected first: deleting while walking a BPF hash restarts the walk.
fn remove_where<K: aya::Pod, V: aya::Pod>(
    map: &mut BpfHashMap<MapData, K, V>,
    stale: impl Fn(&V) -> bool,
) -> u64 {
    let keys: Vec<K> = map
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, v)| stale(v))
        .map(|(k, _)| k)
        .collect();
    keys.iter().filter(|k| map.remove(k).is_ok()).count() as u64
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, LoaderError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let p = ebpf
        .program_mut(name)
        .ok_or(LoaderError::MissingProgram(name))?;
    p.try_into()
        .map_err(|source| LoaderError::Program { name, source })
}

fn attach_netlink(p: &mut SchedClassifier, name: &str) -> Result<SchedClassifierLinkId, String> {
    // Fails when the interface already has a clsact qdisc (ours from a
    // previous run, or another agent's): that one serves as well.
    let qdisc = tc::qdisc_add_clsact(name).err();
    p.attach_with_options(
        name,
        TcAttachType::Ingress,
        TcAttachOptions::Netlink(NlOptions::default()),
    )
    .map_err(|e| match qdisc {
        Some(q) => format!("{e} (adding clsact: {q})"),
        None => e.to_string(),
    })
}

/// Removes netlink filters named like our program: an agent killed without
/// cleanup (SIGKILL, OOM) leaves them behind, unlike TCX links.
pub fn remove_stale_filters(iface: &str) -> bool {
    match tc::qdisc_detach_program(iface, TcAttachType::Ingress, prog::INGRESS) {
        Ok(()) => {
            info!(iface, "removed stale tagflow filter");
            true
        }
        Err(_) => false,
    }
}

/// The cgroup v2 mount point, from /proc/self/mountinfo.
pub fn cgroup2_root() -> Result<PathBuf, LoaderError> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| LoaderError::Cgroup {
            path: "/proc/self/mountinfo".into(),
            source,
        })?;
    parse_cgroup2_mount(&text).ok_or(LoaderError::NoCgroup2)
}

/// Finds the first cgroup2 mount point in mountinfo text.
pub fn parse_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        if post.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        pre.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// (name, program id) of the programs on an interface's TCX ingress, in
/// chain order. Names are truncated by the kernel to 15 bytes.
pub fn tcx_programs(iface: &str) -> Result<Vec<(String, u32)>, ProgramError> {
    let (_, progs) = SchedClassifier::query_tcx(iface, TcAttachType::Ingress)?;
    Ok(progs
        .iter()
        .map(|p| (p.name_as_str().unwrap_or("?").to_string(), p.id()))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_mount() {
        let mi = "25 30 0:23 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(parse_cgroup2_mount(mi), Some("/sys/fs/cgroup".into()));
        let hybrid = "30 25 0:26 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
                      31 25 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            parse_cgroup2_mount(hybrid),
            Some("/sys/fs/cgroup/unified".into())
        );
        assert_eq!(
            parse_cgroup2_mount("1 2 0:1 / / rw - ext4 /dev/vda rw\n"),
            None
        );
    }
}
