//! Command line. The doc comments here are the `--help` text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use kdiag_common::DEFAULT_BUFFER_BYTES;

use crate::{kernel::transport::TransportKind, output::Format};

/// Production tracing agent: kernel events attributed to processes,
/// connections and cgroups, as JSON Lines on stdout.
///
/// Needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN): run it as root. It
/// detaches everything it attached when it exits, however it exits.
///
/// Examples:
///   sudo kdiag-agent retrans                    every TCP retransmit
///   sudo kdiag-agent retrans --port 443 -o text  one service, for people
///   sudo kdiag-agent retrans --pid 1234 -d 60    one process, for a minute
///   sudo kdiag-agent reclaim --pid 1234          its reclaim stalls, p50/p99
///   sudo kdiag-agent compact -o text             compaction runs, for people
#[derive(Debug, Parser)]
#[command(name = "kdiag-agent", version, verbatim_doc_comment)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every event class takes.
#[derive(Debug, Args)]
pub struct GlobalArgs {
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "json", global = true)]
    pub output: Format,
    /// Only events of this process (its pid, the thread group id); repeat
    /// for several. For TCP it is the process that owns the socket, not the
    /// task that happened to run when the kernel retransmitted.
    #[arg(short = 'p', long = "pid", value_name = "PID", global = true,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub pids: Vec<u32>,
    /// Only processes in this cgroup or below it: a cgroup v2 path relative
    /// to the cgroup2 mount (`/system.slice/nginx.service`) or a full path
    /// under it. For `reclaim` and `compact` on a host with the v1 memory
    /// controller, a path in the memory hierarchy instead
    /// (`/sys/fs/cgroup/memory/...`), since its limits are the ones hit.
    #[arg(short = 'c', long, value_name = "PATH", global = true)]
    pub cgroup: Option<PathBuf>,
    /// Write summaries and agent_stats every SECS seconds (0: only at exit).
    #[arg(
        short = 'i',
        long,
        value_name = "SECS",
        default_value_t = 10,
        global = true
    )]
    pub interval: u64,
    /// Stop after SECS seconds, flushing summaries first.
    #[arg(short = 'd', long, value_name = "SECS", global = true,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub duration: Option<u64>,
    /// How events travel from the kernel.
    #[arg(long, value_enum, default_value = "auto", global = true)]
    pub transport: TransportKind,
    /// Room for events on their way from the kernel to the agent, in MiB (a
    /// power of two, 1 to 1024): the BPF ring buffer, or with the perf
    /// transport the sum of the per-CPU buffers. Events that find it full
    /// are counted in agent_stats (`dropped`, or `lost` with perf); raise it
    /// when bursts lose some. It is locked kernel memory.
    #[arg(long, value_name = "MIB", global = true,
          default_value_t = DEFAULT_BUFFER_BYTES >> 20, value_parser = buffer_mib)]
    pub buffer_mib: u32,
    /// Read tracepoint formats from this directory instead of tracefs.
    /// A test seam: it shows how the agent degrades when a tracepoint is
    /// missing, without a kernel that lacks it.
    #[arg(long, value_name = "DIR", global = true, hide = true)]
    pub formats_from: Option<PathBuf>,
}

/// `--buffer-mib`: the ring buffer's size must be a power-of-two number of
/// pages; this bound keeps the shift to bytes within a u32.
fn buffer_mib(arg: &str) -> Result<u32, String> {
    match arg.parse::<u32>() {
        Ok(mib @ 1..=1024) if mib.is_power_of_two() => Ok(mib),
        _ => Err("a power of two from 1 to 1024".into()),
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
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
}

/// Options of `reclaim`.
#[derive(Debug, Args)]
pub struct ReclaimArgs {
    /// Which reclaim to trace.
    #[arg(long, value_enum, default_value = "all")]
    pub kind: crate::classes::memory::reclaim::ReclaimKind,
    /// Write `reclaim` records only for stalls of at least N microseconds;
    /// shorter ones are counted in the kernel and still appear in the
    /// summaries.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub min_latency_us: u64,
}

/// Options of `compact`.
#[derive(Debug, Args)]
pub struct CompactArgs {
    /// Write `compact` records only for runs of at least N microseconds;
    /// shorter ones still appear in the summaries.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub min_latency_us: u64,
}

/// Options of `softirq`.
#[derive(Debug, Args)]
pub struct SoftirqArgs {
    /// Write a `softirq` record for every softirq whose service time or
    /// queueing delay is at or over US microseconds (0: every softirq, for
    /// debugging only). Summaries count all softirqs either way.
    #[arg(long, value_name = "US", default_value_t = 1000)]
    pub min_latency_us: u64,
}

/// Options of `run`: those of every class.
#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub tcp: TcpArgs,
    /// The `softirq` class's --min-latency-us.
    #[arg(long, value_name = "US", default_value_t = 1000)]
    pub softirq_min_latency_us: u64,
    /// The `reclaim` class's --kind.
    #[arg(long, value_enum, default_value = "all")]
    pub reclaim_kind: crate::classes::memory::reclaim::ReclaimKind,
    /// The `reclaim` class's --min-latency-us.
    #[arg(long, value_name = "US", default_value_t = 0)]
    pub reclaim_min_latency_us: u64,
    /// The `compact` class's --min-latency-us.
    #[arg(long, value_name = "US", default_value_t = 0)]
    pub compact_min_latency_us: u64,
}

