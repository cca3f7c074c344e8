//! One module per event class.

pub mod compact;
pub mod memory;
pub mod reclaim;
pub mod retrans;
pub mod tcp_config;
