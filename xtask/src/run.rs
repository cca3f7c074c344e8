//! `cargo xtask run -- <agent args>`: build, then run the agent.

use std::{ffi::OsString, path::Path, process::Command};

use anyhow::Result;

use crate::{
    build, setup,
    util::{self, describe},
};

pub(crate) fn run(args: Vec<OsString>) -> Result<()> {
    let tools = setup::ensure()?;
    let agent = build::release_agent(&tools)?;
    // Loading eBPF programs needs root (or CAP_BPF and friends); sudo is the
    // usual way to get it on a developer machine.
    let mut cmd = if util::is_root() {
        Command::new(&agent)
    } else if let Some(sudo) = util::find_program("sudo", &[Path::new("/usr/bin")]) {
        let mut cmd = Command::new(sudo);
        cmd.arg("--").arg(&agent);
        cmd
    } else {
        // The agent reports missing privileges itself, more precisely than
        // we could guess here.
        eprintln!("warning: not root and sudo not found; running the agent unprivileged");
        Command::new(&agent)
    };
    cmd.args(args);
    eprintln!("running: {}", describe(&cmd));
    exec(cmd)
}

/// Replaces this process with `cmd`, so signals (Ctrl-C, SIGTERM from a
/// supervisor) reach the agent directly and its exit code is ours.
#[cfg(unix)]
fn exec(mut cmd: Command) -> Result<()> {
    use std::os::unix::process::CommandExt;

    use anyhow::Context;

    // `exec` only returns on failure.
    Err(cmd.exec()).with_context(|| format!("could not start `{}`", describe(&cmd)))
}

/// Without exec, wait for the agent and forward its exit code.
#[cfg(not(unix))]
fn exec(mut cmd: Command) -> Result<()> {
    use anyhow::Context;

    let status = cmd
        .status()
        .with_context(|| format!("could not start `{}`", describe(&cmd)))?;
    std::process::exit(status.code().unwrap_or(1))
}
