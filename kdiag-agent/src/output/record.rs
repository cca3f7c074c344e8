//! The JSON Lines contract (schema v1): one struct per record type. The
//! envelope (`v`, `type`, `ts`, `host`) is added by `output.rs`. Field names
//! and meanings are documented in docs/SCHEMA.md; change both together.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr},
    sync::Arc,
};

use kdiag_common::tcp::{AF_INET6, TcpTuple};
use serde::Serialize;

use crate::{
    attribution::owner::ResolvedOwner, attribution::procfs, classes::hist::LatencySummary,
};

/// A record type of the contract.
pub trait Record: Serialize {
    /// The `type` field.
    const TYPE: &'static str;
    /// Column header for `-o text`, printed before the first row.
    const TEXT_HEADER: &'static str;
    /// One `-o text` row; `ts` is the formatted time.
    fn text_row(&self, ts: &str) -> String;
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Degraded {
    pub what: String,
    pub why: String,
}

/// First line of every run, written once everything is attached.
#[derive(Debug, Serialize)]
pub struct AgentStart {
    pub version: &'static str,
    pub kernel: String,
    pub transport: &'static str,
    pub attached: Vec<String>,
    pub degraded: Vec<Degraded>,
}

impl Record for AgentStart {
    const TYPE: &'static str = "agent_start";
    const TEXT_HEADER: &'static str = "";
    fn text_row(&self, ts: &str) -> String {
        let mut s = format!(
            "# {ts} kdiag-agent {} on {} via {}: attached {}",
            self.version,
            self.kernel,
            self.transport,
            self.attached.join(" ")
        );
        for d in &self.degraded {
            s.push_str(&format!("\n# degraded: {}: {}", d.what, d.why));
        }
        s
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct ClassStats {
    pub events: u64,
    pub dropped: u64,
    pub lost: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ProgramStats {
    pub name: String,
    pub run_cnt: u64,
    pub run_time_ns: u64,
    /// `null` where the kernel does not count them (before 5.12).
    pub recursion_misses: Option<u64>,
}

/// The agent's own accounting, every interval and once at exit. All
/// counters are deltas over `interval_ns`.
#[derive(Debug, Serialize)]
pub struct AgentStats {
    pub interval_ns: u64,
    pub classes: BTreeMap<&'static str, ClassStats>,
    pub programs: Vec<ProgramStats>,
    pub rss_bytes: u64,
    pub cpu_ns: u64,
}

impl Record for AgentStats {
    const TYPE: &'static str = "agent_stats";
    const TEXT_HEADER: &'static str = "";
    fn text_row(&self, ts: &str) -> String {
        let classes: Vec<String> = self
            .classes
            .iter()
            .map(|(name, c)| {
                format!(
                    "{name}: {} events, {} dropped, {} lost",
                    c.events, c.dropped, c.lost
                )
            })
            .collect();
        format!(
            "# {ts} stats over {:.1}s: {}; agent cpu {:.1}ms, rss {} KiB",
            self.interval_ns as f64 / 1e9,
            classes.join("; "),
            self.cpu_ns as f64 / 1e6,
            self.rss_bytes / 1024
        )
    }
}

/// A connection's two ends, local first.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Endpoints {
    pub family: &'static str,
    #[serde(serialize_with = "ip_text")]
    pub saddr: IpAddr,
    pub sport: u16,
    #[serde(serialize_with = "ip_text")]
    pub daddr: IpAddr,
    pub dport: u16,
}

/// Serializes an address as its text, formatted on the stack. Two go into
/// every connection record, so IPv4 addresses are formatted by hand: through
/// `Display` they took 15% of the agent's time per record under churn.
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
    pub fn new(t: &TcpTuple) -> Self {
        let v6 = t.family == AF_INET6;
        Self {
            family: if v6 { "ipv6" } else { "ipv4" },
            saddr: procfs::ip_addr(v6, &t.saddr),
            sport: t.sport,
            daddr: procfs::ip_addr(v6, &t.daddr),
            dport: t.dport,
        }
    }

    /// `LADDR:LPORT RADDR:RPORT` columns.
    fn text(&self) -> String {
        format!(
            "{:<47} {:<47}",
            endpoint(&self.saddr, self.sport),
            endpoint(&self.daddr, self.dport)
        )
    }
}

/// `PID COMM` columns.
fn owner_text(o: &ResolvedOwner) -> String {
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

/// One TCP retransmit.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Retrans {
    #[serde(flatten)]
    pub owner: ResolvedOwner,
    #[serde(flatten)]
    pub conn: Endpoints,
    pub state: &'static str,
    pub kind: &'static str,
    pub conn_retrans: u32,
}

impl Record for Retrans {
    const TYPE: &'static str = "retrans";
    const TEXT_HEADER: &'static str = conn_header!(" STATE        KIND    N");
    fn text_row(&self, ts: &str) -> String {
        format!(
            "{ts:<30} {} {} {:<12} {:<7} {}",
            owner_text(&self.owner),
            self.conn.text(),
            self.state,
            self.kind,
            self.conn_retrans
        )
    }
}

/// One TCP state change.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TcpState {
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

/// A connection's life, written when it closes.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TcpConn {
    #[serde(flatten)]
    pub owner: ResolvedOwner,
    #[serde(flatten)]
    pub conn: Endpoints,
    pub role: Option<&'static str>,
    pub duration_ns: Option<u64>,
    pub handshake_ns: Option<u64>,
    pub retrans: u32,
    pub state_ns: BTreeMap<&'static str, u64>,
}

impl Record for TcpConn {
    const TYPE: &'static str = "tcp_conn";
    const TEXT_HEADER: &'static str = conn_header!(" ROLE     DUR_MS     HS_MS      RETRANS");
    fn text_row(&self, ts: &str) -> String {
        format!(
            "{ts:<30} {} {} {:<8} {:<10} {:<10} {}",
            owner_text(&self.owner),
            self.conn.text(),
            self.role.unwrap_or("-"),
            ms(self.duration_ns),
            ms(self.handshake_ns),
            self.retrans
        )
    }
}

/// A connection among the interval's most retransmitting ones.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TopConn {
    #[serde(flatten)]
    pub owner: ResolvedOwner,
    #[serde(flatten)]
    pub conn: Endpoints,
    pub retrans: u64,
}

