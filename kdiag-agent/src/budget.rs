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
//! Over budget for an interval, the agent steps down its ladder, where each
//! step sheds what loses the least information first: to the first step
//! whose cost it predicts within the budget (the interval's cost less the
//! run time of the programs that step stops), in one go. Steps come back
//! one at a time, when the cost measured on leaving a step, scaled by how
//! often the programs run now, has fit well within the budget for several
//! intervals.
//!
//! A step is a gate in a map the programs read (`BUDGET`), and, for the
//! softirq programs attached as BTF tracepoints, their detaching: a gated
//! program that only counts its runs still costs most of what it cost
//! measuring (the kernel's dispatch, the map lookups), so a step that stops
//! measuring detaches the programs it stops, and attaches them again when
//! measuring resumes. Attaching a BTF tracepoint program the agent already
//! holds takes no capability on the kernels that let it use its maps
//! without one, and CAP_BPF, which the agent then keeps, on the others; the
//! agent checks once, before its first record, and where it cannot, its
//! programs stay attached behind the gates (`agent_start`'s `degraded`
//! says so). Classic tracepoint programs always stay attached: attaching
//! them again would take CAP_PERFMON, which the agent gives up.

use std::io;

use aya::{
    Ebpf,
    maps::{Array, MapData},
    programs::{BtfTracePoint, ProgramError, tp_btf::BtfTracePointLinkId},
};
use kdiag_common::{ClassId, cost::BudgetGates, cost::ProgramId};

