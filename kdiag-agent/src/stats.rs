//! `agent_stats`: per-class events, drops and losses, per-program kernel run
//! time, and the agent's own memory and CPU, as deltas per interval.

use std::{collections::BTreeMap, fs};

use aya::{
    Ebpf,
    maps::{MapData, PerCpuArray},
};
use kdiag_common::{CLASS_COUNT, LOSS_DROPPED, LOSS_LOST, LOSS_REASONS, LOSS_SLOTS};

use crate::record::{AgentStats, ClassStats, ProgramStats};

/// Run count and run time per program name, as the kernel reports them.
pub type ProgramCounters = BTreeMap<String, (u64, u64)>;

pub struct StatsCollector {
    class_names: Vec<(u32, &'static str)>,
    losses: PerCpuArray<MapData, u64>,
    /// Records written per class id since the last report.
    events: [u64; CLASS_COUNT as usize],
    last_losses: [u64; LOSS_SLOTS as usize],
    last_programs: ProgramCounters,
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
            last_cpu_ns: cpu_ns(),
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

    /// Per-program counters; read them before the programs are unloaded.
    pub fn snapshot_programs(&self, ebpf: &Ebpf) -> ProgramCounters {
        ebpf.programs()
            .filter_map(|(name, p)| {
                let info = p.info().ok()?;
                Some((
                    name.to_owned(),
                    (info.run_count(), info.run_time().as_nanos() as u64),
                ))
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
        let program_stats = programs
            .iter()
            .map(|(name, &(cnt, time))| {
                let (last_cnt, last_time) =
                    self.last_programs.get(name).copied().unwrap_or_default();
                ProgramStats {
                    name: name.clone(),
                    run_cnt: cnt.saturating_sub(last_cnt),
                    run_time_ns: time.saturating_sub(last_time),
                }
            })
            .collect();
        self.last_programs = programs;
        let cpu = cpu_ns();
        let stats = AgentStats {
            interval_ns: now_mono_ns.saturating_sub(self.last_mono_ns),
            classes,
            programs: program_stats,
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

/// The agent's user + system CPU time.
fn cpu_ns() -> u64 {
    // SAFETY: an all-zero rusage is valid; getrusage fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer; RUSAGE_SELF cannot fail.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let tv = |t: libc::timeval| t.tv_sec as u64 * 1_000_000_000 + t.tv_usec as u64 * 1000;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Resident set size, from /proc/self/statm (pages).
fn rss_bytes() -> u64 {
    let pages = fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * u64::try_from(page).unwrap_or(4096)
}
