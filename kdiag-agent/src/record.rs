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
