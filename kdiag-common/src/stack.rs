//! Kernel stacks of slow events (`--stack-min-latency-us`).
//!
//! A memory stall or softirq at or over its class's stack threshold goes
//! out as its usual event immediately followed, in the same ring buffer
//! record (or perf sample), by a [`KernelStack`] taken with bpf_get_stack
//! at the end of the stall. In the record itself, not in a stack-id map
//! (BPF_MAP_TYPE_STACK_TRACE): such a map keys stacks by a hash of their
//! addresses, and two stacks whose hashes collide lose one of them (or,
//! with BPF_F_REUSE_STACKID, overwrite it before the agent reads it); its
//! entries also outlive the events that name them until the agent deletes
//! them. A record that carries its stack is complete when it arrives or
//! lost as a whole, and counted as such. Events under the threshold keep
//! their own size: only slow ones pay for the bytes and the capture.
//!
//! The agent tells the two forms apart by length: an event followed by a
//! stack is longer by `size_of::<KernelStack>()`, far more than the few
//! bytes of padding a perf sample may add.

use bytemuck::{Pod, Zeroable};

/// Frames kept per stack: the innermost ones. Memory stalls seen from a
/// page fault or a system call are 10 to 25 frames deep; deeper paths
/// (reclaim under a file system under the network stack) lose their
/// outermost frames, which name the entry point, not the cause.
pub const STACK_DEPTH: usize = 32;

/// The threshold that takes no stacks.
pub const NO_STACKS: u64 = u64::MAX;

/// Return addresses of the kernel stack at the end of a slow event,
/// innermost first.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct KernelStack {
    /// Valid entries of `ips`; 0 when bpf_get_stack failed (the event then
    /// also counts as `partial`).
    pub nr: u32,
    pub _pad: u32,
    pub ips: [u64; STACK_DEPTH],
}
const _: () = assert!(size_of::<KernelStack>() == 8 + 8 * STACK_DEPTH);

crate::impl_pod!(KernelStack);
