//! Agent configuration: a TOML file (all keys optional, explicit defaults
//! below) overridden by command-line flags (`flags.rs`).
mod flags;

use std::path::{Path, PathBuf};

pub use flags::RunFlags;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing config")]
    Parse(#[from] toml::de::Error),
    #[error("invalid config: {0}")]
    Invalid(String),
    #[error("{flag}: {why}")]
    Flag { flag: &'static str, why: String },
}

/// How `tagflow_ingress` is attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// TCX (Linux ≥ 6.6), falling back to a clsact/netlink filter.
    #[default]
    Auto,
    /// TCX only.
    Tcx,
    /// clsact + netlink filter only (older kernels).
    Netlink,
}

/// Where the ingress program takes a packet's pod namespace from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum NetnsSource {
    /// `bpf_get_netns_cookie` where the kernel allows it in TC (6.14+),
    /// else the interface.
    #[default]
    Auto,
    /// Always the interface (or, on a pod's `lo`, the socket's recorded
    /// owner): the program kernels before 6.14 run, on any kernel.
    Interface,
}

/// Where in a TCX chain tagflow goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TcxOrder {
    /// Before every other program, so datapaths after it (Cilium, Calico,
    /// observers) see the tag in cb.
    #[default]
    First,
    /// After every other program.
    Last,
}

/// `max_entries` of each map (bytes for the ring buffer).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MapSizes {
    pub traces: u32,
    pub flow_traces: u32,
    pub flow_stats: u32,
    pub sock_owner: u32,
    /// Accepted TCP sockets (their connection, for the thread hooks).
    pub sock_flow: u32,
    /// Threads that read a connection.
    pub thread_via: u32,
    pub bound_ports: u32,
    pub iface_netns: u32,
    /// Namespaces with trace entries (NETNS_GEN).
    pub netns_gen: u32,
    pub events_bytes: u32,
    /// Entries of TRACES and FLOW_TRACES together one pod network namespace
    /// may hold: a pod cannot fill the node's tables for the others.
    pub entries_per_netns: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        use agent_common::maps::size;
        Self {
            traces: size::TRACES,
            flow_traces: size::FLOW_TRACES,
            flow_stats: size::FLOW_STATS,
            sock_owner: size::SOCK_OWNER,
            sock_flow: size::SOCK_FLOW,
            thread_via: size::THREAD_VIA,
            bound_ports: size::BOUND_PORTS,
            iface_netns: size::IFACE_NETNS,
            netns_gen: size::NETNS_GEN,
            events_bytes: size::EVENTS_BYTES,
            entries_per_netns: 4096,
        }
    }
}

pub const DEFAULT_IFACE_PREFIXES: &[&str] = &["veth", "cali", "lxc", "gke", "eni"];
pub const DEFAULT_SOCKET: &str = "/run/tagflow/agent.sock";
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/tagflow";

/// The registration socket (sidecars, `tagflow register`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistrationConfig {
    pub enabled: bool,
    pub socket: PathBuf,
    /// Group owning the socket (mode 0660); root's group when unset.
    pub group: Option<String>,
    pub max_connections: usize,
    pub max_connections_per_netns: usize,
    /// Messages per second per pod network namespace.
    pub rate_per_netns: u32,
}

