//! `agent_stats`: per-class events, drops and losses, per-program kernel run
//! time, and the agent's own memory and CPU, as deltas per interval.
//!
//! Program run counts and times are the programs' own (kdiag_common::cost):
//! every run counted, one in `SAMPLE_EVERY` timed, per CPU. The kernel's
//! host-wide BPF statistics are never turned on.

use std::{
    collections::BTreeMap,
    fs,
    os::fd::{AsFd as _, AsRawFd as _},
};

use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray},
    util::KernelVersion,
};
use kdiag_common::{
    CLASS_COUNT, LOSS_DROPPED, LOSS_FAILED, LOSS_LOST, LOSS_PARTIAL, LOSS_REASONS, LOSS_SLOTS,
    cost::{ProgramCost, ProgramId},
};

use crate::{
    output::record::{AgentStats, ClassStats, ProgramStats},
    sys,
};

/// What is counted for one program since it was loaded, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RunCounters {
    pub runs: u64,
    pub timed_runs: u64,
    pub timed_ns: u64,
    /// Runs the kernel skipped because another BPF program was running on
    /// that CPU; `None` where the kernel does not count them (see
    /// [`counts_tracepoint_misses`]).
    pub recursion_misses: Option<u64>,
}

/// Counters per program name.
pub(crate) type ProgramCounters = BTreeMap<String, RunCounters>;

pub(crate) struct StatsCollector {
    class_names: Vec<(u32, &'static str)>,
    losses: PerCpuArray<MapData, u64>,
    costs: PerCpuArray<MapData, ProgramCost>,
    /// Records written per class id since the last report.
    events: [u64; CLASS_COUNT as usize],
    last_losses: [u64; LOSS_SLOTS as usize],
    last_programs: ProgramCounters,
    /// Events that did not decode, since the last report and since start.
    decode_errors: u64,
    decode_errors_total: u64,
    last_cpu_ns: u64,
    last_mono_ns: u64,
    counts_misses: bool,
}

impl StatsCollector {
    pub(crate) fn new(
        class_names: Vec<(u32, &'static str)>,
        losses: PerCpuArray<MapData, u64>,
        costs: PerCpuArray<MapData, ProgramCost>,
        now_mono_ns: u64,
    ) -> Self {
        Self {
            class_names,
            losses,
            costs,
            events: [0; CLASS_COUNT as usize],
            last_losses: [0; LOSS_SLOTS as usize],
            last_programs: BTreeMap::new(),
            decode_errors: 0,
            decode_errors_total: 0,
            last_cpu_ns: sys::process::cpu_time_ns(),
            last_mono_ns: now_mono_ns,
            counts_misses: counts_tracepoint_misses(),
        }
    }

    /// Events that did not decode, written nowhere else.
    pub(crate) fn count_decode_errors(&mut self, n: u64) {
        self.decode_errors += n;
        self.decode_errors_total += n;
    }

    /// Events that did not decode since start.
    pub(crate) fn decode_errors_total(&self) -> u64 {
        self.decode_errors_total
    }

    pub(crate) fn count_events(&mut self, class: u32, n: u64) {
        if let Some(c) = self.events.get_mut(class as usize) {
            *c += n;
        }
    }

    /// Monotonic time the current interval began.
    pub(crate) fn interval_start_ns(&self) -> u64 {
        self.last_mono_ns
    }

    /// Per-program counters of the loaded programs; read them before the
    /// programs are unloaded (the recursion misses go with them).
    pub(crate) fn snapshot_programs(&self, ebpf: &Ebpf) -> ProgramCounters {
        ebpf.programs()
            .filter_map(|(name, p)| {
                let id = ProgramId::of_entry(name)?;
                let fd = p.fd().ok()?;
                // The kernel prints the miss counter in the program
                // descriptor's fdinfo (aya's ProgramInfo leaves it out).
                let misses = self.counts_misses.then(|| {
                    let path = format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd());
                    recursion_misses(&fs::read_to_string(path).ok()?)
                });
                let mut counters = RunCounters {
                    recursion_misses: misses.flatten(),
                    ..RunCounters::default()
                };
                if let Ok(per_cpu) = self.costs.get(&(id as u32), 0) {
                    for c in per_cpu.iter() {
                        counters.runs += c.runs;
                        counters.timed_runs += c.timed_runs;
                        counters.timed_ns += c.timed_ns;
                    }
                }
                Some((id.name().to_owned(), counters))
            })
            .collect()
    }

    /// The report for the interval ending now, and the start of the next.
    pub(crate) fn report(&mut self, programs: ProgramCounters, now_mono_ns: u64) -> AgentStats {
        let losses = self.read_losses();
        let mut classes = BTreeMap::new();
        for &(id, name) in &self.class_names {
            let slot = |reason: u32| (id * LOSS_REASONS + reason) as usize;
            let delta =
                |reason| losses[slot(reason)].saturating_sub(self.last_losses[slot(reason)]);
            classes.insert(
                name,
                ClassStats {
                    events: std::mem::take(&mut self.events[id as usize]),
                    dropped: delta(LOSS_DROPPED),
                    lost: delta(LOSS_LOST),
                    failed: delta(LOSS_FAILED),
                    partial: delta(LOSS_PARTIAL),
                },
            );
        }
        self.last_losses = losses;
        let program_stats = program_deltas(&programs, &self.last_programs);
        self.last_programs = programs;
        let cpu = sys::process::cpu_time_ns();
        let stats = AgentStats {
            interval_ns: now_mono_ns.saturating_sub(self.last_mono_ns),
            classes,
            programs: program_stats,
            decode_errors: std::mem::take(&mut self.decode_errors),
            // Known to the output, which sets it.
            output_dropped: 0,
            rss_bytes: rss_bytes(),
            cpu_ns: cpu.saturating_sub(self.last_cpu_ns),
        };
        self.last_cpu_ns = cpu;
        self.last_mono_ns = now_mono_ns;
        stats
    }

