//! `cargo xtask`: build, run, test, bench and demo tagflow. Every command
//! first bootstraps the toolchain it needs (see bootstrap.rs).
mod bootstrap;
mod test;
mod vm;

use std::process::Command;

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install missing prerequisites only.
    Bootstrap,
    /// Build the agent (and its eBPF object).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Build, then run `tagflow` with the given arguments (needs root).
    Run {
        #[arg(long)]
        release: bool,
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Lint, unit tests, then kernel-level tests (test_run and netns
    /// topologies; need root).
    Test {
        /// Only the steps that need no root.
        #[arg(long)]
        unit_only: bool,
        /// Skip fmt and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Only the kernel-level tests in a VM booting this kernel: a .deb,
        /// an unpacked kernel package (boot/, lib/modules/), or a bzImage
        /// with virtio-pci, 9p and overlayfs built in.
        #[arg(long)]
        kernel: Option<std::path::PathBuf>,
        /// Skip the VM leg (the kernel-level tests on Debian 12's 6.1).
        #[arg(long)]
        no_vm: bool,
    },
    /// Benchmarks: each figure is a ratio to a baseline run alongside.
    /// `cargo xtask bench linking` runs only the linking-accuracy rows.
    Bench {
        /// One group only (`linking`, `node`, `h2`, `datapath`, `registration`).
        what: Option<String>,
        /// Fewer repetitions.
        #[arg(long)]
        quick: bool,
        /// Also write `{"rows":[...]}` here.
        #[arg(long)]
        json: Option<String>,
    },
    /// Soak: the agent under mixed traffic, registrations, pod churn and a
    /// flapping collector; reports RSS, map fill and loss counters over
    /// time and fails unless RSS and map fill are flat after warm-up.
    Soak {
        #[arg(long, default_value_t = 5.0)]
        minutes: f64,
        /// Also write the samples here as JSON.
        #[arg(long)]
        json: Option<String>,
    },
    /// Fuzz one target (protocol, http_head, ids, config) with libFuzzer;
    /// crashes land in agent/fuzz/artifacts/<target>/.
    Fuzz {
        target: String,
        /// Seconds to run.
        #[arg(long, default_value_t = 600)]
        time: u64,
    },
    /// The end-to-end demo: pods, traffic, tagged flows (needs root).
    Demo {
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Builds `bins` of `package`; returns the target directory they are in.
fn build(package: &str, bins: &[&str], release: bool) -> Result<String> {
    let mut c = cargo();
    c.args(["build", "--package", package]);
    for b in bins {
        c.args(["--bin", b]);
    }
    if release {
        c.arg("--release");
    }
    run(&mut c)?;
    Ok(format!(
        "target/{}",
        if release { "release" } else { "debug" }
    ))
}

/// Builds the agent and the lab that drives it (same profile, so the lab
/// finds `tagflow` beside itself); returns the lab binary.
fn build_lab(release: bool) -> Result<String> {
    build("tagflow", &["tagflow"], release)?;
    Ok(build("tagflow-lab", &["tagflow-lab"], release)? + "/tagflow-lab")
}

/// The eBPF crates: built by build.rs scripts for the bpf target, never
/// for the host.
const EBPF_CRATES: [&str; 2] = ["agent-ebpf", "tagflow-lab-ebpf"];

/// The cargo-fuzz targets (agent/fuzz).
const FUZZ_TARGETS: [&str; 5] = ["protocol", "http_head", "ids", "config", "h2_frames"];

/// How a fuzz target is built.
#[derive(Clone, Copy)]
enum FuzzBuild {
    /// Optimised (cargo-fuzz's default): ~18× the executions a second;
    /// for runs that are meant to find something.
    Optimised,
    /// Unoptimised: builds in half the time (4 instead of 8 minutes from
    /// clean on the CI machine), for the smoke runs that check each target
    /// builds and survives its corpus and some mutation under ASan.
    Smoke,
}

/// `cargo +nightly fuzz run <target>` for `secs` seconds.
fn fuzz(target: &str, secs: u64, build: FuzzBuild) -> Result<()> {
    if !FUZZ_TARGETS.contains(&target) {
        bail!("unknown fuzz target {target:?}; targets: {FUZZ_TARGETS:?}");
    }
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo", "fuzz", "run"]);
    if let FuzzBuild::Smoke = build {
        cmd.arg("--dev");
    }
    run(cmd
        .args([target, "--"])
        .arg(format!("-max_total_time={secs}"))
        .current_dir("agent"))
}

fn need_root(what: &str) -> Result<()> {
    if !bootstrap::is_root() {
        bail!("{what} needs root (BPF, network namespaces): run it as root, e.g. `sudo -E cargo xtask ...`");
    }
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // Paths below are relative to the workspace root.
    std::env::set_current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))?;
    bootstrap::ensure()?;
    match cli.cmd {
        Cmd::Bootstrap => {}
        Cmd::Build { release } => {
            build("tagflow", &["tagflow"], release)?;
        }
        Cmd::Run { release, args } => {
            need_root("tagflow run")?;
            let dir = build("tagflow", &["tagflow"], release)?;
            run(Command::new(dir + "/tagflow").args(args))?;
        }
        Cmd::Test {
            unit_only,
            no_lint,
            kernel,
            no_vm,
        } => test::all(test::Opts {
            unit_only,
            no_lint,
            kernel,
            no_vm,
        })?,
        Cmd::Bench { what, quick, json } => {
            need_root("the benchmarks")?;
            bootstrap::lab_tools()?;
            let mut c = Command::new(build_lab(true)?);
            c.args(["bench", what.as_deref().unwrap_or("all")]);
            if quick {
                match what.as_deref() {
                    None | Some("all") | Some("node") | Some("h2") => c.arg("--quick"),
                    Some("linking") => c.args(["--requests", "60"]),
                    // datapath and registration take their own flags.
                    Some(_) => &mut c,
                };
            }
            if let Some(j) = json {
                c.args(["--json", &j]);
            }
            run(&mut c)?;
        }
        Cmd::Soak { minutes, json } => {
            need_root("the soak")?;
            bootstrap::lab_tools()?;
            let mut c = Command::new(build_lab(true)?);
            c.args(["soak", "--minutes", &minutes.to_string()]);
            if let Some(j) = json {
                c.args(["--json", &j]);
            }
            run(&mut c)?;
        }
        Cmd::Fuzz { target, time } => {
            bootstrap::cargo_fuzz()?;
            fuzz(&target, time, FuzzBuild::Optimised)?;
        }
        Cmd::Demo { args } => {
            need_root("the demo")?;
            bootstrap::lab_tools()?;
            run(Command::new(build_lab(false)?).arg("demo").args(args))?;
        }
    }
    Ok(())
}
