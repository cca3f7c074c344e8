//! What the benchmark compares, as data. Each event class is one
//! [`Scenario`] in [`SCENARIOS`]: the tracepoints its programs sit on, the
//! load that makes them fire, kdiag's target, the kernel's own count of the
//! events where it keeps one, and the tools it is compared with. The
//! per-event cost, start-up and memory sections all read this table, so
//! benchmarking a new class is one more entry here.

use anyhow::Result;

use super::{load::Load, probe, tracer::Tracer};

pub(super) struct Scenario {
    /// kdiag-agent's subcommand for the class.
    pub class: &'static str,
    /// `group:name` of each tracepoint whose cost is compared.
    pub tracepoints: &'static [&'static str],
    /// kdiag's programs on those tracepoints (names in the eBPF object), to
    /// which `target_ns` applies. kdiag may run other programs under the
    /// same load (retrans keeps its socket map with inet_sock_set_state);
    /// they are reported, not judged.
    pub programs: &'static [&'static str],
    pub load: Load,
    /// kdiag's target for each of `programs`, in ns per run.
    pub target_ns: Option<f64>,
    /// The kernel's own count of the events the class is about, where it
    /// keeps one: each tracer's run time over all its programs is also
    /// reported per event. Tracers spread the work over different
    /// tracepoints, so per run they are not comparable, per event they are.
    pub events: Option<EventCount>,
    /// kdiag again with each of these option sets (e.g. the perf
    /// transport of kernels without the ring buffer), reported, not judged.
    pub variants: &'static [&'static [&'static str]],
    /// Other tracers of the same events. An empty bpftrace program on the
    /// same tracepoints is always measured as well: the floor every tracer
    /// pays there.
    pub comparisons: &'static [Comparison],
    /// The tool whose BPF map memory at rest, plus kdiag's ring buffer, is
    /// kdiag's target for its own: the one that keeps what kdiag keeps
    /// across events (sockets, per-vector figures, counts per reason).
    pub memory_peer: Comparison,
}

/// A running total the kernel keeps, read before and after each window.
pub(super) struct EventCount {
    /// One event, as the measure names it.
    pub name: &'static str,
    pub total: fn() -> Result<u64>,
}

