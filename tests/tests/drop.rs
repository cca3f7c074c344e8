//! Acceptance tests of `kdiag-agent drop` against the real kernel: packets
//! dropped by nftables rules with counters of their own, and packets to
//! closed ports. Each test has its own namespaces and ports, and picks its
//! own packets out of the agent's output by their addresses and ports:
//! every agent sees every namespace's drops.

use std::net::IpAddr;
use std::time::Duration;

use kdiag_tests::agent::Agent;
use kdiag_tests::bpf::{kernel_gives_drop_reasons, kfree_skb_names_the_receiving_socket};
use kdiag_tests::env::{require_root, skip_unless};
use kdiag_tests::max_wait;
use kdiag_tests::netns::{Family, Netns, NetnsPair, unique_port};
use kdiag_tests::nft::{self, Hook};
use kdiag_tests::peer::{PEER_COMM, Peer};
use kdiag_tests::record::{self, assert_envelope, is_rfc3339_utc_nanos, u64_field};
use kdiag_tests::tcpstat::udp_rcvbuf_errors;
use kdiag_tests::text::Columns;
use serde_json::{Value, json};

const PEER: &str = env!("CARGO_BIN_EXE_kdiag-peer");

/// How long a test waits, once it has what it expects, for records that
/// should not come.
const SETTLE: Duration = Duration::from_millis(500);

/// The value of the drop reason `name` on this kernel, from the kernel's
/// own table in the tracepoint's format (its `__print_symbolic`), which
/// the agent does not read: the agent names reasons from BTF.
fn reason_code(name: &str) -> u64 {
    let path = "/sys/kernel/tracing/events/skb/kfree_skb/format";
    let format = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let entry = format!(", \"{name}\" }}");
    let before = &format[..format
        .find(&entry)
        .unwrap_or_else(|| panic!("no reason {name} in {path}"))];
    let code = &before[before.rfind("{ ").expect("a { before the entry") + 2..];
    code.parse()
        .unwrap_or_else(|e| panic!("reason {name}: {code:?}: {e}"))
}

/// Whether a test can go on: every test here checks reasons, which
/// kernels before 5.17 do not give (emulated guests of those skip by name).
fn kernel_has_reasons() -> bool {
    require_root();
    skip_unless(
        kernel_gives_drop_reasons(),
        "the kernel gives no drop reasons (skb/kfree_skb has no reason field before 5.17)",
    )
}

/// The agent running `drop` with `extra` options.
fn start_agent(extra: &[&str]) -> (Agent, Value) {
    let mut args = vec!["drop"];
    args.extend_from_slice(extra);
    let (agent, start) = Agent::start(&args, &["skb/kfree_skb"]);
    assert_eq!(
        record::degraded_why(&start, "tracepoint/skb/kfree_skb.reason"),
        None,
        "this kernel has drop reasons: {start}"
    );
    (agent, start)
}

/// Stops the agent, which must have lost no drop; returns its records.
fn stop_without_losses(agent: &mut Agent) -> Vec<Value> {
    let recs = agent.stop_ok();
    let totals = record::class_totals(&recs, "drop");
    assert_eq!(
        (totals.dropped, totals.lost, totals.failed),
        (0, 0, 0),
        "{totals:?}"
    );
    recs
}

/// The drop records of packets from `saddr` to `daddr`:`dport`.
fn drops_of(saddr: IpAddr, daddr: IpAddr, dport: u16) -> impl Fn(&Value) -> bool {
    move |rec| {
        record::is_type(rec, "drop")
            && rec["saddr"] == json!(saddr.to_string())
            && rec["daddr"] == json!(daddr.to_string())
            && rec["dport"] == json!(dport)
    }
}

