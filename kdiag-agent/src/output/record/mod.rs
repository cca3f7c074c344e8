//! The JSON Lines contract (schema v1): one struct per record type, by area.
//! The envelope (`v`, `type`, `ts`, `host`) is added by the writer
//! (`output/mod.rs`). Field names and meanings are documented in
//! docs/SCHEMA.md; change both together.

mod drop;
mod memory;
mod softirq;
mod tcp;

use std::{collections::BTreeMap, sync::Arc};

use serde::Serialize;

pub(crate) use drop::{DropSummary, PacketDrop};
pub(crate) use memory::{
    Compact, CompactSummary, LatencySummary, Reclaim, ReclaimSummary, Vmstat, VmstatCounters,
};
pub(crate) use softirq::{Softirq, SoftirqSummary};
pub(crate) use tcp::{
    ConnHealth, Endpoints, Retrans, SenderState, TcpConn, TcpState, TcpSummary, TopConn,
};

/// The `stack` of a slow event's record (`--stack-min-latency-us`):
/// `None`, absent from the record, when the event was under the threshold
/// (or stacks are off); `Some(None)`, null, when the kernel could not take
/// the stack (counted as `partial`) or the agent could not read the
/// kernel's symbols; else its frames, `symbol+0xoffset`, innermost first.
pub(crate) type StackField = Option<Option<Vec<String>>>;

/// What `-o text` shows after a record with a stack: its innermost frame
/// (where the stall ended), `-` for a null stack, nothing without one.
pub(crate) fn text_frame(stack: &StackField) -> String {
    match stack {
        None => String::new(),
        Some(frames) => {
            let top = frames.as_ref().and_then(|f| f.first());
            format!(" at {}", top.map_or("-", String::as_str))
        }
    }
}

/// Owner fields as the records print them.
///
/// The strings are shared, not owned: an owner is cloned into every record
/// of its socket, hundreds of thousands a second under connection churn.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub(crate) struct ResolvedOwner {
    pub pid: Option<u32>,
    pub comm: Option<Arc<str>>,
    #[serde(flatten)]
    pub cgroup: Cgroup,
}

/// A cgroup as records name it: its path relative to its hierarchy's
/// mount, and the container and pod the path shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CgroupName {
    pub path: Arc<str>,
    pub container_id: Option<Arc<str>>,
    pub pod_uid: Option<Arc<str>>,
}

/// The `cgroup`, `container_id` and `pod_uid` fields of a record, `null`
/// where unknown. Shared, not owned: cloned into every record of its
/// processes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Cgroup(pub Option<Arc<CgroupName>>);

impl Cgroup {
    /// The path, when known.
    pub(crate) fn path(&self) -> Option<&str> {
        self.0.as_ref().map(|c| &*c.path)
    }
}

impl Serialize for Cgroup {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let name = self.0.as_deref();
        let mut map = serializer.serialize_map(Some(3))?;
        map.serialize_entry("cgroup", &name.map(|c| &*c.path))?;
        map.serialize_entry(
            "container_id",
            &name.and_then(|c| c.container_id.as_deref()),
        )?;
        map.serialize_entry("pod_uid", &name.and_then(|c| c.pod_uid.as_deref()))?;
        map.end()
    }
}

/// What a record says of the budget's step it was produced under (see
/// [`BudgetMark`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Marked {
    /// Nothing: per-event records and the agent's own.
    No,
    /// `budget_step`: a summary.
    Step,
    /// `budget_step` and `sampled_fraction`: a summary of a class the
    /// budget samples (softirq).
    StepAndFraction,
}

/// The budget's step over a summary's interval, when it was not full
/// detail: the fields the writer adds to every summary (`budget_step`,
/// and `sampled_fraction` for the sampled class).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct BudgetMark {
    /// The highest step in force during the interval.
    pub step: u32,
    /// The share of the interval the softirq programs measured.
    pub sampled_fraction: f64,
    /// Whether that step sheds the softirq queueing delay: then no summary
    /// of the interval has one, not even of the handlers that ran between
    /// the last read and the change of step.
    pub delay_shed: bool,
}

