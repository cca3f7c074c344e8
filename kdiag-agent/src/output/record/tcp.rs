//! TCP records: retransmits, state changes, connections, summaries.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use kdiag_common::tcp::{AF_INET6, TcpTuple};
use serde::Serialize;

use super::ResolvedOwner;
use super::{Marked, Record, ms, opt, printable};

/// A connection's two ends, local first.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub(crate) struct Endpoints {
    pub family: &'static str,
    #[serde(serialize_with = "ip_text")]
    pub saddr: IpAddr,
    pub sport: u16,
    #[serde(serialize_with = "ip_text")]
    pub daddr: IpAddr,
    pub dport: u16,
}

/// Serializes an address as its text, formatted on the stack. Two go into
/// every connection record, so IPv4 addresses are formatted by hand rather
/// than through `Display` (docs/BENCHMARKS.md has its share of the agent's
/// time per record).
fn ip_text<S: serde::Serializer>(addr: &IpAddr, serializer: S) -> Result<S::Ok, S::Error> {
    let mut text = AddrText {
        buf: [0; 45],
        len: 0,
    };
    match addr {
        IpAddr::V4(v4) => text.push_v4(v4),
        // Cannot fail: the buffer holds the longest IPv6 text.
        IpAddr::V6(v6) => write!(text, "{v6}").unwrap_or(()),
    }
    serializer.serialize_str(text.as_str())
}

/// Room for the text of any address: the longest is an IPv4-mapped IPv6
/// address, `ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255`, 45 bytes.
struct AddrText {
    buf: [u8; 45],
    len: usize,
}

impl AddrText {
    fn push_v4(&mut self, addr: &Ipv4Addr) {
        for (i, octet) in addr.octets().into_iter().enumerate() {
            if i > 0 {
                self.push(b'.');
            }
            if octet >= 100 {
                self.push(b'0' + octet / 100);
            }
            if octet >= 10 {
                self.push(b'0' + octet / 10 % 10);
            }
            self.push(b'0' + octet % 10);
        }
    }

    fn push(&mut self, byte: u8) {
        self.buf[self.len] = byte;
        self.len += 1;
    }

    fn as_str(&self) -> &str {
        // Only ASCII digits, dots and `Display`'s output go in.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

impl std::fmt::Write for AddrText {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        self.buf
            .get_mut(self.len..end)
            .ok_or(std::fmt::Error)?
            .copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

impl Endpoints {
    pub(crate) fn new(t: &TcpTuple) -> Self {
        let v6 = t.family == AF_INET6;
        Self {
            family: if v6 { "ipv6" } else { "ipv4" },
            saddr: ip_addr(v6, &t.saddr),
            sport: t.sport,
            daddr: ip_addr(v6, &t.daddr),
            dport: t.dport,
        }
    }

    /// `LADDR:LPORT RADDR:RPORT` columns.
    pub(super) fn text(&self) -> String {
        format!(
            "{:<47} {:<47}",
            endpoint(&self.saddr, self.sport),
            endpoint(&self.daddr, self.dport)
        )
    }
}

/// `PID COMM` columns.
pub(super) fn owner_text(o: &ResolvedOwner) -> String {
    format!(
        "{:<7} {:<16}",
        opt(o.pid),
        printable(o.comm.as_deref().unwrap_or("-"))
    )
}

/// The text header of a connection record: time, owner and ends, then the
/// record's own columns.
macro_rules! conn_header {
    ($tail:literal) => {
        concat!(
            "TIME                           PID     COMM             ",
            "LADDR:LPORT                                     RADDR:RPORT                                    ",
            $tail
        )
    };
}

/// The sender's state read from the socket at a retransmit, in the units
/// `tcp_info` reports; null where the kernel lacks a field or the read
/// failed.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub(crate) struct SenderState {
    pub srtt_us: Option<u64>,
    pub rttvar_us: Option<u64>,
    pub cwnd: Option<u64>,
    pub ssthresh: Option<u64>,
    pub packets_out: Option<u64>,
    pub lost_out: Option<u64>,
    pub retrans_out: Option<u64>,
    pub total_retrans: Option<u64>,
}

/// One TCP retransmit.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub(crate) struct Retrans {
    #[serde(flatten)]
    pub owner: ResolvedOwner,
    #[serde(flatten)]
    pub conn: Endpoints,
    pub state: &'static str,
    pub kind: &'static str,
    pub conn_retrans: u32,
    #[serde(flatten)]
    pub sender: SenderState,
}

impl Record for Retrans {
    const TYPE: &'static str = "retrans";
    const TEXT_HEADER: &'static str =
        conn_header!(" STATE        KIND    N     SRTT_MS  CWND  SSTHRESH");
    fn text_row(&self, ts: &str) -> String {
        format!(
            "{ts:<30} {} {} {:<12} {:<7} {:<5} {:<8} {:<5} {}",
            owner_text(&self.owner),
            self.conn.text(),
            self.state,
            self.kind,
            self.conn_retrans,
            ms(self.sender.srtt_us.map(|us| us * 1000)),
            opt(self.sender.cwnd),
            opt(self.sender.ssthresh)
        )
    }
}

/// One TCP state change.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub(crate) struct TcpState {
    #[serde(flatten)]
    pub owner: ResolvedOwner,
    #[serde(flatten)]
    pub conn: Endpoints,
    pub old_state: &'static str,
    pub new_state: &'static str,
    pub old_state_ns: Option<u64>,
}

