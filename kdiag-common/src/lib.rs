//! Wire types shared by kdiag's kernel programs and its userspace agent.
//!
//! Every event the kernel sends starts with an [`EventHeader`]; its `kind`
//! says which payload follows. All structs are `#[repr(C)]`, `Copy`, built
//! from fixed-size fields with explicit padding and no `bool`, so that both
//! sides agree on the layout byte for byte. bytemuck's `Pod` derive checks
//! at compile time that none has padding, and sizes are asserted.
#![no_std]

use bytemuck::{Pod, Zeroable};

pub mod drop;
pub mod log2;
pub mod memory;
pub mod softirq;
pub mod stack;

/// Declares a `#[repr(u32)]` enum of the wire from one table of variants:
/// the enum, `ALL` (every variant, in the table's order), and the u32 ->
/// enum conversion (`TryFrom<u32>`, derived by num_enum). Adding a variant
/// is one line of its table.
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        $vis:vis enum $name:ident {
            $($(#[$vmeta:meta])* $variant:ident $(= $value:literal)?,)+
        }
    ) => {
        $(#[$meta])*
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq, num_enum::TryFromPrimitive)]
        $vis enum $name {
            $($(#[$vmeta])* $variant $(= $value)?,)+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: [Self; [$(Self::$variant),+].len()] = [$(Self::$variant),+];
            /// Their values, in the same order.
            pub const VALUES: [u32; [$(Self::$variant),+].len()] = [$(Self::$variant as u32),+];
        }
    };
}

// After the macro, which they use.
pub mod cost;
pub mod tcp;

wire_enum! {
    /// Which payload follows the [`EventHeader`].
    pub enum EventKind {
        Retrans = 1,
        TcpState = 2,
        TcpConn = 3,
        Reclaim = 4,
        Compact = 5,
        Softirq = 6,
        /// A socket destroyed while the programs still held it: its close
        /// (`-> CLOSE`) was never seen. A [`tcp::TcpStateEvent`] without
        /// a tuple or an old state (the agent has them from earlier
        /// changes).
        TcpDestroy = 7,
        Drop = 8,
    }
}

/// First bytes of every event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct EventHeader {
    /// An [`EventKind`] as u32.
    pub kind: u32,
    /// CPU the program ran on.
    pub cpu: u32,
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC nanoseconds.
    pub ts_ns: u64,
}
const _: () = assert!(size_of::<EventHeader>() == 16);

/// Marks a tracepoint field this kernel does not have, among the offsets the
/// agent reads from the tracepoints' format files and hands the programs.
pub const FIELD_ABSENT: u16 = u16::MAX;

/// Length of a task's comm, including the terminating NUL (TASK_COMM_LEN).
pub const COMM_LEN: usize = 16;

/// The process that owns a socket, captured in process context.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Owner {
    /// Thread group id (the userspace pid).
    pub tgid: u32,
    /// Non-zero when the fields below were captured; zero for sockets the
    /// kernel programs never saw in process context (the agent then looks
    /// the owner up in /proc).
    pub known: u32,
    /// cgroup v2 id (`bpf_get_current_cgroup_id`), 0 when unknown.
    pub cgroup_id: u64,
    pub comm: [u8; COMM_LEN],
}
const _: () = assert!(size_of::<Owner>() == 32);

/// Which transport the kernel programs write to, set by the agent at load.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    RingBuf = 0,
    Perf = 1,
}

/// Default size of the buffer between the programs and the agent (its
/// `--buffer-mib`): room for what the busiest loopback churn measured
/// writes while the agent waits tens of milliseconds for a CPU, which
/// overflowed smaller buffers (docs/BENCHMARKS.md, "Drops at maximum
/// churn").
pub const DEFAULT_BUFFER_BYTES: u32 = 4 << 20;

/// The reader is woken each time the bytes queued in its buffer cross a
/// multiple of 1/2^`WAKEUP_FRACTION_SHIFT` of the buffer (an eighth), and
/// drains on a short timer in between. Not once per event: a wakeup is an
/// irq_work, an interrupt the CPU sends itself, and costs more than
/// everything else an event does. Not at a fuller buffer either: the rest
/// of it holds what arrives while the woken reader waits for a CPU. The
/// ring buffer's programs apply it through [`wakeup_shift`], the perf
/// buffers through their watermark.
pub const WAKEUP_FRACTION_SHIFT: u32 = 3;

