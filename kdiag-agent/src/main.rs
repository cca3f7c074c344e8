//! kdiag-agent: parse the command line, run the agent, map the outcome to
//! the exit codes of the CLI contract (0 normal end, 2 usage, 77 missing
//! privileges, 1 anything else).

mod agent;
mod attribution;
mod budget;
mod class;
mod classes;
mod cli;
mod errors;
mod kernel;
mod output;
mod privileges;
mod services;
mod sys;

#[cfg(test)]
mod fuzz_tests;

use clap::Parser as _;

fn main() {
    return_freed_memory();
    // clap exits with 2 on usage errors and 0 for --help/--version.
    let cli = cli::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            output::diagnose(format_args!("cannot start the event loop: {e}"));
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(agent::run(cli)) {
        output::diagnose(errors::Chain(&e));
        std::process::exit(e.exit_code());
    }
}

/// Start-up reads a few files of megabytes (the kernel's BTF, the eBPF
/// object) and frees them. glibc raises its mmap threshold to the size of
/// the largest block freed, so later blocks of that size come from the heap
/// and stay in the process after they are freed: about 14 MiB of resident
/// memory the agent would never use again. A fixed threshold keeps large
/// blocks in mappings of their own, returned when freed.
fn return_freed_memory() {
    sys::process::set_mmap_threshold(128 * 1024);
}
