//! A client and a server network namespace joined by a veth pair, with IPv4
//! and IPv6 addresses: real TCP between them, isolated from the host and from
//! the other tests.

use std::ffi::OsStr;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::{cmd, env, max_wait, nft};

/// Interface names are limited to 15 bytes (IFNAMSIZ - 1); the veth ends are
/// named after their namespaces, so namespace names are kept within it too.
const IFNAMSIZ_MAX: usize = 15;

static NEXT_PAIR: AtomicU32 = AtomicU32::new(0);
static NEXT_PORT: AtomicU32 = AtomicU32::new(0);

/// Address family of a test connection, spelled as in the agent's records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The `family` value of kdiag records.
    pub fn as_str(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }
}

/// One namespace of a pair; its veth end carries the same name.
#[derive(Debug)]
pub struct Ns {
    pub name: String,
    pub v4: Ipv4Addr,
    pub v6: Ipv6Addr,
}

impl Ns {
    pub fn addr(&self, family: Family) -> IpAddr {
        match family {
            Family::V4 => self.v4.into(),
            Family::V6 => self.v6.into(),
        }
    }

    /// The local port of the one socket of this namespace in SYN_SENT to
    /// `remote`, waiting until the connect has started (per `ss`, i.e. the
    /// kernel's own view, independent of the agent).
    pub fn wait_syn_sent_port(&self, remote: SocketAddr) -> u16 {
        let deadline = Instant::now() + max_wait();
        loop {
            let ss = cmd::run_in(&self.name, "ss", &["-tnH", "state", "syn-sent"]);
            // Rows: Recv-Q Send-Q Local:Port Peer:Port (IPv6 in brackets).
            let locals: Vec<SocketAddr> = ss
                .lines()
                .filter_map(|row| {
                    let cols: Vec<&str> = row.split_whitespace().collect();
                    let peer: SocketAddr = cols.get(3)?.parse().ok()?;
                    (peer == remote).then(|| cols[2].parse().ok())?
                })
                .collect();
            match locals.as_slice() {
                [local] => return local.port(),
                [] if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                _ => panic!(
                    "{}: expected one SYN_SENT socket to {remote}, found {locals:?}: {ss}",
                    self.name
                ),
            }
        }
    }

    fn ip(&self, args: &[&str]) {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        cmd::run("ip", &full);
    }
}

/// Where a test process runs: the namespace the tests run in (the host's,
/// shared with everything else on the machine) or one of a pair's.
#[derive(Clone, Copy, Debug)]
pub enum Netns<'a> {
    Root,
    Named(&'a Ns),
}

impl<'a> From<&'a Ns> for Netns<'a> {
    fn from(ns: &'a Ns) -> Self {
        Netns::Named(ns)
    }
}

impl Netns<'_> {
    /// For messages.
    pub fn name(&self) -> &str {
        match self {
            Netns::Root => "root",
            Netns::Named(ns) => &ns.name,
        }
    }

    /// `program args…` in this namespace (via `ip netns exec`, which execs
    /// the program in place: the command's child is the program itself).
    pub fn command(&self, program: &str, args: &[impl AsRef<OsStr>]) -> Command {
        let mut cmd = match self {
            Netns::Root => Command::new(program),
            Netns::Named(ns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", &ns.name, program]);
                cmd
            }
        };
        cmd.args(args);
        cmd
    }
}

/// Client namespace (`.1` / `::1`) and server namespace (`.2` / `::2`) on a
/// private /24 and /64. Dropping it deletes both namespaces, which deletes
/// the veth pair and the nftables rules with them.
#[derive(Debug)]
pub struct NetnsPair {
    pub client: Ns,
    pub server: Ns,
}

