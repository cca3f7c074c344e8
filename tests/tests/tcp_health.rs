//! Acceptance tests of the socket state the TCP records carry: the sender's
//! state on `retrans`, the totals and sender-limit chronographs on
//! `tcp_conn`. Each test has its own namespaces and port and filters the
//! agent on that port.

use std::path::PathBuf;

use kdiag_tests::agent::Agent;
use kdiag_tests::max_wait;
use kdiag_tests::netns::{NetnsPair, unique_port};
use kdiag_tests::peer::{ListenOptions, Peer};
use kdiag_tests::record::{self, class_totals, port_field, u64_field};
use kdiag_tests::text::Columns;
use serde_json::Value;

const PEER: &str = env!("CARGO_BIN_EXE_kdiag-peer");

/// The tracepoint the `tcp` class needs.
const SET_STATE: &str = "sock/inet_sock_set_state";

/// Removes the file at its path when dropped, even when the test fails.
struct GoFile(PathBuf);

impl Drop for GoFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `kdiag-agent CLASS --port PORT`, started once `needs` is attached, then
/// the client `kdiag-peer MODE SERVER_ADDR PORT ARGS…` in the client's
/// namespace.
fn agent_then_client(
    class: &str,
    needs: &str,
    net: &NetnsPair,
    port: u16,
    mode: &str,
    args: &[String],
) -> (Agent, Peer) {
    let port_arg = port.to_string();
    let (agent, _) = Agent::start(&[class, "--port", &port_arg], &[needs]);
    let mut all = vec![net.server.v4.to_string(), port_arg];
    all.extend(args.iter().cloned());
    (agent, Peer::run(PEER, &net.client, mode, &all))
}

/// `key=N` of a peer's `info` line.
fn info_value(info: &str, key: &str) -> u64 {
    info.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in peer info {info:?}"))
}

/// The `tcp_conn` of the connection whose local port is `sport`.
fn conn_from(sport: u16) -> impl Fn(&Value) -> bool {
    move |r| {
        record::is_type(r, "tcp_conn")
            && r.get("sport").and_then(Value::as_u64) == Some(sport.into())
    }
}

/// Retransmits of an established connection whose server stopped
/// acknowledging: each carries the sender's RTT estimate exactly as the
/// socket's own TCP_INFO gave it just before (no ACK arrives after, so no
/// sample changes it), a congestion window, and the kernel's retransmit
/// count.
#[test]
fn retransmits_carry_the_senders_state() {
    let net = NetnsPair::new();
    let port = unique_port();
    let _listener = Peer::listen(PEER, &net.server, net.server.v4, port);
    let go =
        GoFile(std::env::temp_dir().join(format!("kdiag-test-go-{}-{port}", std::process::id())));
    let (mut agent, client) = agent_then_client(
        "retrans",
        "tcp/tcp_retransmit_skb",
        &net,
        port,
        "probe",
        &[go.0.display().to_string()],
    );
    let local = client.wait_connected();
    client.wait_for_line("acknowledged");
    net.drop_server_port(port);
    std::fs::write(&go.0, b"").unwrap_or_else(|e| panic!("{}: {e}", go.0.display()));
    let info = client.wait_for_line("info ");
    let (srtt, rttvar) = (info_value(&info, "srtt_us"), info_value(&info, "rttvar_us"));
    assert_eq!(
        info_value(&info, "total_retrans"),
        0,
        "before the drop: {info}"
    );
    assert!(srtt > 0, "no RTT sample before the drop: {info}");
    let recs = agent.wait_for_n("3 data retransmits", 3, max_wait(), |r| {
        record::is_type(r, "retrans") && port_field(r, "sport") == local.port()
    });
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r["kind"], "data", "{r}");
        assert_eq!(
            u64_field(r, "srtt_us"),
            srtt,
            "srtt_us of record {i} vs TCP_INFO {info}: {r}"
        );
        assert_eq!(
            u64_field(r, "rttvar_us"),
            rttvar,
            "rttvar_us of record {i} vs TCP_INFO {info}: {r}"
        );
        assert!(u64_field(r, "cwnd") >= 1, "{r}");
        assert!(u64_field(r, "ssthresh") >= 1, "{r}");
        assert!(
            u64_field(r, "packets_out") >= 1,
            "unacknowledged data in {r}"
        );
        assert!(
            u64_field(r, "retrans_out") <= u64_field(r, "packets_out"),
            "{r}"
        );
        u64_field(r, "lost_out");
        // The kernel's count, this retransmit included or not depending
        // on whether this kernel counts it before the tracepoint fires
        // (6.18 does): the same for every record.
        let counted_before = u64_field(r, "conn_retrans") - u64_field(r, "total_retrans");
        assert!(counted_before <= 1, "total_retrans of record {i}: {r}");
        assert_eq!(
            counted_before,
            u64_field(&recs[0], "conn_retrans") - u64_field(&recs[0], "total_retrans"),
            "total_retrans of record {i} vs record 0: {r}"
        );
    }
    let recs = agent.stop_ok();
    assert_eq!(
        class_totals(&recs, "retrans").partial,
        0,
        "socket reads failed"
    );
}

