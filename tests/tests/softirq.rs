//! Acceptance tests of `kdiag-agent softirq` against the real kernel: its
//! counts against /proc/softirqs, the invariants of every summary, and the
//! exact accounting of every softirq when all of them are streamed; each on
//! both ways the programs attach (BTF tracepoints, the default, and classic
//! tracepoints, `--attach classic`).
//!
//! Softirqs are per CPU, not per process: these tests cannot filter on
//! their own traffic. They bracket the agent's counts with /proc/softirqs
//! reads instead, which holds whatever else runs in parallel.

use std::collections::{BTreeMap, BTreeSet};
use std::thread;
use std::time::Duration;

use kdiag_tests::agent::Agent;
use kdiag_tests::env::skip_unless;
use kdiag_tests::loopback::LoopbackTraffic;
use kdiag_tests::record::{self, ClassTotals, class_totals, str_field, u64_field};
use kdiag_tests::softirqs::ProcSoftirqs;
use serde_json::Value;

/// As the kernel names them (kernel/softirq.c `softirq_to_name`).
const VECS: [&str; 10] = [
    "HI", "TIMER", "NET_TX", "NET_RX", "BLOCK", "IRQ_POLL", "TASKLET", "SCHED", "HRTIMER", "RCU",
];

const EXIT_USAGE: i32 = 2;

/// One loopback write this often: about a thousand NET_RX a second.
const TRAFFIC_EVERY: Duration = Duration::from_millis(1);

const TRACEPOINTS: [&str; 3] = ["irq/softirq_raise", "irq/softirq_entry", "irq/softirq_exit"];

/// How a test has the programs attach.
#[derive(Debug, Clone, Copy)]
enum Attach {
    /// The default: BTF tracepoints, which every kernel the agent supports
    /// has (5.5+ built with BTF, as the distributions' kernels are).
    BtfTracepoint,
    /// `--attach classic`.
    Classic,
}

impl Attach {
    /// `agent_start`'s `attached_as` for each tracepoint.
    fn shown(self) -> &'static str {
        match self {
            Self::BtfTracepoint => "tp_btf",
            Self::Classic => "tracepoint",
        }
    }
}

/// Spawns the agent, attaching as `attach` says, and checks it attached
/// all three tracepoints that way.
fn start(attach: Attach, args: &[&str]) -> (Agent, Value) {
    let mut all = Vec::from(args);
    if let Attach::Classic = attach {
        all.extend(["--attach", "classic"]);
    }
    let (agent, start) = Agent::start(&all, &TRACEPOINTS);
    agent.assert_only_kernel_limits(&start);
    for tp in TRACEPOINTS {
        assert_eq!(start["attached_as"][tp], attach.shown(), "{tp} in {start}");
    }
    (agent, start)
}

/// The record's fields beyond the envelope, which must be exactly `keys`.
fn assert_fields(rec: &Value, keys: &[&str]) {
    let have: BTreeSet<&str> = rec
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .filter(|k| !["v", "type", "ts", "host"].contains(k))
        .collect();
    let want: BTreeSet<&str> = keys.iter().copied().collect();
    assert_eq!(have, want, "fields of {rec}");
}

fn cpu_and_vec(rec: &Value, cpus: usize) -> (usize, String) {
    let cpu = usize::try_from(u64_field(rec, "cpu")).expect("cpu fits usize");
    assert!(cpu < cpus, "cpu {cpu} of {cpus} in {rec}");
    let vec = str_field(rec, "vec");
    assert!(VECS.contains(&vec), "unknown vec in {rec}");
    (cpu, vec.to_owned())
}

/// An integer or null field.
fn opt_u64(rec: &Value, key: &str) -> Option<u64> {
    match rec.get(key) {
        Some(Value::Null) => None,
        _ => Some(u64_field(rec, key)),
    }
}

/// Checks a `softirq_summary` against the contract and the invariants the
/// schema promises; returns its CPU, vector and count.
fn check_summary(rec: &Value, cpus: usize) -> (usize, String, u64) {
    assert_fields(
        rec,
        &[
            "cpu",
            "vec",
            "count",
            "service_total_ns",
            "service_max_ns",
            "service_p99_ns",
            "delay_max_ns",
            "delay_p99_ns",
            "interval_ns",
        ],
    );
    let (cpu, vec) = cpu_and_vec(rec, cpus);
    let count = u64_field(rec, "count");
    let total = u64_field(rec, "service_total_ns");
    let max = u64_field(rec, "service_max_ns");
    let p99 = u64_field(rec, "service_p99_ns");
    assert!(count >= 1, "a summary of nothing: {rec}");
    assert!(p99 <= max, "service p99 above max: {rec}");
    assert!(
        max <= total && u128::from(total) <= u128::from(count) * u128::from(max),
        "total inconsistent with count and max: {rec}"
    );
    match (opt_u64(rec, "delay_max_ns"), opt_u64(rec, "delay_p99_ns")) {
        (Some(max), Some(p99)) => assert!(p99 <= max, "delay p99 above max: {rec}"),
        (None, None) => {}
        _ => panic!("delay max and p99 not both known or both null: {rec}"),
    }
    assert!(u64_field(rec, "interval_ns") > 0, "in {rec}");
    (cpu, vec, count)
}

