//! Memory-stall records: reclaim and compaction stalls, their per-process
//! summaries, and the host's vmstat and PSI beside them.

use serde::Serialize;

use super::{Cgroup, Marked, Record, StackField, ms, opt, printable, text_frame};

/// count, total, max and two percentiles of one set of latencies; records
/// flatten it into their own fields.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub(crate) struct LatencySummary {
    pub count: u64,
    pub total_ns: u64,
    pub max_ns: u64,
    pub p50_ns: u64,
    pub p99_ns: u64,
}

/// One reclaim stall: a thread in direct or memcg reclaim.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub(crate) struct Reclaim {
    pub kind: &'static str,
    pub pid: Option<u32>,
    pub tid: u32,
    pub comm: Option<String>,
    #[serde(flatten)]
    pub cgroup: Cgroup,
    pub latency_ns: u64,
    pub nr_reclaimed: u64,
    pub order: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stack: StackField,
}

impl Record for Reclaim {
    const TYPE: &'static str = "reclaim";
    const TEXT_HEADER: &'static str = "TIME                           COMM             PID     TID     KIND     LAT(ms)    PAGES ORDER";
    fn text_row(&self, ts: &str) -> String {
        format!(
            "{ts:<30} {:<16} {:<7} {:<7} {:<6} {:>9} {:>8} {}{}",
            printable(self.comm.as_deref().unwrap_or("-")),
            opt(self.pid),
            self.tid,
            self.kind,
            ms(Some(self.latency_ns)),
            self.nr_reclaimed,
            opt(self.order),
            text_frame(&self.stack)
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
pub(crate) struct ReclaimSummary {
    pub kind: &'static str,
    pub pid: Option<u32>,
    pub comm: Option<String>,
    #[serde(flatten)]
    pub cgroup: Cgroup,
    #[serde(flatten)]
    pub latency: LatencySummary,
    pub nr_reclaimed: u64,
    pub interval_ns: u64,
}

impl Record for ReclaimSummary {
    const TYPE: &'static str = "reclaim_summary";
    const MARKED: Marked = Marked::Step;
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
pub(crate) struct Compact {
    pub pid: Option<u32>,
    pub tid: u32,
    pub comm: Option<String>,
    #[serde(flatten)]
    pub cgroup: Cgroup,
    pub latency_ns: u64,
    pub status: String,
    pub mode: &'static str,
    pub order: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stack: StackField,
}

impl Record for Compact {
    const TYPE: &'static str = "compact";
    const TEXT_HEADER: &'static str = "TIME                           COMM             PID     TID       LAT(ms) ORDER MODE       STATUS";
    fn text_row(&self, ts: &str) -> String {
        format!(
            "{ts:<30} {:<16} {:<7} {:<7} {:>9} {:<5} {:<10} {}{}",
            printable(self.comm.as_deref().unwrap_or("-")),
            opt(self.pid),
            self.tid,
            ms(Some(self.latency_ns)),
            opt(self.order),
            self.mode,
            self.status,
            text_frame(&self.stack)
        )
    }
}

/// One process's compaction runs over an interval.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub(crate) struct CompactSummary {
    pub pid: Option<u32>,
    pub comm: Option<String>,
    #[serde(flatten)]
    pub cgroup: Cgroup,
    #[serde(flatten)]
    pub latency: LatencySummary,
    pub interval_ns: u64,
}

impl Record for CompactSummary {
    const TYPE: &'static str = "compact_summary";
    const MARKED: Marked = Marked::Step;
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
pub(crate) struct VmstatCounters {
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
pub(crate) struct Vmstat {
    #[serde(flatten)]
    pub counters: VmstatCounters,
    pub psi_some_avg10: Option<f64>,
    pub psi_full_avg10: Option<f64>,
    pub interval_ns: u64,
}

impl Record for Vmstat {
    const TYPE: &'static str = "vmstat";
    const MARKED: Marked = Marked::Step;
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
