//! One module per event class.

pub mod retrans;
