//! `cargo xtask build`: the release agent, with the eBPF object embedded.

use std::path::PathBuf;

use anyhow::{Context, Result, ensure};
use serde_json::Value;

use crate::{
    setup::Tools,
    util::{self, run_checked, workspace_root},
};

/// Builds `kdiag-agent` in release mode and returns the absolute path of the
/// binary. kdiag-agent's build.rs builds kdiag-ebpf through aya-build, which
/// is why this needs the [`Tools`] from setup.
pub(crate) fn release_agent(tools: &Tools) -> Result<PathBuf> {
    let root = workspace_root();
    let mut cmd = util::cargo();
    cmd.current_dir(&root)
        .args(["build", "--release", "--package", "kdiag-agent"])
        .env("PATH", tools.path())
        // Keep our stdout clean (`cargo xtask build` prints only the path).
        .stdout(std::io::stderr());
    eprintln!("building: kdiag-agent (release)");
    run_checked(&mut cmd).context("building kdiag-agent")?;
    let agent = agent_path()?;
    ensure!(
        agent.is_file(),
        "cargo built kdiag-agent, but {} does not exist",
        agent.display()
    );
    Ok(agent)
}

/// `<target dir>/release/kdiag-agent`.
pub(crate) fn agent_path() -> Result<PathBuf> {
    Ok(target_dir()?.join("release").join("kdiag-agent"))
}

/// Cargo's target directory for this workspace, as cargo itself resolves
/// it: `CARGO_TARGET_DIR`, `CARGO_BUILD_TARGET_DIR` or `build.target-dir`
/// (relative ones from where cargo runs, the workspace root here), else
/// `<root>/target`.
pub(crate) fn target_dir() -> Result<PathBuf> {
    let mut cmd = util::cargo();
    cmd.current_dir(workspace_root())
        .args(["metadata", "--format-version", "1", "--no-deps"]);
    let out = cmd
        .output()
        .with_context(|| format!("could not start `{}`", util::describe(&cmd)))?;
    ensure!(
        out.status.success(),
        "`{}` failed ({}): {}",
        util::describe(&cmd),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let metadata: Value =
        serde_json::from_slice(&out.stdout).context("parsing `cargo metadata` output")?;
    let dir = metadata["target_directory"]
        .as_str()
        .context("`cargo metadata` gave no target_directory")?;
    Ok(PathBuf::from(dir))
}
