//! The event classes, and the registry that makes them from the command
//! line: each subcommand and the options `run` takes for each class. One
//! module per class; the TCP and memory classes share a folder with what
//! they have in common.

pub(crate) mod drop;
pub(crate) mod hist;
pub(crate) mod memory;
pub(crate) mod softirq;
pub(crate) mod tcp;

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

use crate::{
    attribution::{
        cgroup::{MemoryHierarchy, OwnerHierarchy, find_container, resolve_in},
        owner::OwnerFilter,
    },
    class::{Class, ClassError},
    services::Services,
};
use drop::{DropArgs, DropClass};
use memory::{
    MemoryScope,
    compact::{CompactArgs, CompactClass},
    reclaim::{ReclaimArgs, ReclaimClass, ReclaimKind},
};
use softirq::{SoftirqArgs, SoftirqClass};
use tcp::{
    TcpArgs, TcpFilterArgs,
    config::{MaxSockets, TcpFilter},
    lifecycle::TcpClass,
    retrans::RetransClass,
};

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Every TCP retransmit with its state, addresses and owning process.
    ///
    /// Records: `retrans` (one per retransmit: pid, comm, cgroup, family,
    /// saddr, sport, daddr, dport, state, kind syn|synack|data, conn_retrans).
    /// Sockets created before the agent started are attributed through /proc.
    Retrans(TcpFilterArgs),
    /// TCP state changes and connection lifecycles, with owner and timing.
    ///
    /// Records: `tcp_state` (every state change: owner, addresses, old_state,
    /// new_state, old_state_ns = time spent in the state left), `tcp_conn`
    /// (when a connection closes: role active|passive, duration_ns,
    /// handshake_ns, retrans, state_ns = time per state) and, every
    /// --interval, `tcp_summary` (retransmits seen, RetransSegs/OutSegs
    /// deltas and their ratio, the connections retransmitting most).
    ///
    /// Sockets piling up in CLOSE_WAIT: `kdiag-agent tcp --state CLOSE_WAIT`
    /// shows who owns them; a client hanging in connect() shows as
    /// SYN_SENT -> CLOSE with its SYN_SENT time.
    Tcp(TcpArgs),
    /// Every class at once, in one process and one output stream: what a
    /// log pipeline wants (`kdiag-agent run | vector ...`).
    ///
    /// Class options apply to their classes: --port, -4/-6 and --state to
    /// retrans and tcp, --<class>-... to the others. --pid and
    /// --cgroup filter the classes that have processes; softirqs, which
    /// belong to none, are always reported whole.
    Run(RunArgs),
    /// Softirq latency per CPU and vector: how long handlers ran and how
    /// long they waited to run.
    ///
    /// Two latencies: service time (softirq_entry to softirq_exit, the
    /// handler running) and queueing delay (softirq_raise to softirq_entry,
    /// pending before it ran). Both are kept as histograms in the kernel,
    /// so the cost stays small at millions of softirqs a second.
    ///
    /// Records: `softirq_summary` every --interval and at exit, per CPU and
    /// vector that ran (cpu, vec, count, service_total_ns, service_max_ns,
    /// service_p99_ns, delay_max_ns, delay_p99_ns, interval_ns); `softirq`
    /// for each softirq whose service time or delay is at or over
    /// --min-latency-us (cpu, vec, service_ns, delay_ns). Vectors are named
    /// as in /proc/softirqs: HI, TIMER, NET_TX, NET_RX, BLOCK, IRQ_POLL,
    /// TASKLET, SCHED, HRTIMER, RCU. p99 is a log2-bucket upper bound (less
    /// than twice the true value, never above the max).
    ///
    /// Softirqs run on behalf of no process, so --pid and --cgroup are
    /// refused.
    #[command(verbatim_doc_comment)]
    Softirq(SoftirqArgs),
    /// Threads stalled in memory reclaim: direct (the system ran short of
    /// free pages) or memcg (their memory cgroup hit its limit), with
    /// per-process percentiles.
    ///
    /// Records: `reclaim` (one per stall at or over --min-latency-us: kind
    /// direct|memcg, pid, tid, comm, cgroup, latency_ns, nr_reclaimed,
    /// order), `reclaim_summary` (per process and kind, every --interval and
    /// at exit: count, total_ns, max_ns, p50_ns, p99_ns, nr_reclaimed; all
    /// stalls count, also those under the threshold), `vmstat` (every
    /// interval: /proc/vmstat deltas of allocstall, pgscan_direct,
    /// pgsteal_direct, compact_*, and PSI memory avg10). cgroup is the
    /// memory cgroup: v1 on hosts with the v1 memory controller.
    Reclaim(ReclaimArgs),
    /// Compaction runs (one per memory zone) with latency, status, mode
    /// and, for direct compaction, the allocation's order.
    ///
    /// Records: `compact` (one per run at or over --min-latency-us: pid,
    /// tid, comm, cgroup, latency_ns, status, mode async|sync_light|sync,
    /// order or null), `compact_summary` (per process, every --interval and
    /// at exit: count, total_ns, max_ns, p50_ns, p99_ns), `vmstat`.
    /// Background compaction shows under kcompactd, manual compaction under
    /// the process that wrote /proc/sys/vm/compact_memory.
    Compact(CompactArgs),
    /// TCP and UDP packets the kernel dropped, with the kernel's reason for
    /// each (skb/kfree_skb).
    ///
    /// Reasons are the kernel's own names (`enum skb_drop_reason`, read
    /// from the running kernel's BTF: their values differ between kernels):
    /// NETFILTER_DROP (a firewall rule), NO_SOCKET (nothing listens on the
    /// port), SOCKET_RCVBUFF (a receiver too slow for its buffer),
    /// TCP_CSUM, ... Kernels before 5.17 give no reasons: reason is null.
    ///
    /// Records: `drop` (one per dropped packet with a reason other than
    /// NOT_SPECIFIED: pid, comm, cgroup of the socket's owner where the
    /// packet has a socket (of a UDP socket: the process that held it when
    /// the agent started), protocol tcp|udp, family, saddr, sport,
    /// daddr, dport as in the packet's headers, reason, reason_code) and
    /// `drop_summary` (every --interval and at exit, per reason and
    /// protocol: count, interval_ns), which counts every drop, also those
    /// not written one by one: NOT_SPECIFIED and reason-less drops (see
    /// --all-reasons), and those of processes --pid or --cgroup leave out.
    ///
    /// Who is losing packets to the firewall: `kdiag-agent drop | grep
    /// NETFILTER_DROP`; which UDP server cannot keep up: `grep
    /// SOCKET_RCVBUFF`; which reasons dominate: the drop_summary records.
    Drop(DropArgs),
}