/// The interval's TCP retransmit picture, beside the kernel's counters.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TcpSummary {
    /// Retransmit calls kdiag saw (all ports and families it watches).
    pub retrans: u64,
    /// `Tcp: RetransSegs` and `OutSegs` deltas of /proc/net/snmp (the agent's
    /// network namespace), null when unreadable.
    pub retrans_segs: Option<u64>,
    pub out_segs: Option<u64>,
    /// retrans_segs / out_segs, the dashboards' retransmit rate.
    pub retrans_ratio: Option<f64>,
    pub top: Vec<TopConn>,
    /// Connections whose life is being followed, and those dropped from the
    /// table because it was full (their tcp_conn will not be written).
    pub conns_tracked: u64,
    pub conns_evicted: u64,
    pub interval_ns: u64,
}

impl Record for TcpSummary {
    const TYPE: &'static str = "tcp_summary";
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

fn ms(ns: Option<u64>) -> String {
    ns.map_or_else(|| "-".to_owned(), |ns| format!("{:.3}", ns as f64 / 1e6))
}

/// Control characters (a process can put a newline or an escape sequence in
/// its comm) would break the columns or the terminal: show them as `?`.
fn printable(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

/// `addr:port`, with IPv6 addresses in brackets.
fn endpoint(addr: &IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(*addr, port).to_string()
}

/// One softirq at or over `--min-latency-us`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Softirq {
    pub cpu: u32,
    pub vec: &'static str,
    pub service_ns: u64,
    /// Null when the raise was not seen.
    pub delay_ns: Option<u64>,
}

impl Record for Softirq {
    const TYPE: &'static str = "softirq";
    const TEXT_HEADER: &'static str =
        "TIME                           CPU VEC       SERVICE_us   DELAY_us";
    fn text_row(&self, ts: &str) -> String {
        format!(
            "{ts:<30} {:>3} {:<8} {:>11} {:>10}",
            self.cpu,
            self.vec,
            micros(self.service_ns),
            self.delay_ns.map_or_else(|| "-".to_owned(), micros)
        )
    }
}

/// Softirqs of one vector on one CPU over one interval.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SoftirqSummary {
    pub cpu: u32,
    pub vec: &'static str,
    pub count: u64,
    pub service_total_ns: u64,
    pub service_max_ns: u64,
    pub service_p99_ns: u64,
    /// Null when no raise of these softirqs was seen.
    pub delay_max_ns: Option<u64>,
    pub delay_p99_ns: Option<u64>,
    pub interval_ns: u64,
}

