//! Packet drop records: drops one by one, and per-reason summaries.

use std::sync::Arc;

use serde::Serialize;

use super::{
    Marked, Record, ResolvedOwner, opt,
    tcp::{Endpoints, owner_text},
};

/// One dropped TCP or UDP packet. The addresses and ports are the
/// packet's own (`saddr`/`sport` its source): a dropped packet may belong
/// to no local socket.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub(crate) struct PacketDrop {
    #[serde(flatten)]
    pub owner: ResolvedOwner,
    /// `"tcp"` or `"udp"`.
    pub protocol: &'static str,
    #[serde(flatten)]
    pub packet: Endpoints,
    /// The kernel's name of the reason, without `SKB_DROP_REASON_`; null
    /// on kernels without reasons, or for a value the kernel's enum does
    /// not name.
    pub reason: Option<Arc<str>>,
    /// The reason's value in this kernel's `enum skb_drop_reason` (values
    /// differ between kernels); null on kernels without reasons.
    pub reason_code: Option<u32>,
}

impl Record for PacketDrop {
    const TYPE: &'static str = "drop";
    const TEXT_HEADER: &'static str = concat!(
        "TIME                           PID     COMM             PROTO ",
        "SADDR:SPORT                                     DADDR:DPORT                                     REASON"
    );
    fn text_row(&self, ts: &str) -> String {
        format!(
            "{ts:<30} {} {:<5} {} {}",
            owner_text(&self.owner),
            self.protocol,
            self.packet.text(),
            reason_text(self.reason.as_deref(), self.reason_code)
        )
    }
}

/// Drops of one reason and protocol over one interval.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub(crate) struct DropSummary {
    pub reason: Option<Arc<str>>,
    pub reason_code: Option<u32>,
    pub protocol: &'static str,
    pub count: u64,
    pub interval_ns: u64,
}

impl Record for DropSummary {
    const TYPE: &'static str = "drop_summary";
    const MARKED: Marked = Marked::Step;
    const TEXT_HEADER: &'static str = "TIME                           PROTO      COUNT REASON";
    fn text_row(&self, ts: &str) -> String {
        format!(
            "{ts:<30} {:<5} {:>10} {}",
            self.protocol,
            self.count,
            reason_text(self.reason.as_deref(), self.reason_code)
        )
    }
}

/// The REASON column: the name, else the value, else `-`.
fn reason_text(name: Option<&str>, code: Option<u32>) -> String {
    name.map_or_else(|| opt(code), str::to_owned)
}
