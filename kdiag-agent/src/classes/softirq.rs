//! `softirq`: service time and queueing delay of softirqs per CPU and
//! vector, as interval summaries from the kernel's histograms, plus the
//! softirqs at or over `--min-latency-us` one by one.

use aya::{
    Ebpf,
    maps::{Array, MapData, PerCpuArray},
};
use clap::Args;
use kdiag_common::{
    ClassId, EventKind,
    cost::{ProgramCost, ProgramId},
    softirq::{
        FIELD_ABSENT, HIST, HIST_BUCKETS, MaxSlot, NO_DELAY, NR_SOFTIRQS, SoftirqConfig,
        SoftirqEvent, SoftirqSlot, cost_index,
    },
    stack::NO_STACKS,
};

use crate::{
    class::{Class, ClassError, Context, Global, KernelTypes, Tracepoint},
    classes::hist::{self, Latency},
    classes::{StackArgs, StackThreshold},
    kernel::tracefs::Formats,
    kernel::wire::{DecodeError, decode, trailing_stack},
    output::record::{Degraded, Softirq, SoftirqSummary},
    services::Services,
};

/// Options of `softirq`.
#[derive(Debug, Args)]
pub(crate) struct SoftirqArgs {
    /// Write a `softirq` record for every softirq whose service time or
    /// queueing delay is at or over US microseconds (0: every softirq, for
    /// debugging only). Summaries count all softirqs either way.
    #[arg(long, value_name = "US", default_value_t = 1000)]
    pub min_latency_us: u64,
    #[command(flatten)]
    pub stack: StackArgs,
}

const EXIT: Tracepoint = Tracepoint {
    group: "irq",
    name: "softirq_exit",
    program: "softirq_exit",
    btf_program: ProgramId::SoftirqExit.btf_name(),
    btf_check: None,
    required: true,
};
const ENTRY: Tracepoint = Tracepoint {
    group: "irq",
    name: "softirq_entry",
    program: "softirq_entry",
    btf_program: ProgramId::SoftirqEntry.btf_name(),
    btf_check: None,
    required: true,
};
/// Without it there are service times but no queueing delays.
const RAISE: Tracepoint = Tracepoint {
    group: "irq",
    name: "softirq_raise",
    program: "softirq_raise",
    btf_program: ProgramId::SoftirqRaise.btf_name(),
    btf_check: None,
    required: false,
};

/// Attached in this order: exit, entry, raise. An exit whose entry was not
/// seen is ignored and an entry without a raise has no delay, so no
/// softirq in flight at attach time yields a wrong measurement; the other
/// order could pair a raise with a much later entry.
const TRACEPOINTS: &[Tracepoint] = &[EXIT, ENTRY, RAISE];

/// Vector names as the kernel prints them (`softirq_to_name` in
/// kernel/softirq.c, and the tracepoints' `__print_symbolic`).
const VEC_NAMES: [&str; NR_SOFTIRQS as usize] = [
    "HI", "TIMER", "NET_TX", "NET_RX", "BLOCK", "IRQ_POLL", "TASKLET", "SCHED", "HRTIMER", "RCU",
];

/// One value per vector, indexed by vector.
type PerVec<T> = [T; NR_SOFTIRQS as usize];

/// One CPU's and vector's counters since the agent started, in u64: each
/// read of the kernel's slot adds its growth since the read before, modulo
/// 2^32 for the u32 buckets (see `SoftirqSlot`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Counts {
    service_total_ns: u64,
    service: [u64; HIST_BUCKETS],
    delay: [u64; HIST_BUCKETS],
}

impl Counts {
    const ZERO: Self = Self {
        service_total_ns: 0,
        service: [0; HIST_BUCKETS],
        delay: [0; HIST_BUCKETS],
    };

    /// Adds the growth of the kernel's slot from the read `before` to the
    /// read `now`.
    fn add(&mut self, before: &SoftirqSlot, now: &SoftirqSlot) {
        self.service_total_ns += now.service_total_ns.wrapping_sub(before.service_total_ns);
        grow(
            &mut self.service,
            &before.service_buckets,
            &now.service_buckets,
        );
        grow(&mut self.delay, &before.delay_buckets, &now.delay_buckets);
    }
}

