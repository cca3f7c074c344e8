//! Acceptance tests of `kdiag-agent retrans` against the real kernel. Each
//! test has its own namespaces and ports and filters the agent on its own
//! port, because every agent traces every namespace and tests run in
//! parallel.

use std::net::IpAddr;
use std::os::unix::process::CommandExt;
use std::thread;
use std::time::Duration;

use kdiag_tests::WAIT;
use kdiag_tests::agent::{Agent, EXIT_TIMEOUT};
use kdiag_tests::netns::{Family, NetnsPair, unique_port};
use kdiag_tests::peer::{PEER_COMM, Peer};
use kdiag_tests::record::{self, assert_envelope, pid_of, port_field, u64_field};
use serde_json::{Value, json};

const PEER: &str = env!("CARGO_BIN_EXE_kdiag-peer");

/// Exit code for a usage error (as clap's).
const EXIT_USAGE: i32 = 2;
/// Exit code for missing privileges (sysexits' EX_NOPERM).
const EXIT_NOPERM: i32 = 77;

/// Sends 100 bytes this often on ESTABLISHED test connections.
const SEND_EVERY_MS: u64 = 50;

/// `retrans --port PORT` followed by `extra`.
fn retrans_args(port: u16, extra: &[&str]) -> Vec<String> {
    let mut args = vec!["retrans".to_owned(), "--port".to_owned(), port.to_string()];
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    args
}

/// Spawns the agent on `args` and waits for its `agent_start`.
fn start_agent(args: &[String]) -> (Agent, Value) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Agent::start(&args, "tcp/tcp_retransmit_skb")
}

/// Matches the retransmit records of connections to `port` (the client's
/// side: the server of these tests never sends data).
fn retrans_to(port: u16) -> impl Fn(&Value) -> bool {
    move |rec| record::is_type(rec, "retrans") && rec.get("dport") == Some(&json!(port))
}

/// What every retransmit record of one test connection must say.
struct Expected {
    family: Family,
    state: &'static str,
    kind: &'static str,
    client: IpAddr,
    server: IpAddr,
    dport: u16,
    pid: u32,
    /// The client's port when known (not for a connect still in SYN_SENT).
    sport: Option<u16>,
}

impl Expected {
    /// A client stuck in SYN_SENT, retransmitting its SYN.
    fn syn(net: &NetnsPair, family: Family, port: u16, client: &Peer) -> Expected {
        Expected {
            family,
            state: "SYN_SENT",
            kind: "syn",
            client: net.client.addr(family),
            server: net.server.addr(family),
            dport: port,
            pid: client.pid(),
            sport: None,
        }
    }

    /// An established IPv4 client retransmitting data.
    fn data(net: &NetnsPair, port: u16, client: &Peer, sport: u16) -> Expected {
        Expected {
            family: Family::V4,
            state: "ESTABLISHED",
            kind: "data",
            client: net.client.v4.into(),
            server: net.server.v4.into(),
            dport: port,
            pid: client.pid(),
            sport: Some(sport),
        }
    }
}

/// Checks the consecutive retransmit records of one connection: all fields
/// as expected, one source port throughout, and `conn_retrans` counting
/// 1, 2, … (one retransmit per record, none before the first).
fn assert_conn_records(recs: &[Value], exp: &Expected) {
    let want = json!({
        "type": "retrans",
        "family": exp.family.as_str(),
        "saddr": exp.client.to_string(),
        "daddr": exp.server.to_string(),
        "dport": exp.dport,
        "state": exp.state,
        "kind": exp.kind,
        "pid": exp.pid,
        "comm": PEER_COMM,
    });
    let sport = exp.sport.unwrap_or_else(|| port_field(&recs[0], "sport"));
    for (i, rec) in recs.iter().enumerate() {
        assert_envelope(rec);
        for (key, value) in want.as_object().expect("object") {
            assert_eq!(rec.get(key), Some(value), "{key:?} of record {i}: {rec}");
        }
        assert_eq!(
            port_field(rec, "sport"),
            sport,
            "sport of record {i}: {rec}"
        );
        let cgroup = rec.get("cgroup");
        assert!(
            cgroup.is_some_and(|c| c.is_string() || c.is_null()),
            "cgroup of record {i}: {rec}"
        );
        assert_eq!(
            u64_field(rec, "conn_retrans"),
            i as u64 + 1,
            "conn_retrans of record {i}: {rec}"
        );
    }
}

