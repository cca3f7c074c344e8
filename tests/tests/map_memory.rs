//! Kernel memory: the programs' maps of classes that do not run are freed
//! once the agent has attached, and those of the classes that run are at
//! their documented sizes (the socket map at `--max-sockets`, or sized for the host's TCP
//! sockets when not given), as `agent_start` reports them.

use std::{
    fs,
    net::{Ipv4Addr, TcpListener, TcpStream},
    os::fd::{FromRawFd, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use kdiag_tests::{
    agent::Agent,
    bpf::{MapInfo, maps_held_by},
    env::require_root,
    max_wait,
    netns::unique_port,
    record::{class_totals, is_type},
};
use serde_json::Value;

/// Maps of the TCP, memory and drop classes: sized when their class runs,
/// freed when none does.
const CLASS_MAPS: &[&str] = &[
    "DROP_COUNTS",
    "DROP_EVENT",
    "SOCKS",
    "SOCK_BUF",
    "NESTING",
    "LISTENERS",
    "LISTENERS_NEW",
    "STATE_EVENT",
    "RETRANS_EVENT",
    "SYNACK_RETRANS",
    "STALL_STARTS",
    "STALL_STACKED",
    "STATS_ZERO",
    "TRY_ORDER",
    "RECLAIM_STATS",
    "COMPACT_STATS",
];

fn map<'a>(maps: &'a [MapInfo], name: &str) -> &'a MapInfo {
    maps.iter()
        .find(|m| m.name == name)
        .unwrap_or_else(|| panic!("the agent holds no {name} map: {maps:#?}"))
}

fn assert_not_held(maps: &[MapInfo], names: &[&str], class: &str) {
    for name in names {
        assert!(
            maps.iter().all(|m| m.name != *name),
            "`{class}` holds {name}, which none of its programs uses: {maps:#?}"
        );
    }
}

#[test]
fn maps_of_classes_that_do_not_run_are_freed() {
    require_root();
    let (mut agent, _) = Agent::start(&["softirq"], &["irq/softirq_entry"]);
    let maps = maps_held_by(agent.pid());
    agent.stop_ok();
    assert_not_held(&maps, CLASS_MAPS, "softirq");
    // What it holds is its own: the histograms, and the counters and
    // settings every program shares.
    for name in ["SOFTIRQ", "LOSSES", "PROGRAM_COST", "BUDGET"] {
        map(&maps, name);
    }
    // Everything but the 4 MiB ring: the per-CPU softirq histograms (10
    // vectors, under 700 bytes each) and small bookkeeping, about 20 KB on
    // 2 CPUs; older kernels (the 5.10 and 6.1 guests) report each map's
    // memlock in whole pages (48 KiB there). The socket map alone would be
    // a mebibyte.
    let per_cpu = 10 * 1024 * kdiag_tests::env::possible_cpus() as u64;
    let others: u64 = maps
        .iter()
        .filter(|m| m.name != "EVENTS")
        .map(|m| m.bytes_memlock)
        .sum();
    assert!(
        others < 64 * 1024 + per_cpu,
        "`softirq` holds {others} bytes of maps besides the ring: {maps:#?}"
    );
}

#[test]
fn running_classes_size_their_maps() {
    require_root();
    let (mut agent, _) = Agent::start(
        &["tcp", "--max-sockets", "4096"],
        &["sock/inet_sock_set_state"],
    );
    let tcp = maps_held_by(agent.pid());
    agent.stop_ok();
    assert_eq!(map(&tcp, "SOCKS").max_entries, 4096, "{tcp:#?}");
    assert_eq!(map(&tcp, "LISTENERS").max_entries, 1024, "{tcp:#?}");
    assert_eq!(map(&tcp, "SYNACK_RETRANS").max_entries, 4096, "{tcp:#?}");
    assert_not_held(&tcp, &["STALL_STARTS", "DROP_COUNTS"], "tcp");

    // The per-reason drop counters, and the socket map for TCP owners.
    let (mut agent, start) = Agent::start(&["drop"], &["skb/kfree_skb"]);
    let drop = maps_held_by(agent.pid());
    agent.stop_ok();
    assert_eq!(map(&drop, "DROP_COUNTS").max_entries, 1024, "{drop:#?}");
    reported_as_held(&start, &drop, &["DROP_COUNTS", "SOCKS", "LISTENERS"]);
    // Only the TCP classes count SYN-ACK retransmits.
    assert_not_held(&drop, &["SYNACK_RETRANS"], "drop");

    let (mut agent, _) = Agent::start(&["compact"], &["compaction/mm_compaction_begin"]);
    let compact = maps_held_by(agent.pid());
    agent.stop_ok();
    assert_eq!(
        map(&compact, "STALL_STARTS").max_entries,
        10240,
        "{compact:#?}"
    );
    assert_eq!(
        map(&compact, "COMPACT_STATS").max_entries,
        16384,
        "{compact:#?}"
    );
    assert_not_held(&compact, &["RECLAIM_STATS", "SOCKS"], "compact");
}

