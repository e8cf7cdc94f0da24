//! Loads tagflow's eBPF object, attaches the owner hooks to the cgroup v2
//! root and `tagflow_ingress` to interfaces, and hands out the maps.
//!
//! Minimum kernel: 5.15 (features.rs probes what the kernel offers and
//! picks the ingress variant; TCX links from 6.6, a clsact/netlink filter
//! before).
mod attach;
mod features;
mod hooks;
mod housekeeping;
mod maps;

use std::{collections::HashMap, io, path::PathBuf, time::Duration};

use agent_common::{programs as prog, FlowKey, FlowStats, PortKey, SockOwner};
use aya::{
    include_bytes_aligned,
    maps::{HashMap as BpfHashMap, MapData, MapError, PerCpuArray, ProgramArray, RingBuf},
    programs::{ProgramError, SchedClassifier},
    Ebpf, EbpfError, EbpfLoader,
};
use tracing::{info, warn};

pub use crate::pin::{pinned_maps, PinReport};
use crate::{
    config::{AgentConfig, AttachMode, NetnsSource, TcxOrder},
    pin::PinDir,
    tables::{Gate, Table, TableError, TraceTable},
};
use attach::Attachment;
pub use attach::{remove_stale_filters, tcx_programs, AttachKind};
pub use features::{Feature, Features};
pub use hooks::{cgroup2_root, parse_cgroup2_mount};
pub use housekeeping::Housekeeper;

