//! `--max-cpu`: the agent's own cost, measured every interval against its
//! budget, and the steps of detail it sheds to stay within it.
//!
//! The cost of an interval is the kernel programs' run time (their own
//! sampled measurement, `output::stats`) plus the agent's CPU time, as a
//! share of the CPU time the machine spent busy in the interval, counting at
//! least one CPU's worth: the share of the work that went to observing it,
//! which is what an overhead target speaks of, without an idle machine (a
//! denominator near zero) making the agent shed detail for nothing.
//!
//! Over budget for an interval, the agent takes one step down its ladder;
//! each step sheds what loses the least information first. Steps come back
//! one at a time, when the cost measured on leaving a step, scaled by how
//! often the programs run now, has fit well within the budget for several
//! intervals. The steps are gates in a map the programs read (`BUDGET`), so
//! nothing is reloaded or detached (detaching could not be undone: attaching
//! takes privileges the agent has given up).

use std::io;

use aya::maps::{Array, MapData};
use kdiag_common::{ClassId, cost::BudgetGates};

use crate::{
    attribution::procfs,
    output::{
        self, Output,
        record::{BudgetChange, BudgetMark, ProgramStats},
        stats::{ProgramCounters, program_deltas},
    },
    sys,
};

/// What one step sheds, in ladder order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Shed {
    /// Per-event records (slow softirqs, reclaim and compaction stalls)
    /// only at or over [`RAISED_MIN_LATENCY_NS`]; summaries still count
    /// everything.
    EventThreshold,
    /// No per-packet `drop` records; `drop_summary` still counts every
    /// drop.
    DropEvents,
    /// No softirq queueing delay: the raise program records nothing.
    SoftirqDelay,
    /// Softirqs measured [`SAMPLED_FRACTION`] of the time.
    SoftirqSampled,
    /// Softirqs not measured at all (their programs count runs only).
    SoftirqOff,
}

impl Shed {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::EventThreshold => "event_threshold",
            Self::DropEvents => "drop_events",
            Self::SoftirqDelay => "softirq_delay",
            Self::SoftirqSampled => "softirq_sampled",
            Self::SoftirqOff => "softirq_off",
        }
    }
}

/// The per-event threshold of [`Shed::EventThreshold`]: 10 ms.
pub(crate) const RAISED_MIN_LATENCY_NS: u64 = 10_000_000;
/// The softirq programs' share of each [`DUTY_PERIOD_NS`] under
/// [`Shed::SoftirqSampled`].
pub(crate) const SAMPLED_FRACTION: f64 = 0.25;
/// The duty cycle's period: measuring for its first quarter, then not.
const DUTY_PERIOD_NS: u64 = 1_000_000_000;
/// The measuring phase of each duty period.
fn duty_on_ns() -> u64 {
    (DUTY_PERIOD_NS as f64 * SAMPLED_FRACTION) as u64
}

/// A step comes back when the cost expected there is under this share of
/// the budget...
const UP_MARGIN: f64 = 0.5;
/// ...for this many intervals in a row.
const UP_AFTER: u32 = 3;

/// The ladder for the classes that run: only steps that shed something.
pub(crate) fn ladder(classes: &[ClassId]) -> Vec<Shed> {
    let has = |c| classes.contains(&c);
    let mut steps = Vec::new();
    if has(ClassId::Softirq) || has(ClassId::Reclaim) || has(ClassId::Compact) {
        steps.push(Shed::EventThreshold);
    }
    if has(ClassId::Drop) {
        steps.push(Shed::DropEvents);
    }
    if has(ClassId::Softirq) {
        steps.extend([Shed::SoftirqDelay, Shed::SoftirqSampled, Shed::SoftirqOff]);
    }
    steps
}

/// One interval's cost.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Cost {
    pub bpf_ns: u64,
    pub cpu_ns: u64,
    pub busy_ns: u64,
    pub interval_ns: u64,
    /// Program runs, every program summed.
    pub runs: u64,
}

impl Cost {
    pub(crate) fn new(
        programs: &[ProgramStats],
        cpu_ns: u64,
        busy_ns: u64,
        interval_ns: u64,
    ) -> Self {
        Self {
            bpf_ns: programs.iter().map(|p| p.run_time_ns).sum(),
            runs: programs.iter().map(|p| p.run_cnt).sum(),
            cpu_ns,
            busy_ns,
            interval_ns,
        }
    }

    /// What the budget is measured against: the busy CPU time, at least
    /// one CPU's worth of the interval.
    fn measure_ns(&self) -> f64 {
        self.busy_ns.max(self.interval_ns).max(1) as f64
    }