impl Record for TcpState {
    const TYPE: &'static str = "tcp_state";
    const TEXT_HEADER: &'static str = conn_header!(" OLDSTATE     -> NEWSTATE     MS");
    fn text_row(&self, ts: &str) -> String {
        format!(
            "{ts:<30} {} {} {:<12} -> {:<12} {}",
            owner_text(&self.owner),
            self.conn.text(),
            self.old_state,
            self.new_state,
            ms(self.old_state_ns)
        )
    }
}

/// A closed connection's totals read from its socket, in the units
/// `tcp_info` reports; null where the kernel lacks a field or the read
/// failed.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub(crate) struct ConnHealth {
    pub srtt_us: Option<u64>,
    pub min_rtt_us: Option<u64>,
    pub bytes_acked: Option<u64>,
    pub bytes_received: Option<u64>,
    pub segs_out: Option<u64>,
    pub segs_in: Option<u64>,
    pub busy_ns: Option<u64>,
    pub rwnd_limited_ns: Option<u64>,
    pub sndbuf_limited_ns: Option<u64>,
    pub limited_by: Option<&'static str>,
}

/// A connection's life, written when it closes.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub(crate) struct TcpConn {
    #[serde(flatten)]
    pub owner: ResolvedOwner,
    #[serde(flatten)]
    pub conn: Endpoints,
    pub role: Option<&'static str>,
    pub duration_ns: Option<u64>,
    pub handshake_ns: Option<u64>,
    pub retrans: u32,
    pub state_ns: BTreeMap<&'static str, u64>,
    /// `"seen"`: its change to CLOSE was seen. `"inferred"`: the kernel
    /// skipped that change (and maybe others before it), and the close is
    /// known from the socket's destruction: the time since the last change
    /// seen is counted in the state that change entered.
    pub close: &'static str,
    #[serde(flatten)]
    pub health: ConnHealth,
}

impl Record for TcpConn {
    const TYPE: &'static str = "tcp_conn";
    const TEXT_HEADER: &'static str =
        conn_header!(" ROLE     DUR_MS     HS_MS      RETRANS SRTT_MS  LIMITED_BY");
    fn text_row(&self, ts: &str) -> String {
        format!(
            "{ts:<30} {} {} {:<8} {:<10} {:<10} {:<7} {:<8} {}",
            owner_text(&self.owner),
            self.conn.text(),
            self.role.unwrap_or("-"),
            ms(self.duration_ns),
            ms(self.handshake_ns),
            self.retrans,
            ms(self.health.srtt_us.map(|us| us * 1000)),
            self.health.limited_by.unwrap_or("-")
        )
    }
}

