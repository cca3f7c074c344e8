//! The TCP classes (`retrans`, `tcp`) and what they share: one set of kernel
//! programs configured by one filter, the connection table, state names.

pub mod config;
pub mod conns;
pub mod lifecycle;
pub mod retrans;
pub mod state_names;
