//! Command line. The doc comments here are the `--help` text.

use std::path::PathBuf;

use clap::{Args, Parser};

use crate::{
    classes::Command,
    kernel::{loader::AttachMode, transport::TransportKind},
    output::Format,
};

/// Production tracing agent: kernel events attributed to processes,
/// connections and cgroups, as JSON Lines on stdout.
///
/// Needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN): run it as root. Once
/// attached it runs as --user (nobody), without root's capabilities, under a
/// seccomp filter. It detaches everything it attached when it exits, however
/// it exits.
///
/// Examples:
///   sudo kdiag-agent retrans                    every TCP retransmit
///   sudo kdiag-agent retrans --port 443 -o text  one service, for people
///   sudo kdiag-agent retrans --pid 1234 -d 60    one process, for a minute
///   sudo kdiag-agent reclaim --pid 1234          its reclaim stalls, p50/p99
///   sudo kdiag-agent compact -o text             compaction runs, for people
#[derive(Debug, Parser)]
#[command(name = "kdiag-agent", version, verbatim_doc_comment)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every event class takes.
#[derive(Debug, Args)]
pub(crate) struct GlobalArgs {
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
    /// under it; on a host without cgroup v2, a path of systemd's v1
    /// hierarchy (name=systemd), else of the v1 memory controller. For
    /// `reclaim` and `compact` on a host with the v1 memory controller, a
    /// path in the memory hierarchy instead (`/sys/fs/cgroup/memory/...`),
    /// since its limits are the ones hit.
    #[arg(short = 'c', long, value_name = "PATH", global = true)]
    pub cgroup: Option<PathBuf>,
    /// Only processes of this container: its id as `container_id` shows it
    /// (64 hex digits, or a unique prefix of at least 12 as `docker ps`
    /// prints it), or a systemd-nspawn machine's name. The same as
    /// `--cgroup` with the container's cgroup, found in the hierarchy each
    /// class reads (see `--cgroup`).
    #[arg(long, value_name = "ID", global = true, conflicts_with = "cgroup")]
    pub container: Option<String>,
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
    /// How the kernel programs attach. The softirq and TCP programs
    /// (inet_sock_set_state, tcp_retransmit_skb, tcp_retransmit_synack)
    /// have two forms: a BTF tracepoint (tp_btf: the kernel passes the
    /// tracepoint's arguments straight to the program, the cheaper way, and
    /// skips it only while it runs itself on that CPU) and a classic
    /// tracepoint (the kernel fills a trace record first, and skips the
    /// program whenever another BPF program runs on that CPU). `auto`
    /// takes the BTF tracepoint where the kernel has BTF for it and accepts
    /// it (Linux 5.5+ built with BTF), the classic one elsewhere; `classic`
    /// takes the classic one everywhere. agent_start's `attached_as` says
    /// which each tracepoint got.
    #[arg(long, value_enum, default_value = "auto", global = true)]
    pub attach: AttachMode,
    /// Room for events on their way from the kernel to the agent, in MiB (a
    /// power of two, 1 to 1024): the BPF ring buffer, or with the perf
    /// transport the sum of the per-CPU buffers. Events that find it full
    /// are counted in agent_stats (`dropped`, or `lost` with perf); raise it
    /// when bursts lose some. It is locked kernel memory. Default: 4; with
    /// the tcp class, more when TCP connections open fast as it starts, in
    /// any network namespace (half a second of their state changes, at
    /// most 64). agent_start's `buffer_mib` says which, and
    /// `buffer_opens_per_sec` the rate it was sized for.
    #[arg(long, value_name = "MIB", global = true, value_parser = buffer_mib)]
    pub buffer_mib: Option<u32>,
    /// Also serve Prometheus metrics on http://ADDR:PORT/metrics (off by
    /// default): retransmits, closed connections, handshake and connection
    /// times, memory stalls, softirq latencies, packet drops by reason and
    /// the agent's own
    /// figures, as cumulative sums of the records written. They are
    /// refreshed at each --interval, with its `agent_stats` record (so
    /// --interval 0 is refused). Listen on loopback (127.0.0.1:9464)
    /// unless the network may read them. docs/SCHEMA.md lists the metrics.
    #[arg(long, value_name = "ADDR:PORT", global = true)]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// With --metrics-addr: the most series (label sets) any one metric
    /// keeps; updates of more go to the label value `other` and count in
    /// kdiag_metrics_series_folded_total.
    #[arg(long, value_name = "N", default_value_t = 500, global = true,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub metrics_max_series: u64,
    /// With --metrics-addr: the cgroups the per-cgroup memory-stall
    /// histogram names, the first N to stall (the heaviest first within an
    /// interval); the stalls of later ones go to cgroup="other".
    #[arg(long, value_name = "N", default_value_t = 20, global = true,
          value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub metrics_cgroups: u64,
    /// With --metrics-addr: the softirq histograms per CPU as well as per
    /// vector (a `cpu` label: 20 series per CPU, folded past
    /// --metrics-max-series).
    #[arg(long, global = true)]
    pub metrics_softirq_cpus: bool,
    /// CPU budget for the agent itself, in percent (0: none, full detail
    /// always). Its cost is the run time of its kernel programs (which time
    /// themselves) plus its own CPU time, over each --interval (every 10 s
    /// with --interval 0), as a share of the CPU time the machine was busy
    /// (at least one CPU's worth, so an idle machine sheds nothing): 1 means
    /// at most 1% of the work it observes. Over budget, it sheds detail in
    /// steps, cheapest loss first, as far as the classes running have
    /// them: (1) per-event records of softirqs, reclaim and compaction only
    /// at 10 ms or more; (2) no per-packet drop records; (3) no softirq
    /// queueing delay; (4) softirqs measured a quarter of each second; (5)
    /// softirqs not measured. It goes down in one go to the first step it
    /// predicts within budget; the softirq steps detach the programs they
    /// stop. Each step down and back up is a `budget` record, and every
    /// summary of an interval under a step carries `budget_step` (softirq
    /// summaries also `sampled_fraction`). Steps come back one at a time
    /// once the cost expected with them has stayed under half the budget
    /// for 3 intervals.
    #[arg(long, value_name = "PERCENT", default_value_t = 1.0, global = true,
          value_parser = max_cpu)]
    pub max_cpu: f64,
    /// Once attached, run as this user and its group, with no supplementary
    /// groups and no capability the rest of the run does not need. The user
    /// must exist and must not be root.
    #[arg(long, value_name = "NAME", default_value = "nobody", global = true)]
    pub user: String,
    /// Once started, try a system call the seccomp filter does not allow and
    /// say on stderr whether the kernel refused it. A test seam: it shows
    /// the filter is in force.
    #[arg(long, global = true, hide = true)]
    pub try_forbidden_syscall: bool,
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