impl NetnsPair {
    pub fn new() -> NetnsPair {
        env::require_root();
        // Process id + counter: unique across the parallel tests of this run
        // and across concurrent runs (pids are unique while both are alive).
        let pid = std::process::id();
        let n = NEXT_PAIR.fetch_add(1, Ordering::Relaxed);
        // Subnets only have to differ between the pairs of one run so that
        // records are unambiguous to a reader; namespaces isolate the rest.
        let subnet = ((pid + n) % 250 + 1) as u8;
        let ns = |side: &str, host: u8| Ns {
            name: format!("kdt{pid}{side}{n}"),
            v4: Ipv4Addr::new(10, 231, subnet, host),
            v6: Ipv6Addr::new(0xfd00, 0x231, subnet.into(), 0, 0, 0, 0, host.into()),
        };
        // Built before any setup step so that Drop cleans up a half-made pair.
        let pair = NetnsPair {
            client: ns("c", 1),
            server: ns("s", 2),
        };
        for ns in [&pair.client, &pair.server] {
            assert!(
                ns.name.len() <= IFNAMSIZ_MAX,
                "namespace name {} too long",
                ns.name
            );
            // A namespace of this name can only be left over from an earlier,
            // killed run whose pid we now have: remove it.
            let _ = cmd::try_output(Command::new("ip").args(["netns", "del", &ns.name]));
            cmd::run("ip", &["netns", "add", &ns.name]);
        }
        let (c, s) = (&pair.client.name, &pair.server.name);
        cmd::run(
            "ip",
            &[
                "link", "add", c, "netns", c, "type", "veth", "peer", "name", s, "netns", s,
            ],
        );
        for ns in [&pair.client, &pair.server] {
            ns.ip(&["link", "set", "lo", "up"]);
            ns.ip(&["link", "set", &ns.name, "up"]);
            ns.ip(&["addr", "add", &format!("{}/24", ns.v4), "dev", &ns.name]);
            // nodad: usable at once instead of "tentative" for ~1 s.
            ns.ip(&[
                "-6",
                "addr",
                "add",
                &format!("{}/64", ns.v6),
                "dev",
                &ns.name,
                "nodad",
            ]);
        }
        pair
    }

    /// Makes `port` a black hole on the server side (see `nft::drop_tcp_dport`).
    pub fn drop_server_port(&self, port: u16) {
        nft::drop_tcp_dport(&self.server.name, port);
    }

    /// Makes everything the server sends from `port` a black hole on the
    /// client side, so the server retransmits (see `nft::drop_tcp_sport`).
    pub fn drop_from_server_port(&self, port: u16) {
        nft::drop_tcp_sport(&self.client.name, port);
    }

    /// Drops the server's SYN-ACKs from `port` on the client side (see
    /// `nft::drop_synacks_from`).
    pub fn drop_synacks_from_server_port(&self, port: u16) {
        nft::drop_synacks_from(&self.client.name, port);
    }

    /// Lets traffic to the server's ports through again.
    pub fn undrop_server_ports(&self) {
        nft::remove_drops(&self.server.name);
    }

    /// Names of both namespaces, e.g. to check they are gone after Drop.
    pub fn names(&self) -> [String; 2] {
        [self.client.name.clone(), self.server.name.clone()]
    }
}

impl Default for NetnsPair {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for ns in [&self.client, &self.server] {
            // No panic here: Drop may run while a test is already unwinding.
            match cmd::try_output(Command::new("ip").args(["netns", "del", &ns.name])) {
                Ok(out) if out.status.success() => {}
                Ok(out) => eprintln!(
                    "cleanup: ip netns del {}: {}",
                    ns.name,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
                Err(e) => eprintln!("cleanup: {e}"),
            }
        }
    }
}

/// Network namespaces currently named in /run/netns.
pub fn list_namespaces() -> Vec<String> {
    cmd::run("ip", &["netns", "list"])
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// A TCP port no other test of this run uses, and (through the pid) very
/// likely none of a concurrent run. The agent traces every namespace, so
/// tests tell their events apart by port. Below the ephemeral range
/// (32768+), so it never equals a client's source port.
pub fn unique_port() -> u16 {
    const PER_RUN: u32 = 64;
    let base = 10_000 + (std::process::id() % 340) * PER_RUN;
    let n = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
    assert!(
        n < PER_RUN,
        "more than {PER_RUN} ports requested by one test run"
    );
    u16::try_from(base + n).expect("port fits u16")
}