/// The fields every drop record of one flow must have.
fn expected(
    family: Family,
    protocol: &str,
    (saddr, sport): (IpAddr, Option<u16>),
    (daddr, dport): (IpAddr, u16),
    reason: &str,
) -> serde_json::Map<String, Value> {
    let mut want = json!({
        "type": "drop",
        "protocol": protocol,
        "family": family.as_str(),
        "saddr": saddr.to_string(),
        "daddr": daddr.to_string(),
        "dport": dport,
        "reason": reason,
        "reason_code": reason_code(reason),
    });
    let want = want.as_object_mut().expect("object");
    if let Some(sport) = sport {
        want.insert("sport".into(), json!(sport));
    }
    want.clone()
}

/// `want` with the owner's `pid` and `comm`.
fn owned(
    mut want: serde_json::Map<String, Value>,
    (pid, comm): (Value, Value),
) -> serde_json::Map<String, Value> {
    want.insert("pid".into(), pid);
    want.insert("comm".into(), comm);
    want
}

/// Checks every record of `recs` against `want`, field by field.
fn check_all(recs: &[Value], want: &serde_json::Map<String, Value>) {
    for rec in recs {
        assert_envelope(rec);
        for (key, value) in want {
            assert_eq!(rec.get(key), Some(value), "{key} in {rec}");
        }
    }
}

/// Waits for `n` records matching `pred`, then for more that should not
/// come; returns them all.
fn exactly(agent: &Agent, what: &str, n: usize, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
    agent.wait_for_n(what, n, max_wait(), &pred);
    std::thread::sleep(SETTLE);
    let all: Vec<Value> = agent.records().into_iter().filter(|r| pred(r)).collect();
    assert_eq!(all.len(), n, "{what}: {all:?}");
    all
}

/// UDP datagrams dropped by a counted nftables rule on the server, over
/// IPv4 and IPv6: one NETFILTER_DROP record per datagram the rule's counter
/// counted, with the exact addresses and ports, and no owner (they are
/// dropped before any socket has them). The summary at exit counts them
/// too.
#[test]
fn netfilter_drops_match_the_rules_counter() {
    if !kernel_has_reasons() {
        return;
    }
    let net = NetnsPair::new();
    let port = unique_port();
    nft::drop_counted(&net.server.name, Hook::Input, &format!("udp dport {port}"));
    let (mut agent, _) = start_agent(&[]);
    let mut total = 0;
    for (family, count) in [(Family::V4, 7), (Family::V6, 5)] {
        let (saddr, daddr) = (net.client.addr(family), net.server.addr(family));
        let sport = Peer::send_udp(PEER, &net.client, daddr, port, count);
        let recs = exactly(
            &agent,
            "the datagrams' drops",
            count as usize,
            drops_of(saddr, daddr, port),
        );
        let want = expected(
            family,
            "udp",
            (saddr, Some(sport)),
            (daddr, port),
            "NETFILTER_DROP",
        );
        check_all(&recs, &want);
        for rec in &recs {
            assert!(rec["pid"].is_null() && rec["comm"].is_null(), "{rec}");
        }
        total += u64::from(count);
    }
    assert_eq!(nft::dropped_packets(&net.server.name, Hook::Input), total);

    let recs = stop_without_losses(&mut agent);
    let summarized: u64 = recs
        .iter()
        .filter(|r| {
            record::is_type(r, "drop_summary")
                && r["reason"] == "NETFILTER_DROP"
                && r["protocol"] == "udp"
        })
        .map(|r| u64_field(r, "count"))
        .sum();
    // Other namespaces' drops count there too.
    assert!(summarized >= total, "{summarized} < {total}: {recs:?}");
}

