//! Builds the kernel programs (kdiag-ebpf) for bpfel-unknown-none with the
//! nightly toolchain and bpf-linker, into OUT_DIR, where `loader.rs` embeds
//! the object with `include_bytes_aligned!`.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("kdiag-agent has no parent directory"))?
        .join("kdiag-ebpf");
    let root = root.to_str().context("workspace path is not UTF-8")?;
    let ebpf = Package {
        name: "kdiag-ebpf",
        root_dir: root,
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], Toolchain::default())
        .context("building the eBPF programs (run `cargo xtask setup` first)")
}
