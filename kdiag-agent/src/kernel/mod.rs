//! Everything that faces the kernel: the tracepoints' layouts (tracefs) and
//! types (BTF), loading and attaching the programs, the buffers events
//! arrive through, and the wire format they arrive in.

pub mod btf;
pub mod loader;
pub mod tracefs;
pub mod transport;
pub mod wire;
