//! nftables rules that make TCP traffic a black hole in one namespace: the
//! simplest way to force real retransmits (no tc/netem on this kernel).

use crate::cmd;

/// All of kdiag's test rules live in this table, so removing them is one
/// table deletion and can never touch anything else.
const TABLE: &str = "inet kdiagt";

/// Drops every inbound TCP segment to `port` in namespace `ns`: SYNs to it
/// (the connecting peer retransmits in SYN_SENT) and data to it (the peer
/// retransmits in ESTABLISHED). Can be called repeatedly for several ports.
pub fn drop_tcp_dport(ns: &str, port: u16) {
    drop_input(ns, &format!("tcp dport {port}"));
}

/// Drops every inbound TCP segment from `port` in namespace `ns`: on a
/// client, what a server on `port` sends, so the server retransmits.
pub fn drop_tcp_sport(ns: &str, port: u16) {
    drop_input(ns, &format!("tcp sport {port}"));
}

/// Drops inbound SYN-ACKs from `port` in namespace `ns`: on a client, the
/// handshake never completes, so the server retransmits its SYN-ACK (and
/// the client its SYN).
pub fn drop_synacks_from(ns: &str, port: u16) {
    drop_input(
        ns,
        &format!("tcp sport {port} tcp flags & (syn | ack) == syn | ack"),
    );
}

/// Adds a rule dropping inbound packets that match `matcher` (nft syntax).
fn drop_input(ns: &str, matcher: &str) {
    // `add table`/`add chain` are idempotent, so one script covers the first
    // and every later rule.
    let script = format!(
        "add table {TABLE}; \
         add chain {TABLE} input {{ type filter hook input priority 0; }}; \
         add rule {TABLE} input {matcher} drop"
    );
    cmd::run_in(ns, "nft", &[&script]);
}

/// Removes every drop rule added in `ns`.
pub fn remove_drops(ns: &str) {
    cmd::run_in(ns, "nft", &["delete", "table", "inet", "kdiagt"]);
}
