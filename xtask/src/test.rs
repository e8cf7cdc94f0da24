//! `cargo xtask test`: lint, pure Rust, fuzz smoke, deploy; then, as root,
//! the kernel-level tests on this machine's kernel and in a VM on Debian
//! 12's 6.1 (vm.rs). `--kernel PATH` runs only the VM leg, on PATH.
use std::{path::PathBuf, process::Command, time::Duration};

use anyhow::{Context as _, Result};

use crate::{
    bootstrap, build, cargo, fuzz, need_root, run, vm, FuzzBuild, EBPF_CRATES, FUZZ_TARGETS,
};

pub struct Opts {
    pub unit_only: bool,
    pub no_lint: bool,
    pub kernel: Option<PathBuf>,
    pub no_vm: bool,
}

/// What the VM runs: every BPF_PROG_TEST_RUN test, and netns topologies
/// where real TCP exchanges are tagged and become spans. (test binary,
/// test names; empty = all of it).
const VM_TESTS: &[(&str, &[&str])] = &[
    ("datapath", &[]),
    (
        "topology",
        &["clients_and_servers_are_tagged_by_owner_and_others_are_not"],
    ),
    (
        "spans",
        &["registered_traffic_becomes_linked_spans_over_http"],
    ),
    // Behind the sidecar and behind nginx: pod loopbacks on clsact, the
    // namespace from the socket's record.
    ("concurrency", &[]),
    // HTTP/2 frame walk (tail calls) on real traffic over a pod loopback.
    (
        "grpc",
        &["calls_behind_nginx_grpc_pass_carry_the_id_nginx_stamped"],
    ),
];
/// The VM leg's budget (software emulation included).
const VM_LIMIT: Duration = Duration::from_secs(600);

pub fn all(o: Opts) -> Result<()> {
    if let Some(k) = &o.kernel {
        need_root("the kernel-level tests")?;
        // Before the kernel: unpacking it runs depmod (kmod).
        bootstrap::vm_tools()?;
        return vm_leg(&vm::from_path(k)?);
    }
    if !o.no_lint {
        lint()?;
    }
    // Pure Rust: parsers, ABI layout, tables, config, netlink codec.
    run(cargo()
        .args(["test", "--workspace", "--lib", "--bins"])
        .args(EBPF_CRATES.iter().flat_map(|c| ["--exclude", c])))?;
    run(cargo().args(["test", "--package", "agent-common"]))?;
    // The object's variant for kernels before 6.14 uses nothing newer than
    // 5.15 has (read from the object itself).
    run(cargo().args(["test", "--package", "tagflow", "--test", "old_kernels"]))?;
    // The binary carries no DWARF in its object and packs its relocations.
    run(cargo().args(["test", "--package", "tagflow", "--test", "binary_pages"]))?;
    // OTLP over TLS and mTLS against receivers with a test CA.
    run(cargo().args(["test", "--package", "tagflow", "--test", "otlp_tls"]))?;
    // OTLP/gRPC as the exporter frames it: a tonic receiver, refusals.
    run(cargo().args(["test", "--package", "tagflow", "--test", "otlp_grpc"]))?;
    // The sidecar over HTTP/2 (streams, trailers, resets) and h2c upgrades.
    run(cargo().args(["test", "--package", "tagflow", "--test", "sidecar_h2"]))?;
    // Fuzz targets: a short smoke run each, unoptimised (the long runs,
    // optimised: `cargo xtask fuzz <target> --time <s>`).
    bootstrap::cargo_fuzz()?;
    for t in FUZZ_TARGETS {
        fuzz(t, 10, FuzzBuild::Smoke)?;
    }
    // deploy/: render, schema-validate, agree with the agent.
    bootstrap::kubernetes_validate()?;
    bootstrap::kubectl()?;
    run(cargo().args(["test", "--package", "tagflow", "--test", "deploy"]))?;
    if o.unit_only {
        return Ok(());
    }
    need_root("the kernel-level tests")?;
    bootstrap::lab_tools()?;
    // BPF_PROG_TEST_RUN, then netns/veth topologies (marked ignored for a
    // plain `cargo test`, which has no root). One test at a time: they
    // share the host's cgroup root and TCX hooks.
    run(cargo()
        .args(["test", "--package", "tagflow-lab", "--tests"])
        .args(["--", "--include-ignored", "--test-threads=1"])
        .env("TAGFLOW_BIN", agent_bin()?))?;
    if !o.no_vm {
        bootstrap::vm_tools()?;
        vm_leg(&vm::debian_6_1()?)?;
    }
    Ok(())
}

fn lint() -> Result<()> {
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run(cargo()
        .args(["clippy", "--workspace", "--all-targets"])
        .args(EBPF_CRATES.iter().flat_map(|c| ["--exclude", c]))
        .args(["--", "-D", "warnings"]))?;
    // The eBPF crates only build for the bpf target, on nightly.
    for c in EBPF_CRATES {
        run(Command::new("rustup")
            .args(["run", "nightly", "cargo", "clippy", "--package", c])
            .args(["--release", "--target", "bpfel-unknown-none"])
            .args(["-Z", "build-std=core", "--", "-D", "warnings"]))?;
    }
    Ok(())
}

/// The lab's tests run `tagflow` as a process, as it ships: an optimised
/// build (the load tests measure what a node would see).
fn agent_bin() -> Result<PathBuf> {
    let dir = build("tagflow", &["tagflow"], true)?;
    Ok(std::path::Path::new(&dir).join("tagflow").canonicalize()?)
}

/// The kernel-level tests of `VM_TESTS` on kernel `k`, in a VM (its tools
/// bootstrapped by the caller).
fn vm_leg(k: &vm::Kernel) -> Result<()> {
    bootstrap::lab_tools()?;
    let agent = agent_bin()?;
    let bins = test_binaries()?;
    let root = std::env::current_dir()?;
    let mut script = format!(
        "set -e\nuname -r\ncd {}/agent/lab\nexport TAGFLOW_BIN={} RUST_BACKTRACE=1 TAGFLOW_PYTHON={}\n",
        root.display(),
        agent.display(),
        std::env::var("TAGFLOW_PYTHON").unwrap_or_else(|_| "python3".into()),
    );
    for (name, tests) in VM_TESTS {
        let exe = bins
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| p)
            .with_context(|| format!("test binary {name} not built"))?;
        let filter = if tests.is_empty() {
            String::new()
        } else {
            format!(" --exact {}", tests.join(" "))
        };
        script += &format!(
            "echo \"== {name} on $(uname -r)\"\n{} --include-ignored --test-threads=1 --nocapture{filter}\n",
            exe.display()
        );
    }
    vm::run(k, &script, VM_LIMIT)
        .with_context(|| format!("kernel-level tests on {} in a VM", k.release))
}

/// (target name, executable) of the lab's integration tests, built.
fn test_binaries() -> Result<Vec<(String, PathBuf)>> {
    let out = cargo()
        .args(["test", "--package", "tagflow-lab", "--tests", "--no-run"])
        .args(["--message-format", "json"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("building the lab's tests")?;
    anyhow::ensure!(out.status.success(), "building the lab's tests failed");
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_test = v["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "test"));
        if let (true, Some(name), Some(exe)) = (
            is_test,
            v["target"]["name"].as_str(),
            v["executable"].as_str(),
        ) {
            bins.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    Ok(bins)
}