/// TCP SYNs a counted rule drops on their way out of the client: each is
/// a NETFILTER_DROP of the connecting socket, attributed to its owner.
/// The peer is stopped before the counter is read, so no SYN is in flight.
#[test]
fn dropped_syns_name_the_connecting_process() {
    if !kernel_has_reasons() {
        return;
    }
    let net = NetnsPair::new();
    let port = unique_port();
    nft::drop_counted(&net.client.name, Hook::Output, &format!("tcp dport {port}"));
    let (mut agent, _) = start_agent(&[]);
    let (saddr, daddr) = (net.client.addr(Family::V4), net.server.addr(Family::V4));
    let client = Peer::connect(PEER, &net.client, daddr, port, None);
    let pid = client.pid();
    let sport = net
        .client
        .wait_syn_sent_port(std::net::SocketAddr::new(daddr, port));
    // The first SYN and its first retransmit (about 1 s later).
    agent.wait_for_n(
        "two dropped SYNs",
        2,
        max_wait(),
        drops_of(saddr, daddr, port),
    );
    client.kill();
    let syns = nft::dropped_packets(&net.client.name, Hook::Output);
    let recs = exactly(
        &agent,
        "the dropped SYNs",
        syns as usize,
        drops_of(saddr, daddr, port),
    );
    let want = expected(
        Family::V4,
        "tcp",
        (saddr, Some(sport)),
        (daddr, port),
        "NETFILTER_DROP",
    );
    check_all(&recs, &owned(want, (json!(pid), json!(PEER_COMM))));
    agent.stop_ok();
}

/// Packets to ports nothing listens on: NO_SOCKET, for UDP datagrams and
/// for a TCP SYN (the kernel answers it with a reset and drops it).
#[test]
fn closed_ports_drop_with_no_socket() {
    if !kernel_has_reasons() {
        return;
    }
    let net = NetnsPair::new();
    let (udp_port, tcp_port) = (unique_port(), unique_port());
    let (saddr, daddr) = (net.client.addr(Family::V4), net.server.addr(Family::V4));
    let (agent, _) = start_agent(&[]);

    let sport = Peer::send_udp(PEER, &net.client, daddr, udp_port, 3);
    let recs = exactly(
        &agent,
        "the datagrams' drops",
        3,
        drops_of(saddr, daddr, udp_port),
    );
    check_all(
        &recs,
        &expected(
            Family::V4,
            "udp",
            (saddr, Some(sport)),
            (daddr, udp_port),
            "NO_SOCKET",
        ),
    );

    // The connect is refused at once: one SYN, one drop, no owner on the
    // receiving side (no socket).
    let client = Peer::connect(PEER, &net.client, daddr, tcp_port, None);
    let recs = exactly(
        &agent,
        "the SYN's drop",
        1,
        drops_of(saddr, daddr, tcp_port),
    );
    check_all(
        &recs,
        &expected(
            Family::V4,
            "tcp",
            (saddr, None),
            (daddr, tcp_port),
            "NO_SOCKET",
        ),
    );
    assert!(recs[0]["pid"].is_null(), "{}", recs[0]);
    drop(client);
}

/// Datagrams sent at a receiver that never reads.
const FLOOD: u32 = 200;

/// A UDP receiver in the server namespace that never reads, with the
/// smallest receive buffer (SO_RCVBUF 1 is raised to the kernel's minimum,
/// room for a few datagrams), flooded with [`FLOOD`] datagrams from the
/// client once `started` ran (the agent, started after the receiver so
/// that it notes the receiver's socket). Returns the receiver, the
/// sender's port and how many datagrams the kernel counted as dropped for
/// the full buffer: `Udp: RcvbufErrors` of the server namespace, which
/// nothing else there adds to.
fn flood_a_full_udp_receiver(
    net: &NetnsPair,
    port: u16,
    started: impl FnOnce(),
) -> (Peer, u16, u64) {
    let sink = Peer::udp_sink(PEER, &net.server, net.server.v4, port, 1);
    let before = udp_rcvbuf_errors(Netns::from(&net.server));
    started();
    let sport = Peer::send_udp(PEER, &net.client, net.server.v4, port, FLOOD);
    // veth delivers in the sender's own softirq, before its send returns:
    // nothing is in flight once the sender has exited.
    let dropped = udp_rcvbuf_errors(Netns::from(&net.server)) - before;
    assert!(
        dropped > 0 && dropped <= u64::from(FLOOD),
        "{dropped} of {FLOOD} datagrams dropped for a full receive buffer"
    );
    eprintln!("{dropped} of {FLOOD} datagrams dropped for a full receive buffer");
    (sink, sport, dropped)
}

