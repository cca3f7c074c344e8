//! nftables rules that make a TCP port a black hole in one namespace: the
//! simplest way to force real retransmits (no tc/netem on this kernel).

use crate::cmd;

/// All of kdiag's test rules live in this table, so removing them is one
/// table deletion and can never touch anything else.
const TABLE: &str = "inet kdiagt";

/// Drops every inbound TCP segment to `port` in namespace `ns`: SYNs to it
/// (the connecting peer retransmits in SYN_SENT) and data to it (the peer
/// retransmits in ESTABLISHED). Can be called repeatedly for several ports.
pub fn drop_tcp_dport(ns: &str, port: u16) {
    // `add table`/`add chain` are idempotent, so one script covers the first
    // and every later port.
    let script = format!(
        "add table {TABLE}; \
         add chain {TABLE} input {{ type filter hook input priority 0; }}; \
         add rule {TABLE} input tcp dport {port} drop"
    );
    cmd::run_in(ns, "nft", &[&script]);
}

/// Removes every drop rule `drop_tcp_dport` added in `ns`.
pub fn remove_drops(ns: &str) {
    cmd::run_in(ns, "nft", &["delete", "table", "inet", "kdiagt"]);
}
