//! Builds the eBPF programs (agent-ebpf) for the bpf target with aya-build
//! and leaves them in OUT_DIR for `include_bytes_aligned!`, without their
//! DWARF; and links the agent with packed relative relocations. Both are
//! pages of the binary a running agent would otherwise keep resident (the
//! soak's RSS, `docs/BENCHMARKS.md`).
use std::{path::Path, process::Command};

use anyhow::{anyhow, bail, Context as _};

fn main() -> anyhow::Result<()> {
    // `cargo fuzz` builds the library for its parsers alone: no fuzz target
    // loads the datapath, so an empty object stands in for a second
    // nightly build of it (and of `core` for the bpf target).
    if std::env::var_os("CARGO_CFG_FUZZING").is_some() {
        let out = std::env::var("OUT_DIR").context("OUT_DIR")?;
        std::fs::write(Path::new(&out).join("tagflow"), b"").context("placeholder object")?;
        return Ok(());
    }
    let meta = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = meta
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "agent-ebpf")
        .ok_or_else(|| anyhow!("agent-ebpf package not found"))?;
    let root = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("agent-ebpf has no directory"))?;
    // aya-build watches agent-ebpf; the ABI crate it compiles in must be
    // watched too, or an ABI change would not rebuild the object.
    println!("cargo:rerun-if-changed=../agent-common/src");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )?;
    let out = std::env::var("OUT_DIR").context("OUT_DIR")?;
    strip_debug(&Path::new(&out).join("tagflow"))?;
    // DT_RELR: the PIE's ~35 000 relative relocations as 10 KiB of bitmap
    // instead of 0.8 MiB of `.rela.dyn` read at every start. The loader
    // must know it (glibc 2.36; the binary then needs GLIBC_ABI_DT_RELR).
    if glibc_has_relr() {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    } else {
        println!("cargo:warning=relative relocations not packed: not a native build against glibc >= 2.36");
    }
    Ok(())
}

/// A native build against glibc 2.36 or later: the glibc it links is the
/// one it runs on, and that one reads DT_RELR.
fn glibc_has_relr() -> bool {
    let var = |k| std::env::var(k).unwrap_or_default();
    if var("TARGET") != var("HOST") || var("CARGO_CFG_TARGET_ENV") != "gnu" {
        return false;
    }
    // SAFETY: returns a static NUL-terminated string ("2.36").
    let v = unsafe { std::ffi::CStr::from_ptr(libc::gnu_get_libc_version()) };
    let mut parts = v.to_str().unwrap_or("").split('.');
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (major, minor) >= (2, 36)
}

/// Drops the object's DWARF (four fifths of it): the kernel and aya need
/// only its BTF, which bpf-linker has already made from the DWARF.
/// `rust-objcopy` is llvm-objcopy as shipped in the rustc component.
fn strip_debug(object: &Path) -> anyhow::Result<()> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(&rustc)
        .args(["--print", "sysroot"])
        .output()
        .context("rustc --print sysroot")?;
    let sysroot = String::from_utf8(sysroot.stdout).context("sysroot")?;
    let sysroot = Path::new(sysroot.trim());
    let host = std::env::var("HOST").context("HOST")?;
    let objcopy = sysroot
        .join("lib/rustlib")
        .join(host)
        .join("bin/rust-objcopy");
    let stripped = object.with_extension("stripped");
    let status = Command::new(&objcopy)
        // It links libLLVM from the toolchain's lib, not its own directory.
        .env("LD_LIBRARY_PATH", sysroot.join("lib"))
        .arg("--strip-debug")
        .arg(object)
        .arg(&stripped)
        .status()
        .with_context(|| format!("running {}", objcopy.display()))?;
    if !status.success() {
        bail!("{} --strip-debug: {status}", objcopy.display());
    }
    std::fs::rename(&stripped, object).context("replacing the object")
}