    pub(crate) fn pct(&self) -> f64 {
        100.0 * (self.bpf_ns + self.cpu_ns) as f64 / self.measure_ns()
    }

    /// The cost this interval would have had at the step where `then` was
    /// measured: the programs' time per run then, times this interval's
    /// runs, plus the agent's CPU time then scaled the same way, but never
    /// less than its CPU time now (most of it does not shrink with the
    /// events: timers, reading the maps, writing summaries).
    fn expected_pct(&self, then: &Cost) -> f64 {
        let per_ns = |c: &Cost| c.runs as f64 / c.interval_ns.max(1) as f64;
        let scale = if then.runs == 0 {
            1.0
        } else {
            per_ns(self) / per_ns(then)
        };
        let scaled =
            |ns: u64| ns as f64 / then.interval_ns.max(1) as f64 * scale * self.interval_ns as f64;
        let ns = scaled(then.bpf_ns) + scaled(then.cpu_ns).max(self.cpu_ns as f64);
        100.0 * ns / self.measure_ns()
    }
}

/// What to do after an interval.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Decision {
    Stay,
    Down,
    /// With the cost expected at the step above.
    Up(f64),
}

/// The step the budget is at, and when to change it: one step down after
/// an interval over budget; one step up after [`UP_AFTER`] intervals in a
/// row in which the step above was expected to cost under [`UP_MARGIN`] of
/// the budget.
#[derive(Debug)]
struct Steps {
    max_pct: f64,
    /// Steps on the ladder; 0 is full detail.
    last: usize,
    step: usize,
    /// The cost measured at each step when it was left downwards.
    left: Vec<Cost>,
    /// Intervals in a row the step above looked affordable.
    calm: u32,
}

impl Steps {
    fn new(max_pct: f64, last: usize) -> Self {
        Self {
            max_pct,
            last,
            step: 0,
            left: Vec::new(),
            calm: 0,
        }
    }

    fn decide(&mut self, cost: &Cost) -> Decision {
        if cost.pct() > self.max_pct && self.step < self.last {
            self.left.truncate(self.step);
            self.left.push(*cost);
            self.calm = 0;
            self.step += 1;
            return Decision::Down;
        }
        let Some(above) = self.step.checked_sub(1) else {
            return Decision::Stay;
        };
        let expected = self.left.get(above).map(|then| cost.expected_pct(then));
        match expected {
            Some(e) if e < self.max_pct * UP_MARGIN => self.calm += 1,
            _ => self.calm = 0,
        }
        match expected {
            Some(e) if self.calm >= UP_AFTER => {
                self.calm = 0;
                self.step = above;
                Decision::Up(e)
            }
            _ => Decision::Stay,
        }
    }
}

/// The gates of `step` on `ladder` (a duty cycle in its measuring phase),
/// with measuring begun at `since_ns`.
fn gates_of(ladder: &[Shed], step: usize, since_ns: u64) -> BudgetGates {
    let sheds = |s: Shed| ladder[..step].contains(&s);
    BudgetGates {
        softirq_paused: u32::from(sheds(Shed::SoftirqOff)),
        delay_shed: u32::from(sheds(Shed::SoftirqDelay)),
        softirq_since_ns: since_ns,
        min_latency_ns: if sheds(Shed::EventThreshold) {
            RAISED_MIN_LATENCY_NS
        } else {
            0
        },
        drop_events_shed: u32::from(sheds(Shed::DropEvents)),
        _pad: 0,
    }
}

pub(crate) struct Budget {
    max_pct: f64,
    ladder: Vec<Shed>,
    /// Whether the softirq class runs (its summaries are sampled).
    softirq: bool,
    map: Array<MapData, BudgetGates>,
    gates: BudgetGates,
    /// `ladder[..steps.step]` is shed.
    steps: Steps,
    /// The step whose gates are in force.
    step: usize,
    /// A change whose result the next evaluation reports.
    changed: bool,
    /// Duty cycle: when the current phase ends.
    next_flip_ns: Option<u64>,
    /// For the summaries' mark: the highest step and the softirq programs'
    /// measuring time since the last mark, and when it was taken.
    deepest: usize,
    on_ns: u64,
    on_since_ns: Option<u64>,
    marked_ns: u64,
    /// The counters at the last evaluation, and when it was.
    last_programs: ProgramCounters,
    last_cpu_ns: u64,
    last_busy_ns: Option<u64>,
    evaluated_ns: u64,
}

