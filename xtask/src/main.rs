//! Development tasks for kdiag, run as `cargo xtask <command>`.
//!
//! Kept as a plain Rust binary (instead of shell scripts) so the same logic
//! runs on developer machines and in CI (`.ci/run` only calls
//! `cargo xtask test`).

mod bench;
mod build;
mod run;
mod setup;
mod test;
mod util;
mod vm_test;

use std::{ffi::OsString, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Result;
use clap::{Parser, Subcommand};

/// Development tasks for kdiag (run as `cargo xtask <command>`).
#[derive(Parser)]
#[command(bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what building and testing need: rust-src for the `nightly`
    /// toolchain, bpf-linker 0.10.0, and the Debian packages nftables,
    /// iproute2, bpftool and systemd (for systemd-analyze), and the system
    /// user `kdiag` the systemd unit runs the agent as (the tests run it
    /// so). Idempotent: only missing items are installed.
    Setup,
    /// Run setup, then build the release agent and print its path
    /// (`<target dir>/release/kdiag-agent`, `target/` unless cargo is told
    /// otherwise, e.g. by CARGO_TARGET_DIR).
    Build,
    /// Build the release agent, then run it with the given arguments
    /// (through sudo when not root), forwarding its exit code.
    Run {
        /// Arguments for kdiag-agent, after `--`.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Run setup, build the release agent, run the unit tests and the
    /// integration tests (kdiag-tests) on the running kernel; with
    /// --with-guests, then the same integration tests in QEMU guests of
    /// Debian's 6.1 and 6.12 kernels. Needs root.
    Test {
        /// Also run the integration tests in the 6.1 and 6.12 guests.
        #[arg(long)]
        with_guests: bool,
        /// Extra arguments for the integration test binaries, on the host
        /// and in the guests, after `--` (e.g. a test name filter).
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Benchmark kdiag against libbpf-tools and bpftrace under loads it
    /// generates itself (loopback bulk transfer, connection churn,
    /// retransmits through a random-drop rule in a network namespace):
    /// kernel time per event, overhead, userspace CPU per record, start-up
    /// and memory. Installs libbpf-tools, bpftrace and iperf3 if missing,
    /// prints one table and writes it to docs/BENCHMARKS.md. Needs root.
    Bench {
        /// Fewer and shorter runs, under three minutes, for routine use.
        #[arg(long)]
        quick: bool,
        /// Only the kernel cost of this class (`tcp`, `retrans`, `softirq`,
        /// `drop`; repeatable), e.g. after changing its programs: the table
        /// is printed, and docs/BENCHMARKS.md, which holds whole runs, is
        /// left as it is.
        #[arg(long, value_name = "CLASS")]
        only: Vec<String>,
    },
    /// Used by `bench`: holds this many loopback connections (both ends)
    /// open, prints `ready` once they are established, exits when stdin
    /// closes.
    #[command(hide = true)]
    BenchHold {
        #[arg(long)]
        connections: usize,
    },
    /// Run the integration tests inside Debian's kernels (5.10, 6.1, 6.12
    /// and the newest series of trixie-backports), each booted under QEMU
    /// (TCG) from its Debian package (downloaded with apt-get through a
    /// private sources list and keyring, never installed). Needs root.
    /// Installs qemu-system-x86, busybox-static and debian-archive-keyring
    /// when missing; caches package lists, kernels and initramfs images in
    /// target/vm-test. Prints the time, results and skips per kernel, and
    /// after a full passing run rewrites docs/KERNELS.md.
    VmTest {
        /// Kernel series: 5.10, 6.1, 6.12, newest (the newest series in
        /// trixie-backports), several separated by commas, or all.
        #[arg(long, default_value = "all")]
        kernel: String,
        /// Fail a guest that has not powered off after this many seconds
        /// (a guest is failed sooner when its console stays silent for
        /// 660 s: stuck).
        #[arg(long, default_value_t = 2700)]
        timeout: u64,
        /// Tests run at once in each test binary of the guest.
        #[arg(long, default_value_t = 2)]
        test_threads: u32,
        /// Test this kdiag-agent binary instead of building one.
        #[arg(long)]
        agent: Option<PathBuf>,
        /// Arguments for every test binary in the guest, after `--` (e.g.
        /// a test name filter); with any, docs/KERNELS.md is not written.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
}

/// Errors print as their chain of causes, without a backtrace: the chain
/// says what failed, and a CI log keeps only the last lines of a run.
fn main() -> ExitCode {
    match command(Cli::parse().command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn command(command: Command) -> Result<()> {
    match command {
        Command::Setup => setup::ensure().map(drop),
        Command::Build => {
            let tools = setup::ensure()?;
            let agent = build::release_agent(&tools)?;
            // The path is the only thing on stdout, so scripts can use
            // `$(cargo xtask build)`; everything else goes to stderr.
            println!("{}", agent.display());
            Ok(())
        }
        Command::Run { args } => run::run(args),
        Command::Test { args, with_guests } => test::run(args, with_guests),
        Command::Bench { quick, only } => bench::run(quick, &only),
        Command::BenchHold { connections } => bench::hold(connections),
        Command::VmTest {
            kernel,
            timeout,
            test_threads,
            agent,
            args,
        } => vm_test::run(vm_test::Options {
            kernel,
            timeout: Duration::from_secs(timeout),
            test_threads,
            agent,
            test_args: args,
        }),
    }
}
