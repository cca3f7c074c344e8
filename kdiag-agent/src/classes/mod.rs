//! One module per event class, and what the TCP classes share.

pub mod hist;
pub mod memory;
pub mod softirq;
pub mod tcp;
