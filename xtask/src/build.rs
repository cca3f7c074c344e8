//! `cargo xtask build`: the release agent, with the eBPF object embedded.

use std::{env, path::PathBuf};

use anyhow::{Context, Result, ensure};

use crate::{
    setup::Tools,
    util::{self, run_checked, workspace_root},
};

/// Builds `kdiag-agent` in release mode and returns the absolute path of the
/// binary. kdiag-agent's build.rs builds kdiag-ebpf through aya-build, which
/// is why this needs the [`Tools`] from setup.
pub fn release_agent(tools: &Tools) -> Result<PathBuf> {
    let root = workspace_root();
    let mut cmd = util::cargo();
    cmd.current_dir(&root)
        .args(["build", "--release", "--package", "kdiag-agent"])
        .env("PATH", tools.path())
        // Keep our stdout clean (`cargo xtask build` prints only the path).
        .stdout(std::io::stderr());
    eprintln!("building: kdiag-agent (release)");
    run_checked(&mut cmd).context("building kdiag-agent")?;
    let agent = agent_path();
    ensure!(
        agent.is_file(),
        "cargo built kdiag-agent, but {} does not exist",
        agent.display()
    );
    Ok(agent)
}

/// `<target dir>/release/kdiag-agent`.
pub fn agent_path() -> PathBuf {
    target_dir().join("release").join("kdiag-agent")
}

/// Cargo's target directory, honouring CARGO_TARGET_DIR (relative to the
/// workspace root, where cargo runs) like cargo does.
pub fn target_dir() -> PathBuf {
    let root = workspace_root();
    env::var_os("CARGO_TARGET_DIR")
        .map(|dir| root.join(dir))
        .unwrap_or_else(|| root.join("target"))
}
