//! `cargo xtask test [-- <args>]`: everything CI checks, in one command.

use std::{
    ffi::OsString,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    build, setup,
    util::{self, run_checked, workspace_root},
    vm_test,
};

/// The steps, in order; the summary lists those not reached as skipped.
const STEPS: [&str; 5] = [
    "setup",
    "build agent",
    "unit tests",
    "integration tests",
    "kernel matrix",
];

/// The last step, the integration tests in the guests of the kernel series
/// [`MATRIX`], which only `--with-guests` runs.
const MATRIX_STEP: usize = 4;

/// The series `--with-guests` boots. Not part of the default run, which CI
/// runs: on a fresh clone the 6.1 guest failed tests that pass on the host
/// and in the 6.12 guest (agents not started within the harness's bound
/// on the emulated CPU, and expectations of the newest loss counters that
/// kernels before 6.7 cannot meet); README, "Supported kernels".
const MATRIX: &str = "6.1,6.12";

pub(crate) fn run(extra: Vec<OsString>, with_guests: bool) -> Result<()> {
    // Checked before anything else: the integration tests load eBPF programs
    // and change network configuration, and a non-root run must fail loudly
    // (never skip them) without first spending minutes on builds.
    if !util::is_root() {
        bail!(
            "`cargo xtask test` runs the integration tests, which need root; run it as root \
             (e.g. `sudo -E env \"PATH=$PATH\" cargo xtask test`), or run `cargo test` for the \
             unit tests alone"
        );
    }
    let start = Instant::now();
    let mut done = Vec::new();
    let planned = if with_guests {
        STEPS.len()
    } else {
        MATRIX_STEP
    };
    let result = steps(&mut done, extra, with_guests);
    print_summary(&done, planned, start.elapsed());
    result
}

fn steps(done: &mut Vec<(Duration, bool)>, extra: Vec<OsString>, with_guests: bool) -> Result<()> {
    let root = workspace_root();
    let tools = step(done, setup::ensure)?;
    let agent = step(done, || build::release_agent(&tools))?;
    step(done, || {
        // The default workspace members: kdiag-ebpf only builds for the BPF
        // target and kdiag-tests needs the agent, so both are left out there.
        // In release, like the agent just built: the agent's build script
        // (the eBPF object) and the dependencies are built once, not twice.
        let mut cmd = util::cargo();
        cmd.current_dir(&root)
            .args(["test", "--release"])
            .env("PATH", tools.path());
        run_checked(&mut cmd)
    })?;
    step(done, || {
        let mut cmd = util::cargo();
        cmd.current_dir(&root)
            .args(["test", "--release", "--package", "kdiag-tests", "--"])
            .args(&extra)
            .env("PATH", tools.path())
            .env("KDIAG_AGENT", &agent);
        run_checked(&mut cmd)
    })?;
    if !with_guests {
        return Ok(());
    }
    step(done, || {
        vm_test::run(vm_test::Options {
            kernel: MATRIX.to_owned(),
            test_args: extra,
            ..vm_test::Options::default()
        })
    })
}

/// Runs the next step of [`STEPS`], recording its wall time and outcome.
fn step<T>(done: &mut Vec<(Duration, bool)>, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let name = STEPS[done.len()];
    eprintln!("==> {name}");
    let start = Instant::now();
    let result = f();
    done.push((start.elapsed(), result.is_ok()));
    result.with_context(|| format!("step `{name}` failed"))
}

fn print_summary(done: &[(Duration, bool)], planned: usize, total: Duration) {
    eprintln!("\nsummary:");
    for (i, name) in STEPS.iter().enumerate() {
        match done.get(i) {
            Some((time, ok)) => {
                let outcome = if *ok { "ok" } else { "FAILED" };
                eprintln!("  {outcome:<7} {name:<18} {:>7.1}s", time.as_secs_f64());
            }
            None if i >= planned => eprintln!("  {:<7} {name} (--with-guests)", "left out"),
            None => eprintln!("  {:<7} {name}", "skipped"),
        }
    }
    let outcome = if done.iter().all(|(_, ok)| *ok) && done.len() == planned {
        "ok"
    } else {
        "FAILED"
    };
    eprintln!(
        "  {outcome:<7} {:<18} {:>7.1}s",
        "total",
        total.as_secs_f64()
    );
}