fn grow(total: &mut [u64; HIST_BUCKETS], before: &[u32; HIST_BUCKETS], now: &[u32; HIST_BUCKETS]) {
    for ((t, b), n) in total.iter_mut().zip(before).zip(now) {
        *t += u64::from(n.wrapping_sub(*b));
    }
}

/// The kernel maps this class reads.
struct Maps {
    slots: PerCpuArray<MapData, SoftirqSlot>,
    generation: Array<MapData, u64>,
}

pub(crate) struct SoftirqClass {
    min_latency_ns: u64,
    /// Softirqs sent that ran at least this long carry their kernel stack.
    stack_min_latency_ns: u64,
    maps: Option<Maps>,
    /// The last read of the kernel's slots, per CPU and vector.
    read: Vec<PerVec<SoftirqSlot>>,
    /// Everything counted since the agent started, per CPU and vector.
    counts: Vec<PerVec<Counts>>,
    /// `counts` at the end of the last interval: counters only grow, so
    /// each interval is the difference to it.
    reported: Vec<PerVec<Counts>>,
    /// The generation the kernel programs write maxima for now.
    generation: u64,
}

impl SoftirqClass {
    pub(crate) fn new(min_latency_us: u64, stack: StackThreshold, services: &mut Services) -> Self {
        Self {
            min_latency_ns: min_latency_us.saturating_mul(1000),
            stack_min_latency_ns: services.stack_threshold_ns(stack.micros()),
            maps: None,
            read: Vec::new(),
            counts: Vec::new(),
            reported: Vec::new(),
            generation: 0,
        }
    }

    /// Reads every CPU's slots: `[cpu][vec]`.
    fn read(maps: &Maps) -> Result<Vec<PerVec<SoftirqSlot>>, ClassError> {
        let mut now: Vec<PerVec<SoftirqSlot>> = Vec::new();
        for vec in 0..NR_SOFTIRQS {
            let per_cpu = maps.slots.get(&vec, 0).map_err(|source| ClassError::Map {
                name: "SOFTIRQ",
                source,
            })?;
            for (cpu, slot) in per_cpu.iter().enumerate() {
                if now.len() <= cpu {
                    now.resize(cpu + 1, [SoftirqSlot::ZERO; NR_SOFTIRQS as usize]);
                }
                now[cpu][vec as usize] = *slot;
            }
        }
        Ok(now)
    }

    /// Reads the kernel's slots and adds their growth to `counts`.
    fn fold(&mut self) -> Result<(), ClassError> {
        let Some(maps) = &self.maps else {
            return Ok(());
        };
        let now = Self::read(maps)?;
        self.counts
            .resize(now.len(), [Counts::ZERO; NR_SOFTIRQS as usize]);
        for (cpu, slots) in now.iter().enumerate() {
            for (vec, slot) in slots.iter().enumerate() {
                let before = self.read.get(cpu).map_or(&SoftirqSlot::ZERO, |s| &s[vec]);
                self.counts[cpu][vec].add(before, slot);
            }
        }
        self.read = now;
        Ok(())
    }
}

/// The programs' run counters of every CPU's and vector's slot, summed per
/// program.
fn program_costs(slots: &[PerVec<SoftirqSlot>]) -> Vec<(ProgramId, ProgramCost)> {
    [
        ProgramId::SoftirqRaise,
        ProgramId::SoftirqEntry,
        ProgramId::SoftirqExit,
    ]
    .into_iter()
    .filter_map(|id| {
        let i = cost_index(id)?;
        let mut sum = ProgramCost::default();
        for c in slots.iter().flatten().map(|s| &s.cost[i]) {
            sum.runs += c.runs;
            sum.timed_runs += c.timed_runs;
            sum.timed_ns += c.timed_ns;
        }
        Some((id, sum))
    })
    .collect()
}

/// Decodes one `softirq` event.
pub(crate) fn decode_softirq(data: &[u8]) -> Result<SoftirqEvent, DecodeError> {
    let ev: SoftirqEvent = decode(data, EventKind::Softirq)?;
    if ev.vec >= NR_SOFTIRQS {
        return Err(DecodeError::BadField {
            field: "vec",
            value: u64::from(ev.vec),
        });
    }
    Ok(ev)
}

