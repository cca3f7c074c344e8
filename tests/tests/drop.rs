//! Acceptance tests of `kdiag-agent drop` against the real kernel: packets
//! dropped by nftables rules with counters of their own, and packets to
//! closed ports. Each test has its own namespaces and ports, and picks its
//! own packets out of the agent's output by their addresses and ports:
//! every agent sees every namespace's drops.

use std::net::IpAddr;
use std::time::Duration;

use kdiag_tests::agent::Agent;
use kdiag_tests::bpf::kernel_gives_drop_reasons;
use kdiag_tests::env::{require_root, skip_unless};
use kdiag_tests::max_wait;
use kdiag_tests::netns::{Family, NetnsPair, unique_port};
use kdiag_tests::nft::{self, Hook};
use kdiag_tests::peer::{PEER_COMM, Peer};
use kdiag_tests::record::{self, assert_envelope, u64_field};
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
/// counted, with the exact addresses and ports, and no owner (UDP sockets'
/// owners are not followed). The summary at exit counts them too.
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

    let recs = agent.stop_ok();
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
    let totals = record::class_totals(&recs, "drop");
    assert_eq!((totals.dropped, totals.lost, totals.failed), (0, 0, 0));
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
    let mut want = expected(
        Family::V4,
        "tcp",
        (saddr, Some(sport)),
        (daddr, port),
        "NETFILTER_DROP",
    );
    want.insert("pid".into(), json!(pid));
    want.insert("comm".into(), json!(PEER_COMM));
    check_all(&recs, &want);
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
