//! The TCP classes (`retrans`, `tcp`) and what they share: one set of kernel
//! programs configured by one filter, the connection table, state names.

pub(crate) mod config;
pub(crate) mod conns;
pub(crate) mod health;
pub(crate) mod lifecycle;
pub(crate) mod retrans;
pub(crate) mod state_names;

use clap::Args;

/// Options of the `tcp` class.
#[derive(Debug, Args)]
pub(crate) struct TcpArgs {
    #[command(flatten)]
    pub filter: TcpFilterArgs,
    /// Only write state changes into or out of this state (ESTABLISHED,
    /// SYN_SENT, SYN_RECV, FIN_WAIT1, FIN_WAIT2, TIME_WAIT, CLOSE,
    /// CLOSE_WAIT, LAST_ACK, LISTEN, CLOSING, NEW_SYN_RECV). tcp_conn records
    /// are still written for every connection.
    #[arg(long, value_name = "STATE", value_parser = parse_state)]
    pub state: Option<i32>,
}

fn parse_state(s: &str) -> Result<i32, String> {
    let name = s.trim_start_matches("TCP_").trim_start_matches("tcp_");
    state_names::state_number(name).ok_or_else(|| {
        format!("unknown TCP state {s:?}; use a kernel name such as ESTABLISHED or CLOSE_WAIT")
    })
}

/// Which connections the TCP classes report.
#[derive(Debug, Args)]
pub(crate) struct TcpFilterArgs {
    /// Only connections with this local or remote port; repeat for several
    /// (at most 8).
    #[arg(long = "port", value_name = "PORT",
          value_parser = clap::value_parser!(u16).range(1..))]
    pub ports: Vec<u16>,
    /// Only IPv4.
    #[arg(short = '4', long = "ipv4", conflicts_with = "ipv6")]
    pub ipv4: bool,
    /// Only IPv6.
    #[arg(short = '6', long = "ipv6")]
    pub ipv6: bool,
    /// Sockets the kernel programs follow at once, for their owners and
    /// state times (about 136 bytes of kernel memory each). Default: sized
    /// at start from the host's TCP sockets (`alloc` of /proc/net/sockstat,
    /// every namespace): twice them, rounded up to a power of two, at least
    /// 8192 (1.1 MiB) and at most 262144 (34 MiB); 65536 when they cannot
    /// be counted. agent_start's `map_entries` shows the size. Past it the
    /// least recently used are forgotten: their later records are those of
    /// a socket older than the agent, without the owner, role and times the
    /// programs kept (the `tcp` class counts them in tcp_summary's
    /// `socks_evicted`). Set it on a host that will have many more sockets
    /// than at start (`ss -s`).
    #[arg(long, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1024..=16 << 20))]
    pub max_sockets: Option<u32>,
}