impl Record for SoftirqSummary {
    const TYPE: &'static str = "softirq_summary";
    const TEXT_HEADER: &'static str = "TIME                           CPU VEC          COUNT   TOTAL_us     MAX_us     P99_us  DELAY_MAX_us  DELAY_P99_us";
    fn text_row(&self, ts: &str) -> String {
        let opt_micros = |ns: Option<u64>| ns.map_or_else(|| "-".to_owned(), micros);
        format!(
            "{ts:<30} {:>3} {:<8} {:>9} {:>10} {:>10} {:>10} {:>13} {:>13}",
            self.cpu,
            self.vec,
            self.count,
            micros(self.service_total_ns),
            micros(self.service_max_ns),
            micros(self.service_p99_ns),
            opt_micros(self.delay_max_ns),
            opt_micros(self.delay_p99_ns)
        )
    }
}

/// Nanoseconds as microseconds with one decimal, for text columns.
fn micros(ns: u64) -> String {
    format!("{}.{}", ns / 1000, ns % 1000 / 100)
}

/// One reclaim stall: a thread in direct or memcg reclaim.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Reclaim {
    pub kind: &'static str,
    pub pid: Option<u32>,
    pub tid: u32,
    pub comm: Option<String>,
    pub cgroup: Option<Arc<str>>,
    pub latency_ns: u64,
    pub nr_reclaimed: u64,
    pub order: Option<i32>,
}

impl Record for Reclaim {
    const TYPE: &'static str = "reclaim";
    const TEXT_HEADER: &'static str = "TIME                           COMM             PID     TID     KIND     LAT(ms)    PAGES ORDER";
    fn text_row(&self, ts: &str) -> String {
        format!(
            "{ts:<30} {:<16} {:<7} {:<7} {:<6} {:>9} {:>8} {}",
            printable(self.comm.as_deref().unwrap_or("-")),
            opt(self.pid),
            self.tid,
            self.kind,
            ms(Some(self.latency_ns)),
            self.nr_reclaimed,
            opt(self.order)
        )
    }
}

/// `COUNT TOTAL(ms) P50(ms) P99(ms) MAX(ms)` columns.
fn latency_columns(l: &LatencySummary) -> String {
    format!(
        "{:>7} {:>10} {:>8} {:>8} {:>8}",
        l.count,
        ms(Some(l.total_ns)),
        ms(Some(l.p50_ns)),
        ms(Some(l.p99_ns)),
        ms(Some(l.max_ns))
    )
}

/// One process's reclaim stalls of one kind over an interval.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReclaimSummary {
    pub kind: &'static str,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub cgroup: Option<Arc<str>>,
    #[serde(flatten)]
    pub latency: LatencySummary,
    pub nr_reclaimed: u64,
    pub interval_ns: u64,
}

