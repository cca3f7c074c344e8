//! The kernel's own TCP counters, to hold the agent's numbers against:
//! /proc/net/snmp of the tests' namespace and `ss -ti` per socket.

use std::net::SocketAddr;

use crate::cmd;
use crate::netns::Netns;

/// `Tcp: RetransSegs` and `OutSegs` of /proc/net/snmp, which counts the
/// network namespace of the reading process: here the root namespace.
pub fn snmp_segments() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/net/snmp").expect("reading /proc/net/snmp");
    (
        snmp_counter(&text, "Tcp", "RetransSegs"),
        snmp_counter(&text, "Tcp", "OutSegs"),
    )
}

/// `Tcp: ActiveOpens` plus `PassiveOpens` of the network namespace of
/// `pid` (its /proc/PID/net/snmp): the connection ends opened there.
pub fn tcp_opens_of(pid: u32) -> u64 {
    let path = format!("/proc/{pid}/net/snmp");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    snmp_counter(&text, "Tcp", "ActiveOpens") + snmp_counter(&text, "Tcp", "PassiveOpens")
}

/// `Udp: RcvbufErrors` of `ns`'s /proc/net/snmp: datagrams dropped for a
/// full socket receive buffer (net/ipv4/udp.c, __udp_queue_rcv_skb). UDP
/// over IPv6 counts them in /proc/net/snmp6 instead.
pub fn udp_rcvbuf_errors(ns: Netns) -> u64 {
    let out = cmd::output(&mut ns.command("cat", &["/proc/net/snmp"]));
    assert!(
        out.status.success(),
        "/proc/net/snmp in netns {}: {}",
        ns.name(),
        String::from_utf8_lossy(&out.stderr)
    );
    snmp_counter(&String::from_utf8_lossy(&out.stdout), "Udp", "RcvbufErrors")
}

/// The counter `name` of `proto`'s pair of lines (names, then values) in
/// /proc/net/snmp's `text`.
fn snmp_counter(text: &str, proto: &str, name: &str) -> u64 {
    let prefix = format!("{proto}:");
    let mut lines = text.lines().filter(|l| l.starts_with(&prefix));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        panic!("no {prefix} lines in /proc/net/snmp: {text}");
    };
    names
        .split_whitespace()
        .position(|n| n == name)
        .and_then(|i| values.split_whitespace().nth(i)?.parse().ok())
        .unwrap_or_else(|| panic!("no {proto} {name} in /proc/net/snmp: {text}"))
}

/// `retrans:OUTSTANDING/TOTAL` of one socket as `ss -ti` shows it
/// (tcpi_retrans, tcpi_total_retrans: retransmitted segments not yet
/// acknowledged, and all retransmitted segments), or None when the socket
/// `local` -> `remote` is gone. (0, 0) when it never retransmitted (ss then
/// prints no `retrans:` field).
pub fn socket_retrans(ns: Netns, local: SocketAddr, remote: SocketAddr) -> Option<(u32, u32)> {
    let (src, dst) = (local.to_string(), remote.to_string());
    let out = cmd::output(&mut ns.command("ss", &["-tinH", "src", &src, "dst", &dst]));
    assert!(
        out.status.success(),
        "ss in netns {}: {}",
        ns.name(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return None;
    }
    let Some(field) = text
        .split_whitespace()
        .find_map(|t| t.strip_prefix("retrans:"))
    else {
        return Some((0, 0));
    };
    let parsed = field
        .split_once('/')
        .and_then(|(now, total)| Some((now.parse().ok()?, total.parse().ok()?)));
    Some(parsed.unwrap_or_else(|| panic!("bad retrans field in ss output: {text}")))
}