/// A connection among the interval's most retransmitting ones.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub(crate) struct TopConn {
    #[serde(flatten)]
    pub owner: ResolvedOwner,
    #[serde(flatten)]
    pub conn: Endpoints,
    pub retrans: u64,
}

/// The interval's TCP retransmit picture, beside the kernel's counters.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct TcpSummary {
    /// Retransmit calls kdiag saw (all ports and families it watches).
    pub retrans: u64,
    /// `Tcp: RetransSegs` and `OutSegs` deltas of /proc/net/snmp (the agent's
    /// network namespace), null when unreadable.
    pub retrans_segs: Option<u64>,
    pub out_segs: Option<u64>,
    /// retrans_segs / out_segs, the dashboards' retransmit rate.
    pub retrans_ratio: Option<f64>,
    pub top: Vec<TopConn>,
    /// Retransmit calls of connections the interval's per-connection count
    /// had no room for: `top` may lack a connection among them.
    pub retrans_untracked: u64,
    /// Connections whose life is being followed, and those dropped from the
    /// table because it was full (their tcp_conn will not be written).
    pub conns_tracked: u64,
    pub conns_evicted: u64,
    /// Changes that left another state than the one their socket's
    /// previous change seen entered: at least one change went missing
    /// between the two.
    pub sequence_gaps: u64,
    /// Connections followed that the kernel programs' socket map
    /// (`--max-sockets`) had forgotten: their later records lack the
    /// kernel's owner and state times.
    pub socks_evicted: u64,
    pub interval_ns: u64,
}

impl Record for TcpSummary {
    const TYPE: &'static str = "tcp_summary";
    const MARKED: Marked = Marked::Step;
    const TEXT_HEADER: &'static str = "";
    fn text_row(&self, ts: &str) -> String {
        format!(
            "# {ts} tcp over {:.1}s: {} retransmits seen; RetransSegs {} / OutSegs {} = {}; {} connections tracked, {} evicted",
            self.interval_ns as f64 / 1e9,
            self.retrans,
            opt(self.retrans_segs),
            opt(self.out_segs),
            self.retrans_ratio
                .map_or_else(|| "-".to_owned(), |r| format!("{:.3}%", r * 100.0)),
            self.conns_tracked,
            self.conns_evicted
        )
    }
}

/// `addr:port`, with IPv6 addresses in brackets.
fn endpoint(addr: &IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(*addr, port).to_string()
}

/// A TCP address as the kernel programs report it: IPv4 in the first four
/// bytes.
fn ip_addr(family_v6: bool, addr: &[u8; 16]) -> IpAddr {
    if family_v6 {
        IpAddr::V6(Ipv6Addr::from(*addr))
    } else {
        IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]))
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use proptest::prelude::*;

    use super::*;

    /// The JSON string `ip_text` writes for `addr`.
    fn json(addr: IpAddr) -> String {
        let mut out = Vec::new();
        ip_text(&addr, &mut serde_json::Serializer::new(&mut out)).unwrap();
        String::from_utf8(out).unwrap()
    }

    proptest! {
        #[test]
        fn ipv4_text_is_display(octets: [u8; 4]) {
            let addr = IpAddr::V4(Ipv4Addr::from(octets));
            prop_assert_eq!(json(addr), format!("\"{addr}\""));
        }

        #[test]
        fn ipv6_text_is_display(segments: [u16; 8]) {
            let addr = IpAddr::V6(Ipv6Addr::from(segments));
            prop_assert_eq!(json(addr), format!("\"{addr}\""));
        }
    }

    #[test]
    fn longest_addresses_fit() {
        for text in [
            "0.0.0.0",
            "255.255.255.255",
            "10.0.100.9",
            "::",
            "::ffff:255.255.255.255",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        ] {
            assert_eq!(json(text.parse().unwrap()), format!("\"{text}\""));
        }
    }
}