pub(crate) fn softirq_record(ev: &SoftirqEvent) -> Softirq {
    Softirq {
        cpu: ev.header.cpu,
        vec: VEC_NAMES[ev.vec as usize % VEC_NAMES.len()],
        service_ns: ev.service_ns,
        delay_ns: (ev.delay_ns != NO_DELAY).then_some(ev.delay_ns),
        stack: None,
    }
}

/// The summary of one CPU and vector between two points, `None` if nothing
/// ran. Maxima come from the kernel slot's `max` of `generation`, the
/// interval just ended.
pub(crate) fn summarize(
    cpu: u32,
    vec: usize,
    before: &Counts,
    now: &Counts,
    max: &[MaxSlot; 2],
    generation: u64,
    interval_ns: u64,
) -> Option<SoftirqSummary> {
    let max = max[(generation & 1) as usize];
    let (service_max, delay_max) = if max.generation == generation {
        (max.service_ns, max.delay_ns)
    } else {
        (0, 0)
    };
    let total = now.service_total_ns.saturating_sub(before.service_total_ns);
    let service = hist::summarize(
        &HIST,
        &hist::delta(&now.service, &before.service),
        service_max,
        Some(total),
    )?;
    let delay: Option<Latency> = hist::summarize(
        &HIST,
        &hist::delta(&now.delay, &before.delay),
        delay_max,
        None,
    );
    Some(SoftirqSummary {
        cpu,
        vec: VEC_NAMES.get(vec)?,
        count: service.count,
        service_total_ns: total,
        service_max_ns: service.max_ns,
        service_p99_ns: service.p99_ns,
        delay_max_ns: delay.map(|d| d.max_ns),
        delay_p99_ns: delay.map(|d| d.p99_ns),
        interval_ns,
    })
}

/// `SOFTIRQ_CONFIG` for these formats: where `vec` is in each record.
fn config(formats: &Formats, min_latency_ns: u64, degraded: &mut Vec<Degraded>) -> SoftirqConfig {
    let mut vec_offset = |tp: &Tracepoint| {
        // A tracepoint without a format was reported by the loader.
        let Some(format) = formats.get(tp.program) else {
            return FIELD_ABSENT;
        };
        match format.field("vec") {
            Some(f) if f.size == 4 => f.offset,
            _ => {
                degraded.push(Degraded {
                    what: format!("{}.vec", tp.path()),
                    why: "no 4-byte `vec` field in the tracepoint's format: not traced".to_owned(),
                });
                FIELD_ABSENT
            }
        }
    };
    SoftirqConfig {
        raise_vec: vec_offset(&RAISE),
        entry_vec: vec_offset(&ENTRY),
        exit_vec: vec_offset(&EXIT),
        _pad: 0,
        min_latency_ns,
        stack_min_latency_ns: NO_STACKS,
    }
}

