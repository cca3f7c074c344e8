//! The agent's output against a reader that stops reading: the event loop
//! keeps draining the kernel's buffers and answering signals, what it
//! cannot hand on is counted (`output_dropped`), and the last `agent_stats`
//! reaches the reader once it reads again. And an agent that cannot keep up
//! with the kernel still ends its intervals and answers signals.

use std::fs::{self, File};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use kdiag_tests::agent::{Agent, exit_timeout};
use kdiag_tests::netns::{NetnsPair, unique_port};
use kdiag_tests::peer::{ConnectOptions, Peer};
use kdiag_tests::record::{self, class_totals};
use kdiag_tests::tempdir::TempDir;
use kdiag_tests::{cmd, env, max_wait};
use serde_json::Value;

const PEER: &str = env!("CARGO_BIN_EXE_kdiag-peer");

/// Clients connecting and closing one connection after another, at once.
const CLIENTS: usize = 4;
/// How long the reader stays stopped under churn.
const STOPPED: Duration = Duration::from_secs(5);
/// How soon after SIGTERM the agent must be gone, whatever its reader does.
const EXIT_WITHIN: Duration = Duration::from_secs(1);
/// How long the agent is held behind the kernel's churn.
const BEHIND: Duration = Duration::from_secs(5);

/// Kills the process in Drop, resuming it first: a stopped process left
/// behind by a failed test would hold its pipe forever.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        // Already gone, when the test got as far as waiting for it.
        // SAFETY: kill(2) on a child of this process.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGCONT) };
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on a child of this process.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

/// [`CLIENTS`] clients in `net`'s client namespace connecting to `port` of
/// its server and closing, one connection after another, until killed.
fn churn(net: &NetnsPair, port: u16) -> Vec<Peer> {
    let opts = ConnectOptions {
        count: Some(1_000_000),
        ..ConnectOptions::default()
    };
    (0..CLIENTS)
        .map(|_| Peer::connect_with(PEER, &net.client, net.server.v4, port, &opts))
        .collect()
}