/// The tagflow eBPF object, built by build.rs.
pub static TAGFLOW_OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tagflow"));

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("loading the eBPF object")]
    Ebpf(#[from] EbpfError),
    #[error("program {name}")]
    Program {
        name: &'static str,
        source: ProgramError,
    },
    #[error("map {name}")]
    Map {
        name: &'static str,
        source: MapError,
    },
    #[error("duplicating map {name}'s descriptor")]
    Duplicate {
        name: &'static str,
        source: io::Error,
    },
    #[error("map {0} missing from the object (or already taken)")]
    MissingMap(&'static str),
    #[error("program {0} missing from the object")]
    MissingProgram(&'static str),
    #[error("no cgroup v2 mount found in /proc/self/mountinfo")]
    NoCgroup2,
    #[error("opening cgroup {path}")]
    Cgroup { path: PathBuf, source: io::Error },
    #[error("attaching to {iface}")]
    Attach { iface: String, source: ProgramError },
    #[error("entering or reading a network namespace")]
    Netns(#[from] crate::netns::NetnsError),
    #[error("reading the kernel's BTF")]
    Btf(#[from] aya::BtfError),
    #[error("adopting pinned trace entries")]
    Adopt(#[from] TableError),
    #[error("kernel {release} lacks {missing}: tagflow needs Linux 5.15 or newer")]
    Kernel { release: String, missing: String },
}

/// The loaded datapath. Dropping it detaches everything it attached (TCX
/// and cgroup links close; netlink filters are removed by aya).
pub struct Datapath {
    ebpf: Ebpf,
    // Keeps the aya-log ring buffer open; dropping it breaks log delivery.
    _logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    attachments: HashMap<u32, Attachment>,
    /// `lo` inside pod namespaces, by namespace cookie, with a handle on the
    /// namespace to detach in.
    loopbacks: HashMap<u64, (Attachment, std::fs::File)>,
    /// The last clsact filter handle given to a pod loopback.
    lo_handles: u32,
    /// The node's uplinks (capture of requests from other nodes).
    uplinks: HashMap<u32, Attachment>,
    mode: AttachMode,
    order: TcxOrder,
    features: Features,
    /// The ingress variant loaded (`INGRESS` or `INGRESS_IFNS`).
    ingress: &'static str,
    counters: PerCpuArray<MapData, u64>,
    flow_stats: BpfHashMap<MapData, FlowKey, FlowStats>,
    iface_netns: BpfHashMap<MapData, u32, u64>,
    pod_addrs: BpfHashMap<MapData, [u8; 16], u64>,
    bound_ports: BpfHashMap<MapData, PortKey, u32>,
    sock_owner: BpfHashMap<MapData, u64, SockOwner>,
    sock_flow: BpfHashMap<MapData, u64, FlowKey>,
    thread_via: BpfHashMap<MapData, u32, FlowKey>,
    events: Option<RingBuf<MapData>>,
    capture_skip: BpfHashMap<MapData, FlowKey, u64>,
    /// Held open: the kernel empties a program array when its last user
    /// file descriptor closes.
    _h2_walk: ProgramArray<MapData>,
    table: Option<TraceTable>,
    pub owner_hooks: Vec<&'static str>,
    /// The hooks that follow a request from a connection to the thread
    /// reading it (empty when the kernel refused them: see hooks.rs).
    pub thread_hooks: Vec<&'static str>,
    pub pins: PinReport,
    // Holds the pin directory's lock for the datapath's life.
    _pin_dir: Option<PinDir>,
}

impl Drop for Datapath {
    /// Pod loopbacks first, each inside its namespace: aya would remove a
    /// clsact filter by ifindex in our own namespace, where 1 is the host's
    /// loopback. Everything else goes with its fd.
    fn drop(&mut self) {
        let cookies: Vec<u64> = self.loopbacks.keys().copied().collect();
        for c in cookies {
            self.detach_loopback(c);
        }
    }
}

fn take<T: TryFrom<aya::maps::Map, Error = MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, LoaderError> {
    let map = ebpf.take_map(name).ok_or(LoaderError::MissingMap(name))?;
    T::try_from(map).map_err(|source| LoaderError::Map { name, source })
}

/// Loads the HTTP/2 walk and puts it where the ingress programs tail-call
/// it: index 0 the variant on the kernel's clock (the uplink, the ingress
/// for kernels without the netns helper), 1 the one on the skb's clock.
fn load_h2_walk(ebpf: &mut Ebpf, skb_clock: bool) -> Result<ProgramArray<MapData>, LoaderError> {
    let mut walk: ProgramArray<MapData> = take(ebpf, agent_common::maps::H2_WALK)?;
    let variants: &[(&'static str, u32)] = if skb_clock {
        &[(prog::H2_IFNS, 0), (prog::H2, 1)]
    } else {
        &[(prog::H2_IFNS, 0)]
    };
    for &(name, index) in variants {
        let p: &mut SchedClassifier = program(ebpf, name)?;
        p.load()
            .map_err(|source| LoaderError::Program { name, source })?;
        let fd = p
            .fd()
            .map_err(|source| LoaderError::Program { name, source })?;
        walk.set(index, fd, 0).map_err(|source| LoaderError::Map {
            name: agent_common::maps::H2_WALK,
            source,
        })?;
    }
    Ok(walk)
}

impl Datapath {
    /// Loads the object with `cfg`'s globals and map sizes, loads the ingress
    /// classifier, and (with `owner_hooks`) attaches the cgroup owner hooks.
    pub fn load(cfg: &AgentConfig, owner_hooks: bool) -> Result<Self, LoaderError> {
        use agent_common::maps as m;
        let features = Features::probe();
        features.check()?;
        let helper = cfg.netns_source == NetnsSource::Auto;
        let ingress = if helper && features.has(Feature::NetnsCookieTc) {
            prog::INGRESS
        } else {
            prog::INGRESS_IFNS
        };
        features.log(ingress);
        let mut dp_cfg = cfg.datapath_config();
        // Sockets in our own namespace are not pods' (see resolve::netns).
        dp_cfg.host_netns = crate::netns::current_cookie()?;
        let sizes = &cfg.maps;
        // A datapath without pins still tags; it only forgets on restart.
        let pin_dir = cfg
            .pin_maps
            .then(|| {
                PinDir::prepare(&cfg.pin_dir, agent_common::ABI_VERSION, &pinned_maps(sizes))
                    .map_err(|e| {
                        warn!(
                            "maps not pinned, a restart will start empty: {}",
                            crate::report(&e)
                        )
                    })
                    .ok()
            })
            .flatten();
        let mut loader = EbpfLoader::new();
        if let Some(p) = &pin_dir {
            for e in pinned_maps(sizes) {
                loader.map_pin_path(e.name, p.path(e.name));
            }
        }
        let offsets = task_offsets();
        let mut ebpf = loader
            .override_global(agent_common::CONFIG_SYMBOL, &dp_cfg, true)
            .override_global(agent_common::TASK_OFFSETS_SYMBOL, &offsets, true)
            .map_max_entries(m::TRACES, sizes.traces)
            .map_max_entries(m::FLOW_TRACES, sizes.flow_traces)
            .map_max_entries(m::FLOW_STATS, sizes.flow_stats)
            .map_max_entries(m::SOCK_OWNER, sizes.sock_owner)
            .map_max_entries(m::SOCK_FLOW, sizes.sock_flow)
            .map_max_entries(m::THREAD_VIA, sizes.thread_via)
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
        for name in [ingress, prog::UPLINK] {
            let p: &mut SchedClassifier = program(&mut ebpf, name)?;
            p.load()
                .map_err(|source| LoaderError::Program { name, source })?;
        }
        let h2_walk = load_h2_walk(&mut ebpf, ingress == prog::INGRESS)?;

        let idle = Duration::from_secs(cfg.trace_idle_secs);
        let traces = take(&mut ebpf, m::TRACES)?;
        let flow_traces = take(&mut ebpf, m::FLOW_TRACES)?;
        let mut table = TraceTable::new(
            Table::new(traces, sizes.traces as usize, idle),
            Table::new(flow_traces, sizes.flow_traces as usize, idle),
            Gate::new(
                take(&mut ebpf, m::NETNS_GEN)?,
                take(&mut ebpf, m::NETNS_SLOTS)?,
            ),
        )
        .with_quota(sizes.entries_per_netns as usize);
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
            pod_addrs: take(&mut ebpf, m::POD_ADDRS)?,
            bound_ports: take(&mut ebpf, m::BOUND_PORTS)?,
            sock_owner: take(&mut ebpf, m::SOCK_OWNER)?,
            sock_flow: take(&mut ebpf, m::SOCK_FLOW)?,
            thread_via: take(&mut ebpf, m::THREAD_VIA)?,
            events: Some(take(&mut ebpf, m::EVENTS)?),
            capture_skip: take(&mut ebpf, m::CAPTURE_SKIP)?,
            _h2_walk: h2_walk,
            table: Some(table),
            ebpf,
            _logger: logger,
            attachments: HashMap::new(),
            loopbacks: HashMap::new(),
            lo_handles: 0,
            uplinks: HashMap::new(),
            mode: cfg.attach_mode,
            order: cfg.tcx_order,
            features,
            ingress,
            owner_hooks: Vec::new(),
            thread_hooks: Vec::new(),
            pins,
            _pin_dir: pin_dir,
        };
        if owner_hooks {
            let root = match &cfg.cgroup_root {
                Some(p) => p.clone(),
                None => cgroup2_root()?,
            };
            dp.attach_owner_hooks(&root)?;
            dp.attach_thread_hooks(&root);
        }
        Ok(dp)
    }

    /// The trace tables (once; the sources own them from then on).
    pub fn take_trace_table(&mut self) -> Option<TraceTable> {
        self.table.take()
    }

    /// The new-flow ring buffer (once).
    pub fn take_events(&mut self) -> Option<RingBuf<MapData>> {
        self.events.take()
    }

    /// What the kernel says of one of our programs (run counts and time
    /// with `kernel.bpf_stats_enabled`: benchmarks).
    pub fn program_info(
        &self,
        name: &'static str,
    ) -> Result<aya::programs::ProgramInfo, LoaderError> {
        self.ebpf
            .program(name)
            .ok_or(LoaderError::MissingProgram(name))?
            .info()
            .map_err(|source| LoaderError::Program { name, source })
    }

    /// The loaded ingress classifier (test_run, benchmarks).
    pub fn ingress(&mut self) -> Result<&mut SchedClassifier, LoaderError> {
        program(&mut self.ebpf, self.ingress)
    }

    /// The name of the ingress variant loaded for this kernel.
    pub fn ingress_name(&self) -> &'static str {
        self.ingress
    }

    /// (name, present) of the kernel features probed at load, and of the
    /// hooks that depend on them: `thread_hooks` (a request followed from
    /// connection to thread) and `fork_inheritance`.
    pub fn features(&self) -> Vec<(&'static str, bool)> {
        let mut v = self.features.list();
        let has = |n: &str| self.thread_hooks.contains(&n);
        v.push(("thread_hooks", has(prog::SOCKOPS) && has(prog::RECV)));
        v.push(("fork_inheritance", has(prog::FORK)));
        v
    }

    pub fn kernel(&self) -> &str {
        self.features.kernel()
    }
}

/// `pid`/`tgid` in the running kernel's `task_struct`, for the fork hook;
/// zeros (no inheritance at fork) when its BTF cannot tell.
fn task_offsets() -> agent_common::TaskOffsets {
    let found = std::fs::read("/sys/kernel/btf/vmlinux")
        .map_err(|e| e.to_string())
        .and_then(|b| crate::btf::Types::parse(&b).map_err(|e| e.to_string()))
        .and_then(|t| {
            Ok(agent_common::TaskOffsets {
                pid: t
                    .offset_of("task_struct", "pid")
                    .map_err(|e| e.to_string())?,
                tgid: t
                    .offset_of("task_struct", "tgid")
                    .map_err(|e| e.to_string())?,
            })
        });
    found.unwrap_or_else(|e| {
        warn!("forked processes will not inherit their parent's request: {e}");
        agent_common::TaskOffsets::default()
    })
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
