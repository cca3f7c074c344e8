//! One module per event class.

pub mod retrans;
pub mod softirq;
pub mod tcp_config;
