//! Softirq records: the slow ones one by one, and per-interval summaries.

use serde::Serialize;

use super::{Marked, Record, StackField, micros, text_frame};

/// One softirq at or over `--min-latency-us`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub(crate) struct Softirq {
    pub cpu: u32,
    pub vec: &'static str,
    pub service_ns: u64,
    /// Null when the raise was not seen.
    pub delay_ns: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stack: StackField,
}

impl Record for Softirq {
    const TYPE: &'static str = "softirq";
    const TEXT_HEADER: &'static str =
        "TIME                           CPU VEC       SERVICE_us   DELAY_us";
    fn text_row(&self, ts: &str) -> String {
        format!(
            "{ts:<30} {:>3} {:<8} {:>11} {:>10}{}",
            self.cpu,
            self.vec,
            micros(self.service_ns),
            self.delay_ns.map_or_else(|| "-".to_owned(), micros),
            text_frame(&self.stack)
        )
    }
}

/// Softirqs of one vector on one CPU over one interval.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub(crate) struct SoftirqSummary {
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
    const MARKED: Marked = Marked::StepAndFraction;
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
