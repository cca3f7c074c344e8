//! `cargo xtask setup`: install what the build and the tests need.
//!
//! Every item is checked locally first (no network) and only installed when
//! missing, so running this again costs a few milliseconds; `build`, `run` and
//! `test` call it every time.

use std::{
    env,
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail, ensure};

use crate::util::{self, describe, find_program, run_checked, workspace_root};

mod kernel_sources;
pub(crate) use kernel_sources::{KernelSources, kernel_sources};

/// aya-build compiles kdiag-ebpf with `rustup run <this> cargo build -Z
/// build-std=core`, which needs this toolchain's rust-src component.
const NIGHTLY: &str = "nightly";

/// Newer bpf-linker releases fail to link kdiag-ebpf here, so the version is
/// pinned exactly rather than "at least".
const BPF_LINKER_VERSION: &str = "0.10.0";

/// Binaries the integration tests run, with the Debian package providing each.
const DEBIAN_TOOLS: &[(&str, &str)] = &[
    ("nft", "nftables"),
    ("ip", "iproute2"),
    ("bpftool", "bpftool"),
    // Rates the systemd unit (`systemd-analyze security --offline=yes`);
    // works where PID 1 is not systemd.
    ("systemd-analyze", "systemd"),
    // The metrics test scrapes the agent with a server of its own and
    // checks the endpoint's text with promtool.
    ("prometheus", "prometheus"),
    ("promtool", "prometheus"),
];

/// The service Debian's `prometheus` package enables (and, where systemd
/// runs, starts) on install: the tests start their own servers, and a
/// host's resident Prometheus would only scrape and listen for nothing.
const PROMETHEUS_UNIT: &str = "prometheus.service";
const PROMETHEUS_ENABLED: &str = "/etc/systemd/system/multi-user.target.wants/prometheus.service";