/// `agent_start`'s `map_entries` are the sizes the kernel holds.
fn reported_as_held(start: &Value, maps: &[MapInfo], names: &[&str]) {
    for name in names {
        assert_eq!(
            start["map_entries"][name].as_u64(),
            Some(map(maps, name).max_entries),
            "{name}: {start} {maps:#?}"
        );
    }
}

/// `TCP: ... alloc N` of /proc/net/sockstat: the host's TCP sockets.
fn tcp_sockets_allocated() -> u64 {
    let sockstat = fs::read_to_string("/proc/net/sockstat").expect("reading /proc/net/sockstat");
    let line = sockstat
        .lines()
        .find_map(|l| l.strip_prefix("TCP:"))
        .unwrap_or_else(|| panic!("no TCP line in {sockstat}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    words
        .windows(2)
        .find_map(|w| (w[0] == "alloc").then(|| w[1].parse().ok()).flatten())
        .unwrap_or_else(|| panic!("no TCP alloc in {sockstat}"))
}

/// The documented default `--max-sockets` for `allocated` TCP sockets:
/// twice them as a power of two, within 8192 and 262144.
fn sized_for(allocated: u64) -> u64 {
    (allocated * 2).next_power_of_two().clamp(8192, 262_144)
}

/// `n` TCP sockets, never connected: each counts in sockstat's `alloc`.
fn tcp_sockets(n: usize) -> Vec<OwnedFd> {
    raise_open_files(n);
    (0..n)
        .map(|_| {
            // SAFETY: plain socket(2); the fd is owned from here.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            // SAFETY: a new fd nothing else owns.
            unsafe { OwnedFd::from_raw_fd(fd) }
        })
        .collect()
}

/// Room for `n` more open files in this process, on top of what the other
/// tests of this binary, which run beside it, took: each adds its own to
/// the room kept for everything else.
fn raise_open_files(n: usize) {
    static RESERVED: std::sync::Mutex<usize> = std::sync::Mutex::new(1024);
    let mut reserved = RESERVED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    *reserved += n;
    let want = *reserved as libc::rlim_t;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit then setrlimit with a valid rlimit on the stack
    // (root may raise the hard limit).
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit);
        if limit.rlim_cur >= want {
            return;
        }
        limit.rlim_cur = want;
        limit.rlim_max = limit.rlim_max.max(want);
        libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit)
    };
    assert_eq!(
        raised,
        0,
        "raising the open-file limit: {}",
        std::io::Error::last_os_error()
    );
}

/// Without `--max-sockets` the socket map follows the host's TCP sockets
/// at start: with 5000 more held open, past the 8192 floor. The host's
/// count moves with whatever else runs on it, so it is watched while the
/// agent starts, and the size must be the rule's for a count seen then.
/// With `--max-sockets` the option wins whatever the host has.
#[test]
fn the_socket_map_is_sized_for_the_hosts_sockets() {
    require_root();
    let held = tcp_sockets(5000);
    let watching = Arc::new(AtomicBool::new(true));
    let watcher = {
        let watching = Arc::clone(&watching);
        thread::spawn(move || {
            let (mut low, mut high) = (u64::MAX, 0);
            while watching.load(Ordering::Relaxed) {
                let n = tcp_sockets_allocated();
                (low, high) = (low.min(n), high.max(n));
                thread::sleep(Duration::from_millis(1));
            }
            (low, high)
        })
    };
    let (mut agent, start) = Agent::start(&["tcp"], &["sock/inet_sock_set_state"]);
    watching.store(false, Ordering::Relaxed);
    let (low, high) = watcher.join().expect("the sockstat watcher panicked");
    let maps = maps_held_by(agent.pid());
    agent.stop_ok();
    let socks = map(&maps, "SOCKS").max_entries;
    assert!(
        low >= 5000,
        "sockstat counted {low} TCP sockets with 5000 held"
    );
    assert!(
        (sized_for(low)..=sized_for(high)).contains(&socks),
        "SOCKS {socks} for {low}-{high} TCP sockets at start"
    );
    assert!(socks >= 16384, "{socks}");
    reported_as_held(&start, &maps, &["SOCKS", "LISTENERS", "SYNACK_RETRANS"]);
    assert!(
        !start["degraded"].to_string().contains("sockstat"),
        "{start}"
    );

    let (mut agent, start) = Agent::start(
        &["run", "--max-sockets", "2048"],
        &["sock/inet_sock_set_state"],
    );
    let maps = maps_held_by(agent.pid());
    agent.stop_ok();
    drop(held);
    assert_eq!(map(&maps, "SOCKS").max_entries, 2048, "{maps:#?}");
    reported_as_held(&start, &maps, &["SOCKS"]);
}