/// Options of `run`: those of every class.
#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    #[command(flatten)]
    pub tcp: TcpArgs,
    /// The `softirq` class's --min-latency-us.
    #[arg(long, value_name = "US", default_value_t = 1000)]
    pub softirq_min_latency_us: u64,
    /// The `reclaim` class's --kind.
    #[arg(long, value_enum, default_value = "all")]
    pub reclaim_kind: ReclaimKind,
    /// The `reclaim` class's --min-latency-us.
    #[arg(long, value_name = "US", default_value_t = 0)]
    pub reclaim_min_latency_us: u64,
    /// The `compact` class's --min-latency-us.
    #[arg(long, value_name = "US", default_value_t = 0)]
    pub compact_min_latency_us: u64,
    /// The `drop` class's --all-reasons.
    #[arg(long)]
    pub drop_all_reasons: bool,
    /// For reclaim, compact and softirq alike (default in `run`: 10000).
    #[command(flatten)]
    pub stack: StackArgs,
}

/// `--stack-min-latency-us` of the classes with slow events.
#[derive(Debug, Clone, Copy, Args)]
pub(crate) struct StackArgs {
    /// Add the kernel stack to every record at least US microseconds long
    /// (`off`: none): `stack`, its frames as "function+0xoffset", innermost
    /// first. Taken in the kernel when the stall ends, in the event itself,
    /// and named from /proc/kallsyms, read when the first stack arrives:
    /// what the stalled task was doing (a reclaim under a page fault or a
    /// write, compaction for a huge page), where only a dump of every
    /// stack would tell. For softirqs the service time counts (the stack
    /// shows what ran the handler: an interrupt's exit, ksoftirqd, a task
    /// re-enabling bottom halves), not the queueing delay. Only records
    /// written carry one: the threshold adds to --min-latency-us, it does
    /// not lower it. Each costs a stack walk in the kernel (3 to 7
    /// microseconds) and 264 bytes more in the buffer, and the first one
    /// about 2 MB of the agent's memory for the symbol table. Off by default;
    /// `run` takes stacks from 10000 (10 ms) unless given `off`.
    #[arg(long, value_name = "US|off", value_parser = stack_threshold)]
    pub stack_min_latency_us: Option<StackThreshold>,
}

