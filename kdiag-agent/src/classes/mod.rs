//! One module per event class.

pub mod retrans;
pub mod tcp_config;
