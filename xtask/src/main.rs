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

use std::ffi::OsString;

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
    /// iproute2 and bpftool. Idempotent: only missing items are installed.
    Setup,
    /// Run setup, then build the release agent and print its path
    /// (target/release/kdiag-agent).
    Build,
    /// Build the release agent, then run it with the given arguments
    /// (through sudo when not root), forwarding its exit code.
    Run {
        /// Arguments for kdiag-agent, after `--`.
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Run setup, build the release agent, run the unit tests, then the
    /// integration tests (kdiag-tests). Needs root.
    Test {
        /// Extra arguments for the integration test binary, after `--`
        /// (e.g. a test name filter).
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
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
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
        Command::Test { args } => test::run(args),
        Command::Bench { quick } => bench::run(quick),
    }
}
