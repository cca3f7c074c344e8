//! `agent_stats`: per-class events, drops and losses, per-program kernel run
//! time, and the agent's own memory and CPU, as deltas per interval.
//!
//! The kernel's run-time statistics (`run_cnt`, `run_time_ns`) are one
//! host-wide switch: while any `BPF_ENABLE_STATS` descriptor is open, every
//! BPF program on the host, other tools' and other vendors' datapaths
//! included, pays two clock reads per run. So the agent turns them on only
//! in short windows ([`WindowSchedule`]): a tenth of the time, away from the
//! interval boundaries, and reports what its programs did in those windows
//! with how long they lasted. The descriptor is the only thing that keeps
//! them on, and the kernel closes it however the agent ends, SIGKILL
//! included.

use std::{
    collections::BTreeMap,
    fs,
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray},
};
use kdiag_common::{CLASS_COUNT, LOSS_DROPPED, LOSS_LOST, LOSS_REASONS, LOSS_SLOTS};

use crate::{
    output::record::{AgentStats, ClassStats, ProgramStats},
    sys,
};

/// What the kernel counts for one program, since it was loaded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RunCounters {
    pub run_cnt: u64,
    pub run_time_ns: u64,
    /// Runs the kernel skipped because another BPF program was running on
    /// that CPU; `None` where the kernel does not count them (before 5.12).
    pub recursion_misses: Option<u64>,
}

/// Counters per program name.
pub type ProgramCounters = BTreeMap<String, RunCounters>;

pub struct StatsCollector {
    class_names: Vec<(u32, &'static str)>,
    losses: PerCpuArray<MapData, u64>,
    /// Records written per class id since the last report.
    events: [u64; CLASS_COUNT as usize],
    last_losses: [u64; LOSS_SLOTS as usize],
    /// Cumulative counters at the last report, for `recursion_misses`
    /// (counted by the kernel whether statistics are on or not).
    last_programs: ProgramCounters,
    /// The statistics window now open: the descriptor that keeps them on,
    /// when it opened (monotonic ns) and the counters then.
    window: Option<(OwnedFd, u64, ProgramCounters)>,
    /// Runs and run time inside the windows closed since the last report.
    sampled: ProgramCounters,
    sampled_ns: u64,
    last_cpu_ns: u64,
    last_mono_ns: u64,
}

impl StatsCollector {
    pub fn new(
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
            window: None,
            sampled: BTreeMap::new(),
            sampled_ns: 0,
            last_cpu_ns: sys::process::cpu_time_ns(),
            last_mono_ns: now_mono_ns,
        }
    }

    pub fn count_events(&mut self, class: u32, n: u64) {
        if let Some(c) = self.events.get_mut(class as usize) {
            *c += n;
        }
    }

    /// Monotonic time the current interval began.
    pub fn interval_start_ns(&self) -> u64 {
        self.last_mono_ns
    }

    /// Turns the kernel's run-time statistics on until [`Self::close_window`].
    /// Without BPF_ENABLE_STATS (before 5.8) no window opens and programs
    /// report no runs.
    pub fn open_window(&mut self, ebpf: &Ebpf, now_mono_ns: u64) {
        if self.window.is_some() {
            return;
        }
        if let Ok(fd) = aya::sys::enable_stats(aya::sys::Stats::RunTime) {
            self.window = Some((fd, now_mono_ns, self.snapshot_programs(ebpf)));
        }
    }

    /// Adds what the programs did since the window opened, then turns the
    /// statistics off again (unless another holder keeps them on).
    pub fn close_window(&mut self, ebpf: &Ebpf, now_mono_ns: u64) {
        let Some((fd, opened_ns, at_open)) = self.window.take() else {
            return;
        };
        let now = self.snapshot_programs(ebpf);
        drop(fd);
        for (name, c) in &now {
            let before = at_open.get(name).copied().unwrap_or_default();
            let sum = self.sampled.entry(name.clone()).or_default();
            sum.run_cnt += c.run_cnt.saturating_sub(before.run_cnt);
            sum.run_time_ns += c.run_time_ns.saturating_sub(before.run_time_ns);
        }
        self.sampled_ns += now_mono_ns.saturating_sub(opened_ns);
    }