    /// Loss counters summed over CPUs. They only grow, so deltas never lose
    /// or double-count an increment that lands between two reads.
    fn read_losses(&self) -> [u64; LOSS_SLOTS as usize] {
        let mut out = self.last_losses;
        for (slot, total) in out.iter_mut().enumerate() {
            if let Ok(per_cpu) = self.losses.get(&(slot as u32), 0) {
                *total = per_cpu.iter().sum();
            }
        }
        out
    }
}

/// What each program's counters grew by since `last`, its run time
/// estimated from the runs timed (see [`estimated_ns`]).
pub(crate) fn program_deltas(now: &ProgramCounters, last: &ProgramCounters) -> Vec<ProgramStats> {
    now.iter()
        .map(|(name, now)| {
            let last = last.get(name).copied().unwrap_or_default();
            let runs = now.runs.saturating_sub(last.runs);
            let timed_runs = now.timed_runs.saturating_sub(last.timed_runs);
            let timed_ns = now.timed_ns.saturating_sub(last.timed_ns);
            ProgramStats {
                name: name.clone(),
                run_cnt: runs,
                run_time_ns: estimated_ns(runs, timed_runs, timed_ns, now),
                timed_runs,
                recursion_misses: now
                    .recursion_misses
                    .map(|n| n.saturating_sub(last.recursion_misses.unwrap_or(0))),
            }
        })
        .collect()
}

/// The run time of `runs` runs, of which `timed_runs` took `timed_ns`: their
/// mean scaled up. An interval whose runs were all untimed (fewer than
/// `SAMPLE_EVERY` on each CPU) takes the mean over the program's life.
fn estimated_ns(runs: u64, timed_runs: u64, timed_ns: u64, life: &RunCounters) -> u64 {
    let (n, ns) = if timed_runs > 0 {
        (timed_runs, timed_ns)
    } else {
        (life.timed_runs, life.timed_ns)
    };
    if n == 0 {
        return 0;
    }
    (u128::from(ns) * u128::from(runs) / u128::from(n)) as u64
}

/// Whether the kernel counts the runs of classic tracepoint programs it
/// skips because another BPF program runs on that CPU: from 6.7
/// (trace_call_bpf). The fdinfo line exists from 5.12, but reads 0 for
/// these programs until then, whatever was skipped.
fn counts_tracepoint_misses() -> bool {
    KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 7, 0))
}

/// The `recursion_misses:` line of a BPF program's fdinfo (Linux 5.12+).
fn recursion_misses(fdinfo: &str) -> Option<u64> {
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("recursion_misses:")?.trim().parse().ok())
}

/// Resident set size, from /proc/self/statm (pages).
fn rss_bytes() -> u64 {
    let pages = fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    pages * sys::process::page_size() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recursion_misses_from_fdinfo() {
        let fdinfo = "pos:\t0\nflags:\t02000002\nprog_type:\t5\nprog_id:\t38\n\
                      run_time_ns:\t5123\nrun_cnt:\t17\nrecursion_misses:\t4404\n";
        assert_eq!(recursion_misses(fdinfo), Some(4404));
        // Kernels before 5.12 have no such line.
        assert_eq!(recursion_misses("prog_type:\t5\nrun_cnt:\t17\n"), None);
    }

    #[test]
    fn program_counters_become_deltas() {
        let counters = |runs, timed_runs, timed_ns, misses| RunCounters {
            runs,
            timed_runs,
            timed_ns,
            recursion_misses: misses,
        };
        let last: ProgramCounters =
            [("softirq_raise".to_owned(), counters(640, 10, 1000, Some(3)))].into();
        let now: ProgramCounters = [
            (
                "softirq_raise".to_owned(),
                counters(1280, 20, 3000, Some(7)),
            ),
            ("softirq_exit".to_owned(), counters(4, 1, 400, None)),
        ]
        .into();
        let deltas = program_deltas(&now, &last);
        let by_name = |n: &str| deltas.iter().find(|p| p.name == n).unwrap();
        let raise = by_name("softirq_raise");
        // 10 runs timed at 200 ns each, 640 runs.
        assert_eq!(
            (
                raise.run_cnt,
                raise.run_time_ns,
                raise.timed_runs,
                raise.recursion_misses
            ),
            (640, 128_000, 10, Some(4))
        );
        // First interval of a program: everything since it was loaded.
        let exit = by_name("softirq_exit");
        assert_eq!(
            (exit.run_cnt, exit.run_time_ns, exit.recursion_misses),
            (4, 1600, None)
        );
    }

    #[test]
    fn untimed_intervals_take_the_mean_over_the_life() {
        let life = RunCounters {
            runs: 1000,
            timed_runs: 16,
            timed_ns: 1600,
            recursion_misses: None,
        };
        assert_eq!(estimated_ns(5, 0, 0, &life), 500);
        // Never timed (never ran, or the map could not be read).
        assert_eq!(estimated_ns(5, 0, 0, &RunCounters::default()), 0);
    }
}
