//! `cargo xtask vm-test [--kernel 5.10|6.1|6.12|newest|all]`: the
//! integration tests on Debian's kernels from 5.10 to the newest, each
//! booted under QEMU.
//!
//! The host builds the agent and the test binaries; each guest boots a
//! Debian kernel package with a small initramfs, mounts the host's root
//! read-only over 9p, and runs those same binaries in it as root (see
//! `vm_test/init.sh`). Kernels and initramfs images are cached under
//! `target/vm-test`.

mod excerpt;
mod guest;
mod initramfs;
mod kernel;
mod modules;
mod report;

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::{
    build, setup,
    util::{self, find_program, workspace_root},
};
use guest::{Plan, TestBinary};
use kernel::SERIES;

/// Host tools the guests need, with their Debian packages. busybox must be
/// the static build: it runs in the initramfs, which has no libc.
const VM_TOOLS: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    ("busybox", "busybox-static"),
    ("dpkg-deb", "dpkg"),
    ("xz", "xz-utils"),
    ("zstd", "zstd"),
];

pub(crate) struct Options {
    /// A series of [`kernel::SERIES`] by name, or `all`.
    pub kernel: String,
    pub timeout: Duration,
    pub test_threads: u32,
    /// An agent binary to test instead of building one; such runs do not
    /// update docs/KERNELS.md either.
    pub agent: Option<PathBuf>,
    /// Arguments for the test binaries after `--` (filters); none means the
    /// whole suite, and only such a run updates docs/KERNELS.md.
    pub test_args: Vec<OsString>,
}

impl Default for Options {
    /// Every series, the whole suite, the agent built here, and the bounds
    /// `cargo xtask vm-test` defaults to.
    fn default() -> Self {
        Options {
            kernel: "all".to_owned(),
            timeout: Duration::from_secs(2700),
            test_threads: 2,
            agent: None,
            test_args: Vec::new(),
        }
    }
}

pub(crate) fn run(opts: Options) -> Result<()> {
    if !util::is_root() {
        bail!(
            "`cargo xtask vm-test` needs root: the tests run as root in the guest, and QEMU \
             shares the host root with it"
        );
    }
    let series: Vec<&kernel::Series> = match opts.kernel.as_str() {
        "all" => SERIES.iter().collect(),
        names => names
            .split(',')
            .map(|name| {
                SERIES.iter().find(|s| s.name == name).with_context(|| {
                    format!(
                        "unknown kernel {name:?}; known: {}, all",
                        SERIES.iter().map(|s| s.name).collect::<Vec<_>>().join(", ")
                    )
                })
            })
            .collect::<Result<_>>()?,
    };
    let tools = setup::ensure()?;
    setup::ensure_debian_packages(VM_TOOLS)?;
    let qemu = tool("qemu-system-x86_64")?;
    let busybox = tool("busybox")?;
    ensure_static(&busybox)?;

    let agent = match &opts.agent {
        Some(path) => {
            let path = std::path::absolute(path)?;
            ensure!(
                util::is_executable(&path),
                "--agent {}: not an executable file",
                path.display()
            );
            path
        }
        None => build::release_agent(&tools)?,
    };
    let binaries = build_tests(tools.path())?;
    for path in std::iter::once(&agent).chain(binaries.iter().map(|b| &b.path)) {
        visible_in_guest(path)?;
    }
    let root = workspace_root();
    let cache = build::target_dir()?.join("vm-test");
    let apt = setup::kernel_sources(&cache.join("apt"))?;
    let cwd = root.join("tests");
    let mut test_args = vec![format!("--test-threads={}", opts.test_threads)];
    let partial = !opts.test_args.is_empty() || opts.agent.is_some();
    test_args.extend(
        opts.test_args
            .iter()
            .map(|a| a.to_string_lossy().into_owned()),
    );

    let mut runs = Vec::new();
    for s in series {
        let result = run_series(
            s,
            &cache,
            &apt,
            &busybox,
            &qemu,
            &Guest {
                agent: &agent,
                cwd: &cwd,
                binaries: &binaries,
                test_args: &test_args,
                timeout: opts.timeout,
            },
        );
        if let Err(e) = &result {
            eprintln!("vm-test: {}: {e:#}", s.name);
        }
        runs.push((s.name, result));
    }
    report::print_summary(&runs);
    let passed: Vec<&report::KernelRun> = runs
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .filter(|r| r.outcome.ok())
        .collect();
    if partial {
        eprintln!("vm-test: test filters or --agent given: docs/KERNELS.md left as it is");
    } else if !passed.is_empty() {
        let path = root.join("docs").join("KERNELS.md");
        let fixed: Vec<&str> = kernel::Series::fixed_names().collect();
        report::update_kernels_md(&path, &passed, &fixed)?;
        eprintln!("vm-test: updated {}", path.display());
    }
    match report::failure_digest(&runs) {
        Some(digest) => bail!("vm-test failed:{digest}"),
        None => Ok(()),
    }
}

