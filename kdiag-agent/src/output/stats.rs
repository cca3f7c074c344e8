//! `agent_stats`: per-class events, drops and losses, per-program kernel run
//! time, and the agent's own memory and CPU, as deltas per interval.

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
use kdiag_common::{CLASS_COUNT, LOSS_DROPPED, LOSS_FAILED, LOSS_LOST, LOSS_REASONS, LOSS_SLOTS};

use crate::{
    output::record::{AgentStats, ClassStats, ProgramStats},
    sys,
};

/// What the kernel counts for one program, since it was loaded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct RunCounters {
    pub run_cnt: u64,
    pub run_time_ns: u64,
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
        now_mono_ns: u64,
    ) -> Self {
        Self {
            class_names,
            losses,
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

    /// Per-program counters; read them before the programs are unloaded.
    pub(crate) fn snapshot_programs(&self, ebpf: &Ebpf) -> ProgramCounters {
        ebpf.programs()
            .filter_map(|(name, p)| {
                let info = p.info().ok()?;
                // aya's ProgramInfo leaves out the miss counter; the kernel
                // also prints it in the program descriptor's fdinfo.
                let misses = p.fd().ok().filter(|_| self.counts_misses).and_then(|fd| {
                    let path = format!("/proc/self/fdinfo/{}", fd.as_fd().as_raw_fd());
                    recursion_misses(&fs::read_to_string(path).ok()?)
                });
                let counters = RunCounters {
                    run_cnt: info.run_count(),
                    run_time_ns: info.run_time().as_nanos() as u64,
                    recursion_misses: misses,
                };
                Some((name.to_owned(), counters))
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

/// What each program's counters grew by since `last`.
fn program_deltas(now: &ProgramCounters, last: &ProgramCounters) -> Vec<ProgramStats> {
    now.iter()
        .map(|(name, now)| {
            let last = last.get(name).copied().unwrap_or_default();
            ProgramStats {
                name: name.clone(),
                run_cnt: now.run_cnt.saturating_sub(last.run_cnt),
                run_time_ns: now.run_time_ns.saturating_sub(last.run_time_ns),
                recursion_misses: now
                    .recursion_misses
                    .map(|n| n.saturating_sub(last.recursion_misses.unwrap_or(0))),
            }
        })
        .collect()
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
        let counters = |cnt, time, misses| RunCounters {
            run_cnt: cnt,
            run_time_ns: time,
            recursion_misses: misses,
        };
        let last: ProgramCounters =
            [("softirq_raise".to_owned(), counters(10, 1000, Some(3)))].into();
        let now: ProgramCounters = [
            ("softirq_raise".to_owned(), counters(25, 2500, Some(7))),
            ("softirq_exit".to_owned(), counters(4, 400, None)),
        ]
        .into();
        let deltas = program_deltas(&now, &last);
        let by_name = |n: &str| deltas.iter().find(|p| p.name == n).unwrap();
        let raise = by_name("softirq_raise");
        assert_eq!(
            (raise.run_cnt, raise.run_time_ns, raise.recursion_misses),
            (15, 1500, Some(4))
        );
        // First interval of a program: everything since it was loaded.
        let exit = by_name("softirq_exit");
        assert_eq!(
            (exit.run_cnt, exit.run_time_ns, exit.recursion_misses),
            (4, 400, None)
        );
    }
}
