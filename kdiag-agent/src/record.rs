//! The JSON Lines contract (schema v1): one struct per record type. The
//! envelope (`v`, `type`, `ts`, `host`) is added by `output.rs`. Field names
//! and meanings are documented in docs/SCHEMA.md; change both together.

use std::collections::BTreeMap;

use serde::Serialize;

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

/// One TCP retransmit.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Retrans {
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub cgroup: Option<String>,
    pub family: &'static str,
    pub saddr: String,
    pub sport: u16,
    pub daddr: String,
    pub dport: u16,
    pub state: &'static str,
    pub kind: &'static str,
    pub conn_retrans: u32,
}

impl Record for Retrans {
    const TYPE: &'static str = "retrans";
    const TEXT_HEADER: &'static str = "TIME                           PID     COMM             LADDR:LPORT                                     RADDR:RPORT                                     STATE        KIND    N";
    fn text_row(&self, ts: &str) -> String {
        format!(
            "{ts:<30} {:<7} {:<16} {:<47} {:<47} {:<12} {:<7} {}",
            opt(self.pid),
            printable(self.comm.as_deref().unwrap_or("-")),
            endpoint(&self.saddr, self.sport),
            endpoint(&self.daddr, self.dport),
            self.state,
            self.kind,
            self.conn_retrans
        )
    }
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
fn endpoint(addr: &str, port: u16) -> String {
    if addr.contains(':') {
        format!("[{addr}]:{port}")
    } else {
        format!("{addr}:{port}")
    }
}

/// Nanoseconds as milliseconds with three decimals, for text columns.
fn ms(ns: u64) -> String {
    format!("{:.3}", ns as f64 / 1e6)
}

/// One reclaim stall: a thread in direct or memcg reclaim.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Reclaim {
    pub kind: &'static str,
    pub pid: Option<u32>,
    pub tid: u32,
    pub comm: Option<String>,
    pub cgroup: Option<String>,
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
            ms(self.latency_ns),
            self.nr_reclaimed,
            opt(self.order)
        )
    }
}

/// One process's reclaim stalls of one kind over an interval.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReclaimSummary {
    pub kind: &'static str,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    pub cgroup: Option<String>,
    pub count: u64,
    pub total_ns: u64,
    pub max_ns: u64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub nr_reclaimed: u64,
    pub interval_ns: u64,
}

impl Record for ReclaimSummary {
    const TYPE: &'static str = "reclaim_summary";
    const TEXT_HEADER: &'static str = "# SUMMARY AT                    COMM             PID     KIND     COUNT  TOTAL(ms)  P50(ms)  P99(ms)  MAX(ms)    PAGES";
    fn text_row(&self, ts: &str) -> String {
        format!(
            "# {ts:<30} {:<16} {:<7} {:<6} {:>7} {:>10} {:>8} {:>8} {:>8} {:>8}",
            printable(self.comm.as_deref().unwrap_or("-")),
            opt(self.pid),
            self.kind,
            self.count,
            ms(self.total_ns),
            ms(self.p50_ns),
            ms(self.p99_ns),
            ms(self.max_ns),
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
    pub cgroup: Option<String>,
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
            ms(self.latency_ns),
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
    pub cgroup: Option<String>,
    pub count: u64,
    pub total_ns: u64,
    pub max_ns: u64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub interval_ns: u64,
}

impl Record for CompactSummary {
    const TYPE: &'static str = "compact_summary";
    const TEXT_HEADER: &'static str = "# SUMMARY AT                    COMM             PID       COUNT  TOTAL(ms)  P50(ms)  P99(ms)  MAX(ms)";
    fn text_row(&self, ts: &str) -> String {
        format!(
            "# {ts:<30} {:<16} {:<7} {:>7} {:>10} {:>8} {:>8} {:>8}",
            printable(self.comm.as_deref().unwrap_or("-")),
            opt(self.pid),
            self.count,
            ms(self.total_ns),
            ms(self.p50_ns),
            ms(self.p99_ns),
            ms(self.max_ns)
        )
    }
}

/// The host's memory pressure over an interval, beside the memory stalls:
/// /proc/vmstat deltas (null where this kernel lacks the counter) and PSI
/// averages (null without /proc/pressure/memory).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Vmstat {
    pub allocstall: Option<u64>,
    pub pgscan_direct: Option<u64>,
    pub pgsteal_direct: Option<u64>,
    pub compact_stall: Option<u64>,
    pub compact_fail: Option<u64>,
    pub compact_success: Option<u64>,
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
            opt(self.allocstall),
            opt(self.pgscan_direct),
            opt(self.pgsteal_direct),
            opt(self.compact_stall),
            opt(self.compact_fail),
            opt(self.compact_success),
            opt(self.psi_some_avg10),
            opt(self.psi_full_avg10)
        )
    }
}