impl StackArgs {
    /// The threshold given, or `default`.
    fn or(self, default: StackThreshold) -> StackThreshold {
        self.stack_min_latency_us.unwrap_or(default)
    }
}

/// A `--stack-min-latency-us`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StackThreshold {
    Off,
    Micros(u64),
}

impl StackThreshold {
    pub(crate) fn micros(self) -> Option<u64> {
        match self {
            Self::Off => None,
            Self::Micros(us) => Some(us),
        }
    }
}

/// What `run` takes stacks from without `--stack-min-latency-us`: 10 ms.
/// A memory stall that long is one a latency-sensitive service notices (a
/// request's whole budget), and far in the slow tail: memcg reclaim of
/// clean page cache at a cgroup's limit takes 20 µs a call at the median,
/// 110 µs at p99 and under 1 ms at most (the integration tests' readers,
/// 64 MiB limit), a direct compaction for a huge page 1 to 2 ms when
/// memory is full of page cache. So stacks come with the stalls worth
/// explaining, a handful a minute on a host in trouble, none on a healthy
/// one. The same threshold for softirqs, one option for all three: a
/// handler that runs 10 ms is five times the kernel's budget for a whole
/// round of softirqs (MAX_SOFTIRQ_TIME, 2 ms), as rare and as much worth
/// a stack; a threshold in the handlers' usual range (10 to 100 µs) would
/// take one for thousands of softirqs a second.
pub(crate) const RUN_STACK_THRESHOLD: StackThreshold = StackThreshold::Micros(10_000);

fn stack_threshold(arg: &str) -> Result<StackThreshold, String> {
    if arg == "off" {
        return Ok(StackThreshold::Off);
    }
    arg.parse()
        .map(StackThreshold::Micros)
        .map_err(|_| "microseconds (a whole number), or `off`".to_owned())
}

/// Whose events the classes report: `--pid`, and `--cgroup` or
/// `--container`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scope<'a> {
    pub pids: &'a [u32],
    pub cgroup: Option<&'a Path>,
    pub container: Option<&'a str>,
}

impl Scope<'_> {
    /// The cgroup to filter on in the hierarchy mounted at `mount`: the
    /// `--cgroup` given, or the container's cgroup there.
    fn cgroup_in(&self, mount: Option<&Path>) -> Result<Option<PathBuf>, ClassError> {
        let Some(id) = self.container else {
            return Ok(self.cgroup.map(Path::to_path_buf));
        };
        let Some(mount) = mount else {
            return Err(ClassError::Usage(format!(
                "--container {id}: no cgroup hierarchy to find it in is mounted on this host"
            )));
        };
        find_container(mount, id)
            .map(Some)
            .map_err(|source| ClassError::Container {
                id: id.to_owned(),
                hierarchy: mount.to_path_buf(),
                source,
            })
    }

    fn filters_processes(&self) -> bool {
        !self.pids.is_empty() || self.cgroup.is_some() || self.container.is_some()
    }
}

