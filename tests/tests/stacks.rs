//! Kernel stacks of slow events (`--stack-min-latency-us`) against the
//! real kernel: a memcg reclaim stall's stack runs through
//! try_to_free_mem_cgroup_pages, a direct compaction's through
//! try_to_compact_pages, a softirq run's through the kernel's softirq
//! loop; only records at or over the threshold carry one, and none without
//! the option. Each memory test has its own cgroup, sparse file and
//! processes, and filters the agent on them; softirqs belong to no
//! process, so the softirq test checks every run the agent reports.

use std::fs;
use std::time::{Duration, Instant};

use kdiag_tests::agent::Agent;
use kdiag_tests::env::skip_unless;
use kdiag_tests::loopback::LoopbackTraffic;
use kdiag_tests::memory::{Gated, MemoryCgroup, SparseFile, dd, mem_total, of_pid};
use kdiag_tests::record::{class_totals, degraded_why, is_type, str_field, u64_field};
use serde_json::Value;

const MIB: u64 = 1 << 20;
/// The memcg tests' limit and how much their reader reads: 8 times the
/// limit, hundreds of reclaim stalls.
const LIMIT: u64 = 64 * MIB;
const READ_MIB: u64 = 512;
const MEMCG: &[&str] = &[
    "vmscan/mm_vmscan_memcg_reclaim_begin",
    "vmscan/mm_vmscan_memcg_reclaim_end",
];
const COMPACTION: &[&str] = &[
    "compaction/mm_compaction_begin",
    "compaction/mm_compaction_end",
    "compaction/mm_compaction_try_to_compact_pages",
];

/// The frames of a record's stack; panics if it has none.
fn frames(rec: &Value) -> Vec<&str> {
    let stack = rec
        .get("stack")
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("no stack array in {rec}"));
    assert!(!stack.is_empty(), "empty stack in {rec}");
    stack
        .iter()
        .map(|f| {
            let f = f.as_str().unwrap_or_else(|| panic!("frame {f} in {rec}"));
            assert!(is_frame(f), "frame {f:?} is not symbol+0xoffset in {rec}");
            f
        })
        .collect()
}

/// `symbol+0xoffset` or `[unknown]`: never a raw address.
fn is_frame(f: &str) -> bool {
    if f == "[unknown]" {
        return true;
    }
    let Some((symbol, offset)) = f.rsplit_once("+0x") else {
        return false;
    };
    !symbol.is_empty()
        && !symbol.starts_with("0x")
        && !symbol.starts_with("ffff")
        && !offset.is_empty()
        && offset.chars().all(|c| c.is_ascii_hexdigit())
}

fn in_stack(frames: &[&str], function: &str) -> bool {
    frames.iter().any(|f| {
        f.strip_prefix(function)
            .is_some_and(|o| o.starts_with("+0x"))
    })
}

/// A reader stalling against its memory cgroup's limit, watched by an
/// agent taking every stall's stack and one taking those of 300 µs or
/// more: every record of the first has a stack through
/// try_to_free_mem_cgroup_pages; in the second exactly the records at or
/// over the threshold have one.
#[test]
fn memcg_reclaim_stack_names_try_to_free_mem_cgroup_pages() {
    const THRESHOLD_US: u64 = 300;
    let file = SparseFile::new(READ_MIB * MIB);
    let cg = MemoryCgroup::new(LIMIT);
    let mut reader = cg.reader(&file, 0, READ_MIB);
    let pid = reader.pid().to_string();
    let args = |stack_us: &'static str| {
        [
            "reclaim",
            "--kind",
            "memcg",
            "--pid",
            pid.as_str(),
            "--stack-min-latency-us",
            stack_us,
            "-i",
            "0",
        ]
    };
    let (mut every, start) = Agent::start(&args("0"), MEMCG);
    // Stacks are not degraded (older kernels may have other entries).
    assert_eq!(degraded_why(&start, "kallsyms"), None, "in {start}");
    let (mut over, _) = Agent::start(&args("300"), MEMCG);
    reader.go();
    assert!(
        reader.wait(kdiag_tests::max_wait()).success(),
        "reader failed"
    );
    let recs = every.stop_ok();
    let over_recs = over.stop_ok();

    let events = of_pid(&recs, "reclaim", reader.pid());
    assert!(!events.is_empty(), "no reclaim records");
    for rec in &events {
        let frames = frames(rec);
        assert!(
            in_stack(&frames, "try_to_free_mem_cgroup_pages"),
            "no try_to_free_mem_cgroup_pages in {rec}"
        );
    }
    let totals = class_totals(&recs, "reclaim");
    assert_eq!(totals.partial, 0, "stacks not taken: {totals:?}");
    assert_eq!(totals.events, events.len() as u64, "{totals:?}");

    let over_events = of_pid(&over_recs, "reclaim", reader.pid());
    assert_eq!(over_events.len(), events.len(), "the same stalls");
    for rec in &over_events {
        if u64_field(rec, "latency_ns") >= THRESHOLD_US * 1000 {
            frames(rec);
        } else {
            assert!(
                rec.get("stack").is_none(),
                "a stack under the threshold: {rec}"
            );
        }
    }
}

