//! What the benchmark compares, as data. Each event class is one
//! [`Scenario`] in [`SCENARIOS`]: the tracepoints its programs sit on, the
//! load that makes them fire, kdiag's target, and the tools it is compared
//! with. The per-event cost, start-up and memory sections all read this
//! table, so benchmarking a new class is one more entry here.

use super::{load::Load, tracer::Tracer};

pub struct Scenario {
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
    /// Other tracers of the same events. An empty bpftrace program on the
    /// same tracepoints is always measured as well: the floor every tracer
    /// pays there.
    pub comparisons: &'static [Comparison],
}

pub enum Comparison {
    /// A libbpf-tools program by name.
    Libbpf(&'static str),
    Bpftrace {
        label: &'static str,
        script: &'static str,
    },
}

impl Comparison {
    pub fn tracer(&self) -> Tracer {
        match self {
            Comparison::Libbpf(tool) => Tracer::libbpf(tool),
            Comparison::Bpftrace { label, script } => Tracer::bpftrace(label, script),
        }
    }
}

pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        class: "tcp",
        tracepoints: &["sock:inet_sock_set_state"],
        programs: &["inet_sock_set_state"],
        load: Load::Churn,
        target_ns: Some(400.0),
        comparisons: &[
            Comparison::Libbpf("tcplife"),
            Comparison::Libbpf("tcpstates"),
        ],
    },
    Scenario {
        class: "retrans",
        tracepoints: &["tcp:tcp_retransmit_skb"],
        programs: &["retransmit_skb"],
        load: Load::Retransmits,
        target_ns: Some(2000.0),
        // libbpf-tools has no tcpretrans, and bpftrace's tcpretrans.bt
        // needs a kprobe: the tracepoint, printing what tcpretrans prints.
        comparisons: &[Comparison::Bpftrace {
            label: "tcp_retransmit_skb printf",
            script: "tracepoint:tcp:tcp_retransmit_skb { printf(\"%s %d %s:%d %s:%d %d\\n\", \
                     comm, pid, ntop(args->saddr), args->sport, ntop(args->daddr), \
                     args->dport, args->state); }",
        }],
    },
];

impl Scenario {
    pub fn kdiag(&self, agent: &std::path::Path) -> Tracer {
        Tracer::kdiag(agent, &[self.class])
    }

    /// bpftrace with an empty action on the same tracepoints.
    pub fn empty_program(&self) -> Tracer {
        let probes: Vec<String> = self
            .tracepoints
            .iter()
            .map(|tp| format!("tracepoint:{tp}"))
            .collect();
        Tracer::bpftrace("empty program", &format!("{} {{ }}", probes.join(", ")))
    }

    /// kdiag, its comparisons, and the empty program.
    pub fn tracers(&self, agent: &std::path::Path) -> Vec<Tracer> {
        std::iter::once(self.kdiag(agent))
            .chain(self.comparisons.iter().map(Comparison::tracer))
            .chain(std::iter::once(self.empty_program()))
            .collect()
    }

    /// Whether `kernel_name` (the kernel keeps 15 characters of a program's
    /// name) is one of this class's judged programs.
    pub fn judges(&self, kernel_name: &str) -> bool {
        self.programs
            .iter()
            .any(|p| p.starts_with(kernel_name) && !kernel_name.is_empty())
    }
}