impl Budget {
    /// `max_pct` 0: no budget (full detail always); the gates stay all zero.
    pub(crate) fn new(
        max_pct: f64,
        classes: &[ClassId],
        map: Array<MapData, BudgetGates>,
        programs: ProgramCounters,
        now_ns: u64,
    ) -> Self {
        Self {
            max_pct,
            ladder: ladder(classes),
            steps: Steps::new(max_pct, ladder(classes).len()),
            softirq: classes.contains(&ClassId::Softirq),
            map,
            gates: BudgetGates::default(),
            step: 0,
            changed: false,
            next_flip_ns: None,
            deepest: 0,
            on_ns: 0,
            on_since_ns: Some(now_ns),
            marked_ns: now_ns,
            last_programs: programs,
            last_cpu_ns: sys::process::cpu_time_ns(),
            last_busy_ns: procfs::busy_cpu_ns(),
            evaluated_ns: now_ns,
        }
    }

    /// The names of the steps the budget may take (none without a budget).
    pub(crate) fn steps(&self) -> Vec<&'static str> {
        if self.enabled() {
            self.ladder.iter().map(|s| s.name()).collect()
        } else {
            Vec::new()
        }
    }

    pub(crate) fn enabled(&self) -> bool {
        self.max_pct > 0.0
    }

    /// The step in force: 0 for full detail, n when the first n steps of
    /// the ladder are shed.
    pub(crate) fn step(&self) -> usize {
        self.step
    }

    /// The cost since the last evaluation, `programs` being the counters
    /// now.
    fn cost_since(&mut self, programs: ProgramCounters, now_ns: u64) -> Cost {
        let busy = procfs::busy_cpu_ns();
        let busy_ns = match (busy, self.last_busy_ns) {
            (Some(now), Some(last)) => now.saturating_sub(last),
            _ => 0,
        };
        self.last_busy_ns = busy.or(self.last_busy_ns);
        let cpu = sys::process::cpu_time_ns();
        let cost = Cost::new(
            &program_deltas(&programs, &self.last_programs),
            cpu.saturating_sub(self.last_cpu_ns),
            busy_ns,
            now_ns.saturating_sub(self.evaluated_ns),
        );
        self.last_programs = programs;
        self.last_cpu_ns = cpu;
        self.evaluated_ns = now_ns;
        cost
    }

    /// The mark for the summaries of the interval ending at `now_ns`, and
    /// the start of the next; `None` when it ran at full detail.
    pub(crate) fn take_mark(&mut self, now_ns: u64) -> Option<BudgetMark> {
        if let Some(since) = self.on_since_ns {
            self.on_ns += now_ns.saturating_sub(since);
            self.on_since_ns = Some(now_ns);
        }
        let elapsed = now_ns.saturating_sub(self.marked_ns).max(1);
        let fraction = (self.on_ns.min(elapsed) as f64 / elapsed as f64 * 1000.0).round() / 1000.0;
        let mark = (self.deepest > 0).then_some(BudgetMark {
            step: self.deepest as u32,
            sampled_fraction: fraction,
            delay_shed: self.ladder[..self.deepest].contains(&Shed::SoftirqDelay),
        });
        self.deepest = self.step;
        self.on_ns = 0;
        self.marked_ns = now_ns;
        mark
    }

    /// When the duty cycle flips next (monotonic ns), if it runs.
    pub(crate) fn next_flip_ns(&self) -> Option<u64> {
        self.next_flip_ns
    }

    /// Flips the duty cycle's phase, at `now_ns`.
    pub(crate) fn flip(&mut self, now_ns: u64) {
        let measuring = self.gates.softirq_paused == 0;
        self.set_measuring(!measuring, now_ns);
        self.next_flip_ns = Some(
            now_ns
                + if measuring {
                    DUTY_PERIOD_NS - duty_on_ns()
                } else {
                    duty_on_ns()
                },
        );
        self.write_gates();
    }

    fn set_measuring(&mut self, on: bool, now_ns: u64) {
        if on {
            self.gates.softirq_paused = 0;
            self.gates.softirq_since_ns = now_ns;
            self.on_since_ns = Some(now_ns);
        } else {
            self.gates.softirq_paused = 1;
            if let Some(since) = self.on_since_ns.take() {
                self.on_ns += now_ns.saturating_sub(since);
            }
        }
    }

    /// Hands the gates to the programs. Where the kernel refuses (a kernel
    /// that checks CAP_BPF on every bpf() call, and the agent was not given
    /// it: `agent_start` says so in `degraded`), the budget cannot act: it
    /// turns itself off, with full detail in force, rather than stop the
    /// agent. Returns whether the gates are in force.
    fn write_gates(&mut self) -> bool {
        match self.map.set(0, self.gates, 0) {
            Ok(()) => true,
            Err(e) => {
                output::diagnose(format_args!(
                    "--max-cpu: cannot write the programs' gates ({}): the budget is off",
                    crate::errors::Chain(&e)
                ));
                self.max_pct = 0.0;
                self.steps = Steps::new(0.0, 0);
                self.step = 0;
                self.deepest = 0;
                self.next_flip_ns = None;
                false
            }
        }
    }

    /// The share of time the softirq programs measure at `step`.
    fn fraction_at(&self, step: usize) -> Option<f64> {
        let sheds = |s| self.ladder[..step].contains(&s);
        self.softirq.then(|| {
            if sheds(Shed::SoftirqOff) {
                0.0
            } else if sheds(Shed::SoftirqSampled) {
                SAMPLED_FRACTION
            } else {
                1.0
            }
        })
    }

    /// Compares the cost since the last evaluation (`programs`: the
    /// programs' counters now) with the budget, changes step when it must,
    /// and writes a `budget` record for each change (and for the first
    /// interval after one).
    pub(crate) fn evaluate(
        &mut self,
        programs: ProgramCounters,
        now_ns: u64,
        out: &mut Output,
    ) -> io::Result<()> {
        if !self.enabled() {
            return Ok(());
        }
        let cost = self.cost_since(programs, now_ns);
        let pct = cost.pct();
        if std::mem::take(&mut self.changed) {
            out.write(now_ns, &self.record("result", self.step, pct, None, &cost))?;
        }
        match self.steps.decide(&cost) {
            Decision::Stay => Ok(()),
            Decision::Down => self.change_to(self.steps.step, "down", pct, None, cost, now_ns, out),
            Decision::Up(expected) => self.change_to(
                self.steps.step,
                "up",
                pct,
                Some(expected),
                cost,
                now_ns,
                out,
            ),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn change_to(
        &mut self,
        step: usize,
        change: &'static str,
        pct: f64,
        expected: Option<f64>,
        cost: Cost,
        now_ns: u64,
        out: &mut Output,
    ) -> io::Result<()> {
        let previous = self.step;
        let was_measuring = self.gates.softirq_paused == 0;
        self.step = step;
        // Evaluated right after the summaries were marked, the change
        // applies to the whole next interval; otherwise (`--interval 0`)
        // the mark keeps the deepest step since.
        self.deepest = if self.marked_ns == now_ns {
            step
        } else {
            self.deepest.max(step)
        };
        self.changed = true;
        self.gates = gates_of(&self.ladder, step, self.gates.softirq_since_ns);
        let sampled = self.ladder[..step].contains(&Shed::SoftirqSampled)
            && !self.ladder[..step].contains(&Shed::SoftirqOff);
        // The duty cycle starts (or starts over) with a measuring phase.
        self.next_flip_ns = sampled.then_some(now_ns + duty_on_ns());
        let measuring = self.gates.softirq_paused == 0;
        if measuring != was_measuring {
            self.set_measuring(measuring, now_ns);
        }
        if !self.write_gates() {
            return Ok(());
        }
        let record = BudgetChange {
            previous_step: previous as u32,
            ..self.record(change, step, pct, expected, &cost)
        };
        out.write(now_ns, &record)?;
        out.flush()
    }

    fn record(
        &self,
        change: &'static str,
        step: usize,
        pct: f64,
        expected: Option<f64>,
        cost: &Cost,
    ) -> BudgetChange {
        let round = |x: f64| (x * 1000.0).round() / 1000.0;
        BudgetChange {
            change,
            step: step as u32,
            previous_step: step as u32,
            shed: self.ladder[..step].iter().map(|s| s.name()).collect(),
            sampled_fraction: self.fraction_at(step),
            cost_pct: round(pct),
            budget_pct: self.max_pct,
            expected_pct: expected.map(round),
            bpf_ns: cost.bpf_ns,
            cpu_ns: cost.cpu_ns,
            busy_ns: cost.busy_ns,
            interval_ns: cost.interval_ns,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ladders_shed_only_what_runs() {
        assert_eq!(ladder(&[ClassId::Tcp, ClassId::Retrans]), vec![]);
        assert_eq!(ladder(&[ClassId::Reclaim]), vec![Shed::EventThreshold]);
        assert_eq!(
            ladder(&ClassId::ALL),
            vec![
                Shed::EventThreshold,
                Shed::DropEvents,
                Shed::SoftirqDelay,
                Shed::SoftirqSampled,
                Shed::SoftirqOff
            ]
        );
    }

    #[test]
    fn gates_per_step() {
        let l = ladder(&ClassId::ALL);
        assert_eq!(
            gates_of(&l, 0, 7),
            BudgetGates {
                softirq_since_ns: 7,
                ..BudgetGates::default()
            }
        );
        let g = gates_of(&l, 3, 7);
        assert_eq!(
            (
                g.min_latency_ns,
                g.drop_events_shed,
                g.delay_shed,
                g.softirq_paused
            ),
            (RAISED_MIN_LATENCY_NS, 1, 1, 0)
        );
        assert_eq!(gates_of(&l, 1, 7).drop_events_shed, 0);
        assert_eq!(gates_of(&l, 5, 7).softirq_paused, 1);
    }

    /// An interval of 1 s on an idle machine (measured against one CPU):
    /// `bpf_ms` of program time over `runs` runs, `cpu_ms` of agent CPU.
    fn second(bpf_ms: u64, cpu_ms: u64, runs: u64) -> Cost {
        Cost {
            bpf_ns: bpf_ms * 1_000_000,
            cpu_ns: cpu_ms * 1_000_000,
            busy_ns: 0,
            interval_ns: 1_000_000_000,
            runs,
        }
    }

    #[test]
    fn steps_down_one_per_interval_and_stops_at_the_last() {
        let mut steps = Steps::new(1.0, 2);
        let heavy = second(30, 2, 100_000);
        assert_eq!(steps.decide(&heavy), Decision::Down);
        assert_eq!(steps.decide(&heavy), Decision::Down);
        assert_eq!(steps.step, 2);
        // Over budget at the last step: nothing left to shed.
        assert_eq!(steps.decide(&heavy), Decision::Stay);
        assert_eq!(steps.step, 2);
    }

    #[test]
    fn steps_come_back_after_calm_intervals_only() {
        let mut steps = Steps::new(1.0, 4);
        // 12 ms of 1 s: over budget; left at 1%+ with 100k runs.
        assert_eq!(steps.decide(&second(10, 2, 100_000)), Decision::Down);
        // The load falls by 100: 0.1 ms expected plus 2 ms of agent CPU,
        // 0.21%, under half the budget: back after 3 intervals.
        let calm = second(0, 2, 1_000);
        assert_eq!(steps.decide(&calm), Decision::Stay);
        assert_eq!(steps.decide(&calm), Decision::Stay);
        assert!(matches!(steps.decide(&calm), Decision::Up(e) if (e - 0.21).abs() < 1e-9));
        assert_eq!(steps.step, 0);
    }

    #[test]
    fn no_step_back_while_the_agent_alone_is_over_half_the_budget() {
        let mut steps = Steps::new(1.0, 4);
        assert_eq!(steps.decide(&second(10, 2, 100_000)), Decision::Down);
        // Few runs now, but the agent's own CPU is 0.6%: the step above
        // would not stay within half the budget, so no flapping.
        for _ in 0..10 {
            assert_eq!(steps.decide(&second(0, 6, 10)), Decision::Stay);
        }
        // A load that returns midway resets the count.
        let mut steps = Steps::new(1.0, 4);
        assert_eq!(steps.decide(&second(10, 2, 100_000)), Decision::Down);
        let calm = second(0, 1, 1_000);
        assert_eq!(steps.decide(&calm), Decision::Stay);
        assert_eq!(steps.decide(&calm), Decision::Stay);
        assert_eq!(steps.decide(&second(0, 1, 90_000)), Decision::Stay);
        assert_eq!(steps.decide(&calm), Decision::Stay);
        assert_eq!(steps.step, 1);
    }

    #[test]
    fn cost_against_busy_cpu_or_one_cpu() {
        let c = |bpf_ns, busy_ns| Cost {
            bpf_ns,
            cpu_ns: 0,
            busy_ns,
            interval_ns: 1_000_000_000,
            runs: 100,
        };
        // A machine busier than one CPU: its busy time.
        assert_eq!(c(20_000_000, 2_000_000_000).pct(), 1.0);
        // An idle one: one CPU's worth.
        assert_eq!(c(10_000_000, 1_000_000).pct(), 1.0);
        // Half the runs now: half the cost expected at the step left.
        let now = Cost {
            runs: 50,
            ..c(0, 2_000_000_000)
        };
        assert_eq!(now.expected_pct(&c(20_000_000, 2_000_000_000)), 0.5);
    }
}
