//! nftables rules that make TCP traffic a black hole: the simplest way to
//! force real retransmits (no tc/netem on this kernel), and counted drops
//! of any traffic, for the drop class.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::{cmd, env};

/// In a test namespace, all of kdiag's test rules live in this table, so
/// removing them is one table deletion and can never touch anything else.
const TABLE: &str = "inet kdiagt";

static NEXT_HOST_TABLE: AtomicU32 = AtomicU32::new(0);

/// The nft script that drops inbound packets matching `matcher` (nft
/// syntax), creating `table` and its input chain if needed: `add table` and
/// `add chain` are idempotent, so one script covers the first and every
/// later rule.
fn drop_script(table: &str, matcher: &str) -> String {
    format!(
        "add table {table}; \
         add chain {table} input {{ type filter hook input priority 0; }}; \
         add rule {table} input {matcher} drop"
    )
}

/// The nft match of TCP segments to `port`.
fn to_port(port: u16) -> String {
    format!("tcp dport {port}")
}

/// Drops every inbound TCP segment to `port` in namespace `ns`: SYNs to it
/// (the connecting peer retransmits in SYN_SENT) and data to it (the peer
/// retransmits in ESTABLISHED). Can be called repeatedly for several ports.
pub fn drop_tcp_dport(ns: &str, port: u16) {
    drop_input(ns, &to_port(port));
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

/// Adds a rule dropping inbound packets that match `matcher` in `ns`.
fn drop_input(ns: &str, matcher: &str) {
    cmd::run_in(ns, "nft", &[&drop_script(TABLE, matcher)]);
}

/// Which of a namespace's own packets a counted drop rule sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// Packets to the namespace.
    Input,
    /// Packets from it.
    Output,
}

impl Hook {
    fn name(self) -> &'static str {
        match self {
            Hook::Input => "input",
            Hook::Output => "output",
        }
    }
}

/// Adds, in `ns`, a rule dropping the packets of `hook` that match
/// `matcher`, with a counter of its own (see [`dropped_packets`]); one such
/// rule per hook and namespace.
pub fn drop_counted(ns: &str, hook: Hook, matcher: &str) {
    let chain = hook.name();
    cmd::run_in(
        ns,
        "nft",
        &[&format!(
            "add table {TABLE}; \
             add chain {TABLE} {chain} {{ type filter hook {chain} priority 0; }}; \
             add rule {TABLE} {chain} {matcher} counter drop"
        )],
    );
}

/// The packets the counted rule of `hook` in `ns` dropped so far (nft's own
/// count: `counter packets N bytes M`).
pub fn dropped_packets(ns: &str, hook: Hook) -> u64 {
    let listing = cmd::run_in(ns, "nft", &["list", "chain", "inet", "kdiagt", hook.name()]);
    let counts: Vec<u64> = listing
        .split("counter packets ")
        .skip(1)
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect();
    match counts.as_slice() {
        [n] => *n,
        _ => panic!(
            "{ns}: expected one counted rule in the {} chain: {listing}",
            hook.name()
        ),
    }
}

/// Removes every drop rule added in `ns`.
pub fn remove_drops(ns: &str) {
    cmd::run_in(ns, "nft", &["delete", "table", "inet", "kdiagt"]);
}

/// A drop rule for one port in the root network namespace, for tests that
/// must make retransmits the host's own counters see (/proc/net/snmp is per
/// namespace). The root namespace is shared with the host and with
/// concurrent test runs, so the rule gets a table of its own, named after
/// this process, and only that table is ever deleted: in `undrop` or, at
/// the latest, in Drop (also when the test panics).
pub struct HostPortDrop {
    /// `inet kdtPID_N`; None once deleted.
    table: Option<String>,
}

impl HostPortDrop {
    pub fn new(port: u16) -> HostPortDrop {
        env::require_root();
        let n = NEXT_HOST_TABLE.fetch_add(1, Ordering::Relaxed);
        let table = format!("inet kdt{}_{n}", std::process::id());
        // Constructed before the rule exists so that Drop also removes a
        // table whose rule could not be added.
        let guard = HostPortDrop {
            table: Some(table.clone()),
        };
        cmd::run("nft", &[&drop_script(&table, &to_port(port))]);
        guard
    }

    /// Lets the port's traffic through again.
    pub fn undrop(&mut self) {
        if let Some(table) = self.table.take() {
            cmd::run("nft", &[&format!("delete table {table}")]);
        }
    }
}

impl Drop for HostPortDrop {
    fn drop(&mut self) {
        let Some(table) = self.table.take() else {
            return;
        };
        // No panic here: Drop may run while a test is already unwinding.
        match cmd::try_output(Command::new("nft").arg(format!("delete table {table}"))) {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "cleanup: nft delete table {table}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(e) => eprintln!("cleanup: {e}"),
        }
    }
}
