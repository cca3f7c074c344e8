//! Everything that faces the kernel: the tracepoints' layouts (tracefs) and
//! types (BTF), its symbols (kallsyms), loading and attaching the programs, the buffers events
//! arrive through, and the wire format they arrive in.

pub(crate) mod btf;
pub(crate) mod kallsyms;
pub(crate) mod loader;
pub(crate) mod setup;
pub(crate) mod tracefs;
pub(crate) mod transport;
pub(crate) mod wire;