/// What every guest runs.
struct Guest<'a> {
    agent: &'a Path,
    cwd: &'a Path,
    binaries: &'a [TestBinary],
    test_args: &'a [String],
    timeout: Duration,
}

fn run_series(
    series: &kernel::Series,
    cache: &Path,
    apt: &setup::KernelSources,
    busybox: &Path,
    qemu: &Path,
    guest: &Guest,
) -> Result<report::KernelRun> {
    let pick = series.newest_package(apt)?;
    let kernel = kernel::prepare(cache, apt, &pick, busybox)?;
    eprintln!(
        "vm-test: {}: booting {} ({} {})",
        pick.series, kernel.release, pick.package, pick.version
    );
    let plan = Plan {
        series: &pick.series,
        agent: guest.agent,
        cwd: guest.cwd,
        binaries: guest.binaries,
        test_args: guest.test_args,
        timeout: guest.timeout,
    };
    let outcome = guest::run(
        qemu,
        &kernel,
        &plan,
        &cache.join("results").join(series.name),
    )?;
    Ok(report::KernelRun {
        series: pick.series,
        moving: series.moving(),
        kernel,
        outcome,
    })
}

/// Builds the kdiag-tests test binaries (without running them) and returns
/// them as cargo reports them in its JSON messages.
fn build_tests(path: &OsString) -> Result<Vec<TestBinary>> {
    let mut cmd = util::cargo();
    cmd.current_dir(workspace_root())
        .args([
            "test",
            "--release",
            "--package",
            "kdiag-tests",
            "--no-run",
            "--message-format=json",
        ])
        .env("PATH", path);
    eprintln!("building: kdiag-tests (release, --no-run)");
    let out = cmd.output().context("running cargo test --no-run")?;
    ensure!(
        out.status.success(),
        "building the integration tests failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut binaries = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
            continue;
        }
        let (Some(name), Some(exe)) = (msg["target"]["name"].as_str(), msg["executable"].as_str())
        else {
            continue;
        };
        binaries.push(TestBinary {
            name: name.to_owned(),
            path: PathBuf::from(exe),
        });
    }
    ensure!(
        !binaries.is_empty(),
        "cargo built no test binaries for kdiag-tests"
    );
    // Cargo reports them in build order; a fixed order keeps the guest's
    // plan and the report stable.
    binaries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(binaries)
}

/// Directories the guest mounts its own file systems on (see init.sh):
/// host files there are hidden from the tests.
const GUEST_MOUNTS: &[&str] = &["/run", "/dev", "/proc", "/sys"];

fn visible_in_guest(path: &Path) -> Result<()> {
    let hidden = GUEST_MOUNTS.iter().find(|m| path.starts_with(m));
    ensure!(
        hidden.is_none(),
        "{} is under {}, which the guest mounts its own file system on; \
         it must live elsewhere to run in the guest",
        path.display(),
        hidden.map_or("", |m| m)
    );
    Ok(())
}

fn tool(name: &str) -> Result<PathBuf> {
    find_program(name, &[Path::new("/usr/sbin"), Path::new("/usr/bin")])
        .with_context(|| format!("{name} not found after setup"))
}

/// The Debian package `busybox` has a dynamically linked binary of the same
/// name, which cannot run in the initramfs.
fn ensure_static(busybox: &Path) -> Result<()> {
    let out = std::process::Command::new("ldd").arg(busybox).output();
    let dynamic = out.is_ok_and(|o| o.status.success());
    ensure!(
        !dynamic,
        "{} is dynamically linked; the guest needs Debian's busybox-static \
         (`apt-get install busybox-static`, which replaces the package busybox)",
        busybox.display()
    );
    Ok(())
}