/// Loopback connections held open at once: both ends of each are sockets,
/// three times the smallest `--max-sockets`.
const HELD: usize = 1536;

/// Sockets the kernel's socket map forgets are counted, not lost silently:
/// with `--max-sockets 1024` and HELD connections opened after the start,
/// at most 1024 of their 2 * HELD sockets are still in the map when they
/// close, so the first closing change of each of the others finds it
/// forgotten, and the `tcp` class, which saw their earlier changes, counts
/// it in `tcp_summary.socks_evicted` (less those whose earlier changes it
/// never got: skipped, dropped or lost); their `tcp_conn` has no role.
/// Other sockets of the host may add to the count. With the map sized for
/// the host (at least 8192), none.
#[test]
fn sockets_the_socket_map_forgot_are_counted() {
    require_root();
    raise_open_files(2 * HELD);
    let small = evicted_over(&["--max-sockets", "1024"]);
    let forgotten = (2 * HELD - 1024) as u64;
    // Each forgotten socket's tcp_conn is that of a socket older than the
    // agent: no role.
    assert!(
        small.roleless + small.unseen >= forgotten,
        "{small:?}: at least {forgotten} sockets forgotten"
    );
    assert!(
        small.evicted + small.unseen >= small.roleless,
        "{small:?}: each roleless tcp_conn is of a socket counted as forgotten"
    );
    let sized = evicted_over(&[]);
    assert_eq!(sized.evicted, 0, "{sized:?}");
    // But for sockets whose birth the kernel skipped.
    assert!(sized.roleless <= sized.unseen, "{sized:?}");
}

#[derive(Debug)]
struct Evicted {
    /// `tcp_summary.socks_evicted`, summed.
    evicted: u64,
    /// `tcp_conn` records without a `role`.
    roleless: u64,
    /// Changes the agent never got: `skipped`, `dropped` and `lost` of the
    /// `tcp` class.
    unseen: u64,
}

/// `tcp` with `extra` options while HELD loopback connections open, are
/// all held, then close.
fn evicted_over(extra: &[&str]) -> Evicted {
    let port = unique_port();
    let port_arg = port.to_string();
    let mut args = vec!["-i", "1", "tcp", "--port", &port_arg];
    args.extend_from_slice(extra);
    let (mut agent, _) = Agent::start(&args, &["sock/inet_sock_set_state"]);
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).expect("listening");
    let mut held = Vec::with_capacity(2 * HELD);
    for _ in 0..HELD {
        held.push(TcpStream::connect((Ipv4Addr::LOCALHOST, port)).expect("connecting"));
        held.push(listener.accept().expect("accepting").0);
    }
    drop(held);
    // A side whose every change the kernel skipped has no tcp_conn: up to
    // 2 * HELD, until they stop coming.
    agent.wait_for_up_to_n("a tcp_conn per side", 2 * HELD, 3, max_wait(), |r| {
        is_type(r, "tcp_conn")
    });
    let recs = agent.stop_ok();
    let evicted = recs
        .iter()
        .filter(|r| is_type(r, "tcp_summary"))
        .map(|r| {
            r["socks_evicted"]
                .as_u64()
                .unwrap_or_else(|| panic!("no socks_evicted in {r}"))
        })
        .sum();
    let roleless = recs
        .iter()
        .filter(|r| is_type(r, "tcp_conn") && r["role"].is_null())
        .count() as u64;
    let tcp = class_totals(&recs, "tcp");
    Evicted {
        evicted,
        roleless,
        unseen: tcp.skipped.unwrap_or(0) + tcp.dropped + tcp.lost,
    }
}