use crate::{
    attribution::procfs,
    kernel::loader::BtfLink,
    output::{
        self, Output,
        record::{BudgetChange, BudgetMark, Degraded, ProgramStats},
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
    /// Softirqs not measured at all.
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
    /// How often the programs had cause to run: their runs summed, where a
    /// softirq program counts the softirqs the kernel ran (/proc/softirqs)
    /// instead of its own runs, which stop while it is detached.
    pub runs: u64,
    /// Of `bpf_ns`: the softirq raise program's, and the entry and exit
    /// programs' (the parts the softirq steps stop).
    pub raise_ns: u64,
    pub entry_exit_ns: u64,
}

impl Cost {
    /// `softirqs`: the softirqs the kernel ran in the interval, where known.
    pub(crate) fn new(
        programs: &[ProgramStats],
        softirqs: Option<u64>,
        cpu_ns: u64,
        busy_ns: u64,
        interval_ns: u64,
    ) -> Self {
        let id = |p: &ProgramStats| ProgramId::of_entry(&p.name);
        let ns_of = |want: &[ProgramId]| -> u64 {
            programs
                .iter()
                .filter(|p| id(p).is_some_and(|i| want.contains(&i)))
                .map(|p| p.run_time_ns)
                .sum()
        };
        let runs = programs
            .iter()
            .map(|p| match (id(p).map(ProgramId::class), softirqs) {
                (Some(ClassId::Softirq), Some(n)) => n,
                _ => p.run_cnt,
            })
            .sum();
        Self {
            bpf_ns: programs.iter().map(|p| p.run_time_ns).sum(),
            runs,
            raise_ns: ns_of(&[ProgramId::SoftirqRaise]),
            entry_exit_ns: ns_of(&[ProgramId::SoftirqEntry, ProgramId::SoftirqExit]),
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

/// A change of step, as its record says it.
struct Change {
    change: &'static str,
    /// For a step up: the cost expected there.
    expected: Option<f64>,
}

/// What to do after an interval.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Decision {
    Stay,
    Down,
    /// With the cost expected at the step above.
    Up(f64),
}

/// The step the budget is at, and when to change it: after an interval
/// over budget, down to the first step predicted to fit it (see
/// [`Steps::decide`]); one step up after [`UP_AFTER`] intervals in a row in
/// which the step above was expected to cost under [`UP_MARGIN`] of the
/// budget.
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

    /// `predicted[t]`: the cost predicted at step `t` from this interval's
    /// (steps whose saving cannot be predicted save nothing in it). Over
    /// budget, the step goes down to the first step predicted to fit; to
    /// the last when none is but some saving is predicted; one step when no
    /// saving can be predicted at all (programs that stay attached), so
    /// that the next interval's measure decides.
    fn decide(&mut self, cost: &Cost, predicted: &[f64]) -> Decision {
        let pct = cost.pct();
        if pct > self.max_pct && self.step < self.last {
            let below = self.step + 1..=self.last;
            let at = |t: usize| predicted.get(t).copied().unwrap_or(pct);
            let to =
                below
                    .clone()
                    .find(|&t| at(t) <= self.max_pct)
                    .unwrap_or(if at(self.last) < pct {
                        self.last
                    } else {
                        self.step + 1
                    });
            // The steps passed over were not measured: what they would
            // have cost is taken as what this one did (no less).
            self.left.truncate(self.step);
            self.left.resize(to, *cost);
            self.calm = 0;
            self.step = to;
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

/// The share of time the softirq programs measure at `step` of `ladder`.
fn measured_fraction(ladder: &[Shed], step: usize) -> f64 {
    let sheds = |s| ladder[..step].contains(&s);
    if sheds(Shed::SoftirqOff) {
        0.0
    } else if sheds(Shed::SoftirqSampled) {
        SAMPLED_FRACTION
    } else {
        1.0
    }
}

/// Which softirq programs the steps detach.
#[derive(Debug, Clone, Copy)]
struct Detaches {
    raise: bool,
    entry_exit: bool,
}

/// The cost predicted at each step of `ladder` (0 to the last) from
/// `cost`, an interval's at `step`: less, at a step below, the run time of
/// the softirq programs it detaches (all of the raise program's; of the
/// entry and exit programs', the share of time they stop measuring). Other
/// steps are predicted to save nothing: what they save is not measured
/// apart.
fn predicted(ladder: &[Shed], step: usize, detaches: Detaches, cost: &Cost) -> Vec<f64> {
    let pct = cost.pct();
    let now = measured_fraction(ladder, step);
    let sheds = |at: usize, s| ladder[..at].contains(&s);
    (0..=ladder.len())
        .map(|t| {
            if t <= step {
                return pct;
            }
            let mut saved = 0.0;
            if detaches.raise && sheds(t, Shed::SoftirqDelay) && !sheds(step, Shed::SoftirqDelay) {
                saved += cost.raise_ns as f64;
            }
            if detaches.entry_exit && now > 0.0 {
                saved += cost.entry_exit_ns as f64 * (1.0 - measured_fraction(ladder, t) / now);
            }
            pct - 100.0 * saved / cost.measure_ns()
        })
        .collect()
}

/// A BTF tracepoint program the budget detaches and attaches again.
struct Switch {
    /// Its entry's name in the object.
    entry: &'static str,
    /// Its link while attached.
    link: Option<BtfTracePointLinkId>,
}

impl Switch {
    fn program<'e>(&self, ebpf: &'e mut Ebpf) -> Result<&'e mut BtfTracePoint, ProgramError> {
        ebpf.program_mut(self.entry)
            .ok_or(ProgramError::NotLoaded)?
            .try_into()
    }

    /// Attaches (`on`) or detaches the program, if it is not already so.
    fn set(&mut self, ebpf: &mut Ebpf, on: bool) -> Result<(), ProgramError> {
        let program = self.program(ebpf)?;
        match (on, self.link.take()) {
            (true, None) => self.link = Some(program.attach()?),
            (false, Some(link)) => program.detach(link)?,
            (_, link) => self.link = link,
        }
        Ok(())
    }

    /// Whether the kernel lets the agent, as it now is, attach the program:
    /// it attaches it a second time and detaches that link. A kernel that
    /// keys a tracepoint's programs by program (before 6.10) refuses the
    /// second link as a duplicate (EEXIST), after its permission checks.
    fn can_attach(&self, ebpf: &mut Ebpf) -> Result<(), ProgramError> {
        let program = self.program(ebpf)?;
        match program.attach() {
            Ok(link) => program.detach(link),
            Err(ProgramError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EEXIST) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}

/// The softirq programs the budget can detach, each where it is attached
/// as a BTF tracepoint.
#[derive(Default)]
pub(crate) struct Switches {
    raise: Option<Switch>,
    entry: Option<Switch>,
    exit: Option<Switch>,
}

impl Switches {
    /// The softirq programs among `links`.
    pub(crate) fn softirq(links: Vec<BtfLink>) -> Self {
        let mut switches = Self::default();
        for l in links {
            let switch = Some(Switch {
                entry: l.entry,
                link: Some(l.link),
            });
            match ProgramId::of_entry(l.program) {
                Some(ProgramId::SoftirqRaise) => switches.raise = switch,
                Some(ProgramId::SoftirqEntry) => switches.entry = switch,
                Some(ProgramId::SoftirqExit) => switches.exit = switch,
                _ => {}
            }
        }
        switches
    }

    /// The switches in the order they detach: the raise program (whose
    /// times only the entry program reads), then entry before exit, so that
    /// a handler that entered while measuring is still timed at its exit.
    /// They attach in the reverse order: exit before entry, so that no
    /// entry is recorded without the exit program there to close it (an
    /// exit whose entry was not seen is not counted: the entry time left in
    /// its slot is older than the measuring phase).
    fn in_order(&mut self) -> impl DoubleEndedIterator<Item = &mut Switch> {
        [&mut self.raise, &mut self.entry, &mut self.exit]
            .into_iter()
            .flatten()
    }

    /// Attaches the programs `gates` let measure and detaches the others.
    /// Errors are reported, not returned: a program that failed stays as it
    /// is, and the next change tries again.
    fn apply(&mut self, ebpf: &mut Ebpf, gates: &BudgetGates) {
        let measuring = gates.softirq_paused == 0;
        let raising = measuring && gates.delay_shed == 0;
        let raise = self.raise.as_ref().map(|r| r.entry);
        let on = |entry: &'static str| {
            if Some(entry) == raise {
                raising
            } else {
                measuring
            }
        };
        for s in self.in_order().filter(|s| !on(s.entry)) {
            report(s.entry, "detach", s.set(ebpf, false));
        }
        for s in self.in_order().rev().filter(|s| on(s.entry)) {
            report(s.entry, "attach", s.set(ebpf, true));
        }
    }

    /// Whether the kernel lets the agent attach its softirq programs again
    /// once it detached them; `Err` says why not.
    fn check(&self, ebpf: &mut Ebpf) -> Result<(), ProgramError> {
        [&self.raise, &self.entry, &self.exit]
            .into_iter()
            .flatten()
            .next()
            .map_or(Ok(()), |s| s.can_attach(ebpf))
    }
}

/// Says on stderr that switching `entry` failed.
fn report(entry: &str, what: &str, result: Result<(), ProgramError>) {
    if let Err(e) = result {
        output::diagnose(format_args!(
            "--max-cpu: cannot {what} {entry} ({}); the next change of step tries again",
            crate::errors::Chain(&e)
        ));
    }
}

pub(crate) struct Budget {
    max_pct: f64,
    ladder: Vec<Shed>,
    /// Whether the softirq class runs (its summaries are sampled).
    softirq: bool,
    map: Array<MapData, BudgetGates>,
    gates: BudgetGates,
    /// The softirq programs the steps detach (none where they cannot).
    switches: Switches,
    /// Why the steps cannot detach the softirq programs, for `agent_start`.
    degraded: Option<Degraded>,
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
    last_softirqs: Option<u64>,
    evaluated_ns: u64,
}

impl Budget {
    /// `max_pct` 0: no budget (full detail always); the gates stay all zero.
    /// `switches`: the softirq programs attached as BTF tracepoints, which
    /// the steps detach if the kernel lets the agent, as it now is, attach
    /// them again (checked here, on `ebpf`'s programs).
    pub(crate) fn new(
        max_pct: f64,
        classes: &[ClassId],
        map: Array<MapData, BudgetGates>,
        mut switches: Switches,
        ebpf: &mut Ebpf,
        programs: ProgramCounters,
        now_ns: u64,
    ) -> Self {
        let ladder = ladder(classes);
        let mut degraded = None;
        if max_pct == 0.0 || !ladder.contains(&Shed::SoftirqDelay) {
            switches = Switches::default();
        } else if let Err(e) = switches.check(ebpf) {
            degraded = Some(Degraded {
                what: "budget/detach".to_owned(),
                why: format!(
                    "the kernel does not let the agent attach its softirq programs again once \
                     attached ({}): the budget's softirq steps stop their measuring but leave \
                     them attached, which sheds less of their cost",
                    crate::errors::Chain(&e)
                ),
            });
            switches = Switches::default();
        }
        Self {
            max_pct,
            steps: Steps::new(max_pct, ladder.len()),
            ladder,
            softirq: classes.contains(&ClassId::Softirq),
            map,
            gates: BudgetGates::default(),
            switches,
            degraded,
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
            last_softirqs: procfs::softirqs_total(),
            evaluated_ns: now_ns,
        }
    }

    /// Why the steps leave the softirq programs attached, if they do.
    pub(crate) fn degraded(&self) -> Option<Degraded> {
        self.degraded.clone()
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
        let softirqs_now = procfs::softirqs_total();
        let softirqs = match (softirqs_now, self.last_softirqs) {
            (Some(now), Some(last)) => Some(now.saturating_sub(last)),
            _ => None,
        };
        self.last_softirqs = softirqs_now.or(self.last_softirqs);
        let cpu = sys::process::cpu_time_ns();
        let cost = Cost::new(
            &program_deltas(&programs, &self.last_programs),
            softirqs,
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
    pub(crate) fn flip(&mut self, ebpf: &mut Ebpf, now_ns: u64) {
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
        self.write_gates(ebpf);
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

    /// Hands the gates to the programs, then detaches the softirq programs
    /// they stop and attaches those they let measure (after the gates: a
    /// program attached again finds its new phase's start time). Where the
    /// kernel refuses the gates (a kernel that checks CAP_BPF on every
    /// bpf() call, and the agent was not given it: `agent_start` says so in
    /// `degraded`), the budget cannot act: it turns itself off, with full
    /// detail in force, rather than stop the agent. Returns whether the
    /// gates are in force.
    fn write_gates(&mut self, ebpf: &mut Ebpf) -> bool {
        match self.map.set(0, self.gates, 0) {
            Ok(()) => {
                self.switches.apply(ebpf, &self.gates);
                true
            }
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
                self.switches.apply(ebpf, &BudgetGates::default());
                false
            }
        }
    }

    /// The share of time the softirq programs measure at `step`.
    fn fraction_at(&self, step: usize) -> Option<f64> {
        self.softirq.then(|| measured_fraction(&self.ladder, step))
    }

    /// Compares the cost since the last evaluation (`programs`: the
    /// programs' counters now) with the budget, changes step when it must,
    /// and writes a `budget` record for each change (and for the first
    /// interval after one).
    pub(crate) fn evaluate(
        &mut self,
        ebpf: &mut Ebpf,
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
        let detaches = Detaches {
            raise: self.switches.raise.is_some(),
            entry_exit: self.switches.entry.is_some() && self.switches.exit.is_some(),
        };
        let predicted = predicted(&self.ladder, self.step, detaches, &cost);
        let change = match self.steps.decide(&cost, &predicted) {
            Decision::Stay => return Ok(()),
            Decision::Down => Change {
                change: "down",
                expected: None,
            },
            Decision::Up(expected) => Change {
                change: "up",
                expected: Some(expected),
            },
        };
        self.change_to(ebpf, self.steps.step, change, pct, cost, now_ns, out)
    }

    #[allow(clippy::too_many_arguments)]
    fn change_to(
        &mut self,
        ebpf: &mut Ebpf,
        step: usize,
        Change { change, expected }: Change,
        pct: f64,
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
        if !self.write_gates(ebpf) {
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
            ..Cost::default()
        }
    }

    /// `steps.decide` where no step's saving can be predicted.
    fn decide(steps: &mut Steps, cost: &Cost) -> Decision {
        let flat = vec![cost.pct(); steps.last + 1];
        steps.decide(cost, &flat)
    }

    #[test]
    fn without_predictions_steps_down_one_per_interval_and_stops_at_the_last() {
        let mut steps = Steps::new(1.0, 2);
        let heavy = second(30, 2, 100_000);
        assert_eq!(decide(&mut steps, &heavy), Decision::Down);
        assert_eq!(decide(&mut steps, &heavy), Decision::Down);
        assert_eq!(steps.step, 2);
        // Over budget at the last step: nothing left to shed.
        assert_eq!(decide(&mut steps, &heavy), Decision::Stay);
        assert_eq!(steps.step, 2);
    }

    #[test]
    fn steps_come_back_after_calm_intervals_only() {
        let mut steps = Steps::new(1.0, 4);
        // 12 ms of 1 s: over budget; left at 1%+ with 100k runs.
        assert_eq!(decide(&mut steps, &second(10, 2, 100_000)), Decision::Down);
        // The load falls by 100: 0.1 ms expected plus 2 ms of agent CPU,
        // 0.21%, under half the budget: back after 3 intervals.
        let calm = second(0, 2, 1_000);
        assert_eq!(decide(&mut steps, &calm), Decision::Stay);
        assert_eq!(decide(&mut steps, &calm), Decision::Stay);
        assert!(matches!(decide(&mut steps, &calm), Decision::Up(e) if (e - 0.21).abs() < 1e-9));
        assert_eq!(steps.step, 0);
    }

    #[test]
    fn no_step_back_while_the_agent_alone_is_over_half_the_budget() {
        let mut steps = Steps::new(1.0, 4);
        assert_eq!(decide(&mut steps, &second(10, 2, 100_000)), Decision::Down);
        // Few runs now, but the agent's own CPU is 0.6%: the step above
        // would not stay within half the budget, so no flapping.
        for _ in 0..10 {
            assert_eq!(decide(&mut steps, &second(0, 6, 10)), Decision::Stay);
        }
        // A load that returns midway resets the count.
        let mut steps = Steps::new(1.0, 4);
        assert_eq!(decide(&mut steps, &second(10, 2, 100_000)), Decision::Down);
        let calm = second(0, 1, 1_000);
        assert_eq!(decide(&mut steps, &calm), Decision::Stay);
        assert_eq!(decide(&mut steps, &calm), Decision::Stay);
        assert_eq!(decide(&mut steps, &second(0, 1, 90_000)), Decision::Stay);
        assert_eq!(decide(&mut steps, &calm), Decision::Stay);
        assert_eq!(steps.step, 1);
    }

    /// `run`'s ladder under a bulk transfer: 30 ms of program time in 1 s,
    /// 8 of it the raise program's and 16 the entry and exit programs'.
    fn bulk() -> Cost {
        Cost {
            raise_ns: 8_000_000,
            entry_exit_ns: 16_000_000,
            ..second(30, 2, 300_000)
        }
    }

    const DETACH: Detaches = Detaches {
        raise: true,
        entry_exit: true,
    };

    #[test]
    fn predictions_take_off_what_each_step_detaches() {
        let l = ladder(&ClassId::ALL);
        let p = predicted(&l, 0, DETACH, &bulk());
        // 3.2% at steps 0-2 (nothing they save is measured apart); less
        // the raise program at 3; less 3/4 of entry and exit at 4 (a
        // quarter of each second measured); less all of them at 5.
        let want = [3.2, 3.2, 3.2, 2.4, 1.2, 0.8];
        for (p, w) in p.iter().zip(want) {
            assert!((p - w).abs() < 1e-9, "{p} != {w}");
        }
        // From the sampled step, the entry and exit programs' time is a
        // quarter of the time: the last step saves all of it.
        let at_4 = Cost {
            raise_ns: 0,
            entry_exit_ns: 4_000_000,
            ..second(6, 2, 300_000)
        };
        let p = predicted(&l, 4, DETACH, &at_4);
        assert!((p[5] - 0.4).abs() < 1e-9, "{p:?}");
        // Programs that stay attached: nothing predicted.
        let stay = Detaches {
            raise: false,
            entry_exit: false,
        };
        assert!(
            predicted(&l, 0, stay, &bulk())
                .iter()
                .all(|&p| (p - 3.2).abs() < 1e-9)
        );
    }

    #[test]
    fn steps_down_to_the_first_step_predicted_to_fit() {
        let l = ladder(&ClassId::ALL);
        let cost = bulk();
        // Budget 1%: step 5 is the first predicted to fit.
        let mut steps = Steps::new(1.0, 5);
        let p = predicted(&l, 0, DETACH, &cost);
        assert_eq!(steps.decide(&cost, &p), Decision::Down);
        assert_eq!(steps.step, 5);
        // The steps passed over are taken as costing what step 0 did.
        assert_eq!(steps.left, vec![cost; 5]);
        // Budget 1.5%: step 4.
        let mut steps = Steps::new(1.5, 5);
        assert_eq!(steps.decide(&cost, &p), Decision::Down);
        assert_eq!(steps.step, 4);
        // Budget 0.5%: no step is predicted to fit, some saving is: the
        // last.
        let mut steps = Steps::new(0.5, 5);
        assert_eq!(steps.decide(&cost, &p), Decision::Down);
        assert_eq!(steps.step, 5);
        // Nothing predictable (programs that stay attached): one step.
        let mut steps = Steps::new(1.0, 5);
        assert_eq!(decide(&mut steps, &cost), Decision::Down);
        assert_eq!(steps.step, 1);
    }

    #[test]
    fn a_detached_program_counts_the_kernels_softirqs() {
        let program = |name: &str, run_cnt, run_time_ns| ProgramStats {
            name: name.to_owned(),
            run_cnt,
            run_time_ns,
            timed_runs: 0,
            recursion_misses: None,
        };
        let programs = [
            program("softirq_raise", 0, 0),
            program("softirq_entry", 100, 1_000),
            program("softirq_exit", 100, 2_000),
            program("inet_sock_set_state", 7, 500),
        ];
        let cost = Cost::new(&programs, Some(400), 0, 0, 1_000_000_000);
        assert_eq!(cost.runs, 3 * 400 + 7);
        assert_eq!((cost.raise_ns, cost.entry_exit_ns), (0, 3_000));
        assert_eq!(cost.bpf_ns, 3_500);
        // /proc/softirqs unreadable: the programs' own runs.
        assert_eq!(Cost::new(&programs, None, 0, 0, 1).runs, 207);
    }

    #[test]
    fn cost_against_busy_cpu_or_one_cpu() {
        let c = |bpf_ns, busy_ns| Cost {
            bpf_ns,
            cpu_ns: 0,
            busy_ns,
            interval_ns: 1_000_000_000,
            runs: 100,
            ..Cost::default()
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
