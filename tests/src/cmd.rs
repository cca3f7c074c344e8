//! Running short-lived helper commands (`ip`, `nft`, `bpftool`) with a
//! timeout, so a wedged tool fails the test instead of hanging it.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

const CMD_TIMEOUT: Duration = Duration::from_secs(10);

/// Polls `child` until it exits or `timeout` passes; `None` on timeout.
/// Polling (instead of a blocking `wait`) keeps every wait bounded.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() >= deadline => return None,
            Ok(None) => thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("waiting for pid {}: {e}", child.id()),
        }
    }
}

/// Runs `cmd` to completion with stdout and stderr captured; panics if it
/// cannot start or outlives the timeout (it is killed then).
pub fn output(cmd: &mut Command) -> Output {
    try_output(cmd).unwrap_or_else(|e| panic!("{e}"))
}

/// `output` for `Drop` impls, which must not panic while a test unwinds.
pub fn try_output(cmd: &mut Command) -> Result<Output, String> {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    // Drain both pipes concurrently: a tool that fills one pipe while we
    // wait on the other would otherwise deadlock.
    let out = drain(child.stdout.take().expect("piped stdout"));
    let err = drain(child.stderr.take().expect("piped stderr"));
    let timeout = crate::on_this_machine(CMD_TIMEOUT);
    let Some(status) = wait_timeout(&mut child, timeout) else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!("{shown} did not finish within {timeout:?}"));
    };
    Ok(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        buf
    })
}

/// Runs `program args…`, panics with its stderr unless it succeeds, and
/// returns its stdout.
pub fn run(program: &str, args: &[&str]) -> String {
    let out = output(Command::new(program).args(args));
    assert!(
        out.status.success(),
        "`{program} {}` failed ({}): {}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `run` for a prepared command (e.g. with arguments that are paths).
pub fn run_command(cmd: &mut Command) -> String {
    let out = output(cmd);
    assert!(
        out.status.success(),
        "`{cmd:?}` failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `run` inside network namespace `ns` (via `ip netns exec`).
pub fn run_in(ns: &str, program: &str, args: &[&str]) -> String {
    let mut full = vec!["netns", "exec", ns, program];
    full.extend_from_slice(args);
    run("ip", &full)
}