impl Default for RegistrationConfig {
    fn default() -> Self {
        let l = crate::sources::registry::Limits::default();
        Self {
            enabled: true,
            socket: DEFAULT_SOCKET.into(),
            group: None,
            max_connections: l.max_connections,
            max_connections_per_netns: l.max_connections_per_netns,
            rate_per_netns: l.rate_per_netns,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// Interfaces attached by exact name.
    pub ifaces: Vec<String>,
    /// Interfaces attached when their name starts with one of these.
    pub iface_prefixes: Vec<String>,
    /// The node's uplinks, where requests from other nodes come in (heads
    /// captured there key the local pod that reads them). Unset: the
    /// interfaces of the default routes; empty: none.
    pub uplinks: Option<Vec<String>>,
    pub attach_mode: AttachMode,
    pub tcx_order: TcxOrder,
    pub netns_source: NetnsSource,
    /// skb->mark bits set on tagged packets: `(mark & !mask) | (value & mask)`.
    /// A zero mask leaves the mark alone.
    pub mark_value: u32,
    pub mark_mask: u32,
    /// Per-flow stats of tagged flows (FLOW_STATS).
    pub flow_stats: bool,
    /// New-flow events to userspace (needs `flow_stats`).
    pub events: bool,
    /// Write the skb->cb ABI on tagged packets.
    pub cb: bool,
    /// Trace entries not refreshed for this long are removed.
    pub trace_idle_secs: u64,
    /// cgroup v2 root for the owner hooks; found in /proc/self/mountinfo
    /// when unset.
    pub cgroup_root: Option<PathBuf>,
    /// Fill BOUND_PORTS from /proc for sockets that existed before start.
    pub backfill: bool,
    /// Also attach to `lo` inside each pod's namespace, where in-pod proxies
    /// (Envoy, Istio, nginx, the tagflow sidecar) hand requests to the app.
    pub loopback: bool,
    /// Resolve calls to Service addresses (DNAT by kube-proxy) through the
    /// host's conntrack table, so both ends of such a call link.
    pub services: bool,
    /// Bytes of each HTTP request head copied from the datapath (0 = no
    /// passive capture; at most 1024).
    pub capture_len: u32,
    /// Headers holding a request id, in order of preference (`traceparent`
    /// is always read too and wins when valid).
    pub capture_headers: Vec<String>,
    pub registration: RegistrationConfig,
    /// Prometheus metrics, /healthz, /readyz and /status (none = off).
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// A span with no packet for this long is finished.
    pub span_idle_ms: u64,
    /// Spans assembled at once, at most (the stalest is finished early).
    pub max_open_spans: usize,
    /// Finished spans held while their trace is still busy (for linking),
    /// at most; beyond it the busiest trace is sent early. With the export
    /// queue this bounds the agent's memory for spans (≈ 0.85 KB each,
    /// `cargo xtask bench`'s span memory row): 4096 held and 2048 queued
    /// (and as many waiting for the queue) keep it near 7 MiB.
    pub max_held_spans: usize,
    pub export: crate::export::ExportConfig,
    pub maps: MapSizes,
    /// Pin the maps that must survive a restart (owners and traces) under
    /// `pin_dir` (bpffs). Off: a restarted agent starts with empty tables.
    pub pin_maps: bool,
    pub pin_dir: PathBuf,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            ifaces: Vec::new(),
            iface_prefixes: DEFAULT_IFACE_PREFIXES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            uplinks: None,
            attach_mode: AttachMode::Auto,
            tcx_order: TcxOrder::First,
            netns_source: NetnsSource::Auto,
            mark_value: 0,
            mark_mask: 0,
            flow_stats: true,
            events: true,
            cb: true,
            trace_idle_secs: 30,
            cgroup_root: None,
            backfill: true,
            loopback: true,
            services: true,
            capture_len: agent_common::DEFAULT_CAPTURE,
            capture_headers: vec!["x-request-id".into()],
            registration: RegistrationConfig::default(),
            metrics_addr: Some(DEFAULT_METRICS_ADDR.parse().expect("valid")),
            span_idle_ms: 2000,
            max_open_spans: 16384,
            max_held_spans: 4096,
            export: crate::export::ExportConfig::default(),
            maps: MapSizes::default(),
            pin_maps: true,
            pin_dir: DEFAULT_PIN_DIR.into(),
        }
    }
}

