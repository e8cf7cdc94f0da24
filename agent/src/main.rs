use std::path::PathBuf;

use agent::config::{AgentConfig, AttachMode, TcxOrder};
use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

/// tagflow: tags each pod's traffic with the trace context of the request
/// it belongs to.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Log format.
    #[arg(
        long,
        global = true,
        env = "TAGFLOW_LOG_FORMAT",
        default_value = "text"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent (needs root: BPF, NET_ADMIN).
    Run(RunArgs),
    /// End-to-end demo: pods, traffic, traces, tagged flows (needs root).
    Demo {
        /// Leave the pods up until Ctrl-C.
        #[arg(long)]
        keep: bool,
    },
    /// Measure the datapath against an empty TC program (BPF_PROG_TEST_RUN).
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// ns per packet of tagflow_ingress, tagged and untagged.
    Datapath {
        /// Write `{"rows":[...]}` here too.
        #[arg(long)]
        json: Option<PathBuf>,
        /// test_run repeat count per measurement.
        #[arg(long, default_value_t = 2_000_000)]
        repeat: u32,
        /// Alternating rounds; the median is reported.
        #[arg(long, default_value_t = 7)]
        rounds: usize,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// TOML config file; flags override it.
    #[arg(long, env = "TAGFLOW_CONFIG")]
    config: Option<PathBuf>,
    /// Attach to this interface (repeatable).
    #[arg(long = "iface", env = "TAGFLOW_IFACES", value_delimiter = ',')]
    ifaces: Vec<String>,
    /// Attach to interfaces whose name starts with this (repeatable;
    /// replaces the default veth,cali,lxc,gke,eni).
    #[arg(
        long = "iface-prefix",
        env = "TAGFLOW_IFACE_PREFIXES",
        value_delimiter = ','
    )]
    iface_prefixes: Vec<String>,
    #[arg(long, env = "TAGFLOW_ATTACH_MODE")]
    attach_mode: Option<AttachMode>,
    #[arg(long, env = "TAGFLOW_TCX_ORDER")]
    tcx_order: Option<TcxOrder>,
    /// Mark bits to set on tagged packets (with --mark-mask).
    #[arg(long, env = "TAGFLOW_MARK_VALUE", value_parser = parse_u32)]
    mark_value: Option<u32>,
    #[arg(long, env = "TAGFLOW_MARK_MASK", value_parser = parse_u32)]
    mark_mask: Option<u32>,
    /// Seconds before an unrefreshed trace entry is removed.
    #[arg(long, env = "TAGFLOW_TRACE_IDLE_SECS")]
    trace_idle_secs: Option<u64>,
    /// cgroup v2 root for the owner hooks (default: found in mountinfo).
    #[arg(long, env = "TAGFLOW_CGROUP_ROOT")]
    cgroup_root: Option<PathBuf>,
    /// Skip the /proc backfill of listening sockets.
    #[arg(long, env = "TAGFLOW_NO_BACKFILL")]
    no_backfill: bool,
}

fn parse_u32(s: &str) -> Result<u32, String> {
    let r = match s.strip_prefix("0x") {
        Some(h) => u32::from_str_radix(h, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("{s}: {e}"))
}

impl RunArgs {
    fn into_config(self) -> anyhow::Result<AgentConfig> {
        let mut cfg = match &self.config {
            Some(p) => AgentConfig::from_file(p)?,
            None => AgentConfig::default(),
        };
        if !self.ifaces.is_empty() {
            cfg.ifaces = self.ifaces;
        }
        if !self.iface_prefixes.is_empty() {
            cfg.iface_prefixes = self.iface_prefixes;
        }
        if let Some(v) = self.attach_mode {
            cfg.attach_mode = v;
        }
        if let Some(v) = self.tcx_order {
            cfg.tcx_order = v;
        }
        if let Some(v) = self.mark_value {
            cfg.mark_value = v;
        }
        if let Some(v) = self.mark_mask {
            cfg.mark_mask = v;
        }
        if let Some(v) = self.trace_idle_secs {
            cfg.trace_idle_secs = v;
        }
        if self.cgroup_root.is_some() {
            cfg.cgroup_root = self.cgroup_root;
        }
        if self.no_backfill {
            cfg.backfill = false;
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // `init()` also installs the log→tracing bridge, which carries aya-log
    // records from the eBPF programs.
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Cmd::Run(args) => {
            let cfg = args.into_config()?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(agent::agent::run(cfg, shutdown_signal()))
                .context("agent failed")?;
        }
        Cmd::Demo { keep } => agent::demo::run(keep)?,
        Cmd::Bench {
            what:
                BenchCmd::Datapath {
                    json,
                    repeat,
                    rounds,
                },
        } => {
            let rows = agent::bench::datapath(repeat, rounds)?;
            print!("{}", agent::bench::table(&rows));
            if let Some(path) = json {
                std::fs::write(&path, agent::bench::json(&rows))
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}