/// The SYN_SENT scenario: agent on `retrans --port P <extra>`, then a client
/// connecting to P, which the server drops. Returns the `agent_start` line.
fn syn_sent(family: Family, extra: &[&str]) -> Value {
    let net = NetnsPair::new();
    let port = unique_port();
    net.drop_server_port(port);
    let (mut agent, start) = start_agent(&retrans_args(port, extra));
    let client = Peer::connect(PEER, &net.client, net.server.addr(family), port, None);
    // SYN retransmits come ~1 s and ~3 s after the connect.
    let recs = agent.wait_for_n("2 SYN retransmits", 2, WAIT, retrans_to(port));
    assert_conn_records(&recs, &Expected::syn(&net, family, port, &client));
    agent.stop_ok();
    start
}

#[test]
fn syn_sent_ipv4() {
    let start = syn_sent(Family::V4, &[]);
    // On this kernel `auto` must pick the ring buffer.
    assert_eq!(
        start["transport"], "ringbuf",
        "default transport in {start}"
    );
}

#[test]
fn syn_sent_ipv6() {
    syn_sent(Family::V6, &[]);
}

#[test]
fn perf_transport_gives_the_same_records() {
    // A global option after the subcommand, as the CLI allows.
    let start = syn_sent(Family::V4, &["--transport", "perf"]);
    assert_eq!(start["transport"], "perf", "transport in {start}");
}

/// The ESTABLISHED scenario: a client sending every 50 ms to a listener,
/// the agent started before the connection or only after it is established
/// (then it must find the socket's owner in /proc), then the server drops
/// the port so the client retransmits its data.
fn established(agent_before_connect: bool) {
    let net = NetnsPair::new();
    let port = unique_port();
    let _listener = Peer::listen(PEER, &net.server, net.server.v4, port);
    let args = retrans_args(port, &[]);
    let early = agent_before_connect.then(|| start_agent(&args).0);
    let client = Peer::connect(PEER, &net.client, net.server.v4, port, Some(SEND_EVERY_MS));
    let local = client.wait_connected();
    let mut agent = early.unwrap_or_else(|| start_agent(&args).0);
    net.drop_server_port(port);
    // RTO-driven: ~0.2 s, then doubling.
    let recs = agent.wait_for_n("2 data retransmits", 2, WAIT, retrans_to(port));
    assert_conn_records(&recs, &Expected::data(&net, port, &client, local.port()));
    agent.stop_ok();
}

#[test]
fn established_data_retransmits() {
    established(true);
}

#[test]
fn preexisting_connection_is_attributed() {
    established(false);
}

#[test]
fn pid_filter_keeps_only_that_process() {
    let net = NetnsPair::new();
    let port = unique_port();
    let _listener = Peer::listen(PEER, &net.server, net.server.v4, port);
    // The pids must be known before the agent starts, so the clients connect
    // first; established connections then retransmit quickly (RTO ~0.2 s,
    // doubling) once the port is dropped.
    let clients: Vec<Peer> = (0..2)
        .map(|_| Peer::connect(PEER, &net.client, net.server.v4, port, Some(SEND_EVERY_MS)))
        .collect();
    for client in &clients {
        client.wait_connected();
    }
    let (kept, filtered) = (clients[0].pid(), clients[1].pid());
    let mut args = vec!["--pid".to_owned(), kept.to_string()];
    args.extend(retrans_args(port, &[]));
    let (mut agent, _) = start_agent(&args);
    net.drop_server_port(port);
    agent.wait_for_n("2 retransmits of the kept pid", 2, WAIT, |r| {
        retrans_to(port)(r) && pid_of(r) == Some(kept.into())
    });
    // The other client retransmits just as often: give it the same time.
    thread::sleep(Duration::from_millis(1500));
    let recs = agent.stop_ok();
    let strays: Vec<&Value> = recs
        .iter()
        .filter(|r| record::is_type(r, "retrans") && pid_of(r) != Some(kept.into()))
        .collect();
    assert!(
        strays.is_empty(),
        "records not of pid {kept} (other client: {filtered}): {strays:?}"
    );
}