/// Checks a `softirq` record; it must be at or over `min_ns`.
fn check_event(rec: &Value, cpus: usize, min_ns: u64) -> (usize, String) {
    assert_fields(rec, &["cpu", "vec", "service_ns", "delay_ns"]);
    let service = u64_field(rec, "service_ns");
    let delay = opt_u64(rec, "delay_ns").unwrap_or(0);
    assert!(
        service.max(delay) >= min_ns,
        "neither latency at or over {min_ns} ns: {rec}"
    );
    cpu_and_vec(rec, cpus)
}

/// Summed summary counts per (cpu, vec), checking every summary.
fn summary_counts(recs: &[Value], cpus: usize) -> BTreeMap<(usize, String), u64> {
    let mut counts = BTreeMap::new();
    for rec in recs
        .iter()
        .filter(|r| record::is_type(r, "softirq_summary"))
    {
        let (cpu, vec, count) = check_summary(rec, cpus);
        *counts.entry((cpu, vec)).or_insert(0) += count;
    }
    counts
}

/// The agent's counts, per CPU and vector, against /proc/softirqs (which
/// counts each handler run, right before softirq_entry fires):
/// - never more than the kernel's delta from before the agent was started
///   to after it exited (exact: the agent cannot see a softirq outside its
///   life);
/// - at least the delta from after `agent_start` (everything attached) to
///   the moment it was asked to stop, less the runs of the entry and exit
///   programs the kernel skipped because another BPF program was running on
///   that CPU (`recursion_misses`; usually 0). So the tolerance is the
///   softirqs of the agent's start-up and shutdown, plus those misses.
///   Where the kernel does not count such misses (before 6.7, which the
///   agent reports as degraded), this half cannot be checked.
fn counts_match_proc_softirqs(attach: Attach) {
    let _traffic = LoopbackTraffic::start(TRAFFIC_EVERY);
    let before_start = ProcSoftirqs::read();
    let (mut agent, start) = start(attach, &["softirq", "--interval", "1"]);
    let lower_bound = match record::degraded_why(&start, "bpf/recursion_misses") {
        None => true,
        Some(why) => skip_unless(
            false,
            &format!("its lower bound, which needs the kernel's recursion misses: {why}"),
        ),
    };
    let attached = ProcSoftirqs::read();
    thread::sleep(Duration::from_millis(2500));
    let before_stop = ProcSoftirqs::read();
    // Softirqs that entered before that read have exited by now.
    thread::sleep(Duration::from_millis(50));
    // Skipped runs of the entry and exit programs: the only runs whose
    // absence makes the agent count fewer softirqs than the kernel.
    let misses = agent.recursion_misses(&["softirq_entry", "softirq_exit"]);
    // The raise program is the one that misses most under traffic.
    let all = ["softirq_raise", "softirq_entry", "softirq_exit"];
    let all_misses = agent.recursion_misses(&all);
    let recs = agent.stop_ok();
    let after = ProcSoftirqs::read();
    // The agent reports them too, up to its detaching: at least as many.
    if lower_bound {
        let reported = record::recursion_misses_reported(&recs, &all);
        assert!(
            reported >= all_misses,
            "agent_stats reports {reported} recursion misses, the kernel counted {all_misses} \
             before the stop"
        );
    }

    let cpus = before_start.cpus;
    let counts = summary_counts(&recs, cpus);
    let (upper, lower) = (after.since(&before_start), before_stop.since(&attached));
    let intervals = recs
        .iter()
        .filter(|r| record::is_type(r, "agent_stats"))
        .count();
    assert!(intervals >= 3, "{intervals} intervals in about 2.6 s");
    for vec in VECS {
        for cpu in 0..cpus {
            let n = counts.get(&(cpu, vec.to_owned())).copied().unwrap_or(0);
            let (hi, lo) = (upper.get(vec, cpu), lower.get(vec, cpu));
            assert!(
                n <= hi,
                "{vec} on cpu {cpu}: agent counted {n}, the kernel only {hi} over the agent's life"
            );
            assert!(
                !lower_bound || n + misses >= lo,
                "{vec} on cpu {cpu}: agent counted {n}, the kernel {lo} while it was attached \
                 ({misses} recursion misses)"
            );
        }
    }
    let net_rx: u64 = (0..cpus)
        .filter_map(|cpu| counts.get(&(cpu, "NET_RX".to_owned())))
        .sum();
    assert!(net_rx > 100, "only {net_rx} NET_RX under loopback traffic");
    let seen: BTreeSet<usize> = counts.keys().map(|(cpu, _)| *cpu).collect();
    assert_eq!(
        seen,
        (0..cpus).collect::<BTreeSet<_>>(),
        "CPUs with summaries"
    );
    // The default threshold is 1 ms.
    for rec in recs.iter().filter(|r| record::is_type(r, "softirq")) {
        check_event(rec, cpus, 1_000_000);
    }
}