/// Options of the `tcp` class.
#[derive(Debug, Args)]
pub struct TcpArgs {
    #[command(flatten)]
    pub filter: TcpFilterArgs,
    /// Only write state changes into or out of this state (ESTABLISHED,
    /// SYN_SENT, SYN_RECV, FIN_WAIT1, FIN_WAIT2, TIME_WAIT, CLOSE,
    /// CLOSE_WAIT, LAST_ACK, LISTEN, CLOSING, NEW_SYN_RECV). tcp_conn records
    /// are still written for every connection.
    #[arg(long, value_name = "STATE", value_parser = parse_state)]
    pub state: Option<i32>,
}

fn parse_state(s: &str) -> Result<i32, String> {
    let name = s.trim_start_matches("TCP_").trim_start_matches("tcp_");
    crate::classes::tcp::state_names::state_number(name).ok_or_else(|| {
        format!("unknown TCP state {s:?}; use a kernel name such as ESTABLISHED or CLOSE_WAIT")
    })
}

/// Which connections the TCP classes report.
#[derive(Debug, Args)]
pub struct TcpFilterArgs {
    /// Only connections with this local or remote port; repeat for several
    /// (at most 8).
    #[arg(long = "port", value_name = "PORT",
          value_parser = clap::value_parser!(u16).range(1..))]
    pub ports: Vec<u16>,
    /// Only IPv4.
    #[arg(short = '4', long = "ipv4", conflicts_with = "ipv6")]
    pub ipv4: bool,
    /// Only IPv6.
    #[arg(short = '6', long = "ipv6")]
    pub ipv6: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn globals_go_before_or_after_the_subcommand() {
        let a = Cli::try_parse_from(["kdiag-agent", "-p", "7", "retrans", "--port", "80"]).unwrap();
        let b = Cli::try_parse_from(["kdiag-agent", "retrans", "--port", "80", "-p", "7"]).unwrap();
        assert_eq!(a.global.pids, vec![7]);
        assert_eq!(b.global.pids, vec![7]);
        assert_eq!(a.global.buffer_mib, 4);
        let d = Cli::try_parse_from(["kdiag-agent", "tcp", "--buffer-mib", "64"]).unwrap();
        assert_eq!(d.global.buffer_mib, 64);
        let c =
            Cli::try_parse_from(["kdiag-agent", "reclaim", "--kind", "memcg", "-p", "7"]).unwrap();
        assert!(matches!(
            c.command,
            Command::Reclaim(ReclaimArgs {
                min_latency_us: 0,
                ..
            })
        ));
    }

    #[test]
    fn state_names() {
        let cli = Cli::try_parse_from(["kdiag-agent", "tcp", "--state", "close_wait"]).unwrap();
        let Command::Tcp(args) = cli.command else {
            panic!("not tcp")
        };
        assert_eq!(args.state, Some(8));
    }

    #[test]
    fn rejects_bad_values() {
        for args in [
            &["kdiag-agent", "retrans", "--pid", "0"][..],
            &["kdiag-agent", "retrans", "--pid", "abc"],
            &["kdiag-agent", "retrans", "--port", "0"],
            &["kdiag-agent", "retrans", "-4", "-6"],
            &["kdiag-agent", "retrans", "--transport", "carrier-pigeon"],
            &["kdiag-agent", "retrans", "--buffer-mib", "3"],
            &["kdiag-agent", "retrans", "--buffer-mib", "0"],
            &["kdiag-agent", "retrans", "--buffer-mib", "2048"],
            &["kdiag-agent", "nosuchclass"],
            &["kdiag-agent", "tcp", "--state", "HALF_OPEN"],
            &["kdiag-agent", "reclaim", "--kind", "kswapd"],
            &["kdiag-agent", "compact", "--min-latency-us", "-1"],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?}");
        }
    }
}
