//! The one loop: load, attach, read the transport, dispatch each event to
//! its class, tick intervals, and shut down in order: detach, drain, write
//! the final accounting.

use std::{fs, io, os::fd::AsFd as _, time::Duration};

use aya::maps::PerCpuArray;
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    attribution::procfs,
    attribution::vmstat::VmstatSampler,
    class::{Class, ClassError},
    classes::{
        memory::MemoryScope,
        memory::compact::CompactClass,
        memory::reclaim::ReclaimClass,
        softirq::SoftirqClass,
        tcp::config::TcpFilter,
        tcp::lifecycle::TcpClass,
        tcp::retrans::{OwnerFilter, RetransClass},
    },
    cli::{Cli, Command, TcpFilterArgs},
    kernel::loader::{self, LoadError},
    kernel::transport::{Reader, TransportError, TransportKind},
    kernel::wire,
    output::Output,
    output::clock::{WallClock, monotonic_ns},
    output::record::{AgentStart, Degraded},
    output::stats::{ProgramCounters, StatsCollector},
    privileges::{self, MissingPrivileges},
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Privileges(#[from] MissingPrivileges),
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("the kernel programs have no {0} map")]
    MissingMap(&'static str),
    #[error("{0}")]
    Setup(String),
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl AgentError {
    /// Exit codes of the CLI contract.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Usage(_) => 2,
            Self::Privileges(_) => 77,
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
/// How often the buffers are drained while the programs detach (see
/// `detach_all`).
const DRAIN_WHILE_DETACHING: Duration = Duration::from_millis(5);

pub async fn run(cli: Cli) -> Result<(), AgentError> {
    for &pid in &cli.global.pids {
        if !procfs::process_exists(pid) {
            return Err(AgentError::Usage(format!("--pid {pid}: no such process")));
        }
    }
    let mut classes = plan(&cli)?;
    privileges::check()?;

    let buffer_bytes = cli.global.buffer_mib << 20;
    let mut loaded = loader::load(
        &classes,
        cli.global.transport,
        buffer_bytes,
        cli.global.formats_from.as_deref(),
    )?;
    for class in &mut classes {
        class
            .on_loaded(&mut loaded.ebpf)
            .map_err(|e| AgentError::Setup(format!("{}: {e}", class.name())))?;
    }
    // Kernel run-time statistics for agent_stats, for as long as this fd is
    // open: the kernel turns them off again when the agent exits, however it
    // exits. Without them (old kernels) run counts read as zero.
    let _bpf_stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).ok();

    let mut reader = match loaded.transport {
        TransportKind::Perf => {
            Reader::perf(take_map(&mut loaded.ebpf, "PERF_EVENTS")?, buffer_bytes)?
        }
        _ => Reader::ring(take_map(&mut loaded.ebpf, "EVENTS")?)?,
    };
    // Everything that needs privileges is done: loading, attaching, opening
    // the buffers.
    let mut degraded = loaded.degraded.clone();
    if let Err(e) = privileges::drop_after_attach() {
        degraded.push(Degraded {
            what: "capabilities".to_owned(),
            why: format!("still holding them all: {}", crate::errors::Chain(&e)),
        });
    }
    let losses = PerCpuArray::try_from(take_map(&mut loaded.ebpf, "LOSSES")?)
        .map_err(|_| AgentError::MissingMap("LOSSES"))?;
    let class_names = classes.iter().map(|c| (c.id() as u32, c.name())).collect();
    let mut stats = StatsCollector::new(class_names, losses, monotonic_ns());

    let stdout = io::stdout().as_fd().try_clone_to_owned()?;
    let mut out = Output::new(
        Box::new(fs::File::from(stdout.try_clone()?)),
        cli.global.output,
        &procfs::hostname(),
        WallClock::now(),
    );
    // Before agent_start: whoever waits for that line may signal at once,
    // and a signal that came before the handlers would kill the agent
    // without its final agent_stats.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let start = AgentStart {
        version: env!("CARGO_PKG_VERSION"),
        kernel: procfs::kernel_release(),
        transport: loaded.transport.name(),
        attached: loaded.attached.iter().map(|t| t.path()).collect(),
        degraded,
    };
    out.write(monotonic_ns(), &start)?;
    out.flush()?;

    let deadline = tokio::time::sleep(
        cli.global
            .duration
            .map_or(Duration::MAX / 4, Duration::from_secs),
    );
    tokio::pin!(deadline);
    let interval_secs = cli.global.interval;
    let mut interval = tokio::time::interval(Duration::from_secs(interval_secs.max(1)));
    interval.tick().await;
    let mut stdout_check = tokio::time::interval(STDOUT_CHECK);
    let mut drain = tokio::time::interval(DRAIN_EVERY);
    drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut decode_errors = 0u64;

    let stop = loop {
        let result: io::Result<Option<Stop>> = tokio::select! {
            ready = reader.readable() => {
                ready?;
                dispatch(&mut reader, &mut classes, &mut out, &mut stats, &mut decode_errors)
                    .and_then(|()| out.flush())
                    .map(|()| None)
            }
            _ = interval.tick(), if interval_secs > 0 => {
                out.clock_mut().resync();
                let programs = stats.snapshot_programs(&loaded.ebpf);
                end_interval(&mut classes, &mut stats, programs, monotonic_ns(), &mut out)
                    .map(|()| None)
            }
            _ = drain.tick() => {
                dispatch(&mut reader, &mut classes, &mut out, &mut stats, &mut decode_errors)
                    .and_then(|()| out.flush())
                    .map(|()| None)
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
    let programs = stats.snapshot_programs(&loaded.ebpf);
    // The last interval ends when the programs stop, not after the
    // (slow: one RCU grace period per program) detaching.
    let detached_at = monotonic_ns();
    if stop == Stop::StdoutClosed {
        // Nobody reads what would be drained.
        let _ = detach_all(&mut loaded.ebpf, || Ok(()));
        return Ok(());
    }
    let mut drain = || {
        dispatch(
            &mut reader,
            &mut classes,
            &mut out,
            &mut stats,
            &mut decode_errors,
        )
    };
    // Drained while detaching, and once more after: what the programs wrote
    // last.
    let finish = detach_all(&mut loaded.ebpf, &mut drain)
        .and_then(|()| drain())
        .and_then(|()| end_interval(&mut classes, &mut stats, programs, detached_at, &mut out));
    match finish {
        Err(e) if e.kind() != io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// The classes a command runs.
fn plan(cli: &Cli) -> Result<Vec<Box<dyn Class>>, AgentError> {
    let owners = OwnerFilter::new(cli.global.pids.clone(), cli.global.cgroup.clone());
    let classes: Vec<Box<dyn Class>> = match &cli.command {
        Command::Retrans(args) => vec![Box::new(RetransClass::new(
            owners,
            tcp_filter(args, false)?,
        ))],
        Command::Tcp(args) => vec![Box::new(TcpClass::new(
            owners,
            tcp_filter(&args.filter, true)?,
            args.state,
        ))],
        Command::Run(args) => {
            // One TCP configuration for both TCP classes: they share programs.
            let tcp = tcp_filter(&args.tcp.filter, true)?;
            vec![
                Box::new(RetransClass::new(owners.clone(), tcp.clone())),
                Box::new(TcpClass::new(owners, tcp, args.tcp.state)),
                Box::new(SoftirqClass::new(args.softirq_min_latency_us)),
                // One vmstat record per interval: reclaim writes it.
                Box::new(ReclaimClass::new(
                    memory_scope(cli)?,
                    args.reclaim_kind,
                    args.reclaim_min_latency_us,
                    Some(VmstatSampler::new()),
                )),
                Box::new(CompactClass::new(
                    memory_scope(cli)?,
                    args.compact_min_latency_us,
                    None,
                )),
            ]
        }
        Command::Softirq(args) => {
            if !cli.global.pids.is_empty() || cli.global.cgroup.is_some() {
                return Err(AgentError::Usage(
                    "--pid and --cgroup do not apply to softirq: softirqs run on behalf of no \
                     process, on whatever CPU raised them, interrupting whichever task is there"
                        .to_owned(),
                ));
            }
            vec![Box::new(SoftirqClass::new(args.min_latency_us))]
        }
        Command::Reclaim(args) => vec![Box::new(ReclaimClass::new(
            memory_scope(cli)?,
            args.kind,
            args.min_latency_us,
            Some(VmstatSampler::new()),
        ))],
        Command::Compact(args) => vec![Box::new(CompactClass::new(
            memory_scope(cli)?,
            args.min_latency_us,
            Some(VmstatSampler::new()),
        ))],
    };
    Ok(classes)
}

fn tcp_filter(args: &TcpFilterArgs, stream_states: bool) -> Result<TcpFilter, AgentError> {
    TcpFilter::new(&args.ports, args.ipv4, args.ipv6, stream_states).map_err(AgentError::Usage)
}

/// `--pid` and `--cgroup` for the memory classes.
fn memory_scope(cli: &Cli) -> Result<MemoryScope, AgentError> {
    MemoryScope::new(&cli.global.pids, cli.global.cgroup.as_deref()).map_err(AgentError::Usage)
}

fn take_map(ebpf: &mut aya::Ebpf, name: &'static str) -> Result<aya::maps::Map, AgentError> {
    ebpf.take_map(name).ok_or(AgentError::MissingMap(name))
}

/// Detaches every program, calling `drain` every `DRAIN_WHILE_DETACHING`
/// until it is done (and no more after its first error). Detaching waits
/// for an RCU grace period per program, tens of milliseconds on a busy host,
/// while the programs still run: at 300k events/s the 4 MiB ring fills in
/// about 90 ms, and undrained it lost 9-12k events in 2 of 7 stops.
fn detach_all(ebpf: &mut aya::Ebpf, mut drain: impl FnMut() -> io::Result<()>) -> io::Result<()> {
    let names: Vec<String> = ebpf.programs().map(|(n, _)| n.to_owned()).collect();
    std::thread::scope(|scope| {
        let detaching = scope.spawn(|| {
            for name in names {
                if let Some(p) = ebpf.program_mut(&name)
                    && let Ok(tp) = <&mut aya::programs::TracePoint>::try_from(p)
                {
                    let _ = tp.unload();
                }
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

/// Drains the transport and hands each event to its class.
fn dispatch(
    reader: &mut Reader,
    classes: &mut [Box<dyn Class>],
    out: &mut Output,
    stats: &mut StatsCollector,
    decode_errors: &mut u64,
) -> io::Result<()> {
    let mut result = Ok(());
    // Only a mismatch between the agent and its own kernel programs can make
    // an event undecodable: say so once, count, keep going.
    let mut bad = |e: &dyn std::fmt::Display| {
        if *decode_errors == 0 {
            eprintln!("kdiag-agent: dropping an event that does not decode: {e}");
        }
        *decode_errors += 1;
    };
    reader.drain(|data| {
        if result.is_err() {
            return;
        }
        let kind = match wire::event_kind(data) {
            Ok(kind) => kind,
            Err(e) => return bad(&e),
        };
        // Several classes can want one kind: retransmits are records for
        // `retrans` and counts for `tcp`.
        let mut handled = false;
        for class in classes.iter_mut().filter(|c| c.handles(kind)) {
            handled = true;
            match class.on_event(data, out) {
                Ok(n) => stats.count_events(class.id() as u32, n),
                Err(ClassError::Output(e)) => {
                    result = Err(e);
                    return;
                }
                Err(e) => bad(&e),
            }
        }
        if !handled {
            bad(&wire::DecodeError::UnknownKind(kind as u32));
        }
    });
    result
}

/// Writes each class's summaries, then `agent_stats`, for the interval that
/// ends at `now` (monotonic).
fn end_interval(
    classes: &mut [Box<dyn Class>],
    stats: &mut StatsCollector,
    programs: ProgramCounters,
    now: u64,
    out: &mut Output,
) -> io::Result<()> {
    let interval_ns = now.saturating_sub(stats.interval_start_ns());
    for class in classes.iter_mut() {
        match class.on_interval(now, interval_ns, out) {
            Ok(()) => {}
            Err(ClassError::Output(e)) => return Err(e),
            Err(e) => eprintln!("kdiag-agent: {}: {e}", class.name()),
        }
    }
    let report = stats.report(programs, now);
    out.write(now, &report)?;
    out.flush()
}

/// A pipe whose reader has gone reports POLLERR to the writer.
fn stdout_closed(fd: &std::os::fd::OwnedFd) -> bool {
    crate::sys::fd::peer_closed(fd.as_fd())
}