impl Record for ReclaimSummary {
    const TYPE: &'static str = "reclaim_summary";
    const TEXT_HEADER: &'static str = "# SUMMARY AT                    COMM             PID     KIND     COUNT  TOTAL(ms)  P50(ms)  P99(ms)  MAX(ms)    PAGES";
    fn text_row(&self, ts: &str) -> String {
        format!(
            "# {ts:<30} {:<16} {:<7} {:<6} {} {:>8}",
            printable(self.comm.as_deref().unwrap_or("-")),
            opt(self.pid),
            self.kind,
            latency_columns(&self.latency),
            self.nr_reclaimed
        )
    }
}

/// One compaction run over one zone.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Compact {
    pub pid: Option<u32>,
    pub tid: u32,
    pub comm: Option<String>,
    pub cgroup: Option<Arc<str>>,
    pub latency_ns: u64,
    pub status: String,
    pub mode: &'static str,
    pub order: Option<i32>,
}

impl Record for Compact {
    const TYPE: &'static str = "compact";
    const TEXT_HEADER: &'static str = "TIME                           COMM             PID     TID       LAT(ms) ORDER MODE       STATUS";
    fn text_row(&self, ts: &str) -> String {
        format!(
            "{ts:<30} {:<16} {:<7} {:<7} {:>9} {:<5} {:<10} {}",
            printable(self.comm.as_deref().unwrap_or("-")),
            opt(self.pid),
            self.tid,
            ms(Some(self.latency_ns)),
            opt(self.order),
            self.mode,
            self.status
        )
    }
}

/// One process's compaction runs over an interval.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CompactSummary {
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub cgroup: Option<Arc<str>>,
    #[serde(flatten)]
    pub latency: LatencySummary,
    pub interval_ns: u64,
}

impl Record for CompactSummary {
    const TYPE: &'static str = "compact_summary";
    const TEXT_HEADER: &'static str = "# SUMMARY AT                    COMM             PID       COUNT  TOTAL(ms)  P50(ms)  P99(ms)  MAX(ms)";
    fn text_row(&self, ts: &str) -> String {
        format!(
            "# {ts:<30} {:<16} {:<7} {}",
            printable(self.comm.as_deref().unwrap_or("-")),
            opt(self.pid),
            latency_columns(&self.latency)
        )
    }
}

/// /proc/vmstat counters, summed where several share a prefix; in a
/// `vmstat` record, their deltas over the interval.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct VmstatCounters {
    /// `allocstall_<zone>` summed over zones (direct reclaim entries;
    /// kernels before 4.10 had one `allocstall`).
    pub allocstall: Option<u64>,
    pub pgscan_direct: Option<u64>,
    pub pgsteal_direct: Option<u64>,
    pub compact_stall: Option<u64>,
    pub compact_fail: Option<u64>,
    pub compact_success: Option<u64>,
}

/// The host's memory pressure over an interval, beside the memory stalls:
/// /proc/vmstat deltas (null where this kernel lacks the counter) and PSI
/// averages (null without /proc/pressure/memory).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Vmstat {
    #[serde(flatten)]
    pub counters: VmstatCounters,
    pub psi_some_avg10: Option<f64>,
    pub psi_full_avg10: Option<f64>,
    pub interval_ns: u64,
}

impl Record for Vmstat {
    const TYPE: &'static str = "vmstat";
    const TEXT_HEADER: &'static str = "";
    fn text_row(&self, ts: &str) -> String {
        format!(
            "# {ts} vmstat: allocstall {} pgscan_direct {} pgsteal_direct {} compact_stall {} compact_fail {} compact_success {}; psi memory avg10 some {} full {}",
            opt(self.counters.allocstall),
            opt(self.counters.pgscan_direct),
            opt(self.counters.pgsteal_direct),
            opt(self.counters.compact_stall),
            opt(self.counters.compact_fail),
            opt(self.counters.compact_success),
            opt(self.psi_some_avg10),
            opt(self.psi_full_avg10)
        )
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