/// The classes `command` runs for `scope`, with the shared services they use.
pub(crate) fn build(
    command: &Command,
    scope: Scope<'_>,
    services: &mut Services,
) -> Result<Vec<Box<dyn Class>>, ClassError> {
    let owners = || owner_filter(scope);
    let memory = || {
        let cgroup = scope.cgroup_in(MemoryHierarchy::detect().mount())?;
        MemoryScope::new(scope.pids, cgroup.as_deref())
    };
    let classes: Vec<Box<dyn Class>> = match command {
        Command::Retrans(args) => vec![Box::new(RetransClass::new(
            owners()?,
            tcp_filter(args, false)?,
            services,
        ))],
        Command::Tcp(args) => vec![Box::new(TcpClass::new(
            owners()?,
            tcp_filter(&args.filter, true)?,
            args.state,
            services,
        ))],
        Command::Softirq(args) => {
            if scope.filters_processes() {
                return Err(ClassError::Usage(
                    "--pid and --cgroup do not apply to softirq: softirqs run on behalf of no \
                     process, on whatever CPU raised them, interrupting whichever task is there"
                        .to_owned(),
                ));
            }
            vec![Box::new(SoftirqClass::new(
                args.min_latency_us,
                args.stack.or(StackThreshold::Off),
                services,
            ))]
        }
        Command::Reclaim(args) => vec![Box::new(ReclaimClass::new(
            memory()?,
            args.kind,
            args.min_latency_us,
            args.stack.or(StackThreshold::Off),
            services,
        ))],
        Command::Compact(args) => vec![Box::new(CompactClass::new(
            memory()?,
            args.min_latency_us,
            args.stack.or(StackThreshold::Off),
            services,
        ))],
        Command::Drop(args) => {
            // Owners of TCP sockets are followed as for the TCP classes,
            // whatever their ports, in a socket map sized for the host.
            let tcp = TcpFilter::new(&[], false, false, false, MaxSockets::given_or_sized(None))
                .map_err(ClassError::Usage)?;
            vec![Box::new(DropClass::new(
                owners()?,
                tcp,
                args.all_reasons,
                services,
            ))]
        }
        Command::Run(args) => {
            // One TCP configuration for both TCP classes: they share programs.
            let tcp = tcp_filter(&args.tcp.filter, true)?;
            let stack = args.stack.or(RUN_STACK_THRESHOLD);
            vec![
                Box::new(RetransClass::new(owners()?, tcp.clone(), services)),
                Box::new(TcpClass::new(
                    owners()?,
                    tcp.clone(),
                    args.tcp.state,
                    services,
                )),
                Box::new(DropClass::new(
                    owners()?,
                    tcp,
                    args.drop_all_reasons,
                    services,
                )),
                Box::new(SoftirqClass::new(
                    args.softirq_min_latency_us,
                    stack,
                    services,
                )),
                Box::new(ReclaimClass::new(
                    memory()?,
                    args.reclaim_kind,
                    args.reclaim_min_latency_us,
                    stack,
                    services,
                )),
                Box::new(CompactClass::new(
                    memory()?,
                    args.compact_min_latency_us,
                    stack,
                    services,
                )),
            ]
        }
    };
    Ok(classes)
}

/// `--pid` and `--cgroup` (or `--container`) for the TCP classes. Socket
/// owners are named in one hierarchy (`OwnerHierarchy`: cgroup v2, else a
/// v1 one), so the cgroup must be one of it: a typo, or a host without it,
/// would otherwise match no process and write nothing, silently.
fn owner_filter(scope: Scope<'_>) -> Result<OwnerFilter, ClassError> {
    let hierarchy = OwnerHierarchy::detect();
    let mount = hierarchy.mount();
    let cgroup = scope.cgroup_in(mount)?;
    if let Some(path) = &cgroup {
        let Some(mount) = mount else {
            return Err(ClassError::Usage(
                "--cgroup: the TCP classes filter on the cgroups of socket owners, and no cgroup \
                 hierarchy to name them in (cgroup v2, or v1 name=systemd or memory) is mounted \
                 on this host"
                    .to_owned(),
            ));
        };
        resolve_in(mount, path).map_err(|source| ClassError::Cgroup {
            hierarchy: mount.to_path_buf(),
            source,
        })?;
    }
    Ok(OwnerFilter::new(scope.pids.to_vec(), cgroup, mount))
}

fn tcp_filter(args: &TcpFilterArgs, stream_states: bool) -> Result<TcpFilter, ClassError> {
    TcpFilter::new(
        &args.ports,
        args.ipv4,
        args.ipv6,
        stream_states,
        MaxSockets::given_or_sized(args.max_sockets),
    )
    .map_err(ClassError::Usage)
}