/// What the stalled client writes, and how long it waits before it resets.
const STALL_BYTES: u64 = 256 * 1024;
const STALL_MS: u64 = 600;

/// A server that never reads, with a small receive buffer, in `net`'s
/// server namespace.
fn stalled_receiver(net: &NetnsPair, port: u16) -> Peer {
    Peer::listen_with(
        PEER,
        &net.server,
        net.server.v4,
        port,
        &ListenOptions {
            hold: true,
            rcvbuf: Some(4096),
            ..ListenOptions::default()
        },
    )
}

/// `kdiag-peer stall` at [`stalled_receiver`]'s port.
fn stall_args() -> [String; 2] {
    [STALL_BYTES.to_string(), STALL_MS.to_string()]
}

/// A server that never reads, with a small receive buffer: the client's
/// data waits on its receive window for the whole stall, and the client's
/// `tcp_conn` says the receiver limited it.
#[test]
fn tcp_conn_of_a_stalled_receiver_is_receiver_limited() {
    let net = NetnsPair::new();
    let port = unique_port();
    let _listener = stalled_receiver(&net, port);
    let (mut agent, client) =
        agent_then_client("tcp", SET_STATE, &net, port, "stall", &stall_args());
    let local = client.wait_connected();
    let conn = agent.wait_for("the client's tcp_conn", max_wait(), conn_from(local.port()));
    assert_eq!(conn["role"], "active", "{conn}");
    assert_eq!(conn["limited_by"], "receiver", "{conn}");
    let rwnd = u64_field(&conn, "rwnd_limited_ns");
    // Most of the stall, whatever the tick: the window filled within
    // milliseconds of the writes.
    assert!(
        rwnd >= STALL_MS * 1_000_000 / 2,
        "rwnd_limited_ns {rwnd} for a {STALL_MS} ms stall: {conn}"
    );
    // The chronographs count whole kernel ticks (4 ms at HZ=250, 10 ms at
    // HZ=100): the tick in which the stall began counts whole.
    const TICK_NS_MAX: u64 = 10_000_000;
    assert!(
        rwnd <= u64_field(&conn, "duration_ns") + TICK_NS_MAX,
        "rwnd_limited_ns past the connection's life by more than a tick: {conn}"
    );
    assert!(
        u64_field(&conn, "busy_ns") >= rwnd,
        "busy includes rwnd-limited time: {conn}"
    );
    assert!(u64_field(&conn, "sndbuf_limited_ns") < rwnd, "{conn}");
    // The receiver took a receive buffer's worth at most, and the SYN.
    let acked = u64_field(&conn, "bytes_acked");
    assert!(
        (1..STALL_BYTES / 2).contains(&acked),
        "bytes_acked {acked} of {STALL_BYTES}: {conn}"
    );
    let recs = agent.stop_ok();
    assert_eq!(class_totals(&recs, "tcp").partial, 0, "socket reads failed");
}

