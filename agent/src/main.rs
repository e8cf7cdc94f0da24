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
    Run(Box<RunArgs>),
    /// HTTP/1.1 reverse proxy beside an app: injects x-request-id and
    /// traceparent, registers each request with the agent.
    Sidecar {
        /// Address to serve on.
        #[arg(long, env = "TAGFLOW_SIDECAR_LISTEN", default_value = "0.0.0.0:15080")]
        listen: std::net::SocketAddr,
        /// The app (usually 127.0.0.1:PORT).
        #[arg(long, env = "TAGFLOW_SIDECAR_UPSTREAM")]
        upstream: std::net::SocketAddr,
        #[arg(long, env = "TAGFLOW_AGENT_SOCKET", default_value = agent::config::DEFAULT_SOCKET)]
        agent_socket: PathBuf,
    },
    /// Talk to a running agent's registration socket.
    Register {
        #[arg(long, env = "TAGFLOW_AGENT_SOCKET", default_value = agent::config::DEFAULT_SOCKET)]
        socket: PathBuf,
        #[command(subcommand)]
        what: RegisterCmd,
    },
    /// Ask a running agent for its attachments, map fill and loss counters.
    Status {
        /// The agent's metrics address.
        #[arg(long, env = "TAGFLOW_METRICS_ADDR", default_value = agent::config::DEFAULT_METRICS_ADDR)]
        addr: std::net::SocketAddr,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// End-to-end demo: pods, sidecars, traffic, traces as trees (needs root).
    Demo {
        /// Leave the pods up until Ctrl-C.
        #[arg(long)]
        keep: bool,
        /// Also send the spans to this OTLP endpoint (e.g. Jaeger's
        /// http://HOST:4317).
        #[arg(long)]
        otlp_endpoint: Option<String>,
    },
    /// Measure the datapath against an empty TC program (BPF_PROG_TEST_RUN).
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
    /// Run the agent for N minutes under mixed traffic, registrations, pod
    /// churn and a flapping collector; fails unless RSS and map fill are
    /// flat after warm-up (needs root).
    Soak {
        #[arg(long, default_value_t = 5.0)]
        minutes: f64,
        /// Seconds between samples.
        #[arg(long, default_value_t = 10)]
        sample_secs: u64,
        /// Also write the samples here as JSON.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum RegisterCmd {
    /// The target's traffic carries the request's trace from now on.
    Begin(RegisterArgs),
    /// Stop, if the target still carries this trace.
    End(RegisterArgs),
    /// Check that the agent answers.
    Ping,
}

#[derive(clap::Args)]
struct RegisterArgs {
    #[arg(long)]
    request_id: Option<String>,
    #[arg(long)]
    traceparent: Option<String>,
    /// Target process (in your network namespace).
    #[arg(long, conflicts_with = "port", required_unless_present = "port")]
    pid: Option<u32>,
    /// Target: whoever listens on this TCP port in your namespace.
    #[arg(long)]
    port: Option<u16>,
    /// Connection to tag exactly: LOCAL,REMOTE (ip:port,ip:port); repeatable.
    #[arg(long = "flow")]
    flows: Vec<String>,
}

impl RegisterArgs {
    fn registration(&self) -> anyhow::Result<agent::sources::protocol::Registration> {
        use agent::sources::protocol::{Flow, Proto, Registration, Target};
        let mut headers = std::collections::BTreeMap::new();
        if let Some(r) = &self.request_id {
            headers.insert("x-request-id".to_string(), r.clone());
        }
        if let Some(t) = &self.traceparent {
            headers.insert("traceparent".to_string(), t.clone());
        }
        let target = match (self.pid, self.port) {
            (Some(pid), _) => Target::Pid(pid),
            (None, Some(port)) => Target::Port {
                port,
                proto: Proto::Tcp,
            },
            (None, None) => anyhow::bail!("give --pid or --port"),
        };
        let flows = self
            .flows
            .iter()
            .map(|f| {
                let (l, r) = f
                    .split_once(',')
                    .ok_or_else(|| anyhow::anyhow!("--flow wants LOCAL,REMOTE"))?;
                Ok(Flow {
                    proto: Proto::Tcp,
                    local: l.into(),
                    remote: r.into(),
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Registration {
            headers,
            target,
            flows,
            // A registration from the shell outlives this short connection.
            release_on_close: false,
        })
    }
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Every benchmark below, one table.
    All {
        #[arg(long)]
        json: Option<PathBuf>,
        /// Fewer repetitions.
        #[arg(long)]
        quick: bool,
    },
    /// Node-level scenarios only (throughput, HTTP load, agent CPU and
    /// memory, sidecar vs nginx).
    Node {
        #[arg(long)]
        json: Option<PathBuf>,
        #[arg(long)]
        quick: bool,
    },
    /// Registration throughput and begin → map-visible latency.
    Registration {
        #[arg(long)]
        json: Option<PathBuf>,
        #[arg(long, default_value_t = 200_000)]
        messages: usize,
        #[arg(long, default_value_t = 4)]
        clients: usize,
    },
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
    /// Registration socket path.
    #[arg(long, env = "TAGFLOW_AGENT_SOCKET")]
    socket: Option<PathBuf>,
    /// Group that may use the registration socket.
    #[arg(long, env = "TAGFLOW_SOCKET_GROUP")]
    socket_group: Option<String>,
    /// Bytes of HTTP request heads to capture (0 = off, max 1024).
    #[arg(long, env = "TAGFLOW_CAPTURE_LEN")]
    capture_len: Option<u32>,
    /// Request-id header names, in order of preference (repeatable).
    #[arg(
        long = "capture-header",
        env = "TAGFLOW_CAPTURE_HEADERS",
        value_delimiter = ','
    )]
    capture_headers: Vec<String>,
    /// OTLP endpoint (e.g. http://jaeger:4317); without one spans are
    /// printed as JSON lines. OTEL_EXPORTER_OTLP_* variables are honoured.
    #[arg(long)]
    otlp_endpoint: Option<String>,
    #[arg(long)]
    otlp_protocol: Option<agent::export::Protocol>,
    /// Extra export header KEY=VALUE (repeatable).
    #[arg(long = "otlp-header")]
    otlp_headers: Vec<String>,
    /// Send uncompressed.
    #[arg(long)]
    otlp_no_gzip: bool,
    #[arg(long)]
    otlp_timeout_ms: Option<u64>,
    /// Spans waiting for export, at most (beyond: dropped and counted).
    #[arg(long, env = "TAGFLOW_EXPORT_QUEUE")]
    export_queue: Option<usize>,
    /// Metrics/health/status address; "off" disables it.
    #[arg(long, env = "TAGFLOW_METRICS_ADDR")]
    metrics_addr: Option<String>,
    /// A span with no packet for this long is finished.
    #[arg(long, env = "TAGFLOW_SPAN_IDLE_MS")]
    span_idle_ms: Option<u64>,
    /// Spans assembled at once, at most (the stalest is finished early).
    #[arg(long, env = "TAGFLOW_MAX_OPEN_SPANS")]
    max_open_spans: Option<usize>,
    /// Finished spans held for linking, at most (the busiest trace goes early).
    #[arg(long, env = "TAGFLOW_MAX_HELD_SPANS")]
    max_held_spans: Option<usize>,
    /// bpffs directory for the maps that survive a restart.
    #[arg(long, env = "TAGFLOW_PIN_DIR")]
    pin_dir: Option<PathBuf>,
    /// Pin nothing: a restarted agent starts with empty tables.
    #[arg(long, env = "TAGFLOW_NO_PIN")]
    no_pin: bool,
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
        if let Some(p) = self.socket {
            cfg.registration.socket = p;
        }
        if self.socket_group.is_some() {
            cfg.registration.group = self.socket_group;
        }
        if let Some(n) = self.capture_len {
            cfg.capture_len = n;
        }
        if !self.capture_headers.is_empty() {
            cfg.capture_headers = self.capture_headers;
        }
        cfg.export.apply_env(|k| std::env::var(k).ok());
        if let Some(p) = self.otlp_protocol {
            cfg.export.protocol = p;
        }
        if let Some(e) = self.otlp_endpoint {
            cfg.export.endpoint = Some(e);
        }
        for h in &self.otlp_headers {
            let (k, v) = h
                .split_once('=')
                .ok_or_else(|| anyhow::anyhow!("--otlp-header wants KEY=VALUE"))?;
            cfg.export.headers.push((k.into(), v.into()));
        }
        if self.otlp_no_gzip {
            cfg.export.gzip = false;
        }
        if let Some(t) = self.otlp_timeout_ms {
            cfg.export.timeout_ms = t;
        }
        if let Some(q) = self.export_queue {
            cfg.export.queue = q;
        }
        match self.metrics_addr.as_deref() {
            Some("off") => cfg.metrics_addr = None,
            Some(a) => cfg.metrics_addr = Some(a.parse().context("--metrics-addr")?),
            None => {}
        }
        if let Some(ms) = self.span_idle_ms {
            cfg.span_idle_ms = ms;
        }
        if let Some(n) = self.max_open_spans {
            cfg.max_open_spans = n;
        }
        if let Some(n) = self.max_held_spans {
            cfg.max_held_spans = n;
        }
        if let Some(p) = self.pin_dir {
            cfg.pin_dir = p;
        }
        if self.no_pin {
            cfg.pin_maps = false;
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

/// glibc gives each thread that allocates its own arena (up to 8 per core)
/// and keeps freed memory in it: under registration bursts the agent's RSS
/// was mostly idle arenas (the soak measured it). Two are plenty here.
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only tunes the allocator; called before any thread.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Cmd::Run(args) => {
            let cfg = args.into_config()?;
            limit_malloc_arenas();
            // Registrations that walk /proc run as blocking sections: a
            // bounded pool keeps a flood of them from growing threads.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .max_blocking_threads(8)
                .enable_all()
                .build()?;
            rt.block_on(agent::agent::run(cfg, shutdown_signal()))
                .context("agent failed")?;
        }
        Cmd::Demo {
            keep,
            otlp_endpoint,
        } => agent::demo::run(keep, otlp_endpoint)?,
        Cmd::Status { addr, json } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let s = rt
                .block_on(agent::metrics::fetch_status(addr))
                .map_err(anyhow::Error::msg)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", agent::metrics::format_status(&s));
            }
        }
        Cmd::Sidecar {
            listen,
            upstream,
            agent_socket,
        } => {
            set_process_name("tf-sidecar");
            let cfg = agent::sidecar::SidecarConfig::new(listen, upstream, agent_socket);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            rt.block_on(agent::sidecar::run(
                cfg,
                Default::default(),
                None,
                shutdown_signal(),
            ))?;
        }
        Cmd::Register { socket, what } => {
            use agent::sources::client::Client;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let reply = rt.block_on(async {
                let mut c = Client::new(socket, std::time::Duration::from_secs(5));
                match what {
                    RegisterCmd::Ping => c.ping().await,
                    RegisterCmd::Begin(a) => c.begin(a.registration()?).await,
                    RegisterCmd::End(a) => c.end(a.registration()?).await,
                }
                .map_err(anyhow::Error::from)
            })?;
            println!("{}", serde_json::to_string(&reply)?);
        }
        Cmd::Soak {
            minutes,
            sample_secs,
            json,
        } => {
            let report = agent::soak::soak(minutes, sample_secs.max(1))?;
            if let Some(path) = &json {
                std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
            }
            if !report.problems.is_empty() {
                anyhow::bail!("soak failed: {}", report.problems.join("; "));
            }
        }
        Cmd::Bench { what } => {
            let (rows, json) = match what {
                BenchCmd::Datapath {
                    json,
                    repeat,
                    rounds,
                } => (agent::bench::datapath(repeat, rounds)?, json),
                BenchCmd::Registration {
                    json,
                    messages,
                    clients,
                } => (agent::bench::registration(messages, clients)?, json),
                BenchCmd::Node { json, quick } => (agent::bench::node::node(quick)?, json),
                BenchCmd::All { json, quick } => {
                    use agent::bench::{self, node, pipeline, startup};
                    let (repeat, rounds, messages, spans) = if quick {
                        (300_000, 5, 40_000, 50_000)
                    } else {
                        (2_000_000, 7, 200_000, 200_000)
                    };
                    let mut rows = bench::datapath(repeat, rounds)?;
                    rows.extend(startup::scaling(repeat / 2)?);
                    rows.extend(bench::registration(messages, 4)?);
                    rows.extend(pipeline::pipeline(spans)?);
                    rows.extend(startup::startup(if quick { 3 } else { 5 })?);
                    rows.extend(node::node(quick)?);
                    (rows, json)
                }
            };
            print!("{}", agent::bench::table(&rows));
            if let Some(path) = json {
                std::fs::write(&path, agent::bench::json(&rows))
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
    }
    Ok(())
}

/// The name spans' resources use for this process (15 bytes at most).
fn set_process_name(name: &str) {
    if let Ok(c) = std::ffi::CString::new(name) {
        // SAFETY: PR_SET_NAME with a NUL-terminated string.
        unsafe { libc::prctl(libc::PR_SET_NAME, c.as_ptr(), 0, 0, 0) };
    }
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