/// An agent filtered on an unused port: started, but with nothing to report.
fn idle_agent(extra: &[&str]) -> Agent {
    start_agent(&retrans_args(unique_port(), extra)).0
}

/// Checks an agent ended normally: exit 0, `agent_stats` as last line, and
/// its programs unloaded.
fn assert_clean_exit(agent: &Agent, status: std::process::ExitStatus, how: &str) {
    if status.code() != Some(0) {
        agent.fail(&format!("exit status {status} after {how}, expected 0"));
    }
    let recs = agent.records();
    if !recs
        .last()
        .is_some_and(|r| record::is_type(r, "agent_stats"))
    {
        agent.fail(&format!("last line after {how} is not agent_stats"));
    }
    recs.iter().for_each(assert_envelope);
    agent.assert_programs_released();
}

fn exits_cleanly_on(signal: libc::c_int, how: &str) {
    let mut agent = idle_agent(&[]);
    let (status, _) = agent.stop_with(signal);
    assert_clean_exit(&agent, status, how);
}

#[test]
fn sigint_exits_0() {
    exits_cleanly_on(libc::SIGINT, "SIGINT");
}

#[test]
fn sigterm_exits_0() {
    exits_cleanly_on(libc::SIGTERM, "SIGTERM");
}

#[test]
fn duration_exits_0() {
    let mut agent = idle_agent(&["--duration", "1"]);
    let status = agent.wait_exit(Duration::from_secs(3));
    assert_clean_exit(&agent, status, "--duration 1");
}

#[test]
fn closed_stdout_exits_0() {
    let net = NetnsPair::new();
    let port = unique_port();
    net.drop_server_port(port);
    let (mut agent, _) = start_agent(&retrans_args(port, &[]));
    let _client = Peer::connect(PEER, &net.client, net.server.v4, port, None);
    agent.wait_for("a first SYN retransmit", WAIT, retrans_to(port));
    agent.close_stdout();
    // The next SYN retransmit, ~2 s after the first, gives the agent a write
    // that fails even if it does not watch its stdout.
    let status = agent.wait_exit(Duration::from_secs(4));
    if status.code() != Some(0) {
        agent.fail(&format!(
            "exit status {status} after stdout closed, expected 0"
        ));
    }
    agent.assert_programs_released();
}

#[test]
fn sigkill_leaves_no_programs() {
    let mut agent = idle_agent(&[]);
    agent.stop_with(libc::SIGKILL);
    agent.assert_programs_released();
}

/// Runs the agent to its exit (it must not start) and returns its exit code
/// and stderr.
fn run_to_exit(args: &[&str], configure: impl FnOnce(&mut std::process::Command)) -> (i32, String) {
    let mut agent = Agent::spawn_with(args, configure);
    let status = agent.wait_exit(EXIT_TIMEOUT);
    let Some(code) = status.code() else {
        agent.fail(&format!("killed by a signal ({status}) instead of exiting"));
    };
    if !agent.records().is_empty() {
        agent.fail("printed records although it must not start");
    }
    (code, agent.stderr())
}

#[test]
fn usage_errors_exit_2() {
    let cases: &[&[&str]] = &[
        &["retrans", "--no-such-flag"],
        &["--no-such-flag", "retrans"],
        &["--pid", "0", "retrans"],
        &["retrans", "--pid", "abc"],
        &["-p", "abc", "retrans"],
    ];
    for args in cases {
        let (code, stderr) = run_to_exit(args, |_| {});
        assert_eq!(
            code,
            EXIT_USAGE,
            "`kdiag-agent {}`: stderr: {stderr}",
            args.join(" ")
        );
        assert!(
            !stderr.trim().is_empty(),
            "`kdiag-agent {}`: no message on stderr",
            args.join(" ")
        );
    }
}

#[test]
fn unprivileged_exits_77() {
    const NOBODY: u32 = 65534;
    let (code, stderr) = run_to_exit(&["retrans"], |cmd| {
        // std drops the supplementary groups too when root sets the uid.
        cmd.uid(NOBODY).gid(NOBODY);
    });
    assert_eq!(code, EXIT_NOPERM, "as uid {NOBODY}: stderr: {stderr}");
    assert!(
        stderr.contains("CAP_BPF"),
        "as uid {NOBODY}: stderr does not mention CAP_BPF: {stderr}"
    );
}