#[test]
fn counts_match_proc_softirqs_tp_btf() {
    counts_match_proc_softirqs(Attach::BtfTracepoint);
}

#[test]
fn counts_match_proc_softirqs_classic() {
    counts_match_proc_softirqs(Attach::Classic);
}

/// `--min-latency-us 0`: every counted softirq is streamed, so over the run
/// the `softirq` records written plus those the kernel could not hand over
/// (dropped, lost) equal the summaries' counts, exactly. On BTF
/// tracepoints this also checks the wait at exit for program runs still in
/// flight (their detach does not wait for them).
fn every_softirq_is_accounted_for(attach: Attach, transport: &str) {
    let _traffic = LoopbackTraffic::start(TRAFFIC_EVERY);
    let cpus = ProcSoftirqs::read().cpus;
    let (mut agent, start) = start(
        attach,
        &[
            "softirq",
            "--min-latency-us",
            "0",
            "--interval",
            "1",
            "--transport",
            transport,
        ],
    );
    assert_eq!(start["transport"], transport, "in {start}");
    thread::sleep(Duration::from_secs(2));
    let recs = agent.stop_ok();

    let mut written: BTreeMap<(usize, String), u64> = BTreeMap::new();
    for rec in recs.iter().filter(|r| record::is_type(r, "softirq")) {
        *written.entry(check_event(rec, cpus, 0)).or_insert(0) += 1;
    }
    let n_written: u64 = written.values().sum();
    let ClassTotals {
        events,
        dropped,
        lost,
        ..
    } = class_totals(&recs, "softirq");
    let counted = summary_counts(&recs, cpus);
    let n_counted: u64 = counted.values().sum();
    assert!(n_written > 100, "only {n_written} softirq records");
    assert_eq!(events, n_written, "agent_stats events vs softirq records");
    assert_eq!(
        n_written + dropped + lost,
        n_counted,
        "written {n_written} + dropped {dropped} + lost {lost} vs counted in summaries"
    );
    if dropped + lost == 0 {
        assert_eq!(written, counted, "per CPU and vector, nothing dropped");
    }
}

#[test]
fn every_softirq_is_accounted_for_ringbuf_tp_btf() {
    every_softirq_is_accounted_for(Attach::BtfTracepoint, "ringbuf");
}

#[test]
fn every_softirq_is_accounted_for_perf_tp_btf() {
    every_softirq_is_accounted_for(Attach::BtfTracepoint, "perf");
}

#[test]
fn every_softirq_is_accounted_for_ringbuf_classic() {
    every_softirq_is_accounted_for(Attach::Classic, "ringbuf");
}

#[test]
fn every_softirq_is_accounted_for_perf_classic() {
    every_softirq_is_accounted_for(Attach::Classic, "perf");
}

#[test]
fn pid_and_cgroup_are_usage_errors() {
    let own = std::process::id().to_string();
    for args in [
        &["--pid", own.as_str(), "softirq"][..],
        &["softirq", "--cgroup", "/"],
    ] {
        let (code, stderr) = Agent::run_to_exit(args);
        assert_eq!(
            code,
            EXIT_USAGE,
            "`kdiag-agent {}`: {stderr}",
            args.join(" ")
        );
        assert!(
            stderr.contains("softirqs run on behalf of no process"),
            "`kdiag-agent {}`: no reason given: {stderr}",
            args.join(" ")
        );
    }
    let (code, stderr) = Agent::run_to_exit(&["softirq", "--min-latency-us", "-1"]);
    assert_eq!(code, EXIT_USAGE, "negative threshold: {stderr}");
}