/// A bulk transfer closed by both sides: the sender's `tcp_conn` counts
/// exactly the bytes acknowledged, the receiver's exactly the bytes
/// received. As tcp_info counts them: sequence numbers, so the active
/// opener's SYN and each side's FIN count one each.
#[test]
fn tcp_conn_counts_the_bytes_of_a_bulk_transfer() {
    const BYTES: u64 = 3_000_000;
    let net = NetnsPair::new();
    let port = unique_port();
    let _listener = Peer::listen(PEER, &net.server, net.server.v4, port);
    let (mut agent, client) =
        agent_then_client("tcp", SET_STATE, &net, port, "send", &[BYTES.to_string()]);
    let local = client.wait_connected();
    let sender = agent.wait_for("the client's tcp_conn", max_wait(), conn_from(local.port()));
    let receiver = agent.wait_for("the server's tcp_conn", max_wait(), |r| {
        record::is_type(r, "tcp_conn")
            && r.get("dport").and_then(Value::as_u64) == Some(local.port().into())
    });
    assert_eq!(sender["role"], "active", "{sender}");
    assert_eq!(receiver["role"], "passive", "{receiver}");
    // Data, SYN and FIN acknowledged; the server's FIN received.
    assert_eq!(u64_field(&sender, "bytes_acked"), BYTES + 2, "{sender}");
    assert_eq!(u64_field(&sender, "bytes_received"), 1, "{sender}");
    // Data and FIN received; the server's FIN acknowledged.
    assert_eq!(
        u64_field(&receiver, "bytes_received"),
        BYTES + 1,
        "{receiver}"
    );
    assert_eq!(u64_field(&receiver, "bytes_acked"), 1, "{receiver}");
    for r in [&sender, &receiver] {
        let (srtt, min_rtt) = (u64_field(r, "srtt_us"), u64_field(r, "min_rtt_us"));
        assert!(
            min_rtt > 0 && min_rtt <= srtt + 1,
            "min_rtt_us {min_rtt} vs srtt_us {srtt}: {r}"
        );
        assert!(
            u64_field(r, "segs_out") > 0 && u64_field(r, "segs_in") > 0,
            "{r}"
        );
        let busy = u64_field(r, "busy_ns");
        assert!(
            u64_field(r, "rwnd_limited_ns") + u64_field(r, "sndbuf_limited_ns") <= busy,
            "{r}"
        );
    }
    // At least one segment per 64 KiB written; the receiver sent ACKs.
    assert!(u64_field(&sender, "segs_out") >= BYTES / 65536, "{sender}");
    assert!(u64_field(&receiver, "segs_out") >= 1, "{receiver}");
    // The receiver sent no data, only its FIN: nothing limited it.
    assert!(receiver["limited_by"].is_null(), "{receiver}");
    let recs = agent.stop_ok();
    assert_eq!(class_totals(&recs, "tcp").partial, 0, "socket reads failed");
}

/// `-o text`: the stalled client's `tcp_conn` row shows its role, its RTT
/// and what limited it, in the columns its header names.
#[test]
fn text_output_shows_what_limited_a_connection() {
    let net = NetnsPair::new();
    let port = unique_port();
    let _listener = stalled_receiver(&net, port);
    let port_arg = port.to_string();
    let mut agent = Agent::spawn(&["-o", "text", "tcp", "--port", &port_arg]);
    let first = agent.wait_start_text();
    assert!(first.contains(SET_STATE), "not attached: {first}");
    let mut args = vec![net.server.v4.to_string(), port_arg];
    args.extend(stall_args());
    let client = Peer::run(PEER, &net.client, "stall", &args);
    let local = client.wait_connected().to_string();
    // TIME PID COMM LADDR:LPORT RADDR:RPORT, then ROLE: a tcp_conn row (a
    // state change's row has a state there).
    let is_conn = |l: &str| {
        let words: Vec<&str> = l.split_whitespace().collect();
        words.get(3) == Some(&local.as_str()) && words.get(5) == Some(&"active")
    };
    agent.wait_for_lines("the client's tcp_conn row", 1, max_wait(), is_conn);
    let lines = agent.stop_text_ok();
    let columns = Columns::find(&lines, "LIMITED_BY");
    let rows: Vec<&String> = lines.iter().filter(|l| is_conn(l)).collect();
    assert_eq!(rows.len(), 1, "{lines:#?}");
    let row = rows[0];
    let cell = |name| columns.cell(row, name);
    assert_eq!(cell("PID"), client.pid().to_string(), "{row}");
    assert_eq!(cell("LIMITED_BY"), "receiver", "{row}");
    // An RTT was sampled on the handshake and the first segments.
    let srtt_ms: f64 = cell("SRTT_MS")
        .parse()
        .unwrap_or_else(|e| panic!("SRTT_MS ({e}): {row}"));
    assert!(srtt_ms > 0.0, "{row}");
}
