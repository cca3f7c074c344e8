//! Who an event belongs to: the process that owns a socket, the cgroup a
//! task runs in, what /proc says of both; and the host-wide counters written
//! beside the memory stalls.

pub mod cgroup;
pub mod owner;
pub mod procfs;
pub mod vmstat;
