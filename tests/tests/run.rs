//! `kdiag-agent run`: every class in one process and one stream.

use std::{
    net::{TcpListener, TcpStream},
    time::Duration,
};

use kdiag_tests::{
    agent::Agent,
    bpf,
    env::require_root,
    loopback::LoopbackTraffic,
    max_wait,
    record::{self, is_type, u64_field},
};
use serde_json::Value;

/// Every tracepoint of every class.
const ALL_TRACEPOINTS: &[&str] = &[
    "tcp/tcp_retransmit_skb",
    "tcp/tcp_retransmit_synack",
    "sock/inet_sock_set_state",
    "tcp/tcp_destroy_sock",
    "irq/softirq_raise",
    "irq/softirq_entry",
    "irq/softirq_exit",
    "vmscan/mm_vmscan_direct_reclaim_begin",
    "vmscan/mm_vmscan_direct_reclaim_end",
    "vmscan/mm_vmscan_memcg_reclaim_begin",
    "vmscan/mm_vmscan_memcg_reclaim_end",
    "compaction/mm_compaction_begin",
    "compaction/mm_compaction_end",
    "compaction/mm_compaction_try_to_compact_pages",
    "skb/kfree_skb",
];

const CLASSES: &[&str] = &["compact", "drop", "reclaim", "retrans", "softirq", "tcp"];

/// `run --interval 1 --duration 4`: everything attached, nothing degraded,
/// an `agent_stats` per interval naming all six classes, kernel programs
/// that ran and were timed, and each class's summaries in the stream.
#[test]
fn run_attaches_every_class_and_accounts_for_each() {
    require_root();
    // Loopback traffic, so the TCP programs run too.
    let _traffic = LoopbackTraffic::start(Duration::from_millis(5));
    let (mut agent, start) = Agent::start(
        &["run", "--interval", "1", "--duration", "4"],
        ALL_TRACEPOINTS,
    );
    agent.assert_only_kernel_limits(&start);
    // A few connections of this process, for the tcp class to attribute.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().unwrap().port();
    for _ in 0..3 {
        let _client = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let _server = listener.accept().expect("accept");
    }
    let status = agent.wait_exit(max_wait());
    assert_eq!(status.code(), Some(0), "{}", agent.stderr());
    let recs = agent.records();
    agent.assert_programs_released();

    let stats: Vec<&Value> = recs.iter().filter(|r| is_type(r, "agent_stats")).collect();
    // One per interval and one at exit. An agent the host starves (an
    // emulated guest beside other work) writes one for the time missed
    // instead of a burst, so only their lengths are sure to cover the
    // 4 s run, and there are at least two.
    let covered_ns: u64 = stats.iter().map(|s| u64_field(s, "interval_ns")).sum();
    assert!(
        stats.len() >= 2 && covered_ns >= 3_900_000_000,
        "{} agent_stats covering {covered_ns} ns in a 4 s run; each (ts, interval_ns, \
         cpu_ns): {:?}; longest pause between kernel events: {:.0} ms",
        stats.len(),
        stats
            .iter()
            .map(|s| (s["ts"].as_str(), &s["interval_ns"], &s["cpu_ns"]))
            .collect::<Vec<_>>(),
        longest_event_pause_ms(&recs)
    );
    assert!(
        is_type(recs.last().unwrap(), "agent_stats"),
        "last line: {}",
        recs.last().unwrap()
    );
    for s in &stats {
        let classes = s["classes"].as_object().expect("classes object");
        let mut names: Vec<&str> = classes.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, CLASSES, "{s}");
        for (name, c) in classes {
            for key in [
                "events",
                "dropped",
                "lost",
                "failed",
                "map_full",
                "undecodable",
                "filtered",
            ] {
                assert!(c[key].is_u64(), "{name}.{key} in {s}");
            }
            // Null where the kernel does not count a program's skipped runs.
            assert!(
                c["skipped"].is_u64()
                    || (c["skipped"].is_null() && !bpf::kernel_counts_tracepoint_misses()),
                "{name}.skipped in {s}"
            );
        }
        assert!(s["rss_bytes"].as_u64().unwrap() > 0, "{s}");
    }
    // Programs that ran were timed: the kernel's statistics are on for the
    // agent's life. Softirqs never stop, so every full interval has them;
    // the state program ran when this test connected.
    let ran = |s: &Value, program: &str| {
        let p = s["programs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == program)
            .unwrap_or_else(|| panic!("no {program} in {s}"));
        p["run_cnt"].as_u64().unwrap() > 0 && p["run_time_ns"].as_u64().unwrap() > 0
    };
    for s in &stats[..stats.len() - 1] {
        for program in ["softirq_entry", "softirq_exit", "softirq_raise"] {
            assert!(
                ran(s, program),
                "{program} did not run or was not timed: {s}"
            );
        }
    }
    assert!(
        stats.iter().any(|s| ran(s, "inet_sock_set_state")),
        "inet_sock_set_state never ran or was never timed"
    );
    for summary in ["tcp_summary", "softirq_summary", "vmstat"] {
        assert!(
            recs.iter().any(|r| is_type(r, summary)),
            "no {summary} in the stream"
        );
    }
    let ours = recs
        .iter()
        .filter(|r| {
            is_type(r, "tcp_state")
                && record::str_field(r, "old_state") == "SYN_SENT"
                && record::str_field(r, "new_state") == "ESTABLISHED"
                && r["dport"] == port
        })
        .collect::<Vec<_>>();
    assert_eq!(
        ours.len(),
        3,
        "SYN_SENT -> ESTABLISHED to port {port}: {ours:?}"
    );
    for r in ours {
        assert_eq!(r["pid"], std::process::id(), "{r}");
    }
}

/// The longest pause between the times (`ts`) of consecutive kernel events
/// in `recs`, in ms. The loopback traffic makes one every few milliseconds:
/// a long pause says the whole machine stood still (an emulated guest on a
/// busy host), not only the agent's loop.
fn longest_event_pause_ms(recs: &[Value]) -> f64 {
    // Seconds of the day of `...THH:MM:SS.fraction Z`: the run is seconds
    // long, and a pause across midnight only shows as none.
    let secs = |ts: &str| -> Option<f64> {
        let time = ts.split_once('T')?.1.strip_suffix('Z')?;
        let mut parts = time.split(':');
        let (h, m, s) = (parts.next()?, parts.next()?, parts.next()?);
        Some(
            h.parse::<f64>().ok()? * 3600.0
                + m.parse::<f64>().ok()? * 60.0
                + s.parse::<f64>().ok()?,
        )
    };
    let mut times: Vec<f64> = recs
        .iter()
        .filter(|r| {
            !["agent_start", "agent_stats", "budget", "vmstat"].contains(&record::kind_of(r))
        })
        .filter(|r| !record::kind_of(r).ends_with("_summary"))
        .filter_map(|r| secs(r["ts"].as_str()?))
        .collect();
    times.sort_by(f64::total_cmp);
    times
        .windows(2)
        .map(|w| (w[1] - w[0]) * 1000.0)
        .fold(0.0, f64::max)
}