/// Runs `argv` with its stdout and stderr discarded.
fn run_quietly(argv: &[&str]) -> std::process::ExitStatus {
    Command::new(argv[0])
        .args(&argv[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap_or_else(|e| panic!("{argv:?}: {e}"))
}

fn parse(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect()
}

#[test]
fn a_stopped_reader_stalls_neither_draining_nor_exit() {
    env::require_root();
    let dir = TempDir::new("output");
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    let net = NetnsPair::new();
    let port = unique_port();
    let _server = Peer::listen(PEER, &net.server, net.server.v4, port);

    // The agent writes into a pipe read by `cat`, which the test stops.
    let mut reader = Command::new("cat")
        .stdin(Stdio::piped())
        .stdout(File::create(&out_path).expect("creating the output file"))
        .spawn()
        .expect("running cat");
    let pipe = reader.stdin.take().expect("piped stdin");
    let reader = Reaped(reader);
    let agent = Command::new(env::agent_path())
        .args(["tcp", "--port", &port.to_string(), "--interval", "0"])
        .stdin(Stdio::null())
        .stdout(pipe)
        .stderr(File::create(&err_path).expect("creating the error file"))
        .spawn()
        .expect("running the agent");
    let mut agent = Reaped(agent);
    let started = Instant::now();
    while !fs::read_to_string(&out_path)
        .unwrap_or_default()
        .contains("\"agent_start\"")
    {
        assert!(
            started.elapsed() < max_wait(),
            "no agent_start; stderr: {}",
            fs::read_to_string(&err_path).unwrap_or_default()
        );
        thread::sleep(Duration::from_millis(20));
    }

    signal(reader.0.id(), libc::SIGSTOP);
    let clients = churn(&net, port);
    thread::sleep(STOPPED);
    for client in clients {
        client.kill();
    }

    // Still answering signals, with a full pipe and a full queue.
    signal(agent.0.id(), libc::SIGTERM);
    let asked = Instant::now();
    let status = cmd::wait_timeout(&mut agent.0, exit_timeout()).unwrap_or_else(|| {
        panic!(
            "the agent is still running {:?} after SIGTERM",
            exit_timeout()
        )
    });
    let took = asked.elapsed();
    assert!(status.success(), "agent exit: {status}");
    assert!(
        took < kdiag_tests::on_this_machine(EXIT_WITHIN),
        "the agent took {took:?} to exit after SIGTERM with its reader stopped"
    );

    signal(reader.0.id(), libc::SIGCONT);
    let mut reader = reader;
    let status = cmd::wait_timeout(&mut reader.0, max_wait()).expect("cat reads to the end");
    assert!(status.success(), "cat: {status}");
    let text = fs::read_to_string(&out_path).expect("reading the output");
    let recs = parse(&text);
    let last = recs.last().expect("some output");
    assert!(
        record::is_type(last, "agent_stats"),
        "the last line is the final agent_stats: {last}"
    );

    // The loop kept draining: the kernel dropped nothing.
    let totals = class_totals(&recs, "tcp");
    assert_eq!(
        (totals.dropped, totals.lost, record::decode_errors(&recs)),
        (0, 0, 0),
        "kernel drops or losses while the reader was stopped: {totals:?}"
    );
    let output_dropped: u64 = recs
        .iter()
        .filter(|r| record::is_type(r, "agent_stats"))
        .map(|r| record::u64_field(r, "output_dropped"))
        .sum();
    eprintln!(
        "{} records read, {output_dropped} dropped, {} events; exit took {took:?}",
        recs.len(),
        totals.events
    );
    assert!(
        output_dropped > 0,
        "{} records and none dropped: the churn did not fill the pipe and the queue",
        recs.len()
    );
    // Every record of an event was written or counted, exactly; with
    // --interval 0 the only other records are agent_start, the exit's
    // tcp_summary (dropped with the queue's last records, or written) and
    // the final agent_stats.
    let written = recs
        .iter()
        .filter(|r| record::is_type(r, "tcp_state") || record::is_type(r, "tcp_conn"))
        .count() as u64;
    let summaries = recs
        .iter()
        .filter(|r| record::is_type(r, "tcp_summary"))
        .count() as u64;
    assert!(summaries <= 1, "{summaries} tcp_summary records");
    assert_eq!(
        written + output_dropped,
        totals.events + (1 - summaries),
        "records written ({written}) + output_dropped ({output_dropped}) vs events \
         ({}) and the missing tcp_summary",
        totals.events
    );
}

/// An agent that cannot keep up with the kernel: its event loop's thread
/// held to a sliver of one CPU (the lowest priority, beside a busy loop at
/// the default one), under churn from every CPU. Its ring buffer never
/// empties, and a drain to the end would never return: the event loop must
/// still end intervals and answer SIGTERM between slices of draining, and
/// the kernel counts what did not fit.
#[test]
fn an_agent_behind_the_kernel_still_ends_intervals_and_exits() {
    env::require_root();
    let net = NetnsPair::new();
    let port = unique_port();
    let _server = Peer::listen(PEER, &net.server, net.server.v4, port);
    let port_arg = port.to_string();
    // A small buffer: what is left in it at exit is drained on the sliver.
    let (mut agent, _start) = Agent::start(
        &[
            "tcp",
            "--port",
            &port_arg,
            "--interval",
            "1",
            "--buffer-mib",
            "1",
        ],
        &["sock/inet_sock_set_state"],
    );
    let pid = agent.pid().to_string();
    // Every thread on CPU 0; the event loop's (the main one) at nice 19.
    for held in [
        &["taskset", "-a", "-p", "-c", "0", &pid][..],
        &["renice", "-n", "19", "-p", &pid][..],
    ] {
        let status = run_quietly(held);
        assert!(status.success(), "{held:?}: {status}");
    }
    let busy = Reaped(
        Command::new("taskset")
            .args(["-c", "0", "sh", "-c", "while :; do :; done"])
            .spawn()
            .expect("running a busy loop"),
    );
    let clients = churn(&net, port);
    thread::sleep(BEHIND);
    let intervals = agent
        .records()
        .iter()
        .filter(|r| record::is_type(r, "agent_stats"))
        .count();

    // Asked to stop while still behind. The load goes right after: the
    // agent hands on everything queued before it exits (up to a buffer and
    // the events held for lookups), which on the sliver would take as long
    // as the backlog took to build.
    agent.signal(libc::SIGTERM);
    drop(busy);
    for client in clients {
        client.kill();
    }
    // And its CPU share back (it may be gone already), so that the
    // machine's other work does not decide how long that takes.
    for freed in [
        &["taskset", "-a", "-p", "-c", "0-1023", &pid][..],
        &["renice", "-n", "0", "-p", &pid][..],
    ] {
        run_quietly(freed);
    }
    let status = agent.wait_exit(exit_timeout());
    assert!(status.success(), "agent exit: {status}");
    let recs = agent.records();
    let last = recs.last().expect("some output");
    assert!(
        record::is_type(last, "agent_stats"),
        "the last line is the final agent_stats: {last}"
    );
    let totals = class_totals(&recs, "tcp");
    eprintln!("{intervals} agent_stats while behind; {totals:?}");
    // Under emulation the churn can be slower than even the sliver of a
    // CPU handles (measured in the 6.1 guest: 5089 events in 5 s).
    if !env::skip_unless(
        totals.dropped > 0,
        "the churn did not put the agent behind: nothing dropped",
    ) {
        return;
    }
    // The agent before the drain was sliced wrote none at all.
    assert!(
        intervals >= 1,
        "{intervals} agent_stats in {BEHIND:?} of intervals of 1 s while behind the kernel \
         ({totals:?})"
    );
}