pub(super) enum Comparison {
    /// A libbpf-tools program by name.
    Libbpf(&'static str),
    Bpftrace {
        label: &'static str,
        script: &'static str,
    },
}

impl Comparison {
    pub(super) fn tracer(&self) -> Tracer {
        match self {
            Comparison::Libbpf(tool) => Tracer::libbpf(tool),
            Comparison::Bpftrace { label, script } => Tracer::bpftrace(label, script),
        }
    }
}

/// Drops counted per reason, as drop_summary counts them.
const DROP_COUNT: Comparison = Comparison::Bpftrace {
    label: "count per reason",
    script: "tracepoint:skb:kfree_skb { @[args->reason] = count(); }",
};

pub(super) const SCENARIOS: &[Scenario] = &[
    Scenario {
        class: "tcp",
        tracepoints: &["sock:inet_sock_set_state"],
        programs: &["inet_sock_set_state"],
        load: Load::Churn,
        target_ns: Some(400.0),
        events: None,
        variants: &[&["--transport", "perf"]],
        comparisons: &[
            Comparison::Libbpf("tcplife"),
            Comparison::Libbpf("tcpstates"),
        ],
        // Both follow every socket, as kdiag does; tcpstates writes the
        // state changes tcp_state records are.
        memory_peer: Comparison::Libbpf("tcpstates"),
    },
    Scenario {
        class: "retrans",
        tracepoints: &["tcp:tcp_retransmit_skb"],
        programs: &["retransmit_skb"],
        load: Load::Retransmits,
        target_ns: Some(2000.0),
        events: None,
        variants: &[],
        // libbpf-tools has no tcpretrans, and bpftrace's tcpretrans.bt
        // needs a kprobe: the tracepoint, printing what tcpretrans prints.
        comparisons: &[Comparison::Bpftrace {
            label: "tcp_retransmit_skb printf",
            script: "tracepoint:tcp:tcp_retransmit_skb { printf(\"%s %d %s:%d %s:%d %d\\n\", \
                     comm, pid, ntop(args->saddr), args->sport, ntop(args->daddr), \
                     args->dport, args->state); }",
        }],
        // The bpftrace script keeps nothing; retrans follows sockets for
        // their owners, as tcpstates does.
        memory_peer: Comparison::Libbpf("tcpstates"),
    },
    Scenario {
        class: "softirq",
        tracepoints: &["irq:softirq_raise", "irq:softirq_entry", "irq:softirq_exit"],
        // softirq_raise only stamps the raise time for the queueing delay,
        // and raises of a vector already pending do not add softirqs: it is
        // not judged per run, but counts in the cost per softirq.
        programs: &["softirq_entry", "softirq_exit"],
        load: Load::Bulk,
        target_ns: Some(50.0),
        // No target per softirq: kdiag's is to cost at most what
        // libbpf-tools softirqs costs per softirq, while measuring queueing
        // delay (one more program) besides the service time both measure.
        events: Some(EventCount {
            name: "softirq",
            total: probe::softirqs_total,
        }),
        // The default attaches BTF tracepoints where the kernel has them;
        // the classic tracepoints are the fallback elsewhere. Then the cost
        // of a kernel stack (--stack-min-latency-us): every softirq sent
        // (--min-latency-us 0), without and with its stack, so that the
        // exit program's difference is one stack's capture.
        variants: &[
            &["--attach", "classic"],
            &["--min-latency-us", "0"],
            &["--min-latency-us", "0", "--stack-min-latency-us", "0"],
        ],
        // libbpf-tools softirqs sums service time per vector; the bpftrace
        // script keeps it as a histogram per vector.
        comparisons: &[
            Comparison::Libbpf("softirqs"),
            Comparison::Bpftrace {
                label: "service time hist",
                script: "tracepoint:irq:softirq_entry { @start[cpu] = nsecs; } \
                         tracepoint:irq:softirq_exit /@start[cpu]/ { \
                         @usecs[args->vec] = hist((nsecs - @start[cpu]) / 1000); \
                         delete(@start[cpu]); }",
            },
        ],
        memory_peer: Comparison::Libbpf("softirqs"),
    },
    Scenario {
        class: "drop",
        tracepoints: &["skb:kfree_skb"],
        programs: &["kfree_skb"],
        // Every segment the rule drops is a NETFILTER_DROP of a TCP
        // packet, which the program reads the headers of and sends.
        load: Load::Retransmits,
        // No target of its own yet: reported beside the floor and a count
        // per reason like drop_summary's.
        target_ns: None,
        events: None,
        variants: &[],
        comparisons: &[DROP_COUNT],
        memory_peer: DROP_COUNT,
    },
];

impl Scenario {
    pub(super) fn kdiag(&self, agent: &std::path::Path) -> Tracer {
        Tracer::kdiag(agent, &[self.class])
    }

    /// bpftrace with an empty action on the same tracepoints.
    pub(super) fn empty_program(&self) -> Tracer {
        let probes: Vec<String> = self
            .tracepoints
            .iter()
            .map(|tp| format!("tracepoint:{tp}"))
            .collect();
        Tracer::bpftrace("empty program", &format!("{} {{ }}", probes.join(", ")))
    }

    /// kdiag (first: the one judged), its variants, its comparisons, and
    /// the empty program.
    pub(super) fn tracers(&self, agent: &std::path::Path) -> Vec<Tracer> {
        let variants = self.variants.iter().map(|options| {
            let args: Vec<&str> = std::iter::once(self.class)
                .chain(options.iter().copied())
                .collect();
            Tracer::kdiag(agent, &args)
        });
        std::iter::once(self.kdiag(agent))
            .chain(variants)
            .chain(self.comparisons.iter().map(Comparison::tracer))
            .chain(std::iter::once(self.empty_program()))
            .collect()
    }

    /// Whether `kernel_name` (the kernel keeps 15 characters of a program's
    /// name) is one of this class's judged programs.
    pub(super) fn judges(&self, kernel_name: &str) -> bool {
        // A program's BTF tracepoint entry is named `<program>_btf`.
        self.programs.iter().any(|p| {
            !kernel_name.is_empty()
                && (p.starts_with(kernel_name) || format!("{p}_btf").starts_with(kernel_name))
        })
    }
}