/// Where Debian puts admin binaries; a non-root PATH often lacks them, but the
/// package is installed all the same.
const SBIN_DIRS: &[&str] = &["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// What later steps need to know about the installed tools.
pub(crate) struct Tools {
    /// PATH for child cargo processes, with the directory of the pinned
    /// bpf-linker first: rustc looks `bpf-linker` up on PATH, and another
    /// version may come earlier on the caller's PATH.
    path: OsString,
}

impl Tools {
    /// The PATH to give to cargo invocations that may build kdiag-ebpf.
    pub(crate) fn path(&self) -> &OsString {
        &self.path
    }
}

/// Checks every item, installing the missing ones, one status line each.
pub(crate) fn ensure() -> Result<Tools> {
    // Debian packages first: they are the ones that need root, so a non-root
    // user learns that before waiting for a bpf-linker build.
    ensure_debian_packages(DEBIAN_TOOLS)?;
    quiet_packaged_prometheus()?;
    ensure_agent_user()?;
    ensure_rust_src()?;
    let bpf_linker = ensure_bpf_linker()?;
    let dir = bpf_linker
        .parent()
        .context("bpf-linker path has no parent directory")?;
    let path = env::join_paths(std::iter::once(dir.to_path_buf()).chain(util::path_dirs()))
        .context("building PATH for cargo")?;
    Ok(Tools { path })
}

/// Checks that each `(binary, Debian package)` is installed, installing the
/// missing packages with apt-get (needs root).
pub(crate) fn ensure_debian_packages(tools: &[(&'static str, &'static str)]) -> Result<()> {
    let sbin: Vec<&Path> = SBIN_DIRS.iter().map(Path::new).collect();
    // Prints an "ok" line for each binary found, returns the missing ones.
    let check = |tools: &[(&'static str, &'static str)]| -> Vec<(&'static str, &'static str)> {
        tools
            .iter()
            .copied()
            .filter(|&(bin, pkg)| match find_program(bin, &sbin) {
                Some(path) => {
                    eprintln!("ok: {bin} ({pkg}, {})", path.display());
                    false
                }
                None => true,
            })
            .collect()
    };
    let missing = check(tools);
    if missing.is_empty() {
        return Ok(());
    }
    let mut packages: Vec<&str> = missing.iter().map(|&(_, pkg)| pkg).collect();
    // One package may provide several of the binaries (prometheus, promtool).
    packages.dedup();
    apt_install(&packages)?;
    let still_missing = check(&missing);
    ensure!(
        still_missing.is_empty(),
        "apt-get installed {}, but these binaries are still not found: {}",
        packages.join(" "),
        still_missing
            .iter()
            .map(|&(bin, _)| bin)
            .collect::<Vec<_>>()
            .join(" ")
    );
    Ok(())
}

/// Checks that each `(file, Debian package)` exists, installing the
/// packages of the missing files with apt-get (needs root).
pub(crate) fn ensure_debian_files(files: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<(&str, &str)> = files
        .iter()
        .copied()
        .filter(|&(file, pkg)| {
            let there = Path::new(file).exists();
            if there {
                eprintln!("ok: {file} ({pkg})");
            }
            !there
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let packages: Vec<&str> = missing.iter().map(|&(_, pkg)| pkg).collect();
    apt_install(&packages)?;
    for (file, pkg) in missing {
        ensure!(
            Path::new(file).exists(),
            "apt-get installed {pkg}, but {file} is still missing"
        );
    }
    Ok(())
}

/// Disables (and, where systemd runs, stops) the Prometheus service the
/// package enabled, once: later runs find it disabled and do nothing.
fn quiet_packaged_prometheus() -> Result<()> {
    if !Path::new(PROMETHEUS_ENABLED).exists() {
        return Ok(());
    }
    eprintln!("disabling {PROMETHEUS_UNIT} (the tests run their own Prometheus)");
    // `disable` edits links and works without a running systemd; `--now`
    // would fail there, so stopping is a step of its own.
    let systemctl = |verb: &str| {
        let mut cmd = Command::new("systemctl");
        // Keep our stdout clean (`cargo xtask build` prints only the path).
        cmd.args([verb, PROMETHEUS_UNIT]).stdout(std::io::stderr());
        run_checked(&mut cmd).with_context(|| format!("systemctl {verb} {PROMETHEUS_UNIT}"))
    };
    systemctl("disable")?;
    if Path::new("/run/systemd/system").exists() {
        systemctl("stop")?;
    }
    Ok(())
}

/// Installs Debian `packages` with apt-get (needs root).
fn apt_install(packages: &[&str]) -> Result<()> {
    let sbin: Vec<&Path> = SBIN_DIRS.iter().map(Path::new).collect();
    let list = packages.join(" ");
    if !util::is_root() {
        bail!(
            "missing Debian packages: {list}; installing them needs root. Run:\n  \
             sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y {list}"
        );
    }
    ensure!(
        find_program("apt-get", &sbin).is_some(),
        "missing packages {list}, and apt-get is not available to install them \
         (kdiag's setup expects Debian); install them with the system's package manager"
    );
    eprintln!("installing: {list} (apt-get)");
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.env("DEBIAN_FRONTEND", "noninteractive").args(args);
        // Keep our stdout clean (`cargo xtask build` prints only the path).
        cmd.stdout(std::io::stderr());
        run_checked(&mut cmd).with_context(|| format!("installing Debian packages {list}"))
    };
    // The package lists of a fresh machine are often empty or stale, so update
    // once, and only here, when something must be installed.
    apt(&["update"])?;
    // Only what is named: `prometheus` recommends the node exporter, one
    // more service that would start and listen.
    apt(&[&["install", "-y", "--no-install-recommends"], packages].concat())?;
    Ok(())
}

/// The system user deploy/kdiag-agent.service runs the agent as: the tests
/// run the agent as that user, with the unit's capabilities.
const AGENT_USER: &str = "kdiag";

/// Creates [`AGENT_USER`] from deploy/kdiag.sysusers, as a deployment does,
/// unless /etc/passwd has it.
fn ensure_agent_user() -> Result<()> {
    let passwd = std::fs::read_to_string("/etc/passwd").context("reading /etc/passwd")?;
    let prefix = format!("{AGENT_USER}:");
    if passwd.lines().any(|l| l.starts_with(&prefix)) {
        eprintln!("ok: user {AGENT_USER}");
        return Ok(());
    }
    let conf = workspace_root().join("deploy").join("kdiag.sysusers");
    if !util::is_root() {
        bail!(
            "missing user {AGENT_USER}; creating it needs root. Run:\n  sudo systemd-sysusers {}",
            conf.display()
        );
    }
    eprintln!("creating: user {AGENT_USER} (systemd-sysusers)");
    let mut cmd = Command::new("systemd-sysusers");
    cmd.arg(&conf).stdout(std::io::stderr());
    run_checked(&mut cmd).with_context(|| format!("creating user {AGENT_USER}"))
}

fn ensure_rust_src() -> Result<()> {
    if nightly_has_rust_src()? {
        eprintln!("ok: rust-src ({NIGHTLY} toolchain)");
        return Ok(());
    }
    eprintln!("installing: rust-src ({NIGHTLY} toolchain)");
    let mut cmd = Command::new("rustup");
    cmd.args(["component", "add", "rust-src", "--toolchain", NIGHTLY]);
    cmd.stdout(std::io::stderr());
    run_checked(&mut cmd).context("installing rust-src for the nightly toolchain")?;
    ensure!(
        nightly_has_rust_src()?,
        "`{}` succeeded but rust-src is still not listed as installed",
        describe(&cmd)
    );
    Ok(())
}

fn nightly_has_rust_src() -> Result<bool> {
    let mut cmd = Command::new("rustup");
    cmd.args(["component", "list", "--toolchain", NIGHTLY, "--installed"]);
    let out = cmd
        .output()
        .with_context(|| format!("could not run `{}`; is rustup on PATH?", describe(&cmd)))?;
    ensure!(
        out.status.success(),
        "`{}` failed ({}): {}\nThe eBPF crate is built with a rustup toolchain named \
         `{NIGHTLY}`; install it with `rustup toolchain install {NIGHTLY} --component rust-src`",
        describe(&cmd),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|line| line.split_whitespace().next() == Some("rust-src")))
}

/// Returns the path of a bpf-linker of exactly [`BPF_LINKER_VERSION`].
fn ensure_bpf_linker() -> Result<PathBuf> {
    let install_bin = cargo_install_bin();
    let found = find_bpf_linkers(install_bin.as_deref());
    if let Some(path) = pinned(&found) {
        eprintln!("ok: bpf-linker {BPF_LINKER_VERSION} ({})", path.display());
        return Ok(path);
    }
    for (path, version) in &found {
        eprintln!(
            "found: {} ({version}), need {BPF_LINKER_VERSION}",
            path.display()
        );
    }
    eprintln!("installing: bpf-linker {BPF_LINKER_VERSION} (cargo install, about a minute)");
    let mut cmd = util::cargo();
    cmd.args(["install", "--locked"]);
    // cargo refuses to overwrite a binary it did not install itself (e.g. a
    // copied one); that wrong version is exactly what we want to replace.
    if let Some(bin) = &install_bin
        && found.iter().any(|(path, _)| path.starts_with(bin))
    {
        cmd.arg("--force");
    }
    cmd.arg(format!("bpf-linker@{BPF_LINKER_VERSION}"));
    cmd.stdout(std::io::stderr());
    run_checked(&mut cmd).with_context(|| format!("installing bpf-linker {BPF_LINKER_VERSION}"))?;
    let found = find_bpf_linkers(install_bin.as_deref());
    pinned(&found).with_context(|| {
        format!(
            "`{}` succeeded, but no bpf-linker {BPF_LINKER_VERSION} was found on PATH or in {}",
            describe(&cmd),
            install_bin
                .as_deref()
                .unwrap_or(Path::new("$CARGO_HOME/bin"))
                .display()
        )
    })
}

fn pinned(found: &[(PathBuf, String)]) -> Option<PathBuf> {
    found
        .iter()
        .find(|(_, version)| version == BPF_LINKER_VERSION)
        .map(|(path, _)| path.clone())
}

/// Every bpf-linker on PATH and in cargo's install directory (which may not be
/// on PATH yet on a fresh machine), with the version each reports.
fn find_bpf_linkers(install_bin: Option<&Path>) -> Vec<(PathBuf, String)> {
    let mut dirs = util::path_dirs();
    dirs.extend(install_bin.map(Path::to_path_buf));
    let mut found: Vec<(PathBuf, String)> = Vec::new();
    for candidate in dirs.into_iter().map(|dir| dir.join("bpf-linker")) {
        if !util::is_executable(&candidate) || found.iter().any(|(path, _)| *path == candidate) {
            continue;
        }
        let version = bpf_linker_version(&candidate).unwrap_or_else(|| "unknown version".into());
        found.push((candidate, version));
    }
    found
}

/// Parses `bpf-linker 0.10.0` from `bpf-linker --version`.
fn bpf_linker_version(path: &Path) -> Option<String> {
    let out = Command::new(path)
        .arg("--version")
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let version = stdout.trim().strip_prefix("bpf-linker")?.trim();
    Some(version.split_whitespace().next()?.to_owned())
}

/// Where `cargo install` puts binaries: `$CARGO_INSTALL_ROOT/bin`, else
/// `$CARGO_HOME/bin`, else `~/.cargo/bin`.
fn cargo_install_bin() -> Option<PathBuf> {
    let root = env::var_os("CARGO_INSTALL_ROOT")
        .or_else(|| env::var_os("CARGO_HOME"))
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))?;
    Some(root.join("bin"))
}