    /// Per-program counters; read them before the programs are unloaded.
    pub fn snapshot_programs(&self, ebpf: &Ebpf) -> ProgramCounters {
        ebpf.programs()
            .filter_map(|(name, p)| {
                let info = p.info().ok()?;
                // aya's ProgramInfo leaves out the miss counter; the kernel
                // also prints it in the program descriptor's fdinfo.
                let misses = p.fd().ok().and_then(|fd| {
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
    pub fn report(&mut self, programs: ProgramCounters, now_mono_ns: u64) -> AgentStats {
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
                },
            );
        }
        self.last_losses = losses;
        let program_stats = program_deltas(&programs, &self.last_programs, &self.sampled);
        self.last_programs = programs;
        self.sampled.clear();
        let cpu = sys::process::cpu_time_ns();
        let stats = AgentStats {
            interval_ns: now_mono_ns.saturating_sub(self.last_mono_ns),
            classes,
            programs: program_stats,
            programs_sampled_ns: std::mem::take(&mut self.sampled_ns),
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

/// When the statistics windows open and close: one every `period` (the
/// interval, at most [`MAX_PERIOD`]), a tenth of it long, in the middle of
/// the period so that it never straddles an interval's end. The first opens
/// half a second after start at most, so that short runs are measured too.
#[derive(Debug, Clone, Copy)]
pub struct WindowSchedule {
    period: Duration,
    len: Duration,
    /// When the next change is due, and whether it opens a window.
    next: Instant,
    opens: bool,
}

/// Windows come at least this often, also with `--interval 0`.
pub const MAX_PERIOD: Duration = Duration::from_secs(10);
const MIN_WINDOW: Duration = Duration::from_millis(50);

impl WindowSchedule {
    pub fn new(interval: Duration, start: Instant) -> Self {
        let period = if interval.is_zero() {
            MAX_PERIOD
        } else {
            interval.min(MAX_PERIOD)
        };
        let len = (period / 10).max(MIN_WINDOW).min(period / 2);
        Self {
            period,
            len,
            next: start + (period / 2 - len / 2).min(Duration::from_millis(500)),
            opens: true,
        }
    }

    /// When the next window opens or closes.
    pub fn next(&self) -> Instant {
        self.next
    }

    /// Moves past the change due now; returns whether it opens a window.
    pub fn advance(&mut self) -> bool {
        let opens = self.opens;
        self.next += if opens {
            self.len
        } else {
            self.period - self.len
        };
        self.opens = !opens;
        opens
    }
}

/// Each program's runs and run time in the statistics windows (`sampled`),
/// and its recursion misses since `last`.
fn program_deltas(
    now: &ProgramCounters,
    last: &ProgramCounters,
    sampled: &ProgramCounters,
) -> Vec<ProgramStats> {
    now.iter()
        .map(|(name, now)| {
            let last = last.get(name).copied().unwrap_or_default();
            let sampled = sampled.get(name).copied().unwrap_or_default();
            ProgramStats {
                name: name.clone(),
                run_cnt: sampled.run_cnt,
                run_time_ns: sampled.run_time_ns,
                recursion_misses: now
                    .recursion_misses
                    .map(|n| n.saturating_sub(last.recursion_misses.unwrap_or(0))),
            }
        })
        .collect()
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
    fn runs_come_from_the_windows_and_misses_from_the_interval() {
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
        let sampled: ProgramCounters =
            [("softirq_raise".to_owned(), counters(6, 600, None))].into();
        let deltas = program_deltas(&now, &last, &sampled);
        let by_name = |n: &str| deltas.iter().find(|p| p.name == n).unwrap();
        let raise = by_name("softirq_raise");
        assert_eq!(
            (raise.run_cnt, raise.run_time_ns, raise.recursion_misses),
            (6, 600, Some(4))
        );
        // No window saw it run: no runs, and its misses since it was loaded.
        let exit = by_name("softirq_exit");
        assert_eq!(
            (exit.run_cnt, exit.run_time_ns, exit.recursion_misses),
            (0, 0, None)
        );
    }

    #[test]
    fn windows_are_a_tenth_of_each_period_away_from_its_ends() {
        let start = Instant::now();
        let ms = Duration::from_millis;
        let mut s = WindowSchedule::new(Duration::from_secs(1), start);
        let mut changes = Vec::new();
        for _ in 0..4 {
            let at = s.next() - start;
            changes.push((at, s.advance()));
        }
        assert_eq!(
            changes,
            [
                (ms(450), true),
                (ms(550), false),
                (ms(1450), true),
                (ms(1550), false)
            ]
        );
        // Long intervals: periods of at most 10 s, the first window early.
        let mut s = WindowSchedule::new(Duration::from_secs(60), start);
        assert_eq!((s.next() - start, s.advance()), (ms(500), true));
        assert_eq!((s.next() - start, s.advance()), (ms(1500), false));
        assert_eq!(s.next() - start, ms(10_500));
        // Only at exit (-i 0): windows every 10 s all the same.
        let s = WindowSchedule::new(Duration::ZERO, start);
        assert_eq!(s.next() - start, ms(500));
    }
}
