//! One module per event class, and what the TCP classes share.

pub mod compact;
pub mod memory;
pub mod reclaim;
pub mod retrans;
pub mod softirq;
pub mod tcp;
pub mod tcp_config;
pub mod tcp_conns;
