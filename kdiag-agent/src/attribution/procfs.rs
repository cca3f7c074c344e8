//! /proc readers: socket tables, file descriptors, process names and cgroups.
//!
//! Everything here tolerates processes that vanish mid-read and odd contents:
//! a parse failure skips the line or the process, never panics.

use std::{
    collections::HashSet,
    fs,
    io::{self, BufRead},
    os::unix::fs::MetadataExt as _,
    path::Path,
};

/// One row of /proc/<pid>/net/tcp or tcp6: a socket's addresses and inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TcpRow {
    pub local: ([u8; 16], u16),
    pub remote: ([u8; 16], u16),
    /// The kernel's TCP state number (`st`, 0x0A = LISTEN).
    pub state: u8,
    pub inode: u64,
}

/// Parses /proc/net/tcp or tcp6 text. Addresses are printed as the kernel's
/// in-memory words in host byte order (`0100007F:1F90` is 127.0.0.1:8080 on
/// little-endian); they are returned in network byte order, IPv4 in the
/// first 4 bytes.
/// Read a line at a time: the table of a busy host runs to tens of
/// megabytes (200k sockets: 32 MiB of text).
pub(crate) fn tcp_rows(text: impl BufRead) -> impl Iterator<Item = TcpRow> {
    text.lines()
        .skip(1)
        .map_while(Result::ok)
        .filter_map(|line| parse_tcp_row(&line))
}

fn parse_tcp_row(line: &str) -> Option<TcpRow> {
    let mut cols = line.split_whitespace();
    let _slot = cols.next()?;
    let local = parse_endpoint(cols.next()?)?;
    let remote = parse_endpoint(cols.next()?)?;
    let state = u8::from_str_radix(cols.next()?, 16).ok()?;
    // tx_queue:rx_queue, tr:tm->when, retrnsmt, uid, timeout, inode
    let inode = cols.nth(5)?.parse().ok()?;
    Some(TcpRow {
        local,
        remote,
        state,
        inode,
    })
}

fn parse_endpoint(s: &str) -> Option<([u8; 16], u16)> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut out = [0u8; 16];
    match addr.len() {
        8 => out[..4].copy_from_slice(&u32::from_str_radix(addr, 16).ok()?.to_ne_bytes()),
        32 => {
            for (i, chunk) in out.chunks_exact_mut(4).enumerate() {
                let word = addr.get(i * 8..i * 8 + 8)?;
                chunk.copy_from_slice(&u32::from_str_radix(word, 16).ok()?.to_ne_bytes());
            }
        }
        _ => return None,
    }
    Some((out, port))
}

/// Pids in /proc, in directory order.
pub(crate) fn pids() -> impl Iterator<Item = u32> {
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
}

/// What tells the network namespace of `pid` apart from the others: the
/// inode number of its /proc/PID/net/tcp. Each namespace registers a table
/// of its own (tcp4_proc_init_net in net/ipv4/tcp_ipv4.c), and every /proc
/// entry gets an inode number of its own (proc_register in
/// fs/proc/generic.c). Unlike /proc/PID/ns/net, which only a process that
/// may ptrace `pid` can follow, any process may stat it.
pub(crate) fn tcp_table_id(pid: u32) -> Option<u64> {
    fs::metadata(format!("/proc/{pid}/net/tcp"))
        .ok()
        .map(|m| m.ino())
}

/// The inode number of the network namespace of `pid` (from the link
/// /proc/PID/ns/net, `net:[4026531840]`), which only a process that may
/// ptrace `pid` can read.
pub(crate) fn netns_inode(pid: u32) -> Option<u64> {
    let link = fs::read_link(format!("/proc/{pid}/ns/net")).ok()?;
    parse_ns_link(link.to_str()?)
}

