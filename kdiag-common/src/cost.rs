//! What the programs cost, measured by themselves, and the gates through
//! which the agent sheds detail to stay within its CPU budget.
//!
//! The kernel's own BPF run-time statistics (`kernel.bpf_stats_enabled`,
//! `BPF_ENABLE_STATS`) are host-wide: turned on, they add two clock reads to
//! every run of every BPF program on the host, other tools' included. So
//! the programs count their own runs and time one run in [`SAMPLE_EVERY`]
//! of their own body instead, in a per-CPU slot of their own.

use bytemuck::{Pod, Zeroable};

wire_enum! {
    /// kdiag's kernel programs, as indexes of the per-program cost slots;
    /// numbered from 0 in the order listed. [`ProgramId::name`] is the
    /// program's (the eBPF function's) name.
    pub enum ProgramId {
        RetransmitSkb,
        RetransmitSynack,
        InetSockSetState,
        TcpDestroySock,
        SoftirqRaise,
        SoftirqEntry,
        SoftirqExit,
        DirectReclaimBegin,
        DirectReclaimEnd,
        MemcgReclaimBegin,
        MemcgReclaimEnd,
        CompactionBegin,
        CompactionEnd,
        TryToCompactPages,
        KfreeSkb,
    }
}

impl ProgramId {
    /// The program's name in the object (and in `agent_stats`).
    pub const fn name(self) -> &'static str {
        match self {
            Self::RetransmitSkb => "retransmit_skb",
            Self::RetransmitSynack => "retransmit_synack",
            Self::InetSockSetState => "inet_sock_set_state",
            Self::TcpDestroySock => "tcp_destroy_sock",
            Self::SoftirqRaise => "softirq_raise",
            Self::SoftirqEntry => "softirq_entry",
            Self::SoftirqExit => "softirq_exit",
            Self::DirectReclaimBegin => "direct_reclaim_begin",
            Self::DirectReclaimEnd => "direct_reclaim_end",
            Self::MemcgReclaimBegin => "memcg_reclaim_begin",
            Self::MemcgReclaimEnd => "memcg_reclaim_end",
            Self::CompactionBegin => "compaction_begin",
            Self::CompactionEnd => "compaction_end",
            Self::TryToCompactPages => "try_to_compact_pages",
            Self::KfreeSkb => "kfree_skb",
        }
    }
}

impl ProgramId {
    /// The name of the program's BTF tracepoint (tp_btf) entry, for those
    /// that have one beside their classic tracepoint entry. Both count
    /// their runs in the same slot and are reported under [`Self::name`]:
    /// the agent loads one or the other.
    pub const fn btf_name(self) -> Option<&'static str> {
        match self {
            Self::SoftirqRaise => Some("softirq_raise_btf"),
            Self::SoftirqEntry => Some("softirq_entry_btf"),
            Self::SoftirqExit => Some("softirq_exit_btf"),
            Self::InetSockSetState => Some("inet_sock_set_state_btf"),
            Self::RetransmitSkb => Some("retransmit_skb_btf"),
            Self::RetransmitSynack => Some("retransmit_synack_btf"),
            _ => None,
        }
    }

    /// The program whose entry in the object is named `name`.
    pub fn of_entry(name: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|id| id.name() == name || id.btf_name() == Some(name))
    }

    /// The class whose events are lost when the kernel skips a run of this
    /// program (its `recursion_misses`, reported as that class's
    /// `skipped`).
    pub const fn class(self) -> crate::ClassId {
        use crate::ClassId;
        match self {
            Self::RetransmitSkb | Self::RetransmitSynack => ClassId::Retrans,
            Self::InetSockSetState | Self::TcpDestroySock => ClassId::Tcp,
            Self::SoftirqRaise | Self::SoftirqEntry | Self::SoftirqExit => ClassId::Softirq,
            Self::DirectReclaimBegin
            | Self::DirectReclaimEnd
            | Self::MemcgReclaimBegin
            | Self::MemcgReclaimEnd => ClassId::Reclaim,
            Self::CompactionBegin | Self::CompactionEnd | Self::TryToCompactPages => {
                ClassId::Compact
            }
            Self::KfreeSkb => ClassId::Drop,
        }
    }
}

/// Number of programs, the size of the cost map.
pub const PROGRAM_COUNT: u32 = ProgramId::ALL.len() as u32;

// A program id indexes arrays of PROGRAM_COUNT entries.
const _: () = assert!(crate::numbered_from_zero(&ProgramId::VALUES));

/// log2 of [`SAMPLE_EVERY`]: a mask test replaces a division.
pub const SAMPLE_SHIFT: u32 = 6;
/// One run in this many is timed: the 1st, the 65th, ... of each CPU.
pub const SAMPLE_EVERY: u64 = 1 << SAMPLE_SHIFT;

/// One program's runs on one CPU since load. The counters only grow; the
/// agent reads differences.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ProgramCost {
    /// Every run of the program.
    pub runs: u64,
    /// Runs whose body was timed, one in [`SAMPLE_EVERY`].
    pub timed_runs: u64,
    /// Their summed time, `bpf_ktime_get_ns` before and after the body.
    pub timed_ns: u64,
    /// When the run being timed began: kept here rather than in a register
    /// so that the verifier sees one path through the body, not two.
    pub started_ns: u64,
}
const _: () = assert!(size_of::<ProgramCost>() == 32);

/// The budget's gates: one array entry the programs read on every run and
/// the agent rewrites when it changes step or flips the softirq duty cycle.
/// All zero is full detail, which is what the kernel gives a new map: the
/// programs run at full detail from the moment they are attached.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct BudgetGates {
    /// Non-zero while the softirq programs only count their runs (the duty
    /// cycle's off phase, or the class shed); zero while they measure.
    pub softirq_paused: u32,
    /// Non-zero once the budget sheds queueing delay: the raise program
    /// records no raise times.
    pub delay_shed: u32,
    /// CLOCK_MONOTONIC ns when the current softirq measurement began (the
    /// last time measuring or delays resumed): raise and entry times older
    /// than this are left over from before and are not paired.
    pub softirq_since_ns: u64,
    /// Per-event records (slow softirqs, reclaim and compaction stalls) go
    /// out only at or over this latency, on top of each class's own
    /// threshold; 0 at full detail.
    pub min_latency_ns: u64,
    /// Non-zero once the budget sheds per-packet drop records: the drop
    /// program only counts drops per reason.
    pub drop_events_shed: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<BudgetGates>() == 32);

crate::impl_pod!(ProgramCost, BudgetGates);