/// A record type of the contract.
pub(crate) trait Record: Serialize {
    /// The `type` field.
    const TYPE: &'static str;
    /// Whether it carries the budget's mark.
    const MARKED: Marked = Marked::No;
    /// Column header for `-o text`, printed before the first row.
    const TEXT_HEADER: &'static str;
    /// One `-o text` row; `ts` is the formatted time.
    fn text_row(&self, ts: &str) -> String;
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub(crate) struct Degraded {
    pub what: String,
    pub why: String,
}

/// First line of every run, written once everything is attached.
#[derive(Debug, Serialize)]
pub(crate) struct AgentStart {
    pub version: &'static str,
    pub kernel: String,
    pub transport: &'static str,
    pub attached: Vec<String>,
    /// How each of `attached` is attached: `"tp_btf"`, `"tracepoint"` or
    /// `"raw_tracepoint"`.
    pub attached_as: BTreeMap<String, &'static str>,
    pub degraded: Vec<Degraded>,
    /// The ids the agent runs as once attached, and the capabilities it
    /// still holds (effective and permitted alike).
    pub uid: u32,
    pub gid: u32,
    pub capabilities: Vec<String>,
    /// `--max-cpu` (0: no budget), and what the budget may shed, step by
    /// step, for the classes that run.
    pub max_cpu_pct: f64,
    pub budget_steps: Vec<&'static str>,
    /// The kernel maps sized for the classes that run -> their entries
    /// (the socket map's from `--max-sockets` or the host's sockets).
    pub map_entries: BTreeMap<&'static str, u32>,
    /// The buffer between the programs and the agent, in MiB.
    pub buffer_mib: u32,
    /// The TCP connection ends opened a second, in every network
    /// namespace, that it was sized for; `None` when not measured.
    pub buffer_opens_per_sec: Option<u64>,
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
            self.attached
                .iter()
                .map(|tp| match self.attached_as.get(tp) {
                    Some(how) => format!("{tp} ({how})"),
                    None => tp.clone(),
                })
                .collect::<Vec<_>>()
                .join(" ")
        );
        for d in &self.degraded {
            s.push_str(&format!("\n# degraded: {}: {}", d.what, d.why));
        }
        let caps = if self.capabilities.is_empty() {
            "none".to_owned()
        } else {
            self.capabilities.join(" ")
        };
        s.push_str(&format!(
            "\n# running as uid {} gid {}, capabilities: {caps}; buffer {} MiB",
            self.uid, self.gid, self.buffer_mib
        ));
        if let Some(rate) = self.buffer_opens_per_sec {
            s.push_str(&format!(" (for {rate} TCP connection ends opened/s)"));
        }
        if !self.map_entries.is_empty() {
            let maps: Vec<String> = self
                .map_entries
                .iter()
                .map(|(map, entries)| format!("{map} {entries}"))
                .collect();
            s.push_str(&format!("\n# kernel map entries: {}", maps.join(", ")));
        }
        s
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub(crate) struct ClassStats {
    pub events: u64,
    /// The kernel counters below are `None` (null) when the agent could
    /// not read them: never a repeated or made-up value.
    pub dropped: Option<u64>,
    pub lost: Option<u64>,
    /// Events a kernel program gave up on (a failed map insert or read).
    pub failed: Option<u64>,
    /// Events sent whose statistics or socket state a full bounded map
    /// could not keep.
    pub map_full: Option<u64>,
    /// Runs of the class's programs the kernel skipped (their recursion
    /// misses): `None` where the kernel does not count them.
    pub skipped: Option<u64>,
    /// Events the class could not decode.
    pub undecodable: u64,
    /// Events the user's filters kept out of the output.
    pub filtered: u64,
    /// Events sent with some of their fields null: a read of the socket's
    /// memory failed, or a slow event's kernel stack could not be taken.
    pub partial: Option<u64>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub(crate) struct ProgramStats {
    pub name: String,
    pub run_cnt: u64,
    /// Estimated: the mean of the runs timed, times `run_cnt`.
    pub run_time_ns: u64,
    /// Runs whose time was measured, one in `SAMPLE_EVERY` per CPU.
    pub timed_runs: u64,
    /// `null` where the kernel does not count them (before 5.12).
    pub recursion_misses: Option<u64>,
}

/// The agent's own accounting, every interval and once at exit. All
/// counters are deltas over `interval_ns`.
#[derive(Debug, Serialize)]
pub(crate) struct AgentStats {
    pub interval_ns: u64,
    pub classes: BTreeMap<&'static str, ClassStats>,
    pub programs: Vec<ProgramStats>,
    /// Events the kernel programs sent that the agent could not decode
    /// (a mismatch between the agent and its programs): written nowhere.
    pub decode_errors: u64,
    /// Perf records that were not well formed (the perf transport only).
    pub malformed_records: u64,
    /// Records that never reached stdout: the queue to the writer thread
    /// was full (a slow or stopped reader), or they were still queued when
    /// the agent stopped.
    pub output_dropped: u64,
    pub rss_bytes: Option<u64>,
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
                    "{name}: {} events, {} dropped, {} lost, {} skipped",
                    c.events,
                    or_unknown(c.dropped),
                    or_unknown(c.lost),
                    or_unknown(c.skipped)
                )
            })
            .collect();
        format!(
            "# {ts} stats over {:.1}s: {}; agent cpu {:.1}ms, rss {} KiB",
            self.interval_ns as f64 / 1e9,
            classes.join("; "),
            self.cpu_ns as f64 / 1e6,
            or_unknown(self.rss_bytes.map(|b| b / 1024))
        )
    }
}

