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
    CLASS_COUNT, LOSS_DROPPED, LOSS_FAILED, LOSS_LOST, LOSS_MAP_FULL, LOSS_PARTIAL, LOSS_REASONS,
    LOSS_SLOTS,
    cost::{ProgramCost, ProgramId},
};

use crate::{
    class::Class,
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

/// What the agent counted of one class's events in userspace since the
/// last report.
#[derive(Debug, Clone, Copy, Default)]
struct ClassCounts {
    /// Records written.
    events: u64,
    /// Events the class's decoder refused.
    undecodable: u64,
    /// Events kept out of the output by the user's filters.
    filtered: u64,
}

pub(crate) struct StatsCollector {
    class_names: Vec<(u32, &'static str)>,
    /// Program name -> the class whose `skipped` its recursion misses are.
    skip_class: BTreeMap<&'static str, u32>,
    losses: PerCpuArray<MapData, u64>,
    costs: PerCpuArray<MapData, ProgramCost>,
    counts: [ClassCounts; CLASS_COUNT as usize],
    /// The loss counters at their last successful read.
    last_losses: [u64; LOSS_SLOTS as usize],
    last_programs: ProgramCounters,
    /// Events that did not decode, since the last report and since start.
    decode_errors: u64,
    decode_errors_total: u64,
    /// Malformed perf records, since the last report.
    malformed_records: u64,
    last_cpu_ns: u64,
    last_mono_ns: u64,
    counts_misses: bool,
}

impl StatsCollector {
    /// `classes`: each running class's id, name and the programs it
    /// attaches.
    pub(crate) fn new(
        classes: &[(u32, &'static str, Vec<&'static str>)],
        losses: PerCpuArray<MapData, u64>,
        costs: PerCpuArray<MapData, ProgramCost>,
        now_mono_ns: u64,
    ) -> Self {
        Self {
            class_names: classes.iter().map(|&(id, name, _)| (id, name)).collect(),
            skip_class: skip_classes(classes),
            losses,
            costs,
            counts: [ClassCounts::default(); CLASS_COUNT as usize],
            last_losses: [0; LOSS_SLOTS as usize],
            last_programs: BTreeMap::new(),
            decode_errors: 0,
            decode_errors_total: 0,
            malformed_records: 0,
            last_cpu_ns: sys::process::cpu_time_ns(),
            last_mono_ns: now_mono_ns,
            counts_misses: counts_tracepoint_misses(),
        }
    }

    /// Events that did not decode, written nowhere else; `class`: the
    /// class whose decoder refused them, if the kind was known.
    pub(crate) fn count_decode_errors(&mut self, class: Option<u32>, n: u64) {
        self.decode_errors += n;
        self.decode_errors_total += n;
        if let Some(c) = class.and_then(|c| self.counts.get_mut(c as usize)) {
            c.undecodable += n;
        }
    }

    /// Events of `class` its user's filters kept out of the output.
    pub(crate) fn count_filtered(&mut self, class: u32) {
        if let Some(c) = self.counts.get_mut(class as usize) {
            c.filtered += 1;
        }
    }

    /// Perf records that were not well formed (see the perf transport).
    pub(crate) fn count_malformed(&mut self, n: u64) {
        self.malformed_records += n;
    }

    /// Events that did not decode since start.
    pub(crate) fn decode_errors_total(&self) -> u64 {
        self.decode_errors_total
    }

    pub(crate) fn count_events(&mut self, class: u32, n: u64) {
        if let Some(c) = self.counts.get_mut(class as usize) {
            c.events += n;
        }
    }

    /// Monotonic time the current interval began.
    pub(crate) fn interval_start_ns(&self) -> u64 {
        self.last_mono_ns
    }

    /// Per-program counters of the loaded programs, with what `classes`
    /// count in their own maps; read them before the programs are unloaded
    /// (the recursion misses go with them).
    pub(crate) fn snapshot_programs(
        &self,
        ebpf: &Ebpf,
        classes: &[Box<dyn Class>],
    ) -> ProgramCounters {
        let own: Vec<(ProgramId, ProgramCost)> =
            classes.iter().flat_map(|c| c.program_costs()).collect();
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
                let shared = self.costs.get(&(id as u32), 0).ok();
                let theirs = own.iter().filter(|(p, _)| *p == id).map(|(_, c)| c);
                for c in shared.iter().flat_map(|v| v.iter()).chain(theirs) {
                    counters.runs += c.runs;
                    counters.timed_runs += c.timed_runs;
                    counters.timed_ns += c.timed_ns;
                }
                Some((id.name().to_owned(), counters))
            })
            .collect()
    }

    /// The report for the interval ending now, and the start of the next.
    pub(crate) fn report(&mut self, programs: ProgramCounters, now_mono_ns: u64) -> AgentStats {
        let losses = self.read_losses();
        let program_stats = program_deltas(&programs, &self.last_programs);
        let mut classes = BTreeMap::new();
        for &(id, name) in &self.class_names {
            let slot = |reason: u32| (id * LOSS_REASONS + reason) as usize;
            // Unreadable: null, and the next good read covers this interval
            // too (the base stays the last good read).
            let delta = |reason| {
                losses[slot(reason)].map(|n| n.saturating_sub(self.last_losses[slot(reason)]))
            };
            let counts = std::mem::take(&mut self.counts[id as usize]);
            classes.insert(
                name,
                ClassStats {
                    events: counts.events,
                    dropped: delta(LOSS_DROPPED),
                    lost: delta(LOSS_LOST),
                    failed: delta(LOSS_FAILED),
                    partial: delta(LOSS_PARTIAL),
                    map_full: delta(LOSS_MAP_FULL),
                    skipped: skipped(&program_stats, &self.skip_class, id),
                    undecodable: counts.undecodable,
                    filtered: counts.filtered,
                },
            );
        }
        for (last, now) in self.last_losses.iter_mut().zip(losses) {
            if let Some(now) = now {
                *last = now;
            }
        }
        self.last_programs = keep_last_known(programs, &self.last_programs);
        let cpu = sys::process::cpu_time_ns();
        let stats = AgentStats {
            interval_ns: now_mono_ns.saturating_sub(self.last_mono_ns),
            classes,
            programs: program_stats,
            decode_errors: std::mem::take(&mut self.decode_errors),
            malformed_records: std::mem::take(&mut self.malformed_records),
            // Known to the output, which sets it.
            output_dropped: 0,
            rss_bytes: rss_bytes(),
            cpu_ns: cpu.saturating_sub(self.last_cpu_ns),
        };
        self.last_cpu_ns = cpu;
        self.last_mono_ns = now_mono_ns;
        stats
    }

    /// Loss counters summed over CPUs, `None` where the map could not be
    /// read. They only grow, so deltas never lose or double-count an
    /// increment that lands between two reads.
    fn read_losses(&self) -> [Option<u64>; LOSS_SLOTS as usize] {
        std::array::from_fn(|slot| {
            let per_cpu = self.losses.get(&(slot as u32), 0).ok()?;
            Some(per_cpu.iter().sum())
        })
    }
}

