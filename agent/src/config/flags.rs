//! `tagflow run`'s flags (and their `TAGFLOW_*` variables) and how they
//! override the config file: a flag given wins, a flag not given leaves the
//! file's (or the default) value.
use std::path::PathBuf;

use super::{AgentConfig, AttachMode, ConfigError, NetnsSource, TcxOrder};

#[derive(clap::Args, Debug, Default)]
pub struct RunFlags {
    /// TOML config file; flags override it.
    #[arg(long, env = "TAGFLOW_CONFIG")]
    pub config: Option<PathBuf>,
    /// Attach to this interface (repeatable).
    #[arg(long = "iface", env = "TAGFLOW_IFACES", value_delimiter = ',')]
    pub ifaces: Vec<String>,
    /// Attach to interfaces whose name starts with this (repeatable;
    /// replaces the default veth,cali,lxc,gke,eni).
    #[arg(
        long = "iface-prefix",
        env = "TAGFLOW_IFACE_PREFIXES",
        value_delimiter = ','
    )]
    pub iface_prefixes: Vec<String>,
    /// The node's uplinks, where requests from other nodes arrive
    /// (repeatable; `none` for none; default: the interfaces of the
    /// default routes).
    #[arg(long = "uplink", env = "TAGFLOW_UPLINKS", value_delimiter = ',')]
    pub uplinks: Vec<String>,
    #[arg(long, env = "TAGFLOW_ATTACH_MODE")]
    pub attach_mode: Option<AttachMode>,
    #[arg(long, env = "TAGFLOW_TCX_ORDER")]
    pub tcx_order: Option<TcxOrder>,
    /// Where a packet's pod namespace comes from (`interface`: the program
    /// for kernels before 6.14, on any kernel).
    #[arg(long, env = "TAGFLOW_NETNS_SOURCE")]
    pub netns_source: Option<NetnsSource>,
    /// Mark bits to set on tagged packets (with --mark-mask).
    #[arg(long, env = "TAGFLOW_MARK_VALUE", value_parser = parse_u32)]
    pub mark_value: Option<u32>,
    #[arg(long, env = "TAGFLOW_MARK_MASK", value_parser = parse_u32)]
    pub mark_mask: Option<u32>,
    /// Seconds before an unrefreshed trace entry is removed.
    #[arg(long, env = "TAGFLOW_TRACE_IDLE_SECS")]
    pub trace_idle_secs: Option<u64>,
    /// cgroup v2 root for the owner hooks (default: found in mountinfo).
    #[arg(long, env = "TAGFLOW_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,
    /// Skip the /proc backfill of listening sockets.
    #[arg(long, env = "TAGFLOW_NO_BACKFILL")]
    pub no_backfill: bool,
    /// Do not attach to the loopback inside pod namespaces.
    #[arg(long, env = "TAGFLOW_NO_LOOPBACK")]
    pub no_loopback: bool,
    /// Do not ask conntrack where calls to Service addresses go.
    #[arg(long, env = "TAGFLOW_NO_SERVICES")]
    pub no_services: bool,
    /// Registration socket path.
    #[arg(long, env = "TAGFLOW_AGENT_SOCKET")]
    pub socket: Option<PathBuf>,
    /// Group that may use the registration socket.
    #[arg(long, env = "TAGFLOW_SOCKET_GROUP")]
    pub socket_group: Option<String>,
    /// Bytes of HTTP request heads to capture (0 = off, max 1024).
    #[arg(long, env = "TAGFLOW_CAPTURE_LEN")]
    pub capture_len: Option<u32>,
    /// Request-id header names, in order of preference (repeatable).
    #[arg(
        long = "capture-header",
        env = "TAGFLOW_CAPTURE_HEADERS",
        value_delimiter = ','
    )]
    pub capture_headers: Vec<String>,
    /// OTLP endpoint (e.g. http://jaeger:4317); without one spans are
    /// printed as JSON lines. OTEL_EXPORTER_OTLP_* variables are honoured.
    #[arg(long)]
    pub otlp_endpoint: Option<String>,
    #[arg(long)]
    pub otlp_protocol: Option<crate::export::Protocol>,
    /// Extra export header KEY=VALUE (repeatable).
    #[arg(long = "otlp-header")]
    pub otlp_headers: Vec<String>,
    /// Send uncompressed.
    #[arg(long)]
    pub otlp_no_gzip: bool,
    #[arg(long)]
    pub otlp_timeout_ms: Option<u64>,
    /// Spans waiting for export, at most (beyond: dropped and counted).
    #[arg(long, env = "TAGFLOW_EXPORT_QUEUE")]
    pub export_queue: Option<usize>,
    /// Metrics/health/status address; "off" disables it.
    #[arg(long, env = "TAGFLOW_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// A span with no packet for this long is finished.
    #[arg(long, env = "TAGFLOW_SPAN_IDLE_MS")]
    pub span_idle_ms: Option<u64>,
    /// Spans assembled at once, at most (the stalest is finished early).
    #[arg(long, env = "TAGFLOW_MAX_OPEN_SPANS")]
    pub max_open_spans: Option<usize>,
    /// Finished spans held for linking, at most (the busiest trace goes early).
    #[arg(long, env = "TAGFLOW_MAX_HELD_SPANS")]
    pub max_held_spans: Option<usize>,
    /// bpffs directory for the maps that survive a restart.
    #[arg(long, env = "TAGFLOW_PIN_DIR")]
    pub pin_dir: Option<PathBuf>,
    /// Pin nothing: a restarted agent starts with empty tables.
    #[arg(long, env = "TAGFLOW_NO_PIN")]
    pub no_pin: bool,
}

fn parse_u32(s: &str) -> Result<u32, String> {
    let r = match s.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("{s}: {e}"))
}

