//! Small helpers shared by the subcommands.

use std::{
    env,
    ffi::OsStr,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, ensure};

/// The workspace root: xtask lives in `<root>/xtask`.
pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask's manifest dir has a parent")
        .to_path_buf()
}

/// A `cargo` command for the same toolchain that runs xtask. `cargo run` sets
/// `CARGO` to the cargo binary in use; fall back to PATH otherwise.
pub(crate) fn cargo() -> Command {
    Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// The command line of `cmd`, for messages.
pub(crate) fn describe(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` to completion and fails unless it exits successfully.
pub(crate) fn run_checked(cmd: &mut Command) -> Result<()> {
    let desc = describe(cmd);
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{desc}`"))?;
    ensure!(status.success(), "`{desc}` failed ({status})");
    Ok(())
}

/// Whether the effective user is root.
///
/// Read from /proc to avoid a libc dependency just for `geteuid`; `id -u` is
/// the fallback when /proc is not mounted. If both fail we report "not root",
/// which is the safe answer: callers then use sudo or refuse to run.
pub(crate) fn is_root() -> bool {
    if let Ok(status) = fs::read_to_string("/proc/self/status") {
        // "Uid:\t<real>\t<effective>\t<saved>\t<fs>"
        if let Some(euid) = status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
        {
            return euid == "0";
        }
    }
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.status.success() && out.stdout.trim_ascii() == b"0")
}

/// Finds an executable named `name` on PATH, then in `extra_dirs`.
pub(crate) fn find_program(name: &str, extra_dirs: &[&Path]) -> Option<PathBuf> {
    path_dirs()
        .into_iter()
        .chain(extra_dirs.iter().map(|dir| dir.to_path_buf()))
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

/// The directories on PATH, in order.
pub(crate) fn path_dirs() -> Vec<PathBuf> {
    env::var_os("PATH")
        .map(|path| env::split_paths(&path).collect())
        .unwrap_or_default()
}

pub(crate) fn is_executable(path: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::metadata(path)
            .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
    }
    #[cfg(not(unix))]
    {
        path.is_file()
    }
}
