//! The one loop: load, attach, read the transport, dispatch each event to
//! its class, tick intervals, and shut down in order: detach, drain, write
//! the final accounting.

use std::{
    collections::VecDeque,
    fs, io,
    os::fd::{AsFd as _, BorrowedFd},
    time::{Duration, Instant},
};

use aya::{
    maps::{Array, PerCpuArray},
    programs::Program,
};
use kdiag_common::ClassId;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    attribution::procfs,
    budget::{Budget, Switches},
    class::{Class, ClassError, Context, HOUSEKEEPING},
    classes,
    cli::Cli,
    kernel::{
        loader::{self, AttachMode, LoadError, Loaded},
        transport::{Reader, TransportError, TransportKind, sizing::BufferSize},
        wire,
    },
    output::{
        self, Output,
        clock::{WallClock, monotonic_ns},
        metrics::{self, BindError, Metrics},
        record::{AgentStart, Degraded},
        stats::{ProgramCounters, StatsCollector},
    },
    privileges::{self, DropError, MissingPrivileges, RunAs, UserError},
    services::Services,
    sys,
};

#[derive(Debug, thiserror::Error)]
pub(crate) enum AgentError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Options(ClassError),
    #[error(transparent)]
    Privileges(#[from] MissingPrivileges),
    #[error(transparent)]
    User(#[from] UserError),
    #[error(transparent)]
    Drop(#[from] DropError),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("the kernel programs have no {0} map")]
    MissingMap(&'static str),
    #[error("{class}: {source}")]
    Class {
        class: &'static str,
        source: ClassError,
    },
    #[error(transparent)]
    Metrics(#[from] BindError),
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl AgentError {
    /// Exit codes of the CLI contract.
    pub(crate) fn exit_code(&self) -> i32 {
        match self {
            Self::Usage(_)
            | Self::Options(_)
            | Self::Load(LoadError::NoRingBuf)
            | Self::User(UserError::NoSuchUser(_) | UserError::Root(_))
            // An option this kernel cannot honour (found while configuring).
            | Self::Class {
                source:
                    ClassError::Usage(_) | ClassError::Cgroup { .. } | ClassError::Container { .. },
                ..
            } => 2,
            Self::Metrics(e) if e.is_usage() => 2,
            Self::Privileges(_) => 77,
            Self::Metrics(e) if e.is_permission() => 77,
            _ => 1,
        }
    }
}

/// Why the loop ended; every reason is a normal end (exit code 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Signal,
    Duration,
    StdoutClosed,
}

/// How often to check that whoever reads stdout is still there, when there
/// is nothing to write.
const STDOUT_CHECK: Duration = Duration::from_millis(250);

/// The kernel programs do not wake the agent for each event (see
/// `emit` in kdiag-ebpf): events wait at most this long in the ring.
const DRAIN_EVERY: Duration = Duration::from_millis(100);
/// The longest one drain runs before the event loop looks at its timers and
/// signals again (see `Reader::drain`).
const DRAIN_SLICE: Duration = Duration::from_millis(20);
/// How often the budget compares the cost with `--max-cpu` when there are
/// no intervals (`--interval 0`).
const BUDGET_WITHOUT_INTERVAL: Duration = Duration::from_secs(10);

/// At exit, how long the writer thread may still take to write the records
/// queued; a reader that does not take them by then (stopped, stuck) loses
/// them, counted in the last agent_stats' `output_dropped`.
const FINISH_WRITING: Duration = Duration::from_millis(250);
/// How often the buffers are drained while the programs detach (see
/// `detach_all`).
const DRAIN_WHILE_DETACHING: Duration = Duration::from_millis(5);

pub(crate) async fn run(cli: Cli) -> Result<(), AgentError> {
    for &pid in &cli.global.pids {
        if !procfs::process_exists(pid) {
            return Err(AgentError::Usage(format!("--pid {pid}: no such process")));
        }
    }
    if cli.global.metrics_addr.is_some() && cli.global.interval == 0 {
        return Err(AgentError::Usage(
            "--metrics-addr needs an --interval: the metrics are refreshed with each \
             agent_stats record, and --interval 0 writes one only at exit"
                .to_owned(),
        ));
    }
    let run_as = RunAs::lookup(&cli.global.user)?;
    // Before anything is loaded: a signal that came before the handlers
    // would kill the agent without its final agent_stats (the kernel would
    // still detach everything); one that comes while loading ends the run
    // as soon as it starts.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut services = Services::new();
    // Options the classes cannot honour are usage errors.
    let scope = classes::Scope {
        pids: &cli.global.pids,
        cgroup: cli.global.cgroup.as_deref(),
        container: cli.global.container.as_deref(),
    };
    let mut classes =
        classes::build(&cli.command, scope, &mut services).map_err(AgentError::Options)?;
    // Measured from here to just before the buffer is made.
    let buffer = BufferSize::start(
        cli.global.buffer_mib,
        classes.iter().any(|c| c.id() == ClassId::Tcp),
    );
    privileges::check()?;
    // Before loading: an agent that could not give up what it must once
    // attached would only attach to stop.
    privileges::check_drop(&run_as)?;
    services.before_loading();
    // Bound now, while the agent may still bind any port, and before
    // anything is attached: an address it cannot serve stops it first.
    let server = cli
        .global
        .metrics_addr
        .map(metrics::Server::bind)
        .transpose()?;
    let exposition = server.is_some().then(|| {
        let (registry, exposition) = Metrics::new(metrics::Limits {
            max_series: cli.global.metrics_max_series as usize,
            cgroups: cli.global.metrics_cgroups as usize,
            softirq_cpus: cli.global.metrics_softirq_cpus,
        });
        services.set_metrics(registry);
        exposition
    });

    let (mut loaded, buffer_opens_per_sec) = load(
        &mut classes,
        cli.global.attach,
        cli.global.transport,
        buffer,
        cli.global.formats_from.as_deref(),
    )?;
    let buffer_bytes = loaded.buffer_bytes;
    for class in &mut classes {
        class
            .on_loaded(&mut loaded.ebpf)
            .map_err(|source| AgentError::Class {
                class: class.name(),
                source,
            })?;
    }
    let mut reader = match loaded.transport {
        TransportKind::Perf => {
            Reader::perf(take_map(&mut loaded.ebpf, "PERF_EVENTS")?, buffer_bytes)?
        }
        _ => Reader::ring(take_map(&mut loaded.ebpf, "EVENTS")?)?,
    };
    let losses = PerCpuArray::try_from(take_map(&mut loaded.ebpf, "LOSSES")?)
        .map_err(|_| AgentError::MissingMap("LOSSES"))?;
    // The programs' own run counts and sampled times: the kernel's BPF
    // statistics are host-wide and slow every BPF program of the host, so
    // the agent never turns them on.
    let costs = PerCpuArray::try_from(take_map(&mut loaded.ebpf, "PROGRAM_COST")?)
        .map_err(|_| AgentError::MissingMap("PROGRAM_COST"))?;
    let gates = Array::try_from(take_map(&mut loaded.ebpf, "BUDGET")?)
        .map_err(|_| AgentError::MissingMap("BUDGET"))?;
    // Every map anyone reads is taken: those of the classes not running go
    // (asking which maps a program uses takes the privileges still held).
    loader::release_unused_maps(&mut loaded.ebpf);
    // Everything that needs privileges is done: loading, attaching, opening
    // the buffers; and, with every process's descriptors still readable,
    // noting who holds each socket. Should giving them up fail, the agent
    // stops, and everything it attached goes with it.
    //
    // The programs write from the moment they are attached: while the
    // descriptors are walked (tens of milliseconds, hundreds on a busy
    // host), their events are taken out of the buffers and held, to be
    // handled in order once the agent runs (at the busiest churn, the ring
    // buffer fills in under a tenth of a second).
    let mut held = Held::default();
    services.before_dropping_privileges(|| {
        if held.bytes < HELD_BYTES {
            reader.drain(Some(Instant::now() + DRAIN_SLICE), |data| {
                held.push(data.to_vec(), 0);
            });
        }
    });
    let dropped =
        privileges::drop_after_attach(&run_as, bpf_descriptor(&loaded.ebpf), server.is_some())?;
    let mut degraded = loaded.degraded.clone();
    degraded.extend(dropped.degraded.clone());
    degraded.extend(services.degraded());
    let class_programs: Vec<_> = classes
        .iter()
        .map(|c| {
            let programs = c.tracepoints().iter().map(|t| t.program).collect();
            (c.id() as u32, c.name(), programs)
        })
        .collect();
    let mut stats = StatsCollector::new(&class_programs, losses, costs, monotonic_ns());
    let class_ids: Vec<ClassId> = classes.iter().map(|c| c.id()).collect();
    let programs = stats.snapshot_programs(&loaded.ebpf, &classes);
    let mut budget = Budget::new(
        cli.global.max_cpu,
        &class_ids,
        gates,
        Switches::softirq(std::mem::take(&mut loaded.btf_links)),
        &mut loaded.ebpf,
        programs,
        monotonic_ns(),
    );
    degraded.extend(budget.degraded());
    let uncounted = stats
        .snapshot_programs(&loaded.ebpf, &classes)
        .values()
        .any(|c| c.recursion_misses.is_none());
    if uncounted {
        degraded.push(Degraded {
            what: "bpf/recursion_misses".to_owned(),
            why: "this kernel does not count the runs of a tracepoint program it skips while \
                  another BPF program runs on that CPU (counted from 6.7): agent_stats \
                  programs' recursion_misses are null"
                .to_owned(),
        });
    }

    let stdout = io::stdout().as_fd().try_clone_to_owned()?;
    // A pipe of a MiB (where the kernel allows it) holds a few thousand
    // records while its reader is busy, beside the room the writer keeps
    // for the last agent_stats.
    sys::fd::grow_pipe(stdout.as_fd(), output::writer::PIPE_BYTES);
    let mut out = Output::new(
        Box::new(fs::File::from(stdout.try_clone()?)),
        cli.global.output,
        &procfs::hostname(),
        WallClock::now(),
    )?;
    let start = AgentStart {
        version: env!("CARGO_PKG_VERSION"),
        kernel: procfs::kernel_release(),
        transport: loaded.transport.name(),
        attached: loaded
            .attached
            .iter()
            .map(|a| a.tracepoint.path())
            .collect(),
        attached_as: loaded
            .attached
            .iter()
            .map(|a| (a.tracepoint.path(), a.how.name()))
            .collect(),
        degraded,
        uid: dropped.uid,
        gid: dropped.gid,
        capabilities: privileges::cap_names(dropped.caps),
        max_cpu_pct: cli.global.max_cpu,
        budget_steps: budget.steps(),
        map_entries: std::mem::take(&mut loaded.map_entries),
        buffer_mib: buffer_bytes >> 20,
        buffer_opens_per_sec,
    };
    out.write(monotonic_ns(), &start)?;
    out.flush()?;
    if let (Some(server), Some(exposition)) = (server, exposition) {
        services.metrics().publish();
        server.spawn(exposition)?;
    }
    if cli.global.try_forbidden_syscall {
        match sys::seccomp::try_forbidden_call() {
            Ok(()) => output::diagnose(format_args!(
                "--try-forbidden-syscall: socket() was allowed"
            )),
            Err(e) => output::diagnose(format_args!(
                "--try-forbidden-syscall: socket() refused: {}",
                crate::errors::Chain(&e)
            )),
        }
    }

    let deadline = tokio::time::sleep(
        cli.global
            .duration
            .map_or(Duration::MAX / 4, Duration::from_secs),
    );
    tokio::pin!(deadline);
    let interval_secs = cli.global.interval;
    let mut interval = tokio::time::interval(Duration::from_secs(interval_secs.max(1)));
    // After a stall (the host starved the agent), one summary for the time
    // missed, not a burst of empty ones.
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await;
    let mut stdout_check = tokio::time::interval(STDOUT_CHECK);
    let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
    housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut drain = tokio::time::interval(DRAIN_EVERY);
    drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // With --interval 0 the budget still looks at the cost this often.
    let mut budget_tick = tokio::time::interval(BUDGET_WITHOUT_INTERVAL);
    budget_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    budget_tick.tick().await;
    // The last drain stopped at the end of its slice with events left.
    let mut backlog = false;

    let stop = loop {
        // The budget's duty cycle, when it runs: its next phase change.
        let flip_at = budget.next_flip_ns();
        let flip = tokio::time::sleep(Duration::from_nanos(
            flip_at.map_or(0, |at| at.saturating_sub(monotonic_ns())),
        ));
        let result: io::Result<Option<Stop>> = tokio::select! {
            ready = drain_due(&mut reader, &mut drain, backlog) => {
                ready?;
                dispatch(
                    &mut reader,
                    &mut classes,
                    &mut Context::new(&mut out, &mut services),
                    &mut stats,
                    &mut held,
                    false,
                )
                    .and_then(|more| {
                        backlog = more;
                        out.flush()
                    })
                    .map(|()| None)
            }
            _ = interval.tick(), if interval_secs > 0 => {
                let programs = stats.snapshot_programs(&loaded.ebpf, &classes);
                let now = monotonic_ns();
                end_interval(
                    &mut classes,
                    &mut stats,
                    &mut budget,
                    programs.clone(),
                    now,
                    &mut Context::new(&mut out, &mut services),
                    false,
                )
                .and_then(|()| budget.evaluate(&mut loaded.ebpf, programs, now, &mut out))
                .map(|()| None)
            }
            _ = budget_tick.tick(), if interval_secs == 0 && budget.enabled() => {
                let programs = stats.snapshot_programs(&loaded.ebpf, &classes);
                budget
                    .evaluate(&mut loaded.ebpf, programs, monotonic_ns(), &mut out)
                    .map(|()| None)
            }
            () = flip, if flip_at.is_some() => {
                budget.flip(&mut loaded.ebpf, monotonic_ns());
                Ok(None)
            }
            _ = housekeeping.tick() => {
                classes.iter_mut().for_each(|c| c.housekeeping());
                Ok(None)
            }
            _ = stdout_check.tick() => Ok(stdout_closed(&stdout).then_some(Stop::StdoutClosed)),
            _ = sigint.recv() => Ok(Some(Stop::Signal)),
            _ = sigterm.recv() => Ok(Some(Stop::Signal)),
            () = &mut deadline => Ok(Some(Stop::Duration)),
        };
        match result {
            Ok(None) => {}
            Ok(Some(stop)) => break stop,
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => break Stop::StdoutClosed,
            Err(e) => return Err(e.into()),
        }
    };

    // Detach first, so nothing new arrives; then everything already in the
    // buffers is written before the final accounting.
    let programs = stats.snapshot_programs(&loaded.ebpf, &classes);
    // The last interval ends when the programs stop, not after the
    // (slow: one RCU grace period per program) detaching.
    let detached_at = monotonic_ns();
    if stop == Stop::StdoutClosed {
        // Nobody reads what would be drained.
        let _ = detach_all(&mut loaded.ebpf, || Ok(()));
        return Ok(());
    }
    let mut cx = Context::new(&mut out, &mut services);
    let mut drain = |cx: &mut Context<'_>, at_exit| {
        dispatch(
            &mut reader,
            &mut classes,
            cx,
            &mut stats,
            &mut held,
            at_exit,
        )
    };
    // Drained while detaching, and once more after: what the programs wrote
    // last.
    let finish = detach_all(&mut loaded.ebpf, || drain(&mut cx, false).map(|_| ()))
        .and_then(|()| drain(&mut cx, true).map(|_| ()))
        .and_then(|()| {
            end_interval(
                &mut classes,
                &mut stats,
                &mut budget,
                programs,
                detached_at,
                &mut cx,
                true,
            )
        });
    match finish {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// Loads and attaches the programs of `classes`: the kernel's types for
/// their tracepoints and BTF queries, then each class's configuration of
/// its programs from them, then the object. Also returns the rate of
/// connections opened that the buffer was sized for, if measured.
fn load(
    classes: &mut [Box<dyn Class>],
    mode: AttachMode,
    transport: TransportKind,
    buffer: BufferSize,
    formats_from: Option<&std::path::Path>,
) -> Result<(Loaded, Option<u64>), AgentError> {
    let tracepoints = loader::merge_tracepoints(classes.iter().flat_map(|c| c.tracepoints()));
    let queries: Vec<_> = classes
        .iter()
        .flat_map(|c| c.btf_queries())
        .copied()
        .collect();
    // Made while this thread reads the kernel's types, which it does not
    // need.
    let preparing = loader::prepare();
    let mut degraded = Vec::new();
    let kernel = loader::kernel_types(&tracepoints, &queries, mode, formats_from, &mut degraded)?;
    let (mut globals, mut map_sizes) = (Vec::new(), Vec::new());
    for class in classes.iter_mut() {
        let configured = class.configure(&kernel, &mut degraded);
        globals.extend(configured.map_err(|source| AgentError::Class {
            class: class.name(),
            source,
        })?);
        map_sizes.extend(class.map_sizes());
    }
    // Measured over the reading of the kernel's types and the rest of
    // start-up so far.
    let buffer = buffer.sized();
    let mut loaded = loader::load(
        preparing,
        &tracepoints,
        &kernel,
        globals,
        map_sizes,
        transport,
        buffer.bytes,
    )?;
    // What reading the kernel's types and configuring found, then what
    // loading and attaching did. Classes sharing programs say the same
    // things (the TCP classes and drop each configure the TCP programs):
    // each once, in order.
    degraded.append(&mut loaded.degraded);
    let mut said = Vec::with_capacity(degraded.len());
    for d in degraded {
        if !said.contains(&d) {
            said.push(d);
        }
    }
    loaded.degraded = said;
    Ok((loaded, buffer.opens_per_sec))
}

/// A descriptor of one of the loaded programs, to probe which bpf() commands
/// need a capability.
fn bpf_descriptor(ebpf: &aya::Ebpf) -> Option<BorrowedFd<'_>> {
    ebpf.programs()
        .find_map(|(_, p)| p.fd().ok())
        .map(|fd| fd.as_fd())
}

fn take_map(ebpf: &mut aya::Ebpf, name: &'static str) -> Result<aya::maps::Map, AgentError> {
    ebpf.take_map(name).ok_or(AgentError::MissingMap(name))
}

/// Detaches every program, calling `drain` every `DRAIN_WHILE_DETACHING`
/// until it is done (and no more after its first error). Detaching waits
/// for an RCU grace period per program, tens of milliseconds on a busy host,
/// while the programs still run: at the fastest connection churn the ring
/// fills in less time than that, and undrained it overflowed at stop
/// (docs/BENCHMARKS.md, "Drops at maximum churn").
///
/// A classic tracepoint program's detach returns once no run of it is left
/// (perf_trace_event_unreg waits for a grace period); a BTF tracepoint
/// program's returns at once, while a run on another CPU may still write an
/// event or bump a counter after the drain meant to account for it. Both
/// kinds run with preemption off, inside what RCU counts as a read-side
/// section, so one grace period after the last detach (`membarrier`'s
/// global barrier) none is left.
fn detach_all(ebpf: &mut aya::Ebpf, mut drain: impl FnMut() -> io::Result<()>) -> io::Result<()> {
    std::thread::scope(|scope| {
        let detaching = scope.spawn(|| {
            let mut unwaited = false;
            for (_, program) in ebpf.programs_mut() {
                let _ = match program {
                    Program::TracePoint(p) => p.unload(),
                    Program::BtfTracePoint(p) => {
                        unwaited |= p.fd().is_ok();
                        p.unload()
                    }
                    _ => Ok(()),
                };
            }
            if unwaited {
                sys::process::wait_for_rcu_grace_period();
            }
        });
        let mut result = Ok(());
        while !detaching.is_finished() {
            if result.is_ok() {
                result = drain();
            }
            std::thread::sleep(DRAIN_WHILE_DETACHING);
        }
        result
    })
}

/// Events held while an owner or a cgroup is looked up (see
/// `attribution::owner`, `attribution::cgroup`): the first is the one
/// waiting, the rest arrived after it and wait behind it, so that records
/// keep the order of their events.
#[derive(Default)]
struct Held {
    /// Each event, and how many of the classes that handle it already did.
    events: VecDeque<(Vec<u8>, usize)>,
    bytes: usize,
}

/// The most bytes of events held: at the busiest churn, a few hundred
/// milliseconds of them. Past it the oldest are handed on without waiting
/// for their lookups.
const HELD_BYTES: usize = 8 << 20;

/// Resolves when the buffers are to be drained: when they have data or the
/// drain tick comes, or, with a `backlog` left by the last drain, once the
/// runtime has looked at its timers and signals (they come first between
/// two slices of a drain that cannot keep up).
async fn drain_due(
    reader: &mut Reader,
    tick: &mut tokio::time::Interval,
    backlog: bool,
) -> io::Result<()> {
    if backlog {
        tokio::task::yield_now().await;
        return Ok(());
    }
    tokio::select! {
        ready = reader.readable() => ready,
        _ = tick.tick() => Ok(()),
    }
}

/// Drains the transport and hands each event to its classes, after the
/// events held for their lookups, in order: for at most `DRAIN_SLICE`, all
/// of it `at_exit`. Returns whether events were left, in the buffer or
/// held.
fn dispatch(
    reader: &mut Reader,
    classes: &mut [Box<dyn Class>],
    cx: &mut Context<'_>,
    stats: &mut StatsCollector,
    held: &mut Held,
    at_exit: bool,
) -> io::Result<bool> {
    // Timestamps follow a stepped wall clock from the next drain on, with
    // `--interval 0` too.
    cx.out.clock_mut().resync();
    let first_bad = stats.decode_errors_total() == 0;
    let mut events = Events {
        classes,
        stats,
        first_bad,
        until: (!at_exit).then(|| Instant::now() + DRAIN_SLICE),
    };
    let mut result = events.release(held, cx, usize::MAX);
    if held.bytes > HELD_BYTES && !at_exit {
        // Still behind on the events held: the buffer waits, and what no
        // longer fits in it the kernel counts (`dropped`). Not at exit:
        // then everything left is handed on, held or not.
        return result.map(|()| true);
    }
    let more = reader.drain(events.until, |data| {
        if result.is_err() {
            return;
        }
        if held.events.is_empty() {
            match events.handle(data, 0, cx) {
                Ok(None) => return,
                Ok(Some(done)) => held.push(data.to_vec(), done),
                Err(e) => result = Err(e),
            }
        } else {
            held.push(data.to_vec(), 0);
        }
        if held.bytes > HELD_BYTES {
            result = events.release(held, cx, HELD_BYTES / 2);
        }
    });
    if at_exit && result.is_ok() {
        // Nothing comes after these: no lookup is waited for.
        result = events.release(held, cx, 0);
    }
    events.stats.count_malformed(reader.take_malformed());
    result.map(|()| more)
}

impl Held {
    fn push(&mut self, event: Vec<u8>, done: usize) {
        self.bytes += event.len();
        self.events.push_back((event, done));
    }
}

/// Hands events to their classes and counts what they wrote.
struct Events<'a> {
    classes: &'a mut [Box<dyn Class>],
    stats: &'a mut StatsCollector,
    /// No undecodable event was reported before this drain.
    first_bad: bool,
    /// When this drain's slice ends (`None`: at exit, no end).
    until: Option<Instant>,
}

impl Events<'_> {
    /// Hands the held events on, in order, until one still waits for its
    /// lookup or the slice ends; while more than `keep` bytes are held,
    /// without waiting.
    fn release(&mut self, held: &mut Held, cx: &mut Context<'_>, keep: usize) -> io::Result<()> {
        while self.until.is_none_or(|until| Instant::now() < until) {
            let Some((event, done)) = held.events.pop_front() else {
                break;
            };
            let forced = held.bytes > keep;
            cx.services.wait_for_lookups(!forced);
            let handled = self.handle(&event, done, cx);
            cx.services.wait_for_lookups(true);
            match handled? {
                None => held.bytes -= event.len(),
                Some(done) => {
                    held.events.push_front((event, done));
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Hands `data` to the classes that handle its kind, from the `done`th
    /// on; `Some(n)` when the `n`th waits for a lookup (the event is then
    /// to be held).
    fn handle(
        &mut self,
        data: &[u8],
        done: usize,
        cx: &mut Context<'_>,
    ) -> io::Result<Option<usize>> {
        let kind = match wire::event_kind(data) {
            Ok(kind) => kind,
            Err(e) => {
                undecodable(&mut self.first_bad, self.stats, None, &e);
                return Ok(None);
            }
        };
        // Several classes can want one kind: retransmits are records for
        // `retrans` and counts for `tcp`.
        let mut handled = false;
        let wanting = self.classes.iter_mut().filter(|c| c.handles(kind));
        for (i, class) in wanting.enumerate() {
            handled = true;
            if i < done {
                continue;
            }
            let id = class.id() as u32;
            cx.filtered = false;
            let result = class.on_event(data, cx);
            if std::mem::take(&mut cx.filtered) {
                self.stats.count_filtered(id);
            }
            match result {
                Ok(n) => self.stats.count_events(id, n),
                Err(ClassError::Output(e)) => return Err(e),
                Err(ClassError::LookupPending) => return Ok(Some(i)),
                Err(e) => undecodable(&mut self.first_bad, self.stats, Some(id), &e),
            }
        }
        if !handled {
            let e = wire::DecodeError::UnknownKind(kind as u32);
            undecodable(&mut self.first_bad, self.stats, None, &e);
        }
        Ok(None)
    }
}

/// Only a mismatch between the agent and its own kernel programs can make
/// an event undecodable: say so once (the `first` of the run), count it in
/// agent_stats (under `class` when a class's decoder refused it), keep
/// going.
fn undecodable(
    first: &mut bool,
    stats: &mut StatsCollector,
    class: Option<u32>,
    e: &dyn std::fmt::Display,
) {
    if std::mem::take(first) {
        output::diagnose(format_args!("dropping an event that does not decode: {e}"));
    }
    stats.count_decode_errors(class, 1);
}

/// Writes each class's summaries (marked with the budget's step, if it was
/// not full detail), then `agent_stats`, for the interval that ends at `now`
/// (monotonic). The `last` one is written after the writer thread had its
/// time to write the rest, and counts what it dropped.
fn end_interval(
    classes: &mut [Box<dyn Class>],
    stats: &mut StatsCollector,
    budget: &mut Budget,
    programs: ProgramCounters,
    now: u64,
    cx: &mut Context<'_>,
    last: bool,
) -> io::Result<()> {
    let interval_ns = now.saturating_sub(stats.interval_start_ns());
    cx.out.set_mark(budget.take_mark(now));
    for class in classes.iter_mut() {
        match class.on_interval(now, interval_ns, cx) {
            Ok(()) => {}
            Err(ClassError::Output(e)) => return Err(e),
            Err(e) => output::diagnose(format_args!("{}: {e}", class.name())),
        }
    }
    cx.out.set_mark(None);
    if last {
        cx.out.finish(FINISH_WRITING)?;
    }
    let mut report = stats.report(programs, now);
    report.output_dropped = cx.out.take_dropped();
    cx.services.metrics().end_interval(&report, budget.step());
    if last {
        return cx.out.write_last(now, &report);
    }
    cx.out.write(now, &report)?;
    cx.out.flush()
}

/// A pipe whose reader has gone reports POLLERR to the writer.
fn stdout_closed(fd: &std::os::fd::OwnedFd) -> bool {
    crate::sys::fd::peer_closed(fd.as_fd())
}