/// The receiver's pid and comm as its drops must show them: its own where
/// the tracepoint names the receiving socket (6.11 on), else none.
fn sink_owner(sink: &Peer) -> (Value, Value) {
    if kfree_skb_names_the_receiving_socket() {
        (json!(sink.pid()), json!(PEER_COMM))
    } else {
        (Value::Null, Value::Null)
    }
}

/// Datagrams at a UDP receiver whose receive buffer is full: each is a
/// SOCKET_RCVBUFF drop (net/ipv4/udp.c, __udp_queue_rcv_skb, which counts
/// it in `Udp: RcvbufErrors` beside), exactly as many as that counter
/// grew by, each with the datagram's ends and the receiving process,
/// which held the socket when the agent started.
#[test]
fn full_udp_receive_buffer_drops_name_the_receiver() {
    if !kernel_has_reasons() {
        return;
    }
    let net = NetnsPair::new();
    let port = unique_port();
    let mut agent = None;
    let (sink, sport, dropped) = flood_a_full_udp_receiver(&net, port, || {
        agent = Some(start_agent(&[]).0);
    });
    let mut agent = agent.expect("started");
    let (saddr, daddr) = (net.client.addr(Family::V4), net.server.addr(Family::V4));
    let recs = exactly(
        &agent,
        "the datagrams dropped for a full buffer",
        dropped as usize,
        drops_of(saddr, daddr, port),
    );
    let want = expected(
        Family::V4,
        "udp",
        (saddr, Some(sport)),
        (daddr, port),
        "SOCKET_RCVBUFF",
    );
    check_all(&recs, &owned(want, sink_owner(&sink)));
    stop_without_losses(&mut agent);
}

/// `-o text`: a row per drop under one header, with the owner, the
/// protocol, the packet's ends and the reason in their columns (the
/// receiver of `full_udp_receive_buffer_drops_name_the_receiver`).
#[test]
fn text_output_shows_the_drop_reason_and_owner() {
    if !kernel_has_reasons() {
        return;
    }
    let net = NetnsPair::new();
    let port = unique_port();
    let mut agent = None;
    let (sink, sport, dropped) = flood_a_full_udp_receiver(&net, port, || {
        let mut a = Agent::spawn(&["-o", "text", "drop"]);
        let first = a.wait_start_text();
        assert!(first.contains("skb/kfree_skb"), "not attached: {first}");
        agent = Some(a);
    });
    let mut agent = agent.expect("started");
    let source = format!("{}:{sport}", net.client.v4);
    let dest = format!("{}:{port}", net.server.v4);
    let ours = |l: &str| {
        let words: Vec<&str> = l.split_whitespace().collect();
        words.contains(&source.as_str()) && words.contains(&dest.as_str())
    };
    agent.wait_for_lines("the drops' rows", dropped as usize, max_wait(), ours);
    let lines = agent.stop_text_ok();
    let columns = Columns::find(&lines, "REASON");
    let rows: Vec<&String> = lines.iter().filter(|l| ours(l)).collect();
    assert_eq!(rows.len() as u64, dropped, "{lines:#?}");
    let (pid, comm) = sink_owner(&sink);
    // As the text shows a value: `-` for null.
    let shown = |v: &Value| match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    for row in rows {
        let cell = |name| columns.cell(row, name);
        assert!(is_rfc3339_utc_nanos(cell("TIME")), "{row}");
        assert_eq!(cell("PID"), shown(&pid), "{row}");
        assert_eq!(cell("COMM"), shown(&comm), "{row}");
        assert_eq!(cell("PROTO"), "udp", "{row}");
        assert_eq!(cell("SADDR:SPORT"), source, "{row}");
        assert_eq!(cell("DADDR:DPORT"), dest, "{row}");
        assert_eq!(cell("REASON"), "SOCKET_RCVBUFF", "{row}");
    }
}