impl AgentConfig {
    /// The defaults without pinning or uplinks: a throwaway datapath
    /// (benchmarks, the demo) that must not touch a running agent's pinned
    /// tables, nor the machine's own network interfaces.
    pub fn scratch() -> Self {
        Self {
            pin_maps: false,
            uplinks: Some(Vec::new()),
            ..Self::default()
        }
    }

    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let cfg: Self = toml::from_str(text)?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::from_toml(&text)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.mark_value & !self.mark_mask != 0 {
            return bad(format!(
                "mark_value {:#x} has bits outside mark_mask {:#x}",
                self.mark_value, self.mark_mask
            ));
        }
        if self.events && !self.flow_stats {
            return bad("events needs flow_stats (it is how new flows are detected)".into());
        }
        if self.capture_len as usize > agent_common::MAX_CAPTURE {
            return bad(format!(
                "capture_len {} > {}",
                self.capture_len,
                agent_common::MAX_CAPTURE
            ));
        }
        if self
            .capture_headers
            .iter()
            .any(|h| h.is_empty() || !h.bytes().all(|b| b.is_ascii_graphic()))
        {
            return bad("capture_headers must be header names".into());
        }
        if self.span_idle_ms == 0
            || self.max_open_spans == 0
            || self.max_held_spans == 0
            || self.export.queue == 0
            || self.export.batch == 0
        {
            return bad(
                "span_idle_ms, max_open_spans, max_held_spans, export.queue and export.batch must be > 0".into(),
            );
        }
        if self.trace_idle_secs == 0 {
            return bad("trace_idle_secs must be > 0".into());
        }
        let m = &self.maps;
        for (name, v) in [
            ("traces", m.traces),
            ("flow_traces", m.flow_traces),
            ("flow_stats", m.flow_stats),
            ("sock_owner", m.sock_owner),
            ("sock_flow", m.sock_flow),
            ("thread_via", m.thread_via),
            ("bound_ports", m.bound_ports),
            ("iface_netns", m.iface_netns),
            ("netns_gen", m.netns_gen),
            ("entries_per_netns", m.entries_per_netns),
        ] {
            if v == 0 || v > 4 << 20 {
                return bad(format!("maps.{name} = {v}: must be 1..=4194304"));
            }
        }
        let rb = m.events_bytes;
        if !rb.is_power_of_two() || rb < 4096 {
            return bad(format!(
                "maps.events_bytes = {rb}: must be a power of two ≥ 4096 (page size)"
            ));
        }
        let pin = self.pin_dir.to_string_lossy();
        if !self.pin_dir.is_absolute() || pin.contains('\0') {
            return bad(format!("pin_dir {pin:?} must be an absolute path"));
        }
        if self
            .ifaces
            .iter()
            .chain(&self.iface_prefixes)
            .any(|n| n.is_empty() || n.len() > 15)
        {
            return bad("interface names and prefixes must be 1..=15 bytes".into());
        }
        Ok(())
    }

    /// Whether `tagflow_ingress` should be attached to `name`.
    pub fn wants_iface(&self, name: &str) -> bool {
        self.ifaces.iter().any(|i| i == name)
            || self
                .iface_prefixes
                .iter()
                .any(|p| name.starts_with(p.as_str()))
    }

    pub fn datapath_config(&self) -> agent_common::DatapathConfig {
        let mut features = 0;
        if self.flow_stats {
            features |= agent_common::FEATURE_FLOW_STATS;
        }
        if self.events {
            features |= agent_common::FEATURE_EVENTS;
        }
        if self.cb {
            features |= agent_common::FEATURE_CB;
        }
        agent_common::DatapathConfig {
            mark_value: self.mark_value,
            mark_mask: self.mark_mask,
            features,
            _pad: 0,
            // Filled in by the loader (the namespace it runs in).
            host_netns: 0,
            capture_len: self.capture_len,
            _pad2: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(AgentConfig::from_toml("").unwrap(), AgentConfig::default());
        let d = AgentConfig::default();
        assert_eq!(d.datapath_config().mark_mask, 0);
        assert_eq!(d.trace_idle_secs, 30);
        assert!(d.wants_iface("veth1234") && d.wants_iface("lxc0") && !d.wants_iface("eth0"));
    }

    #[test]
    fn full_file_parses() {
        let cfg = AgentConfig::from_toml(
            r#"
            ifaces = ["eth1"]
            iface_prefixes = ["tap"]
            attach_mode = "netlink"
            netns_source = "interface"
            tcx_order = "last"
            mark_value = 0x100
            mark_mask = 0xf00
            trace_idle_secs = 5
            capture_headers = ["x-correlation-id", "x-request-id"]
            [registration]
            socket = "/tmp/x.sock"
            rate_per_netns = 10
            [maps]
            traces = 1024
            events_bytes = 65536
            "#,
        )
        .unwrap();
        assert_eq!(cfg.attach_mode, AttachMode::Netlink);
        assert_eq!(cfg.tcx_order, TcxOrder::Last);
        assert_eq!(cfg.netns_source, NetnsSource::Interface);
        assert_eq!(cfg.maps.traces, 1024);
        assert_eq!(cfg.registration.socket, PathBuf::from("/tmp/x.sock"));
        assert_eq!(cfg.registration.rate_per_netns, 10);
        assert_eq!(
            cfg.registration.max_connections,
            RegistrationConfig::default().max_connections
        );
        assert_eq!(cfg.capture_headers[0], "x-correlation-id");
        assert_eq!(cfg.maps.flow_stats, MapSizes::default().flow_stats);
        assert!(cfg.wants_iface("eth1") && cfg.wants_iface("tap3") && !cfg.wants_iface("veth0"));
        let dp = cfg.datapath_config();
        assert_eq!((dp.mark_value, dp.mark_mask), (0x100, 0xf00));
    }

    #[test]
    fn bad_values_are_refused_with_a_reason() {
        for (text, needle) in [
            ("mark_value = 3\nmark_mask = 1", "outside mark_mask"),
            ("flow_stats = false", "events needs flow_stats"),
            ("trace_idle_secs = 0", "trace_idle_secs"),
            ("[maps]\nevents_bytes = 5000", "power of two"),
            ("[maps]\ntraces = 0", "maps.traces"),
            ("iface_prefixes = [\"\"]", "1..=15"),
            ("capture_len = 5000", "capture_len"),
            ("capture_headers = [\"bad header\"]", "header names"),
            ("pin_dir = \"relative/dir\"", "absolute path"),
        ] {
            let err = AgentConfig::from_toml(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?} gave {err}");
        }
        assert!(matches!(
            AgentConfig::from_toml("no_such_key = 1"),
            Err(ConfigError::Parse(_))
        ));
        assert!(matches!(
            AgentConfig::from_toml("attach_mode = \"bogus\""),
            Err(ConfigError::Parse(_))
        ));
    }
}