impl Class for SoftirqClass {
    fn name(&self) -> &'static str {
        "softirq"
    }

    fn id(&self) -> ClassId {
        ClassId::Softirq
    }

    fn tracepoints(&self) -> &'static [Tracepoint] {
        TRACEPOINTS
    }

    fn configure(
        &mut self,
        kernel: &KernelTypes,
        degraded: &mut Vec<Degraded>,
    ) -> Result<Vec<Global>, ClassError> {
        let cfg = SoftirqConfig {
            stack_min_latency_ns: self.stack_min_latency_ns,
            ..config(&kernel.formats, self.min_latency_ns, degraded)
        };
        Ok(vec![Global::new("SOFTIRQ_CONFIG", &cfg)])
    }

    fn on_loaded(&mut self, ebpf: &mut Ebpf) -> Result<(), ClassError> {
        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(ClassError::MissingMap(name));
        let slots = PerCpuArray::try_from(take("SOFTIRQ")?).map_err(|source| ClassError::Map {
            name: "SOFTIRQ",
            source,
        })?;
        let generation =
            Array::try_from(take("SOFTIRQ_GENERATION")?).map_err(|source| ClassError::Map {
                name: "SOFTIRQ_GENERATION",
                source,
            })?;
        self.maps = Some(Maps { slots, generation });
        Ok(())
    }

    fn housekeeping(&mut self) {
        // Reads often enough that no u32 bucket wraps twice in between (see
        // `SoftirqSlot`), also with `--interval 0` or a long one. A failed
        // read loses nothing: the next one takes the growth since the last
        // that succeeded.
        let _ = self.fold();
    }

    fn handles(&self, kind: EventKind) -> bool {
        kind == EventKind::Softirq
    }

    fn program_costs(&self) -> Vec<(ProgramId, ProgramCost)> {
        // Unreadable: the runs counted in the shared map only, as for
        // every program whose counters cannot be read.
        self.maps
            .as_ref()
            .and_then(|maps| Self::read(maps).ok())
            .map_or_else(Vec::new, |slots| program_costs(&slots))
    }

    fn on_event(&mut self, data: &[u8], cx: &mut Context<'_>) -> Result<u64, ClassError> {
        let ev = decode_softirq(data)?;
        let record = Softirq {
            stack: cx.services.stack(trailing_stack::<SoftirqEvent>(data)),
            ..softirq_record(&ev)
        };
        cx.out.write(ev.header.ts_ns, &record)?;
        Ok(1)
    }

    fn on_interval(
        &mut self,
        now_ns: u64,
        interval_ns: u64,
        cx: &mut Context<'_>,
    ) -> Result<(), ClassError> {
        let Some(maps) = &mut self.maps else {
            return Ok(());
        };
        // Switch the programs to the next generation's maxima first, then
        // read: this generation's slot is complete but for a program that
        // was running during the switch (see `hist::summarize`).
        let ended = self.generation;
        maps.generation
            .set(0, ended + 1, 0)
            .map_err(|source| ClassError::Map {
                name: "SOFTIRQ_GENERATION",
                source,
            })?;
        self.generation = ended + 1;
        self.fold()?;
        // Delays the programs took in the moment between the last read and
        // a step that sheds them are left out with the rest.
        let delay_shed = cx.out.mark().is_some_and(|m| m.delay_shed);
        for (cpu, (counts, slots)) in self.counts.iter().zip(&self.read).enumerate() {
            for (vec, (now, slot)) in counts.iter().zip(slots).enumerate() {
                let before = self.reported.get(cpu).map_or(&Counts::ZERO, |r| &r[vec]);
                if let Some(mut summary) =
                    summarize(cpu as u32, vec, before, now, &slot.max, ended, interval_ns)
                {
                    let mut delays = hist::delta(&now.delay, &before.delay);
                    if delay_shed {
                        summary.delay_max_ns = None;
                        summary.delay_p99_ns = None;
                        delays.fill(0);
                    }
                    cx.out.write(now_ns, &summary)?;
                    cx.services.metrics().softirqs(
                        summary.cpu,
                        summary.vec,
                        &HIST,
                        &hist::delta(&now.service, &before.service),
                        summary.service_total_ns,
                        &delays,
                    );
                }
            }
        }
        self.reported.clone_from(&self.counts);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use kdiag_common::{EventHeader, softirq::MaxSlot};

    use super::*;
    use crate::kernel::tracefs::parse_format;

    fn event(vec: u32, delay_ns: u64) -> SoftirqEvent {
        SoftirqEvent {
            header: EventHeader {
                kind: EventKind::Softirq as u32,
                cpu: 1,
                ts_ns: 5,
            },
            vec,
            _pad: 0,
            service_ns: 1_200_000,
            delay_ns,
        }
    }

    fn bytes(ev: &SoftirqEvent) -> Vec<u8> {
        crate::sys::pod::bytes_of(ev).to_vec()
    }

    #[test]
    fn decodes_slow_events_with_and_without_a_raise() {
        let r = softirq_record(&decode_softirq(&bytes(&event(3, 40_000))).unwrap());
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::json!({"cpu": 1, "vec": "NET_RX", "service_ns": 1_200_000, "delay_ns": 40_000})
        );
        let r = softirq_record(&decode_softirq(&bytes(&event(9, NO_DELAY))).unwrap());
        assert_eq!((r.vec, r.delay_ns), ("RCU", None));
    }

    #[test]
    fn rejects_bad_vectors_and_short_events() {
        assert!(matches!(
            decode_softirq(&bytes(&event(10, 0))),
            Err(DecodeError::BadField { field: "vec", .. })
        ));
        let b = bytes(&event(1, 0));
        assert!(matches!(
            decode_softirq(&b[..b.len() - 1]),
            Err(DecodeError::Short { .. })
        ));
    }

    /// A slot after `service` samples (and `delay` ones), as the kernel
    /// programs would leave it, maxima in generation `generation`.
    fn slot(base: &SoftirqSlot, service: &[u64], delay: &[u64], generation: u64) -> SoftirqSlot {
        let mut s = *base;
        let m = &mut s.max[(generation & 1) as usize];
        if m.generation != generation {
            *m = MaxSlot {
                generation,
                ..MaxSlot::default()
            };
        }
        for &ns in service {
            s.service_total_ns += ns;
            s.service_buckets[HIST.bucket(ns)] += 1;
            m.service_ns = m.service_ns.max(ns);
        }
        for &ns in delay {
            s.delay_buckets[HIST.bucket(ns)] += 1;
            m.delay_ns = m.delay_ns.max(ns);
        }
        s
    }

    /// [`summarize`] of the growth of a kernel slot from the read `before`
    /// to the read `now`, both folded as the class folds them.
    fn summary(
        cpu: u32,
        vec: usize,
        before: &SoftirqSlot,
        now: &SoftirqSlot,
        generation: u64,
        interval_ns: u64,
    ) -> Option<SoftirqSummary> {
        let mut then = Counts::ZERO;
        then.add(&SoftirqSlot::ZERO, before);
        let mut counts = then;
        counts.add(before, now);
        summarize(cpu, vec, &then, &counts, &now.max, generation, interval_ns)
    }

    #[test]
    fn wrapped_buckets_are_counted_by_their_growth() {
        let mut before = SoftirqSlot::ZERO;
        before.service_buckets[12] = u32::MAX - 1;
        before.delay_buckets[3] = u32::MAX;
        let mut now = before;
        now.service_buckets[12] = 3;
        now.delay_buckets[3] = 0;
        let mut counts = Counts::ZERO;
        counts.add(&before, &now);
        assert_eq!((counts.service[12], counts.delay[3]), (5, 1));
        assert_eq!(counts.service.iter().sum::<u64>(), 5);
        // Reads that each see less than 2^32 more add up past 2^32.
        let mut later = now;
        later.service_buckets[12] = u32::MAX;
        counts.add(&now, &later);
        let mut last = later;
        last.service_buckets[12] = 7;
        counts.add(&later, &last);
        assert_eq!(counts.service[12], 5 + (u64::from(u32::MAX) - 3) + 8);
    }

    #[test]
    fn program_runs_are_summed_over_cpus_and_vectors_per_program() {
        let counted = |runs, timed_runs, timed_ns| ProgramCost {
            runs,
            timed_runs,
            timed_ns,
            started_ns: 99,
        };
        let mut cpu0 = [SoftirqSlot::ZERO; NR_SOFTIRQS as usize];
        cpu0[3].cost = [counted(10, 1, 100), counted(7, 1, 50), counted(7, 1, 80)];
        cpu0[9].cost[2] = counted(1, 1, 30);
        let mut cpu1 = [SoftirqSlot::ZERO; NR_SOFTIRQS as usize];
        cpu1[3].cost[0] = counted(5, 0, 0);
        let sums = program_costs(&[cpu0, cpu1]);
        let of = |id| {
            sums.iter()
                .find(|(p, _)| *p == id)
                .map(|(_, c)| (c.runs, c.timed_runs, c.timed_ns))
        };
        assert_eq!(sums.len(), 3);
        assert_eq!(of(ProgramId::SoftirqRaise), Some((15, 1, 100)));
        assert_eq!(of(ProgramId::SoftirqEntry), Some((7, 1, 50)));
        assert_eq!(of(ProgramId::SoftirqExit), Some((8, 2, 110)));
    }

    #[test]
    fn intervals_are_differences_with_their_own_maxima() {
        let first = slot(&SoftirqSlot::ZERO, &[3000, 5000], &[700, 90_000], 0);
        let s = summary(0, 3, &SoftirqSlot::ZERO, &first, 0, 1_000_000_000).unwrap();
        assert_eq!(
            serde_json::to_value(&s).unwrap(),
            serde_json::json!({
                "cpu": 0, "vec": "NET_RX", "count": 2, "service_total_ns": 8000,
                "service_max_ns": 5000, "service_p99_ns": 5000,
                "delay_max_ns": 90_000, "delay_p99_ns": 90_000, "interval_ns": 1_000_000_000
            })
        );
        // The next interval: smaller maxima in generation 1, and one entry
        // whose raise was not seen (a service sample without a delay).
        let second = slot(&first, &[100, 200, 300], &[50, 60], 1);
        let s = summary(0, 3, &first, &second, 1, 1).unwrap();
        assert_eq!((s.count, s.service_total_ns), (3, 600));
        assert_eq!((s.service_max_ns, s.delay_max_ns), (300, Some(60)));
        assert_eq!(s.service_p99_ns, 300);
        assert_eq!(s.delay_p99_ns, Some(60));
        // Nothing ran: no summary.
        assert_eq!(summary(0, 3, &second, &second, 2, 1), None);
    }

    #[test]
    fn entries_without_a_raise_have_no_delay() {
        let only_service = slot(&SoftirqSlot::ZERO, &[4000], &[], 0);
        let s = summary(1, 1, &SoftirqSlot::ZERO, &only_service, 0, 1).unwrap();
        assert_eq!(
            (s.vec, s.count, s.delay_max_ns, s.delay_p99_ns),
            ("TIMER", 1, None, None)
        );
    }

    #[test]
    fn a_stale_generation_is_no_maximum() {
        // The slot of generation 0 still holds an old maximum while the
        // interval of generation 2 is summarized: the buckets decide.
        let old = slot(&SoftirqSlot::ZERO, &[1 << 20], &[], 0);
        let mut now = old;
        now.service_total_ns += 1500;
        now.service_buckets[HIST.bucket(1500)] += 1;
        let s = summary(0, 0, &old, &now, 2, 1).unwrap();
        assert_eq!(
            (s.count, s.service_max_ns, s.service_p99_ns),
            (1, 1500, 1500)
        );
    }

    #[test]
    fn text_rows_in_microseconds() {
        use crate::output::record::Record as _;
        let only_service = slot(&SoftirqSlot::ZERO, &[4000, 1_234_567], &[], 0);
        let s = summary(1, 3, &SoftirqSlot::ZERO, &only_service, 0, 1).unwrap();
        let row = s.text_row("T");
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cols,
            [
                "T", "1", "NET_RX", "2", "1238.5", "1234.5", "1234.5", "-", "-"
            ],
            "{row}"
        );
        assert_eq!(
            SoftirqSummary::TEXT_HEADER.split_whitespace().count(),
            cols.len()
        );
        let r = softirq_record(&event(0, 2500));
        assert_eq!(
            r.text_row("T").split_whitespace().collect::<Vec<_>>(),
            ["T", "1", "HI", "1200.0", "2.5"]
        );
    }

    #[test]
    fn config_from_formats() {
        let text = "format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned int vec;\toffset:8;\tsize:4;\tsigned:0;
";
        let mut formats = Formats::default();
        formats.insert("softirq_entry", parse_format(text).unwrap());
        formats.insert("softirq_exit", parse_format(text).unwrap());
        let odd = text.replace("offset:8", "offset:12");
        formats.insert("softirq_raise", parse_format(&odd).unwrap());
        let mut degraded = Vec::new();
        let cfg = config(&formats, 7000, &mut degraded);
        assert_eq!((cfg.entry_vec, cfg.exit_vec, cfg.raise_vec), (8, 8, 12));
        assert_eq!(cfg.min_latency_ns, 7000);
        assert!(degraded.is_empty());
        // A tracepoint without the field: absent, and said so.
        let no_vec = "format:\n\tfield:int other;\toffset:8;\tsize:4;\tsigned:0;\n";
        formats.insert("softirq_raise", parse_format(no_vec).unwrap());
        let cfg = config(&formats, 0, &mut degraded);
        assert_eq!(cfg.raise_vec, FIELD_ABSENT);
        assert_eq!(degraded.len(), 1, "{degraded:?}");
        assert_eq!(degraded[0].what, "irq/softirq_raise.vec");
    }
}
