//! `tagflow-lab`: the demo, the benchmarks and the soak, each on a
//! throw-away node of network namespaces (needs root). `cargo xtask
//! demo|bench|soak` build it with the `tagflow` binary it drives.
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tagflow_lab::{bench, demo, soak};

#[derive(Parser)]
#[command(about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// End-to-end demo: pods, sidecars, traffic, traces as trees.
    Demo {
        /// Leave the pods up until Ctrl-C.
        #[arg(long)]
        keep: bool,
        /// Also send the spans to this OTLP endpoint (e.g. Jaeger's
        /// http://HOST:4317).
        #[arg(long)]
        otlp_endpoint: Option<String>,
    },
    /// Benchmarks, each figure against a baseline run alongside.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
    /// The agent for N minutes under mixed traffic, registrations, pod
    /// churn and a flapping collector; fails unless RSS and map fill are
    /// flat after warm-up.
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
    /// HTTP/2: the sidecar against nginx grpc_pass (h2load), gRPC linking.
    H2 {
        #[arg(long)]
        json: Option<PathBuf>,
        #[arg(long)]
        quick: bool,
    },
    /// Linking accuracy: app → downstream calls under the right trace,
    /// per shape, app model and concurrency (correct / wrong / missing).
    Linking {
        #[arg(long)]
        json: Option<PathBuf>,
        /// Requests per row.
        #[arg(long, default_value_t = 200)]
        requests: usize,
        /// Only the shapes whose name contains this (e.g. "in the app's pod").
        #[arg(long)]
        shape: Option<String>,
    },
    /// Load + attach to 1 and to 100 interfaces (wall time).
    Startup {
        #[arg(long)]
        json: Option<PathBuf>,
        #[arg(long, default_value_t = 5)]
        rounds: usize,
    },
    /// Span pipeline: flow events → assembly → OTLP/gRPC receiver.
    Pipeline {
        #[arg(long)]
        json: Option<PathBuf>,
        #[arg(long, default_value_t = 200_000)]
        spans: usize,
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

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Cmd::Demo {
            keep,
            otlp_endpoint,
        } => demo::run(keep, otlp_endpoint)?,
        Cmd::Soak {
            minutes,
            sample_secs,
            json,
        } => {
            let report = soak::soak(minutes, sample_secs.max(1))?;
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
                } => {
                    let mut rows = bench::datapath(repeat, rounds)?;
                    rows.extend(bench::floor::floor(repeat, rounds)?);
                    rows.extend(bench::threads::recv_hook(repeat as usize / 20, rounds)?);
                    (rows, json)
                }
                BenchCmd::Registration {
                    json,
                    messages,
                    clients,
                } => (bench::registration::registration(messages, clients)?, json),
                BenchCmd::Pipeline { json, spans } => {
                    let mut rows = bench::pipeline::pipeline(spans)?;
                    rows.extend(bench::pipeline::span_memory(20_000));
                    (rows, json)
                }
                BenchCmd::Node { json, quick } => (bench::node::node(quick)?, json),
                BenchCmd::Startup { json, rounds } => (bench::startup::startup(rounds)?, json),
                BenchCmd::H2 { json, quick } => {
                    let mut rows = bench::h2::proxies(quick)?;
                    rows.extend(bench::h2::linking(if quick { 60 } else { 200 })?);
                    (rows, json)
                }
                BenchCmd::Linking {
                    json,
                    requests,
                    shape,
                } => (bench::linking::linking(requests, shape.as_deref())?, json),
                BenchCmd::All { json, quick } => (bench::all(quick)?, json),
            };
            print!("{}", bench::table(&rows));
            if let Some(path) = json {
                std::fs::write(&path, bench::json(&rows))
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
    }
    Ok(())
}