impl RunFlags {
    /// The config these flags describe: the file named by `--config` (or
    /// the defaults), then the `OTEL_EXPORTER_OTLP_*` variables read through
    /// `env`, then every flag given. Validated.
    pub fn into_config(
        self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<AgentConfig, ConfigError> {
        let base = match &self.config {
            Some(p) => AgentConfig::from_file(p)?,
            None => AgentConfig::default(),
        };
        let cfg = self.apply(base, env)?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn apply(
        self,
        mut cfg: AgentConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<AgentConfig, ConfigError> {
        fn set<T>(slot: &mut T, v: Option<T>) {
            if let Some(v) = v {
                *slot = v;
            }
        }
        if !self.ifaces.is_empty() {
            cfg.ifaces = self.ifaces;
        }
        if !self.iface_prefixes.is_empty() {
            cfg.iface_prefixes = self.iface_prefixes;
        }
        if !self.uplinks.is_empty() {
            cfg.uplinks = Some(self.uplinks.into_iter().filter(|u| u != "none").collect());
        }
        set(&mut cfg.attach_mode, self.attach_mode);
        set(&mut cfg.tcx_order, self.tcx_order);
        set(&mut cfg.netns_source, self.netns_source);
        set(&mut cfg.mark_value, self.mark_value);
        set(&mut cfg.mark_mask, self.mark_mask);
        set(&mut cfg.trace_idle_secs, self.trace_idle_secs);
        if self.cgroup_root.is_some() {
            cfg.cgroup_root = self.cgroup_root;
        }
        cfg.backfill &= !self.no_backfill;
        cfg.loopback &= !self.no_loopback;
        cfg.services &= !self.no_services;
        set(&mut cfg.registration.socket, self.socket);
        if self.socket_group.is_some() {
            cfg.registration.group = self.socket_group;
        }
        set(&mut cfg.capture_len, self.capture_len);
        if !self.capture_headers.is_empty() {
            cfg.capture_headers = self.capture_headers;
        }
        cfg.export.apply_env(env);
        set(&mut cfg.export.protocol, self.otlp_protocol);
        if self.otlp_endpoint.is_some() {
            cfg.export.endpoint = self.otlp_endpoint;
        }
        for h in &self.otlp_headers {
            let (k, v) = h.split_once('=').ok_or(ConfigError::Flag {
                flag: "--otlp-header",
                why: format!("{h:?} is not KEY=VALUE"),
            })?;
            cfg.export.headers.push((k.into(), v.into()));
        }
        cfg.export.gzip &= !self.otlp_no_gzip;
        set(&mut cfg.export.timeout_ms, self.otlp_timeout_ms);
        set(&mut cfg.export.queue, self.export_queue);
        match self.metrics_addr.as_deref() {
            Some("off") => cfg.metrics_addr = None,
            Some(a) => {
                cfg.metrics_addr = Some(a.parse().map_err(|e| ConfigError::Flag {
                    flag: "--metrics-addr",
                    why: format!("{a:?}: {e}"),
                })?)
            }
            None => {}
        }
        set(&mut cfg.span_idle_ms, self.span_idle_ms);
        set(&mut cfg.max_open_spans, self.max_open_spans);
        set(&mut cfg.max_held_spans, self.max_held_spans);
        set(&mut cfg.pin_dir, self.pin_dir);
        cfg.pin_maps &= !self.no_pin;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunFlags,
    }

    fn merge(file: &str, args: &[&str]) -> Result<AgentConfig, ConfigError> {
        let flags = Cli::try_parse_from(std::iter::once("run").chain(args.iter().copied()))
            .expect("flags parse")
            .run;
        let cfg = flags.apply(AgentConfig::from_toml(file)?, |_| None)?;
        cfg.validate()?;
        Ok(cfg)
    }

    #[test]
    fn no_flags_keep_the_file() {
        let file = "iface_prefixes = [\"tap\"]\nspan_idle_ms = 50\nbackfill = false\n";
        assert_eq!(
            merge(file, &[]).unwrap(),
            AgentConfig::from_toml(file).unwrap()
        );
    }

    #[test]
    fn given_flags_win_over_the_file() {
        let cfg = merge(
            "span_idle_ms = 50\npin_maps = true\n[export]\ngzip = true\n",
            &[
                "--span-idle-ms",
                "7",
                "--iface-prefix",
                "a,b",
                "--mark-value",
                "0x10",
                "--mark-mask",
                "0xf0",
                "--no-pin",
                "--otlp-no-gzip",
                "--otlp-header",
                "k=v=w",
                "--metrics-addr",
                "off",
            ],
        )
        .unwrap();
        assert_eq!(cfg.span_idle_ms, 7);
        assert_eq!(cfg.iface_prefixes, ["a", "b"]);
        assert_eq!((cfg.mark_value, cfg.mark_mask), (0x10, 0xf0));
        assert!(!cfg.pin_maps && !cfg.export.gzip);
        assert_eq!(cfg.export.headers, [("k".into(), "v=w".into())]);
        assert_eq!(cfg.metrics_addr, None);
    }

    #[test]
    fn bad_flags_name_the_flag_and_merged_configs_are_validated() {
        let e = merge("", &["--otlp-header", "novalue"]).unwrap_err();
        assert!(e.to_string().starts_with("--otlp-header:"), "{e}");
        let e = merge("", &["--metrics-addr", "nowhere"]).unwrap_err();
        assert!(e.to_string().starts_with("--metrics-addr:"), "{e}");
        // Each flag valid alone, the pair not: the mark outside its mask.
        let e = merge("", &["--mark-value", "0x100", "--mark-mask", "0xff"]).unwrap_err();
        assert!(matches!(e, ConfigError::Invalid(_)), "{e}");
    }
}