/// A counter in text output: `?` when unknown.
fn or_unknown(n: Option<u64>) -> String {
    n.map_or_else(|| "?".to_owned(), |n| n.to_string())
}

/// A change of the budget's step, or what the interval after one cost.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub(crate) struct BudgetChange {
    /// `"down"` (detail shed), `"up"` (detail back), or `"result"` (the cost
    /// of the first interval at `step`, after a change).
    pub change: &'static str,
    /// The step in force from now on (0: full detail).
    pub step: u32,
    /// The step before (for `"result"`: the same as `step`).
    pub previous_step: u32,
    /// What is shed at `step`, cheapest loss first.
    pub shed: Vec<&'static str>,
    /// The share of time the softirq programs measure at `step`; `null`
    /// without the softirq class.
    pub sampled_fraction: Option<f64>,
    /// The agent's cost over the interval just ended, as a percentage of
    /// its measure (`--max-cpu`): at `previous_step` for `"down"` and
    /// `"up"`, at `step` for `"result"`.
    pub cost_pct: f64,
    /// `--max-cpu`.
    pub budget_pct: f64,
    /// For `"up"`: the cost expected at `step`, from the cost measured when
    /// it was left, scaled by the programs' runs since.
    pub expected_pct: Option<f64>,
    /// The parts of `cost_pct`: the programs' estimated run time and the
    /// agent's own CPU time, against the busy CPU time of the machine (or
    /// one CPU's worth, whichever is larger), over `interval_ns`.
    pub bpf_ns: u64,
    pub cpu_ns: u64,
    pub busy_ns: u64,
    pub interval_ns: u64,
}

impl Record for BudgetChange {
    const TYPE: &'static str = "budget";
    const TEXT_HEADER: &'static str = "";
    fn text_row(&self, ts: &str) -> String {
        let shed = if self.shed.is_empty() {
            "nothing".to_owned()
        } else {
            self.shed.join(", ")
        };
        format!(
            "# {ts} budget {}: step {} -> {} (shed: {shed}), cost {:.3}% of {:.3}%",
            self.change, self.previous_step, self.step, self.cost_pct, self.budget_pct
        )
    }
}

// Text columns shared by the areas.

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

/// Nanoseconds as microseconds with one decimal, for text columns.
fn micros(ns: u64) -> String {
    format!("{}.{}", ns / 1000, ns % 1000 / 100)
}
