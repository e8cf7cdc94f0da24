//! Builds the test-only eBPF programs (tagflow-lab-ebpf) for the bpf target
//! and leaves them in OUT_DIR for `include_bytes_aligned!`.
use anyhow::{anyhow, Context as _};

fn main() -> anyhow::Result<()> {
    let meta = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = meta
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "tagflow-lab-ebpf")
        .ok_or_else(|| anyhow!("tagflow-lab-ebpf package not found"))?;
    let root = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("tagflow-lab-ebpf has no directory"))?;
    println!("cargo:rerun-if-changed=../../agent-common/src");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