/// Program name -> the class its recursion misses are reported under: the
/// class whose events it makes (`ProgramId::class`) if that class runs,
/// else the first running class that attaches it (where it only keeps
/// state for that class, for example `inet_sock_set_state` capturing
/// owners for `retrans` alone).
fn skip_classes(classes: &[(u32, &'static str, Vec<&'static str>)]) -> BTreeMap<&'static str, u32> {
    let mut out = BTreeMap::new();
    for (id, _, programs) in classes {
        for &program in programs {
            let maker = ProgramId::ALL
                .into_iter()
                .find(|p| p.name() == program)
                .map(|p| p.class() as u32);
            let runs = |c| classes.iter().any(|(id, _, _)| *id == c);
            let class = match maker {
                Some(c) if runs(c) => c,
                _ => *id,
            };
            out.entry(program).or_insert(class);
        }
    }
    out
}

/// The runs of `class`'s programs the kernel skipped in this interval;
/// `None` if the kernel does not count them for one of them.
fn skipped(
    programs: &[ProgramStats],
    skip_class: &BTreeMap<&'static str, u32>,
    class: u32,
) -> Option<u64> {
    programs
        .iter()
        .filter(|p| skip_class.get(p.name.as_str()) == Some(&class))
        .map(|p| p.recursion_misses)
        .sum()
}

