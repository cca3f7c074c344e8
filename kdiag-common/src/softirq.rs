//! Softirqs: service time (irq/softirq_entry to irq/softirq_exit) and
//! queueing delay (irq/softirq_raise to irq/softirq_entry), kept in the
//! kernel as per-CPU, per-vector log2 histograms.

use bytemuck::{Pod, Zeroable};

use crate::{
    EventHeader,
    cost::{ProgramCost, ProgramId},
    log2::Scale,
    stack::NO_STACKS,
};

/// Softirq vectors the kernel has (`NR_SOFTIRQS` in include/linux/interrupt.h,
/// 10 since 4.1: HI, TIMER, NET_TX, NET_RX, BLOCK, IRQ_POLL, TASKLET, SCHED,
/// HRTIMER, RCU).
pub const NR_SOFTIRQS: u32 = 10;

/// Service time and delay histograms: log2 buckets. Bucket 0 holds [0, 2)
/// ns, bucket `i` holds [2^i, 2^(i+1)) ns (`HIST.bucket(ns)` is
/// floor(log2(ns))), and the last one everything from 2^31 ns (2.1 s) up.
pub const HIST: Scale = Scale::new(1, 0, 31);
pub const HIST_BUCKETS: usize = HIST.buckets();
const _: () = assert!(HIST_BUCKETS == 32);

/// `delay_ns` of a softirq whose raise was not seen (the agent started while
/// it was pending, or the raise program could not run).
pub const NO_DELAY: u64 = u64::MAX;

pub use crate::FIELD_ABSENT;

/// Configuration of the softirq programs, written into `.rodata` at load.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct SoftirqConfig {
    /// Offsets of `vec` in the records of irq/softirq_raise, softirq_entry
    /// and softirq_exit (from their format files), or [`FIELD_ABSENT`].
    pub raise_vec: u16,
    pub entry_vec: u16,
    pub exit_vec: u16,
    pub _pad: u16,
    /// Softirqs whose service time or queueing delay is at or over this go
    /// out one by one as [`SoftirqEvent`]s.
    pub min_latency_ns: u64,
    /// Softirqs sent whose service time is at least this carry the kernel
    /// stack at their exit ([`crate::stack`]): what ran the handler (an
    /// interrupt's exit over some task, ksoftirqd, or a task re-enabling
    /// bottom halves) and so who paid for it. Not for a long queueing delay
    /// alone: the stack at exit does not show why the softirq waited.
    /// [`NO_STACKS`] for none.
    pub stack_min_latency_ns: u64,
}
const _: () = assert!(size_of::<SoftirqConfig>() == 24);

impl SoftirqConfig {
    pub const DEFAULT: Self = Self {
        raise_vec: FIELD_ABSENT,
        entry_vec: FIELD_ABSENT,
        exit_vec: FIELD_ABSENT,
        _pad: 0,
        min_latency_ns: u64::MAX,
        stack_min_latency_ns: NO_STACKS,
    };
}

/// The largest service time and queueing delay of one interval, tagged with
/// the interval's generation (see [`SoftirqSlot::max`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct MaxSlot {
    pub generation: u64,
    pub service_ns: u64,
    /// 0 when no delay was measured.
    pub delay_ns: u64,
}

/// Everything the programs keep for one vector on one CPU: the value type of
/// the per-CPU `SOFTIRQ` array, indexed by vector.
///
/// The counters (`service_total_ns`, the buckets) only ever grow: the agent
/// never resets them, it subtracts its previous read, so an increment that
/// lands while it reads is counted in this interval or the next, never lost
/// or counted twice. The number of softirqs is the sum of the service
/// buckets (one store less per softirq than a separate count).
///
/// The buckets are `u32`, which halves the slot (there is one per vector on
/// every CPU): they wrap, and the agent takes each read's growth modulo
/// 2^32. It reads them at least every ten seconds, whatever its interval,
/// and one bucket of one CPU would need 2^32 softirqs in between (430
/// million a second) to wrap twice.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct SoftirqSlot {
    /// First `softirq_raise` since the last entry, 0 when none is pending.
    pub raise_ns: u64,
    /// `softirq_entry` of the handler running now, 0 when none is.
    pub entry_ns: u64,
    /// Queueing delay of the handler running now, or [`NO_DELAY`].
    pub delay_ns: u64,
    pub service_total_ns: u64,
    /// The runs of the raise, entry and exit programs on this vector
    /// ([`cost_index`]), and their sampled timing: counted here, in the
    /// slot each run works on anyway, rather than in the per-program cost
    /// map: one map lookup and one cache line less per run
    /// (docs/BENCHMARKS.md). The agent adds them up per program.
    pub cost: [ProgramCost; 3],
    /// A maximum cannot be read as a difference of two reads. The agent
    /// bumps a generation every interval (the `SOFTIRQ_GENERATION` array);
    /// the programs keep the maxima of generation `g` in `max[g % 2]`,
    /// zeroing the slot when its tag is an older generation. After the bump
    /// to `g + 1` the agent reads `max[g % 2]` while the programs already
    /// write the other slot.
    pub max: [MaxSlot; 2],
    pub service_buckets: [u32; HIST_BUCKETS],
    pub delay_buckets: [u32; HIST_BUCKETS],
}
const _: () = assert!(size_of::<SoftirqSlot>() == 32 + 3 * 32 + 48 + 2 * 4 * HIST_BUCKETS);

impl SoftirqSlot {
    pub const ZERO: Self = Self {
        raise_ns: 0,
        entry_ns: 0,
        delay_ns: 0,
        service_total_ns: 0,
        cost: [ProgramCost {
            runs: 0,
            timed_runs: 0,
            timed_ns: 0,
            started_ns: 0,
        }; 3],
        max: [MaxSlot {
            generation: 0,
            service_ns: 0,
            delay_ns: 0,
        }; 2],
        service_buckets: [0; HIST_BUCKETS],
        delay_buckets: [0; HIST_BUCKETS],
    };
}

/// Where in [`SoftirqSlot::cost`] a softirq program counts its runs.
pub const fn cost_index(program: ProgramId) -> Option<usize> {
    match program {
        ProgramId::SoftirqRaise => Some(0),
        ProgramId::SoftirqEntry => Some(1),
        ProgramId::SoftirqExit => Some(2),
        _ => None,
    }
}

/// One softirq at or over the threshold. The header's `cpu` is where it ran,
/// `ts_ns` when it ended.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct SoftirqEvent {
    pub header: EventHeader,
    pub vec: u32,
    pub _pad: u32,
    pub service_ns: u64,
    /// Raise to entry, or [`NO_DELAY`].
    pub delay_ns: u64,
}
const _: () = assert!(size_of::<SoftirqEvent>() == 16 + 8 + 16);

crate::impl_pod!(SoftirqConfig, MaxSlot, SoftirqSlot, SoftirqEvent);

/// Softirq handler runs counted in a /proc/softirqs table, every vector on
/// every CPU summed (the kernel counts each run as it starts it,
/// `handle_softirqs` in kernel/softirq.c): a header line of CPU names (no
/// colon), then `VECTOR: count per CPU` for each vector.
pub fn proc_softirqs_total(table: &str) -> u64 {
    table
        .lines()
        .filter_map(|l| l.split_once(':'))
        .flat_map(|(_, counts)| counts.split_whitespace())
        .filter_map(|c| c.parse::<u64>().ok())
        .sum()
}
