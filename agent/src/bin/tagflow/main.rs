//! `tagflow`: tags each pod's traffic with the trace context of the request
//! it belongs to. One file per subcommand.
mod register;
mod run;
mod sidecar;
mod status;

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
    Run(Box<tagflow::config::RunFlags>),
    /// HTTP/1.1 reverse proxy beside an app: injects x-request-id and
    /// traceparent, registers each request with the agent.
    Sidecar(sidecar::Args),
    /// Talk to a running agent's registration socket.
    Register(register::Args),
    /// Ask a running agent for its attachments, map fill and loss counters.
    Status(status::Args),
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

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Cmd::Run(flags) => run::run(*flags),
        Cmd::Sidecar(a) => sidecar::run(a),
        Cmd::Register(a) => register::run(a),
        Cmd::Status(a) => status::run(a),
    }
}