/// `now`, with each program's recursion misses that could not be read
/// taken from `last`: the base of the next delta stays the last value read,
/// so an unreadable interval is null and the next one covers it.
fn keep_last_known(mut now: ProgramCounters, last: &ProgramCounters) -> ProgramCounters {
    for (name, c) in &mut now {
        if c.recursion_misses.is_none() {
            c.recursion_misses = last.get(name).and_then(|l| l.recursion_misses);
        }
    }
    now
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
                // Since load for a program not reported before; null when
                // unreadable now (see `keep_last_known`).
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

/// Resident set size, from /proc/self/statm (pages); `None` if unreadable.
fn rss_bytes() -> Option<u64> {
    let pages = fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())?;
    Some(pages * sys::process::page_size() as u64)
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
    fn skipped_runs_go_to_the_class_whose_events_they_are() {
        const RETRANS: u32 = kdiag_common::ClassId::Retrans as u32;
        const TCP: u32 = kdiag_common::ClassId::Tcp as u32;
        let retrans = (
            RETRANS,
            "retrans",
            vec!["inet_sock_set_state", "retransmit_skb"],
        );
        let tcp = (TCP, "tcp", vec!["inet_sock_set_state", "retransmit_skb"]);
        // Both run: each program's misses are its own class's.
        let both = skip_classes(&[retrans.clone(), tcp]);
        assert_eq!(both["inet_sock_set_state"], TCP);
        assert_eq!(both["retransmit_skb"], RETRANS);
        // retrans alone: it also takes the state program it attaches.
        let alone = skip_classes(&[retrans]);
        assert_eq!(alone["inet_sock_set_state"], RETRANS);
        let program = |name: &str, misses| ProgramStats {
            name: name.to_owned(),
            run_cnt: 0,
            run_time_ns: 0,
            timed_runs: 0,
            recursion_misses: misses,
        };
        let programs = [
            program("inet_sock_set_state", Some(3)),
            program("retransmit_skb", Some(1)),
        ];
        assert_eq!(skipped(&programs, &both, TCP), Some(3));
        assert_eq!(skipped(&programs, &alone, RETRANS), Some(4));
        // One program's count unknown: the class's is.
        let unknown = [
            program("inet_sock_set_state", None),
            program("retransmit_skb", Some(1)),
        ];
        assert_eq!(skipped(&unknown, &alone, RETRANS), None);
    }

    #[test]
    fn an_unreadable_miss_count_is_null_and_the_next_covers_it() {
        let misses = |n| RunCounters {
            recursion_misses: n,
            ..RunCounters::default()
        };
        let name = "inet_sock_set_state".to_owned();
        let first: ProgramCounters = [(name.clone(), misses(Some(5)))].into();
        let unreadable: ProgramCounters = [(name.clone(), misses(None))].into();
        let next: ProgramCounters = [(name.clone(), misses(Some(9)))].into();
        let mut last = ProgramCounters::new();
        assert_eq!(program_deltas(&first, &last)[0].recursion_misses, Some(5));
        last = keep_last_known(first, &last);
        assert_eq!(program_deltas(&unreadable, &last)[0].recursion_misses, None);
        last = keep_last_known(unreadable, &last);
        // 9 - 5: the unreadable interval's misses are in this one, once.
        assert_eq!(program_deltas(&next, &last)[0].recursion_misses, Some(4));
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