/// Without `--stack-min-latency-us`, no record has a `stack`, not even
/// null.
#[test]
fn no_stack_without_the_option() {
    let file = SparseFile::new(READ_MIB * MIB);
    let cg = MemoryCgroup::new(LIMIT);
    let mut reader = cg.reader(&file, 0, READ_MIB);
    let pid = reader.pid().to_string();
    let (mut agent, _) = Agent::start(
        &["reclaim", "--kind", "memcg", "--pid", &pid, "-i", "0"],
        MEMCG,
    );
    reader.go();
    assert!(
        reader.wait(kdiag_tests::max_wait()).success(),
        "reader failed"
    );
    let recs = agent.stop_ok();
    assert!(
        !of_pid(&recs, "reclaim", reader.pid()).is_empty(),
        "no reclaim records"
    );
    for rec in &recs {
        assert!(
            rec.get("stack").is_none(),
            "a stack without the option: {rec}"
        );
    }
}

/// Whether transparent huge page faults in MADV_HUGEPAGE areas may compact
/// memory directly: THP not `never`, and `defrag` one of the settings that
/// stall such faults (always, madvise, defer+madvise).
fn huge_page_faults_compact() -> bool {
    let selected = |file: &str| {
        fs::read_to_string(format!("/sys/kernel/mm/transparent_hugepage/{file}"))
            .ok()
            .and_then(|s| {
                let start = s.find('[')? + 1;
                let end = s[start..].find(']')? + start;
                Some(s[start..end].to_owned())
            })
    };
    selected("enabled").is_some_and(|e| e != "never")
        && selected("defrag")
            .is_some_and(|d| matches!(d.as_str(), "always" | "madvise" | "defer+madvise"))
}

/// A process faulting transparent huge pages while readers fill the page
/// cache: once no free huge page is left, its faults compact memory
/// directly, and the stack of such a run goes through
/// try_to_compact_pages. Slow, like the direct reclaim test: it reads
/// until the agent has reported a direct compaction (at most 1.5x RAM),
/// which takes as long as filling the free memory. Clean page cache only,
/// which reclaim can always drop: no OOM risk; the faulter maps 64 MiB at
/// a time.
#[test]
fn direct_compaction_stack_names_try_to_compact_pages() {
    if !skip_unless(
        huge_page_faults_compact(),
        "transparent huge page faults do not compact memory here \
         (/sys/kernel/mm/transparent_hugepage/enabled or defrag)",
    ) {
        return;
    }
    const READERS: u64 = 2;
    // Filling 21 GiB of free memory took 48 s to 156 s here while the
    // machine's two cores were busy with other work.
    const DEADLINE: Duration = Duration::from_secs(480);
    let per_reader_mib = mem_total() * 3 / 2 / READERS / MIB + 1;
    let file = SparseFile::new(per_reader_mib * READERS * MIB);
    let mut readers: Vec<Gated> = (0..READERS)
        .map(|i| Gated::spawn(None, &dd(&file, i * per_reader_mib, per_reader_mib)))
        .collect();
    let mut faulter = Gated::spawn(
        None,
        &format!("exec {} huge-pages 64", env!("CARGO_BIN_EXE_kdiag-peer")),
    );
    let pid = faulter.pid();
    let pid_arg = pid.to_string();
    let (mut agent, _) = Agent::start(
        &[
            "compact",
            "--pid",
            &pid_arg,
            "--stack-min-latency-us",
            "0",
            "-i",
            "0",
        ],
        COMPACTION,
    );
    let started = Instant::now();
    faulter.go();
    readers.iter_mut().for_each(Gated::go);
    // Direct compaction has the allocation's order (9: a huge page).
    let first = agent.wait_for("a direct compaction of the faulter", DEADLINE, |r| {
        !of_pid(std::slice::from_ref(r), "compact", pid).is_empty() && r["order"].is_u64()
    });
    let took = started.elapsed();
    drop(readers);
    drop(faulter);
    file.drop_cache();
    let recs = agent.stop_ok();
    eprintln!("first direct compaction after {took:?}: {first}");

    let events = of_pid(&recs, "compact", pid);
    assert!(events.contains(&&first));
    for rec in &events {
        let frames = frames(rec);
        if rec["order"].is_u64() {
            assert!(
                in_stack(&frames, "try_to_compact_pages"),
                "no try_to_compact_pages in {rec}"
            );
        }
    }
    let totals = class_totals(&recs, "compact");
    assert_eq!(totals.partial, 0, "stacks not taken: {totals:?}");
}

