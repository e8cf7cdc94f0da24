//! Makes sure the toolchain the eBPF build needs is present, installing what
//! is missing when it can (root on Debian). A run with everything present
//! costs a few version checks.
use std::{
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

/// LLVM major version bpf-linker must be built against: rustc nightly's.
pub const LLVM_MAJOR: u32 = 22;
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const APT_LLVM: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];
/// Tools the tests and the demo run.
const APT_TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("tc", "iproute2"),
    ("python3", "python3"),
    // Hostile-pod tests: an unprivileged process, a pod's own pid namespace.
    ("setpriv", "util-linux"),
    ("unshare", "util-linux"),
];

fn ok(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run(cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: running {cmd:?}");
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

pub fn is_root() -> bool {
    output(Command::new("id").arg("-u")).is_some_and(|s| s.trim() == "0")
}

fn is_debian() -> bool {
    Path::new("/etc/debian_version").exists()
}

fn which(tool: &str) -> bool {
    ok(Command::new("sh").args(["-c", &format!("command -v {tool}")]))
}

/// The commands a person would run by hand, for the error message.
fn manual_steps() -> String {
    format!(
        "  rustup toolchain install nightly --component rust-src\n  \
         sudo apt-get update && sudo apt-get install -y {} iproute2 python3 nginx wrk iperf3 tcpdump kubernetes-client nghttp2-client nghttp2-server\n  \
         python3 -m pip install grpcio\n  \
         LLVM_PREFIX={LLVM_PREFIX} cargo install bpf-linker --no-default-features --features llvm-{LLVM_MAJOR}\n",
        APT_LLVM.join(" ")
    )
}

fn apt_install(pkgs: &[&str]) -> Result<()> {
    if !(is_root() && is_debian()) {
        bail!(
            "missing system packages {pkgs:?} and cannot install them (needs root on Debian). Run:\n{}",
            manual_steps()
        );
    }
    // Without an update the package lists may be empty or stale.
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(pkgs)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn nightly_rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]));
    match installed {
        Some(list) if list.lines().any(|l| l.starts_with("rust-src")) => Ok(()),
        Some(_) => run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ])),
        None => run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
            "--component",
            "rust-src",
        ])),
    }
}

fn llvm_dev() -> Result<()> {
    if Path::new(LLVM_PREFIX).join("lib/libLLVM.so").exists() {
        return Ok(());
    }
    apt_install(APT_LLVM)
}

/// bpf-linker links dynamically against libLLVM: the soname says which LLVM
/// it was built for.
fn bpf_linker_llvm() -> Option<bool> {
    let path = output(Command::new("sh").args(["-c", "command -v bpf-linker"]))?;
    let ldd = output(Command::new("ldd").arg(path.trim()))?;
    Some(
        ldd.contains(&format!("libLLVM.so.{LLVM_MAJOR}"))
            || ldd.contains(&format!("libLLVM-{LLVM_MAJOR}")),
    )
}

fn bpf_linker() -> Result<()> {
    match bpf_linker_llvm() {
        Some(true) => return Ok(()),
        Some(false) => eprintln!(
            "xtask: bpf-linker is built for another LLVM; rebuilding for LLVM {LLVM_MAJOR}"
        ),
        None => eprintln!("xtask: bpf-linker missing; building it (about 4 minutes on 2 cores)"),
    }
    // LLVM_PREFIX: otherwise its build script may find an older llvm-config
    // first on PATH.
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            "^0.13",
            "--force",
            "--no-default-features",
        ])
        .args(["--features", &format!("llvm-{LLVM_MAJOR}")])
        .env("LLVM_PREFIX", LLVM_PREFIX))
}

/// Installs the Debian packages of whichever `(tool, package)` is missing.
fn ensure_tools(tools: &[(&str, &str)]) -> Result<()> {
    let mut missing: Vec<&str> = tools
        .iter()
        .filter(|(tool, _)| !which(tool))
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        Ok(())
    } else {
        apt_install(&missing)
    }
}

/// cargo-fuzz (crates.io), for `cargo xtask fuzz` and the smoke runs.
pub fn cargo_fuzz() -> Result<()> {
    if ok(Command::new("cargo").args(["fuzz", "--version"])) {
        return Ok(());
    }
    run(Command::new("cargo").args(["install", "cargo-fuzz", "--locked"]))
}