/// `--max-cpu`: a percentage, 0 to 100.
fn max_cpu(arg: &str) -> Result<f64, String> {
    match arg.parse::<f64>() {
        Ok(pct) if (0.0..=100.0).contains(&pct) => Ok(pct),
        _ => Err("a percentage from 0 (no budget) to 100".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classes::memory::reclaim::ReclaimArgs;
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
        assert_eq!(a.global.buffer_mib, None);
        assert_eq!(a.global.max_cpu, 1.0);
        let d = Cli::try_parse_from(["kdiag-agent", "tcp", "--buffer-mib", "64"]).unwrap();
        assert_eq!(d.global.buffer_mib, Some(64));
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
    fn stack_thresholds() {
        use crate::classes::{RUN_STACK_THRESHOLD, StackThreshold};
        let threshold = |args: &[&str]| match Cli::try_parse_from(args).unwrap().command {
            Command::Reclaim(a) => a.stack.stack_min_latency_us,
            Command::Compact(a) => a.stack.stack_min_latency_us,
            Command::Softirq(a) => a.stack.stack_min_latency_us,
            Command::Run(a) => a.stack.stack_min_latency_us,
            _ => panic!("no stacks"),
        };
        assert_eq!(threshold(&["kdiag-agent", "reclaim"]), None);
        assert_eq!(
            threshold(&["kdiag-agent", "compact", "--stack-min-latency-us", "0"]),
            Some(StackThreshold::Micros(0))
        );
        assert_eq!(
            threshold(&["kdiag-agent", "softirq", "--stack-min-latency-us", "off"]),
            Some(StackThreshold::Off)
        );
        assert_eq!(
            threshold(&["kdiag-agent", "run", "--stack-min-latency-us", "2500"]),
            Some(StackThreshold::Micros(2500))
        );
        // `run` takes stacks by default, the classes alone do not.
        assert_eq!(RUN_STACK_THRESHOLD, StackThreshold::Micros(10_000));
        for bad in ["-1", "10ms", "", "OFF"] {
            let args = ["kdiag-agent", "reclaim", "--stack-min-latency-us", bad];
            assert!(Cli::try_parse_from(args).is_err(), "{bad:?}");
        }
        assert!(
            Cli::try_parse_from(["kdiag-agent", "tcp", "--stack-min-latency-us", "5"]).is_err()
        );
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
            &["kdiag-agent", "tcp", "--max-sockets", "10"],
            &["kdiag-agent", "softirq", "--max-cpu", "-1"],
            &["kdiag-agent", "softirq", "--max-cpu", "101"],
            &["kdiag-agent", "softirq", "--max-cpu", "NaN"],
        ] {
            assert!(Cli::try_parse_from(args).is_err(), "{args:?}");
        }
    }
}