/// Softirq runs under loopback TCP traffic, every one streamed
/// (`--min-latency-us 0`), with stacks from the median NET_RX run's
/// length: the runs at or over it carry a stack and the others none, and a
/// NET_RX run's stack is that of the kernel's softirq loop. softirq_exit
/// fires in that loop once the vector's action (net_rx_action) has
/// returned, so the action is not on the stack; the loop is its innermost
/// frame: handle_softirqs on newer kernels (6.18: for softirqs run on
/// leaving an interrupt, on enabling bottom halves and in ksoftirqd alike),
/// __do_softirq on older ones (6.1), where the loop had that name. The
/// threshold comes from a first run without stacks: NET_RX runs took 3 to
/// 20 µs here (median 5.7), tens of times that in an emulated guest, and
/// at the median both sides of it are seen wherever the test runs.
#[test]
fn slow_softirq_runs_carry_stacks() {
    const LOOPS: [&str; 2] = ["handle_softirqs", "__do_softirq"];
    const NEEDS: &[&str] = &["irq/softirq_entry", "irq/softirq_exit"];
    let _traffic = LoopbackTraffic::start(Duration::from_millis(1));
    let (mut calibration, _) =
        Agent::start(&["softirq", "--min-latency-us", "0", "-i", "0"], NEEDS);
    std::thread::sleep(Duration::from_secs(1));
    let mut net_rx_ns: Vec<u64> = calibration
        .stop_ok()
        .iter()
        .filter(|r| is_type(r, "softirq") && str_field(r, "vec") == "NET_RX")
        .map(|r| u64_field(r, "service_ns"))
        .collect();
    assert!(
        net_rx_ns.len() >= 10,
        "{} NET_RX runs in 1 s",
        net_rx_ns.len()
    );
    net_rx_ns.sort_unstable();
    let threshold_us = (net_rx_ns[net_rx_ns.len() / 2] / 1000).max(1);
    let threshold_ns = threshold_us * 1000;
    let (mut agent, start) = Agent::start(
        &[
            "softirq",
            "--min-latency-us",
            "0",
            "--stack-min-latency-us",
            &threshold_us.to_string(),
            "-i",
            "0",
        ],
        NEEDS,
    );
    assert_eq!(degraded_why(&start, "kallsyms"), None, "in {start}");
    std::thread::sleep(Duration::from_secs(2));
    let recs = agent.stop_ok();

    let runs: Vec<&Value> = recs.iter().filter(|r| is_type(r, "softirq")).collect();
    let (mut with, mut without, mut net_rx) = (0, 0, 0);
    for rec in &runs {
        if u64_field(rec, "service_ns") < threshold_ns {
            assert!(
                rec.get("stack").is_none(),
                "a stack under the threshold: {rec}"
            );
            without += 1;
            continue;
        }
        let frames = frames(rec);
        with += 1;
        if str_field(rec, "vec") == "NET_RX" {
            assert!(
                LOOPS.iter().any(|f| in_stack(&frames, f)),
                "none of {LOOPS:?} in a NET_RX run's stack: {rec}"
            );
            net_rx += 1;
        }
    }
    assert!(
        with > 0 && without > 0 && net_rx > 0,
        "{with} runs with a stack ({net_rx} NET_RX), {without} without, of {}, \
         from {threshold_us} µs",
        runs.len()
    );
    // Every run at or over the threshold was sent with its stack: none was
    // sent without one for want of room (`partial`).
    let totals = class_totals(&recs, "softirq");
    assert_eq!(totals.partial, 0, "stacks not taken: {totals:?}");
}