/// What the lab runs in its pods: servers and load generators (Debian
/// packages). The kernel-level tests, the benchmarks, the soak and the
/// demo all need them, so every command that runs the lab installs them.
pub fn lab_tools() -> Result<()> {
    ensure_tools(&[
        ("iperf3", "iperf3"),
        ("wrk", "wrk"),
        ("nginx", "nginx"),
        ("tcpdump", "tcpdump"),
        ("curl", "curl"),
        // Service addresses (DNAT, as kube-proxy writes them).
        ("iptables", "iptables"),
        // HTTP/2: h2load drives the sidecar and nginx in the bench, nghttpd
        // is their upstream.
        ("h2load", "nghttp2-client"),
        ("nghttpd", "nghttp2-server"),
    ])?;
    // gRPC apps and clients in the lab (tests/grpc.rs, the bench).
    python_module("grpc", "grpcio")?;
    // The lab runs this interpreter, wherever it runs (the VM's PATH is
    // not this shell's): the one grpcio went into.
    if std::env::var_os("TAGFLOW_PYTHON").is_none() {
        let exe = output(Command::new("python3").args(["-c", "import sys; print(sys.executable)"]))
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .context("python3 does not say where it is")?;
        std::env::set_var("TAGFLOW_PYTHON", exe);
    }
    Ok(())
}

/// A Python module for the `python3` the lab runs, from PyPI when missing.
fn python_module(module: &str, package: &str) -> Result<()> {
    let import = |m: &str| ok(Command::new("python3").args(["-c", &format!("import {m}")]));
    if import(module) {
        return Ok(());
    }
    run(Command::new("python3").args(["-m", "pip", "install", "--quiet", package]))
        .with_context(|| format!("installing {package} (python3 -m pip install {package})"))?;
    if !import(module) {
        bail!("{package} installed but `python3 -c 'import {module}'` fails");
    }
    Ok(())
}

/// What the VM leg of the tests needs: qemu, a static busybox for the
/// initramfs, and kmod (depmod on the host; the VM's modprobe runs from
/// the host's root). Debian's `busybox` is dynamic and would not run from
/// an initramfs.
pub fn vm_tools() -> Result<()> {
    let mut missing: Vec<&str> = [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("depmod", "kmod"),
        ("dpkg-deb", "dpkg"),
    ]
    .iter()
    .filter(|(tool, _)| !which(tool))
    .map(|(_, pkg)| *pkg)
    .collect();
    if !ok(Command::new("dpkg").args(["-s", "busybox-static"])) {
        missing.push("busybox-static");
    }
    if missing.is_empty() {
        Ok(())
    } else {
        apt_install(&missing)
    }
}

/// kubectl, for rendering deploy/ with its built-in kustomize (the deploy
/// test). Debian's `kubernetes-client` when none is installed.
pub fn kubectl() -> Result<()> {
    ensure_tools(&[("kubectl", "kubernetes-client")])
}

/// The offline Kubernetes schema validator the deploy test uses (PyPI).
pub fn kubernetes_validate() -> Result<()> {
    if ok(Command::new("kubernetes-validate").arg("--version")) {
        return Ok(());
    }
    run(Command::new("python3").args(["-m", "pip", "install", "--quiet", "kubernetes-validate"]))
        .context("installing kubernetes-validate (python3 -m pip install kubernetes-validate)")?;
    // pip may put the script where PATH does not look (pyenv shims need a
    // rehash): fall back to the module's location.
    if !ok(Command::new("kubernetes-validate").arg("--version")) {
        let _ = Command::new("pyenv").arg("rehash").status();
    }
    if !ok(Command::new("kubernetes-validate").arg("--version")) {
        bail!("kubernetes-validate installed but not on PATH");
    }
    Ok(())
}

/// Everything `cargo xtask build|run|test|bench|demo` needs.
pub fn ensure() -> Result<()> {
    nightly_rust_src().context("nightly rust-src")?;
    llvm_dev().context("LLVM development files")?;
    bpf_linker().context("bpf-linker")?;
    ensure_tools(APT_TOOLS).context("test tools")?;
    Ok(())
}
