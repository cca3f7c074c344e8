//! Who an event belongs to: the process that owns a socket, the cgroup a
//! task runs in, what /proc says of both; and the host-wide counters written
//! beside the memory stalls.

pub(crate) mod background;
pub(crate) mod cgroup;
pub(crate) mod container;
pub(crate) mod owner;
pub(crate) mod procfs;
pub(crate) mod vmstat;