/// The programs' `WAKEUP_SHIFT` for a ring buffer of `ring_bytes` (a power
/// of two): log2 of the [`WAKEUP_FRACTION_SHIFT`] fraction of it.
pub const fn wakeup_shift(ring_bytes: u32) -> u64 {
    ring_bytes
        .trailing_zeros()
        .saturating_sub(WAKEUP_FRACTION_SHIFT) as u64
}

/// Indexes into the per-CPU loss counters: `class * LOSS_REASONS + reason`.
pub const LOSS_DROPPED: u32 = 0;
/// A perf buffer had no room (the kernel also reports these as perf "lost"
/// samples, but only when a later sample fits, so the agent counts them here).
pub const LOSS_LOST: u32 = 1;
/// A program gave up on an event: a map insert failed (the map full) or a
/// read of the record or of kernel memory failed, and it returned early.
pub const LOSS_FAILED: u32 = 2;
/// An event went out with some of the fields it carries missing: a read
/// of the socket's memory failed (the fields are null in its record), or
/// the kernel stack of a slow event could not be taken (its `stack` is
/// null).
pub const LOSS_PARTIAL: u32 = 3;
/// An event was sent, but a bounded map that keeps statistics or state
/// had no room for it: the event is missing from summaries (a thread's
/// stall statistics) or its socket's later events lack what the map would
/// have kept (owner, retransmit count).
pub const LOSS_MAP_FULL: u32 = 4;
pub const LOSS_REASONS: u32 = 5;

wire_enum! {
    /// Event classes, as indexes for per-class counters: numbered from 0 in
    /// the order listed.
    pub enum ClassId {
        Retrans,
        Tcp,
        Reclaim,
        Compact,
        Softirq,
        Drop,
    }
}

/// Number of classes, from [`ClassId`]'s table.
pub const CLASS_COUNT: u32 = ClassId::ALL.len() as u32;

/// Whether `values` are 0, 1, 2, ... in order: an enum whose values index
/// arrays of as many entries as it has variants.
pub(crate) const fn numbered_from_zero(values: &[u32]) -> bool {
    let mut i = 0;
    while i < values.len() {
        if values[i] as usize != i {
            return false;
        }
        i += 1;
    }
    true
}

// A class id indexes arrays of CLASS_COUNT entries.
const _: () = assert!(numbered_from_zero(&ClassId::VALUES));

/// Size of the per-CPU loss counter array.
pub const LOSS_SLOTS: u32 = CLASS_COUNT * LOSS_REASONS;

/// Implements `aya::Pod` for the userspace side, for wire types that derive
/// `bytemuck::Pod` (checked here, on both sides): that derive refuses a
/// type with padding or with a field that is not itself plain old data, so
/// any byte pattern is a valid value and no byte of it is uninitialized.
#[macro_export]
macro_rules! impl_pod {
    ($($t:ty),* $(,)?) => {
        $(
            const _: () = $crate::assert_pod::<$t>();
            #[cfg(feature = "user")]
            // SAFETY: bytemuck::Pod, asserted above: repr(C), no padding,
            // integer and array fields only.
            unsafe impl aya::Pod for $t {}
        )*
    };
}

/// Compiles only for a `bytemuck::Pod` type (see [`impl_pod`]).
#[doc(hidden)]
pub const fn assert_pod<T: Pod>() {}

impl_pod!(EventHeader, Owner);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wakeup_at_an_eighth_of_the_ring() {
        assert_eq!(
            1 << wakeup_shift(DEFAULT_BUFFER_BYTES),
            DEFAULT_BUFFER_BYTES / 8
        );
        assert_eq!(wakeup_shift(4096), 9);
        // A ring smaller than 2^WAKEUP_FRACTION_SHIFT bytes wakes on every byte.
        assert_eq!(wakeup_shift(4), 0);
    }
}