fn parse_ns_link(link: &str) -> Option<u64> {
    link.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

/// When `pid` started (clock ticks after boot, field 22 of /proc/PID/stat,
/// which every user may read): with the pid it names one process, where a
/// pid alone may name a later one that got the same number.
pub(crate) fn start_time(pid: u32) -> Option<u64> {
    parse_start_time(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn parse_start_time(stat: &str) -> Option<u64> {
    // The comm (field 2) is in parentheses and may hold spaces or ')'.
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// The TCP sockets of the network namespace `pid` lives in, both families;
/// `None` when its IPv4 table cannot be opened (`pid` is gone), so that a
/// caller can read the namespace through another process. Once open, a
/// table reads to its end even if `pid` exits: the open file holds the
/// namespace. The IPv6 table is absent on a kernel without IPv6.
pub(crate) fn tcp_sockets(pid: u32) -> Option<impl Iterator<Item = TcpRow>> {
    let open = |f| fs::File::open(format!("/proc/{pid}/net/{f}")).ok();
    let v4 = open("tcp")?;
    Some(
        [Some(v4), open("tcp6")]
            .into_iter()
            .flatten()
            .flat_map(|file| tcp_rows(io::BufReader::new(file))),
    )
}

/// The inodes of the sockets `pid` holds file descriptors on; none when
/// its descriptors cannot be read (another user's, without CAP_SYS_PTRACE
/// and CAP_DAC_READ_SEARCH).
pub(crate) fn socket_inodes(pid: u32) -> impl Iterator<Item = u64> {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .filter_map(|fd| socket_inode(&fs::read_link(fd.ok()?.path()).ok()?))
}

/// The inode of a descriptor's link text `socket:[INODE]`.
fn socket_inode(link: &Path) -> Option<u64> {
    link.to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// The process's name (`comm`), without the trailing newline.
pub(crate) fn comm(pid: u32) -> Option<String> {
    let s = fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    Some(s.trim_end_matches('\n').to_owned())
}

pub(crate) fn process_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The unified (v2) cgroup path of a process, from its `0::` line.
pub(crate) fn cgroup_v2(pid: u32) -> Option<String> {
    let file = fs::File::open(format!("/proc/{pid}/cgroup")).ok()?;
    parse_cgroup_v2(io::BufReader::new(file).lines().map_while(Result::ok))
}

pub(crate) fn parse_cgroup_v2(lines: impl Iterator<Item = String>) -> Option<String> {
    lines
        .filter_map(|l| l.strip_prefix("0::").map(str::to_owned))
        .next()
}

/// `Tcp: RetransSegs` and `OutSegs` from /proc/net/snmp (this network
/// namespace's counters).
pub(crate) fn tcp_segments() -> Option<(u64, u64)> {
    let [retrans, out] = tcp_counters(
        &fs::read_to_string("/proc/net/snmp").ok()?,
        ["RetransSegs", "OutSegs"],
    )?;
    Some((retrans, out))
}

/// The TCP connection ends opened so far in the network namespace of
/// `pid`: `Tcp: ActiveOpens` (connect()) plus `PassiveOpens` (accepted) of
/// /proc/PID/net/snmp, which any process may read.
pub(crate) fn tcp_opens(pid: u32) -> Option<u64> {
    let [active, passive] = tcp_counters(
        &fs::read_to_string(format!("/proc/{pid}/net/snmp")).ok()?,
        ["ActiveOpens", "PassiveOpens"],
    )?;
    Some(active.saturating_add(passive))
}

/// A process in each network namespace that has one, with the namespace's
/// id ([`tcp_table_id`]): the first one found in /proc of each.
pub(crate) fn one_pid_per_netns() -> Vec<(u32, u64)> {
    let mut seen = HashSet::new();
    pids()
        .filter_map(|pid| Some((pid, tcp_table_id(pid)?)))
        .filter(|&(_, netns)| seen.insert(netns))
        .collect()
}

/// The `Tcp:` counters `names` of /proc/net/snmp, which has, per protocol,
/// a line of names then a line of values.
pub(crate) fn tcp_counters<const N: usize>(text: &str, names: [&str; N]) -> Option<[u64; N]> {
    let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
    let header: Vec<&str> = tcp.next()?.split_whitespace().collect();
    let values: Vec<&str> = tcp.next()?.split_whitespace().collect();
    let mut found = [0; N];
    for (slot, name) in found.iter_mut().zip(names) {
        let i = header.iter().position(|n| *n == name)?;
        *slot = values.get(i)?.parse().ok()?;
    }
    Some(found)
}

/// TCP sockets allocated on the host, in every network namespace and both
/// families: `TCP: ... alloc N` of /proc/net/sockstat (the kernel's
/// `tcp_sockets_allocated`, which IPv6 sockets count in too: sockstat6 has
/// no `alloc`). Time-wait and request sockets are not in it. `None` if
/// unreadable.
pub(crate) fn tcp_sockets_allocated() -> Option<u64> {
    parse_sockstat_tcp_alloc(&fs::read_to_string("/proc/net/sockstat").ok()?)
}

/// The `alloc` of the `TCP:` line: `TCP: inuse 5 orphan 0 tw 2 alloc 7 mem 1`.
pub(crate) fn parse_sockstat_tcp_alloc(text: &str) -> Option<u64> {
    let line = text.lines().find_map(|l| l.strip_prefix("TCP:"))?;
    let mut words = line.split_whitespace();
    while let Some(word) = words.next() {
        if word == "alloc" {
            return words.next()?.parse().ok();
        }
    }
    None
}

/// The running kernel's release, as `uname -r` prints it.
pub(crate) fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// CPU time the machine has spent busy since boot, all CPUs summed, in ns:
/// the first line of /proc/stat less its idle and iowait columns (in clock
/// ticks, `USER_HZ`). `None` if unreadable.
pub(crate) fn busy_cpu_ns() -> Option<u64> {
    let stat = fs::read_to_string("/proc/stat").ok()?;
    busy_ticks(stat.lines().next()?).map(|ticks| {
        ticks.saturating_mul(1_000_000_000 / crate::sys::process::clock_ticks_per_second())
    })
}

/// Softirq handler runs since boot, every vector on every CPU summed
/// (/proc/softirqs). `None` if unreadable.
pub(crate) fn softirqs_total() -> Option<u64> {
    fs::read_to_string("/proc/softirqs")
        .ok()
        .map(|table| kdiag_common::softirq::proc_softirqs_total(&table))
}

/// Busy ticks of a /proc/stat `cpu` line: user nice system idle iowait irq
/// softirq steal (guest time is already in user and nice).
fn busy_ticks(line: &str) -> Option<u64> {
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let ticks: Vec<u64> = fields
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let idle = ticks.get(3)? + ticks.get(4).copied().unwrap_or(0);
    Some(ticks.iter().sum::<u64>().saturating_sub(idle))
}

pub(crate) fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use super::*;

    #[test]
    fn busy_ticks_leave_out_idle_and_iowait() {
        let line = "cpu  100 5 50 1000 20 3 7 2 0 0";
        assert_eq!(busy_ticks(line), Some(100 + 5 + 50 + 3 + 7 + 2));
        assert_eq!(busy_ticks("cpu0 1 2 3 4 5 6 7 8"), None);
        assert_eq!(busy_ticks("cpu  1 2"), None);
    }

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0
   1: 0200E70A:C350 0100E70A:2329 01 00000000:00000000 00:00000000 00000000     0        0 678 2 0000000000000000 20 4 30 10 -1
garbage line
";

    #[test]
    fn parses_ipv4_rows() {
        let rows: Vec<_> = tcp_rows(TCP.as_bytes()).collect();
        assert_eq!(rows.len(), 2);
        assert_eq!(
            rows[0].local,
            ([127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8080)
        );
        assert_eq!((rows[0].state, rows[0].inode), (0x0A, 12345));
        assert_eq!((rows[1].state, rows[1].inode), (0x01, 678));
        assert_eq!(&rows[1].local.0[..4], &[10, 231, 0, 2]);
        assert_eq!(rows[1].local.1, 50000);
        assert_eq!(&rows[1].remote.0[..4], &[10, 231, 0, 1]);
        assert_eq!(rows[1].remote.1, 9001);
    }

    #[test]
    fn parses_ipv6_rows() {
        let text = "header\n   0: 00000000000000000000000001000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 99 1 0\n";
        let rows: Vec<_> = tcp_rows(text.as_bytes()).collect();
        assert_eq!(rows.len(), 1);
        assert_eq!(Ipv6Addr::from(rows[0].local.0), Ipv6Addr::LOCALHOST);
        assert_eq!(rows[0].local.1, 22);
        assert_eq!(rows[0].inode, 99);
    }

    #[test]
    fn odd_contents_never_panic() {
        for text in [
            "",
            "\n\n",
            "h\n0: zz:zz zz:zz",
            "h\n0: 0100007F:1F90",
            "h\n0: 0100007F:1F90 00:0 0A a b c d e f",
        ] {
            let _ = tcp_rows(text.as_bytes()).count();
        }
    }

    #[test]
    fn snmp_counters() {
        let text = "Ip: Forwarding DefaultTTL\nIp: 1 64\nTcp: RtoAlgorithm RtoMin ActiveOpens PassiveOpens InSegs OutSegs RetransSegs InErrs\nTcp: 1 200 30 12 10 2000 7 0\nUdp: InDatagrams\nUdp: 5\n";
        let segments = ["RetransSegs", "OutSegs"];
        assert_eq!(tcp_counters(text, segments), Some([7, 2000]));
        assert_eq!(
            tcp_counters(text, ["ActiveOpens", "PassiveOpens"]),
            Some([30, 12])
        );
        assert_eq!(tcp_counters("Tcp: OutSegs\n", segments), None);
        assert_eq!(
            tcp_counters("Tcp: OutSegs RetransSegs\nTcp: x 1\n", segments),
            None
        );
        assert_eq!(tcp_counters("", segments), None);
    }

    /// The `alloc` of the TCP line, and nothing for odd files: a missing
    /// line or word, a value that is no count, the TCP6 line alone.
    #[test]
    fn sockstat_tcp_alloc() {
        let text = "sockets: used 312\nTCP: inuse 12 orphan 0 tw 3 alloc 20 mem 4\n\
                    UDP: inuse 2 mem 1\n";
        assert_eq!(parse_sockstat_tcp_alloc(text), Some(20));
        for odd in [
            "",
            "sockets: used 3\n",
            "TCP6: inuse 4\n",
            "TCP: inuse 12 orphan 0 tw 3 mem 4\n",
            "TCP: inuse 12 alloc\n",
            "TCP: alloc -1\n",
            "TCP: alloc 1e9\n",
            "TCP: alloc 99999999999999999999999\n",
            "\u{0}\u{ff}garbage",
        ] {
            assert_eq!(parse_sockstat_tcp_alloc(odd), None, "{odd:?}");
        }
    }

    #[test]
    fn start_time_is_field_22() {
        let stat = "4242 (a) b) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 \
                    987654 1000 10 18446744073709551615";
        assert_eq!(parse_start_time(stat), Some(987_654));
        assert_eq!(parse_start_time("4242 (a) S 1"), None);
    }

    #[test]
    fn namespace_links() {
        assert_eq!(parse_ns_link("net:[4026531840]"), Some(4_026_531_840));
        assert_eq!(parse_ns_link("mnt:[4026531840]"), None);
    }

    #[test]
    fn socket_links() {
        assert_eq!(socket_inode(Path::new("socket:[12345]")), Some(12345));
        for other in [
            "pipe:[12345]",
            "/dev/null",
            "socket:[]",
            "socket:[x]",
            "socket:[1",
        ] {
            assert_eq!(socket_inode(Path::new(other)), None, "{other}");
        }
    }

    #[test]
    fn cgroup_v2_line() {
        let lines = ["4:memory:/user.slice", "0::/system.slice/ssh.service"].map(String::from);
        assert_eq!(
            parse_cgroup_v2(lines.into_iter()).as_deref(),
            Some("/system.slice/ssh.service")
        );
        assert_eq!(parse_cgroup_v2(std::iter::empty()), None);
    }
}
